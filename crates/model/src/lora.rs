//! LoRA adapters as PEFT makes them (Hu et al. 2021): a targeted linear layer computes
//! `base(x) + B(A(dropout(x))) * alpha / rank`, with `A` `(rank, in)` drawn as PEFT's
//! kaiming-uniform (a = sqrt(5)) and `B` `(out, rank)` zero, so fresh adapters leave the model
//! as it was. The base weights stay frozen; only the adapters (and any parts named to be
//! trained in full, PEFT's `modules_to_save`) train.
//!
//! Adapters are parameters like any other (recorded by [`crate::Weights`] as
//! [`ParamKind::Adapter`], named `{layer}.lora_A.weight` / `{layer}.lora_B.weight` after the
//! layer's canonical name), so the trainer, sharding and checkpoints handle them unchanged.
//! On disk they take PEFT's form: `adapter_config.json` plus `adapter_model.safetensors` with
//! the names PEFT writes for transformers 5's `PaliGemmaForConditionalGeneration`
//! (`base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight`).

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::{json, Value};
use tch::{Kind, Tensor};

use crate::checkpoint::{self, Part};
use crate::layer_params::Layer;
use crate::nn::{NamedTensors, Param, ParamKind};
use crate::ModelError;

/// The adapter config file of a PEFT adapter folder.
pub const CONFIG_FILE: &str = "adapter_config.json";
/// The adapter weights file of a PEFT adapter folder.
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
/// What PEFT puts before transformers' parameter names.
const PEFT_PREFIX: &str = "base_model.model.";

/// Which linear layers get adapters, and how they are made and scaled.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    /// The adapters' inner dimension `r`.
    pub rank: usize,
    /// The adapters' outputs are scaled by `alpha / rank`.
    pub alpha: f64,
    /// Dropout on the adapters' inputs while training.
    pub dropout: f64,
    /// Patterns over linear layers' canonical names (e.g. `language_model.model.layers.0.mlp.up_proj`):
    /// `*` stands for any run of characters, and a pattern picks a layer when it matches the
    /// whole name or the part after one of its dots (PEFT's rule for `target_modules`).
    pub targets: Vec<String>,
    /// Parts trained in full beside the adapters (PEFT's `modules_to_save`).
    pub trained: Vec<Part>,
}

impl LoraConfig {
    /// The decoder's attention and MLP projections: the usual LoRA targets.
    pub fn default_targets() -> Vec<String> {
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
            .iter()
            .map(|p| format!("{}.layers.*.{p}", checkpoint::TEXT))
            .collect()
    }

    /// `alpha / rank`, the factor on the adapters' outputs.
    pub fn scale(&self) -> f64 {
        self.alpha / self.rank as f64
    }

    /// Whether the linear layer `name` (canonical, without `.weight`) gets an adapter.
    pub fn targets(&self, name: &str) -> bool {
        let tails = std::iter::once(name).chain(name.match_indices('.').map(|(i, _)| &name[i + 1..]));
        self.targets.iter().any(|pattern| tails.clone().any(|tail| glob(pattern, tail)))
    }

    /// Whether parameter `name` is trained in full (its part is in `trained`).
    pub fn trains_in_full(&self, name: &str) -> bool {
        Part::of(name).is_some_and(|part| self.trained.contains(&part))
    }
}

/// Whether `text` matches `pattern` whole, `*` matching any run of characters.
fn glob(pattern: &str, text: &str) -> bool {
    match pattern.split_once('*') {
        None => pattern == text,
        Some((head, rest)) => {
            let Some(text) = text.strip_prefix(head) else { return false };
            (0..=text.len()).filter(|&i| text.is_char_boundary(i)).any(|i| glob(rest, &text[i..]))
        }
    }
}

/// How the frozen base's decoder linear layers are held (`lora.base_dtype`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BaseDtype {
    /// In the model's dtype, as every other weight.
    #[default]
    Model,
    /// In int8 with per-output-channel scales ([`crate::int8`]).
    Int8,
}

/// Adapters to build a model with: fresh ones, or ones read from a PEFT adapter folder.
pub struct Lora {
    pub config: LoraConfig,
    /// How the base they sit on is held (not part of a PEFT adapter: a choice of the run).
    pub base_dtype: BaseDtype,
    /// Whether the adapters are made afresh rather than taken from `adapters`.
    pub(crate) fresh: bool,
    /// Adapter tensors by canonical name, taken out as the model is built.
    pub(crate) adapters: BTreeMap<String, Tensor>,
    /// Tensors of the parts trained in full, by canonical name: they replace the base's.
    pub(crate) trained: BTreeMap<String, Tensor>,
    /// Names the source in errors.
    pub(crate) origin: String,
}

impl Lora {
    /// Freshly initialised adapters (draws from the device's generator: seed it first).
    pub fn fresh(config: LoraConfig) -> Self {
        let (adapters, trained) = (BTreeMap::new(), BTreeMap::new());
        Lora { config, base_dtype: BaseDtype::Model, fresh: true, adapters, trained, origin: "fresh adapters".into() }
    }

