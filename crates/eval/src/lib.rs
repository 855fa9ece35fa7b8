//! Evaluation metrics for pg2, each matching the scorer the PaliGemma 2 paper reports with.
//!
//! A metric reads a list of examples, JSON objects holding the model's `prediction` and the
//! references that metric needs, and returns named scores plus the example count `n`:
//!
//! | metric | fields besides `prediction` | scores |
//! |---|---|---|
//! | `cider` | `references`: list of strings | `cider` (pycocoevalcap's CIDEr-D; the paper's 141.3 is 1.413 here) |
//! | `bleu4` | `references`: list of strings | `bleu1` .. `bleu4` (pycocoevalcap's corpus BLEU) |
//! | `vqa` | `answers`: list of strings (10 in VQAv2) | `vqa` (official VQAv2 accuracy) |
//! | `anls` | `answers`: list of strings | `anls` (DocVQA, threshold 0.5) |
//! | `relaxed` | `answers`: list of strings | `relaxed` (ChartQA relaxed accuracy) |
//! | `exact` | `answers`: list of strings | `exact` (trimmed, case ignored) |
//! | `exact_cased` | `answers`: list of strings | `exact_cased` (trimmed, case kept: big_vision's `vqa` evaluator with its default `to_lower=False`) |
//! | `tallyqa` | `answers`: list of strings | `tallyqa` (big_vision's TallyQA evaluator: number words up to "twenty" read as numerals, then exact) |
//! | `scienceqa` | `answers`: list of strings (`"The answer is B."`) | `scienceqa` (big_vision's ScienceQA evaluator: the letters read by `the answer is ([a-z])\.` compared) |
//! | `refcoco` | `boxes`: list of `[y1, x1, y2, x2]` (pixels; the first is used), `width`, `height` | `accuracy` (IoU >= 0.5), `mean_iou` |
//! | `refcoco_seg` | `mask`: the reference mask as COCO's RLE (`{"size": [h, w], "counts": ...}`, counts a list or compressed), `boxes` (as `refcoco`) | `miou` (mean mask IoU, the paper's RefCOCO number), `box_accuracy@0.5`, `box_accuracy@0.75`, `invalid` (share of predictions that are not 4 box + 16 mask tokens) |
//! | `teds` | `html`: the reference table's HTML | `teds` (PubTabNet's TEDS; a prediction without a `<table>` scores 0) |
//! | `teds_struct` | `html` | `teds_struct` (S-TEDS: structure only) |
//! | `ocr_f1` | `words`: list of `{"text": "...", "box": [y1, x1, y2, x2]}` (pixels), `width`, `height` | `precision`, `recall`, `f1` (HierText's word-level end-to-end scores: IoU >= 0.5 and exact text; `###` words and the predictions on them left out) |
//!
//! Every score is a fraction (1.0 = perfect; CIDEr can exceed 1): the paper's tables print
//! them times 100 (the official VQA script prints its mean times 100, rounded to 2
//! decimals). Scores are unrounded means over the examples, except `ocr_f1`'s, which are
//! computed from the match, prediction and reference counts summed over all examples.
//!
//! Predictions are the model's text: for `refcoco`, a box as four `<locNNNN>` tokens; for
//! `refcoco_seg`, those followed by sixteen `<segNNN>` mask codes (see [`segmentation`]:
//! scoring them needs the mask VQ-VAE's decoder, [`score_with`]); for
//! `ocr_f1`, `<locY1><locX1><locY2><locX2> word` segments separated by `" ; "` (see [`ocr`]);
//! for the table metrics, HTML (see [`teds`]).
//!
//! ```
//! use pg2_eval::{score, Metric};
//! let ex = serde_json::json!({"prediction": "Two", "answers": ["2", "2"]});
//! let out = score(Metric::Exact, &[ex]).unwrap();
//! assert_eq!(out["exact"], 0.0);
//! assert_eq!(out["n"], 1);
//! ```
//!
//! The modules hold typed per-example functions for use without JSON.

