//! pg2's data: tokenizer, the PaliGemma input layout, image preprocessing and JSONL
//! sources, turned into model inputs.

pub mod image;
pub mod layout;
pub mod source;
pub mod tokenizer;

pub use layout::{Batch, EncodedExample};
pub use source::Record;
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
