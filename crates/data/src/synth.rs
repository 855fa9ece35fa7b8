//! The embedded synthetic multitask dataset: pg2's out-of-the-box demo data, generated
//! deterministically from a seed, so that a tiny model trains with no download.
//!
//! Every image serves one record of one task, with PaliGemma's prompts:
//!
//! | task | image | prefix | suffix | evaluation fields |
//! |---|---|---|---|---|
//! | `caption` | 1-3 shapes | `caption en` | `a red circle on the left and a blue square at the bottom right` | `references` |
//! | `count` | 1-3 shapes | `answer en how many circles` | `2` | `answers` |
//! | `color` | 1-3 shapes | `answer en what color is the square` | `blue` | `answers` |
//! | `detect` | 1-3 shapes | `detect circle` | `<loc0012><loc0034><loc0300><loc0322> circle ; ...` | `boxes` |
//! | `ocr` | 3-6 digits | `ocr` | `40817` | `answers`, `text_height` |
//!
//! Shapes (circle, square, triangle) have distinct colours and sit in distinct cells of a 3x3
//! grid, so every caption position ("at the top left", "in the center", ...) is unambiguous
//! and shapes never overlap. Shape records also carry `objects`: each shape's `shape`,
//! `color` and pixel `box`. Boxes are `[y1, x1, y2, x2]` in pixels (`y2`, `x2` exclusive); a
//! loc token is `round(coord / canvas * 1023)`, as big_vision. `answers` lists the answer
//! three times (full credit under VQA accuracy, `min(matches / 3, 1)`) then synonyms (`two`
//! for `2`). Half of the OCR strings are small (7 px glyphs on a 128 px canvas), legible only
//! at the full resolution; the other half are 2-3 times larger.
//!
//! [`write_synth`] writes, under `dir`:
//!
//! ```text
//! images/{train,val}/000000.png      canvas x canvas RGB
//! train.jsonl, val.jsonl             the task mixture (image paths relative to the file)
//! tasks/<task>/{train,val}.jsonl     each task alone, for transfer (../../images/...)
//! tokenizer.json                     BPE trained on all prefixes and suffixes
//! synth.json                         the options, tasks and vocabulary size
//! ```
//!
//! Everything is first written into a sibling folder `.<dir>.tmp-<pid>`, renamed to `dir` once
//! complete: a `dir` that exists is always a finished dataset (of two processes racing to
//! write it, the second to finish fails and removes its copy).

use std::fmt::Display;
use std::fs;
use std::path::Path;

use image::{Rgb, RgbImage};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use serde_json::{json, Map, Value};
use tokenizers::decoders::DecoderWrapper;
use tokenizers::models::bpe::{BpeTrainer, BPE};
use tokenizers::normalizers::NormalizerWrapper;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::processors::PostProcessorWrapper;
use tokenizers::{AddedToken, TokenizerBuilder};

use crate::files::Staged;
use crate::tokenizer::location_and_segment_tokens;
use crate::DataError;

/// What [`write_synth`] generates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SynthOptions {
    /// Seed of everything: the same options give byte-identical files.
    pub seed: u64,
    /// Number of training records (one image each).
    pub train: usize,
    /// Number of validation records.
    pub val: usize,
    /// Image side in pixels; at least 48.
    pub canvas: u32,
}

impl Default for SynthOptions {
    /// Seed 0, 4000 training and 200 validation records, 128 px images.
    fn default() -> Self {
        Self { seed: 0, train: 4000, val: 200, canvas: 128 }
    }
}

/// What [`write_synth`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SynthSummary {
    /// Number of training records.
    pub train: usize,
    /// Number of validation records.
    pub val: usize,
    /// The task names, as in the records' `task` field and under `tasks/`.
    pub tasks: Vec<String>,
    /// Number of ids of `tokenizer.json`, added tokens included (`<image>` is the last).
    pub vocab_size: usize,
}

/// Smallest canvas on which 6 digits and 3 grid cells of shapes fit.
const MIN_CANVAS: u32 = 48;

/// Generates the dataset into `dir`, which must not exist yet (its parent is created when
/// missing). On failure nothing is left behind; errors name the file at fault.
pub fn write_synth(dir: &Path, opts: &SynthOptions) -> Result<SynthSummary, DataError> {
    if opts.canvas < MIN_CANVAS {
        return Err(file_error(dir, format!("canvas {} is below the minimum {MIN_CANVAS}", opts.canvas)));
    }
    if dir.exists() {
        return Err(file_error(dir, "already exists; remove it to generate the dataset again"));
    }
    let staged = Staged::new(dir).map_err(|e| file_error(dir, e))?;
    let summary = write_all(staged.path(), opts)?;
    staged.commit().map_err(|e| file_error(dir, e))?;
    Ok(summary)
}