/// Whether Python's `str.split()` and `str.strip()` take `c` for whitespace: Unicode's
/// White_Space (Rust's `char::is_whitespace`) and the ASCII separators U+001C to U+001F,
/// which the official scorers, being Python, also split on.
pub(crate) fn is_python_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// Python's `text.split()`: the words between runs of [`is_python_space`] characters.
pub(crate) fn python_split(text: &str) -> impl Iterator<Item = &str> {
    text.split(is_python_space).filter(|w| !w.is_empty())
}

pub mod anls;
pub mod caption;
pub mod example;
pub mod mask;
pub mod ocr;
pub mod ptb;
pub mod qa;
pub mod refcoco;
pub mod segmentation;
pub mod teds;

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde_json::{Map, Value};

use example::Example;

/// An evaluation metric; `FromStr` takes the lower-case names listed in [`Metric::ALL`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Metric {
    /// CIDEr-D as pycocoevalcap computes it, after PTB tokenisation.
    Cider,
    /// BLEU-1..4 as pycocoevalcap computes it, after PTB tokenisation.
    Bleu4,
    /// VQAv2 accuracy as the official `vqaEval.py`.
    Vqa,
    /// Average normalised Levenshtein similarity (DocVQA).
    Anls,
    /// ChartQA relaxed accuracy.
    Relaxed,
    /// Exact match after trimming and lower-casing.
    Exact,
    /// Exact match after trimming, case kept.
    ExactCased,
    /// TallyQA counting accuracy: exact match after number words become numerals.
    TallyQa,
    /// ScienceQA accuracy: the answer letters of "The answer is X." compared.
    ScienceQa,
    /// Referring expression detection: accuracy at IoU >= 0.5 and mean IoU.
    RefCoco,
    /// Referring expression segmentation: mean mask IoU, box accuracy (big_vision's).
    RefCocoSeg,
    /// PubTabNet's table tree-edit-distance similarity, cell content included.
    Teds,
    /// TEDS on the table structure alone (S-TEDS).
    TedsStruct,
    /// End-to-end OCR word precision, recall and F1 (HierText's protocol).
    OcrF1,
}

impl Metric {
    /// Every metric with its name, in declaration order.
    pub const ALL: [(Metric, &'static str); 14] = [
        (Metric::Cider, "cider"),
        (Metric::Bleu4, "bleu4"),
        (Metric::Vqa, "vqa"),
        (Metric::Anls, "anls"),
        (Metric::Relaxed, "relaxed"),
        (Metric::Exact, "exact"),
        (Metric::ExactCased, "exact_cased"),
        (Metric::TallyQa, "tallyqa"),
        (Metric::ScienceQa, "scienceqa"),
        (Metric::RefCoco, "refcoco"),
        (Metric::RefCocoSeg, "refcoco_seg"),
        (Metric::Teds, "teds"),
        (Metric::TedsStruct, "teds_struct"),
        (Metric::OcrF1, "ocr_f1"),
    ];

    /// The score the paper reports, of those the metric returns: what `pg2 report` shows and
    /// sweeps compare by default.
    pub fn primary(self) -> &'static str {
        match self {
            Metric::RefCoco => "accuracy",
            Metric::RefCocoSeg => "miou",
            Metric::OcrF1 => "f1",
            other => other.name(),
        }
    }

    /// The metric's name, as `FromStr` accepts it.
    pub fn name(self) -> &'static str {
        Self::ALL.iter().find(|(m, _)| *m == self).map(|(_, n)| *n).unwrap_or_default()
    }
}

impl fmt::Display for Metric {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Metric {
    type Err = EvalError;

    fn from_str(s: &str) -> Result<Self, EvalError> {
        Self::ALL.iter().find(|(_, n)| *n == s).map(|(m, _)| *m).ok_or_else(|| EvalError::UnknownMetric(s.to_string()))
    }
}

/// Reads a metric by name (a recipe's `eval.metric`).
impl<'de> serde::Deserialize<'de> for Metric {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let name = String::deserialize(deserializer)?;
        name.parse().map_err(serde::de::Error::custom)
    }
}

