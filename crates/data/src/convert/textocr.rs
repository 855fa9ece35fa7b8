//! `textocr`: TextOCR images (TextVQA's), every word with its box.

use std::path::{Path, PathBuf};

use super::json::{self, read_value, Node};
use super::{enclosing_box, frame, ocr_example, wrong_inputs, Example, Format, DONT_CARE};
use crate::DataError;

/// `textocr`: `TextOCR_0.1_train.json` or `TextOCR_0.1_val.json` (one JSON object: `imgs`,
/// each image's `id`, `width`, `height` and `file_name` (`train/{id}.jpg`); `anns`, each word's
/// `points` `[x1, y1, x2, y2, ...]` (its polygon), `bbox` `[x, y, w, h]` and `utf8_string`, `.`
/// when illegible; `imgToAnns`, each image's word ids in order). One record per image in the
/// order of `imgs`' ids, its words in `imgToAnns` order, each with its polygon's enclosing
/// box and illegible ones as `###`, as [`ocr_example`] writes them (the size from `imgs`); `id`
/// = the image's id, the image `file_name`'s last part (`{id}.jpg`, under TextVQA's
/// `train_images/`, which holds TextOCR's train and val images alike). The whole file is read
/// at once (the train file takes a few GB of memory).
pub(super) fn textocr(inputs: &[PathBuf], square: bool) -> Result<Vec<Example>, DataError> {
    let [path] = inputs else {
        return Err(wrong_inputs(Format::TextOcr, inputs));
    };
    let value = read_value(path)?;
    let root = Node::root(path, &value);
    let (anns, to_anns) = (root.field("anns")?, root.field("imgToAnns")?);
    let mut examples = Vec::new();
    let mut imgs = root.field("imgs")?.entries()?;
    imgs.sort_by_key(|(id, _)| *id);
    for (id, img) in imgs {
        let file_name = img.field("file_name")?.str()?;
        let image = PathBuf::from(Path::new(file_name).file_name().unwrap_or_default());
        let size = (img.field("width")?.number()?, img.field("height")?.number()?);
        let mut words = Vec::new();
        for ann_id in to_anns.field(id)?.items()? {
            let ann = anns.field(ann_id.str()?)?;
            let text = ann.field("utf8_string")?.str()?;
            let text = if text == "." { DONT_CARE } else { text };
            words.push((text.to_owned(), enclosing_box(json::points(&ann.field("points")?)?)));
        }
        examples.push(ocr_example(image, id, &words, frame(Some(size), square)));
    }
    Ok(examples)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use crate::convert::test_support::{args, assert_image, convert_and_read, texts, TempDir};
    use crate::convert::{convert, Format};

    #[test]
    fn textocr_words_in_image_order_illegible_dot_as_dont_care() {
        let tmp = TempDir::new("textocr");
        let f = Format::TextOcr;
        let a = args(f, &["TextOCR_0.1_val.json"], "train_images", &tmp.0.join("val.jsonl"));
        let records = convert_and_read(&a);
        let ids: Vec<_> = records.iter().map(|r| r.extra["id"].as_str().unwrap()).collect();
        assert_eq!(ids, ["0a0bd9e5c2ac2c31", "9f8e7d6c5b4a3f2e"], "in id order, not the file's");
        // 64 x 32: "STOP" (a quadrilateral) spans x 4..40, y 2..16; "24/7" (a 6-point polygon)
        // x 0..60, y 16..32, after the illegible `.` in imgToAnns' order.
        let suffix = "<loc0064><loc0064><loc0512><loc0639> STOP ; <loc0512><loc0000><loc1023><loc0959> 24/7";
        assert_eq!(texts(&records[0]), ("ocr", Some(suffix)));
        let words = records[0].extra["words"].as_array().unwrap();
        assert_eq!(words[1], json!({"text": "###", "box": [20.0, 50.0, 22.0, 52.0]}), "illegible");
        assert_eq!((&records[0].extra["width"], &records[0].extra["height"]), (&json!(64.0), &json!(32.0)));
        assert_image(&records[0], f, "train_images/0a0bd9e5c2ac2c31.jpg");
        assert_eq!(texts(&records[1]), ("ocr", Some("")), "an image without words");

        let bad = tmp.0.join("bad.json");
        let text = r#"{"imgs": {"a": {"id": "a", "width": 8, "height": 8, "file_name": "train/a.jpg"}},
            "anns": {"a_1": {"points": [1, 2, 3], "utf8_string": "x"}}, "imgToAnns": {"a": ["a_1"]}}"#;
        std::fs::write(&bad, text).unwrap();
        let mut a = a;
        a.inputs = vec![bad];
        let err = convert(&a).unwrap_err().to_string();
        assert!(err.contains("bad.json: `anns.a_1.points`: expected [x1, y1, x2, y2, ...], found 3 numbers"), "{err}");
    }
}