fn file_error(path: &Path, msg: impl Display) -> DataError {
    DataError::File { path: path.display().to_string(), msg: msg.to_string() }
}

/// Writes every file of the dataset under `root`.
fn write_all(root: &Path, opts: &SynthOptions) -> Result<SynthSummary, DataError> {
    let train = write_split(root, "train", opts.train, 0, opts)?;
    let val = write_split(root, "val", opts.val, opts.train, opts)?;
    for (split, examples) in [("train", &train), ("val", &val)] {
        write_jsonl(&root.join(format!("{split}.jsonl")), examples.iter(), "")?;
        for task in TASKS {
            let path = root.join("tasks").join(task.name()).join(format!("{split}.jsonl"));
            write_jsonl(&path, examples.iter().filter(|e| e.task == task.name()), "../../")?;
        }
    }
    let vocab_size = write_tokenizer(&root.join("tokenizer.json"), train.iter().chain(&val))?;
    let tasks: Vec<String> = TASKS.iter().map(|t| t.name().to_string()).collect();
    let info = json!({"seed": opts.seed, "train": opts.train, "val": opts.val, "canvas": opts.canvas,
                      "tasks": tasks, "vocab_size": vocab_size});
    let info_path = root.join("synth.json");
    fs::write(&info_path, format!("{info:#}\n")).map_err(|e| file_error(&info_path, e))?;
    Ok(SynthSummary { train: opts.train, val: opts.val, tasks, vocab_size })
}

// ---------------------------------------------------------------------------------------
// Records and files

/// One record of the mixture; `image` is relative to the dataset folder.
#[derive(Clone, Serialize)]
struct Example {
    image: String,
    prefix: String,
    suffix: String,
    task: &'static str,
    id: String,
    /// Evaluation fields (`references`, `answers`, `boxes`, `objects`, `text_height`).
    #[serde(flatten)]
    fields: Map<String, Value>,
}

/// What a task asks about an image.
struct Target {
    prefix: String,
    suffix: String,
    fields: Map<String, Value>,
}

impl Target {
    fn new<const N: usize>(prefix: String, suffix: String, fields: [(&str, Value); N]) -> Self {
        let fields = fields.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
        Self { prefix, suffix, fields }
    }

    /// A target about a scene of shapes, which also records the shapes.
    fn about_scene<const N: usize>(
        prefix: String,
        suffix: String,
        objects: &[Object],
        fields: [(&str, Value); N],
    ) -> Self {
        let mut target = Self::new(prefix, suffix, fields);
        target.fields.insert("objects".into(), objects.iter().map(Object::to_json).collect());
        target
    }
}

/// The RNG of one `stream`: streams 0 and 1 schedule the tasks of train and val, stream
/// `2 + k` draws example `k` (val examples follow the train ones), so that examples are
/// independent of each other.
fn rng(seed: u64, stream: u64) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(stream);
    rng
}

/// Draws and saves the `count` images of `split`; `first` is the global index of its first
/// example.
fn write_split(
    root: &Path,
    split: &str,
    count: usize,
    first: usize,
    opts: &SynthOptions,
) -> Result<Vec<Example>, DataError> {
    let image_dir = root.join("images").join(split);
    fs::create_dir_all(&image_dir).map_err(|e| file_error(&image_dir, e))?;
    let schedule = task_schedule(&mut rng(opts.seed, u64::from(split != "train")), count);
    let mut examples = Vec::with_capacity(count);
    for (i, task) in schedule.into_iter().enumerate() {
        let (img, target) = generate(task, &mut rng(opts.seed, 2 + (first + i) as u64), opts.canvas);
        let image = format!("images/{split}/{i:06}.png");
        let path = root.join(&image);
        img.save(&path).map_err(|e| file_error(&path, e))?;
        let Target { prefix, suffix, fields } = target;
        examples.push(Example { image, prefix, suffix, task: task.name(), id: format!("{split}-{i:06}"), fields });
    }
    Ok(examples)
}

/// Tasks in blocks of five, each block a shuffle of all five: balanced to within one.
fn task_schedule(rng: &mut ChaCha8Rng, count: usize) -> Vec<Task> {
    let blocks = count.div_ceil(TASKS.len());
    (0..blocks)
        .flat_map(|_| {
            let mut block = TASKS;
            block.shuffle(rng);
            block
        })
        .take(count)
        .collect()
}

/// Writes one record a line, image paths prefixed with `up` (the way back to the dataset
/// folder from the file's folder).
fn write_jsonl<'a>(path: &Path, examples: impl Iterator<Item = &'a Example>, up: &str) -> Result<(), DataError> {
    let mut text = String::new();
    for example in examples {
        let line = Example { image: format!("{up}{}", example.image), ..example.clone() };
        text += &serde_json::to_string(&line).expect("records are plain JSON");
        text.push('\n');
    }
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).map_err(|e| file_error(dir, e))?;
    }
    fs::write(path, text).map_err(|e| file_error(path, e))
}

