//! `refcoco`: RefCOCO referring expressions, the box as `<loc>` tokens.

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;

use serde_json::json;

use super::json::{read_json, Node, Walk};
use super::{empty_split, fields, loc_tokens, wrong_inputs, Example, Format};
use crate::DataError;

/// `refcoco`: the refs list (`refs(unc).p`, `refs(google).p`, `refs(umd).p` of the refer
/// toolkit, exported to JSON with `json.dump(pickle.load(f), out)`) names an annotation of
/// COCO `instances.json` per referring expression; one record per sentence, in refs order.
///
/// big_vision's RefCOCO transfer (`pp/proj/paligemma/segmentation.py`, `refcoco_mask2str`)
/// sets prefix = the bare sentence and suffix = the four box tokens followed by 16 mask
/// tokens, with no text after them. Masks need big_vision's VQ-VAE, so the suffix here is the
/// box alone: `<locY1><locX1><locY2><locX2>`, each round(coord / size * 1023) of the image
/// height (y) or width (x). `boxes` = `[[y1, x1, y2, x2]]` in pixels for IoU.
pub(super) fn refcoco(inputs: &[PathBuf], split: Option<&str>) -> Result<Vec<Example>, DataError> {
    let [instances_path, refs_path] = inputs else {
        return Err(wrong_inputs(Format::RefCoco, inputs));
    };
    let mut images = HashMap::new(); // image id -> (file_name, (width, height))
    let mut boxes = HashMap::new(); // annotation id -> [x, y, w, h]
    read_json(instances_path, Walk::Arrays(&["images", "annotations"]), |array, node| {
        if array == "images" {
            let size = (node.field("width")?.number()?, node.field("height")?.number()?);
            images.insert(node.field("id")?.id()?, (node.field("file_name")?.str()?.to_owned(), size));
        } else {
            let bbox = node.field("bbox")?;
            let numbers = bbox.items()?.iter().map(Node::number).collect::<Result<Vec<_>, _>>()?;
            let numbers: [f64; 4] = numbers.try_into().map_err(|_| bbox.error("expected [x, y, w, h]"))?;
            boxes.insert(node.field("id")?.id()?, numbers);
        }
        Ok(())
    })?;

    let mut examples = Vec::new();
    let mut splits = BTreeSet::new();
    read_json(refs_path, Walk::Elements, |_, node| {
        let ref_split = node.field("split")?.str()?;
        splits.insert(ref_split.to_owned());
        if split.is_some_and(|s| s != ref_split) {
            return Ok(());
        }
        let missing =
            |what: &str, key: &str| node.error(format!("{what} {key} is not in {}", instances_path.display()));
        let (ann_id, image_id) = (node.field("ann_id")?, node.field("image_id")?);
        let (ann_key, image_key) = (ann_id.id()?, image_id.id()?);
        let [x, y, w, h] = *boxes.get(&ann_key).ok_or_else(|| missing("annotation", &ann_key))?;
        let (file_name, (width, height)) = images.get(&image_key).ok_or_else(|| missing("image", &image_key))?;
        let corners = [y, x, y + h, x + w];
        for sentence in node.field("sentences")?.items()? {
            let sent = sentence.field("sent")?.str()?;
            examples.push(Example {
                image: file_name.into(),
                prefix: sent.to_owned(),
                suffix: Some(loc_tokens(corners, *width, *height)),
                extra: fields(json!({
                    "id": node.field("ref_id")?.value,
                    "sent_id": sentence.opt("sent_id").map(|n| n.value.clone()),
                    "ann_id": ann_id.value,
                    "image_id": image_id.value,
                    "split": ref_split,
                    "boxes": [corners],
                    "width": width,
                    "height": height,
                })),
            });
        }
        Ok(())
    })?;
    if let Some(split) = split.filter(|_| examples.is_empty()) {
        return Err(empty_split(refs_path, "refs", split, splits));
    }
    Ok(examples)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use crate::convert::test_support::{args, assert_image, convert_and_read, texts, TempDir};
    use crate::convert::{convert, loc_token, loc_tokens, Format};

    #[test]
    fn refcoco_sentence_prompts_box_tokens() {
        let tmp = TempDir::new("refcoco");
        let f = Format::RefCoco;
        let mut a = args(f, &["instances.json", "refs.json"], "train2014", &tmp.0.join("refcoco.jsonl"));
        let records = convert_and_read(&a);
        assert_eq!(records.len(), 3);
        // Image 9 is 640 x 480 (instances.json); bbox [x 100, y 50, w 200, h 300] has corners
        // y1 50, x1 100, y2 350, x2 300, so the bins are
        //   y1 50 * 1023 / 480 = 106.5625 -> 107    x1 100 * 1023 / 640 = 159.84375 -> 160
        //   y2 350 * 1023 / 480 = 745.9375 -> 746   x2 300 * 1023 / 640 = 479.53125 -> 480
        let bowl = "<loc0107><loc0160><loc0746><loc0480>";
        assert_eq!(texts(&records[0]), ("the bowl on the left", Some(bowl)));
        assert_eq!(texts(&records[1]), ("left bowl", Some(bowl)));
        assert_eq!(records[0].extra["boxes"], json!([[50.0, 100.0, 350.0, 300.0]]));
        let extra = &records[1].extra;
        assert_eq!((&extra["id"], &extra["sent_id"], &extra["ann_id"]), (&json!(0), &json!(2), &json!(1038967)));
        assert_eq!((&extra["image_id"], &extra["split"]), (&json!(9), &json!("train")));
        // The refcoco metric maps <loc> tokens back to pixels with the image size, COCO's
        // `images[].width` and `height`.
        assert_eq!((&extra["width"], &extra["height"]), (&json!(640.0), &json!(480.0)));
        assert_image(&records[0], f, "train2014/COCO_train2014_000000000009.jpg");
        // The whole 2 x 2 image: 0 and 2 * 1023 / 2.
        assert_eq!(texts(&records[2]), ("whole picture", Some("<loc0000><loc0000><loc1023><loc1023>")));
        assert_image(&records[2], f, "train2014/COCO_train2014_000000000025.jpg");

        a.split = Some("val".into());
        let records = convert_and_read(&a);
        assert_eq!(records.iter().map(|r| r.prefix.as_str()).collect::<Vec<_>>(), ["whole picture"]);
        a.split = Some("testB".into());
        let err = convert(&a).unwrap_err().to_string();
        assert!(err.contains("refs.json") && err.contains("no refs in split `testB` (found: train, val)"), "{err}");
    }

    #[test]
    fn loc_tokens_round_half_to_even_and_clip() {
        // 1 * 1023 / 6 = 170.5 -> 170 and 3 * 1023 / 6 = 511.5 -> 512, as tf.round does.
        assert_eq!(loc_token(1.0, 6.0), "<loc0170>");
        assert_eq!(loc_token(3.0, 6.0), "<loc0512>");
        assert_eq!(loc_token(-3.0, 640.0), "<loc0000>");
        assert_eq!(loc_token(700.0, 640.0), "<loc1023>");
        assert_eq!(loc_tokens([0.0, 320.0, 240.0, 640.0], 640.0, 480.0), "<loc0000><loc0512><loc0512><loc1023>");
    }
}
