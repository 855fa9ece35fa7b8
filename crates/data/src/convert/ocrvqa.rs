//! `ocrvqa`: OCR-VQA book covers and their questions, with a split filter.

use std::path::{Path, PathBuf};

use serde_json::json;

use super::json::{read_json, Walk};
use super::{fields, usage_error, vqa_prompt, wrong_inputs, Example, Format};
use crate::DataError;

/// `ocrvqa`: `dataset.json` maps a book id to its cover URL and questions; one record per
/// question in file order, prefix `answer en {question}`, suffix = its answer (`ocrvqa.py`),
/// `id` = the book id with `question_index`, `answers` = `[answer]`. The image is
/// `{id}{extension of imageURL}`, as the dataset's download script names it.
pub(super) fn ocrvqa(inputs: &[PathBuf], split: Option<&str>) -> Result<Vec<Example>, DataError> {
    let [path] = inputs else {
        return Err(wrong_inputs(Format::OcrVqa, inputs));
    };
    let wanted = match split {
        None => None,
        Some("train") => Some(1),
        Some("val") => Some(2),
        Some("test") => Some(3),
        Some(other) => {
            return Err(usage_error(Format::OcrVqa, &format!("unknown split `{other}` (train, val or test)")))
        }
    };
    let mut examples = Vec::new();
    read_json(path, Walk::Entries, |id, node| {
        let book_split = node.field("split")?.u64()?;
        if wanted.is_some_and(|w| w != book_split) {
            return Ok(());
        }
        let url = node.field("imageURL")?.str()?;
        let extension = Path::new(url).extension().map(|e| format!(".{}", e.to_string_lossy())).unwrap_or_default();
        let questions = node.field("questions")?.strings()?;
        let answers = node.field("answers")?.strings()?;
        if questions.len() != answers.len() {
            let msg = format!("{} questions but {} answers", questions.len(), answers.len());
            return Err(node.error(msg));
        }
        for (index, (question, answer)) in questions.iter().zip(answers).enumerate() {
            examples.push(Example {
                image: format!("{id}{extension}").into(),
                prefix: vqa_prompt(question),
                suffix: Some(answer.clone()),
                extra: fields(json!({"id": id, "question_index": index, "answers": [answer]})),
            });
        }
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
    fn ocrvqa_keeps_file_order_and_filters_splits() {
        let tmp = TempDir::new("ocrvqa");
        let f = Format::OcrVqa;
        let mut a = args(f, &["dataset.json"], "images", &tmp.0.join("all.jsonl"));
        let records = convert_and_read(&a);
        // File order (1439226393 before 0061120081), not sorted by id.
        let ids: Vec<_> = records
            .iter()
            .map(|r| (r.extra["id"].as_str().unwrap(), r.extra["question_index"].as_u64().unwrap()))
            .collect();
        assert_eq!(
            ids,
            [("1439226393", 0), ("1439226393", 1), ("1439226393", 2), ("0061120081", 0), ("B00TEST003", 0)]
        );
        assert_eq!(texts(&records[0]), ("answer en Who wrote this book?", Some("Jane Doe")));
        assert_eq!(texts(&records[2]), ("answer en Is this a comedy book?", Some("No")));
        assert_eq!(records[1].extra["answers"], json!(["A Tiny Book"]));
        assert_image(&records[0], f, "images/1439226393.jpg");
        assert_image(&records[3], f, "images/0061120081.png"); // extension from imageURL

        a.split = Some("val".into());
        let records = convert_and_read(&a);
        assert_eq!(records.len(), 1);
        assert_eq!(texts(&records[0]), ("answer en What type of book is this?", Some("Literature & Fiction")));
        a.split = Some("train".into());
        assert_eq!(convert_and_read(&a).len(), 3);
        a.split = Some("dev".into());
        assert!(convert(&a).unwrap_err().to_string().contains("unknown split `dev`"));
    }
}
