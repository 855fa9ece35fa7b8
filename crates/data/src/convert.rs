//! Converters from public dataset formats into pg2 JSONL.
//!
//! [`convert`] reads a dataset's own annotation files and writes one pg2 record a line,
//! `{"image": "path relative to the output file", "prefix": "...", "suffix": "...", ...}`,
//! keeping the dataset's ids and the ground truth an evaluator needs as extra fields.
//! Prompts and targets follow big_vision's PaliGemma transfer configs
//! (`big_vision/configs/proj/paligemma/transfers/*.py`); where big_vision draws a random
//! target each epoch (VQA answers, DocVQA answers) a file must hold one, so the choice made
//! is documented per format.
//!
//! | format | `inputs`, in order | image file | prefix | suffix |
//! |---|---|---|---|---|
//! | `coco-captions` | `captions_*.json` | `IMAGES/{file_name}` | `caption en` | the caption |
//! | `vqav2` | questions json, annotations json (left out for test) | `IMAGES/COCO_{subtype}_{image_id:012}.jpg` | `answer en {question}` | `multiple_choice_answer` |
//! | `textvqa` | `TextVQA_0.5.1_*.json` | `IMAGES/{image_id}.jpg` | `answer en {question}` | most common answer |
//! | `ocrvqa` | `dataset.json` | `IMAGES/{id}{extension of imageURL}` | `answer en {question}` | the answer |
//! | `refcoco` | COCO `instances.json`, refs as JSON | `IMAGES/{file_name}` | the sentence | `<locY1><locX1><locY2><locX2>` |
//! | `docvqa` | `*_v1.0.json` | `IMAGES/{image}` | the question | first answer |
//!
//! Records come out in input order. Nothing is written unless the whole conversion succeeds:
//! the output goes to `OUTPUT.tmp`, renamed at the end.

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor};
use serde::Serialize;
use serde_json::{json, Map, Value};

use crate::DataError;

/// A public dataset format [`convert`] reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// COCO captions: one record per caption, `references` = every caption of its image.
    CocoCaptions,
    /// VQAv2: one record per question, `answers` = the 10 annotators' answers.
    Vqa,
    /// TextVQA: one record per question, suffix = the most common answer.
    TextVqa,
    /// OCR-VQA: one record per (book cover, question); `split` picks train/val/test.
    OcrVqa,
    /// RefCOCO / RefCOCO+ / RefCOCOg: one record per referring sentence, suffix = its box.
    RefCoco,
    /// DocVQA: one record per question, suffix = the first answer.
    DocVqa,
}

impl Format {
    /// Every format, in the order `--help` lists them.
    pub const ALL: [Format; 6] = [
        Format::CocoCaptions,
        Format::Vqa,
        Format::TextVqa,
        Format::OcrVqa,
        Format::RefCoco,
        Format::DocVqa,
    ];

    /// The name the CLI takes.
    pub fn name(self) -> &'static str {
        match self {
            Format::CocoCaptions => "coco-captions",
            Format::Vqa => "vqav2",
            Format::TextVqa => "textvqa",
            Format::OcrVqa => "ocrvqa",
            Format::RefCoco => "refcoco",
            Format::DocVqa => "docvqa",
        }
    }

    /// The `--input` files this format takes, in order, and what `--images` is.
    pub fn usage(self) -> &'static str {
        match self {
            Format::CocoCaptions => "CAPTIONS.json (captions_train2014.json, ...); images: the folder of file_name",
            Format::Vqa => {
                "QUESTIONS.json [ANNOTATIONS.json] (v2_OpenEnded_mscoco_*_questions.json, \
                 v2_mscoco_*_annotations.json; no annotations for test); images: train2014/, val2014/ or test2015/"
            }
            Format::TextVqa => "TextVQA_0.5.1_{train,val,test}.json; images: train_images/ or test_images/",
            Format::OcrVqa => "dataset.json; images: the folder the download script filled; --split train|val|test",
            Format::RefCoco => {
                "INSTANCES.json REFS.json (refcoco/instances.json and refs(unc).p exported to JSON, a list of refs); \
                 images: train2014/; --split train|val|testA|testB|test"
            }
            Format::DocVqa => "{train,val,test}_v1.0.json; images: the folder holding documents/",
        }
    }

    /// Whether [`ConvertArgs::split`] applies (the other formats keep one split per file).
    pub fn takes_split(self) -> bool {
        matches!(self, Format::OcrVqa | Format::RefCoco)
    }

    /// One line per format, name and usage, for `--help`.
    pub fn help() -> String {
        Format::ALL
            .iter()
            .map(|f| format!("  {:<14} {}\n", f.name(), f.usage()))
            .collect()
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Format {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Format::ALL
            .into_iter()
            .find(|f| f.name() == s)
            .ok_or_else(|| {
                let names: Vec<_> = Format::ALL.iter().map(|f| f.name()).collect();
                format!("unknown dataset format `{s}` (one of {})", names.join(", "))
            })
    }
}

/// What to convert: `pg2 convert FORMAT --input FILE... --images DIR --output FILE.jsonl
/// [--split NAME] [--skip-missing]`.
#[derive(Debug, Clone)]
pub struct ConvertArgs {
    /// The format of `inputs`.
    pub format: Format,
    /// The dataset's annotation files, in the order [`Format::usage`] gives.
    pub inputs: Vec<PathBuf>,
    /// The folder the dataset's image names are relative to.
    pub images: PathBuf,
    /// The JSONL file to write; its folder is created if needed, and image paths are
    /// written relative to it.
    pub output: PathBuf,
    /// Keep only this split (formats with [`Format::takes_split`]; an error for the others).
    pub split: Option<String>,
    /// Leave out records whose image file is missing (counted in the summary) instead of failing.
    pub skip_missing: bool,
}

/// What [`convert`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConvertSummary {
    /// Records in the output file.
    pub records: usize,
    /// Records left out because their image is missing (only with `skip_missing`).
    pub skipped_records: usize,
    /// The missing image files, each once, in the order first needed.
    pub missing_images: Vec<PathBuf>,
}

/// Converts `args.inputs` (in `args.format`) into the pg2 JSONL file `args.output`.
///
/// Errors name the file at fault: an input that is not JSON or lacks a field (with the key
/// and array index), a missing image (unless `skip_missing`), a wrong number of inputs.
/// On error no output file is left behind (an existing one is left as it was).
pub fn convert(args: &ConvertArgs) -> Result<ConvertSummary, DataError> {
    let format = args.format;
    if args.split.is_some() && !format.takes_split() {
        return Err(usage_error(
            format,
            "--split only applies to ocrvqa and refcoco",
        ));
    }
    let split = args.split.as_deref();
    let examples = match format {
        Format::CocoCaptions => coco_captions(&args.inputs)?,
        Format::Vqa => vqav2(&args.inputs)?,
        Format::TextVqa => textvqa(&args.inputs)?,
        Format::OcrVqa => ocrvqa(&args.inputs, split)?,
        Format::RefCoco => refcoco(&args.inputs, split)?,
        Format::DocVqa => docvqa(&args.inputs)?,
    };
    write_jsonl(args, &examples)
}

