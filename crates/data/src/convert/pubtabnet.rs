//! `pubtabnet`: PubTabNet tables as HTML, each non-empty cell with its box.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde_json::json;

use super::json::{read_jsonl, Node};
use super::{empty_split, fields, image_size, known_split, loc_token, wrong_inputs, Example, Format};
use crate::DataError;

/// The prompt of table records (the paper gives none).
const TABLE_PROMPT: &str = "table html";

/// `pubtabnet`: `PubTabNet_2.0.0.jsonl` (one table a line: `filename`, `split`, `imgid`,
/// `html.structure.tokens` and `html.cells`, each cell's `tokens` and, when it is not empty,
/// its `bbox` `[x0, y0, x1, y1]` in pixels); `split` keeps `train`, `val` or `test`. One
/// record per table in file order, image `{split}/{filename}`, prefix `table html`, suffix =
/// the table as `<table>...</table>` whose non-empty cells' start tags carry
/// `coords="<locX0><locY0><locX1><locY1>"` (the paper's appendix B.2; boxes binned as
/// `<loc>` tokens on the image's size, read from its header), `html` = the reference table
/// as PubTabNet's evaluation builds it (`format_html`: cell tokens of one character
/// HTML-escaped, wrapped in `<html><body>`), for TEDS; `id` = `imgid`.
///
/// The image is the table crop as released; the paper pads it to a square with white, pg2
/// resizes it as any image.
pub(super) fn pubtabnet(inputs: &[PathBuf], images: &Path, split: Option<&str>) -> Result<Vec<Example>, DataError> {
    let [path] = inputs else {
        return Err(wrong_inputs(Format::PubTabNet, inputs));
    };
    let split = known_split(Format::PubTabNet, split, &["train", "val", "test"])?;
    let mut examples = Vec::new();
    let mut splits = BTreeSet::new();
    read_jsonl(path, |node| {
        let table_split = node.field("split")?.str()?;
        splits.insert(table_split.to_owned());
        if split.is_some_and(|s| s != table_split) {
            return Ok(());
        }
        let image = Path::new(table_split).join(node.field("filename")?.str()?);
        let html = node.field("html")?;
        let structure = html.field("structure")?.field("tokens")?.strings()?;
        let cells = html.field("cells")?.items()?.iter().map(cell).collect::<Result<Vec<_>, _>>()?;
        let reference = table_html(&structure, &cells, None).map_err(|msg| html.error(msg))?;
        let size = image_size(images, &image)?;
        let suffix =
            size.map(|size| table_html(&structure, &cells, Some(size))).transpose().map_err(|m| html.error(m))?;
        examples.push(Example {
            image,
            prefix: TABLE_PROMPT.into(),
            suffix,
            extra: fields(json!({
                "id": node.opt("imgid").map(|n| n.value.clone()),
                "html": format!("<html><body>{reference}</body></html>"),
            })),
        });
        Ok(())
    })?;
    if let Some(split) = split.filter(|_| examples.is_empty()) {
        return Err(empty_split(path, "tables", split, splits));
    }
    Ok(examples)
}

/// A cell's content (its tokens joined, those of one character HTML-escaped as PubTabNet's
/// `format_html` does) and its box `[x0, y0, x1, y1]`, if any.
fn cell(node: &Node) -> Result<(String, Option<[f64; 4]>), DataError> {
    let tokens = node.field("tokens")?.strings()?;
    let content = tokens.iter().map(|t| if t.chars().count() == 1 { escape(t) } else { t.clone() }).collect();
    let bbox = match node.opt("bbox") {
        None => None,
        Some(bbox) => {
            let numbers = bbox.items()?.iter().map(Node::number).collect::<Result<Vec<_>, _>>()?;
            Some(numbers.try_into().map_err(|_| bbox.error("expected [x0, y0, x1, y1]"))?)
        }
    };
    Ok((content, bbox))
}

