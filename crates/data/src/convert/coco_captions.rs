//! `coco-captions`: COCO captions, one record per image with all its captions.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use super::json::{id_text, read_json, Walk};
use super::{fields, usage_error, wrong_inputs, Example, Format};
use crate::DataError;

/// `coco-captions`: one record per captioned image, `suffix` = its first caption,
/// `references` = all its captions, as big_vision's `coco_captions` examples: training draws
/// one caption per visit (`suffix_from = "references"`, big_vision's
/// `choice_no_replacement(inkey="captions/text")`) and CIDEr scores one prediction per image.
/// Reads COCO's `captions_*.json` (records in the order of `images`), or with `split`
/// Karpathy's `dataset_coco.json`, whose splits big_vision's TFDS `coco_captions` has:
/// `train` = Karpathy's train + restval (big_vision's `train+restval`), `val`, `test`.
/// Captions are trimmed (some COCO captions end in spaces or a newline).
pub(super) fn coco_captions(inputs: &[PathBuf], split: Option<&str>) -> Result<Vec<Example>, DataError> {
    let [path] = inputs else {
        return Err(wrong_inputs(Format::CocoCaptions, inputs));
    };
    let images = match split {
        None => coco_format(path)?,
        Some(split) => karpathy(path, split)?,
    };
    Ok(images
        .into_iter()
        .map(|(file, image_id, references)| Example {
            image: file.into(),
            prefix: "caption en".into(),
            suffix: Some(references[0].clone()),
            extra: fields(json!({"image_id": image_id, "references": references})),
        })
        .collect())
}

/// Image file, image id and captions of each captioned image.
type Captioned = Vec<(String, Value, Vec<String>)>;

fn coco_format(path: &Path) -> Result<Captioned, DataError> {
    let mut images = Vec::new(); // (id key, file_name, id)
    let mut captions: HashMap<String, (String, Vec<String>)> = HashMap::new(); // id key -> (first place, captions)
    read_json(path, Walk::Arrays(&["images", "annotations"]), |array, node| {
        if array == "images" {
            let id = node.field("id")?;
            images.push((id.id()?, node.field("file_name")?.str()?.to_owned(), id.value.clone()));
        } else {
            let text = node.field("caption")?.str()?.trim().to_owned();
            let key = id_text(node.field("image_id")?.value);
            captions.entry(key).or_insert_with(|| (node.at.clone(), vec![])).1.push(text);
        }
        Ok(())
    })?;
    let known: std::collections::HashSet<&String> = images.iter().map(|(key, ..)| key).collect();
    if let Some((key, (at, _))) = captions.iter().filter(|(key, _)| !known.contains(key)).min_by_key(|(_, (at, _))| at)
    {
        return Err(DataError::File {
            path: path.display().to_string(),
            msg: format!("`{at}.image_id`: no image with id {key} in `images`"),
        });
    }
    Ok(images.into_iter().filter_map(|(key, file, id)| Some((file, id, captions.remove(&key)?.1))).collect())
}

fn karpathy(path: &Path, split: &str) -> Result<Captioned, DataError> {
    let wanted: &[&str] = match split {
        "train" => &["train", "restval"],
        "val" => &["val"],
        "test" => &["test"],
        other => {
            let msg = format!("unknown split `{other}` (train = Karpathy's train + restval, val or test)");
            return Err(usage_error(Format::CocoCaptions, &msg));
        }
    };
    let mut images = Vec::new();
    read_json(path, Walk::Arrays(&["images"]), |_, node| {
        if wanted.contains(&node.field("split")?.str()?) {
            let file = format!("{}/{}", node.field("filepath")?.str()?, node.field("filename")?.str()?);
            let captions = (node.field("sentences")?.items()?.iter())
                .map(|s| Ok(s.field("raw")?.str()?.trim().to_owned()))
                .collect::<Result<Vec<String>, DataError>>()?;
            if captions.is_empty() {
                return Err(node.error("an image without `sentences`"));
            }
            images.push((file, node.field("cocoid")?.value.clone(), captions));
        }
        Ok(())
    })?;
    Ok(images)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use crate::convert::test_support::{args, assert_image, convert_and_read, no_temporary, texts, TempDir};
    use crate::convert::Format;

    #[test]
    fn coco_captions_one_record_per_image_with_its_captions() {
        let tmp = TempDir::new("coco");
        let output = tmp.0.join("out/coco.jsonl"); // a folder convert has to create
        let f = Format::CocoCaptions;
        let records = convert_and_read(&args(f, &["captions_val2014.json"], "val2014", &output));
        assert_eq!(records.len(), 2, "one record per image");
        // The order of `images`; the first caption (in annotation order) is the suffix.
        assert_eq!(texts(&records[0]), ("caption en", Some("A dog on a red couch.")));
        assert_eq!(texts(&records[1]), ("caption en", Some("Two bikes leaning on a wall."))); // trimmed
        assert_image(&records[0], f, "val2014/COCO_val2014_000000000042.jpg");
        assert_image(&records[1], f, "val2014/COCO_val2014_000000000073.jpg");
        assert_eq!(records[0].extra["references"], json!(["A dog on a red couch.", "a small dog sleeping"]));
        assert_eq!(records[1].extra["references"], json!(["Two bikes leaning on a wall."]));
        assert_eq!(records[1].extra["image_id"], json!(73));
        assert!(no_temporary(output.parent().unwrap()), "no temporary left");
    }

    /// NoCaps' `nocaps_val_4500_captions.json` is in COCO's format: one record per image with
    /// its 10 captions.
    #[test]
    fn nocaps_val_reads_as_coco_captions() {
        let tmp = TempDir::new("nocaps");
        let f = Format::CocoCaptions;
        let a = args(f, &["nocaps_val_4500_captions.json"], "nocaps-val", &tmp.0.join("nocaps.jsonl"));
        let records = convert_and_read(&a);
        assert_eq!(records.len(), 1);
        assert_eq!(texts(&records[0]), ("caption en", Some("A man riding a red bicycle.")));
        let references = records[0].extra["references"].as_array().unwrap();
        assert_eq!((references.len(), &references[9]), (10, &json!("a man riding his bicycle")));
        assert_eq!(records[0].extra["image_id"], json!(0));
        assert_image(&records[0], f, "nocaps-val/0013ea2087020901.jpg");
    }

    #[test]
    fn karpathy_splits_train_on_train_and_restval() {
        let tmp = TempDir::new("karpathy");
        let f = Format::CocoCaptions;
        let mut a = args(f, &["dataset_coco.json"], ".", &tmp.0.join("train.jsonl"));
        a.split = Some("train".into());
        let records = convert_and_read(&a);
        assert_eq!(records.len(), 2, "train + restval");
        assert_eq!(texts(&records[0]), ("caption en", Some("A dog on a red couch.")));
        assert_eq!(records[0].extra["references"], json!(["A dog on a red couch.", "a small dog sleeping"]));
        assert_eq!(
            (&records[1].extra["image_id"], &records[1].extra["references"]),
            (&json!(73), &json!(["Two bikes."]))
        );
        assert_image(&records[1], f, "val2014/COCO_val2014_000000000073.jpg");
        a.split = Some("val".into());
        let records = convert_and_read(&a);
        assert_eq!((records.len(), records[0].suffix.as_deref()), (1, Some("A brown dog.")));
        a.split = Some("minival".into());
        let err = crate::convert::convert(&a).unwrap_err().to_string();
        assert!(err.contains("unknown split `minival`"), "{err}");
    }
}
