//! `vsr`: Visual Spatial Reasoning statements, `True` or `False` as the target.

use std::path::PathBuf;

use serde_json::json;

use super::json::read_jsonl;
use super::{fields, vqa_prompt, wrong_inputs, Example, Format};
use crate::DataError;

/// `vsr`: one of VSR's split files (`splits/random/{train,dev,test}.jsonl` or
/// `splits/zeroshot/...`, one `{image, caption, label, relation, ...}` a line); one record per
/// statement in file order, prefix `answer en {caption}` (the paper gives no prompt; this is
/// the QA framing of its appendix B.6 in PaliGemma's words), suffix `True` for label 1 and
/// `False` for 0, `answers` = `[suffix]`, `relation` kept. `image` is relative to `images/`.
pub(super) fn vsr(inputs: &[PathBuf]) -> Result<Vec<Example>, DataError> {
    let [path] = inputs else {
        return Err(wrong_inputs(Format::Vsr, inputs));
    };
    let mut examples = Vec::new();
    read_jsonl(path, |node| {
        let label = node.field("label")?;
        let truth = match label.u64()? {
            0 => "False",
            1 => "True",
            other => return Err(label.error(format!("expected 0 or 1, found {other}"))),
        };
        examples.push(Example {
            image: node.field("image")?.str()?.into(),
            prefix: vqa_prompt(node.field("caption")?.str()?),
            suffix: Some(truth.to_owned()),
            extra: fields(json!({"relation": node.opt("relation").map(|n| n.value.clone()), "answers": [truth]})),
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
    fn vsr_statements_true_or_false() {
        let tmp = TempDir::new("vsr");
        let f = Format::Vsr;
        let records = convert_and_read(&args(f, &["splits/random/test.jsonl"], "images", &tmp.0.join("test.jsonl")));
        assert_eq!(records.len(), 2, "the blank line is skipped");
        assert_eq!(texts(&records[0]), ("answer en The cat is on top of the bed.", Some("True")));
        assert_eq!(texts(&records[1]), ("answer en The car is behind the dog.", Some("False")));
        assert_eq!(
            (&records[1].extra["answers"], &records[1].extra["relation"]),
            (&json!(["False"]), &json!("behind"))
        );
        assert_image(&records[0], f, "images/000000085637.jpg");
        assert_image(&records[1], f, "images/000000348963.jpg");
    }
}
