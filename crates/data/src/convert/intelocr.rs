//! `intelocr`: Open Images V5 text annotations (Krylov et al., "Open Images V5 Text
//! Annotation and Yet Another Mask Text Spotter", the paper's IntelOCR), every word with its
//! box.

use std::collections::HashMap;
use std::path::PathBuf;

use super::json::{self, read_json, Node, Walk};
use super::{enclosing_box, frame, ocr_example, wrong_inputs, Example, Format, DONT_CARE};
use crate::DataError;

/// `intelocr`: OpenVINO training extensions' `text_spotting_openimages_v5_train_{1,2,5,f}.json`
/// or `text_spotting_openimages_v5_validation.json`, one or several (COCO's layout: `images`
/// with `id`, `file_name`, `width`, `height`; `annotations` with `image_id`, `segmentation`
/// (polygons), `bbox` `[x, y, w, h]` and `attributes` holding `legible` and `transcription`).
/// One record per image in file order, its words in the file's order, each with its polygons'
/// enclosing box (its `bbox` when it has no polygon) and illegible ones as `###`, as
/// [`ocr_example`] writes them (the size from `images`); `id` = the image's id, the image
/// `IMAGES/{file_name}` (Open Images' `train_{1,2,5,f}` and `validation` tars unpacked where
/// the file names point).
pub(super) fn intelocr(inputs: &[PathBuf], square: bool) -> Result<Vec<Example>, DataError> {
    if inputs.is_empty() {
        return Err(wrong_inputs(Format::IntelOcr, inputs));
    }
    let mut examples = Vec::new();
    for path in inputs {
        let mut images = Vec::new(); // (id, file_name, (width, height))
        let mut words: HashMap<String, Vec<(String, [f64; 4])>> = HashMap::new();
        read_json(path, Walk::Arrays(&["images", "annotations"]), |array, node| {
            if array == "images" {
                let size = (node.field("width")?.number()?, node.field("height")?.number()?);
                images.push((node.field("id")?.id()?, node.field("file_name")?.str()?.to_owned(), size));
            } else {
                words.entry(node.field("image_id")?.id()?).or_default().push(word(&node)?);
            }
            Ok(())
        })?;
        for (id, file_name, size) in images {
            let words = words.remove(&id).unwrap_or_default();
            examples.push(ocr_example(file_name.into(), &id, &words, frame(Some(size), square)));
        }
        if let Some(id) = words.keys().next() {
            let msg = format!("annotations of image {id}, which `images` does not list");
            return Err(DataError::File { path: path.display().to_string(), msg });
        }
    }
    Ok(examples)
}

/// An annotation's text (`###` when illegible) and enclosing box.
fn word(node: &Node) -> Result<(String, [f64; 4]), DataError> {
    let attributes = node.field("attributes")?;
    let text = match attributes.field("legible")?.bool()? {
        true => attributes.field("transcription")?.str()?.to_owned(),
        false => DONT_CARE.to_owned(),
    };
    let mut points = Vec::new();
    for polygon in node.opt("segmentation").map(|s| s.items()).transpose()?.unwrap_or_default() {
        points.extend(json::points(&polygon)?);
    }
    if points.is_empty() {
        let bbox = node.field("bbox")?;
        let numbers = bbox.items()?.iter().map(Node::number).collect::<Result<Vec<_>, _>>()?;
        let [x, y, w, h] = numbers[..] else { return Err(bbox.error("expected [x, y, w, h]")) };
        points = vec![(x, y), (x + w, y + h)];
    }
    Ok((text, enclosing_box(points)))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use crate::convert::test_support::{args, assert_image, convert_and_read, texts, TempDir};
    use crate::convert::{convert, Format};

    #[test]
    fn intelocr_words_with_boxes_illegible_as_dont_care() {
        let tmp = TempDir::new("intelocr");
        let f = Format::IntelOcr;
        let a = args(f, &["text_spotting_openimages_v5_validation.json"], ".", &tmp.0.join("val.jsonl"));
        let records = convert_and_read(&a);
        let ids: Vec<_> = records.iter().map(|r| r.extra["id"].clone()).collect();
        assert_eq!(ids, [json!("0"), json!("1")]);
        // 64 x 32: "OPEN" (a quadrilateral) spans x 4..40, y 2..16; the illegible word is left
        // out of the target; "24h" has no polygon, its bbox [0, 16, 60, 16] spans x 0..60,
        // y 16..32.
        let suffix = "<loc0064><loc0064><loc0512><loc0639> OPEN ; <loc0512><loc0000><loc1023><loc0959> 24h";
        assert_eq!(texts(&records[0]), ("ocr", Some(suffix)));
        let words = records[0].extra["words"].as_array().unwrap();
        assert_eq!(words[1], json!({"text": "###", "box": [20.0, 50.0, 22.0, 52.0]}), "illegible");
        assert_eq!((&records[0].extra["width"], &records[0].extra["height"]), (&json!(64.0), &json!(32.0)));
        assert_image(&records[0], f, "openimages_v5/validation/0a1b2c3d4e5f6a7b.jpg");
        assert_eq!(texts(&records[1]), ("ocr", Some("")), "an image without words");

        // Padded to a square, the boxes are binned on the 64 x 64 square.
        let mut padded = a.clone();
        padded.pad_to_square = true;
        let records = convert_and_read(&padded);
        assert!(texts(&records[0]).1.unwrap().starts_with("<loc0032><loc0064><loc0256><loc0639> OPEN"));
        assert_eq!(records[0].extra["height"], json!(64.0));

        let bad = tmp.0.join("bad.json");
        let text = r#"{"images": [{"id": 0, "file_name": "a.jpg", "width": 8, "height": 8}],
            "annotations": [{"image_id": 0, "segmentation": [[1, 2, 3]], "attributes": {"legible": true, "transcription": "x"}}]}"#;
        std::fs::write(&bad, text).unwrap();
        let mut a = a;
        a.inputs = vec![bad];
        let err = convert(&a).unwrap_err().to_string();
        assert!(err.contains("bad.json") && err.contains("expected [x1, y1, x2, y2, ...], found 3 numbers"), "{err}");
    }
}
