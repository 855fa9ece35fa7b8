//! `ai2d`: AI2D diagram questions, the options in the prompt.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use serde_json::json;

use super::json::{read_value, Node};
use super::{fields, folder_files, known_split, natural_key, required_split, wrong_inputs, Example, Format};
use crate::DataError;

/// `ai2d`: AI2D's `questions/` folder (one `{image}.json` per diagram: `imageName` and
/// `questions`, a map from question text to `{answerTexts, correctAnswer, abcLabel,
/// questionId}`) and `ai2d_test_ids.csv` (the test diagrams' ids, one a line). `split` `test`
/// keeps the diagrams the csv lists, `train` the others. One record per question, diagrams in
/// id order and their questions in `questionId` order; prefix as `ai2d.py` builds it:
/// `answer en  {question} choose from: {a} \t {b} \t ...` (its `PREFIX = 'answer en '`
/// followed by ` {question}` gives two spaces; the options joined by ` \t `), suffix = the
/// correct option's text, `answers` = `[suffix]` for `exact_cased`, `id` = `questionId`,
/// `abc_label` (whether the options are the diagram's letter labels). `image` is `imageName`,
/// relative to `images/`.
pub(super) fn ai2d(inputs: &[PathBuf], split: Option<&str>) -> Result<Vec<Example>, DataError> {
    let [questions_dir, test_ids_path] = inputs else {
        return Err(wrong_inputs(Format::Ai2d, inputs));
    };
    let test = required_split(Format::Ai2d, known_split(Format::Ai2d, split, &["train", "test"])?)? == "test";
    let file_error = |path: &Path, msg: String| DataError::File { path: path.display().to_string(), msg };
    let test_ids = std::fs::read_to_string(test_ids_path).map_err(|e| file_error(test_ids_path, e.to_string()))?;
    let test_ids: HashSet<&str> = test_ids.lines().map(str::trim).filter(|l| !l.is_empty()).collect();

    // `12.png.json` holds the questions on diagram 12.
    let files = folder_files(questions_dir, ".json")?;
    let files = files.into_iter().filter(|(name, _)| test_ids.contains(name.split('.').next().unwrap_or(name)) == test);

    let mut examples = Vec::new();
    for (_, path) in files {
        let value = read_value(&path)?;
        let diagram = Node::root(&path, &value);
        let image = diagram.field("imageName")?.str()?;
        let questions = diagram.field("questions")?.entries()?.into_iter();
        let mut questions = questions
            .map(|(text, node)| Ok((node.field("questionId")?.str()?, text, node)))
            .collect::<Result<Vec<_>, DataError>>()?;
        questions.sort_by(|a, b| natural_key(a.0).cmp(&natural_key(b.0)));
        for (id, question, node) in questions {
            let options = node.field("answerTexts")?.strings()?;
            let correct = node.field("correctAnswer")?;
            let answer = options
                .get(correct.u64()? as usize)
                .ok_or_else(|| correct.error(format!("no option {} among {}", correct.value, options.len())))?;
            examples.push(Example {
                image: image.into(),
                prefix: format!("answer en  {question} choose from: {}", options.join(" \t ")),
                suffix: Some(answer.clone()),
                extra: fields(json!({
                    "id": id,
                    "abc_label": node.opt("abcLabel").map(|n| n.value.clone()),
                    "answers": [answer],
                })),
            });
        }
    }
    Ok(examples)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use crate::convert::test_support::{args, assert_image, convert_and_read, texts, TempDir};
    use crate::convert::{convert, Format};

    #[test]
    fn ai2d_options_in_the_prompt_split_by_test_ids() {
        let tmp = TempDir::new("ai2d");
        let f = Format::Ai2d;
        let mut a = args(f, &["questions", "ai2d_test_ids.csv"], "images", &tmp.0.join("ai2d.jsonl"));
        a.split = Some("train".into());
        let records = convert_and_read(&a);
        // Diagram 2 before diagram 10; in diagram 2, question 2.png-2 before 2.png-10.
        let ids: Vec<_> = records.iter().map(|r| r.extra["id"].as_str().unwrap()).collect();
        assert_eq!(ids, ["2.png-2", "2.png-10", "10.png-0"]);
        assert_eq!(
            texts(&records[0]),
            ("answer en  Which of these is a producer? choose from: grass \t fox \t rabbit \t hawk", Some("grass"))
        );
        assert_eq!(records[0].extra["answers"], json!(["grass"]));
        assert_eq!(records[0].extra["abc_label"], json!(false));
        assert_eq!(texts(&records[1]).1, Some("C")); // case kept, as the options
        assert_eq!(records[1].extra["abc_label"], json!(true));
        assert_image(&records[0], f, "images/2.png");
        assert_image(&records[2], f, "images/10.png");

        a.split = Some("test".into());
        let records = convert_and_read(&a);
        assert_eq!(records.iter().map(|r| r.extra["id"].as_str().unwrap()).collect::<Vec<_>>(), ["7.png-0"]);
        assert_eq!(records[0].suffix.as_deref(), Some("the Sun"));

        a.split = None;
        assert!(convert(&a).unwrap_err().to_string().contains("--split is required"));
    }
}
