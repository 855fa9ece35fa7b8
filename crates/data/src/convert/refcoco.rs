//! `refcoco`: RefCOCO referring expressions: the box as `<loc>` tokens, and with the mask
//! VQ-VAE the object's mask as `<seg>` tokens.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use pg2_eval::mask::Mask;
use pg2_model::vqvae::{MaskVae, CODES_PER_MASK, MASK_SIDE};
use serde_json::json;
use tch::Tensor;

use super::json::{read_json, Node, Walk};
use super::{empty_split, fields, loc_tokens, wrong_inputs, Example, Format};
use crate::DataError;

/// `refcoco`: the refs list (`refs(unc).p`, `refs(google).p`, `refs(umd).p` of the refer
/// toolkit, exported to JSON with `json.dump(pickle.load(f), out)`) names an annotation of
/// COCO `instances.json` per referring expression; one record per sentence, in refs order.
///
/// big_vision's RefCOCO transfer (`pp/proj/paligemma/segmentation.py`, `refcoco_mask2str`)
/// sets prefix = the bare sentence and suffix = the four box tokens followed by 16 mask
/// tokens, with no text after them. The box is `<locY1><locX1><locY2><locX2>`, each
/// round(coord / size * 1023) of the image height (y) or width (x); with `mask_vae` (big_vision's
/// `vae-oid.npz`) the suffix goes on with the mask's 16 codes as `<segNNN>` (see
/// [`mask_codes`]), without it the suffix is the box alone. Every record keeps
/// `boxes` = `[[y1, x1, y2, x2]]` in pixels and `mask`, the object's mask (its COCO polygons
/// rasterised as pycocotools does, or its RLE) as COCO's RLE with compressed counts, for the
/// metrics.
pub(super) fn refcoco(
    inputs: &[PathBuf],
    split: Option<&str>,
    mask_vae: Option<&Path>,
) -> Result<Vec<Example>, DataError> {
    let [instances_path, refs_path] = inputs else {
        return Err(wrong_inputs(Format::RefCoco, inputs));
    };
    let mut images = HashMap::new(); // image id -> (file_name, (width, height))
    let mut annotations = HashMap::new(); // annotation id -> ([x, y, w, h], segmentation)
    read_json(instances_path, Walk::Arrays(&["images", "annotations"]), |array, node| {
        if array == "images" {
            let size = (node.field("width")?.number()?, node.field("height")?.number()?);
            images.insert(node.field("id")?.id()?, (node.field("file_name")?.str()?.to_owned(), size));
        } else {
            let bbox = node.field("bbox")?;
            let numbers = bbox.items()?.iter().map(Node::number).collect::<Result<Vec<_>, _>>()?;
            let numbers: [f64; 4] = numbers.try_into().map_err(|_| bbox.error("expected [x, y, w, h]"))?;
            annotations.insert(node.field("id")?.id()?, (numbers, Segmentation::read(&node.field("segmentation")?)?));
        }
        Ok(())
    })?;

    let mut examples = Vec::new();
    let mut splits = BTreeSet::new();
    // Per ref: its mask's crop for the VQ-VAE and its records.
    let mut crops = Vec::new();
    let mut records_of_crop = Vec::new();
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
        let ([x, y, w, h], segmentation) = annotations.get(&ann_key).ok_or_else(|| missing("annotation", &ann_key))?;
        let (file_name, (width, height)) = images.get(&image_key).ok_or_else(|| missing("image", &image_key))?;
        let corners = [*y, *x, y + h, x + w];
        let mask = segmentation.rasterise(*height as usize, *width as usize).map_err(|e| DataError::File {
            path: instances_path.display().to_string(),
            msg: format!("annotation {ann_key}: {e}"),
        })?;
        if mask_vae.is_some() {
            crops.push(mask.crop_resized(crop_box(corners, &mask), MASK_SIDE as usize));
        }
        let first = examples.len();
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
                    "mask": mask.to_json(),
                })),
            });
        }
        records_of_crop.push(first..examples.len());
        Ok(())
    })?;
    if let Some(split) = split.filter(|_| examples.is_empty()) {
        return Err(empty_split(refs_path, "refs", split, splits));
    }
    if let Some(path) = mask_vae {
        for (codes, records) in mask_codes(path, &crops)?.iter().zip(records_of_crop) {
            let tokens: String = codes.iter().map(|c| format!("<seg{c:03}>")).collect();
            for example in &mut examples[records] {
                example.suffix.as_mut().expect("refcoco records have a suffix").push_str(&tokens);
            }
        }
    }
    Ok(examples)
}

/// An annotation's `segmentation`: COCO polygons, or (crowd regions) RLE, its counts a list
/// or a compressed string.
enum Segmentation {
    Polygons(Vec<Vec<f64>>),
    Counts(Vec<u64>),
}

impl Segmentation {
    fn read(node: &Node) -> Result<Segmentation, DataError> {
        if let Some(counts) = node.opt("counts") {
            let counts = match counts.value.as_str() {
                Some(text) => pg2_eval::mask::decompress(text).map_err(|e| counts.error(e))?,
                None => counts.items()?.iter().map(Node::u64).collect::<Result<_, _>>()?,
            };
            return Ok(Segmentation::Counts(counts));
        }
        let polygon = |p: &Node| p.items()?.iter().map(Node::number).collect::<Result<Vec<f64>, _>>();
        Ok(Segmentation::Polygons(node.items()?.iter().map(polygon).collect::<Result<_, _>>()?))
    }

