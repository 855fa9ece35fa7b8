//! Model configuration, read from a Hugging Face `config.json`.
//!
//! Every key of the file is either used, checked against the only value pg2
//! supports, or listed in [`METADATA_KEYS`] as not affecting the numerics.
//! Anything else is an error naming the key, so a checkpoint whose
//! architecture pg2 does not implement is never silently run as something else.
//! Missing keys take the defaults of transformers' config classes, which the
//! released PaliGemma 2 checkpoints rely on.

use serde_json::{Map, Value};
use std::path::Path;

use crate::ModelError;

/// Keys that describe a checkpoint but do not change what the model computes.
pub const METADATA_KEYS: &[&str] = &[
    "_name_or_path",
    "_vocab_size",
    "architectures",
    "bos_token_id",
    "cache_implementation",
    "chunk_size_feed_forward",
    "dtype",
    "eos_token_id",
    "id2label",
    "initializer_range",
    "is_encoder_decoder",
    "label2id",
    "max_position_embeddings",
    "output_attentions",
    "output_hidden_states",
    "pad_token_id",
    "problem_type",
    "return_dict",
    "torch_dtype",
    "transformers_version",
    "use_cache",
];

/// The Gemma 2 decoder (transformers' `Gemma2Config`).
#[derive(Debug, Clone, PartialEq)]
pub struct Gemma2Config {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    /// Attention scores are scaled by `query_pre_attn_scalar^-0.5` (144 for 27B, not head_dim).
    pub query_pre_attn_scalar: f64,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    /// `tanh(x/c)*c` on attention logits before the mask; `None` when absent or null.
    pub attn_logit_softcapping: Option<f64>,
    /// `tanh(x/c)*c` on the output logits.
    pub final_logit_softcapping: Option<f64>,
    /// Local attention window of the layers marked `sliding_attention`. Only applied when
    /// [`crate::RunOptions::sliding_window`] asks for it: big_vision, which trained the
    /// released weights, attends globally on every layer.
    pub sliding_window: Option<usize>,
    /// Per layer: does transformers give it the sliding window?
    pub sliding_layers: Vec<bool>,
}

/// The SigLIP vision tower (transformers' `SiglipVisionConfig`), without pooling head.
#[derive(Debug, Clone, PartialEq)]
pub struct SiglipVisionConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub image_size: usize,
    pub patch_size: usize,
    pub layer_norm_eps: f64,
}

impl SiglipVisionConfig {
    /// Patches per side of the image.
    pub fn grid(&self) -> usize {
        self.image_size / self.patch_size
    }
    /// Number of image tokens the tower emits (256 at 224 px with /14 patches).
    pub fn num_patches(&self) -> usize {
        self.grid() * self.grid()
    }
}

/// A PaliGemma (2) model: vision tower, projector and Gemma 2 decoder.
#[derive(Debug, Clone, PartialEq)]
pub struct PaliGemmaConfig {
    pub text: Gemma2Config,
    pub vision: SiglipVisionConfig,
    /// Token id of `<image>` placeholders (257152 in the released tokenizer, one past the
    /// language model's vocabulary).
    pub image_token_id: i64,
    /// Whether the output projection shares the token embedding.
    pub tie_word_embeddings: bool,
}

/// Reads keys out of one JSON object, remembering which ones were consumed.
struct Keys<'a> {
    file: &'a str,
    section: &'a str,
    map: Map<String, Value>,
}

impl<'a> Keys<'a> {
    fn new(file: &'a str, section: &'a str, value: Value) -> Result<Self, ModelError> {
        match value {
            Value::Object(map) => Ok(Self { file, section, map }),
            other => Err(ModelError::config(file, section, format!("expected an object, found {other}"))),
        }
    }

    fn path(&self, key: &str) -> String {
        if self.section.is_empty() {
            key.to_string()
        } else {
            format!("{}.{key}", self.section)
        }
    }

    fn err(&self, key: &str, msg: impl Into<String>) -> ModelError {
        ModelError::config(self.file, &self.path(key), msg)
    }

    /// Removes `key`; JSON `null` counts as absent.
    fn take(&mut self, key: &str) -> Option<Value> {
        self.map.remove(key).filter(|v| !v.is_null())
    }

