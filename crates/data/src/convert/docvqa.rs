//! `docvqa`: DocVQA questions, the first answer as the target.

use std::path::PathBuf;

use serde_json::json;

use super::json::{read_json, Walk};
use super::{answers_or_null, fields, wrong_inputs, Example, Format};
use crate::DataError;

/// `docvqa`: prefix = the question as it is (`docvqa.py` `copy(inkey="question",
/// outkey="prefix")`: no `answer en`); suffix = the first answer (big_vision draws one of
/// `answers` each step); `answers` = all, for ANLS. The test split has no answers, hence no
/// suffix. `image` is relative to the images folder (`documents/xxx.png`).
pub(super) fn docvqa(inputs: &[PathBuf]) -> Result<Vec<Example>, DataError> {
    let [path] = inputs else {
        return Err(wrong_inputs(Format::DocVqa, inputs));
    };
    let mut examples = Vec::new();
    read_json(path, Walk::Arrays(&["data"]), |_, node| {
        let answers = node.opt("answers").map(|n| n.strings()).transpose()?.unwrap_or_default();
        examples.push(Example {
            image: node.field("image")?.str()?.into(),
            prefix: node.field("question")?.str()?.to_owned(),
            suffix: answers.first().cloned(),
            extra: fields(json!({
                "id": node.field("questionId")?.value,
                "doc_id": node.opt("docId").map(|n| n.value.clone()),
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
    fn docvqa_question_prompt_first_answer() {
        let tmp = TempDir::new("docvqa");
        let f = Format::DocVqa;
        let records = convert_and_read(&args(f, &["val_v1.0.json"], ".", &tmp.0.join("docvqa.jsonl")));
        assert_eq!(texts(&records[0]), ("What is the 'actual' value per 1000, during the year 1975?", Some("0.28")));
        assert_eq!(texts(&records[1]), ("What is name of university?", Some("university of california")));
        assert_eq!(records[1].extra["answers"].as_array().unwrap().len(), 3);
        assert_eq!((&records[1].extra["id"], &records[1].extra["doc_id"]), (&json!(24580), &json!(2347)));
        assert_image(&records[0], f, "documents/pybv0228_81.png");
        assert_image(&records[1], f, "documents/nkbl0226_1.png");
    }
}
