//! `textvqa`: TextVQA questions, the most common answer as the target.

use std::path::PathBuf;

use serde_json::json;

use super::json::{read_json, Walk};
use super::{answers_or_null, fields, most_common, vqa_prompt, wrong_inputs, Example, Format};
use crate::DataError;

/// `textvqa`: prefix `answer en {question}` (`textvqa.py`); suffix = the most common of the 10
/// answers, the first to reach the top count on ties, as big_vision's `majority` op
/// (`tf.unique_with_counts` + `argmax`) picks (its TextVQA training draws a random answer);
/// `answers` = all. The test split has no answers, hence no suffix.
pub(super) fn textvqa(inputs: &[PathBuf]) -> Result<Vec<Example>, DataError> {
    let [path] = inputs else {
        return Err(wrong_inputs(Format::TextVqa, inputs));
    };
    let mut examples = Vec::new();
    read_json(path, Walk::Arrays(&["data"]), |_, node| {
        let answers = node.opt("answers").map(|n| n.strings()).transpose()?.unwrap_or_default();
        examples.push(Example {
            image: format!("{}.jpg", node.field("image_id")?.id()?).into(),
            prefix: vqa_prompt(node.field("question")?.str()?),
            suffix: most_common(&answers).map(str::to_owned),
            extra: fields(json!({
                "id": node.field("question_id")?.value,
                "image_id": node.field("image_id")?.value,
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
    fn textvqa_suffix_is_the_most_common_answer() {
        let tmp = TempDir::new("textvqa");
        let f = Format::TextVqa;
        let records = convert_and_read(&args(f, &["TextVQA_0.5.1_train.json"], "train_images", &tmp.0.join("t.jsonl")));
        // nokia and samsung both 4 times: the first to appear wins.
        assert_eq!(texts(&records[0]), ("answer en what brand is the phone?", Some("nokia")));
        // "stop!" comes first, but "stop" is the majority (6 of 10).
        assert_eq!(texts(&records[1]), ("answer en what does the sign say?", Some("stop")));
        assert_image(&records[0], f, "train_images/003a8ae2ef43b901.jpg");
        assert_image(&records[1], f, "train_images/0054c91397f2fe05.jpg");
        assert_eq!(records[1].extra["answers"].as_array().unwrap().len(), 10);
        assert_eq!(
            (&records[1].extra["id"], &records[1].extra["image_id"]),
            (&json!(34603), &json!("0054c91397f2fe05"))
        );

        let records =
            convert_and_read(&args(f, &["TextVQA_0.5.1_test.json"], "train_images", &tmp.0.join("test.jsonl")));
        assert_eq!(texts(&records[0]), ("answer en what time is it?", None));
        assert!(!records[0].extra.contains_key("answers"));
    }
}
