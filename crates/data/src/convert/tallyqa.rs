//! `tallyqa`: TallyQA counting questions, the count in digits as the target.

use std::path::PathBuf;

use serde_json::json;

use super::json::{read_json, Walk};
use super::{fields, known_split, vqa_prompt, wrong_inputs, Example, Format};
use crate::DataError;

/// `tallyqa`: TallyQA's `train.json` or `test.json` (a list of `{image, question, answer,
/// issimple, question_id, image_id, data_source}`); one record per question in file order,
/// prefix `answer en {question}`, suffix = the count in digits (`tallyqa.py`:
/// `strfmt("{answer}")`), `answers` = `[suffix]`, `issimple` kept. `split` `simple` or
/// `complex` keeps the questions with that `issimple` (the test file holds both kinds, which
/// big_vision scores apart). `image` is relative to the folder holding COCO's `train2014/`,
/// `val2014/` and Visual Genome's `VG_100K/`, `VG_100K_2/`.
pub(super) fn tallyqa(inputs: &[PathBuf], split: Option<&str>) -> Result<Vec<Example>, DataError> {
    let [path] = inputs else {
        return Err(wrong_inputs(Format::TallyQa, inputs));
    };
    let wanted = known_split(Format::TallyQa, split, &["simple", "complex"])?.map(|s| s == "simple");
    let mut examples = Vec::new();
    read_json(path, Walk::Elements, |_, node| {
        let issimple = node.opt("issimple").map(|n| n.bool()).transpose()?;
        if let Some(wanted) = wanted {
            let issimple = issimple.ok_or_else(|| node.error("missing key `issimple` (needed by --split)"))?;
            if issimple != wanted {
                return Ok(());
            }
        }
        let count = node.field("answer")?.u64()?.to_string();
        examples.push(Example {
            image: node.field("image")?.str()?.into(),
            prefix: vqa_prompt(node.field("question")?.str()?),
            suffix: Some(count.clone()),
            extra: fields(json!({
                "id": node.opt("question_id").map(|n| n.value.clone()),
                "image_id": node.opt("image_id").map(|n| n.value.clone()),
                "data_source": node.opt("data_source").map(|n| n.value.clone()),
                "issimple": issimple,
                "answers": [count],
            })),
        });
        Ok(())
    })?;
    Ok(examples)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use crate::convert::test_support::{args, assert_image, convert_and_read, texts, TempDir};
    use crate::convert::{convert, Format};

    #[test]
    fn tallyqa_counts_as_digits_split_by_issimple() {
        let tmp = TempDir::new("tallyqa");
        let f = Format::TallyQa;
        let mut a = args(f, &["test.json"], ".", &tmp.0.join("test.jsonl"));
        let records = convert_and_read(&a);
        assert_eq!(records.len(), 3);
        assert_eq!(texts(&records[0]), ("answer en How many giraffes are there?", Some("2")));
        assert_eq!(texts(&records[1]), ("answer en How many people are wearing hats?", Some("0")));
        assert_eq!(records[0].extra["answers"], json!(["2"]));
        assert_eq!((&records[0].extra["issimple"], &records[0].extra["id"]), (&json!(true), &json!(7)));
        assert_image(&records[0], f, "train2014/COCO_train2014_000000000009.jpg");
        assert_image(&records[1], f, "VG_100K_2/2400001.jpg");

        a.split = Some("complex".into());
        let records = convert_and_read(&a);
        let prompts: Vec<_> = records.iter().map(|r| r.prefix.as_str()).collect();
        assert_eq!(prompts, ["answer en How many people are wearing hats?", "answer en How many cars are red?"]);
        a.split = Some("hard".into());
        assert!(convert(&a).unwrap_err().to_string().contains("unknown split `hard` (one of simple, complex)"));
    }
}