    fn usize(&mut self, key: &str, default: usize) -> Result<usize, ModelError> {
        match self.take(key) {
            None => Ok(default),
            Some(v) => v
                .as_u64()
                .filter(|&n| n > 0)
                .map(|n| n as usize)
                .ok_or_else(|| self.err(key, format!("expected a positive integer, found {v}"))),
        }
    }

    fn f64(&mut self, key: &str, default: f64) -> Result<f64, ModelError> {
        self.opt_f64(key).map(|v| v.unwrap_or(default))
    }

    fn opt_f64(&mut self, key: &str) -> Result<Option<f64>, ModelError> {
        match self.take(key) {
            None => Ok(None),
            Some(v) => v.as_f64().map(Some).ok_or_else(|| self.err(key, format!("expected a number, found {v}"))),
        }
    }

    fn bool(&mut self, key: &str, default: bool) -> Result<bool, ModelError> {
        match self.take(key) {
            None => Ok(default),
            Some(v) => v.as_bool().ok_or_else(|| self.err(key, format!("expected true or false, found {v}"))),
        }
    }

    /// A key pg2 reads only to check it holds the one value it implements.
    fn require(&mut self, key: &str, supported: &[Value]) -> Result<(), ModelError> {
        match self.take(key) {
            Some(v) if !supported.contains(&v) => {
                let want: Vec<String> = supported.iter().map(Value::to_string).collect();
                Err(self.err(key, format!("pg2 implements only {}, found {v}", want.join(" or "))))
            }
            _ => Ok(()),
        }
    }

    /// Errors on any key neither consumed nor listed as metadata.
    fn finish(mut self) -> Result<(), ModelError> {
        for key in METADATA_KEYS {
            self.map.remove(*key);
        }
        match self.map.keys().next() {
            None => Ok(()),
            Some(key) => {
                Err(self.err(key, "unknown key: pg2 does not implement it (see METADATA_KEYS for the ignored ones)"))
            }
        }
    }
}

fn string(s: &str) -> Value {
    Value::String(s.to_string())
}

impl Gemma2Config {
    fn from_keys(mut k: Keys) -> Result<Self, ModelError> {
        k.require("model_type", &[string("gemma2")])?;
        k.require("hidden_activation", &[string("gelu_pytorch_tanh")])?;
        k.require("hidden_act", &[string("gelu_pytorch_tanh")])?;
        k.require("attention_bias", &[Value::Bool(false)])?;
        k.require("attention_dropout", &[0.into(), 0.0.into()])?;
        // PaliGemma's prefix is bidirectional by construction; the flag only tells
        // transformers' fused kernels not to assume a causal mask.
        k.require("use_bidirectional_attention", &[Value::Bool(true)])?;
        // Both pad the vocabulary (257216 in released text configs): the embedding's shape rules.
        let vocab_size = k.usize("vocab_size", 256_000)?;
        let hidden_size = k.usize("hidden_size", 2304)?;
        let num_hidden_layers = k.usize("num_hidden_layers", 26)?;
        let num_attention_heads = k.usize("num_attention_heads", 8)?;
        let num_key_value_heads = k.usize("num_key_value_heads", 4)?;
        if !num_attention_heads.is_multiple_of(num_key_value_heads) {
            return Err(k.err(
                "num_key_value_heads",
                format!("{num_key_value_heads} does not divide num_attention_heads = {num_attention_heads}"),
            ));
        }
        let head_dim = k.usize("head_dim", 256)?;
        if !head_dim.is_multiple_of(2) {
            return Err(k.err("head_dim", "must be even for rotary embeddings"));
        }
        let rope_theta = Self::rope_theta(&mut k)?;
        let sliding_window = match k.take("sliding_window") {
            None => None,
            Some(v) => Some(
                v.as_u64().filter(|&n| n > 0).ok_or_else(|| k.err("sliding_window", "expected a positive integer"))?
                    as usize,
            ),
        };
        let sliding_layers = match k.take("layer_types") {
            // transformers' default: layers 0, 2, 4, ... use the window.
            None => (0..num_hidden_layers).map(|i| i % 2 == 0).collect(),
            Some(Value::Array(types)) if types.len() == num_hidden_layers => types
                .iter()
                .map(|t| match t.as_str() {
                    Some("sliding_attention") => Ok(true),
                    Some("full_attention") => Ok(false),
                    _ => Err(k.err("layer_types", format!("unknown layer type {t}"))),
                })
                .collect::<Result<_, _>>()?,
            Some(v) => return Err(k.err("layer_types", format!("expected {num_hidden_layers} layer types, found {v}"))),
        };
        let cfg = Self {
            vocab_size,
            hidden_size,
            intermediate_size: k.usize("intermediate_size", 9216)?,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            query_pre_attn_scalar: k.f64("query_pre_attn_scalar", 256.0)?,
            rms_norm_eps: k.f64("rms_norm_eps", 1e-6)?,
            rope_theta,
            attn_logit_softcapping: k.opt_f64("attn_logit_softcapping")?,
            final_logit_softcapping: k.opt_f64("final_logit_softcapping")?,
            sliding_window,
            sliding_layers,
        };
        // Text configs nested in PaliGemma configs carry the image token count; check it below.
        k.take("num_image_tokens");
        k.require("tie_word_embeddings", &[Value::Bool(true), Value::Bool(false)])?;
        k.finish()?;
        Ok(cfg)
    }

