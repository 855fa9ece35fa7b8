//! `pubtabnet` and `fintabnet`: PubTabNet's and FinTabNet's tables as HTML, each non-empty
//! cell with its box.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use super::json::{read_jsonl, Node};
use super::{empty_split, fields, frame, image_size, known_split, loc_token, wrong_inputs, Example, Format};
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
/// The image is the table crop as released; the paper pads it to a square with white
/// (`data.pad_to_square`), for which `square` bins the boxes on that square ([`frame`]).
pub(super) fn pubtabnet(
    inputs: &[PathBuf],
    images: &Path,
    split: Option<&str>,
    square: bool,
) -> Result<Vec<Example>, DataError> {
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
        let size = frame(image_size(images, &image)?, square);
        let id = node.opt("imgid").map(|n| n.value.clone());
        examples.push(table_example(image, id, &node.field("html")?, size, |bbox| bbox)?);
        Ok(())
    })?;
    if let Some(split) = split.filter(|_| examples.is_empty()) {
        return Err(empty_split(path, "tables", split, splits));
    }
    Ok(examples)
}

/// `fintabnet`: FinTabNet's table structure file `FinTabNet_1.0.0_cell_{train,val,test}.jsonl`
/// (one table a line: `filename`, the PDF page `{company}/{year}/page_N.pdf`, `table_id`, the
/// table's `bbox` and `html` as PubTabNet's, but every box `[x0, y0, x1, y1]` in PDF points
/// with y measured up from the bottom of the page). FinTabNet releases PDF pages, which pg2
/// does not render: `--images` is a folder of the table crops `{table_id}.png`, each the page
/// clipped to the table's `bbox` (at any resolution: the cell boxes are scaled to the crop's
/// size, read from its header). One record per table in file order, image `{table_id}.png`,
/// prefix `table html`, suffix and `html` as [`pubtabnet`] writes them, the cell boxes moved
/// into the crop (`x - x0`, `y1 - y`); `id` = `table_id`. The paper's FinTabNet corrections
/// are not applied.
pub(super) fn fintabnet(inputs: &[PathBuf], images: &Path, square: bool) -> Result<Vec<Example>, DataError> {
    let [path] = inputs else {
        return Err(wrong_inputs(Format::FinTabNet, inputs));
    };
    let mut examples = Vec::new();
    read_jsonl(path, |node| {
        let id = node.field("table_id")?;
        let image = PathBuf::from(format!("{}.png", id.id()?));
        let table = node.field("bbox")?;
        let [tx0, ty0, tx1, ty1] = corners(&table)?;
        if tx1 <= tx0 || ty1 <= ty0 {
            return Err(table.error("expected x0 < x1 and y0 < y1"));
        }
        // Into the crop's pixels: from the table's top left corner, y downwards, scaled.
        let size = image_size(images, &image)?;
        let (sx, sy) = size.map_or((1.0, 1.0), |(width, height)| (width / (tx1 - tx0), height / (ty1 - ty0)));
        let place = |[x0, y0, x1, y1]: [f64; 4]| [(x0 - tx0) * sx, (ty1 - y1) * sy, (x1 - tx0) * sx, (ty1 - y0) * sy];
        let id = Some(id.value.clone());
        examples.push(table_example(image, id, &node.field("html")?, frame(size, square), place)?);
        Ok(())
    })?;
    Ok(examples)
}

/// The record of a table: its `html` (PubTabNet's layout) as `table html` prefix, suffix =
/// [`table_html`] with each cell box `place`d into the image's pixels and binned on `size`
/// (none without an image), `html` = the reference table as `format_html` builds it.
fn table_example(
    image: PathBuf,
    id: Option<Value>,
    html: &Node,
    size: Option<(f64, f64)>,
    place: impl Fn([f64; 4]) -> [f64; 4],
) -> Result<Example, DataError> {
    let structure = html.field("structure")?.field("tokens")?.strings()?;
    let cells = html.field("cells")?.items()?.iter().map(cell).collect::<Result<Vec<_>, _>>()?;
    let reference = table_html(&structure, &cells, None).map_err(|msg| html.error(msg))?;
    let placed: Vec<_> = cells.into_iter().map(|(content, bbox)| (content, bbox.map(&place))).collect();
    let suffix = size.map(|size| table_html(&structure, &placed, Some(size))).transpose().map_err(|m| html.error(m))?;
    Ok(Example {
        image,
        prefix: TABLE_PROMPT.into(),
        suffix,
        extra: fields(json!({"id": id, "html": format!("<html><body>{reference}</body></html>")})),
    })
}