    fn rasterise(&self, height: usize, width: usize) -> Result<Mask, String> {
        match self {
            Segmentation::Polygons(polygons) => Ok(Mask::from_polygons(polygons, height, width)),
            Segmentation::Counts(counts) => Mask::from_counts(counts, height, width),
        }
    }
}

/// The pixel rows and columns `refcoco_mask2str` crops: the box's corners as fractions of
/// the image (f32, as TFDS stores them) times its size, rounded half to even. A box thinner
/// than a pixel keeps one (big_vision's would be empty).
fn crop_box([y1, x1, y2, x2]: [f64; 4], mask: &Mask) -> [usize; 4] {
    let along = |a: f64, b: f64, size: usize| {
        let pixel =
            |c: f64| ((c / size as f64) as f32 * size as f32).round_ties_even().clamp(0.0, size as f32) as usize;
        let (start, end) = (pixel(a), pixel(b));
        if end > start {
            (start, end)
        } else {
            let end = (start + 1).min(size);
            (end - 1, end)
        }
    };
    let ((y1, y2), (x1, x2)) = (along(y1, y2, mask.height), along(x1, x2, mask.width));
    [y1, x1, y2, x2]
}

/// The VQ-VAE's 16 codes of each 64 x 64 crop (values in [0, 1]), encoded 256 at a time.
fn mask_codes(vae_path: &Path, crops: &[Vec<f32>]) -> Result<Vec<Vec<i64>>, DataError> {
    let error = |e: pg2_model::ModelError| DataError::File { path: vae_path.display().to_string(), msg: e.to_string() };
    let vae = MaskVae::load(vae_path).map_err(error)?;
    let mut codes = Vec::with_capacity(crops.len());
    for chunk in crops.chunks(256) {
        let masks = Tensor::from_slice(&chunk.concat()).view([chunk.len() as i64, MASK_SIDE, MASK_SIDE]);
        let encoded = Vec::<i64>::try_from(vae.encode(&masks).map_err(error)?.reshape([-1])).expect("i64 codes");
        codes.extend(encoded.chunks(CODES_PER_MASK).map(<[i64]>::to_vec));
    }
    Ok(codes)
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

    /// With big_vision's VQ-VAE (here the fixture's small one) the suffix goes on with the
    /// mask's codes, the ones `make_segmentation_fixture.py` computes as `refcoco_mask2str`
    /// does (pycocotools masks, TF's antialiased resize of the box crop, TF convolutions).
    #[test]
    fn refcoco_mask_tokens_from_the_vq_vae() {
        let tmp = TempDir::new("refcoco-masks");
        let mut a = args(Format::RefCoco, &["instances.json", "refs.json"], "train2014", &tmp.0.join("refcoco.jsonl"));
        let segmentation = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/segmentation");
        let expected: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(segmentation.join("segmentation.json")).unwrap()).unwrap();
        let without = convert_and_read(&a);
        a.mask_vae = Some(segmentation.join("vae-tiny.npz"));
        let records = convert_and_read(&a);
        for (record, plain) in records.iter().zip(&without) {
            let object = &expected["refcoco"][record.extra["ann_id"].to_string()];
            let codes: Vec<u8> = serde_json::from_value(object["codes"].clone()).unwrap();
            let seg: String = codes.iter().map(|c| format!("<seg{c:03}>")).collect();
            assert_eq!(record.suffix.as_deref().unwrap(), format!("{}{seg}", plain.suffix.as_deref().unwrap()));
            // The mask for the metric, in both conversions: pycocotools' rasterisation as RLE
            // (compressed as pycocotools compresses it).
            let counts = pg2_eval::mask::decompress(record.extra["mask"]["counts"].as_str().unwrap()).unwrap();
            assert_eq!(json!(counts), object["counts"]);
            assert_eq!(plain.extra["mask"], record.extra["mask"]);
        }
        assert_eq!(records[0].extra["mask"]["size"], json!([480, 640]));

        a.format = Format::Vqa;
        let err = convert(&a).unwrap_err().to_string();
        assert!(err.contains("--mask-vae only applies to refcoco"), "{err}");
        a.format = Format::RefCoco;
        a.mask_vae = Some(segmentation.join("segmentation.json"));
        let err = convert(&a).unwrap_err().to_string();
        assert!(err.contains("segmentation.json") && err.contains("cannot read the mask VQ-VAE"), "{err}");
    }

    /// Crowd annotations hold RLE, its counts a list or pycocotools' compressed string.
    #[test]
    fn rle_segmentations_rasterise_from_either_counts() {
        use super::Segmentation;
        use crate::convert::json::Node;
        let path = std::path::Path::new("instances.json");
        let mask = |value: serde_json::Value| {
            Segmentation::read(&Node::root(path, &value))?
                .rasterise(2, 2)
                .map_err(|e| crate::DataError::File { path: "instances.json".into(), msg: e })
        };
        // Runs 1, 2, 1 down the columns: (1, 0) and (0, 1) inside.
        for counts in [json!([1, 2, 1]), json!("121")] {
            let mask = mask(json!({"size": [2, 2], "counts": counts})).unwrap();
            assert_eq!(mask.pixels, [false, true, true, false]);
        }
        let err = mask(json!({"size": [2, 2], "counts": "12\u{7f}"})).unwrap_err().to_string();
        assert!(err.contains("instances.json") && err.contains("outside 0..o"), "{err}");
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
