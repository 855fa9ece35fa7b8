//! `icdar15`: ICDAR 2015 incidental scene text, every word with its box.

use std::path::{Path, PathBuf};

use super::{enclosing_box, folder_files, image_size, ocr_example, wrong_inputs, Example, Format};
use crate::DataError;

/// `icdar15`: ICDAR'15's ground-truth folder (`ch4_training_localization_transcription_gt/` or
/// `Challenge4_Test_Task4_GT/`: `gt_img_N.txt` for the image `img_N.jpg`, one word a line as
/// `x1,y1,x2,y2,x3,y3,x4,y4,transcription`, the text possibly holding commas, `###` when
/// unreadable). One record per image in natural order (`img_9` before `img_10`), its words in
/// the file's order, each with its quadrilateral's enclosing box, as [`ocr_example`] writes
/// them (the image's size read from its header); `id` = `img_N`.
pub(super) fn icdar15(inputs: &[PathBuf], images: &Path) -> Result<Vec<Example>, DataError> {
    let [gt_dir] = inputs else {
        return Err(wrong_inputs(Format::Icdar15, inputs));
    };
    let mut examples = Vec::new();
    for (name, path) in folder_files(gt_dir, ".txt")? {
        let Some(stem) = name.strip_prefix("gt_") else {
            continue;
        };
        let image = PathBuf::from(format!("{stem}.jpg"));
        let size = image_size(images, &image)?;
        examples.push(ocr_example(image, stem, &read_words(&path)?, size));
    }
    Ok(examples)
}

/// The words of a ground-truth file: text and enclosing box `[y1, x1, y2, x2]`.
fn read_words(path: &Path) -> Result<Vec<(String, [f64; 4])>, DataError> {
    let error = |msg: String| DataError::File { path: path.display().to_string(), msg };
    let text = std::fs::read_to_string(path).map_err(|e| error(e.to_string()))?;
    let mut words = Vec::new();
    for (i, line) in text.trim_start_matches('\u{feff}').lines().enumerate() {
        let line = line.trim_end_matches('\r');
        if line.trim().is_empty() {
            continue;
        }
        let fields: Vec<&str> = line.splitn(9, ',').collect();
        let [coords @ .., word] = fields.as_slice() else { unreachable!("splitn yields at least one field") };
        let numbers: Option<Vec<f64>> = coords.iter().map(|c| c.trim().parse().ok()).collect();
        let numbers = numbers.filter(|n| n.len() == 8).ok_or_else(|| {
            error(format!("line {}: expected x1,y1,x2,y2,x3,y3,x4,y4,transcription, found {line:?}", i + 1))
        })?;
        words.push((word.to_string(), enclosing_box(numbers.chunks(2).map(|p| (p[0], p[1])))));
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

        let bad = tmp.0.join("gt");
        std::fs::create_dir_all(&bad).unwrap();
        std::fs::write(bad.join("gt_img_1.txt"), "1,2,3,4,5,6,7,8,ok\n1,2,3,x,5,6,7,8,no\n").unwrap();
        let mut a = a;
        a.inputs = vec![bad];
        let err = convert(&a).unwrap_err().to_string();
        assert!(err.contains("gt_img_1.txt: line 2: expected x1,y1,x2,y2,x3,y3,x4,y4,transcription"), "{err}");
    }
}