/// Why a set of examples could not be scored.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error("unknown metric {0:?} (known: {known})", known = Metric::ALL.map(|(_, name)| name).join(", "))]
    UnknownMetric(String),
    #[error("no examples to score")]
    Empty,
    /// An example lacks a field, or the field has the wrong type; `index` counts from 0.
    #[error("example {index}: field `{field}` {problem}")]
    Field { index: usize, field: &'static str, problem: String },
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("refcoco_seg turns mask tokens into masks with big_vision's VQ-VAE: give its vae-oid.npz (`eval.mask_vae` in a recipe, `--mask-vae` for pg2 metric)")]
    NoMaskDecoder,
    #[error("decoding masks: {0}")]
    MaskDecoder(String),
    /// A line of a JSONL file that is not JSON or not a valid example; `line` counts from 1.
    #[error("{}:{line}: {message}", path.display())]
    Line { path: PathBuf, line: usize, message: String },
}

/// Scores `examples` (JSON objects, fields as in the crate docs) with `metric`.
///
/// Returns the metric's named scores and `n`, the number of examples; an empty list is an
/// error rather than a NaN score.
pub fn score(metric: Metric, examples: &[Value]) -> Result<Map<String, Value>, EvalError> {
    score_with(metric, examples, None)
}

/// [`score`], with the mask VQ-VAE's decoder `refcoco_seg` needs.
pub fn score_with(
    metric: Metric,
    examples: &[Value],
    masks: Option<segmentation::DecodeMasks>,
) -> Result<Map<String, Value>, EvalError> {
    if examples.is_empty() {
        return Err(EvalError::Empty);
    }
    let examples: Vec<Example> = examples.iter().enumerate().map(|(i, v)| Example::new(i, v)).collect();
    let scores = match metric {
        Metric::Cider => vec![("cider", mean(&caption::cider(&caption_pairs(&examples)?)))],
        Metric::Bleu4 => {
            let bleu = caption::bleu(&caption_pairs(&examples)?);
            ["bleu1", "bleu2", "bleu3", "bleu4"].into_iter().zip(bleu).collect()
        }
        Metric::Vqa => vec![("vqa", mean_over(&examples, "answers", qa::vqa_accuracy)?)],
        Metric::Anls => vec![("anls", mean_over(&examples, "answers", anls::anls)?)],
        Metric::Relaxed => vec![("relaxed", mean_over(&examples, "answers", qa::relaxed_accuracy)?)],
        Metric::Exact => vec![("exact", mean_over(&examples, "answers", qa::exact_match)?)],
        Metric::ExactCased => vec![("exact_cased", mean_over(&examples, "answers", qa::exact_match_cased)?)],
        Metric::TallyQa => vec![("tallyqa", mean_over(&examples, "answers", qa::tallyqa_accuracy)?)],
        Metric::ScienceQa => vec![("scienceqa", mean_over(&examples, "answers", qa::scienceqa_accuracy)?)],
        Metric::RefCoco => refcoco_scores(&examples)?,
        Metric::RefCocoSeg => segmentation_scores(&examples, masks.ok_or(EvalError::NoMaskDecoder)?)?,
        Metric::Teds => vec![("teds", mean_teds(&examples, false)?)],
        Metric::TedsStruct => vec![("teds_struct", mean_teds(&examples, true)?)],
        Metric::OcrF1 => ocr_scores(&examples)?,
    };
    let mut out: Map<String, Value> = scores.into_iter().map(|(k, v)| (k.to_string(), Value::from(v))).collect();
    out.insert("n".into(), Value::from(examples.len()));
    Ok(out)
}

/// Scores a JSONL file of examples (one JSON object a line; blank lines are skipped).
///
/// Errors name the file and the 1-based line of the offending example.
pub fn score_file(
    metric: Metric,
    path: &Path,
    masks: Option<segmentation::DecodeMasks>,
) -> Result<Map<String, Value>, EvalError> {
    let text = std::fs::read_to_string(path).map_err(|source| EvalError::Io { path: path.into(), source })?;
    let line_error = |line: usize, message: String| EvalError::Line { path: path.into(), line, message };
    let mut lines = Vec::new();
    let mut examples = Vec::new();
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        examples.push(serde_json::from_str(line).map_err(|e| line_error(i + 1, e.to_string()))?);
        lines.push(i + 1);
    }
    score_with(metric, &examples, masks).map_err(|e| match e {
        EvalError::Field { index, field, problem } => line_error(lines[index], format!("field `{field}` {problem}")),
        EvalError::Empty => line_error(0, "no examples to score".into()),
        e => e,
    })
}

