//! JSONL data files: one record a line,
//! `{"image": "path relative to the file", "prefix": "...", "suffix": "..."}`.
//! Other fields (`id`, `references`, `answers`, ...) are kept for evaluation.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::{Map, Value};

use crate::DataError;

/// Where a record's image is.
#[derive(Debug, Clone, PartialEq)]
pub enum ImageData {
    /// A file (for JSONL records, resolved against the JSONL file's folder).
    File(PathBuf),
    /// A member `name` of a local tar shard, read when the image is loaded.
    Member { shard: PathBuf, name: String, offset: u64, len: u64 },
    /// The bytes of member `name` of a streamed (`pipe:`) shard.
    Bytes { name: String, data: Arc<Vec<u8>> },
}

impl ImageData {
    /// The file, for an image that is one.
    pub fn path(&self) -> Option<&Path> {
        match self {
            ImageData::File(path) => Some(path),
            _ => None,
        }
    }
}

/// One example: a line of a JSONL file, or a sample of a tar shard
/// ([`crate::webdataset`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    pub image: ImageData,
    pub prefix: String,
    /// The target text; absent for prediction-only data.
    pub suffix: Option<String>,
    /// Every other field of the line.
    pub extra: Map<String, Value>,
    /// Where the record came from, for error messages.
    pub file: PathBuf,
    /// 1-based line number in `file` (for a tar shard, the sample's index).
    pub line: usize,
}

impl Record {
    /// An error about this record, naming its file and line.
    pub fn error(&self, msg: impl Into<String>) -> DataError {
        DataError::Record { path: self.file.display().to_string(), line: self.line, msg: msg.into() }
    }

    /// Decodes the record's image.
    pub fn load_image(&self) -> Result<image::RgbImage, DataError> {
        match &self.image {
            ImageData::File(path) => crate::image::load_rgb(path).map_err(|msg| self.error(msg)),
            ImageData::Member { shard, name, offset, len } => {
                let data = crate::webdataset::read_member(shard, *offset, *len)
                    .map_err(|e| self.error(format!("reading {name} back from the shard: {e}")))?;
                crate::image::decode_rgb(&data).map_err(|msg| self.error(format!("{name}: {msg}")))
            }
            ImageData::Bytes { name, data } => {
                crate::image::decode_rgb(data).map_err(|msg| self.error(format!("{name}: {msg}")))
            }
        }
    }
}

/// Reads every record of a JSONL file; blank lines are skipped, any bad line is an error.
pub fn read_jsonl(path: &Path) -> Result<Vec<Record>, DataError> {
    Ok(read_source(path, OnBadLine::Error)?.0)
}

/// What to do with a line that is not a valid record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnBadLine {
    /// Stop with an error naming the file and line.
    #[default]
    Error,
    /// Leave it out and count it.
    Skip,
}

/// Reads a JSONL file, or every `*.jsonl` shard of a folder in name order. Returns the
/// records and how many bad lines were skipped.
pub fn read_source(path: &Path, policy: OnBadLine) -> Result<(Vec<Record>, usize), DataError> {
    let files = if path.is_dir() { shard_files(path)? } else { vec![path.to_path_buf()] };
    let (mut records, mut skipped) = (Vec::new(), 0);
    for file in files {
        let text = std::fs::read_to_string(&file)
            .map_err(|e| DataError::File { path: file.display().to_string(), msg: e.to_string() })?;
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            match parse_line(&file, i + 1, line) {
                Ok(record) => records.push(record),
                Err(_) if policy == OnBadLine::Skip => skipped += 1,
                Err(e) => return Err(e),
            }
        }
    }
    Ok((records, skipped))
}

/// The `*.jsonl` shards of a folder, in name order.
pub(crate) fn shard_files(dir: &Path) -> Result<Vec<PathBuf>, DataError> {
    let err = |msg: String| DataError::File { path: dir.display().to_string(), msg };
    let mut shards: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| err(e.to_string()))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|ext| ext == "jsonl"))
        .collect();
    shards.sort();
    if shards.is_empty() {
        return Err(err("folder holds no .jsonl shards".into()));
    }
    Ok(shards)
}

/// One line of a JSONL file as a record; errors name the file and line.
pub(crate) fn parse_line(path: &Path, line_number: usize, line: &str) -> Result<Record, DataError> {
    let err = |msg: String| DataError::Record { path: path.display().to_string(), line: line_number, msg };
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
    let dir = path.parent().unwrap_or(Path::new("."));
    let image = ImageData::File(dir.join(image));
    Ok(Record { image, prefix, suffix, extra: fields, file: path.to_path_buf(), line: line_number })
}

/// `template` with each `{name}` replaced by `value(name)`; errors say which name has no
/// value, or that a `{` is not closed.
pub(crate) fn fill_template(template: &str, value: impl Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::new();
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        let close = rest[open..]
            .find('}')
            .map(|c| open + c)
            .ok_or_else(|| format!("template {template:?} has an unclosed `{{`"))?;
        out.push_str(&rest[..open]);
        let name = &rest[open + 1..close];
        out.push_str(
            &value(name)
                .ok_or_else(|| format!("template {template:?} needs field `{name}`, which the record lacks"))?,
        );
        rest = &rest[close + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// The field names `template` reads.
pub(crate) fn template_fields(template: &str) -> Result<Vec<String>, String> {
    let names = std::cell::RefCell::new(vec![]);
    fill_template(template, |name| {
        names.borrow_mut().push(name.to_string());
        Some(String::new())
    })?;
    Ok(names.into_inner())
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
        assert_eq!(records[0].image, ImageData::File(path.parent().unwrap().join("a.png")));
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
    fn skip_policy_counts_bad_lines_and_folders_read_all_shards() {
        let path = write("skip", "{\"image\": \"a.png\", \"prefix\": \"x\"}\nnot json\n{\"image\": \"a.png\"}\n");
        let (records, skipped) = read_source(&path, OnBadLine::Skip).unwrap();
        assert_eq!((records.len(), skipped), (1, 2));
        let dir = path.parent().unwrap();
        std::fs::write(dir.join("b.jsonl"), "{\"image\": \"b.png\", \"prefix\": \"y\"}\n").unwrap();
        std::fs::write(dir.join("notes.txt"), "ignored").unwrap();
        let (records, skipped) = read_source(dir, OnBadLine::Skip).unwrap();
        assert_eq!(skipped, 2);
        let prefixes: Vec<_> = records.iter().map(|r| r.prefix.as_str()).collect();
        assert_eq!(prefixes, ["y", "x"], "b.jsonl sorts before data.jsonl");
    }

    #[test]
    fn missing_and_corrupt_images_name_the_record() {
        let path = write(
            "img",
            "{\"image\": \"missing.png\", \"prefix\": \"x\"}\n{\"image\": \"broken.png\", \"prefix\": \"x\"}\n",
        );
        std::fs::write(path.parent().unwrap().join("broken.png"), b"not a png").unwrap();
        let records = read_jsonl(&path).unwrap();
        let err = records[0].load_image().unwrap_err().to_string();
        assert!(err.contains("data.jsonl:1:") && err.contains("missing.png"), "{err}");
        let err = records[1].load_image().unwrap_err().to_string();
        assert!(err.contains("data.jsonl:2:") && err.contains("broken.png"), "{err}");
    }
}
