//! `vizwiz`: VizWiz VQA questions, the most common answer as the target.

use std::path::PathBuf;

use serde_json::json;

use super::json::{read_json, Walk};
use super::{answers_or_null, fields, most_common, vqa_prompt, wrong_inputs, Example, Format};
use crate::DataError;

/// `vizwiz`: VizWiz VQA's `Annotations/{train,val,test}.json` (a list of `{image, question,
/// answers: [{answer, answer_confidence}], answer_type, answerable}`); one record per question
/// in file order, prefix `answer en {question}` (`vizwizvqa.py`), suffix = the most common of
/// the 10 answers, the first on ties, as `textvqa` picks (big_vision draws one per visit),
/// `answers` = all 10 for VQA accuracy ("unanswerable" ones included), `id` = the image name.
/// The test split has no answers, hence no suffix.
pub(super) fn vizwiz(inputs: &[PathBuf]) -> Result<Vec<Example>, DataError> {
    let [path] = inputs else {
        return Err(wrong_inputs(Format::VizWiz, inputs));
    };
    let mut examples = Vec::new();
    read_json(path, Walk::Elements, |_, node| {
        let answers = match node.opt("answers") {
            Some(list) => {
                list.items()?.iter().map(|a| Ok(a.field("answer")?.str()?.to_owned())).collect::<Result<_, _>>()?
            }
            None => Vec::new(),
        };
        let image = node.field("image")?.str()?;
        examples.push(Example {
            image: image.into(),
            prefix: vqa_prompt(node.field("question")?.str()?),
            suffix: most_common(&answers).map(str::to_owned),
            extra: fields(json!({
                "id": image,
                "answer_type": node.opt("answer_type").map(|n| n.value.clone()),
                "answerable": node.opt("answerable").map(|n| n.value.clone()),
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
    fn vizwiz_suffix_is_the_most_common_answer() {
        let tmp = TempDir::new("vizwiz");
        let f = Format::VizWiz;
        let records = convert_and_read(&args(f, &["Annotations/val.json"], "val", &tmp.0.join("val.jsonl")));
        assert_eq!(records.len(), 2);
        // "coca cola" 4 times, "coke" 5 times.
        assert_eq!(texts(&records[0]), ("answer en What is this drink?", Some("coke")));
        assert_eq!(records[0].extra["answers"].as_array().unwrap().len(), 10);
        assert_eq!(
            (&records[0].extra["id"], &records[0].extra["answerable"]),
            (&json!("VizWiz_val_00000000.jpg"), &json!(1))
        );
        assert_eq!(texts(&records[1]), ("answer en What color is this shirt?", Some("unanswerable")));
        assert_image(&records[0], f, "val/VizWiz_val_00000000.jpg");
        assert_image(&records[1], f, "val/VizWiz_val_00000001.jpg");

        let records = convert_and_read(&args(f, &["Annotations/test.json"], "val", &tmp.0.join("test.jsonl")));
        assert_eq!(texts(&records[0]), ("answer en What is on the screen?", None));
        assert!(!records[0].extra.contains_key("answers"));
    }
}
