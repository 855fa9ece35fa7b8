//! `molscribe`: molecule images with their SMILES, in MolScribe's csv layout.

use std::path::{Path, PathBuf};

use serde_json::json;

use super::{fields, wrong_inputs, Example, Format};
use crate::DataError;

/// The prompt of molecule records (the paper gives none).
const MOLECULE_PROMPT: &str = "molecule smiles";

/// `molscribe`: one of MolScribe's csv files (its benchmarks `synthetic/{indigo,chemdraw}.csv`,
/// `real/{CLEF,UOB,USPTO,staker,acs}.csv`, ..., or renders written in the same layout): a header
/// naming at least `file_path` (the image, relative to MolScribe's `data/` folder, which
/// `--images` names) and `SMILES`, and `image_id` if there is one, then one molecule a row;
/// fields may be double-quoted (`""` for a quote), as pandas writes them. One record per row
/// in file order, prefix `molecule smiles` (the paper gives no prompt), suffix = the SMILES as
/// the file has it, `answers` = `[suffix]`; `id` = `image_id` (else the row's number). pg2 does
/// not canonicalise SMILES: `exact_cased` compares them as strings.
pub(super) fn molscribe(inputs: &[PathBuf]) -> Result<Vec<Example>, DataError> {
    let [path] = inputs else {
        return Err(wrong_inputs(Format::MolScribe, inputs));
    };
    let error = |msg: String| DataError::File { path: path.display().to_string(), msg };
    let text = std::fs::read_to_string(path).map_err(|e| error(e.to_string()))?;
    let mut rows = csv_rows(text.trim_start_matches('\u{feff}')).map_err(error)?.into_iter();
    let header = rows.next().map(|(_, cells)| cells).unwrap_or_default();
    let column = |name: &str| header.iter().position(|h| h == name);
    let need = |name: &str| column(name).ok_or_else(|| error(format!("no column `{name}` in the header")));
    let (file_path, smiles, image_id) = (need("file_path")?, need("SMILES")?, column("image_id"));
    let mut examples = Vec::new();
    for (line, cells) in rows {
        if cells.len() != header.len() {
            return Err(error(format!("line {line}: {} fields, the header has {}", cells.len(), header.len())));
        }
        let id = image_id.map_or_else(|| (examples.len() + 1).to_string(), |c| cells[c].clone());
        let smiles = cells[smiles].clone();
        examples.push(Example {
            image: Path::new(&cells[file_path]).to_path_buf(),
            prefix: MOLECULE_PROMPT.into(),
            suffix: Some(smiles.clone()),
            extra: fields(json!({"id": id, "answers": [smiles]})),
        });
    }
    Ok(examples)
}

/// The rows of a csv text with the line each starts on (blank lines skipped): fields split
/// at commas, a double-quoted field keeping its commas and line breaks, `""` in it a quote.
fn csv_rows(text: &str) -> Result<Vec<(usize, Vec<String>)>, String> {
    let mut rows = Vec::new();
    let (mut row, mut field, mut quoted, mut line, mut start) = (Vec::new(), String::new(), false, 1, 1);
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '"' if quoted && chars.peek() == Some(&'"') => {
                chars.next();
                field.push('"');
            }
            '"' if quoted => quoted = false,
            '"' if field.is_empty() => quoted = true,
            ',' if !quoted => row.push(std::mem::take(&mut field)),
            '\n' if !quoted => {
                row.push(std::mem::take(&mut field));
                if row.len() > 1 || !row[0].trim().is_empty() {
                    rows.push((start, std::mem::take(&mut row)));
                }
                row.clear();
                line += 1;
                start = line;
            }
            '\r' if !quoted && chars.peek() == Some(&'\n') => {}
            _ => {
                line += usize::from(c == '\n');
                field.push(c);
            }
        }
    }
    if quoted {
        return Err(format!("line {start}: a quoted field is not closed"));
    }
    row.push(field);
    if row.len() > 1 || !row[0].trim().is_empty() {
        rows.push((start, row));
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::csv_rows;
    use crate::convert::test_support::{args, assert_image, convert_and_read, texts, TempDir};
    use crate::convert::{convert, Format};

    #[test]
    fn molscribe_rows_as_smiles_records() {
        let tmp = TempDir::new("molscribe");
        let f = Format::MolScribe;
        let a = args(f, &["synthetic/chemdraw.csv"], ".", &tmp.0.join("chemdraw.jsonl"));
        let records = convert_and_read(&a);
        assert_eq!(records.len(), 2);
        assert_eq!(texts(&records[0]), ("molecule smiles", Some("c1ccccc1O")), "case kept: aromatic c");
        assert_eq!((&records[0].extra["id"], &records[0].extra["answers"]), (&json!("0"), &json!(["c1ccccc1O"])));
        assert_image(&records[0], f, "synthetic/chemdraw/0.png");
        // A quoted field with commas (another column) does not shift the SMILES.
        assert_eq!(texts(&records[1]), ("molecule smiles", Some("C[C@H](N)C(=O)O")));
        assert_image(&records[1], f, "synthetic/chemdraw/1.png");

        let bad = tmp.0.join("bad.csv");
        std::fs::write(&bad, "image_id,file_path,SMILES\n0,a.png,C\n1,b.png\n").unwrap();
        let mut a = a;
        a.inputs = vec![bad.clone()];
        let err = convert(&a).unwrap_err().to_string();
        assert!(err.contains("bad.csv: line 3: 2 fields, the header has 3"), "{err}");
        std::fs::write(&bad, "image_id,path,smiles\n").unwrap();
        let err = convert(&a).unwrap_err().to_string();
        assert!(err.contains("bad.csv: no column `file_path` in the header"), "{err}");
    }

    #[test]
    fn csv_fields_quoted_with_commas_quotes_and_line_breaks() {
        let rows = csv_rows("a,b\r\n\"x, \"\"y\"\"\",\"1\n2\"\n\n3,\n").unwrap();
        let want = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(rows, [(1, want(&["a", "b"])), (2, want(&["x, \"y\"", "1\n2"])), (5, want(&["3", ""]))]);
        assert_eq!(csv_rows("a\n\"b\n").unwrap_err(), "line 2: a quoted field is not closed");
    }
}