/// One output record before its image path is checked and made relative.
struct Example {
    /// Relative to the images folder.
    image: PathBuf,
    prefix: String,
    suffix: Option<String>,
    extra: Map<String, Value>,
}

/// A JSON object's fields for [`Example::extra`]; null fields (absent in the input) are left out.
fn fields(object: Value) -> Map<String, Value> {
    let Value::Object(mut map) = object else {
        unreachable!("fields() takes a json!({{...}}) object")
    };
    map.retain(|_, v| !v.is_null());
    map
}

fn vqa_prompt(question: &str) -> String {
    format!("answer en {question}")
}

fn usage_error(format: Format, msg: &str) -> DataError {
    DataError::File {
        path: format!("convert {format}"),
        msg: format!("{msg}; inputs: {}", format.usage()),
    }
}

fn wrong_inputs(format: Format, inputs: &[PathBuf]) -> DataError {
    usage_error(
        format,
        &format!("wrong number of inputs ({})", inputs.len()),
    )
}

/// `coco-captions`: one record per caption in annotation order (big_vision trains on a random
/// caption of each image per step, `cococap.py` `choice_no_replacement(inkey="captions/text")`;
/// one record per caption gives the same data per epoch). Every record carries
/// `references` = all captions of its image for CIDEr; an evaluator wants one prediction per
/// `image_id`. Captions are trimmed (some COCO captions end in spaces or a newline).
fn coco_captions(inputs: &[PathBuf]) -> Result<Vec<Example>, DataError> {
    let [path] = inputs else {
        return Err(wrong_inputs(Format::CocoCaptions, inputs));
    };
    let mut file_names = HashMap::new(); // image id -> file_name
    let mut captions = Vec::new(); // (node path, caption id, image id, text)
    read_json(
        path,
        Walk::Arrays(&["images", "annotations"]),
        |array, node| {
            if array == "images" {
                file_names.insert(
                    node.field("id")?.id()?,
                    node.field("file_name")?.str()?.to_owned(),
                );
            } else {
                let id = node.opt("id").map(|n| n.value.clone());
                let text = node.field("caption")?.str()?.trim().to_owned();
                captions.push((
                    node.at.clone(),
                    id,
                    node.field("image_id")?.value.clone(),
                    text,
                ));
            }
            Ok(())
        },
    )?;
    let mut references: HashMap<String, Vec<String>> = HashMap::new();
    for (_, _, image_id, text) in &captions {
        references
            .entry(id_text(image_id))
            .or_default()
            .push(text.clone());
    }
    captions
        .into_iter()
        .map(|(at, id, image_id, text)| {
            let key = id_text(&image_id);
            let file_name = file_names.get(&key).ok_or_else(|| DataError::File {
                path: path.display().to_string(),
                msg: format!("`{at}.image_id`: no image with id {key} in `images`"),
            })?;
            Ok(Example {
                image: file_name.into(),
                prefix: "caption en".into(),
                suffix: Some(text),
                extra: fields(
                    json!({"id": id, "image_id": image_id, "references": references[&key]}),
                ),
            })
        })
        .collect()
}

/// `vqav2`: prefix `answer en {question}` (`vqav2.py` `strfmt("answer en {question_text}")`);
/// suffix = `multiple_choice_answer`, the annotators' consensus (big_vision instead draws one
/// of the 10 answers each step); `answers` = the 10 answers, plus `answer_type` and
/// `question_type` for per-type accuracy. Without an annotations file (test) there is no suffix.
fn vqav2(inputs: &[PathBuf]) -> Result<Vec<Example>, DataError> {
    let (questions_path, annotations_path) = match inputs {
        [q] => (q, None),
        [q, a] => (q, Some(a)),
        _ => return Err(wrong_inputs(Format::Vqa, inputs)),
    };
    let mut questions = Vec::new(); // (node path, question id, image id, question)
    let top = read_json(questions_path, Walk::Arrays(&["questions"]), |_, node| {
        let id = node.field("question_id")?.value.clone();
        let image_id = node.field("image_id")?.u64()?;
        questions.push((
            node.at.clone(),
            id,
            image_id,
            node.field("question")?.str()?.to_owned(),
        ));
        Ok(())
    })?;
    let subtype = Node::root(questions_path, &top)
        .field("data_subtype")?
        .str()?
        .to_owned();
    // test-dev questions are a subset of test2015 and name their images after it.
    let image_subtype = if subtype == "test-dev2015" {
        "test2015".to_owned()
    } else {
        subtype
    };

    let mut annotations = HashMap::new(); // question id -> fields
    if let Some(path) = annotations_path {
        read_json(path, Walk::Arrays(&["annotations"]), |_, node| {
            let answers = node.field("answers")?.items()?;
            let answers: Vec<_> = answers
                .iter()
                .map(|a| Ok(a.field("answer")?.str()?.to_owned()))
                .collect::<Result<_, DataError>>()?;
            let extra = json!({
                "answers": answers,
                "answer_type": node.opt("answer_type").map(|n| n.value.clone()),
                "question_type": node.opt("question_type").map(|n| n.value.clone()),
            });
            let answer = node.field("multiple_choice_answer")?.str()?.to_owned();
            annotations.insert(node.field("question_id")?.id()?, (answer, extra));
            Ok(())
        })?;
    }

    questions
        .into_iter()
        .map(|(at, id, image_id, question)| {
            let mut extra = fields(json!({"id": id, "image_id": image_id}));
            let mut suffix = None;
            if let Some(path) = annotations_path {
                let (answer, more) =
                    annotations
                        .remove(&id_text(&id))
                        .ok_or_else(|| DataError::File {
                            path: path.display().to_string(),
                            msg: format!(
                                "no annotation for question_id {id} (`{at}` of {})",
                                questions_path.display()
                            ),
                        })?;
                suffix = Some(answer);
                extra.extend(fields(more));
            }
            Ok(Example {
                image: format!("COCO_{image_subtype}_{image_id:012}.jpg").into(),
                prefix: vqa_prompt(&question),
                suffix,
                extra,
            })
        })
        .collect()
}

