//! `coco-captions`: COCO caption annotations, one record per caption.

use std::collections::HashMap;
use std::path::PathBuf;

use serde_json::json;

use super::json::{id_text, read_json, Walk};
use super::{fields, wrong_inputs, Example, Format};
use crate::DataError;

/// `coco-captions`: one record per caption in annotation order (big_vision trains on a random
/// caption of each image per step, `cococap.py` `choice_no_replacement(inkey="captions/text")`;
/// one record per caption gives the same data per epoch). Every record carries
/// `references` = all captions of its image for CIDEr; an evaluator wants one prediction per
/// `image_id`. Captions are trimmed (some COCO captions end in spaces or a newline).
pub(super) fn coco_captions(inputs: &[PathBuf]) -> Result<Vec<Example>, DataError> {
    let [path] = inputs else {
        return Err(wrong_inputs(Format::CocoCaptions, inputs));
    };
    let mut file_names = HashMap::new(); // image id -> file_name
    let mut captions = Vec::new(); // (node path, caption id, image id, text)
    read_json(path, Walk::Arrays(&["images", "annotations"]), |array, node| {
        if array == "images" {
            file_names.insert(node.field("id")?.id()?, node.field("file_name")?.str()?.to_owned());
        } else {
            let id = node.opt("id").map(|n| n.value.clone());
            let text = node.field("caption")?.str()?.trim().to_owned();
            captions.push((node.at.clone(), id, node.field("image_id")?.value.clone(), text));
        }
        Ok(())
    })?;
    let mut references: HashMap<String, Vec<String>> = HashMap::new();
    for (_, _, image_id, text) in &captions {
        references.entry(id_text(image_id)).or_default().push(text.clone());
    }
    captions
        .into_iter()
        .map(|(at, id, image_id, text)| {
            let key = id_text(&image_id);
            let file_name = file_names.get(&key).ok_or_else(|| DataError::File {
                path: path.display().to_string(),
                msg: format!("`{at}.image_id`: no image with id {key} in `images`"),
            })?;
            Ok(Example {
                image: file_name.into(),
                prefix: "caption en".into(),
                suffix: Some(text),
                extra: fields(json!({"id": id, "image_id": image_id, "references": references[&key]})),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use crate::convert::test_support::{args, assert_image, convert_and_read, no_temporary, texts, TempDir};
    use crate::convert::Format;

    #[test]
    fn coco_captions_one_record_per_caption_with_references() {
        let tmp = TempDir::new("coco");
        let output = tmp.0.join("out/coco.jsonl"); // a folder convert has to create
        let f = Format::CocoCaptions;
        let records = convert_and_read(&args(f, &["captions_val2014.json"], "val2014", &output));
        assert_eq!(records.len(), 3);
        // Annotation order, not grouped by image.
        assert_eq!(texts(&records[0]), ("caption en", Some("A dog on a red couch.")));
        assert_eq!(texts(&records[1]), ("caption en", Some("Two bikes leaning on a wall."))); // trimmed
        assert_eq!(texts(&records[2]), ("caption en", Some("a small dog sleeping")));
        assert_image(&records[0], f, "val2014/COCO_val2014_000000000042.jpg");
        assert_image(&records[1], f, "val2014/COCO_val2014_000000000073.jpg");
        assert_image(&records[2], f, "val2014/COCO_val2014_000000000042.jpg");
        let dog = json!(["A dog on a red couch.", "a small dog sleeping"]);
        assert_eq!(records[0].extra["references"], dog);
        assert_eq!(records[2].extra["references"], dog);
        assert_eq!(records[1].extra["references"], json!(["Two bikes leaning on a wall."]));
        assert_eq!((&records[2].extra["id"], &records[2].extra["image_id"]), (&json!(1003), &json!(42)));
        assert!(no_temporary(output.parent().unwrap()), "no temporary left");
    }
}