    /// Older configs write `rope_theta`; transformers 5 writes `rope_parameters`.
    fn rope_theta(k: &mut Keys) -> Result<f64, ModelError> {
        let flat = k.opt_f64("rope_theta")?;
        let nested = match k.take("rope_parameters") {
            None => None,
            Some(v) => {
                let section = k.path("rope_parameters");
                let mut rope = Keys::new(k.file, &section, v)?;
                rope.require("rope_type", &[string("default")])?;
                let theta = rope.opt_f64("rope_theta")?;
                rope.finish()?;
                theta
            }
        };
        match (flat, nested) {
            (Some(a), Some(b)) if a != b => {
                Err(k.err("rope_theta", format!("{a} disagrees with rope_parameters.rope_theta = {b}")))
            }
            (a, b) => Ok(a.or(b).unwrap_or(10_000.0)),
        }
    }
}

impl SiglipVisionConfig {
    fn from_keys(mut k: Keys) -> Result<(Self, Option<usize>), ModelError> {
        k.require("model_type", &[string("siglip_vision_model")])?;
        k.require("hidden_act", &[string("gelu_pytorch_tanh")])?;
        k.require("vision_use_head", &[Value::Bool(false)])?;
        k.require("num_channels", &[3.into()])?;
        k.require("attention_dropout", &[0.into(), 0.0.into()])?;
        let cfg = Self {
            hidden_size: k.usize("hidden_size", 768)?,
            intermediate_size: k.usize("intermediate_size", 3072)?,
            num_hidden_layers: k.usize("num_hidden_layers", 12)?,
            num_attention_heads: k.usize("num_attention_heads", 12)?,
            image_size: k.usize("image_size", 224)?,
            patch_size: k.usize("patch_size", 16)?,
            layer_norm_eps: k.f64("layer_norm_eps", 1e-6)?,
        };
        if !cfg.image_size.is_multiple_of(cfg.patch_size) {
            return Err(
                k.err("image_size", format!("{} is not a multiple of patch_size {}", cfg.image_size, cfg.patch_size))
            );
        }
        if !cfg.hidden_size.is_multiple_of(cfg.num_attention_heads) {
            return Err(k.err("num_attention_heads", "does not divide hidden_size"));
        }
        for key in ["num_image_tokens", "num_positions"] {
            if let Some(n) = k.take(key) {
                if n.as_u64() != Some(cfg.num_patches() as u64) {
                    return Err(
                        k.err(key, format!("{n} disagrees with (image_size/patch_size)^2 = {}", cfg.num_patches()))
                    );
                }
            }
        }
        let projection_dim = k.take("projection_dim").and_then(|v| v.as_u64()).map(|v| v as usize);
        k.finish()?;
        Ok((cfg, projection_dim))
    }
}