/// `textvqa`: prefix `answer en {question}` (`textvqa.py`); suffix = the most common of the 10
/// answers, the first to reach the top count on ties, as big_vision's `majority` op
/// (`tf.unique_with_counts` + `argmax`) picks (its TextVQA training draws a random answer);
/// `answers` = all. The test split has no answers, hence no suffix.
fn textvqa(inputs: &[PathBuf]) -> Result<Vec<Example>, DataError> {
    let [path] = inputs else {
        return Err(wrong_inputs(Format::TextVqa, inputs));
    };
    let mut examples = Vec::new();
    read_json(path, Walk::Arrays(&["data"]), |_, node| {
        let answers = node
            .opt("answers")
            .map(|n| n.strings())
            .transpose()?
            .unwrap_or_default();
        examples.push(Example {
            image: format!("{}.jpg", node.field("image_id")?.id()?).into(),
            prefix: vqa_prompt(node.field("question")?.str()?),
            suffix: most_common(&answers).map(str::to_owned),
            extra: fields(json!({
                "id": node.field("question_id")?.value,
                "image_id": node.field("image_id")?.value,
                "answers": if answers.is_empty() { Value::Null } else { json!(answers) },
            })),
        });
        Ok(())
    })?;
    Ok(examples)
}

/// The most frequent string, the earliest on ties.
fn most_common(items: &[String]) -> Option<&str> {
    let mut counts: Vec<(&str, usize)> = Vec::new(); // in order of first appearance
    for item in items {
        match counts.iter_mut().find(|(s, _)| *s == item.as_str()) {
            Some((_, n)) => *n += 1,
            None => counts.push((item, 1)),
        }
    }
    // max_by_key keeps the last of equal maxima; reversing makes it the first.
    counts
        .into_iter()
        .rev()
        .max_by_key(|&(_, n)| n)
        .map(|(s, _)| s)
}

/// `ocrvqa`: `dataset.json` maps a book id to its cover URL and questions; one record per
/// question in file order, prefix `answer en {question}`, suffix = its answer (`ocrvqa.py`),
/// `id` = the book id with `question_index`, `answers` = `[answer]`. The image is
/// `{id}{extension of imageURL}`, as the dataset's download script names it.
fn ocrvqa(inputs: &[PathBuf], split: Option<&str>) -> Result<Vec<Example>, DataError> {
    let [path] = inputs else {
        return Err(wrong_inputs(Format::OcrVqa, inputs));
    };
    let wanted = match split {
        None => None,
        Some("train") => Some(1),
        Some("val") => Some(2),
        Some("test") => Some(3),
        Some(other) => {
            return Err(usage_error(
                Format::OcrVqa,
                &format!("unknown split `{other}` (train, val or test)"),
            ))
        }
    };
    let mut examples = Vec::new();
    read_json(path, Walk::Entries, |id, node| {
        let book_split = node.field("split")?.u64()?;
        if wanted.is_some_and(|w| w != book_split) {
            return Ok(());
        }
        let url = node.field("imageURL")?.str()?;
        let extension = Path::new(url)
            .extension()
            .map(|e| format!(".{}", e.to_string_lossy()))
            .unwrap_or_default();
        let questions = node.field("questions")?.strings()?;
        let answers = node.field("answers")?.strings()?;
        if questions.len() != answers.len() {
            let msg = format!(
                "{} questions but {} answers",
                questions.len(),
                answers.len()
            );
            return Err(node.error(msg));
        }
        for (index, (question, answer)) in questions.iter().zip(answers).enumerate() {
            examples.push(Example {
                image: format!("{id}{extension}").into(),
                prefix: vqa_prompt(question),
                suffix: Some(answer.clone()),
                extra: fields(json!({"id": id, "question_index": index, "answers": [answer]})),
            });
        }
        Ok(())
    })?;
    Ok(examples)
}

/// `refcoco`: the refs list (`refs(unc).p`, `refs(google).p`, `refs(umd).p` of the refer
/// toolkit, exported to JSON with `json.dump(pickle.load(f), out)`) names an annotation of
/// COCO `instances.json` per referring expression; one record per sentence, in refs order.
///
/// big_vision's RefCOCO transfer (`pp/proj/paligemma/segmentation.py`, `refcoco_mask2str`)
/// sets prefix = the bare sentence and suffix = the four box tokens followed by 16 mask
/// tokens, with no text after them. Masks need big_vision's VQ-VAE, so the suffix here is the
/// box alone: `<locY1><locX1><locY2><locX2>`, each round(coord / size * 1023) of the image
/// height (y) or width (x). `boxes` = `[[y1, x1, y2, x2]]` in pixels for IoU.
fn refcoco(inputs: &[PathBuf], split: Option<&str>) -> Result<Vec<Example>, DataError> {
    let [instances_path, refs_path] = inputs else {
        return Err(wrong_inputs(Format::RefCoco, inputs));
    };
    let mut images = HashMap::new(); // image id -> (file_name, (width, height))
    let mut boxes = HashMap::new(); // annotation id -> [x, y, w, h]
    read_json(
        instances_path,
        Walk::Arrays(&["images", "annotations"]),
        |array, node| {
            if array == "images" {
                let size = (
                    node.field("width")?.number()?,
                    node.field("height")?.number()?,
                );
                images.insert(
                    node.field("id")?.id()?,
                    (node.field("file_name")?.str()?.to_owned(), size),
                );
            } else {
                let bbox = node.field("bbox")?;
                let numbers = bbox
                    .items()?
                    .iter()
                    .map(Node::number)
                    .collect::<Result<Vec<_>, _>>()?;
                let numbers: [f64; 4] = numbers
                    .try_into()
                    .map_err(|_| bbox.error("expected [x, y, w, h]"))?;
                boxes.insert(node.field("id")?.id()?, numbers);
            }
            Ok(())
        },
    )?;

    let mut examples = Vec::new();
    let mut splits = BTreeSet::new();
    read_json(refs_path, Walk::Elements, |_, node| {
        let ref_split = node.field("split")?.str()?;
        splits.insert(ref_split.to_owned());
        if split.is_some_and(|s| s != ref_split) {
            return Ok(());
        }
        let missing = |what: &str, key: &str| {
            node.error(format!(
                "{what} {key} is not in {}",
                instances_path.display()
            ))
        };
        let (ann_id, image_id) = (node.field("ann_id")?, node.field("image_id")?);
        let (ann_key, image_key) = (ann_id.id()?, image_id.id()?);
        let [x, y, w, h] = *boxes
            .get(&ann_key)
            .ok_or_else(|| missing("annotation", &ann_key))?;
        let (file_name, (width, height)) = images
            .get(&image_key)
            .ok_or_else(|| missing("image", &image_key))?;
        let corners = [y, x, y + h, x + w];
        for sentence in node.field("sentences")?.items()? {
            let sent = sentence.field("sent")?.str()?;
            examples.push(Example {
                image: file_name.into(),
                prefix: sent.to_owned(),
                suffix: Some(loc_tokens(corners, *width, *height)),
                extra: fields(json!({
                    "id": node.field("ref_id")?.value,
                    "sent_id": sentence.opt("sent_id").map(|n| n.value.clone()),
                    "ann_id": ann_id.value,
                    "image_id": image_id.value,
                    "split": ref_split,
                    "boxes": [corners],
                    "width": width,
                    "height": height,
                })),
            });
        }
        Ok(())
    })?;
    if let Some(split) = split.filter(|_| examples.is_empty()) {
        let found: Vec<_> = splits.into_iter().collect();
        let msg = format!("no refs in split `{split}` (found: {})", found.join(", "));
        return Err(DataError::File {
            path: refs_path.display().to_string(),
            msg,
        });
    }
    Ok(examples)
}