/// (prediction, references) of every example, for the caption metrics.
fn caption_pairs<'a>(examples: &[Example<'a>]) -> Result<Vec<(&'a str, Vec<&'a str>)>, EvalError> {
    examples.iter().map(|e| Ok((e.prediction()?, e.non_empty_strings("references")?))).collect()
}

/// Mean over the examples of `f(prediction, answers)`, answers read from `field`.
fn mean_over(examples: &[Example], field: &'static str, f: fn(&str, &[&str]) -> f64) -> Result<f64, EvalError> {
    let values = examples
        .iter()
        .map(|e| Ok(f(e.prediction()?, &e.non_empty_strings(field)?)))
        .collect::<Result<Vec<f64>, EvalError>>()?;
    Ok(mean(&values))
}

fn refcoco_scores(examples: &[Example]) -> Result<Vec<(&'static str, f64)>, EvalError> {
    let ious = examples
        .iter()
        .map(|e| Ok(refcoco::prediction_iou(e.prediction()?, e.first_box()?, e.number("width")?, e.number("height")?)))
        .collect::<Result<Vec<f64>, EvalError>>()?;
    let hits: Vec<f64> = ious.iter().map(|&iou| f64::from(u8::from(iou >= refcoco::IOU_THRESHOLD))).collect();
    Ok(vec![("accuracy", mean(&hits)), ("mean_iou", mean(&ious))])
}

fn segmentation_scores(
    examples: &[Example],
    decode: segmentation::DecodeMasks,
) -> Result<Vec<(&'static str, f64)>, EvalError> {
    let predictions =
        examples.iter().map(|e| Ok(segmentation::Prediction::parse(e.prediction()?))).collect::<Result<Vec<_>, _>>()?;
    let references = examples.iter().map(|e| Ok((e.mask("mask")?, e.first_box()?))).collect::<Result<Vec<_>, _>>()?;
    let scored = segmentation::score(&predictions, &references, decode).map_err(EvalError::MaskDecoder)?;
    let share = |f: &dyn Fn(&segmentation::Scored) -> bool| {
        mean(&scored.iter().map(|s| f64::from(u8::from(f(s)))).collect::<Vec<_>>())
    };
    Ok(vec![
        ("miou", mean(&scored.iter().map(|s| s.iou).collect::<Vec<_>>())),
        ("box_accuracy@0.5", share(&|s| s.box_iou >= 0.5)),
        ("box_accuracy@0.75", share(&|s| s.box_iou >= 0.75)),
        ("invalid", share(&|s| s.invalid)),
    ])
}

fn mean_teds(examples: &[Example], structure_only: bool) -> Result<f64, EvalError> {
    let values = examples
        .iter()
        .map(|e| {
            let reference = teds::Table::parse(e.string("html")?).ok_or_else(|| e.error("html", "holds no <table>"))?;
            Ok(teds::teds(e.prediction()?, &reference, structure_only))
        })
        .collect::<Result<Vec<f64>, EvalError>>()?;
    Ok(mean(&values))
}

fn ocr_scores(examples: &[Example]) -> Result<Vec<(&'static str, f64)>, EvalError> {
    let mut total = ocr::Counts::default();
    for e in examples {
        let predictions = ocr::parse_prediction(e.prediction()?, e.number("width")?, e.number("height")?);
        total += ocr::Counts::of(&predictions, &e.words("words")?);
    }
    let (precision, recall, f1) = total.scores();
    Ok(vec![("precision", precision), ("recall", recall), ("f1", f1)])
}

fn mean(values: &[f64]) -> f64 {
    values.iter().sum::<f64>() / values.len() as f64
}
