//! `docci`: DOCCI images with their long descriptions.

use std::collections::BTreeSet;
use std::path::PathBuf;

use serde_json::json;

use super::json::read_jsonl;
use super::{empty_split, fields, known_split, wrong_inputs, Example, Format};
use crate::DataError;

/// `docci`: DOCCI's `docci_descriptions.jsonlines` (one `{example_id, split, image_file,
/// description}` a line); one record per image in file order, prefix `caption en` (the paper
/// gives no prompt for its DOCCI transfer), suffix = the description, `references` =
/// `[description]` for caption metrics, `id` = `example_id`. `split` keeps one of `train`,
/// `test`, `qual_dev`, `qual_test`. `image` is `image_file`, relative to `images/`.
pub(super) fn docci(inputs: &[PathBuf], split: Option<&str>) -> Result<Vec<Example>, DataError> {
    let [path] = inputs else {
        return Err(wrong_inputs(Format::Docci, inputs));
    };
    let split = known_split(Format::Docci, split, &["train", "test", "qual_dev", "qual_test"])?;
    let mut examples = Vec::new();
    let mut splits = BTreeSet::new();
    read_jsonl(path, |node| {
        let image_split = node.field("split")?.str()?;
        splits.insert(image_split.to_owned());
        if split.is_some_and(|s| s != image_split) {
            return Ok(());
        }
        let description = node.field("description")?.str()?;
        examples.push(Example {
            image: node.field("image_file")?.str()?.into(),
            prefix: "caption en".into(),
            suffix: Some(description.to_owned()),
            extra: fields(json!({
                "id": node.field("example_id")?.value,
                "split": image_split,
                "references": [description],
            })),
        });
        Ok(())
    })?;
    if let Some(split) = split.filter(|_| examples.is_empty()) {
        return Err(empty_split(path, "images", split, splits));
    }
    Ok(examples)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use crate::convert::test_support::{args, assert_image, convert_and_read, texts, TempDir};
    use crate::convert::{convert, Format};

    #[test]
    fn docci_descriptions_by_split() {
        let tmp = TempDir::new("docci");
        let f = Format::Docci;
        let mut a = args(f, &["docci_descriptions.jsonlines"], "images", &tmp.0.join("docci.jsonl"));
        assert_eq!(convert_and_read(&a).len(), 3);
        a.split = Some("train".into());
        let records = convert_and_read(&a);
        assert_eq!(records.len(), 1);
        let description = "A close-up view of a red brick wall. A small green plant grows from a crack.";
        assert_eq!(texts(&records[0]), ("caption en", Some(description)));
        assert_eq!(records[0].extra["references"], json!([description]));
        assert_eq!(records[0].extra["id"], json!("train_00000"));
        assert_image(&records[0], f, "images/train_00000.jpg");

        a.split = Some("qual_test".into());
        let err = convert(&a).unwrap_err().to_string();
        assert!(err.contains("no images in split `qual_test` (found: qual_dev, test, train)"), "{err}");
    }
}