/// Python's `html.escape` of one character.
fn escape(c: &str) -> String {
    match c {
        "&" => "&amp;".into(),
        "<" => "&lt;".into(),
        ">" => "&gt;".into(),
        "\"" => "&quot;".into(),
        "'" => "&#x27;".into(),
        _ => c.into(),
    }
}

/// `<table>{structure with each cell's content after its start tag}</table>`; a cell's start
/// tag ends at a `<td>` or `>` token, as in `format_html`. With the image's `(width, height)`,
/// each non-empty cell with a box gets `coords="<locX0><locY0><locX1><locY1>"`.
fn table_html(
    structure: &[String],
    cells: &[(String, Option<[f64; 4]>)],
    size: Option<(f64, f64)>,
) -> Result<String, String> {
    let mut out = String::from("<table>");
    let mut cells = cells.iter();
    for token in structure {
        if token != "<td>" && token != ">" {
            out.push_str(token);
            continue;
        }
        let (content, bbox) = cells.next().ok_or("`structure` opens more cells than `cells` holds")?;
        match (size, bbox) {
            (Some((width, height)), Some([x0, y0, x1, y1])) if !content.is_empty() => {
                let coords =
                    [loc_token(*x0, width), loc_token(*y0, height), loc_token(*x1, width), loc_token(*y1, height)];
                out.push_str(&token[..token.len() - 1]);
                out.push_str(&format!(" coords=\"{}\">", coords.concat()));
            }
            _ => out.push_str(token),
        }
        out.push_str(content);
    }
    if cells.next().is_some() {
        return Err("`cells` holds more cells than `structure` opens".into());
    }
    out.push_str("</table>");
    Ok(out)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use crate::convert::test_support::{args, assert_image, convert_and_read, texts, TempDir};
    use crate::convert::{convert, Format};

    #[test]
    fn pubtabnet_html_with_cell_boxes_and_the_reference() {
        let tmp = TempDir::new("pubtabnet");
        let f = Format::PubTabNet;
        let mut a = args(f, &["PubTabNet_2.0.0.jsonl"], ".", &tmp.0.join("val.jsonl"));
        a.split = Some("val".into());
        let records = convert_and_read(&a);
        assert_eq!(records.len(), 1);
        // The image is 64 x 32: x0 4 * 1023 / 64 = 63.9 -> 64, y0 2 * 1023 / 32 = 63.9 -> 64,
        // x1 30 * 1023 / 64 = 479.5 -> 480, y1 14 * 1023 / 32 = 447.6 -> 448; the second box
        // [4, 18, 60, 30] gives 64, 575.4 -> 575, 959.1 -> 959, 959.1 -> 959.
        let suffix = "<table><thead><tr><td coords=\"<loc0064><loc0064><loc0480><loc0448>\"><b>A&amp;B</b></td>\
                      <td></td></tr></thead><tbody><tr><td colspan=\"2\" coords=\"<loc0064><loc0575><loc0959><loc0959>\">\
                      1 &lt; 2</td></tr></tbody></table>";
        assert_eq!(texts(&records[0]), ("table html", Some(suffix)));
        let reference = "<html><body><table><thead><tr><td><b>A&amp;B</b></td><td></td></tr></thead>\
                         <tbody><tr><td colspan=\"2\">1 &lt; 2</td></tr></tbody></table></body></html>";
        assert_eq!((&records[0].extra["html"], &records[0].extra["id"]), (&json!(reference), &json!(7)));
        assert_image(&records[0], f, "val/PMC5755158_010_01.png");

        a.split = Some("test".into());
        let err = convert(&a).unwrap_err().to_string();
        assert!(err.contains("no tables in split `test` (found: train, val)"), "{err}");
        a.split = Some("train".into());
        let err = convert(&a).unwrap_err().to_string();
        assert!(err.contains("`line 2.html`: `cells` holds more cells than `structure` opens"), "{err}");
    }
}
