//! `grandstaff`: GrandStaff pianoform scores as `**kern`.

use std::path::{Path, PathBuf};

use serde_json::json;

use super::{fields, wrong_inputs, Example, Format};
use crate::DataError;

/// The prompt of music records (the paper gives none).
const MUSIC_PROMPT: &str = "music kern";

/// Which of a score's two renders a record shows.
#[derive(Clone, Copy)]
pub(super) enum Render {
    /// `{stem}.jpg`, the clean render (training and evaluation).
    Original,
    /// `{stem}_distorted.jpg`, its synthetically distorted copy (training).
    Distorted,
}

/// `grandstaff` / `grandstaff-distorted`: a GrandStaff partition list, as the Sheet Music
/// Transformer's download has them (`partitions_grandstaff/types/{train,val,test}.txt`: one
/// score a line, its path relative to the dataset's folder,
/// `grandstaff_dataset/{composer}/{work}/{movement}/{name}.krn`, the extension as the list
/// gives it), with `--images` the folder those paths are relative to.
/// Beside each score lie its `**kern` transcription `{name}.krn` (also `.bekrn`/`.ekrn`, the
/// Sheet Music Transformer's encodings, not read) and its renders `{name}.jpg` and
/// `{name}_distorted.jpg`. One record per listed score in list order, image the original
/// render (`grandstaff`) or the distorted one (`grandstaff-distorted`), prefix `music kern` (the
/// paper gives no prompt), suffix = the `.krn` file as it is (tabs between spines, its line
/// breaks kept, the final line break dropped), `answers` = `[suffix]`; `id` = the listed path
/// without its extension.
pub(super) fn grandstaff(inputs: &[PathBuf], images: &Path, render: Render) -> Result<Vec<Example>, DataError> {
    let format = match render {
        Render::Original => Format::GrandStaff,
        Render::Distorted => Format::GrandStaffDistorted,
    };
    let [list] = inputs else {
        return Err(wrong_inputs(format, inputs));
    };
    let error = |path: &Path, msg: String| DataError::File { path: path.display().to_string(), msg };
    let text = std::fs::read_to_string(list).map_err(|e| error(list, e.to_string()))?;
    let mut examples = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let listed = Path::new(line.trim());
        if listed.as_os_str().is_empty() {
            continue;
        }
        let stem = listed.with_extension("");
        let name = stem.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let kern_path = images.join(stem.with_file_name(format!("{name}.krn")));
        let kern = std::fs::read_to_string(&kern_path)
            .map_err(|e| error(list, format!("line {}: {}: {e}", i + 1, kern_path.display())))?;
        let kern = kern.strip_suffix('\n').unwrap_or(&kern);
        let kern = kern.strip_suffix('\r').unwrap_or(kern).to_owned();
        let image = match render {
            Render::Original => stem.with_file_name(format!("{name}.jpg")),
            Render::Distorted => stem.with_file_name(format!("{name}_distorted.jpg")),
        };
        examples.push(Example {
            image,
            prefix: MUSIC_PROMPT.into(),
            suffix: Some(kern.clone()),
            extra: fields(json!({"id": stem.to_string_lossy(), "answers": [kern]})),
        });
    }
    Ok(examples)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use crate::convert::test_support::{args, assert_image, convert_and_read, texts, TempDir};
    use crate::convert::{convert, Format};

    #[test]
    fn grandstaff_kern_targets_with_original_or_distorted_renders() {
        let tmp = TempDir::new("grandstaff");
        let f = Format::GrandStaff;
        let a = args(f, &["partitions_grandstaff/types/test.txt"], ".", &tmp.0.join("test.jsonl"));
        let records = convert_and_read(&a);
        assert_eq!(records.len(), 2, "the blank line is skipped");
        let kern = "**kern\t**kern\n*clefF4\t*clefG2\n4C\t4e\n=1\t=1\n*-\t*-";
        assert_eq!(texts(&records[0]), ("music kern", Some(kern)));
        let id = "grandstaff_dataset/chopin/preludes/prelude28-4/original_m-0-5";
        assert_eq!((&records[0].extra["id"], &records[0].extra["answers"]), (&json!(id), &json!([kern])));
        assert_image(&records[0], f, &format!("{id}.jpg"));
        // Listed as `.ekrn` (the Sheet Music Transformer's lists): the `.krn` beside it is read.
        let second = "grandstaff_dataset/chopin/preludes/prelude28-4/maj2_up_m-0-5";
        assert_eq!(records[1].extra["id"], json!(second));
        assert_eq!(texts(&records[1]).1.unwrap().lines().nth(2), Some("4D\t4f#"));

        let mut a = a;
        a.format = Format::GrandStaffDistorted;
        let records = convert_and_read(&a);
        assert_image(&records[0], Format::GrandStaff, &format!("{id}_distorted.jpg"));
        assert_eq!(texts(&records[0]), ("music kern", Some(kern)));

        let list = tmp.0.join("train.txt");
        std::fs::write(&list, format!("{id}.krn\ngrandstaff_dataset/nowhere/x.krn\n")).unwrap();
        a.inputs = vec![list];
        let err = convert(&a).unwrap_err().to_string();
        assert!(err.contains("train.txt: line 2:") && err.contains("nowhere/x.krn"), "{err}");
    }
}
