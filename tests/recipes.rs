//! Every shipped recipe parses and resolves: keys known, values possible, bases found,
//! `$DATA` sources placed under a data root.

use std::path::{Path, PathBuf};

use pg2_data::convert::Format;
use pg2_eval::Metric;
use pg2_train::Recipe;

fn recipes(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            recipes(&path, out);
        } else if path.extension().is_some_and(|e| e == "toml") {
            out.push(path);
        }
    }
}

#[test]
fn every_shipped_recipe_resolves() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../recipes");
    let mut files = Vec::new();
    recipes(&root, &mut files);
    assert!(files.iter().any(|f| f.ends_with("tiny/stage1.toml")), "{files:?}");
    for file in &files {
        let (recipe, _) = Recipe::load(file, &["data.root=\"/data\"".to_string()])
            .unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        for source in &recipe.data.mixture {
            assert!(source.path.is_absolute(), "{}: {}", file.display(), source.path.display());
        }
        if let Some(eval) = &recipe.eval {
            assert!(eval.data.is_absolute(), "{}: {}", file.display(), eval.data.display());
        }
        // Stage 2's long sequences (448 and 896 px, through the base) need the memory-lean
        // soft-capped attention; shorter ones train faster without it.
        let stage2 = file.file_name().is_some_and(|n| n.to_string_lossy().starts_with("stage2-"));
        assert_eq!(recipe.model.lean_attention, stage2, "{}", file.display());
        // Transfers warm up over big_vision's `warmup_percent = 0.05` of their real length,
        // not over a step count derived from an assumed record count.
        if file.parent().is_some_and(|d| d.ends_with("transfer")) {
            let t = &recipe.train;
            assert_eq!((t.warmup_fraction, t.warmup_steps), (Some(0.05), 0), "{}", file.display());
        }
    }
}

fn transfer(name: &str) -> Recipe {
    let file = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("../../recipes/transfer/{name}.toml"));
    Recipe::load(&file, &["data.root=\"/data\"".to_string()]).unwrap().0
}

/// Case is kept where big_vision's `vqa` evaluator keeps it (its default `to_lower=False`;
/// AI2D sets it explicitly) and where it carries meaning (SMILES); TallyQA and ScienceQA use
/// their own evaluators' rules.
#[test]
fn transfer_recipes_compare_case_as_big_vision() {
    for (name, metric) in [
        ("ai2d", Metric::ExactCased),
        ("ocrvqa", Metric::ExactCased),
        ("gqa", Metric::ExactCased),
        ("molecules", Metric::ExactCased),
        ("scienceqa", Metric::ScienceQa),
        ("tallyqa", Metric::TallyQa),
    ] {
        assert_eq!(transfer(name).eval.unwrap().metric, metric, "{name}");
    }
}

/// Images are antialiased where the big_vision config writes `resize(res, antialias=True)`,
/// in training (`data`) and evaluation (`eval`, `None`: as training).
#[test]
fn transfer_recipes_resize_as_big_vision() {
    for (name, train, eval) in [
        ("vqav2", true, None),
        ("textvqa", true, None),
        ("docvqa", true, None),
        ("ocrvqa", true, None),
        ("chartqa", true, None),
        ("tallyqa", true, None),
        ("stvqa", true, None),
        ("ai2d", true, Some(false)),
        ("vizwizvqa", true, Some(false)),
        ("cococap", false, None),
        ("nocaps", false, None),
        ("refcoco", false, None),
        ("scienceqa", false, None),
        ("gqa", false, None),
    ] {
        let recipe = transfer(name);
        assert_eq!((recipe.data.antialias, recipe.eval.unwrap().antialias), (train, eval), "{name}");
    }
}

/// The paper pads OCR, table, molecule and music images to a square with white; no other
/// transfer pads.
#[test]
fn transfer_recipes_pad_to_square_where_the_paper_does() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../recipes/transfer");
    let mut files = Vec::new();
    recipes(&dir, &mut files);
    let mut padded: Vec<String> = files
        .iter()
        .map(|f| f.file_stem().unwrap().to_string_lossy().into_owned())
        .filter(|name| !name.starts_with("base") && transfer(name).data.pad_to_square)
        .collect();
    padded.sort();
    let want = ["grandstaff", "molecules", "ocr-icdar15", "ocr-totaltext", "tables-fintabnet", "tables-pubtabnet"];
    assert_eq!(padded, want);
}

/// One text budget as big_vision's `text_len`, decoded up to `max_decode_len = text_len`,
/// for every task with a big_vision transfer config.
#[test]
fn transfer_recipes_budget_text_as_big_vision() {
    for (name, text_len) in [
        ("vqav2", 32),
        ("textvqa", 32),
        ("docvqa", 32),
        ("ocrvqa", 32),
        ("gqa", 32),
        ("tallyqa", 32),
        ("cococap", 32),
        ("nocaps", 32),
        ("chartqa", 48),
        ("stvqa", 48),
        ("vizwizvqa", 48),
        ("refcoco", 48),
        ("refcocoplus", 48),
        ("refcocog", 48),
        ("ai2d", 128),
        ("scienceqa", 512),
    ] {
        let recipe = transfer(name);
        let d = &recipe.data;
        for source in &d.mixture {
            let limits = d.limits(source);
            assert_eq!(limits.text_len, Some(text_len), "{name}");
            assert_eq!((limits.max_prefix_tokens, limits.max_suffix_tokens), (None, None), "{name}: one budget");
        }
        assert_eq!(recipe.eval.unwrap().max_len, text_len, "{name}");
    }
}

