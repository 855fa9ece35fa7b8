//! Training recipes: one TOML file describes one stage. Unknown keys are errors naming the
//! key and the line, so a typo never silently falls back to a default.

use std::path::{Path, PathBuf};

use pg2_model::PaliGemmaConfig;
use serde::Deserialize;

/// A parsed recipe.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    /// Names the run folder (`runs/<name>`); defaults to the file's stem.
    pub name: Option<String>,
    pub model: ModelSection,
    pub data: DataSection,
    pub train: TrainSection,
}

/// What model to train and how to run it.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// `"paligemma2-3b"`, `"-10b"`, `"-28b"`, or a checkpoint folder to start from.
    pub init: String,
    /// Image side in pixels.
    pub resolution: usize,
    /// `"f32"` or `"bf16"`.
    #[serde(default = "default_dtype")]
    pub dtype: String,
    /// Attention and final-logit soft-caps: on in pretraining, off in transfer.
    #[serde(default = "default_true")]
    pub soft_caps: bool,
}

/// Where the examples come from.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DataSection {
    /// Weighted JSONL sources, relative to the recipe file.
    pub mixture: Vec<Source>,
}

/// One weighted source of a mixture.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Source {
    pub path: PathBuf,
    pub weight: f64,
}

/// How long and how fast to train.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TrainSection {
    pub steps: u64,
    pub batch_size: usize,
    pub lr: f64,
    #[serde(default)]
    pub seed: u64,
}

fn default_dtype() -> String {
    "f32".into()
}

fn default_true() -> bool {
    true
}

/// A recipe that cannot be used, with the file it came from.
#[derive(Debug, thiserror::Error)]
#[error("{file}: {msg}")]
pub struct RecipeError {
    pub file: String,
    pub msg: String,
}

impl Recipe {
    /// Reads and checks a recipe file.
    pub fn from_file(path: &Path) -> Result<Self, RecipeError> {
        let err = |msg: String| RecipeError { file: path.display().to_string(), msg };
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        let recipe: Recipe = toml::from_str(&text).map_err(|e| err(e.to_string()))?;
        recipe.check().map_err(err)?;
        Ok(recipe)
    }

    fn check(&self) -> Result<(), String> {
        match self.model.dtype.as_str() {
            "f32" | "bf16" => {}
            other => return Err(format!("model.dtype = {other:?}: expected \"f32\" or \"bf16\"")),
        }
        if let Some(size) = self.model.init.strip_prefix("paligemma2-") {
            let billions = size.trim_end_matches('b').parse().map_err(|_| format!("model.init = {:?}: expected paligemma2-3b, -10b or -28b", self.model.init))?;
            PaliGemmaConfig::paligemma2(billions, self.model.resolution).map_err(|e| format!("model: {e}"))?;
        }
        if self.data.mixture.is_empty() || self.data.mixture.iter().any(|s| !(s.weight > 0.0)) {
            return Err("data.mixture needs at least one source, each with a positive weight".into());
        }
        if self.train.batch_size == 0 || self.train.steps == 0 || !(self.train.lr > 0.0) {
            return Err("train.steps, train.batch_size and train.lr must be positive".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[model]
init = "paligemma2-3b"
resolution = 224

[data]
mixture = [{ path = "train.jsonl", weight = 1.0 }]

[train]
steps = 10
batch_size = 4
lr = 1e-5
"#;

    fn parse(text: &str) -> Result<Recipe, RecipeError> {
        let path = std::env::temp_dir().join(format!("pg2-recipe-{}-{}.toml", std::process::id(), text.len()));
        std::fs::write(&path, text).unwrap();
        let out = Recipe::from_file(&path);
        std::fs::remove_file(&path).unwrap();
        out
    }

    #[test]
    fn defaults_fill_in() {
        let r = parse(GOOD).unwrap();
        assert_eq!((r.model.dtype.as_str(), r.model.soft_caps, r.train.seed), ("f32", true, 0));
    }

    #[test]
    fn unknown_key_names_key_and_line() {
        let err = parse(&GOOD.replace("lr = 1e-5", "lr = 1e-5\nlearning_rate = 3")).unwrap_err().to_string();
        assert!(err.contains("learning_rate") && err.contains("line 13"), "{err}");
    }

    #[test]
    fn impossible_values_are_rejected() {
        let err = parse(&GOOD.replace("resolution = 224", "resolution = 300")).unwrap_err().to_string();
        assert!(err.contains("300"), "{err}");
        let err = parse(&GOOD.replace("weight = 1.0", "weight = 0.0")).unwrap_err().to_string();
        assert!(err.contains("positive weight"), "{err}");
    }
}