/// The 4 location tokens of a box `[y1, x1, y2, x2]` in pixels of a `width` x `height` image.
fn loc_tokens(corners: [f64; 4], width: f64, height: f64) -> String {
    let sizes = [height, width, height, width];
    corners
        .iter()
        .zip(sizes)
        .map(|(&c, size)| loc_token(c, size))
        .collect()
}

/// `<locNNNN>` for a coordinate along an axis of `size` pixels: big_vision's
/// `round(coord / size * 1023)` clipped to [0, 1023]. `tf.round` rounds halves to even, so
/// does this; the product is taken before the division so that exact halves stay exact.
fn loc_token(coord: f64, size: f64) -> String {
    let bin = (coord * 1023.0 / size).round_ties_even().clamp(0.0, 1023.0);
    format!("<loc{:04}>", bin as u32)
}

/// `docvqa`: prefix = the question as it is (`docvqa.py` `copy(inkey="question",
/// outkey="prefix")`: no `answer en`); suffix = the first answer (big_vision draws one of
/// `answers` each step); `answers` = all, for ANLS. The test split has no answers, hence no
/// suffix. `image` is relative to the images folder (`documents/xxx.png`).
fn docvqa(inputs: &[PathBuf]) -> Result<Vec<Example>, DataError> {
    let [path] = inputs else {
        return Err(wrong_inputs(Format::DocVqa, inputs));
    };
    let mut examples = Vec::new();
    read_json(path, Walk::Arrays(&["data"]), |_, node| {
        let answers = node
            .opt("answers")
            .map(|n| n.strings())
            .transpose()?
            .unwrap_or_default();
        examples.push(Example {
            image: node.field("image")?.str()?.into(),
            prefix: node.field("question")?.str()?.to_owned(),
            suffix: answers.first().cloned(),
            extra: fields(json!({
                "id": node.field("questionId")?.value,
                "doc_id": node.opt("docId").map(|n| n.value.clone()),
                "answers": if answers.is_empty() { Value::Null } else { json!(answers) },
            })),
        });
        Ok(())
    })?;
    Ok(examples)
}

/// Checks every image, makes its path relative to the output's folder and writes the records
/// to `OUTPUT.tmp`, renamed to `OUTPUT` only once all went well.
fn write_jsonl(args: &ConvertArgs, examples: &[Example]) -> Result<ConvertSummary, DataError> {
    let file_error = |path: &Path, e: std::io::Error| DataError::File {
        path: path.display().to_string(),
        msg: e.to_string(),
    };
    let out_dir = match args.output.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(out_dir).map_err(|e| file_error(out_dir, e))?;
    // Canonical folders, so that `..` in the relative path means the same to the OS.
    let out_dir = out_dir.canonicalize().map_err(|e| file_error(out_dir, e))?;
    let images = args.images.canonicalize().map_err(|e| DataError::File {
        path: args.images.display().to_string(),
        msg: format!("images folder: {e}"),
    })?;

    let mut tmp = args.output.clone().into_os_string();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let written = (|| -> Result<ConvertSummary, DataError> {
        let file = std::fs::File::create(&tmp).map_err(|e| file_error(&tmp, e))?;
        let mut out = std::io::BufWriter::new(file);
        let mut summary = ConvertSummary {
            records: 0,
            skipped_records: 0,
            missing_images: Vec::new(),
        };
        let mut exists = HashMap::new();
        for example in examples {
            let image = images.join(&example.image);
            let first_time = !exists.contains_key(&image);
            if !*exists
                .entry(image.clone())
                .or_insert_with(|| image.is_file())
            {
                if !args.skip_missing {
                    let msg = "image not found (skip_missing leaves such records out)".to_owned();
                    return Err(DataError::File {
                        path: image.display().to_string(),
                        msg,
                    });
                }
                if first_time {
                    summary.missing_images.push(image);
                }
                summary.skipped_records += 1;
                continue;
            }
            let relative = relative_to(&out_dir, &image);
            let line = Line {
                image: &relative.to_string_lossy(),
                prefix: &example.prefix,
                suffix: example.suffix.as_deref(),
                extra: &example.extra,
            };
            let text = serde_json::to_string(&line).expect("a record always serializes");
            writeln!(out, "{text}").map_err(|e| file_error(&tmp, e))?;
            summary.records += 1;
        }
        out.flush().map_err(|e| file_error(&tmp, e))?;
        Ok(summary)
    })();
    let renamed = written.and_then(|summary| {
        std::fs::rename(&tmp, &args.output).map_err(|e| file_error(&args.output, e))?;
        Ok(summary)
    });
    if renamed.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    renamed
}

/// One output line: `image`, `prefix`, `suffix` first, then the extra fields.
#[derive(Serialize)]
struct Line<'a> {
    image: &'a str,
    prefix: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    suffix: Option<&'a str>,
    #[serde(flatten)]
    extra: &'a Map<String, Value>,
}

/// `path` relative to the folder `base` (both absolute), with `..` where they part.
fn relative_to(base: &Path, path: &Path) -> PathBuf {
    let base: Vec<_> = base.components().collect();
    let path: Vec<_> = path.components().collect();
    let common = base.iter().zip(&path).take_while(|(a, b)| a == b).count();
    if common == 0 {
        return path.iter().collect(); // different roots: only an absolute path works
    }
    let ups = std::iter::repeat_n(std::path::Component::ParentDir, base.len() - common);
    ups.chain(path[common..].iter().copied()).collect()
}

/// A JSON value with its place in its file (`annotations[3].caption`), so that every error
/// names the file, the key and the array index.
struct Node<'a> {
    file: &'a Path,
    at: String,
    value: &'a Value,
}

impl<'a> Node<'a> {
    fn root(file: &'a Path, value: &'a Value) -> Self {
        Node {
            file,
            at: String::new(),
            value,
        }
    }

    fn error(&self, msg: impl fmt::Display) -> DataError {
        let msg = if self.at.is_empty() {
            msg.to_string()
        } else {
            format!("`{}`: {msg}", self.at)
        };
        DataError::File {
            path: self.file.display().to_string(),
            msg,
        }
    }