// ---------------------------------------------------------------------------------------
// Tasks

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Task {
    Caption,
    Count,
    Color,
    Detect,
    Ocr,
}

const TASKS: [Task; 5] = [Task::Caption, Task::Count, Task::Color, Task::Detect, Task::Ocr];

impl Task {
    fn name(self) -> &'static str {
        match self {
            Task::Caption => "caption",
            Task::Count => "count",
            Task::Color => "color",
            Task::Detect => "detect",
            Task::Ocr => "ocr",
        }
    }
}

/// Draws the image of one `task` example and what the task asks about it.
fn generate(task: Task, rng: &mut ChaCha8Rng, canvas: u32) -> (RgbImage, Target) {
    let (mut img, dark) = background(rng, canvas);
    let target = match task {
        Task::Caption => caption(rng, &mut img),
        Task::Count => count(rng, &mut img),
        Task::Color => color(rng, &mut img),
        Task::Detect => detect(rng, &mut img),
        Task::Ocr => ocr(rng, &mut img, dark),
    };
    (img, target)
}

fn random_shape(rng: &mut ChaCha8Rng) -> Shape {
    SHAPES[rng.random_range(0..SHAPES.len())]
}

/// 1 to 3 shapes of any kinds.
fn random_shapes(rng: &mut ChaCha8Rng) -> Vec<Shape> {
    (0..rng.random_range(1..=3)).map(|_| random_shape(rng)).collect()
}

/// `n` shapes of kinds other than `except`.
fn other_shapes(rng: &mut ChaCha8Rng, except: Shape, n: usize) -> Vec<Shape> {
    let others: Vec<Shape> = SHAPES.into_iter().filter(|&s| s != except).collect();
    (0..n).map(|_| others[rng.random_range(0..others.len())]).collect()
}

/// VQA-style acceptable answers: the answer three times, then its synonyms.
fn vqa_answers(answer: &str, synonyms: &[&str]) -> Value {
    [answer; 3].iter().chain(synonyms).map(|&a| Value::from(a)).collect()
}

/// Where each grid cell (row-major) is, in captions.
const POSITIONS: [&str; 9] = [
    "at the top left",
    "at the top",
    "at the top right",
    "on the left",
    "in the center",
    "on the right",
    "at the bottom left",
    "at the bottom",
    "at the bottom right",
];

/// "a red circle on the left, an orange square in the center and a green triangle at the top".
fn describe<'a>(objects: impl Iterator<Item = &'a Object>) -> String {
    let phrases: Vec<String> = objects
        .map(|o| {
            let colour = COLOURS[o.colour].0;
            let article = if colour.starts_with(['a', 'e', 'i', 'o', 'u']) { "an" } else { "a" };
            format!("{article} {colour} {} {}", o.shape.name(), POSITIONS[o.cell])
        })
        .collect();
    match phrases.split_last() {
        Some((last, [])) => last.clone(),
        Some((last, rest)) => format!("{} and {last}", rest.join(", ")),
        None => String::new(),
    }
}

/// Shapes in reading order; the second reference lists them backwards.
fn caption(rng: &mut ChaCha8Rng, img: &mut RgbImage) -> Target {
    let shapes = random_shapes(rng);
    let objects = draw_scene(rng, img, shapes);
    let sentence = describe(objects.iter());
    let references = json!([sentence, describe(objects.iter().rev())]);
    Target::about_scene("caption en".into(), sentence, &objects, [("references", references)])
}

const NUMBER_WORDS: [&str; 4] = ["zero", "one", "two", "three"];

/// The answer is drawn first (0 to 3, evenly), then the scene: `n` of the asked shape and
/// up to `3 - n` others.
fn count(rng: &mut ChaCha8Rng, img: &mut RgbImage) -> Target {
    let asked = random_shape(rng);
    let n = rng.random_range(0..=3);
    let others = rng.random_range(usize::from(n == 0)..=3 - n);
    let shapes = [vec![asked; n], other_shapes(rng, asked, others)].concat();
    let objects = draw_scene(rng, img, shapes);
    let answers = vqa_answers(&n.to_string(), &[NUMBER_WORDS[n]]);
    Target::about_scene(
        format!("answer en how many {}s", asked.name()),
        n.to_string(),
        &objects,
        [("answers", answers)],
    )
}

