//! End-to-end OCR (ICDAR'15, Total-Text): word-level precision, recall and F1 as HierText's
//! evaluator (`evaluator.py`, end-to-end mode) counts them.
//!
//! Matching, per image, as HierText's `_count_tp`: each reference word takes the prediction of
//! highest IoU with it, each prediction the reference word of highest IoU with it (ties: the
//! first in order). A reference word and a prediction match when they are each other's best,
//! their IoU is at least [`IOU_THRESHOLD`], and their texts are exactly equal (case and
//! punctuation included). So a prediction whose box is right and whose text is wrong takes its
//! reference word out of reach of every other prediction, and a duplicate of a matched
//! prediction matches nothing: each word matches at most once.
//!
//! Totals are summed over the images: `precision = matches / predictions`,
//! `recall = matches / references`, each 1 when its denominator is 0, and
//! `f1 = 2pr / (p + r)`, 0 when `p + r` is 0 (HierText's conventions).
//!
//! "Don't care" words, as HierText's `_filter_dont_care_region` before the matching: a
//! reference word whose text is [`DONT_CARE`] (`###`: unreadable in ICDAR'15 and Total-Text)
//! is no reference, and a prediction lying mostly on one (its intersection with it over its
//! own area at least [`DONT_CARE_COVER`]) is no prediction. So reading an unreadable word
//! costs nothing, and missing one costs nothing either.
//!
//! HierText compares polygons or masks; here words are axis-aligned boxes.

use crate::refcoco::{leading_box, Box};

/// A matched pair needs at least this IoU.
pub const IOU_THRESHOLD: f64 = 0.5;

/// The text of an unreadable reference word (ICDAR'15, Total-Text).
pub const DONT_CARE: &str = "###";

/// A prediction whose area lies on a don't-care word by at least this share is left out
/// (HierText's `filter_invalid_thr`).
pub const DONT_CARE_COVER: f64 = 0.5;

/// A word and its box; a predicted word may lack one, and then matches nothing.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Word<'a> {
    pub text: &'a str,
    pub bbox: Option<Box>,
}

/// The words of PaliGemma's OCR output: `<locY1><locX1><locY2><locX2> text` segments
/// separated by `" ; "`, boxes in pixels of a `width` x `height` image, texts trimmed.
/// A non-empty segment that does not start with four loc tokens is a word without a box.
pub fn parse_prediction(text: &str, width: f64, height: f64) -> Vec<Word<'_>> {
    text.split(" ; ")
        .map(str::trim)
        .filter(|segment| !segment.is_empty())
        .map(|segment| match leading_box(segment, width, height) {
            Some((bbox, rest)) => Word { text: rest.trim(), bbox: Some(bbox) },
            None => Word { text: segment, bbox: None },
        })
        .collect()
}

/// Counts of one image, or summed over several.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub matches: usize,
    pub predictions: usize,
    pub references: usize,
}

impl Counts {
    /// Matches `predictions` against `references` (see the module docs).
    pub fn of(predictions: &[Word], references: &[Word]) -> Counts {
        let (dont_care, references): (Vec<Word>, Vec<Word>) =
            references.iter().copied().partition(|r| r.text == DONT_CARE);
        // HierText's EPSILON keeps an empty box from dividing by zero.
        let on_dont_care = |p: &Word| {
            p.bbox.is_some_and(|b| {
                dont_care
                    .iter()
                    .filter_map(|d| d.bbox)
                    .any(|d| b.intersection(&d) / (b.area() + 1e-5) >= DONT_CARE_COVER)
            })
        };
        let predictions: Vec<Word> = predictions.iter().filter(|p| !on_dont_care(p)).copied().collect();
        let iou = |p: &Word, r: &Word| match (p.bbox, r.bbox) {
            (Some(a), Some(b)) => a.iou(&b),
            _ => 0.0,
        };
        let best_prediction = |r: &Word| argmax(predictions.iter().map(|p| iou(p, r)));
        let best_reference = |p: &Word| argmax(references.iter().map(|r| iou(p, r)));
        let matches = references
            .iter()
            .enumerate()
            .filter(|&(i, r)| {
                best_prediction(r).is_some_and(|(j, score)| {
                    let p = &predictions[j];
                    score >= IOU_THRESHOLD && best_reference(p).is_some_and(|(k, _)| k == i) && p.text == r.text
                })
            })
            .count();
        Counts { matches, predictions: predictions.len(), references: references.len() }
    }

    /// `(precision, recall, f1)`.
    pub fn scores(&self) -> (f64, f64, f64) {
        let ratio = |n: usize, d: usize| if d == 0 { 1.0 } else { n as f64 / d as f64 };
        let precision = ratio(self.matches, self.predictions);
        let recall = ratio(self.matches, self.references);
        let sum = precision + recall;
        let f1 = if sum > 0.0 { 2.0 * precision * recall / sum } else { 0.0 };
        (precision, recall, f1)
    }
}

impl std::ops::AddAssign for Counts {
    fn add_assign(&mut self, other: Counts) {
        self.matches += other.matches;
        self.predictions += other.predictions;
        self.references += other.references;
    }
}

/// Index and value of the first maximum, as `np.argmax`; `None` when empty.
fn argmax(values: impl Iterator<Item = f64>) -> Option<(usize, f64)> {
    values.enumerate().fold(None, |best, (k, v)| match best {
        Some((_, b)) if b >= v => best,
        _ => Some((k, v)),
    })
}