impl PaliGemmaConfig {
    /// Reads `DIR/config.json` (or the given file).
    pub fn from_file(path: &Path) -> Result<Self, ModelError> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
        let value: Value = serde_json::from_str(&text)
            .map_err(|e| ModelError::config(&path.display().to_string(), "", format!("invalid JSON: {e}")))?;
        Self::from_json(&path.display().to_string(), value)
    }

    /// Parses a PaliGemma `config.json` already read as JSON; `file` names it in errors.
    pub fn from_json(file: &str, value: Value) -> Result<Self, ModelError> {
        let mut k = Keys::new(file, "", value)?;
        k.require("model_type", &[string("paligemma")])?;
        let text_value = k.take("text_config").ok_or_else(|| k.err("text_config", "missing"))?;
        let text = Gemma2Config::from_keys(Keys::new(file, "text_config", text_value.clone())?)?;
        let vision_value = k.take("vision_config").ok_or_else(|| k.err("vision_config", "missing"))?;
        let (vision, vision_projection) =
            SiglipVisionConfig::from_keys(Keys::new(file, "vision_config", vision_value)?)?;
        if let Some(n) = text_value.get("num_image_tokens").filter(|v| !v.is_null()) {
            if n.as_u64() != Some(vision.num_patches() as u64) {
                return Err(ModelError::config(
                    file,
                    "text_config.num_image_tokens",
                    format!("{n} disagrees with the vision grid ({})", vision.num_patches()),
                ));
            }
        }
        let projection_dim = k.usize("projection_dim", text.hidden_size)?;
        for (key, dim) in
            [("projection_dim", Some(projection_dim)), ("vision_config.projection_dim", vision_projection)]
        {
            if dim.is_some_and(|d| d != text.hidden_size) {
                return Err(
                    k.err(key, format!("{} must equal text_config.hidden_size = {}", dim.unwrap(), text.hidden_size))
                );
            }
        }
        let image_token_id = match (k.take("image_token_index"), k.take("image_token_id")) {
            (Some(v), _) | (None, Some(v)) => {
                v.as_i64().ok_or_else(|| k.err("image_token_index", "expected an integer"))?
            }
            (None, None) => 256_000,
        };
        let tie_word_embeddings = k.bool("tie_word_embeddings", true)?;
        // Legacy top-level copies from PaliGemma 1 that transformers no longer reads
        // (the released 3B config says hidden_size 2048 for a 2304-wide decoder).
        for legacy in ["hidden_size", "vocab_size", "num_hidden_layers"] {
            k.take(legacy);
        }
        k.finish()?;
        Ok(Self { text, vision, image_token_id, tie_word_embeddings })
    }

    /// The number of parameters of each part (vision tower, projector, decoder) the model
    /// of this config takes, counted from the shapes without building it.
    pub fn parameter_counts(&self) -> [(crate::Part, i64); 3] {
        let (v, t) = (&self.vision, &self.text);
        let linear = |i: usize, o: usize, bias: bool| (i * o + if bias { o } else { 0 }) as i64;
        let (dv, patch) = (v.hidden_size, v.patch_size);
        let [vision_layer, decoder_layer] = self.layer_sizes();
        let vision = linear(3 * patch * patch, dv, true)
            + (v.num_patches() * dv) as i64
            + v.num_hidden_layers as i64 * vision_layer
            + 2 * dv as i64;
        let d = t.hidden_size;
        let embedding = (t.vocab_size * d) as i64;
        let head = if self.tie_word_embeddings { 0 } else { embedding };
        let decoder = embedding + head + t.num_hidden_layers as i64 * decoder_layer + d as i64;
        [(crate::Part::Vision, vision), (crate::Part::Projector, linear(dv, d, true)), (crate::Part::Decoder, decoder)]
    }

    /// The parameters of one vision encoder layer and of one decoder layer.
    pub fn layer_sizes(&self) -> [i64; 2] {
        let (v, t) = (&self.vision, &self.text);
        let linear = |i: usize, o: usize, bias: bool| (i * o + if bias { o } else { 0 }) as i64;
        let dv = v.hidden_size;
        let vision_layer = 4 * linear(dv, dv, true)
            + linear(dv, v.intermediate_size, true)
            + linear(v.intermediate_size, dv, true)
            + 4 * dv as i64;
        let (d, hd) = (t.hidden_size, t.head_dim);
        let decoder_layer = linear(d, t.num_attention_heads * hd, false)
            + 2 * linear(d, t.num_key_value_heads * hd, false)
            + linear(t.num_attention_heads * hd, d, false)
            + 3 * linear(d, t.intermediate_size, false)
            + 4 * d as i64;
        [vision_layer, decoder_layer]
    }

    /// Every linear layer of the model as `(canonical name without .weight, in, out)`, in
    /// the order the model takes them: what LoRA targets match, counted without building it.
    pub fn linear_layers(&self) -> Vec<(String, usize, usize)> {
        use crate::checkpoint::{PROJECTOR, TEXT, VISION};
        let (v, t) = (&self.vision, &self.text);
        let (dv, d, q) = (v.hidden_size, t.hidden_size, t.num_attention_heads * t.head_dim);
        let kv = t.num_key_value_heads * t.head_dim;
        let vision = (0..v.num_hidden_layers).flat_map(|i| {
            let p = format!("{VISION}.encoder.layers.{i}");
            let attn = ["q_proj", "k_proj", "v_proj", "out_proj"].map(|n| (format!("{p}.self_attn.{n}"), dv, dv));
            let mlp =
                [(format!("{p}.mlp.fc1"), dv, v.intermediate_size), (format!("{p}.mlp.fc2"), v.intermediate_size, dv)];
            attn.into_iter().chain(mlp)
        });
        let decoder = (0..t.num_hidden_layers).flat_map(|i| {
            let p = format!("{TEXT}.layers.{i}");
            let m = t.intermediate_size;
            [
                (format!("{p}.self_attn.q_proj"), d, q),
                (format!("{p}.self_attn.k_proj"), d, kv),
                (format!("{p}.self_attn.v_proj"), d, kv),
                (format!("{p}.self_attn.o_proj"), q, d),
                (format!("{p}.mlp.gate_proj"), d, m),
                (format!("{p}.mlp.up_proj"), d, m),
                (format!("{p}.mlp.down_proj"), m, d),
            ]
        });
        vision.chain([(PROJECTOR.to_string(), dv, d)]).chain(decoder).collect()
    }

    /// Writes the config as transformers writes a PaliGemma 2 `config.json`.
    pub fn to_json(&self) -> Value {
        let t = &self.text;
        let v = &self.vision;
        let layer_types: Vec<&str> =
            t.sliding_layers.iter().map(|&s| if s { "sliding_attention" } else { "full_attention" }).collect();
        serde_json::json!({
            "architectures": ["PaliGemmaForConditionalGeneration"],
            "model_type": "paligemma",
            "image_token_index": self.image_token_id,
            "projection_dim": t.hidden_size,
            "tie_word_embeddings": self.tie_word_embeddings,
            "text_config": {
                "model_type": "gemma2",
                "vocab_size": t.vocab_size,
                "hidden_size": t.hidden_size,
                "intermediate_size": t.intermediate_size,
                "num_hidden_layers": t.num_hidden_layers,
                "num_attention_heads": t.num_attention_heads,
                "num_key_value_heads": t.num_key_value_heads,
                "head_dim": t.head_dim,
                // An integer where it is one (all released values are): transformers 5 types it so.
                "query_pre_attn_scalar": match t.query_pre_attn_scalar {
                    q if q.fract() == 0.0 => serde_json::json!(q as i64),
                    q => serde_json::json!(q),
                },
                "rms_norm_eps": t.rms_norm_eps,
                "rope_parameters": {"rope_type": "default", "rope_theta": t.rope_theta},
                "attn_logit_softcapping": t.attn_logit_softcapping,
                "final_logit_softcapping": t.final_logit_softcapping,
                "sliding_window": t.sliding_window,
                "layer_types": layer_types,
                "hidden_activation": "gelu_pytorch_tanh",
                "num_image_tokens": v.num_patches(),
            },
            "vision_config": {
                "model_type": "siglip_vision_model",
                "hidden_size": v.hidden_size,
                "intermediate_size": v.intermediate_size,
                "num_hidden_layers": v.num_hidden_layers,
                "num_attention_heads": v.num_attention_heads,
                "image_size": v.image_size,
                "patch_size": v.patch_size,
                "layer_norm_eps": v.layer_norm_eps,
                "projection_dim": t.hidden_size,
                "vision_use_head": false,
                "num_image_tokens": v.num_patches(),
            },
        })
    }

    /// A tiny PaliGemma 2 for CPU runs on the embedded demo data: the same architecture
    /// (GQA, soft-caps, pre/post norms) at a few hundred thousand parameters; 8x8 patches.
    pub fn tiny(vocab_size: usize, image_token_id: i64, resolution: usize) -> Result<Self, ModelError> {
        if resolution == 0 || !resolution.is_multiple_of(8) {
            return Err(ModelError::Invalid(format!(
                "the tiny model needs a positive resolution divisible by its 8-pixel patches, not {resolution}"
            )));
        }
        Ok(Self {
            text: Gemma2Config {
                vocab_size,
                hidden_size: 128,
                intermediate_size: 256,
                num_hidden_layers: 2,
                num_attention_heads: 4,
                num_key_value_heads: 2,
                head_dim: 32,
                query_pre_attn_scalar: 32.0,
                rms_norm_eps: 1e-6,
                rope_theta: 10_000.0,
                attn_logit_softcapping: Some(50.0),
                final_logit_softcapping: Some(30.0),
                // The released window: longer than any tiny sequence, and transformers needs
                // one for the layers marked `sliding_attention`.
                sliding_window: Some(4096),
                sliding_layers: vec![true, false],
            },
            vision: SiglipVisionConfig {
                hidden_size: 64,
                intermediate_size: 128,
                num_hidden_layers: 2,
                num_attention_heads: 2,
                image_size: resolution,
                patch_size: 8,
                layer_norm_eps: 1e-6,
            },
            image_token_id,
            tie_word_embeddings: true,
        })
    }

    /// The released PaliGemma 2 shapes: `size` is 3, 10 or 28 (billions), `resolution` 224, 448 or 896.
    pub fn paligemma2(size_b: u32, resolution: usize) -> Result<Self, ModelError> {
        let (hidden, layers, mlp, heads, kv, head_dim, qpas) = match size_b {
            3 => (2304, 26, 9216, 8, 4, 256, 256.0),
            10 => (3584, 42, 14336, 16, 8, 256, 256.0),
            28 => (4608, 46, 36864, 32, 16, 128, 144.0),
            other => return Err(ModelError::Invalid(format!("no PaliGemma 2 {other}B: choose 3, 10 or 28"))),
        };
        if ![224, 448, 896].contains(&resolution) {
            return Err(ModelError::Invalid(format!(
                "PaliGemma 2 was released at 224, 448 and 896 px, not {resolution}"
            )));
        }
        Ok(Self {
            text: Gemma2Config {
                vocab_size: 257_216,
                hidden_size: hidden,
                intermediate_size: mlp,
                num_hidden_layers: layers,
                num_attention_heads: heads,
                num_key_value_heads: kv,
                head_dim,
                query_pre_attn_scalar: qpas,
                rms_norm_eps: 1e-6,
                rope_theta: 10_000.0,
                attn_logit_softcapping: Some(50.0),
                final_logit_softcapping: Some(30.0),
                sliding_window: Some(4096),
                sliding_layers: (0..layers).map(|i| i % 2 == 0).collect(),
            },
            vision: SiglipVisionConfig {
                hidden_size: 1152,
                intermediate_size: 4304,
                num_hidden_layers: 27,
                num_attention_heads: 16,
                image_size: resolution,
                patch_size: 14,
                layer_norm_eps: 1e-6,
            },
            image_token_id: 257_152,
            tie_word_embeddings: true,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The keys of the released google/paligemma2-3b-pt-224 config.json.
    fn released_3b() -> Value {
        json!({
            "_vocab_size": 257152, "architectures": ["PaliGemmaForConditionalGeneration"],
            "bos_token_id": 2, "eos_token_id": 1, "hidden_size": 2048, "image_token_index": 257152,
            "model_type": "paligemma", "num_hidden_layers": 26, "pad_token_id": 0, "projection_dim": 2304,
            "text_config": {
                "architectures": ["Gemma2ForCausalLM"], "attn_logit_softcapping": 50.0,
                "cache_implementation": "hybrid", "eos_token_id": [1, 107], "final_logit_softcapping": 30.0,
                "hidden_act": "gelu_pytorch_tanh", "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 2304,
                "intermediate_size": 9216, "model_type": "gemma2", "num_attention_heads": 8,
                "num_hidden_layers": 26, "num_image_tokens": 256, "num_key_value_heads": 4,
                "query_pre_attn_scalar": 256, "sliding_window": 4096, "torch_dtype": "bfloat16", "vocab_size": 257216
            },
            "torch_dtype": "bfloat16", "transformers_version": "4.47.0.dev0",
            "vision_config": {
                "hidden_size": 1152, "intermediate_size": 4304, "model_type": "siglip_vision_model",
                "num_attention_heads": 16, "num_hidden_layers": 27, "num_image_tokens": 256, "num_positions": 256,
                "patch_size": 14, "projection_dim": 2304, "torch_dtype": "bfloat16", "vision_use_head": false
            }
        })
    }

    #[test]
    fn released_config_matches_preset() {
        let cfg = PaliGemmaConfig::from_json("config.json", released_3b()).unwrap();
        assert_eq!(cfg, PaliGemmaConfig::paligemma2(3, 224).unwrap());
    }

    #[test]
    fn written_config_reads_back() {
        for size in [3, 10, 28] {
            let cfg = PaliGemmaConfig::paligemma2(size, 448).unwrap();
            assert_eq!(PaliGemmaConfig::from_json("x", cfg.to_json()).unwrap(), cfg);
        }
    }

    /// What transformers 5 needs to load a pg2 checkpoint: an integer
    /// `query_pre_attn_scalar`, and a window for the layers marked `sliding_attention`.
    #[test]
    fn written_config_is_one_transformers_loads() {
        let mut cfg = PaliGemmaConfig::tiny(40, 39, 32).unwrap();
        let text = &cfg.to_json()["text_config"];
        assert!(text["query_pre_attn_scalar"].is_i64(), "{}", text["query_pre_attn_scalar"]);
        assert_eq!(text["sliding_window"], 4096);
        cfg.text.query_pre_attn_scalar = 40.5;
        assert_eq!(cfg.to_json()["text_config"]["query_pre_attn_scalar"], 40.5);
    }

    #[test]
    fn unknown_key_is_named() {
        let mut v = released_3b();
        v["text_config"]["use_qk_norm"] = json!(true);
        let err = PaliGemmaConfig::from_json("ckpt/config.json", v).unwrap_err().to_string();
        assert!(err.contains("ckpt/config.json") && err.contains("text_config.use_qk_norm"), "{err}");
    }

    #[test]
    fn unsupported_value_is_rejected() {
        let mut v = released_3b();
        v["vision_config"]["vision_use_head"] = json!(true);
        let err = PaliGemmaConfig::from_json("c", v).unwrap_err().to_string();
        assert!(err.contains("vision_config.vision_use_head"), "{err}");
        let mut v = released_3b();
        v["text_config"]["rope_parameters"] = json!({"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0});
        let err = PaliGemmaConfig::from_json("c", v).unwrap_err().to_string();
        assert!(err.contains("rope_type"), "{err}");
    }

    #[test]
    fn both_rope_forms_agree() {
        let mut v = released_3b();
        v["text_config"]["rope_parameters"] = json!({"rope_type": "default", "rope_theta": 500.0});
        assert_eq!(PaliGemmaConfig::from_json("c", v.clone()).unwrap().text.rope_theta, 500.0);
        v["text_config"]["rope_theta"] = json!(600.0);
        assert!(PaliGemmaConfig::from_json("c", v).is_err());
    }

    #[test]
    fn query_scale_of_27b_is_not_head_dim() {
        let cfg = PaliGemmaConfig::paligemma2(28, 224).unwrap();
        assert_eq!(cfg.text.head_dim, 128);
        assert_eq!(cfg.text.query_pre_attn_scalar, 144.0);
        assert_eq!(PaliGemmaConfig::paligemma2(3, 896).unwrap().vision.num_patches(), 4096);
    }
}
