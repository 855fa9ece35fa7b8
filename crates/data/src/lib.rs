//! pg2's data: tokenizer, the PaliGemma input layout, image preprocessing, JSONL sources,
//! WebDataset tar shards and parquet files, converters from public formats, weighted resumable mixtures, the prefetching input
//! pipeline and the embedded synthetic dataset.

pub mod convert;
pub mod files;
pub mod image;
pub mod layout;
pub mod mixture;
pub mod parquet;
pub mod pipeline;
pub mod source;
pub mod stream;
pub mod synth;
pub mod tokenizer;
pub mod webdataset;

pub use image::Resize;
pub use layout::{Batch, EncodedExample, InferenceBatch, TextLimits, Truncation};
pub use mixture::{Deal, Mixture, MixturePosition, MixtureSource, RunLength, SourceData, StreamSource, TaskFormat};
pub use pipeline::{LoadedBatch, OnBadRecord, Pipeline, PipelineConfig};
pub use source::{ImageData, OnBadLine, Record};
pub use tokenizer::PgTokenizer;

/// Errors from reading or preparing data; each names the file (and line) at fault.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// A file could not be opened or read.
    #[error("{path}: {msg}")]
    File { path: String, msg: String },
    /// A record of a JSONL file is malformed or points at a bad image.
    #[error("{path}:{line}: {msg}")]
    Record { path: String, line: usize, msg: String },
    /// The tokenizer lacks something PaliGemma needs.
    #[error("tokenizer {path}: {msg}")]
    Tokenizer { path: String, msg: String },
}
