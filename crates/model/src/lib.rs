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
pub mod nn;
pub mod paligemma;
pub mod recompute;
pub mod siglip;

pub use autocast::autocast;
pub use config::{Gemma2Config, PaliGemmaConfig, SiglipVisionConfig};
pub use decode::{generate, DecodeOptions};
pub use gemma2::{KvCache, RunOptions, TokenLayout};
pub use nn::Weights;
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

/// A device by name: `cpu`, `cuda`, `cuda:N`, or `auto` (the first GPU if there is one).
pub fn parse_device(name: &str) -> Result<tch::Device, ModelError> {
    Ok(match name {
        "auto" => tch::Device::cuda_if_available(),
        "cpu" => tch::Device::Cpu,
        "cuda" => tch::Device::Cuda(0),
        other => match other.strip_prefix("cuda:").and_then(|n| n.parse().ok()) {
            Some(n) => tch::Device::Cuda(n),
            None => return Err(ModelError::Invalid(format!("device {other:?}: expected cpu, cuda, cuda:N or auto"))),
        },
    })
}

/// glibc's settings that keep freed memory in the process for reuse: no `mmap` for large
/// blocks, no returning the heap's top to the system (the value is the largest `mallopt`
/// takes). They act on the main thread's arena, where pg2 computes; a worker thread's own
/// arena still gives a wholly freed heap back. As environment variables they tune a
/// process at its start, such as a baseline.
pub const KEEP_FREED_MEMORY_ENV: [(&str, &str); 2] = [("MALLOC_MMAP_MAX_", "0"), ("MALLOC_TRIM_THRESHOLD_", "2147483647")];

/// True when the user has set any of [`KEEP_FREED_MEMORY_ENV`]'s variables: then their
/// settings, not pg2's, hold for this process and the processes it starts.
pub fn user_tunes_allocator() -> bool {
    KEEP_FREED_MEMORY_ENV.iter().any(|(name, _)| std::env::var_os(name).is_some())
}

/// Applies [`KEEP_FREED_MEMORY_ENV`] to this process when it computes on the CPU (`device`),
/// unless either variable is set (the user's choice wins); does nothing off glibc.
///
/// libtorch frees and allocates tensors of the same sizes in every step. By default glibc
/// serves each large one with a fresh `mmap` and unmaps it when freed, so every step
/// page-faults its activations in zeroed again: 20-40 % of a CPU step on this project's
/// benchmarks. Kept memory costs a higher peak resident size (freed blocks stay, with some
/// fragmentation). With a GPU the host's large blocks are mostly checkpoint tensors on
/// their way to the device, which should go back to the system: nothing changes there.
pub fn keep_freed_memory(device: tch::Device) {
    if device != tch::Device::Cpu || user_tunes_allocator() {
        return;
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        extern "C" {
            fn mallopt(param: std::ffi::c_int, value: std::ffi::c_int) -> std::ffi::c_int;
        }
        // <malloc.h>'s M_MMAP_MAX and M_TRIM_THRESHOLD.
        const M_MMAP_MAX: std::ffi::c_int = -4;
        const M_TRIM_THRESHOLD: std::ffi::c_int = -1;
        // SAFETY: mallopt only changes the allocator's thresholds; a failure (0) leaves the defaults.
        unsafe {
            mallopt(M_MMAP_MAX, 0);
            mallopt(M_TRIM_THRESHOLD, i32::MAX);
        }
    }
}

