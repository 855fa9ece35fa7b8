//! Test helpers the converters' tests share: scratch folders, the fixtures and a convert that
//! reads its output back.

use std::path::{Path, PathBuf};

use super::{convert, ConvertArgs, ConvertSummary, Format};
use crate::source::{read_jsonl, Record};

/// A scratch folder under the system temp dir, removed when dropped.
pub(super) struct TempDir(pub(super) PathBuf);

impl TempDir {
    pub(super) fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("pg2-convert-{}-{name}", std::process::id()));
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

pub(super) fn fixture(format: Format) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/convert").join(format.name())
}

pub(super) fn args(format: Format, inputs: &[&str], images: &str, output: &Path) -> ConvertArgs {
    let dir = fixture(format);
    ConvertArgs {
        format,
        inputs: inputs.iter().map(|i| dir.join(i)).collect(),
        images: dir.join(images),
        output: output.to_path_buf(),
        split: None,
        skip_missing: false,
        mask_vae: None,
        pad_to_square: false,
    }
}

/// Converts and reads the output back with the JSONL reader training uses.
pub(super) fn convert_and_read(args: &ConvertArgs) -> Vec<Record> {
    let summary = convert(args).unwrap();
    let records = read_jsonl(&args.output).unwrap();
    assert_eq!(summary, ConvertSummary { records: records.len(), skipped_records: 0, missing_images: vec![] });
    records
}

/// The record's image is the fixture file `rel` (reached through a relative path).
pub(super) fn assert_image(record: &Record, format: Format, rel: &str) {
    let line = std::fs::read_to_string(&record.file).unwrap();
    assert!(!line.contains("\"image\":\"/"), "image paths are relative: {line}");
    assert_eq!(record.image.path().unwrap().canonicalize().unwrap(), fixture(format).join(rel).canonicalize().unwrap());
}

pub(super) fn texts(record: &Record) -> (&str, Option<&str>) {
    (record.prefix.as_str(), record.suffix.as_deref())
}

/// Whether `dir` holds no temporary file (a conversion's output before its rename).
pub(super) fn no_temporary(dir: &Path) -> bool {
    std::fs::read_dir(dir).unwrap().all(|e| !e.unwrap().file_name().to_string_lossy().contains(".tmp"))
}