/// Asks about a shape that appears exactly once, among up to two of other kinds.
fn color(rng: &mut ChaCha8Rng, img: &mut RgbImage) -> Target {
    let asked = random_shape(rng);
    let others = rng.random_range(0..=2);
    let shapes = [vec![asked], other_shapes(rng, asked, others)].concat();
    let objects = draw_scene(rng, img, shapes);
    let colour = COLOURS[objects.iter().find(|o| o.shape == asked).expect("drawn above").colour].0;
    let prefix = format!("answer en what color is the {}", asked.name());
    Target::about_scene(prefix, colour.into(), &objects, [("answers", vqa_answers(colour, &[]))])
}

/// Asks for a shape that is present; instances come in reading order.
fn detect(rng: &mut ChaCha8Rng, img: &mut RgbImage) -> Target {
    let shapes = random_shapes(rng);
    let objects = draw_scene(rng, img, shapes);
    let shape = objects[rng.random_range(0..objects.len())].shape;
    let found: Vec<&Object> = objects.iter().filter(|o| o.shape == shape).collect();
    let suffix: Vec<String> = found
        .iter()
        .map(|o| {
            let locs: String = o.bbox.iter().map(|&c| format!("<loc{:04}>", loc_bin(c, img.width()))).collect();
            format!("{locs} {}", shape.name())
        })
        .collect();
    let boxes: Value = found.iter().map(|o| json!(o.bbox)).collect();
    Target::about_scene(format!("detect {}", shape.name()), suffix.join(" ; "), &objects, [("boxes", boxes)])
}

/// big_vision's box coordinate token: `round(coord / size * 1023)`.
fn loc_bin(coord: u32, canvas: u32) -> u32 {
    (f64::from(coord) / f64::from(canvas) * 1023.0).round() as u32
}

/// 3 to 6 digits, half of them small (scale 1, 7 px high, on a 128 px canvas), half 2-3
/// times larger, shrunk where the string would not fit.
fn ocr(rng: &mut ChaCha8Rng, img: &mut RgbImage, dark: bool) -> Target {
    let canvas = img.width();
    let len = rng.random_range(3..=6u32);
    let text: String = (0..len).map(|_| char::from(b'0' + rng.random_range(0..10u8))).collect();
    let small = (canvas / 128).max(1);
    let wanted = if rng.random_bool(0.5) { small } else { small * rng.random_range(2..=3) };
    let unit_width = len * (GLYPH_W + 1) - 1;
    let scale = wanted.min((canvas - 4) / unit_width).max(1);
    let (width, height) = (unit_width * scale, GLYPH_H * scale);
    let x = rng.random_range(2..=canvas - 2 - width);
    let y = rng.random_range(2..=canvas - 2 - height);
    let ink = if dark { [240, 240, 240] } else { [15, 15, 15] };
    draw_digits(img, &text, x, y, scale, ink);
    let fields = [("answers", vqa_answers(&text, &[])), ("text_height", json!(height))];
    Target::new("ocr".into(), text, fields)
}

// ---------------------------------------------------------------------------------------
// Drawing

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Shape {
    Circle,
    Square,
    Triangle,
}

const SHAPES: [Shape; 3] = [Shape::Circle, Shape::Square, Shape::Triangle];

impl Shape {
    fn name(self) -> &'static str {
        match self {
            Shape::Circle => "circle",
            Shape::Square => "square",
            Shape::Triangle => "triangle",
        }
    }

    /// Whether the point `(u, v)` of the shape's box (0 to 1 from its top left) is inside;
    /// triangles point up. Each shape covers the centre of its box.
    fn covers(self, u: f32, v: f32) -> bool {
        match self {
            Shape::Circle => (u - 0.5).powi(2) + (v - 0.5).powi(2) <= 0.25,
            Shape::Square => true,
            Shape::Triangle => (u - 0.5).abs() <= v / 2.0,
        }
    }
}

/// Saturated colours, far from the grey-ish backgrounds and from each other.
const COLOURS: [(&str, [u8; 3]); 6] = [
    ("red", [220, 30, 30]),
    ("green", [30, 170, 50]),
    ("blue", [30, 80, 230]),
    ("yellow", [245, 215, 20]),
    ("purple", [150, 50, 190]),
    ("orange", [250, 135, 15]),
];

/// One shape: `colour` indexes [`COLOURS`], `cell` the 3x3 grid (row-major), `bbox` is
/// `[y1, x1, y2, x2]` in pixels with `y2`, `x2` exclusive.
struct Object {
    shape: Shape,
    colour: usize,
    cell: usize,
    bbox: [u32; 4],
}

impl Object {
    fn draw(&self, img: &mut RgbImage) {
        let [y1, x1, y2, x2] = self.bbox;
        let size = (x2 - x1) as f32;
        for y in y1..y2 {
            for x in x1..x2 {
                // Pixel centres, so that small shapes stay symmetric.
                let (u, v) = (((x - x1) as f32 + 0.5) / size, ((y - y1) as f32 + 0.5) / size);
                if self.shape.covers(u, v) {
                    img.put_pixel(x, y, Rgb(COLOURS[self.colour].1));
                }
            }
        }
    }

