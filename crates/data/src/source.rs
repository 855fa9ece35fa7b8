//! JSONL data files: one record a line,
//! `{"image": "path relative to the file", "prefix": "...", "suffix": "..."}`.
//! Other fields (`id`, `references`, `answers`, ...) are kept for evaluation.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::DataError;

/// One example of a JSONL file.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    /// The image, resolved against the JSONL file's folder.
    pub image: PathBuf,
    pub prefix: String,
    /// The target text; absent for prediction-only data.
    pub suffix: Option<String>,
    /// Every other field of the line.
    pub extra: Map<String, Value>,
    /// Where the record came from, for error messages.
    pub file: PathBuf,
    /// 1-based line number in `file`.
    pub line: usize,
}

impl Record {
    /// An error about this record, naming its file and line.
    pub fn error(&self, msg: impl Into<String>) -> DataError {
        DataError::Record { path: self.file.display().to_string(), line: self.line, msg: msg.into() }
    }

    /// Decodes the record's image.
    pub fn load_image(&self) -> Result<image::RgbImage, DataError> {
        crate::image::load_rgb(&self.image).map_err(|msg| self.error(msg))
    }
}

/// Reads every record of a JSONL file; blank lines are skipped.
pub fn read_jsonl(path: &Path) -> Result<Vec<Record>, DataError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| DataError::File { path: path.display().to_string(), msg: e.to_string() })?;
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut records = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let err = |msg: String| DataError::Record { path: path.display().to_string(), line: i + 1, msg };
        let mut fields = match serde_json::from_str::<Value>(line) {
            Ok(Value::Object(map)) => map,
            Ok(_) => return Err(err("expected a JSON object".into())),
            Err(e) => return Err(err(format!("invalid JSON: {e}"))),
        };
        let mut text_field = |key: &str, required: bool| match fields.remove(key) {
            Some(Value::String(s)) => Ok(Some(s)),
            None | Some(Value::Null) if !required => Ok(None),
            None | Some(Value::Null) => Err(err(format!("record has no `{key}`"))),
            Some(other) => Err(err(format!("`{key}` must be a string, found {other}"))),
        };
        let image = text_field("image", true)?.unwrap();
        let prefix = text_field("prefix", true)?.unwrap();
        let suffix = text_field("suffix", false)?;
        records.push(Record { image: dir.join(image), prefix, suffix, extra: fields, file: path.to_path_buf(), line: i + 1 });
    }
    Ok(records)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(name: &str, text: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("pg2-source-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("data.jsonl");
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn records_resolve_images_and_keep_extra_fields() {
        let path = write("ok", "{\"image\": \"a.png\", \"prefix\": \"caption en\", \"suffix\": \"a cat\", \"id\": 7}\n\n{\"image\": \"b/c.jpg\", \"prefix\": \"ocr\"}\n");
        let records = read_jsonl(&path).unwrap();
        assert_eq!(records.len(), 2);
        assert_eq!(records[0].image, path.parent().unwrap().join("a.png"));
        assert_eq!(records[0].suffix.as_deref(), Some("a cat"));
        assert_eq!(records[0].extra["id"], 7);
        assert_eq!((records[1].line, records[1].suffix.clone()), (3, None));
    }

    #[test]
    fn bad_lines_name_file_and_line() {
        let path = write("bad", "{\"image\": \"a.png\", \"prefix\": \"x\"}\n{\"image\": \"a.png\"}\n");
        let err = read_jsonl(&path).unwrap_err().to_string();
        assert!(err.ends_with("data.jsonl:2: record has no `prefix`"), "{err}");
        let path = write("json", "{\"image\": \"a.png\", \"prefix\": \"x\"\n");
        assert!(read_jsonl(&path).unwrap_err().to_string().contains("data.jsonl:1: invalid JSON"));
        let path = write("type", "{\"image\": 3, \"prefix\": \"x\"}\n");
        assert!(read_jsonl(&path).unwrap_err().to_string().contains("`image` must be a string"));
    }

    #[test]
    fn missing_and_corrupt_images_name_the_record() {
        let path = write("img", "{\"image\": \"missing.png\", \"prefix\": \"x\"}\n{\"image\": \"broken.png\", \"prefix\": \"x\"}\n");
        std::fs::write(path.parent().unwrap().join("broken.png"), b"not a png").unwrap();
        let records = read_jsonl(&path).unwrap();
        let err = records[0].load_image().unwrap_err().to_string();
        assert!(err.contains("data.jsonl:1:") && err.contains("missing.png"), "{err}");
        let err = records[1].load_image().unwrap_err().to_string();
        assert!(err.contains("data.jsonl:2:") && err.contains("broken.png"), "{err}");
    }
}