    /// The adapters of a PEFT adapter folder (`adapter_config.json` + `adapter_model.safetensors`).
    pub fn read(dir: &Path) -> Result<Self, ModelError> {
        let path = dir.join(CONFIG_FILE);
        let file = path.display().to_string();
        let text = std::fs::read_to_string(&path).map_err(|e| ModelError::io(&path, e))?;
        let json: Value =
            serde_json::from_str(&text).map_err(|e| ModelError::Checkpoint(format!("{file}: invalid JSON: {e}")))?;
        let bad = |key: &str, msg: &str| ModelError::config(&file, key, msg);
        if json["peft_type"] != "LORA" {
            return Err(bad("peft_type", "only LORA adapters are supported"));
        }
        // Variants that change the computation pg2 does not implement.
        for key in ["use_rslora", "use_dora"] {
            if json[key].as_bool() == Some(true) {
                return Err(bad(key, "not supported"));
            }
        }
        for key in ["rank_pattern", "alpha_pattern"] {
            if json[key].as_object().is_some_and(|m| !m.is_empty()) {
                return Err(bad(key, "per-layer ranks and alphas are not supported"));
            }
        }
        if json["bias"].as_str().is_some_and(|b| b != "none") {
            return Err(bad("bias", "only \"none\" is supported"));
        }
        let rank = json["r"].as_u64().filter(|&r| r > 0).ok_or_else(|| bad("r", "expected a positive integer"))?;
        let alpha = json["lora_alpha"].as_f64().ok_or_else(|| bad("lora_alpha", "expected a number"))?;
        let dropout = json["lora_dropout"].as_f64().unwrap_or(0.0);
        let trained = match &json["modules_to_save"] {
            Value::Null => vec![],
            Value::Array(modules) => modules
                .iter()
                .map(|m| {
                    let m = m.as_str().unwrap_or_default();
                    Part::ALL.into_iter().find(|p| module_of(*p) == m).ok_or_else(|| {
                        bad(
                            "modules_to_save",
                            &format!("`{m}`: expected one of vision_tower, multi_modal_projector, language_model"),
                        )
                    })
                })
                .collect::<Result<_, _>>()?,
            _ => return Err(bad("modules_to_save", "expected a list")),
        };
        let weights = dir.join(WEIGHTS_FILE);
        let (mut adapters, mut tensors) = (BTreeMap::new(), BTreeMap::new());
        for (name, tensor) in checkpoint::read_file(&weights)? {
            let canonical = name.strip_prefix(PEFT_PREFIX).and_then(checkpoint::canonical_name).ok_or_else(|| {
                ModelError::Checkpoint(format!("{}: `{name}` is no PEFT name of a PaliGemma tensor", weights.display()))
            })?;
            match is_adapter_name(&canonical) {
                true => adapters.insert(canonical, tensor),
                false => tensors.insert(canonical, tensor),
            };
        }
        // The adapted layers are exactly those with tensors in the file.
        let targets = adapters.keys().filter_map(|n| n.strip_suffix(".lora_A.weight")).map(str::to_string).collect();
        let config = LoraConfig { rank: rank as usize, alpha, dropout, targets, trained };
        let origin = weights.display().to_string();
        Ok(Lora { config, base_dtype: BaseDtype::Model, fresh: false, adapters, trained: tensors, origin })
    }

    /// The same adapters on a base held as `base_dtype`.
    pub fn on_base(self, base_dtype: BaseDtype) -> Self {
        Lora { base_dtype, ..self }
    }

    /// Whether linear layer `layer` (canonical, without `.weight`) is held in int8: with an
    /// int8 base, every linear layer of the decoder's layers (the attention and MLP
    /// projections, adapted or not), unless the decoder trains in full. The vision tower
    /// and projector (a seventh of the 3B model; the projector often trains) and the
    /// embedding (also the output head, whose logits the loss reads) stay in the model's dtype.
    pub fn quantizes(&self, layer: &str) -> bool {
        self.base_dtype == BaseDtype::Int8
            && matches!(Layer::of(layer), Some(Layer::Text(_)))
            && !self.config.trains_in_full(layer)
    }
}

/// The transformers module a part is, as `modules_to_save` names it.
fn module_of(part: Part) -> &'static str {
    match part {
        Part::Vision => "vision_tower",
        Part::Projector => "multi_modal_projector",
        Part::Decoder => "language_model",
    }
}

/// PEFT's file name for canonical parameter `name`: transformers 5's name after `base_model.model.`.
fn peft_name(name: &str) -> String {
    let hf = match name.strip_prefix(checkpoint::TEXT) {
        Some(rest) => format!("model.language_model{rest}"),
        None => format!("model.{name}"),
    };
    format!("{PEFT_PREFIX}{hf}")
}

/// Whether a parameter goes into an adapter folder: the adapters and the parts trained in full.
pub fn is_saved(config: &LoraConfig, p: &Param) -> bool {
    p.kind == ParamKind::Adapter || config.trains_in_full(&p.name)
}

