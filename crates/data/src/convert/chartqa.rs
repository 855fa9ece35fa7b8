//! `chartqa`: ChartQA questions, human-written or augmented, the label as the target.

use std::path::PathBuf;

use serde_json::json;

use super::json::{read_json, Walk};
use super::{fields, wrong_inputs, Example, Format};
use crate::DataError;

/// `chartqa`: one of ChartQA's annotation files (`{train,val,test}/{split}_human.json` or
/// `{split}_augmented.json`, each a list of `{imgname, query, label}`); one record per question
/// in file order, prefix = the bare query (`chartqa.py`: `copy(inkey="question",
/// outkey="prefix")`), suffix = the label, `answers` = `[label]` for relaxed accuracy. `image`
/// is `imgname`, relative to the split's `png/` folder.
pub(super) fn chartqa(inputs: &[PathBuf]) -> Result<Vec<Example>, DataError> {
    let [path] = inputs else {
        return Err(wrong_inputs(Format::ChartQa, inputs));
    };
    let mut examples = Vec::new();
    read_json(path, Walk::Elements, |_, node| {
        let label = node.field("label")?.str()?;
        examples.push(Example {
            image: node.field("imgname")?.str()?.into(),
            prefix: node.field("query")?.str()?.to_owned(),
            suffix: Some(label.to_owned()),
            extra: fields(json!({"answers": [label]})),
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
    fn chartqa_query_prompt_label_target() {
        let tmp = TempDir::new("chartqa");
        let f = Format::ChartQa;
        let records = convert_and_read(&args(f, &["test/test_human.json"], "test/png", &tmp.0.join("human.jsonl")));
        assert_eq!(records.len(), 2);
        assert_eq!(texts(&records[0]), ("How many food item is shown in the bar graph?", Some("14")));
        assert_eq!(texts(&records[1]), ("Is the value of Favorable 38 in 2015?", Some("Yes")));
        assert_eq!(records[1].extra["answers"], json!(["Yes"]));
        assert_image(&records[0], f, "test/png/41699051005347.png");
        assert_image(&records[1], f, "test/png/9366.png");
    }
}
