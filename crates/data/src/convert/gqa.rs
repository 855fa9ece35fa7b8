//! `gqa`: GQA questions, the short answer as the target.

use std::path::PathBuf;

use serde_json::json;

use super::json::{read_json, Walk};
use super::{fields, vqa_prompt, wrong_inputs, Example, Format};
use crate::DataError;

/// `gqa`: GQA's `{train,val,testdev}_balanced_questions.json` (question id -> `{imageId,
/// question, answer, ...}`); one record per question in file order, prefix `answer en
/// {question}`, suffix = `answer` (`gqa.py`), `answers` = `[answer]` for exact match; `id` = the
/// question id, `image_id`. The image is `{imageId}.jpg`. Questions without an answer (the
/// challenge's test and submission files) have no suffix.
pub(super) fn gqa(inputs: &[PathBuf]) -> Result<Vec<Example>, DataError> {
    let [path] = inputs else {
        return Err(wrong_inputs(Format::Gqa, inputs));
    };
    let mut examples = Vec::new();
    read_json(path, Walk::Entries, |id, node| {
        let image_id = node.field("imageId")?.id()?;
        let answer = node.opt("answer").map(|n| n.str()).transpose()?;
        examples.push(Example {
            image: format!("{image_id}.jpg").into(),
            prefix: vqa_prompt(node.field("question")?.str()?),
            suffix: answer.map(str::to_owned),
            extra: fields(json!({"id": id, "image_id": image_id, "answers": answer.map(|a| [a])})),
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
    fn gqa_questions_in_file_order() {
        let tmp = TempDir::new("gqa");
        let f = Format::Gqa;
        let a = args(f, &["testdev_balanced_questions.json"], "images", &tmp.0.join("testdev.jsonl"));
        let records = convert_and_read(&a);
        assert_eq!(records.len(), 3);
        // File order (201307251 before 20968379), not sorted by id.
        assert_eq!(texts(&records[0]), ("answer en Is the sky dark?", Some("yes")));
        assert_eq!(texts(&records[1]), ("answer en What is the man wearing?", Some("T-shirt")));
        assert_eq!((&records[1].extra["id"], &records[1].extra["answers"]), (&json!("20968379"), &json!(["T-shirt"])));
        assert_eq!(records[0].extra["image_id"], json!("n288870"));
        assert_image(&records[0], f, "images/n288870.jpg");
        assert_image(&records[1], f, "images/n179136.jpg");
        // A question without an answer: no suffix, no answers.
        assert_eq!(texts(&records[2]), ("answer en Which color is the car?", None));
        assert!(!records[2].extra.contains_key("answers"));
    }
}
