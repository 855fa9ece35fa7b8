//! Training recipes: one TOML file describes one stage. Unknown keys are errors naming the
//! key and the line, so a typo never silently falls back to a default. Paths are relative
//! to the recipe file.

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// A parsed recipe, with paths resolved against its folder.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    /// Names the run folder (`runs/<name>`); defaults to the file's stem.
    pub name: Option<String>,
    /// Seeds the initialisation and the data order.
    #[serde(default)]
    pub seed: u64,
    pub model: ModelSection,
    pub data: DataSection,
    pub train: TrainSection,
}

/// What model to train and how to run it.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// `"random"`, or a Hugging Face checkpoint folder to start from.
    pub init: String,
    /// Shape of a random model: `"tiny"`, `"paligemma2-3b"`, `"paligemma2-10b"`, `"paligemma2-28b"`.
    pub preset: Option<String>,
    /// Image side in pixels.
    pub resolution: usize,
    /// `"f32"` or `"bf16"`.
    #[serde(default = "default_dtype")]
    pub dtype: String,
    /// Attention and final-logit soft-caps: on in pretraining, off in transfer.
    #[serde(default = "default_true")]
    pub soft_caps: bool,
}

/// Where the examples come from and how they become tokens.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DataSection {
    /// The tokenizer (`tokenizer.json`).
    pub tokenizer: PathBuf,
    /// Write the synthetic demo data into this folder first when it is missing.
    pub synth: Option<PathBuf>,
    /// Weighted sources.
    pub mixture: Vec<Source>,
    /// Most prompt tokens; longer prompts are cut.
    pub max_prefix_tokens: Option<usize>,
    /// Most target tokens (with `<eos>`); longer targets are cut and counted.
    pub max_suffix_tokens: Option<usize>,
    /// Keep `<eos>` when cutting a target.
    #[serde(default)]
    pub keep_eos: bool,
    /// `"error"` (stop, naming the record) or `"skip"` (count and go on) for bad records.
    #[serde(default = "default_policy")]
    pub on_bad_record: String,
    /// Decoding threads.
    #[serde(default = "default_workers")]
    pub workers: usize,
    /// Batches prepared ahead.
    #[serde(default = "default_prefetch")]
    pub prefetch: usize,
}

/// One weighted source of the mixture.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Source {
    /// A JSONL file or a folder of JSONL shards.
    pub path: PathBuf,
    pub weight: f64,
    /// Prompt template such as `"answer en {question}"`; the records' own prefix by default.
    pub prefix: Option<String>,
}

/// How long and how fast to train.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TrainSection {
    pub steps: u64,
    pub batch_size: usize,
    /// Base learning rate of Adam.
    pub lr: f64,
    /// Linear warmup steps before the cosine decay.
    #[serde(default)]
    pub warmup_steps: u64,
    /// Decoupled weight decay (big_vision's: scaled by the schedule, not the base rate).
    #[serde(default)]
    pub weight_decay: f64,
    /// Global gradient-norm clip (big_vision: 1.0); 0 turns it off.
    #[serde(default = "default_clip")]
    pub grad_clip: f64,
    #[serde(default = "default_b2")]
    pub b2: f64,
    /// Steps between log lines.
    #[serde(default = "default_log_every")]
    pub log_every: u64,
    /// Steps between checkpoints; the last step always saves one.
    pub checkpoint_every: Option<u64>,
}

fn default_dtype() -> String {
    "f32".into()
}
fn default_true() -> bool {
    true
}
fn default_policy() -> String {
    "error".into()
}
fn default_workers() -> usize {
    2
}
fn default_prefetch() -> usize {
    4
}
fn default_clip() -> f64 {
    1.0
}
fn default_b2() -> f64 {
    0.999
}
fn default_log_every() -> u64 {
    10
}

/// A recipe that cannot be used, with the file it came from.
#[derive(Debug, thiserror::Error)]
#[error("{file}: {msg}")]
pub struct RecipeError {
    pub file: String,
    pub msg: String,
}

