//! `vqav2`: VQAv2 questions with their annotations (none for test).

use std::collections::HashMap;
use std::path::PathBuf;

use serde_json::json;

use super::json::{id_text, read_json, Node, Walk};
use super::{fields, vqa_prompt, wrong_inputs, Example, Format};
use crate::DataError;

/// `vqav2`: prefix `answer en {question}` (`vqav2.py` `strfmt("answer en {question_text}")`);
/// suffix = `multiple_choice_answer`, the annotators' consensus (big_vision instead draws one
/// of the 10 answers each step); `answers` = the 10 answers, plus `answer_type` and
/// `question_type` for per-type accuracy. Without an annotations file (test) there is no suffix.
pub(super) fn vqav2(inputs: &[PathBuf]) -> Result<Vec<Example>, DataError> {
    let (questions_path, annotations_path) = match inputs {
        [q] => (q, None),
        [q, a] => (q, Some(a)),
        _ => return Err(wrong_inputs(Format::Vqa, inputs)),
    };
    let mut questions = Vec::new(); // (node path, question id, image id, question)
    let top = read_json(questions_path, Walk::Arrays(&["questions"]), |_, node| {
        let id = node.field("question_id")?.value.clone();
        let image_id = node.field("image_id")?.u64()?;
        questions.push((node.at.clone(), id, image_id, node.field("question")?.str()?.to_owned()));
        Ok(())
    })?;
    let subtype = Node::root(questions_path, &top).field("data_subtype")?.str()?.to_owned();
    // test-dev questions are a subset of test2015 and name their images after it.
    let image_subtype = if subtype == "test-dev2015" { "test2015".to_owned() } else { subtype };

    let mut annotations = HashMap::new(); // question id -> fields
    if let Some(path) = annotations_path {
        read_json(path, Walk::Arrays(&["annotations"]), |_, node| {
            let answers = node.field("answers")?.items()?;
            let answers: Vec<_> =
                answers.iter().map(|a| Ok(a.field("answer")?.str()?.to_owned())).collect::<Result<_, DataError>>()?;
            let extra = json!({
                "answers": answers,
                "answer_type": node.opt("answer_type").map(|n| n.value.clone()),
                "question_type": node.opt("question_type").map(|n| n.value.clone()),
            });
            let answer = node.field("multiple_choice_answer")?.str()?.to_owned();
            annotations.insert(node.field("question_id")?.id()?, (answer, extra));
            Ok(())
        })?;
    }

    questions
        .into_iter()
        .map(|(at, id, image_id, question)| {
            let mut extra = fields(json!({"id": id, "image_id": image_id}));
            let mut suffix = None;
            if let Some(path) = annotations_path {
                let (answer, more) = annotations.remove(&id_text(&id)).ok_or_else(|| DataError::File {
                    path: path.display().to_string(),
                    msg: format!("no annotation for question_id {id} (`{at}` of {})", questions_path.display()),
                })?;
                suffix = Some(answer);
                extra.extend(fields(more));
            }
            Ok(Example {
                image: format!("COCO_{image_subtype}_{image_id:012}.jpg").into(),
                prefix: vqa_prompt(&question),
                suffix,
                extra,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use crate::convert::test_support::{args, assert_image, convert_and_read, texts, TempDir};
    use crate::convert::Format;

    #[test]
    fn vqav2_with_and_without_annotations() {
        let tmp = TempDir::new("vqa");
        let f = Format::Vqa;
        let inputs = ["v2_OpenEnded_mscoco_val2014_questions.json", "v2_mscoco_val2014_annotations.json"];
        let records = convert_and_read(&args(f, &inputs, "val2014", &tmp.0.join("val.jsonl")));
        assert_eq!(records.len(), 2);
        // Questions order; the annotations file lists them the other way round.
        assert_eq!(texts(&records[0]), ("answer en What color is the couch?", Some("red")));
        assert_eq!(texts(&records[1]), ("answer en How many bikes are there?", Some("2")));
        assert_image(&records[0], f, "val2014/COCO_val2014_000000000042.jpg");
        assert_image(&records[1], f, "val2014/COCO_val2014_000000000073.jpg");
        let extra = &records[0].extra;
        assert_eq!(
            (&extra["id"], &extra["image_id"], &extra["answer_type"]),
            (&json!(42000), &json!(42), &json!("other"))
        );
        let answers: Vec<_> = extra["answers"].as_array().unwrap().iter().map(|a| a.as_str().unwrap()).collect();
        assert_eq!(answers, ["red", "red", "maroon", "red", "red", "dark red", "red", "red", "red", "red"]);
        assert_eq!(records[1].extra["question_type"], "how many");

        // test-dev: no annotations, so no suffix; its images are test2015's.
        let inputs = ["v2_OpenEnded_mscoco_test-dev2015_questions.json"];
        let records = convert_and_read(&args(f, &inputs, "test2015", &tmp.0.join("test.jsonl")));
        assert_eq!(texts(&records[0]), ("answer en Is it raining?", None));
        assert_image(&records[0], f, "test2015/COCO_test2015_000000000099.jpg");
        assert!(!records[0].extra.contains_key("answers"));
    }
}
