//! `mimic-cxr`: MIMIC-CXR chest X-rays with their reports' findings and impression.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde_json::json;

use super::{fields, known_split, required_split, wrong_inputs, Example, Format};
use crate::DataError;

/// `mimic-cxr`: MIMIC-CXR-JPG's `mimic-cxr-2.0.0-split.csv` (gunzipped: `dicom_id,study_id,
/// subject_id,split`) and the folder of MIMIC-CXR's reports (`files/`, holding
/// `pXX/pSUBJECT/sSTUDY.txt`); `split` keeps `train`, `validate` or `test`. One record per
/// image of the split, in the csv's order, the image `files/pXX/pSUBJECT/sSTUDY/DICOM.jpg`
/// under the MIMIC-CXR-JPG folder. The report's sections are read at their upper-case
/// headers (`INDICATION:`, `FINDINGS:`, `IMPRESSION:`, ...), runs of whitespace made single
/// spaces: prefix `INDICATION: {indication}` (the paper prompts with the indication), suffix
/// `FINDINGS: {findings} IMPRESSION: {impression}` (the sections the report has),
/// `references` = `[suffix]`; images whose report has neither section are left out. The
/// paper's Flamingo-CXR split and its removal of mentions of prior X-rays are not applied.
pub(super) fn mimic_cxr(inputs: &[PathBuf], split: Option<&str>) -> Result<Vec<Example>, DataError> {
    let [split_csv, reports] = inputs else {
        return Err(wrong_inputs(Format::MimicCxr, inputs));
    };
    let split =
        required_split(Format::MimicCxr, known_split(Format::MimicCxr, split, &["train", "validate", "test"])?)?;
    let error = |path: &Path, msg: String| DataError::File { path: path.display().to_string(), msg };
    let text = std::fs::read_to_string(split_csv).map_err(|e| error(split_csv, e.to_string()))?;
    let mut lines = text.lines().enumerate();
    let header: Vec<&str> = lines.next().map(|(_, l)| l.trim().split(',').collect()).unwrap_or_default();
    let column = |name: &str| {
        header
            .iter()
            .position(|h| *h == name)
            .ok_or_else(|| error(split_csv, format!("no column `{name}` in the header")))
    };
    let columns = [column("dicom_id")?, column("study_id")?, column("subject_id")?, column("split")?];

    let mut texts = HashMap::new(); // report file -> (prefix, suffix), read once per study
    let mut examples = Vec::new();
    for (i, line) in lines.filter(|(_, l)| !l.trim().is_empty()) {
        let cells: Vec<&str> = line.trim().split(',').collect();
        let [dicom, study, subject, image_split] = columns.map(|c| cells.get(c).copied());
        let (Some(dicom), Some(study), Some(subject), Some(image_split)) = (dicom, study, subject, image_split) else {
            return Err(error(split_csv, format!("line {}: expected {} columns", i + 1, header.len())));
        };
        if image_split != split {
            continue;
        }
        let folder = format!("p{}/p{subject}", subject.get(..2).unwrap_or(subject));
        let report = reports.join(&folder).join(format!("s{study}.txt"));
        if !texts.contains_key(&report) {
            let text = std::fs::read_to_string(&report).map_err(|e| error(&report, e.to_string()))?;
            texts.insert(report.clone(), report_texts(&text));
        }
        let Some((prefix, suffix)) = &texts[&report] else {
            continue;
        };
        examples.push(Example {
            image: format!("files/{folder}/s{study}/{dicom}.jpg").into(),
            prefix: prefix.clone(),
            suffix: Some(suffix.clone()),
            extra: fields(json!({"id": dicom, "study_id": study, "references": [suffix]})),
        });
    }
    Ok(examples)
}

/// A report's prompt and target, `None` when it has neither findings nor impression.
fn report_texts(report: &str) -> Option<(String, String)> {
    let sections = sections(report);
    let section = |name: &str| sections.iter().find(|(n, _)| n == name).map(|(_, text)| text.as_str());
    let target: Vec<String> = ["FINDINGS", "IMPRESSION"]
        .iter()
        .filter_map(|name| section(name).filter(|t| !t.is_empty()).map(|t| format!("{name}: {t}")))
        .collect();
    if target.is_empty() {
        return None;
    }
    Some((format!("INDICATION: {}", section("INDICATION").unwrap_or_default()).trim_end().to_owned(), target.join(" ")))
}

/// The report's sections: a line starting (after spaces) with an upper-case header and a
/// colon opens one; its text runs to the next, whitespace runs made single spaces.
fn sections(report: &str) -> Vec<(String, String)> {
    let mut sections: Vec<(String, String)> = Vec::new();
    for line in report.lines() {
        let trimmed = line.trim_start();
        let header = trimmed.split_once(':').filter(|(name, _)| {
            !name.is_empty() && name.chars().all(|c| c.is_ascii_uppercase() || c == ' ' || c == '/')
        });
        let text = match header {
            Some((name, rest)) => {
                sections.push((name.trim().to_owned(), String::new()));
                rest
            }
            None => trimmed,
        };
        if let Some((_, body)) = sections.last_mut() {
            for word in text.split_whitespace() {
                if !body.is_empty() {
                    body.push(' ');
                }
                body.push_str(word);
            }
        }
    }
    sections
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::report_texts;
    use crate::convert::test_support::{args, assert_image, convert_and_read, texts, TempDir};
    use crate::convert::{convert, Format};

    #[test]
    fn mimic_cxr_indication_prompt_findings_and_impression_target() {
        let tmp = TempDir::new("mimic-cxr");
        let f = Format::MimicCxr;
        let mut a = args(f, &["mimic-cxr-2.0.0-split.csv", "reports/files"], "jpg", &tmp.0.join("train.jsonl"));
        a.split = Some("train".into());
        let records = convert_and_read(&a);
        // Two images of study 50414267, none of 53189527 (its report has no findings or
        // impression); 55555555 is in test.
        assert_eq!(records.len(), 2);
        let suffix = "FINDINGS: There is no focal consolidation, pleural effusion or pneumothorax. \
                      IMPRESSION: No acute cardiopulmonary process.";
        assert_eq!(texts(&records[0]), ("INDICATION: ___F with new onset ascites // eval for infection", Some(suffix)));
        assert_eq!(records[1].extra["references"], json!([suffix]));
        assert_eq!((&records[1].extra["id"], &records[1].extra["study_id"]), (&json!("174413ec"), &json!("50414267")));
        assert_image(&records[0], f, "jpg/files/p10/p10000032/s50414267/02aa804e.jpg");

        a.split = None;
        assert!(convert(&a).unwrap_err().to_string().contains("--split is required"));
        // Only the impression; no indication.
        let report = "FINAL REPORT\n IMPRESSION:  Clear\n   lungs.\n";
        assert_eq!(report_texts(report), Some(("INDICATION:".into(), "IMPRESSION: Clear lungs.".into())));
    }
}