    fn to_json(&self) -> Value {
        json!({"shape": self.shape.name(), "color": COLOURS[self.colour].0, "box": self.bbox})
    }
}

/// Draws `shapes` in random order into distinct grid cells with distinct colours; returns
/// them in reading order. Each lies inside its cell with a pixel to spare, so shapes never
/// touch.
fn draw_scene(rng: &mut ChaCha8Rng, img: &mut RgbImage, mut shapes: Vec<Shape>) -> Vec<Object> {
    shapes.shuffle(rng);
    let mut cells = rand::seq::index::sample(rng, 9, shapes.len()).into_vec();
    cells.sort_unstable();
    let colours = rand::seq::index::sample(rng, COLOURS.len(), shapes.len()).into_vec();
    let cell_size = img.width() / 3;
    let (min_size, max_size) = ((img.width() / 8).max(6), cell_size - 2);
    let objects: Vec<Object> = (shapes.into_iter().zip(cells).zip(colours))
        .map(|((shape, cell), colour)| {
            let size = rng.random_range(min_size..=max_size);
            let top = (cell / 3) as u32 * cell_size + 1 + rng.random_range(0..=cell_size - 2 - size);
            let left = (cell % 3) as u32 * cell_size + 1 + rng.random_range(0..=cell_size - 2 - size);
            Object { shape, colour, cell, bbox: [top, left, top + size, left + size] }
        })
        .collect();
    for object in &objects {
        object.draw(img);
    }
    objects
}

/// A low-saturation background, all dark or all light (returned, for the text colour): a
/// solid colour, a gradient between two, or a solid colour with light noise.
fn background(rng: &mut ChaCha8Rng, canvas: u32) -> (RgbImage, bool) {
    let dark = rng.random_bool(0.5);
    let base = background_colour(rng, dark);
    let img = match rng.random_range(0..3) {
        0 => RgbImage::from_pixel(canvas, canvas, Rgb(base)),
        1 => {
            let end = background_colour(rng, dark);
            let vertical = rng.random_bool(0.5);
            RgbImage::from_fn(canvas, canvas, |x, y| {
                let t = (if vertical { y } else { x }) as f32 / (canvas - 1) as f32;
                Rgb(std::array::from_fn(|c| (f32::from(base[c]) * (1.0 - t) + f32::from(end[c]) * t).round() as u8))
            })
        }
        _ => RgbImage::from_fn(canvas, canvas, |_, _| {
            let noise = rng.random_range(-12..=12);
            Rgb(base.map(|c| (i32::from(c) + noise).clamp(0, 255) as u8))
        }),
    };
    (img, dark)
}

/// A grey (dark or light) with a slight tint.
fn background_colour(rng: &mut ChaCha8Rng, dark: bool) -> [u8; 3] {
    let grey: i32 = if dark { rng.random_range(25..=75) } else { rng.random_range(175..=225) };
    std::array::from_fn(|_| (grey + rng.random_range(-12..=12)) as u8)
}

const GLYPH_W: u32 = 5;
const GLYPH_H: u32 = 7;

/// 5x7 bitmaps of 0-9, one byte a row, bit 4 the leftmost pixel.
const DIGIT_GLYPHS: [[u8; 7]; 10] = [
    [0x0E, 0x11, 0x13, 0x15, 0x19, 0x11, 0x0E],
    [0x04, 0x0C, 0x04, 0x04, 0x04, 0x04, 0x0E],
    [0x0E, 0x11, 0x01, 0x02, 0x04, 0x08, 0x1F],
    [0x1F, 0x02, 0x04, 0x02, 0x01, 0x11, 0x0E],
    [0x02, 0x06, 0x0A, 0x12, 0x1F, 0x02, 0x02],
    [0x1F, 0x10, 0x1E, 0x01, 0x01, 0x11, 0x0E],
    [0x06, 0x08, 0x10, 0x1E, 0x11, 0x11, 0x0E],
    [0x1F, 0x01, 0x02, 0x04, 0x08, 0x08, 0x08],
    [0x0E, 0x11, 0x11, 0x0E, 0x11, 0x11, 0x0E],
    [0x0E, 0x11, 0x11, 0x0F, 0x01, 0x02, 0x0C],
];

