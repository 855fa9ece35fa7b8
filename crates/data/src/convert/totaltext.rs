//! `totaltext`: Total-Text scene text, every word with its box.

use std::path::{Path, PathBuf};

use super::{enclosing_box, folder_files, frame, image_size, ocr_example, wrong_inputs, Example, Format, DONT_CARE};
use crate::DataError;

/// `totaltext`: Total-Text's ground truth in its text format (`txt_format/{Train,Test}/`:
/// `poly_gt_imgN.txt` for the image `imgN.jpg` or `imgN.JPG`, one word per entry as
/// `x: [[x1 x2 ...]], y: [[y1 y2 ...]], ornt: [u'c'], transcriptions: [u'text']`, an entry
/// sometimes broken over several lines, `#` for an unreadable word). One record per image in
/// natural order, its words in the file's order, each with its polygon's enclosing box and
/// unreadable ones as `###`, as [`ocr_example`] writes them (the image's size read from its
/// header); `id` = `imgN`.
pub(super) fn totaltext(inputs: &[PathBuf], images: &Path, square: bool) -> Result<Vec<Example>, DataError> {
    let [gt_dir] = inputs else {
        return Err(wrong_inputs(Format::TotalText, inputs));
    };
    let mut examples = Vec::new();
    for (name, path) in folder_files(gt_dir, ".txt")? {
        let Some(stem) = name.strip_prefix("poly_gt_") else {
            continue;
        };
        let upper = PathBuf::from(format!("{stem}.JPG"));
        let image = if images.join(&upper).is_file() { upper } else { PathBuf::from(format!("{stem}.jpg")) };
        let size = frame(image_size(images, &image)?, square);
        examples.push(ocr_example(image, stem, &read_entries(&path)?, size));
    }
    Ok(examples)
}

/// The words of a ground-truth file: text (`###` for `#`) and enclosing box `[y1, x1, y2, x2]`.
fn read_entries(path: &Path) -> Result<Vec<(String, [f64; 4])>, DataError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| DataError::File { path: path.display().to_string(), msg: e.to_string() })?;
    let text = text.trim_start_matches('\u{feff}');
    let starts: Vec<usize> = text.match_indices("x: [[").map(|(i, _)| i).collect();
    let mut words = Vec::new();
    for (k, &start) in starts.iter().enumerate() {
        let entry = &text[start..starts.get(k + 1).copied().unwrap_or(text.len())];
        let line = text[..start].matches('\n').count() + 1;
        let error = |what: &str| DataError::File {
            path: path.display().to_string(),
            msg: format!("line {line}: {what} in {:?}", entry.trim_end()),
        };
        let numbers = |key: &str| -> Option<Vec<f64>> {
            let list = entry.split_once(key)?.1.split_once("]]")?.0;
            list.split_whitespace().map(|n| n.parse().ok()).collect()
        };
        let (xs, ys) = (
            numbers("x: [[").ok_or_else(|| error("unreadable x"))?,
            numbers("y: [[").ok_or_else(|| error("unreadable y"))?,
        );
        if xs.is_empty() || xs.len() != ys.len() {
            return Err(error("expected as many x as y coordinates"));
        }
        let transcription =
            entry.split_once("transcriptions: [").and_then(|(_, t)| t.rsplit_once(']')).map(|(t, _)| t.trim());
        let word = transcription.and_then(unquote).ok_or_else(|| error("unreadable transcriptions"))?;
        let word = if word == "#" { DONT_CARE } else { word };
        words.push((word.to_owned(), enclosing_box(xs.into_iter().zip(ys))));
    }
    Ok(words)
}

/// The text of a Python 2 string literal as Total-Text writes it: `u'text'`, `'text'` or
/// `u"text"`.
fn unquote(literal: &str) -> Option<&str> {
    let literal = literal.strip_prefix('u').unwrap_or(literal);
    let quote = literal.chars().next().filter(|q| *q == '\'' || *q == '"')?;
    literal[1..].strip_suffix(quote)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use crate::convert::test_support::{args, assert_image, convert_and_read, texts, TempDir};
    use crate::convert::{convert, Format};

    #[test]
    fn totaltext_polygons_multi_line_entries_and_dont_care() {
        let tmp = TempDir::new("totaltext");
        let f = Format::TotalText;
        let a = args(f, &["txt_format/Test"], "Images/Test", &tmp.0.join("test.jsonl"));
        let records = convert_and_read(&a);
        assert_eq!(records.iter().map(|r| r.extra["id"].as_str().unwrap()).collect::<Vec<_>>(), ["img9", "img10"]);
        // img9.jpg is 64 x 32; the curved "the" spans x 4..40, y 2..16; "Bob's" (double
        // quotes, its entry broken over two lines) x 0..60, y 16..32; `#` is unreadable.
        let suffix = "<loc0064><loc0064><loc0512><loc0639> the ; <loc0512><loc0000><loc1023><loc0959> Bob's";
        assert_eq!(texts(&records[0]), ("ocr", Some(suffix)));
        let words = records[0].extra["words"].as_array().unwrap();
        assert_eq!(words[1], json!({"text": "###", "box": [20.0, 50.0, 22.0, 52.0]}));
        assert_image(&records[0], f, "Images/Test/img9.jpg");
        assert_image(&records[1], f, "Images/Test/img10.JPG"); // the extension as the file has it

        let bad = tmp.0.join("gt");
        std::fs::create_dir_all(&bad).unwrap();
        let entry = "x: [[1 2 3]], y: [[4 5 6]], ornt: [u'h'], transcriptions: [u'ok']\n";
        std::fs::write(
            bad.join("poly_gt_img1.txt"),
            format!("{entry}x: [[1 2]], y: [[4]], ornt: [u'h'], transcriptions: [u'no']\n"),
        )
        .unwrap();
        let mut a = a;
        a.inputs = vec![bad];
        let err = convert(&a).unwrap_err().to_string();
        assert!(err.contains("poly_gt_img1.txt: line 2: expected as many x as y coordinates"), "{err}");
    }
}
