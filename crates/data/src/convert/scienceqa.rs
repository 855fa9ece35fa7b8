//! `scienceqa`: ScienceQA image questions, lettered options in the prompt.

use std::collections::{BTreeSet, HashSet};
use std::path::PathBuf;

use serde_json::json;

use super::json::{read_json, Walk};
use super::{fields, required_split, wrong_inputs, Example, Format};
use crate::mixture::{choice_letter, lettered_choices};
use crate::DataError;

/// `scienceqa`: ScienceQA's `problems.json` (pid -> problem) and `pid_splits.json` (split name
/// -> pids); `split` names one of the latter's lists (`train`, `val`, `test`, `minival`, ...).
/// One record per problem of the split that has an image (text-only problems are left out), in
/// `problems.json` order; the image is `{the problem's split}/{pid}/{image}`, relative to the
/// folder holding `train/`, `val/` and `test/`.
///
/// prefix and suffix are [`scienceqa_texts`] of the problem's `question`, `hint`, `choices` and
/// `answer` in the dataset's order; `answers` = `[suffix]` for the `scienceqa` metric. big_vision
/// shuffles the choices each visit, so the record also keeps `question`, `hint`, `choices` and
/// `answer` (the correct choice's index), from which a shuffle rebuilds both texts; `id` = the
/// pid.
pub(super) fn scienceqa(inputs: &[PathBuf], split: Option<&str>) -> Result<Vec<Example>, DataError> {
    let [problems_path, splits_path] = inputs else {
        return Err(wrong_inputs(Format::ScienceQa, inputs));
    };
    let split = required_split(Format::ScienceQa, split)?;
    let mut pids = None;
    let mut names = BTreeSet::new();
    read_json(splits_path, Walk::Entries, |name, node| {
        names.insert(name.to_owned());
        if name == split {
            pids = Some(node.strings()?.into_iter().collect::<HashSet<_>>());
        }
        Ok(())
    })?;
    let pids = pids.ok_or_else(|| {
        let names: Vec<_> = names.into_iter().collect();
        let msg = format!("no split `{split}` (found: {})", names.join(", "));
        DataError::File { path: splits_path.display().to_string(), msg }
    })?;

    let mut examples = Vec::new();
    read_json(problems_path, Walk::Entries, |pid, node| {
        let Some(image) = node.opt("image").filter(|_| pids.contains(pid)) else {
            return Ok(());
        };
        let question = node.field("question")?.str()?;
        let hint = node.opt("hint").map(|n| n.str()).transpose()?.unwrap_or_default();
        let choices = node.field("choices")?.strings()?;
        let answer = node.field("answer")?;
        let index = answer.u64()? as usize;
        let (prefix, suffix) = scienceqa_texts(question, hint, &choices, index).ok_or_else(|| {
            answer.error(format!("answer {index} of {} choices (at most 26 choices, lettered A to Z)", choices.len()))
        })?;
        examples.push(Example {
            image: format!("{}/{pid}/{}", node.field("split")?.str()?, image.str()?).into(),
            prefix,
            suffix: Some(suffix.clone()),
            extra: fields(json!({
                "id": pid,
                "question": question,
                "hint": hint,
                "choices": choices,
                "answer": index,
                "answers": [suffix],
            })),
        });
        Ok(())
    })?;
    Ok(examples)
}

/// ScienceQA's prompt and target as big_vision's `science_qa.py` writes them (prompt format
/// `QCM`, answer format `A`), the choices in the order given:
/// prefix `Question: {question}\nContext: {hint}\nOptions: (A) {choice 0}, (B) {choice 1}, ...\nAnswer:`
/// and suffix `The answer is {letter of choice answer}.` (lettered and joined as
/// `sci_qa_choices_shuffle` does; a source's `shuffle_choices` writes the same texts in a fresh
/// order each visit). `None` when there are more than 26 choices or `answer` is not an index
/// of `choices`.
fn scienceqa_texts(question: &str, hint: &str, choices: &[String], answer: usize) -> Option<(String, String)> {
    if choices.len() > 26 || answer >= choices.len() {
        return None;
    }
    let options = lettered_choices(choices.iter().map(String::as_str));
    let prefix = format!("Question: {question}\nContext: {hint}\nOptions: {options}\nAnswer:");
    Some((prefix, format!("The answer is {}.", choice_letter(answer))))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::scienceqa_texts;
    use crate::convert::test_support::{args, assert_image, convert_and_read, texts, TempDir};
    use crate::convert::{convert, Format};

    #[test]
    fn scienceqa_lettered_options_and_fields_for_a_shuffle() {
        let tmp = TempDir::new("scienceqa");
        let f = Format::ScienceQa;
        let mut a = args(f, &["problems.json", "pid_splits.json"], "images", &tmp.0.join("train.jsonl"));
        a.split = Some("train".into());
        let records = convert_and_read(&a);
        // pid 3 has no image, pid 8 is in val: left out.
        assert_eq!(records.iter().map(|r| r.extra["id"].as_str().unwrap()).collect::<Vec<_>>(), ["5", "1"]);
        let prefix = "Question: Which animal's feet are also adapted for sticking to smooth surfaces?\n\
                      Context: Tree frogs live in rain forests.\n\
                      Options: (A) tiger, (B) Madagascar day gecko\nAnswer:";
        assert_eq!(texts(&records[0]), (prefix, Some("The answer is B.")));
        let extra = &records[0].extra;
        assert_eq!((&extra["choices"], &extra["answer"]), (&json!(["tiger", "Madagascar day gecko"]), &json!(1)));
        assert_eq!(extra["question"], "Which animal's feet are also adapted for sticking to smooth surfaces?");
        assert_eq!(
            (&extra["hint"], &extra["answers"]),
            (&json!("Tree frogs live in rain forests."), &json!(["The answer is B."]))
        );
        assert_image(&records[0], f, "images/train/5/image.png");
        // An empty hint stays empty; three options.
        let prefix = "Question: Which is the hottest?\nContext: \nOptions: (A) lava, (B) ice, (C) tea\nAnswer:";
        assert_eq!(texts(&records[1]), (prefix, Some("The answer is A.")));

        a.split = Some("minitest".into());
        let err = convert(&a).unwrap_err().to_string();
        assert!(
            err.contains("pid_splits.json") && err.contains("no split `minitest` (found: test, train, val)"),
            "{err}"
        );
        a.split = None;
        assert!(convert(&a).unwrap_err().to_string().contains("--split is required"));
    }

    #[test]
    fn scienceqa_texts_rebuild_a_shuffled_order() {
        let choices = ["lava".to_string(), "ice".to_string()];
        let (prefix, suffix) = scienceqa_texts("Q?", "", &choices, 0).unwrap();
        assert_eq!(
            (prefix.as_str(), suffix.as_str()),
            ("Question: Q?\nContext: \nOptions: (A) lava, (B) ice\nAnswer:", "The answer is A.")
        );
        assert_eq!(scienceqa_texts("Q?", "", &choices, 2), None);
        let many: Vec<String> = (0..27).map(|i| i.to_string()).collect();
        assert_eq!(scienceqa_texts("Q?", "", &many, 0), None);
        assert!(scienceqa_texts("Q?", "", &many[..26], 25).unwrap().1.ends_with("is Z."));
    }
}