/// Writes a PEFT adapter folder for `config` from `weights` (the adapters and the fully
/// trained parts' parameters, by canonical name; others are passed over), stored as `kind`.
pub fn write_adapter(
    dir: &Path,
    config: &LoraConfig,
    weights: &[(String, Tensor)],
    kind: Kind,
) -> Result<(), ModelError> {
    std::fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
    let saved: NamedTensors = weights
        .iter()
        .filter(|(name, _)| is_adapter_name(name) || config.trains_in_full(name))
        .map(|(name, t)| (peft_name(name), t.shallow_clone()))
        .collect();
    checkpoint::write_file(&dir.join(WEIGHTS_FILE), &saved, kind)?;
    // The adapted modules by their full transformers names: PEFT matches each exactly.
    let targets: Vec<String> = weights
        .iter()
        .filter_map(|(n, _)| n.strip_suffix(".lora_A.weight"))
        .map(|n| peft_name(n).trim_start_matches(PEFT_PREFIX).to_string())
        .collect();
    let modules_to_save: Vec<&str> = config.trained.iter().map(|p| module_of(*p)).collect();
    // PEFT's `lora_alpha` is an int unless set otherwise.
    let alpha = match config.alpha.fract() == 0.0 && config.alpha.abs() < 1e15 {
        true => json!(config.alpha as i64),
        false => json!(config.alpha),
    };
    let json = json!({
        "peft_type": "LORA",
        "task_type": null,
        "auto_mapping": {
            "base_model_class": "PaliGemmaForConditionalGeneration",
            "parent_library": "transformers.models.paligemma.modeling_paligemma"
        },
        "base_model_name_or_path": null,
        "r": config.rank,
        "lora_alpha": alpha,
        "lora_dropout": config.dropout,
        "target_modules": targets,
        "modules_to_save": if modules_to_save.is_empty() { Value::Null } else { json!(modules_to_save) },
        "bias": "none",
        "fan_in_fan_out": false,
        "init_lora_weights": true,
        "use_rslora": false,
        "use_dora": false,
        "rank_pattern": {},
        "alpha_pattern": {},
        "inference_mode": true
    });
    let path = dir.join(CONFIG_FILE);
    std::fs::write(&path, serde_json::to_string_pretty(&json).unwrap()).map_err(|e| ModelError::io(&path, e))
}

fn is_adapter_name(name: &str) -> bool {
    name.ends_with(".lora_A.weight") || name.ends_with(".lora_B.weight")
}

/// `weights` with each adapter folded into its layer's weight (`W + B A * alpha / rank`,
/// computed in f32) and the adapters themselves left out: a plain model's parameters.
pub fn merged(config: &LoraConfig, weights: &[(String, Tensor)]) -> NamedTensors {
    let by_name: BTreeMap<&str, &Tensor> = weights.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let adapter = |layer: &str, which: &str| by_name.get(format!("{layer}.{which}.weight").as_str()).copied();
    weights
        .iter()
        .filter(|(name, _)| !is_adapter_name(name))
        .map(|(name, w)| {
            let layer = name.strip_suffix(".weight");
            let merged = match layer.and_then(|l| Some((adapter(l, "lora_A")?, adapter(l, "lora_B")?))) {
                Some((a, b)) => tch::no_grad(|| {
                    let delta = b.to_kind(Kind::Float).matmul(&a.to_kind(Kind::Float)) * config.scale();
                    (w.to_kind(Kind::Float) + delta).to_kind(w.kind())
                }),
                None => w.shallow_clone(),
            };
            (name.clone(), merged)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_match_whole_names_or_dotted_tails() {
        let config = LoraConfig {
            rank: 2,
            alpha: 4.0,
            dropout: 0.0,
            targets: [LoraConfig::default_targets(), vec!["fc1".into(), "multi_modal_projector.*".into()]].concat(),
            trained: vec![],
        };
        assert!(config.targets("language_model.model.layers.3.self_attn.q_proj"));
        assert!(config.targets("language_model.model.layers.12.mlp.down_proj"));
        assert!(!config.targets("vision_tower.vision_model.encoder.layers.0.self_attn.q_proj"));
        assert!(config.targets("vision_tower.vision_model.encoder.layers.0.mlp.fc1"));
        assert!(!config.targets("vision_tower.vision_model.encoder.layers.0.mlp.fc11"));
        assert!(config.targets("multi_modal_projector.linear"));
        assert_eq!(config.scale(), 2.0);
    }

    #[test]
    fn peft_names_are_transformers_5_names_under_base_model() {
        assert_eq!(
            peft_name("language_model.model.layers.0.self_attn.q_proj.lora_A.weight"),
            "base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight"
        );
        assert_eq!(
            peft_name("multi_modal_projector.linear.bias"),
            "base_model.model.model.multi_modal_projector.linear.bias"
        );
        assert_eq!(
            peft_name("vision_tower.vision_model.encoder.layers.1.mlp.fc1.lora_B.weight"),
            "base_model.model.model.vision_tower.vision_model.encoder.layers.1.mlp.fc1.lora_B.weight"
        );
    }
}