    /// A field that may be absent (or null).
    fn opt(&self, key: &str) -> Option<Node<'a>> {
        let value = self.value.get(key).filter(|v| !v.is_null())?;
        let at = if self.at.is_empty() {
            key.to_owned()
        } else {
            format!("{}.{key}", self.at)
        };
        Some(Node {
            file: self.file,
            at,
            value,
        })
    }

    fn field(&self, key: &str) -> Result<Node<'a>, DataError> {
        self.opt(key)
            .ok_or_else(|| self.error(format!("missing key `{key}`")))
    }

    fn expected(&self, what: &str) -> DataError {
        let found = match self.value {
            Value::Null => "null",
            Value::Bool(_) => "a boolean",
            Value::Number(_) => "a number",
            Value::String(_) => "a string",
            Value::Array(_) => "an array",
            Value::Object(_) => "an object",
        };
        self.error(format!("expected {what}, found {found}"))
    }

    fn str(&self) -> Result<&'a str, DataError> {
        self.value.as_str().ok_or_else(|| self.expected("a string"))
    }

    fn number(&self) -> Result<f64, DataError> {
        self.value.as_f64().ok_or_else(|| self.expected("a number"))
    }

    fn u64(&self) -> Result<u64, DataError> {
        self.value
            .as_u64()
            .ok_or_else(|| self.expected("a non-negative integer"))
    }

    /// An id, integer or string, as text (ids key maps and make file names).
    fn id(&self) -> Result<String, DataError> {
        match self.value {
            Value::String(_) | Value::Number(_) => Ok(id_text(self.value)),
            _ => Err(self.expected("an id (string or number)")),
        }
    }

    fn items(&self) -> Result<Vec<Node<'a>>, DataError> {
        let items = self
            .value
            .as_array()
            .ok_or_else(|| self.expected("an array"))?;
        let node = |(i, value)| Node {
            file: self.file,
            at: format!("{}[{i}]", self.at),
            value,
        };
        Ok(items.iter().enumerate().map(node).collect())
    }

    fn strings(&self) -> Result<Vec<String>, DataError> {
        self.items()?
            .iter()
            .map(|n| n.str().map(str::to_owned))
            .collect()
    }
}

/// An id's text: a string as it is, a number in JSON.
fn id_text(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// How [`read_json`] walks a file's top level, handing out one item at a time so that the
/// multi-GB annotation files (COCO instances with their polygons, VQAv2 answers) never sit in
/// memory as a whole tree.
#[derive(Clone, Copy)]
enum Walk<'k> {
    /// An object whose arrays under these keys (all required) are handed out element by
    /// element, named by their key; the other fields are returned.
    Arrays(&'k [&'k str]),
    /// An object handed out entry by entry, named by their key, in file order (OCR-VQA).
    Entries,
    /// An array handed out element by element, unnamed (RefCOCO refs).
    Elements,
}

/// Reads the JSON file `path`, calling `each(name, node)` per item of `walk`; returns the
/// top-level fields `walk` did not hand out (as an object).
fn read_json<F>(path: &Path, walk: Walk, mut each: F) -> Result<Value, DataError>
where
    F: FnMut(&str, Node) -> Result<(), DataError>,
{
    let file_error = |msg: String| DataError::File {
        path: path.display().to_string(),
        msg,
    };
    let bytes = std::fs::read(path).map_err(|e| file_error(e.to_string()))?;
    let mut failure = None;
    let mut de = serde_json::Deserializer::from_slice(&bytes);
    let walker = Walker {
        file: path,
        walk,
        each: &mut each,
        failure: &mut failure,
    };
    let result =
        de::Deserializer::deserialize_any(&mut de, walker).and_then(|kept| de.end().map(|()| kept));
    match (failure, result) {
        (Some(e), _) => Err(e), // the callback's own error, not serde's echo of it
        (None, Ok(kept)) => Ok(Value::Object(kept)),
        (None, Err(e)) => Err(file_error(format!("invalid JSON: {e}"))),
    }
}

/// The serde visitor behind [`read_json`]. Errors of `each` are parked in `failure` and
/// serde is stopped with a placeholder error.
struct Walker<'a, F> {
    file: &'a Path,
    walk: Walk<'a>,
    each: &'a mut F,
    failure: &'a mut Option<DataError>,
}

impl<F: FnMut(&str, Node) -> Result<(), DataError>> Walker<'_, F> {
    fn fail<E: de::Error>(&mut self, error: DataError) -> E {
        *self.failure = Some(error);
        E::custom("stopped")
    }

    fn call<E: de::Error>(&mut self, name: &str, at: String, value: &Value) -> Result<(), E> {
        (self.each)(
            name,
            Node {
                file: self.file,
                at,
                value,
            },
        )
        .map_err(|e| self.fail(e))
    }

    fn elements<'de, A: SeqAccess<'de>>(&mut self, name: &str, mut seq: A) -> Result<(), A::Error> {
        let mut i = 0;
        while let Some(value) = seq.next_element::<Value>()? {
            self.call(name, format!("{name}[{i}]"), &value)?;
            i += 1;
        }
        Ok(())
    }
}

impl<'de, F: FnMut(&str, Node) -> Result<(), DataError>> Visitor<'de> for Walker<'_, F> {
    type Value = Map<String, Value>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(if matches!(self.walk, Walk::Elements) {
            "a JSON array"
        } else {
            "a JSON object"
        })
    }

    fn visit_map<A: MapAccess<'de>>(mut self, mut map: A) -> Result<Self::Value, A::Error> {
        if matches!(self.walk, Walk::Elements) {
            return Err(de::Error::invalid_type(de::Unexpected::Map, &self));
        }
        let mut kept = Map::new();
        let mut seen = Vec::new();
        while let Some(key) = map.next_key::<String>()? {
            match self.walk {
                Walk::Entries => {
                    let value: Value = map.next_value()?;
                    self.call(&key, key.clone(), &value)?;
                }
                Walk::Arrays(names) if names.contains(&key.as_str()) => {
                    map.next_value_seed(ArraySeed {
                        name: &key,
                        walker: &mut self,
                    })?;
                    seen.push(key);
                }
                _ => {
                    kept.insert(key, map.next_value()?);
                }
            }
        }
        if let Walk::Arrays(names) = self.walk {
            if let Some(missing) = names.iter().find(|n| !seen.iter().any(|s| s == *n)) {
                let error =
                    Node::root(self.file, &Value::Null).error(format!("missing key `{missing}`"));
                return Err(self.fail(error));
            }
        }
        Ok(kept)
    }

    fn visit_seq<A: SeqAccess<'de>>(mut self, seq: A) -> Result<Self::Value, A::Error> {
        if !matches!(self.walk, Walk::Elements) {
            return Err(de::Error::invalid_type(de::Unexpected::Seq, &self));
        }
        self.elements("", seq)?;
        Ok(Map::new())
    }
}