/// The tasks whose big_vision configs draw one of several answers per visit
/// (`choice_no_replacement(inkey="answers")`; DocVQA's `choice`) draw from `answers`, COCO
/// captions from an image's `references` (`inkey="captions/text"`).
#[test]
fn transfer_recipes_draw_targets_as_big_vision() {
    for name in ["vqav2", "textvqa", "docvqa", "vizwizvqa", "stvqa"] {
        for source in &transfer(name).data.mixture {
            assert_eq!(source.suffix_from.as_deref(), Some("answers"), "{name}");
        }
    }
    for name in ["cococap", "nocaps"] {
        assert_eq!(transfer(name).data.mixture[0].suffix_from.as_deref(), Some("references"), "{name}");
    }
    assert_eq!(transfer("ocrvqa").data.mixture[0].suffix_from, None, "one answer per question");
}

/// ScienceQA's training source reshuffles what `pg2 convert scienceqa` writes: in the
/// identity order its templates give the converter's own texts, and in every drawn order the
/// answer's letter still names the right choice.
#[test]
fn scienceqa_trains_on_converted_records_with_choices_reshuffled() {
    use pg2_data::convert::{convert, ConvertArgs};
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/convert/scienceqa");
    let root = std::env::temp_dir().join(format!("pg2-recipes-scienceqa-{}", std::process::id()));
    let output = root.join("scienceqa/train.jsonl");
    let args = ConvertArgs {
        format: Format::ScienceQa,
        inputs: vec![fixtures.join("problems.json"), fixtures.join("pid_splits.json")],
        images: fixtures.join("images"),
        output: output.clone(),
        split: Some("train".into()),
        skip_missing: false,
        mask_vae: None,
        pad_to_square: false,
    };
    convert(&args).unwrap();
    let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../recipes/transfer/scienceqa.toml");
    let recipe = Recipe::load(&file, &[format!("data.root={:?}", root.display().to_string())]).unwrap().0;
    let mut mixture = pg2_train::input::mixture(&recipe).unwrap();
    let records = pg2_data::source::read_jsonl(&output).unwrap();
    let mut identity = 0;
    for _ in 0..40 {
        let (s, record) = mixture.next_example().unwrap();
        let prompt = mixture.sources()[s].format.prompt(&record).unwrap();
        let suffix = record.suffix.clone().unwrap();
        let letter = suffix.strip_prefix("The answer is ").unwrap().trim_end_matches('.');
        let choices = record.extra["choices"].as_array().unwrap();
        let right = choices[record.extra["answer"].as_u64().unwrap() as usize].as_str().unwrap();
        assert!(prompt.contains(&format!("({letter}) {right}")), "{prompt} / {suffix}");
        let converted = records.iter().find(|r| r.extra["id"] == record.extra["id"]).unwrap();
        if prompt == converted.prefix {
            assert_eq!(Some(suffix), converted.suffix);
            identity += 1;
        }
    }
    assert!((1..40).contains(&identity), "some visits keep the dataset's order, most do not: {identity}");
    std::fs::remove_dir_all(root).unwrap();
}

/// A transfer source's `make` hint that runs `pg2 convert` is a command to run: a known
/// format, `--input`, `--images`, `--split` only where the format takes one,
/// `--pad-to-square` exactly where the recipe pads images and the format bins boxes, and the
/// very file the source reads as `--output` (or made from it by a following command). Every
/// transfer source has a converter now: a `no converter yet:` hint fails.
#[test]
fn transfer_hints_are_convert_commands_writing_the_source() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../recipes/transfer");
    let mut files = Vec::new();
    recipes(&dir, &mut files);
    let mut without = Vec::new();
    for file in &files {
        let name = file.file_stem().unwrap().to_string_lossy().into_owned();
        if name.starts_with("base") {
            continue; // placeholders whose hint says to run a task
        }
        let recipe = transfer(&name);
        for source in recipe.data.mixture {
            let make = source.make.as_deref().unwrap_or_else(|| panic!("{name}: a source without `make`"));
            let Some(command) = make.strip_prefix("pg2 convert ") else {
                assert!(make.starts_with("no converter yet: "), "{name}: {make}");
                without.push(name.clone());
                continue;
            };
            // The convert command's words: up to a following `&&` command or a closing remark.
            let words: Vec<&str> =
                command.split_whitespace().take_while(|w| *w != "&&" && !w.starts_with('(')).collect();
            let format: Format = words[0].parse().unwrap_or_else(|e| panic!("{name}: {e}"));
            let flag = |flag: &str| -> Vec<&str> { words.windows(2).filter(|w| w[0] == flag).map(|w| w[1]).collect() };
            assert!(!flag("--input").is_empty() && flag("--images").len() == 1, "{name}: {make}");
            assert!(flag("--split").len() <= usize::from(format.takes_split()), "{name}: {make}");
            let padded = words.contains(&"--pad-to-square");
            assert_eq!(padded, recipe.data.pad_to_square && format.bins_boxes(), "{name}: {make}");
            // The source is the converter's output, or what a following command makes of it.
            let target = source.path.to_string_lossy().replacen("/data", "$DATA", 1);
            let made = flag("--output") == [target.as_str()] || make.contains(&format!("> {target}"));
            assert!(made, "{name}: {make} does not write {target}");
            let flags = ["--input", "--images", "--split", "--output", "--pad-to-square", "--mask-vae"];
            let known = |w: &&str| !w.starts_with("--") || flags.contains(w);
            assert!(words.iter().all(known), "{name}: {make}");
        }
    }
    assert!(without.is_empty(), "sources without a converter: {without:?}");
}
