//! `icdar15` and `mlt`: the Robust Reading Competition's quadrilateral ground truth (ICDAR
//! 2015 incidental scene text, ICDAR 2017 and 2019 multi-lingual scene text), every word with
//! its box.

use std::path::{Path, PathBuf};

use super::{enclosing_box, folder_files, frame, image_size, ocr_example, wrong_inputs, Example, Format};
use crate::DataError;

/// `icdar15`: ICDAR'15's ground-truth folder (`ch4_training_localization_transcription_gt/` or
/// `Challenge4_Test_Task4_GT/`: `gt_img_N.txt` for the image `img_N.jpg`, one word a line as
/// `x1,y1,x2,y2,x3,y3,x4,y4,transcription`, the text possibly holding commas, `###` when
/// unreadable). One record per image in natural order (`img_9` before `img_10`), its words in
/// the file's order, each with its quadrilateral's enclosing box, as [`ocr_example`] writes
/// them (the image's size read from its header); `id` = `img_N`.
pub(super) fn icdar15(inputs: &[PathBuf], images: &Path, square: bool) -> Result<Vec<Example>, DataError> {
    let [gt_dir] = inputs else {
        return Err(wrong_inputs(Format::Icdar15, inputs));
    };
    let mut examples = Vec::new();
    for (name, path) in folder_files(gt_dir, ".txt")? {
        let Some(stem) = name.strip_prefix("gt_") else {
            continue;
        };
        let image = PathBuf::from(format!("{stem}.jpg"));
        let size = frame(image_size(images, &image)?, square);
        let words = read_words(&path, Layout::Icdar15)?;
        let words: Vec<(String, [f64; 4])> = words.into_iter().map(|w| (w.text, w.corners)).collect();
        examples.push(ocr_example(image, stem, &words, size));
    }
    Ok(examples)
}

/// The image extensions MLT uses, in the order looked for (a GIF converted to PNG beside it
/// is found first).
const MLT_EXTENSIONS: [&str; 6] = ["jpg", "png", "JPG", "PNG", "jpeg", "gif"];

/// `mlt`: the ground-truth folder of ICDAR 2017 MLT (`ch8_training_localization_transcription_gt_v2/`
/// or `ch8_validation_localization_transcription_gt_v2/`: `gt_img_N.txt` for the image `img_N`)
/// or ICDAR 2019 MLT (`train_gt_t13/`: `tr_img_NNNNN.txt` for the image `tr_img_NNNNN`), one
/// word a line as `x1,y1,x2,y2,x3,y3,x4,y4,script,transcription` (the script `Latin`,
/// `Arabic`, ..., `Symbols`, `Mixed` or `None`; the text everything after the ninth comma,
/// commas included; `###` when unreadable). The images are JPEG, PNG or GIF: the first of
/// `{stem}.jpg`, `.png`, `.JPG`, `.PNG`, `.jpeg`, `.gif` that exists (none: `{stem}.jpg`,
/// reported missing); pg2 decodes no GIF, so one is an error asking for a PNG beside it. One
/// record per image in natural order, its words in the file's order, each with its
/// quadrilateral's enclosing box, as [`ocr_example`] writes them (the image's size read from
/// its header); `id` = the image's stem, `script` = each word's script in `words`' order.
pub(super) fn mlt(inputs: &[PathBuf], images: &Path, square: bool) -> Result<Vec<Example>, DataError> {
    let [gt_dir] = inputs else {
        return Err(wrong_inputs(Format::Mlt, inputs));
    };
    let mut examples = Vec::new();
    for (name, path) in folder_files(gt_dir, ".txt")? {
        let stem = name.strip_prefix("gt_").unwrap_or(&name);
        let mut found = MLT_EXTENSIONS.iter().map(|ext| PathBuf::from(format!("{stem}.{ext}")));
        let image = found.find(|image| images.join(image).is_file());
        let image = image.unwrap_or_else(|| PathBuf::from(format!("{stem}.jpg")));
        if image.extension().is_some_and(|ext| ext == "gif") {
            let msg = format!("a GIF, which pg2 does not decode: convert it to {stem}.png beside it");
            return Err(DataError::File { path: images.join(&image).display().to_string(), msg });
        }
        let size = frame(image_size(images, &image)?, square);
        let words = read_words(&path, Layout::Mlt)?;
        let scripts: Vec<&str> = words.iter().map(|w| w.script.as_deref().unwrap_or_default()).collect();
        let texts: Vec<(String, [f64; 4])> = words.iter().map(|w| (w.text.clone(), w.corners)).collect();
        let mut example = ocr_example(image, stem, &texts, size);
        example.extra.insert("script".into(), serde_json::json!(scripts));
        examples.push(example);
    }
    Ok(examples)
}

