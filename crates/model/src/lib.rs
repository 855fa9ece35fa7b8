//! pg2's models: the SigLIP vision tower, the Gemma 2 decoder and PaliGemma 2 built from
//! them, Hugging Face checkpoint I/O, and decoding.
//!
//! Numerics follow transformers (the reference pg2 is tested against, see
//! `tests/fixtures/make_paligemma_fixtures.py`); the attention mask and the absence of a
//! sliding window follow big_vision, which trained the released weights.

pub mod autocast;
pub mod checkpoint;
pub mod config;
pub mod decode;
pub mod gemma2;
pub mod int8;
pub mod layer_params;
pub mod lora;
pub mod nn;
pub mod paligemma;
pub mod recompute;
pub mod siglip;
pub mod vqvae;

pub use autocast::autocast;
pub use checkpoint::Part;
pub use config::{Gemma2Config, PaliGemmaConfig, SiglipVisionConfig};
pub use decode::{generate, DecodeOptions};
pub use gemma2::{KvCache, RunOptions, TokenLayout};
pub use layer_params::{Layer, LayerParams};
pub use lora::{BaseDtype, Lora, LoraConfig};
pub use nn::{Param, ParamKind, Weights};
pub use paligemma::{Inputs, PaliGemma, Targets};

use std::path::Path;

/// Errors from reading, building or running a model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A config.json key is missing, malformed or unsupported.
    #[error("{file}: `{key}`: {msg}")]
    Config { file: String, key: String, msg: String },
    /// Checkpoint tensors do not fit the config.
    #[error("{0}")]
    Checkpoint(String),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },
    /// Inputs or arguments that cannot work.
    #[error("{0}")]
    Invalid(String),
}

impl ModelError {
    fn config(file: &str, key: &str, msg: impl Into<String>) -> Self {
        Self::Config { file: file.to_string(), key: key.to_string(), msg: msg.into() }
    }

    fn io(path: &Path, source: std::io::Error) -> Self {
        Self::Io { path: path.display().to_string(), source }
    }
}
