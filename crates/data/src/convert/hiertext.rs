//! `hiertext`: HierText images, every word with its box.

use std::path::PathBuf;

use super::json::{read_json, Node, Walk};
use super::{enclosing_box, frame, ocr_example, wrong_inputs, Example, Format, DONT_CARE};
use crate::DataError;

/// `hiertext`: HierText's `train.jsonl` or `validation.jsonl` (gunzipped; despite the name one
/// JSON object whose `annotations` list one image each: `image_id`, `image_width`,
/// `image_height` and `paragraphs` of `lines` of `words`, each word with its polygon
/// `vertices` `[[x, y], ...]`, `text` and `legible`). One record per image in file order, its
/// words in reading order (paragraph, line, word), each with its polygon's enclosing box and
/// illegible ones as `###`, as [`ocr_example`] writes them; `id` = `image_id`, the image
/// `{image_id}.jpg`.
pub(super) fn hiertext(inputs: &[PathBuf], square: bool) -> Result<Vec<Example>, DataError> {
    let [path] = inputs else {
        return Err(wrong_inputs(Format::HierText, inputs));
    };
    let mut examples = Vec::new();
    read_json(path, Walk::Arrays(&["annotations"]), |_, node| {
        let id = node.field("image_id")?.str()?;
        let size = (node.field("image_width")?.number()?, node.field("image_height")?.number()?);
        let mut words = Vec::new();
        for paragraph in node.field("paragraphs")?.items()? {
            for line in paragraph.field("lines")?.items()? {
                for word in line.field("words")?.items()? {
                    let legible = word.field("legible")?.bool()?;
                    let text = if legible { word.field("text")?.str()? } else { DONT_CARE };
                    words.push((text.to_owned(), enclosing_box(vertices(&word.field("vertices")?)?)));
                }
            }
        }
        examples.push(ocr_example(format!("{id}.jpg").into(), id, &words, frame(Some(size), square)));
        Ok(())
    })?;
    Ok(examples)
}

/// A polygon's `[[x, y], ...]` as points.
fn vertices(node: &Node) -> Result<Vec<(f64, f64)>, DataError> {
    let points = node.items()?;
    if points.is_empty() {
        return Err(node.error("expected [[x, y], ...], found no points"));
    }
    points
        .iter()
        .map(|point| match point.items()?.as_slice() {
            [x, y] => Ok((x.number()?, y.number()?)),
            _ => Err(point.error("expected [x, y]")),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use crate::convert::test_support::{args, assert_image, convert_and_read, texts, TempDir};
    use crate::convert::Format;

    #[test]
    fn hiertext_words_in_reading_order_illegible_as_dont_care() {
        let tmp = TempDir::new("hiertext");
        let f = Format::HierText;
        let records = convert_and_read(&args(f, &["validation.jsonl"], "validation", &tmp.0.join("val.jsonl")));
        assert_eq!(records.len(), 1);
        // 64 x 32: "OPEN" spans x 4..40, y 2..16 (a 5-point polygon); "24h" x 0..60, y 16..32.
        let suffix = "<loc0064><loc0064><loc0512><loc0639> OPEN ; <loc0512><loc0000><loc1023><loc0959> 24h";
        assert_eq!(texts(&records[0]), ("ocr", Some(suffix)));
        let words = records[0].extra["words"].as_array().unwrap();
        assert_eq!(words.len(), 3);
        assert_eq!(words[1], json!({"text": "###", "box": [20.0, 50.0, 22.0, 52.0]}), "illegible");
        assert_eq!((&records[0].extra["width"], &records[0].extra["id"]), (&json!(64.0), &json!("0a1b2c3d4e5f6a7b")));
        assert_image(&records[0], f, "validation/0a1b2c3d4e5f6a7b.jpg");
    }
}