impl Recipe {
    /// Reads and checks a recipe file, resolving its paths against the file's folder.
    pub fn from_file(path: &Path) -> Result<Self, RecipeError> {
        let err = |msg: String| RecipeError { file: path.display().to_string(), msg };
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        let mut recipe: Recipe = toml::from_str(&text).map_err(|e| err(e.to_string()))?;
        recipe.check().map_err(err)?;
        let dir = path.parent().unwrap_or(Path::new("."));
        let resolve = |p: &mut PathBuf| *p = dir.join(&*p);
        resolve(&mut recipe.data.tokenizer);
        recipe.data.synth.as_mut().map(resolve);
        recipe.data.mixture.iter_mut().for_each(|s| resolve(&mut s.path));
        if recipe.model.init != "random" {
            recipe.model.init = dir.join(&recipe.model.init).display().to_string();
        }
        if recipe.name.is_none() {
            recipe.name = path.file_stem().map(|s| s.to_string_lossy().into_owned());
        }
        Ok(recipe)
    }

    fn check(&self) -> Result<(), String> {
        if !["f32", "bf16"].contains(&self.model.dtype.as_str()) {
            return Err(format!("model.dtype = {:?}: expected \"f32\" or \"bf16\"", self.model.dtype));
        }
        match (self.model.init.as_str(), self.model.preset.as_deref()) {
            ("random", None) => return Err("model.init = \"random\" needs model.preset (tiny, paligemma2-3b, -10b or -28b)".into()),
            ("random", Some("tiny" | "paligemma2-3b" | "paligemma2-10b" | "paligemma2-28b")) => {}
            ("random", Some(other)) => return Err(format!("model.preset = {other:?}: expected tiny, paligemma2-3b, paligemma2-10b or paligemma2-28b")),
            (_, Some(_)) => return Err("model.preset applies to model.init = \"random\" only; a checkpoint brings its own shape".into()),
            _ => {}
        }
        if !["error", "skip"].contains(&self.data.on_bad_record.as_str()) {
            return Err(format!("data.on_bad_record = {:?}: expected \"error\" or \"skip\"", self.data.on_bad_record));
        }
        if self.data.mixture.is_empty() || self.data.mixture.iter().any(|s| !(s.weight > 0.0)) {
            return Err("data.mixture needs at least one source, each with a positive weight".into());
        }
        let t = &self.train;
        if t.batch_size == 0 || t.steps == 0 || !(t.lr > 0.0) || t.log_every == 0 || t.checkpoint_every == Some(0) {
            return Err("train.steps, train.batch_size, train.lr, train.log_every and train.checkpoint_every must be positive".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[model]
init = "random"
preset = "tiny"
resolution = 64

[data]
tokenizer = "synth/tokenizer.json"
mixture = [{ path = "train.jsonl", weight = 1.0 }]

[train]
steps = 10
batch_size = 4
lr = 1e-5
"#;

    fn parse(text: &str) -> Result<Recipe, RecipeError> {
        let dir = std::env::temp_dir().join(format!("pg2-recipe-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let path = dir.join(format!("r{}.toml", NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)));
        std::fs::write(&path, text).unwrap();
        let out = Recipe::from_file(&path);
        std::fs::remove_file(&path).unwrap();
        out
    }

    #[test]
    fn defaults_fill_in_and_paths_resolve() {
        let r = parse(GOOD).unwrap();
        assert_eq!((r.model.dtype.as_str(), r.model.soft_caps, r.seed, r.train.grad_clip), ("f32", true, 0, 1.0));
        assert!(r.data.tokenizer.is_absolute() && r.data.tokenizer.ends_with("synth/tokenizer.json"));
        assert!(r.name.as_deref().unwrap().starts_with('r'));
    }

    #[test]
    fn unknown_key_names_key_and_line() {
        let err = parse(&GOOD.replace("lr = 1e-5", "lr = 1e-5\nlearning_rate = 3")).unwrap_err().to_string();
        assert!(err.contains("learning_rate") && err.contains("line 15"), "{err}");
    }

    #[test]
    fn impossible_values_are_rejected() {
        let err = parse(&GOOD.replace("preset = \"tiny\"", "preset = \"huge\"")).unwrap_err().to_string();
        assert!(err.contains("huge"), "{err}");
        let err = parse(&GOOD.replace("weight = 1.0", "weight = 0.0")).unwrap_err().to_string();
        assert!(err.contains("positive weight"), "{err}");
        let err = parse(&GOOD.replace("steps = 10", "steps = \"ten\"")).unwrap_err().to_string();
        assert!(err.contains("steps") && err.contains("line 12"), "{err}");
    }
}