/// Draws `digits` with its top left at `(x, y)`, each font pixel a `scale` x `scale`
/// square, one font pixel between glyphs.
fn draw_digits(img: &mut RgbImage, digits: &str, x: u32, y: u32, scale: u32, ink: [u8; 3]) {
    for (i, digit) in digits.bytes().enumerate() {
        let left = x + i as u32 * (GLYPH_W + 1) * scale;
        for (row, bits) in (0..).zip(DIGIT_GLYPHS[usize::from(digit - b'0')]) {
            for col in (0..GLYPH_W).filter(|col| bits >> (GLYPH_W - 1 - col) & 1 == 1) {
                for dy in 0..scale {
                    for dx in 0..scale {
                        img.put_pixel(left + col * scale + dx, y + row * scale + dy, Rgb(ink));
                    }
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Tokenizer

/// Target size of the learned vocabulary (special tokens and alphabet included); training
/// stops earlier when no pair occurs twice.
const BPE_VOCAB: usize = 400;

/// Characters the tokenizer knows even where the data lacks them, so that hand-written
/// prompts rarely hit `<unk>`. `▁` is the Metaspace space.
const ALPHABET: &str = "abcdefghijklmnopqrstuvwxyz0123456789▁\n.,;:?!'-";

/// Trains `tokenizer.json` on the prefixes (with the "\n" separator the layout appends) and
/// suffixes; returns its vocabulary size.
///
/// Like Gemma's, the tokenizer turns spaces into `▁` and never prepends one, so that decoding
/// gives back exactly the encoded text; digits are split one by one (OCR strings read digit
/// by digit). Ids: `<pad>` 0, `<eos>` 1, `<bos>` 2, `<unk>` 3, the learned vocabulary, the
/// 1152 loc/seg tokens (plain added tokens), then `<image>` (special) last.
fn write_tokenizer<'a>(path: &Path, examples: impl Iterator<Item = &'a Example>) -> Result<usize, DataError> {
    let texts: Vec<String> = examples.flat_map(|e| [format!("{}\n", e.prefix), e.suffix.clone()]).collect();
    let err = |e: tokenizers::Error| file_error(path, format!("cannot train the tokenizer: {e}"));
    let specials = ["<pad>", "<eos>", "<bos>", "<unk>"].map(|t| AddedToken::from(t, true)).to_vec();
    let mut trainer = BpeTrainer::builder()
        .vocab_size(BPE_VOCAB)
        .min_frequency(2)
        .show_progress(false)
        .special_tokens(specials)
        .initial_alphabet(ALPHABET.chars().collect())
        .build();
    let metaspace = Metaspace::new('▁', PrependScheme::Never, true);
    let pre_tokenizer = Sequence::new(vec![metaspace.clone().into(), Digits::new(true).into()]);
    let mut tokenizer =
        TokenizerBuilder::<BPE, NormalizerWrapper, PreTokenizerWrapper, PostProcessorWrapper, DecoderWrapper>::new()
            .with_model(BPE::builder().unk_token("<unk>".into()).build().map_err(err)?)
            .with_pre_tokenizer(Some(pre_tokenizer.into()))
            .with_decoder(Some(metaspace.into()))
            .build()
            .map_err(err)?;
    // The loc tokens are added after training, so the trainer must not see them.
    tokenizer.train(&mut trainer, texts.iter().flat_map(|t| without_added_tokens(t))).map_err(err)?;
    tokenizer.add_tokens(location_and_segment_tokens().into_iter().map(|t| AddedToken::from(t, false))).map_err(err)?;
    tokenizer.add_special_tokens([AddedToken::from("<image>", true)]).map_err(err)?;
    let json = tokenizer.to_string(false).map_err(err)?;
    fs::write(path, json).map_err(|e| file_error(path, e))?;
    Ok(tokenizer.get_vocab_size(true))
}

/// The text between `<...>` tokens (the only angle brackets the data has are loc tokens).
fn without_added_tokens(text: &str) -> impl Iterator<Item = &str> {
    let mut pieces = text.split('<');
    let head = pieces.next();
    head.into_iter().chain(pieces.map(|p| p.split_once('>').map_or(p, |(_, rest)| rest))).filter(|p| !p.is_empty())
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, HashSet};

    use super::*;
    use crate::source::{read_jsonl, Record};
    use crate::tokenizer::PgTokenizer;
    use std::path::PathBuf;

    const CANVAS: u32 = 64;

    /// A fresh dataset path under the temp folder, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> Self {
            let path = std::env::temp_dir().join(format!("pg2-synth-{}-{name}", std::process::id()));
            let _ = fs::remove_dir_all(&path);
            Self(path)
        }

        fn generate(name: &str, seed: u64) -> (Self, SynthSummary) {
            let dir = Self::new(name);
            let summary = write_synth(&dir.0, &SynthOptions { seed, train: 40, val: 10, canvas: CANVAS }).unwrap();
            (dir, summary)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    /// Every file under `dir` (relative path -> bytes).
    fn files(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
        let mut out = BTreeMap::new();
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            for entry in fs::read_dir(&d).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    stack.push(path);
                } else {
                    out.insert(path.strip_prefix(dir).unwrap().to_path_buf(), fs::read(&path).unwrap());
                }
            }
        }
        out
    }

    fn field<'a>(record: &'a Record, key: &str) -> &'a Value {
        record.extra.get(key).unwrap_or_else(|| panic!("{}:{} has no `{key}`", record.file.display(), record.line))
    }

    fn task(record: &Record) -> &str {
        field(record, "task").as_str().unwrap()
    }

    fn objects(record: &Record) -> Vec<(String, String, Vec<u32>)> {
        let objects = field(record, "objects").as_array().unwrap();
        objects
            .iter()
            .map(|o| {
                let bbox = o["box"].as_array().unwrap().iter().map(|c| c.as_u64().unwrap() as u32).collect();
                (o["shape"].as_str().unwrap().to_string(), o["color"].as_str().unwrap().to_string(), bbox)
            })
            .collect()
    }

    #[test]
    fn same_seed_same_bytes_other_seed_differs() {
        let (a, _) = TempDir::generate("det-a", 7);
        let (b, _) = TempDir::generate("det-b", 7);
        let (c, _) = TempDir::generate("det-c", 8);
        let (fa, fb, fc) = (files(&a.0), files(&b.0), files(&c.0));
        assert!(fa.contains_key(Path::new("images/train/000039.png")) && fa.contains_key(Path::new("tokenizer.json")));
        assert_eq!(fa.keys().collect::<Vec<_>>(), fb.keys().collect::<Vec<_>>());
        for (path, bytes) in &fa {
            assert!(bytes == &fb[path], "{} differs between two runs with the same seed", path.display());
        }
        assert_ne!(fa[Path::new("train.jsonl")], fc[Path::new("train.jsonl")]);
        assert_ne!(fa[Path::new("images/train/000000.png")], fc[Path::new("images/train/000000.png")]);
    }

    #[test]
    fn records_images_splits_and_task_files() {
        let (dir, summary) = TempDir::generate("layout", 0);
        assert_eq!((summary.train, summary.val), (40, 10));
        let train = read_jsonl(&dir.0.join("train.jsonl")).unwrap();
        let val = read_jsonl(&dir.0.join("val.jsonl")).unwrap();
        assert_eq!((train.len(), val.len()), (40, 10));
        for record in train.iter().chain(&val) {
            let img = record.load_image().unwrap();
            assert_eq!(img.dimensions(), (CANVAS, CANVAS), "{:?}", record.image);
            assert!(record.suffix.as_deref().is_some_and(|s| !s.is_empty()));
        }
        let tasks: HashSet<&str> = train.iter().map(task).collect();
        assert_eq!(tasks, summary.tasks.iter().map(String::as_str).collect());
        assert_eq!(tasks.len(), 5);
        // Blocks of five: each task 8 times in 40 records.
        assert!(summary.tasks.iter().all(|t| train.iter().filter(|r| task(r) == t).count() == 8));
        let ids = |records: &[Record]| {
            records.iter().map(|r| field(r, "id").as_str().unwrap().to_string()).collect::<HashSet<_>>()
        };
        assert!(ids(&train).is_disjoint(&ids(&val)));
        assert_eq!(ids(&train).len(), 40);
        for (split, mixture) in [("train", &train), ("val", &val)] {
            for name in &summary.tasks {
                let alone = read_jsonl(&dir.0.join("tasks").join(name).join(format!("{split}.jsonl"))).unwrap();
                let expected: Vec<&Record> = mixture.iter().filter(|r| task(r) == name).collect();
                assert_eq!(alone.len(), expected.len());
                for (a, e) in alone.iter().zip(expected) {
                    assert_eq!((&a.prefix, &a.suffix, &a.extra), (&e.prefix, &e.suffix, &e.extra));
                    assert_eq!(
                        a.image.path().unwrap().canonicalize().unwrap(),
                        e.image.path().unwrap().canonicalize().unwrap()
                    );
                }
            }
        }
        // Written in place, no leftovers; a second run refuses to overwrite.
        let tmp_left = fs::read_dir(dir.0.parent().unwrap()).unwrap().any(|e| {
            e.unwrap().file_name().to_string_lossy().contains(&format!("pg2-synth-{}-layout.tmp", std::process::id()))
        });
        assert!(!tmp_left);
        let again = write_synth(&dir.0, &SynthOptions { train: 5, val: 5, canvas: CANVAS, seed: 0 });
        assert!(matches!(again, Err(DataError::File { .. })));
        let tiny = TempDir::new("tiny");
        assert!(write_synth(&tiny.0, &SynthOptions { canvas: 32, ..SynthOptions::default() }).is_err());
        assert!(!tiny.0.exists());
    }

    #[test]
    fn detect_targets_match_boxes_and_pixels() {
        let (dir, _) = TempDir::generate("detect", 1);
        let records = read_jsonl(&dir.0.join("train.jsonl")).unwrap();
        let mut checked = 0;
        for record in records.iter().filter(|r| task(r) == "detect") {
            let shape = record.prefix.strip_prefix("detect ").unwrap();
            let boxes: Vec<Vec<u32>> = serde_json::from_value(field(record, "boxes").clone()).unwrap();
            let instances: Vec<&str> = record.suffix.as_deref().unwrap().split(" ; ").collect();
            assert_eq!(instances.len(), boxes.len());
            let img = record.load_image().unwrap();
            let objects = objects(record);
            for (instance, bbox) in instances.iter().zip(&boxes) {
                let expected: String = bbox
                    .iter()
                    .map(|&c| format!("<loc{:04}>", (c as f64 / CANVAS as f64 * 1023.0).round() as u32))
                    .collect();
                assert_eq!(*instance, format!("{expected} {shape}"));
                let &[y1, x1, y2, x2] = &bbox[..] else { panic!("box {bbox:?}") };
                assert!(y1 < y2 && x1 < x2 && y2 <= CANVAS && x2 <= CANVAS, "{bbox:?}");
                let (_, colour, _) =
                    objects.iter().find(|(s, _, b)| s == shape && b == bbox).expect("box is one of the objects");
                let rgb = COLOURS.iter().find(|(name, _)| name == colour).unwrap().1;
                assert_eq!(img.get_pixel((x1 + x2) / 2, (y1 + y2) / 2).0, rgb, "{bbox:?}");
                checked += 1;
            }
            assert_eq!(boxes.len(), objects.iter().filter(|(s, _, _)| s == shape).count());
        }
        assert!(checked >= 8);
    }

    #[test]
    fn answers_match_the_scene() {
        let (dir, _) = TempDir::generate("answers", 2);
        let records = read_jsonl(&dir.0.join("train.jsonl")).unwrap();
        for record in &records {
            let suffix = record.suffix.as_deref().unwrap();
            let answers = || field(record, "answers");
            match task(record) {
                "count" => {
                    let plural = record.prefix.strip_prefix("answer en how many ").unwrap();
                    let n = objects(record).iter().filter(|(s, _, _)| format!("{s}s") == plural).count();
                    assert_eq!(suffix, n.to_string());
                    assert_eq!(answers(), &json!([suffix, suffix, suffix, NUMBER_WORDS[n]]));
                }
                "color" => {
                    let shape = record.prefix.strip_prefix("answer en what color is the ").unwrap();
                    let matching: Vec<_> = objects(record).into_iter().filter(|(s, _, _)| s == shape).collect();
                    assert_eq!(matching.len(), 1);
                    assert_eq!(suffix, matching[0].1);
                    assert_eq!(answers()[0], suffix);
                }
                "caption" => {
                    let objects = objects(record);
                    assert!(objects.iter().all(|(s, c, _)| suffix.contains(&format!(" {c} {s} "))), "{suffix}");
                    assert_eq!(field(record, "references")[0], suffix);
                }
                "ocr" => {
                    assert!((3..=6).contains(&suffix.len()) && suffix.bytes().all(|b| b.is_ascii_digit()));
                    assert_eq!(answers()[0], suffix);
                    let height = field(record, "text_height").as_u64().unwrap();
                    assert!(height > 0 && height.is_multiple_of(7));
                }
                _ => {}
            }
        }
    }

    #[test]
    fn tokenizer_covers_every_prompt_and_round_trips_suffixes() {
        let (dir, summary) = TempDir::generate("tokenizer", 3);
        let tok = PgTokenizer::from_file(&dir.0.join("tokenizer.json")).unwrap();
        assert_eq!((tok.pad_id, tok.eos_id, tok.bos_id), (0, 1, 2));
        assert_eq!(tok.vocab_size(), summary.vocab_size);
        assert_eq!(tok.image_id as usize, summary.vocab_size - 1);
        // Learned vocabulary, then the 1152 loc/seg tokens, then <image>; <unk> is 3.
        assert_eq!(tok.encode("<loc0000>"), vec![tok.image_id - 1152]);
        assert_eq!(tok.encode("Z"), vec![3]);
        assert!(!tok.encode("\n").contains(&3));
        for record in
            read_jsonl(&dir.0.join("train.jsonl")).unwrap().iter().chain(&read_jsonl(&dir.0.join("val.jsonl")).unwrap())
        {
            let prompt = format!("{}\n", record.prefix);
            assert!(!tok.encode(&prompt).contains(&3), "{prompt:?} has <unk>");
            let suffix = record.suffix.as_deref().unwrap();
            let ids = tok.encode(suffix);
            assert!(!ids.contains(&3), "{suffix:?} has <unk>");
            assert_eq!(tok.decode(&ids), suffix);
        }
    }
}