/// Streams the array under one top-level key through its [`Walker`].
struct ArraySeed<'w, 'a, F> {
    name: &'w str,
    walker: &'w mut Walker<'a, F>,
}

impl<'de, F: FnMut(&str, Node) -> Result<(), DataError>> DeserializeSeed<'de>
    for ArraySeed<'_, '_, F>
{
    type Value = ();

    fn deserialize<D: de::Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_seq(self)
    }
}

impl<'de, F: FnMut(&str, Node) -> Result<(), DataError>> Visitor<'de> for ArraySeed<'_, '_, F> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "an array under `{}`", self.name)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<(), A::Error> {
        self.walker.elements(self.name, seq)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::{read_jsonl, Record};

    /// A scratch folder under the system temp dir, removed when dropped.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> Self {
            let dir =
                std::env::temp_dir().join(format!("pg2-convert-{}-{name}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn fixture(format: Format) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/convert")
            .join(format.name())
    }

    fn args(format: Format, inputs: &[&str], images: &str, output: &Path) -> ConvertArgs {
        let dir = fixture(format);
        ConvertArgs {
            format,
            inputs: inputs.iter().map(|i| dir.join(i)).collect(),
            images: dir.join(images),
            output: output.to_path_buf(),
            split: None,
            skip_missing: false,
        }
    }

    /// Converts and reads the output back with the JSONL reader training uses.
    fn convert_and_read(args: &ConvertArgs) -> Vec<Record> {
        let summary = convert(args).unwrap();
        let records = read_jsonl(&args.output).unwrap();
        assert_eq!(
            summary,
            ConvertSummary {
                records: records.len(),
                skipped_records: 0,
                missing_images: vec![]
            }
        );
        records
    }

    /// The record's image is the fixture file `rel` (reached through a relative path).
    fn assert_image(record: &Record, format: Format, rel: &str) {
        let line = std::fs::read_to_string(&record.file).unwrap();
        assert!(
            !line.contains("\"image\":\"/"),
            "image paths are relative: {line}"
        );
        assert_eq!(
            record.image.canonicalize().unwrap(),
            fixture(format).join(rel).canonicalize().unwrap()
        );
    }

    fn texts(record: &Record) -> (&str, Option<&str>) {
        (record.prefix.as_str(), record.suffix.as_deref())
    }

    #[test]
    fn coco_captions_one_record_per_caption_with_references() {
        let tmp = TempDir::new("coco");
        let output = tmp.0.join("out/coco.jsonl"); // a folder convert has to create
        let f = Format::CocoCaptions;
        let records = convert_and_read(&args(f, &["captions_val2014.json"], "val2014", &output));
        assert_eq!(records.len(), 3);
        // Annotation order, not grouped by image.
        assert_eq!(
            texts(&records[0]),
            ("caption en", Some("A dog on a red couch."))
        );
        assert_eq!(
            texts(&records[1]),
            ("caption en", Some("Two bikes leaning on a wall."))
        ); // trimmed
        assert_eq!(
            texts(&records[2]),
            ("caption en", Some("a small dog sleeping"))
        );
        assert_image(&records[0], f, "val2014/COCO_val2014_000000000042.jpg");
        assert_image(&records[1], f, "val2014/COCO_val2014_000000000073.jpg");
        assert_image(&records[2], f, "val2014/COCO_val2014_000000000042.jpg");
        let dog = json!(["A dog on a red couch.", "a small dog sleeping"]);
        assert_eq!(records[0].extra["references"], dog);
        assert_eq!(records[2].extra["references"], dog);
        assert_eq!(
            records[1].extra["references"],
            json!(["Two bikes leaning on a wall."])
        );
        assert_eq!(
            (&records[2].extra["id"], &records[2].extra["image_id"]),
            (&json!(1003), &json!(42))
        );
        assert!(!output.with_extension("jsonl.tmp").exists());
    }