/// The columns of a line of ground truth.
#[derive(Clone, Copy)]
enum Layout {
    /// `x1,y1,x2,y2,x3,y3,x4,y4,transcription`.
    Icdar15,
    /// `x1,y1,x2,y2,x3,y3,x4,y4,script,transcription`.
    Mlt,
}

/// A line of ground truth.
struct Word {
    text: String,
    /// The enclosing box `[y1, x1, y2, x2]`.
    corners: [f64; 4],
    /// MLT's script.
    script: Option<String>,
}

/// The words of a ground-truth file.
fn read_words(path: &Path, layout: Layout) -> Result<Vec<Word>, DataError> {
    let error = |msg: String| DataError::File { path: path.display().to_string(), msg };
    let text = std::fs::read_to_string(path).map_err(|e| error(e.to_string()))?;
    let mut words = Vec::new();
    for (i, line) in text.trim_start_matches('\u{feff}').lines().enumerate() {
        let line = line.trim_end_matches('\r');
        if line.trim().is_empty() {
            continue;
        }
        let (columns, expected) = match layout {
            Layout::Icdar15 => (9, "x1,y1,x2,y2,x3,y3,x4,y4,transcription"),
            Layout::Mlt => (10, "x1,y1,x2,y2,x3,y3,x4,y4,script,transcription"),
        };
        let fields: Vec<&str> = line.splitn(columns, ',').collect();
        let bad = || error(format!("line {}: expected {expected}, found {line:?}", i + 1));
        if fields.len() != columns {
            return Err(bad());
        }
        let numbers: Option<Vec<f64>> = fields[..8].iter().map(|c| c.trim().parse().ok()).collect();
        let numbers = numbers.ok_or_else(bad)?;
        let script = (columns == 10).then(|| fields[8].to_owned());
        let corners = enclosing_box(numbers.chunks(2).map(|p| (p[0], p[1])));
        words.push(Word { text: fields[columns - 1].to_owned(), corners, script });
    }
    Ok(words)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use crate::convert::test_support::{args, assert_image, convert_and_read, texts, TempDir};
    use crate::convert::{convert, Format};

    #[test]
    fn icdar15_words_with_boxes_dont_care_kept_for_the_metric() {
        let tmp = TempDir::new("icdar15");
        let f = Format::Icdar15;
        let a = args(f, &["Challenge4_Test_Task4_GT"], "ch4_test_images", &tmp.0.join("test.jsonl"));
        let records = convert_and_read(&a);
        assert_eq!(records.iter().map(|r| r.extra["id"].as_str().unwrap()).collect::<Vec<_>>(), ["img_9", "img_10"]);
        // img_9 is 64 x 32. "Hello, world" (a comma in the text) spans x 4..40, y 2..16:
        // y1 2 * 1023 / 32 = 63.9 -> 64, x1 4 * 1023 / 64 = 63.9 -> 64, y2 16 * 1023 / 32 = 511.5
        // -> 512 (half to even), x2 40 * 1023 / 64 = 639.4 -> 639. The `###` word is not in the
        // target but stays in `words`.
        let suffix = "<loc0064><loc0064><loc0512><loc0639> Hello, world ; <loc0512><loc0000><loc1023><loc0959> EXIT";
        assert_eq!(texts(&records[0]), ("ocr", Some(suffix)));
        let words = &records[0].extra["words"];
        assert_eq!(words[0], json!({"text": "Hello, world", "box": [2.0, 4.0, 16.0, 40.0]}));
        assert_eq!(words[1]["text"], "###");
        assert_eq!((&records[0].extra["width"], &records[0].extra["height"]), (&json!(64.0), &json!(32.0)));
        assert_image(&records[0], f, "ch4_test_images/img_9.jpg");
        assert!(crate::image::load_rgb(records[0].image.path().unwrap()).is_ok_and(|i| i.dimensions() == (64, 32)));
        assert_eq!(texts(&records[1]), ("ocr", Some("")), "only unreadable words");

        // Padded to a 64 x 64 square below the image: y is binned on 64 rows, x as before
        // (y1 2 * 1023 / 64 = 31.97 -> 32, y2 16 * 1023 / 64 = 255.75 -> 256), and the square
        // is the frame the metric decodes predictions in.
        let mut square = a.clone();
        square.pad_to_square = true;
        let records = convert_and_read(&square);
        let suffix = "<loc0032><loc0064><loc0256><loc0639> Hello, world ; <loc0256><loc0000><loc0512><loc0959> EXIT";
        assert_eq!(texts(&records[0]), ("ocr", Some(suffix)));
        assert_eq!((&records[0].extra["width"], &records[0].extra["height"]), (&json!(64.0), &json!(64.0)));
        assert_eq!(records[0].extra["words"][0]["box"], json!([2.0, 4.0, 16.0, 40.0]), "pixels unchanged");
        let mut docvqa = args(Format::DocVqa, &[], ".", &tmp.0.join("docvqa.jsonl"));
        docvqa.pad_to_square = true;
        let err = convert(&docvqa).unwrap_err().to_string();
        assert!(
            err.contains(
                "convert docvqa: --pad-to-square only applies to pubtabnet, icdar15, hiertext, totaltext, mlt"
            ),
            "{err}"
        );

        let bad = tmp.0.join("gt");
        std::fs::create_dir_all(&bad).unwrap();
        std::fs::write(bad.join("gt_img_1.txt"), "1,2,3,4,5,6,7,8,ok\n1,2,3,x,5,6,7,8,no\n").unwrap();
        let mut a = a;
        a.inputs = vec![bad];
        let err = convert(&a).unwrap_err().to_string();
        assert!(err.contains("gt_img_1.txt: line 2: expected x1,y1,x2,y2,x3,y3,x4,y4,transcription"), "{err}");
    }

    #[test]
    fn mlt_words_with_scripts_images_of_any_extension_and_both_namings() {
        let tmp = TempDir::new("mlt");
        let f = Format::Mlt;
        let gt = "ch8_validation_localization_transcription_gt_v2";
        let a = args(f, &[gt], "ch8_validation_images", &tmp.0.join("mlt17.jsonl"));
        let records = convert_and_read(&a);
        assert_eq!(records.iter().map(|r| r.extra["id"].as_str().unwrap()).collect::<Vec<_>>(), ["img_9", "img_10"]);
        // img_9.png is 64 x 32, as ICDAR'15's img_9 (same boxes, same tokens); the script is
        // not part of the text, the text after the ninth comma keeps its comma.
        let suffix = "<loc0064><loc0064><loc0512><loc0639> Hello, world ; <loc0512><loc0000><loc1023><loc0959> خروج";
        assert_eq!(texts(&records[0]), ("ocr", Some(suffix)));
        assert_eq!(records[0].extra["script"], json!(["Latin", "None", "Arabic"]));
        assert_eq!(records[0].extra["words"][1], json!({"text": "###", "box": [30.0, 50.0, 31.0, 60.0]}));
        assert_image(&records[0], f, "ch8_validation_images/img_9.png");
        assert_image(&records[1], f, "ch8_validation_images/img_10.jpg");
        assert_eq!(texts(&records[1]), ("ocr", Some("")), "only unreadable words");

        // MLT19: the ground truth is named as the image, without `gt_`.
        let a19 = args(f, &["train_gt_t13"], "train_images", &tmp.0.join("mlt19.jsonl"));
        let records = convert_and_read(&a19);
        assert_eq!(texts(&records[0]), ("ocr", Some("<loc0064><loc0064><loc0512><loc0639> 오픈")));
        assert_eq!(
            (&records[0].extra["id"], &records[0].extra["script"]),
            (&json!("tr_img_00010"), &json!(["Korean"]))
        );
        assert_image(&records[0], f, "train_images/tr_img_00010.jpg");

        // An ICDAR'15 line (no script) is not MLT's layout; a GIF asks for a PNG.
        let bad = tmp.0.join("gt");
        std::fs::create_dir_all(&bad).unwrap();
        std::fs::write(bad.join("gt_img_1.txt"), "1,2,3,4,5,6,7,8,Latin,ok\n1,2,3,4,5,6,7,8\n").unwrap();
        let mut a = a;
        a.inputs = vec![bad.clone()];
        let err = convert(&a).unwrap_err().to_string();
        assert!(err.contains("gt_img_1.txt: line 2: expected x1,y1,x2,y2,x3,y3,x4,y4,script,transcription"), "{err}");
        std::fs::write(bad.join("gt_img_1.txt"), "1,2,3,4,5,6,7,8,Latin,ok\n").unwrap();
        std::fs::write(tmp.0.join("img_1.gif"), "GIF89a").unwrap();
        a.images = tmp.0.clone();
        let err = convert(&a).unwrap_err().to_string();
        assert!(err.contains("img_1.gif: a GIF, which pg2 does not decode: convert it to img_1.png"), "{err}");
    }
}