/// A box `[x0, y0, x1, y1]`.
fn corners(node: &Node) -> Result<[f64; 4], DataError> {
    let numbers = node.items()?.iter().map(Node::number).collect::<Result<Vec<_>, _>>()?;
    numbers.try_into().map_err(|_| node.error("expected [x0, y0, x1, y1]"))
}

/// A cell's content (its tokens joined, those of one character HTML-escaped as PubTabNet's
/// `format_html` does) and its box `[x0, y0, x1, y1]`, if any.
fn cell(node: &Node) -> Result<(String, Option<[f64; 4]>), DataError> {
    let tokens = node.field("tokens")?.strings()?;
    let content = tokens.iter().map(|t| if t.chars().count() == 1 { escape(t) } else { t.clone() }).collect();
    let bbox = node.opt("bbox").map(|bbox| corners(&bbox)).transpose()?;
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

    #[test]
    fn fintabnet_pdf_boxes_moved_into_the_table_crop() {
        let tmp = TempDir::new("fintabnet");
        let f = Format::FinTabNet;
        let a = args(f, &["FinTabNet_1.0.0_cell_test.jsonl"], "tables", &tmp.0.join("test.jsonl"));
        let records = convert_and_read(&a);
        assert_eq!(records.len(), 1);
        // The table spans x 100..132, y 500..516 (PDF points, y up); its crop is 64 x 32 px, 2 px
        // a point. The first cell [102, 509, 115, 515] is [4, 2, 30, 14] in the crop (y from the
        // top), the second [102, 501, 130, 507] is [4, 18, 60, 30]: the tokens of the PubTabNet
        // test, whose boxes these are.
        let suffix = "<table><thead><tr><td coords=\"<loc0064><loc0064><loc0480><loc0448>\"><b>A&amp;B</b></td>\
                      <td></td></tr></thead><tbody><tr><td colspan=\"2\" coords=\"<loc0064><loc0575><loc0959><loc0959>\">\
                      $ 1,2</td></tr></tbody></table>";
        assert_eq!(texts(&records[0]), ("table html", Some(suffix)));
        let reference = "<html><body><table><thead><tr><td><b>A&amp;B</b></td><td></td></tr></thead>\
                         <tbody><tr><td colspan=\"2\">$ 1,2</td></tr></tbody></table></body></html>";
        assert_eq!((&records[0].extra["html"], &records[0].extra["id"]), (&json!(reference), &json!(81273)));
        assert_image(&records[0], f, "tables/81273.png");
        // Padded to 64 x 64 below the crop: y is binned on 64 rows (2 -> 32, 14 -> 223.8 -> 224).
        let mut square = a.clone();
        square.pad_to_square = true;
        let records = convert_and_read(&square);
        assert!(texts(&records[0]).1.unwrap().contains("coords=\"<loc0064><loc0032><loc0480><loc0224>\""));

        let bad = tmp.0.join("FinTabNet_1.0.0_cell_val.jsonl");
        let line = r#"{"filename": "a.pdf", "table_id": 1, "bbox": [10, 20, 5, 30], "html": {"structure": {"tokens": []}, "cells": []}}"#;
        std::fs::write(&bad, format!("{line}\n")).unwrap();
        let mut a = a;
        a.inputs = vec![bad];
        let err = convert(&a).unwrap_err().to_string();
        assert!(err.contains("FinTabNet_1.0.0_cell_val.jsonl: `line 1.bbox`: expected x0 < x1 and y0 < y1"), "{err}");
    }
}
