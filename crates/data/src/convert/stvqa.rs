//! `stvqa`: ST-VQA (scene-text VQA) questions, answers lower-cased.

use std::path::PathBuf;

use serde_json::json;

use super::json::{read_json, Walk};
use super::{answers_or_null, fields, vqa_prompt, wrong_inputs, Example, Format};
use crate::DataError;

/// `stvqa`: ST-VQA's `train_task_3.json` or `test_task_3.json` (`data`: a list of `{file_path,
/// question, answers, question_id, dataset, ...}`); one record per question in file order,
/// prefix `answer en {question}`, answers lower-cased as `stvqa.py` does (`lower(key="answers")`,
/// as the official evaluation), suffix = the first, `answers` = all (big_vision draws one per
/// visit and scores ANLS against all). `image` is `file_path`, relative to the folder holding
/// the dataset's sub-folders (`coco-text/`, `imageNet/`, ...). The test files have no answers,
/// hence no suffix.
pub(super) fn stvqa(inputs: &[PathBuf]) -> Result<Vec<Example>, DataError> {
    let [path] = inputs else {
        return Err(wrong_inputs(Format::StVqa, inputs));
    };
    let mut examples = Vec::new();
    read_json(path, Walk::Arrays(&["data"]), |_, node| {
        let answers = node.opt("answers").map(|n| n.strings()).transpose()?.unwrap_or_default();
        let answers: Vec<String> = answers.iter().map(|a| a.to_lowercase()).collect();
        examples.push(Example {
            image: node.field("file_path")?.str()?.into(),
            prefix: vqa_prompt(node.field("question")?.str()?),
            suffix: answers.first().cloned(),
            extra: fields(json!({
                "id": node.field("question_id")?.value,
                "dataset": node.opt("dataset").map(|n| n.value.clone()),
                "answers": answers_or_null(&answers),
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
    use crate::convert::Format;

    #[test]
    fn stvqa_answers_lower_cased() {
        let tmp = TempDir::new("stvqa");
        let f = Format::StVqa;
        let records = convert_and_read(&args(f, &["train_task_3.json"], ".", &tmp.0.join("train.jsonl")));
        assert_eq!(records.len(), 2);
        assert_eq!(texts(&records[0]), ("answer en What is the name of the bakery?", Some("dunkin' donuts")));
        assert_eq!(records[0].extra["answers"], json!(["dunkin' donuts", "dunkin donuts"]));
        assert_eq!((&records[0].extra["id"], &records[0].extra["dataset"]), (&json!(1), &json!("coco-text")));
        assert_eq!(texts(&records[1]), ("answer en What number is on the bus?", Some("42")));
        assert_image(&records[0], f, "coco-text/COCO_train2014_000000000009.jpg");
        assert_image(&records[1], f, "imageNet/n02701002_1234.JPEG");
    }
}
