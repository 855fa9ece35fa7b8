//! The JSONL writer: image checks, paths relative to the output, an all-or-nothing rename.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::files::Staged;

use serde::Serialize;
use serde_json::{Map, Value};

use super::{ConvertArgs, ConvertSummary, Example};
use crate::DataError;

/// Checks every image, makes its path relative to the output's folder and writes the records
/// to a temporary file beside `OUTPUT`, renamed to `OUTPUT` only once all went well.
pub(super) fn write_jsonl(args: &ConvertArgs, examples: &[Example]) -> Result<ConvertSummary, DataError> {
    let file_error =
        |path: &Path, e: std::io::Error| DataError::File { path: path.display().to_string(), msg: e.to_string() };
    let out_dir = match args.output.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(out_dir).map_err(|e| file_error(out_dir, e))?;
    // Canonical folders, so that `..` in the relative path means the same to the OS.
    let out_dir = out_dir.canonicalize().map_err(|e| file_error(out_dir, e))?;
    let images = args
        .images
        .canonicalize()
        .map_err(|e| DataError::File { path: args.images.display().to_string(), msg: format!("images folder: {e}") })?;

    let staged = Staged::new(&args.output).map_err(|e| file_error(&args.output, e))?;
    let tmp = staged.path();
    let summary = (|| -> Result<ConvertSummary, DataError> {
        let file = std::fs::File::create(tmp).map_err(|e| file_error(tmp, e))?;
        let mut out = std::io::BufWriter::new(file);
        let mut summary = ConvertSummary { records: 0, skipped_records: 0, missing_images: Vec::new() };
        let mut exists = HashMap::new();
        for example in examples {
            let image = images.join(&example.image);
            let first_time = !exists.contains_key(&image);
            if !*exists.entry(image.clone()).or_insert_with(|| image.is_file()) {
                if !args.skip_missing {
                    let msg = "image not found (skip_missing leaves such records out)".to_owned();
                    return Err(DataError::File { path: image.display().to_string(), msg });
                }
                if first_time {
                    summary.missing_images.push(image);
                }
                summary.skipped_records += 1;
                continue;
            }
            let relative = relative_to(&out_dir, &image);
            let line = Line {
                image: &relative.to_string_lossy(),
                prefix: &example.prefix,
                suffix: example.suffix.as_deref(),
                extra: &example.extra,
            };
            let text = serde_json::to_string(&line).expect("a record always serializes");
            writeln!(out, "{text}").map_err(|e| file_error(tmp, e))?;
            summary.records += 1;
        }
        out.flush().map_err(|e| file_error(tmp, e))?;
        Ok(summary)
    })()?;
    staged.commit().map_err(|e| file_error(&args.output, e))?;
    Ok(summary)
}

/// One output line: `image`, `prefix`, `suffix` first, then the extra fields.
#[derive(Serialize)]
struct Line<'a> {
    image: &'a str,
    prefix: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    suffix: Option<&'a str>,
    #[serde(flatten)]
    extra: &'a Map<String, Value>,
}

/// `path` relative to the folder `base` (both absolute), with `..` where they part.
fn relative_to(base: &Path, path: &Path) -> PathBuf {
    let base: Vec<_> = base.components().collect();
    let path: Vec<_> = path.components().collect();
    let common = base.iter().zip(&path).take_while(|(a, b)| a == b).count();
    if common == 0 {
        return path.iter().collect(); // different roots: only an absolute path works
    }
    let ups = std::iter::repeat_n(std::path::Component::ParentDir, base.len() - common);
    ups.chain(path[common..].iter().copied()).collect()
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use serde_json::Value;

    use super::relative_to;
    use crate::convert::test_support::{args, fixture, no_temporary, TempDir};
    use crate::convert::{convert, ConvertSummary, Format};
    use crate::source::read_jsonl;

    #[test]
    fn output_next_to_images_uses_plain_relative_paths() {
        let tmp = TempDir::new("near");
        std::fs::create_dir_all(tmp.0.join("val2014")).unwrap();
        for n in [42, 73] {
            let name = format!("val2014/COCO_val2014_{n:012}.jpg");
            std::fs::copy(fixture(Format::CocoCaptions).join(&name), tmp.0.join(&name)).unwrap();
        }
        let mut a = args(Format::CocoCaptions, &["captions_val2014.json"], "val2014", &tmp.0.join("coco.jsonl"));
        a.images = tmp.0.join("val2014");
        convert(&a).unwrap();
        let text = std::fs::read_to_string(&a.output).unwrap();
        let first: Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
        assert_eq!(first["image"], "val2014/COCO_val2014_000000000042.jpg");
        assert_eq!(relative_to(Path::new("/a/b/c"), Path::new("/a/d/e.jpg")), Path::new("../../d/e.jpg"));
    }

    #[test]
    fn missing_images_fail_or_are_skipped() {
        let tmp = TempDir::new("missing");
        let images = tmp.0.join("images");
        std::fs::create_dir_all(&images).unwrap();
        let name = "COCO_val2014_000000000042.jpg";
        std::fs::copy(fixture(Format::CocoCaptions).join("val2014").join(name), images.join(name)).unwrap();
        let mut a = args(Format::CocoCaptions, &["captions_val2014.json"], "val2014", &tmp.0.join("coco.jsonl"));
        a.images = images.clone();

        let err = convert(&a).unwrap_err().to_string();
        assert!(err.contains("COCO_val2014_000000000073.jpg") && err.contains("image not found"), "{err}");
        assert!(!a.output.exists() && no_temporary(&tmp.0), "no output, no temporary");

        a.skip_missing = true;
        let summary = convert(&a).unwrap();
        let missing = images.canonicalize().unwrap().join("COCO_val2014_000000000073.jpg");
        assert_eq!(summary, ConvertSummary { records: 1, skipped_records: 1, missing_images: vec![missing] });
        assert_eq!(read_jsonl(&a.output).unwrap().len(), 1);
    }

    #[test]
    fn failed_conversion_leaves_an_existing_output_alone() {
        let tmp = TempDir::new("keep");
        let output = tmp.0.join("out.jsonl");
        std::fs::write(&output, "old\n").unwrap();
        let mut a = args(Format::DocVqa, &["val_v1.0.json"], ".", &output);
        a.images = tmp.0.clone(); // no documents/ here
        assert!(convert(&a).is_err());
        assert_eq!(std::fs::read_to_string(&output).unwrap(), "old\n");
    }
}