    #[test]
    fn vqav2_with_and_without_annotations() {
        let tmp = TempDir::new("vqa");
        let f = Format::Vqa;
        let inputs = [
            "v2_OpenEnded_mscoco_val2014_questions.json",
            "v2_mscoco_val2014_annotations.json",
        ];
        let records = convert_and_read(&args(f, &inputs, "val2014", &tmp.0.join("val.jsonl")));
        assert_eq!(records.len(), 2);
        // Questions order; the annotations file lists them the other way round.
        assert_eq!(
            texts(&records[0]),
            ("answer en What color is the couch?", Some("red"))
        );
        assert_eq!(
            texts(&records[1]),
            ("answer en How many bikes are there?", Some("2"))
        );
        assert_image(&records[0], f, "val2014/COCO_val2014_000000000042.jpg");
        assert_image(&records[1], f, "val2014/COCO_val2014_000000000073.jpg");
        let extra = &records[0].extra;
        assert_eq!(
            (&extra["id"], &extra["image_id"], &extra["answer_type"]),
            (&json!(42000), &json!(42), &json!("other"))
        );
        let answers: Vec<_> = extra["answers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap())
            .collect();
        assert_eq!(
            answers,
            ["red", "red", "maroon", "red", "red", "dark red", "red", "red", "red", "red"]
        );
        assert_eq!(records[1].extra["question_type"], "how many");

        // test-dev: no annotations, so no suffix; its images are test2015's.
        let inputs = ["v2_OpenEnded_mscoco_test-dev2015_questions.json"];
        let records = convert_and_read(&args(f, &inputs, "test2015", &tmp.0.join("test.jsonl")));
        assert_eq!(texts(&records[0]), ("answer en Is it raining?", None));
        assert_image(&records[0], f, "test2015/COCO_test2015_000000000099.jpg");
        assert!(!records[0].extra.contains_key("answers"));
    }

    #[test]
    fn textvqa_suffix_is_the_most_common_answer() {
        let tmp = TempDir::new("textvqa");
        let f = Format::TextVqa;
        let records = convert_and_read(&args(
            f,
            &["TextVQA_0.5.1_train.json"],
            "train_images",
            &tmp.0.join("t.jsonl"),
        ));
        // nokia and samsung both 4 times: the first to appear wins.
        assert_eq!(
            texts(&records[0]),
            ("answer en what brand is the phone?", Some("nokia"))
        );
        // "stop!" comes first, but "stop" is the majority (6 of 10).
        assert_eq!(
            texts(&records[1]),
            ("answer en what does the sign say?", Some("stop"))
        );
        assert_image(&records[0], f, "train_images/003a8ae2ef43b901.jpg");
        assert_image(&records[1], f, "train_images/0054c91397f2fe05.jpg");
        assert_eq!(records[1].extra["answers"].as_array().unwrap().len(), 10);
        assert_eq!(
            (&records[1].extra["id"], &records[1].extra["image_id"]),
            (&json!(34603), &json!("0054c91397f2fe05"))
        );

        let records = convert_and_read(&args(
            f,
            &["TextVQA_0.5.1_test.json"],
            "train_images",
            &tmp.0.join("test.jsonl"),
        ));
        assert_eq!(texts(&records[0]), ("answer en what time is it?", None));
        assert!(!records[0].extra.contains_key("answers"));
    }

    #[test]
    fn ocrvqa_keeps_file_order_and_filters_splits() {
        let tmp = TempDir::new("ocrvqa");
        let f = Format::OcrVqa;
        let mut a = args(f, &["dataset.json"], "images", &tmp.0.join("all.jsonl"));
        let records = convert_and_read(&a);
        // File order (1439226393 before 0061120081), not sorted by id.
        let ids: Vec<_> = records
            .iter()
            .map(|r| {
                (
                    r.extra["id"].as_str().unwrap(),
                    r.extra["question_index"].as_u64().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            ids,
            [
                ("1439226393", 0),
                ("1439226393", 1),
                ("1439226393", 2),
                ("0061120081", 0),
                ("B00TEST003", 0)
            ]
        );
        assert_eq!(
            texts(&records[0]),
            ("answer en Who wrote this book?", Some("Jane Doe"))
        );
        assert_eq!(
            texts(&records[2]),
            ("answer en Is this a comedy book?", Some("No"))
        );
        assert_eq!(records[1].extra["answers"], json!(["A Tiny Book"]));
        assert_image(&records[0], f, "images/1439226393.jpg");
        assert_image(&records[3], f, "images/0061120081.png"); // extension from imageURL

        a.split = Some("val".into());
        let records = convert_and_read(&a);
        assert_eq!(records.len(), 1);
        assert_eq!(
            texts(&records[0]),
            (
                "answer en What type of book is this?",
                Some("Literature & Fiction")
            )
        );
        a.split = Some("train".into());
        assert_eq!(convert_and_read(&a).len(), 3);
        a.split = Some("dev".into());
        assert!(convert(&a)
            .unwrap_err()
            .to_string()
            .contains("unknown split `dev`"));
    }

    #[test]
    fn refcoco_sentence_prompts_box_tokens() {
        let tmp = TempDir::new("refcoco");
        let f = Format::RefCoco;
        let mut a = args(
            f,
            &["instances.json", "refs.json"],
            "train2014",
            &tmp.0.join("refcoco.jsonl"),
        );
        let records = convert_and_read(&a);
        assert_eq!(records.len(), 3);
        // Image 9 is 640 x 480 (instances.json); bbox [x 100, y 50, w 200, h 300] has corners
        // y1 50, x1 100, y2 350, x2 300, so the bins are
        //   y1 50 * 1023 / 480 = 106.5625 -> 107    x1 100 * 1023 / 640 = 159.84375 -> 160
        //   y2 350 * 1023 / 480 = 745.9375 -> 746   x2 300 * 1023 / 640 = 479.53125 -> 480
        let bowl = "<loc0107><loc0160><loc0746><loc0480>";
        assert_eq!(texts(&records[0]), ("the bowl on the left", Some(bowl)));
        assert_eq!(texts(&records[1]), ("left bowl", Some(bowl)));
        assert_eq!(
            records[0].extra["boxes"],
            json!([[50.0, 100.0, 350.0, 300.0]])
        );
        let extra = &records[1].extra;
        assert_eq!(
            (&extra["id"], &extra["sent_id"], &extra["ann_id"]),
            (&json!(0), &json!(2), &json!(1038967))
        );
        assert_eq!(
            (&extra["image_id"], &extra["split"]),
            (&json!(9), &json!("train"))
        );
        // The refcoco metric maps <loc> tokens back to pixels with the image size.
        assert!(extra["width"].as_f64().is_some_and(|w| w > 0.0) && extra["height"].as_f64().is_some_and(|h| h > 0.0));
        assert_image(&records[0], f, "train2014/COCO_train2014_000000000009.jpg");
        // The whole 2 x 2 image: 0 and 2 * 1023 / 2.
        assert_eq!(
            texts(&records[2]),
            (
                "whole picture",
                Some("<loc0000><loc0000><loc1023><loc1023>")
            )
        );
        assert_image(&records[2], f, "train2014/COCO_train2014_000000000025.jpg");

        a.split = Some("val".into());
        let records = convert_and_read(&a);
        assert_eq!(
            records
                .iter()
                .map(|r| r.prefix.as_str())
                .collect::<Vec<_>>(),
            ["whole picture"]
        );
        a.split = Some("testB".into());
        let err = convert(&a).unwrap_err().to_string();
        assert!(
            err.contains("refs.json")
                && err.contains("no refs in split `testB` (found: train, val)"),
            "{err}"
        );
    }

    #[test]
    fn loc_tokens_round_half_to_even_and_clip() {
        // 1 * 1023 / 6 = 170.5 -> 170 and 3 * 1023 / 6 = 511.5 -> 512, as tf.round does.
        assert_eq!(loc_token(1.0, 6.0), "<loc0170>");
        assert_eq!(loc_token(3.0, 6.0), "<loc0512>");
        assert_eq!(loc_token(-3.0, 640.0), "<loc0000>");
        assert_eq!(loc_token(700.0, 640.0), "<loc1023>");
        assert_eq!(
            loc_tokens([0.0, 320.0, 240.0, 640.0], 640.0, 480.0),
            "<loc0000><loc0512><loc0512><loc1023>"
        );
    }

    #[test]
    fn docvqa_question_prompt_first_answer() {
        let tmp = TempDir::new("docvqa");
        let f = Format::DocVqa;
        let records = convert_and_read(&args(
            f,
            &["val_v1.0.json"],
            ".",
            &tmp.0.join("docvqa.jsonl"),
        ));
        assert_eq!(
            texts(&records[0]),
            (
                "What is the 'actual' value per 1000, during the year 1975?",
                Some("0.28")
            )
        );
        assert_eq!(
            texts(&records[1]),
            (
                "What is name of university?",
                Some("university of california")
            )
        );
        assert_eq!(records[1].extra["answers"].as_array().unwrap().len(), 3);
        assert_eq!(
            (&records[1].extra["id"], &records[1].extra["doc_id"]),
            (&json!(24580), &json!(2347))
        );
        assert_image(&records[0], f, "documents/pybv0228_81.png");
        assert_image(&records[1], f, "documents/nkbl0226_1.png");
    }

    #[test]
    fn output_next_to_images_uses_plain_relative_paths() {
        let tmp = TempDir::new("near");
        std::fs::create_dir_all(tmp.0.join("val2014")).unwrap();
        for n in [42, 73] {
            let name = format!("val2014/COCO_val2014_{n:012}.jpg");
            std::fs::copy(fixture(Format::CocoCaptions).join(&name), tmp.0.join(&name)).unwrap();
        }
        let mut a = args(
            Format::CocoCaptions,
            &["captions_val2014.json"],
            "val2014",
            &tmp.0.join("coco.jsonl"),
        );
        a.images = tmp.0.join("val2014");
        convert(&a).unwrap();
        let text = std::fs::read_to_string(&a.output).unwrap();
        let first: Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
        assert_eq!(first["image"], "val2014/COCO_val2014_000000000042.jpg");
        assert_eq!(
            relative_to(Path::new("/a/b/c"), Path::new("/a/d/e.jpg")),
            Path::new("../../d/e.jpg")
        );
    }

    #[test]
    fn missing_images_fail_or_are_skipped() {
        let tmp = TempDir::new("missing");
        let images = tmp.0.join("images");
        std::fs::create_dir_all(&images).unwrap();
        let name = "COCO_val2014_000000000042.jpg";
        std::fs::copy(
            fixture(Format::CocoCaptions).join("val2014").join(name),
            images.join(name),
        )
        .unwrap();
        let mut a = args(
            Format::CocoCaptions,
            &["captions_val2014.json"],
            "val2014",
            &tmp.0.join("coco.jsonl"),
        );
        a.images = images.clone();

        let err = convert(&a).unwrap_err().to_string();
        assert!(
            err.contains("COCO_val2014_000000000073.jpg") && err.contains("image not found"),
            "{err}"
        );
        assert!(!a.output.exists() && !tmp.0.join("coco.jsonl.tmp").exists());

        a.skip_missing = true;
        let summary = convert(&a).unwrap();
        let missing = images
            .canonicalize()
            .unwrap()
            .join("COCO_val2014_000000000073.jpg");
        assert_eq!(
            summary,
            ConvertSummary {
                records: 2,
                skipped_records: 1,
                missing_images: vec![missing]
            }
        );
        assert_eq!(read_jsonl(&a.output).unwrap().len(), 2);
    }

    #[test]
    fn bad_inputs_name_file_key_and_index() {
        let tmp = TempDir::new("bad");
        let write = |name: &str, text: &str| {
            let path = tmp.0.join(name);
            std::fs::write(&path, text).unwrap();
            path
        };
        let output = tmp.0.join("out.jsonl");
        let mut a = args(Format::CocoCaptions, &[], "val2014", &output);
        let expect_error = |a: &ConvertArgs, parts: &[&str]| {
            let err = convert(a).unwrap_err().to_string();
            assert!(
                parts.iter().all(|p| err.contains(p)),
                "{err} lacks {parts:?}"
            );
            assert!(!output.exists() && !tmp.0.join("out.jsonl.tmp").exists());
        };

        a.inputs = vec![write("broken.json", "{\"images\": [{\"id\": 1,")];
        expect_error(&a, &["broken.json", "invalid JSON", "EOF"]);
        let captions = r#"{"images": [{"id": 42, "file_name": "a.jpg"}],
            "annotations": [{"image_id": 42, "caption": "x"}, {"image_id": 42, "id": 2}]}"#;
        a.inputs = vec![write("captions.json", captions)];
        expect_error(
            &a,
            &["captions.json", "`annotations[1]`: missing key `caption`"],
        );
        a.inputs = vec![write("no_images.json", r#"{"annotations": []}"#)];
        expect_error(&a, &["no_images.json", "missing key `images`"]);
        a.inputs = vec![write(
            "unknown.json",
            r#"{"images": [], "annotations": [{"image_id": 7, "caption": "x"}]}"#,
        )];
        expect_error(
            &a,
            &[
                "unknown.json",
                "`annotations[0].image_id`: no image with id 7",
            ],
        );
        a.inputs = vec![write("list.json", "[]")];
        expect_error(&a, &["list.json", "invalid JSON", "expected a JSON object"]);
        a.inputs = vec![write(
            "typed.json",
            r#"{"images": [{"id": 42, "file_name": 3}], "annotations": []}"#,
        )];
        expect_error(
            &a,
            &[
                "typed.json",
                "`images[0].file_name`: expected a string, found a number",
            ],
        );

        // Refs with an annotation instances.json lacks; a bbox that is not 4 numbers.
        a.format = Format::RefCoco;
        let instances = write("instances.json", r#"{"images": [], "annotations": []}"#);
        let refs =
            r#"[{"ref_id": 5, "ann_id": 8, "image_id": 1, "split": "train", "sentences": []}]"#;
        a.inputs = vec![instances, write("refs.json", refs)];
        expect_error(
            &a,
            &[
                "refs.json",
                "`[0]`: annotation 8 is not in",
                "instances.json",
            ],
        );
        let instances = r#"{"images": [], "annotations": [{"id": 8, "bbox": [1, 2, 3]}]}"#;
        a.inputs[0] = write("instances.json", instances);
        expect_error(
            &a,
            &[
                "instances.json",
                "`annotations[0].bbox`: expected [x, y, w, h]",
            ],
        );

        // OCR-VQA entries are named by their key.
        a.format = Format::OcrVqa;
        let books =
            r#"{"b1": {"imageURL": "u.jpg", "questions": ["q"], "answers": [], "split": 1}}"#;
        a.inputs = vec![write("dataset.json", books)];
        expect_error(&a, &["dataset.json", "`b1`: 1 questions but 0 answers"]);

        // Usage: input count, --split where it does not apply, unknown names.
        a.format = Format::RefCoco;
        expect_error(
            &a,
            &[
                "convert refcoco",
                "wrong number of inputs (1)",
                "INSTANCES.json REFS.json",
            ],
        );
        a.format = Format::DocVqa;
        a.split = Some("train".into());
        expect_error(&a, &["convert docvqa", "--split only applies"]);
        a.split = None;
        a.images = tmp.0.join("nowhere");
        a.inputs = vec![fixture(Format::DocVqa).join("val_v1.0.json")];
        expect_error(&a, &["nowhere: images folder"]);
        assert!("vqa"
            .parse::<Format>()
            .unwrap_err()
            .contains("coco-captions, vqav2, textvqa, ocrvqa, refcoco, docvqa"));
    }

    #[test]
    fn format_names_round_trip() {
        for format in Format::ALL {
            assert_eq!(format.name().parse::<Format>(), Ok(format));
            assert!(Format::help().contains(format.name()));
        }
    }

    #[test]
    fn failed_conversion_leaves_an_existing_output_alone() {
        let tmp = TempDir::new("keep");
        let output = tmp.0.join("out.jsonl");
        std::fs::write(&output, "old\n").unwrap();
        let mut a = args(Format::DocVqa, &["val_v1.0.json"], ".", &output);
        a.images = tmp.0.clone(); // no documents/ here
        assert!(convert(&a).is_err());
        assert_eq!(std::fs::read_to_string(&output).unwrap(), "old\n");
    }
}
