//! Converters from public dataset formats into pg2 JSONL.
//!
//! [`convert`] reads a dataset's own annotation files and writes one pg2 record a line,
//! `{"image": "path relative to the output file", "prefix": "...", "suffix": "...", ...}`,
//! keeping the dataset's ids and the ground truth an evaluator needs as extra fields.
//! Prompts and targets follow big_vision's PaliGemma transfer configs
//! (`big_vision/configs/proj/paligemma/transfers/*.py`); where big_vision draws a random
//! target each visit (VQA answers, DocVQA answers), `suffix` holds one (the choice is
//! documented per format) and `answers` all, for a source's `suffix_from` to draw from.
//!
//! | format | `inputs`, in order | image file | prefix | suffix |
//! |---|---|---|---|---|
//! | `coco-captions` | `captions_*.json`, or Karpathy's `dataset_coco.json` with `--split` | `IMAGES/{file_name}`, `IMAGES/{filepath}/{filename}` | `caption en` | the first caption |
//! | `vqav2` | questions json, annotations json (left out for test) | `IMAGES/COCO_{subtype}_{image_id:012}.jpg` | `answer en {question}` | `multiple_choice_answer` |
//! | `textvqa` | `TextVQA_0.5.1_*.json` | `IMAGES/{image_id}.jpg` | `answer en {question}` | most common answer |
//! | `ocrvqa` | `dataset.json` | `IMAGES/{id}{extension of imageURL}` | `answer en {question}` | the answer |
//! | `refcoco` | COCO `instances.json`, refs as JSON | `IMAGES/{file_name}` | the sentence | `<locY1><locX1><locY2><locX2>`, then with `mask_vae` 16 `<segNNN>` |
//! | `docvqa` | `*_v1.0.json` | `IMAGES/{image}` | the question | first answer |
//! | `chartqa` | `*_human.json` or `*_augmented.json` | `IMAGES/{imgname}` | the query | the label |
//! | `ai2d` | `questions/` folder, `ai2d_test_ids.csv` | `IMAGES/{imageName}` | `answer en  {question} choose from: {a} \t {b} ...` | the correct option |
//! | `scienceqa` | `problems.json`, `pid_splits.json` | `IMAGES/{split}/{pid}/{image}` | `Question: ...\nContext: ...\nOptions: (A) ..., (B) ...\nAnswer:` | `The answer is {letter}.` |
//! | `gqa` | `*_questions.json` | `IMAGES/{imageId}.jpg` | `answer en {question}` | the answer |
//! | `tallyqa` | `train.json` or `test.json` | `IMAGES/{image}` | `answer en {question}` | the count in digits |
//! | `vizwiz` | `Annotations/*.json` | `IMAGES/{image}` | `answer en {question}` | most common answer |
//! | `stvqa` | `*_task_3.json` | `IMAGES/{file_path}` | `answer en {question}` | first answer, lower-cased |
//! | `vsr` | `splits/*/*.jsonl` | `IMAGES/{image}` | `answer en {caption}` | `True` or `False` |
//! | `docci` | `docci_descriptions.jsonlines` | `IMAGES/{image_file}` | `caption en` | the description |
//! | `icdar15` | the `gt_img_N.txt` folder | `IMAGES/img_N.jpg` | `ocr` | `<loc>`x4 and text per word, ` ; ` between |
//! | `hiertext` | `train.jsonl` or `validation.jsonl` | `IMAGES/{image_id}.jpg` | `ocr` | as `icdar15` |
//! | `totaltext` | the `poly_gt_imgN.txt` folder | `IMAGES/imgN.jpg` (or `.JPG`) | `ocr` | as `icdar15` |
//! | `mimic-cxr` | `mimic-cxr-2.0.0-split.csv`, the reports' `files/` | `IMAGES/files/pXX/pSUBJECT/sSTUDY/DICOM.jpg` | `INDICATION: ...` | `FINDINGS: ... IMPRESSION: ...` |
//! | `pubtabnet` | `PubTabNet_2.0.0.jsonl` | `IMAGES/{split}/{filename}` | `table html` | the table's HTML, cells with `coords` |
//! | `mlt` | the `gt_img_N.txt` (MLT17) or `tr_img_N.txt` (MLT19) folder | `IMAGES/img_N.{jpg,png}` | `ocr` | as `icdar15` |
//! | `textocr` | `TextOCR_0.1_{train,val}.json` | `IMAGES/{id}.jpg` | `ocr` | as `icdar15` |
//! | `intelocr` | `text_spotting_openimages_v5_*.json` (one or more) | `IMAGES/{file_name}` | `ocr` | as `icdar15` |
//! | `fintabnet` | `FinTabNet_1.0.0_cell_*.jsonl` | `IMAGES/{table_id}.png` (crops rendered from the PDF pages) | `table html` | as `pubtabnet` |
//! | `grandstaff` | a `partitions_grandstaff/` list | `IMAGES/{score}.jpg` | `music kern` | the `**kern` file |
//! | `grandstaff-distorted` | as `grandstaff` | `IMAGES/{score}_distorted.jpg` | `music kern` | as `grandstaff` |
//! | `molscribe` | a MolScribe csv (`image_id,file_path,SMILES`) | `IMAGES/{file_path}` | `molecule smiles` | the SMILES |
//!
//! With `pad_to_square` (`--pad-to-square`, for recipes with `data.pad_to_square`) the
//! formats with box targets (the OCR and table ones, [`Format::bins_boxes`]) bin their `<loc>`
//! tokens on the image padded below or to the right to a square of its longer side, and write
//! that side as `width` and `height` (OCR), the frame `ocr_f1` decodes predictions in: pixels
//! keep their coordinates.
//!
//! Records come out in input order. Nothing is written unless the whole conversion succeeds:
//! the output goes to a temporary file beside it, renamed at the end.

mod ai2d;
mod chartqa;
mod coco_captions;
mod docci;
mod docvqa;
mod gqa;
mod grandstaff;
mod hiertext;
mod icdar15;
mod intelocr;
mod json;
mod mimic_cxr;
mod molscribe;
mod ocrvqa;
mod pubtabnet;
mod refcoco;
mod scienceqa;
mod stvqa;
mod tallyqa;
#[cfg(test)]
mod test_support;
mod textocr;
mod textvqa;
mod totaltext;
mod vizwiz;
mod vqav2;
mod vsr;
mod write;

use std::collections::BTreeSet;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde_json::{Map, Value};

use crate::DataError;

/// A public dataset format [`convert`] reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// COCO captions: one record per image, `references` = its captions; Karpathy's split
    /// with `split`.
    CocoCaptions,
    /// VQAv2: one record per question, `answers` = the 10 annotators' answers.
    Vqa,
    /// TextVQA: one record per question, suffix = the most common answer.
    TextVqa,
    /// OCR-VQA: one record per (book cover, question); `split` picks train/val/test.
    OcrVqa,
    /// RefCOCO / RefCOCO+ / RefCOCOg: one record per referring sentence, suffix = its box.
    RefCoco,
    /// DocVQA: one record per question, suffix = the first answer.
    DocVqa,
    /// ChartQA (human or augmented): one record per question, suffix = the label.
    ChartQa,
    /// AI2D: one record per diagram question, the options in the prompt; `split` train/test.
    Ai2d,
    /// ScienceQA: one record per image question, lettered options in the prompt; `split` names
    /// a list of `pid_splits.json`.
    ScienceQa,
    /// GQA: one record per question, suffix = the answer.
    Gqa,
    /// TallyQA: one record per counting question, suffix = the count; `split` simple/complex.
    TallyQa,
    /// VizWiz VQA: one record per question, suffix = the most common answer.
    VizWiz,
    /// ST-VQA: one record per question, answers lower-cased.
    StVqa,
    /// Visual Spatial Reasoning: one record per statement, suffix `True` or `False`.
    Vsr,
    /// DOCCI: one record per image, suffix = its long description; `split` picks one.
    Docci,
    /// PubTabNet: one record per table, suffix = its HTML with cell boxes; `split` picks one.
    PubTabNet,
    /// ICDAR 2015 incidental scene text: one record per image, suffix = its words with boxes.
    Icdar15,
    /// HierText: one record per image, suffix = its words with boxes.
    HierText,
    /// Total-Text: one record per image, suffix = its words with boxes.
    TotalText,
    /// MIMIC-CXR: one record per X-ray of a split, suffix = its report's findings and
    /// impression.
    MimicCxr,
    /// ICDAR 2017 / 2019 multi-lingual scene text: one record per image, suffix = its words
    /// with boxes.
    Mlt,
    /// TextOCR: one record per image, suffix = its words with boxes.
    TextOcr,
    /// Open Images V5 text (the paper's IntelOCR): one record per image, suffix = its words
    /// with boxes.
    IntelOcr,
    /// FinTabNet: one record per table (crops rendered beforehand), suffix = its HTML with
    /// cell boxes.
    FinTabNet,
    /// GrandStaff: one record per score, its original render, suffix = its `**kern`.
    GrandStaff,
    /// GrandStaff: one record per score, its distorted render, suffix = its `**kern`.
    GrandStaffDistorted,
    /// MolScribe's csv files: one record per molecule image, suffix = its SMILES.
    MolScribe,
}

impl Format {
    /// Every format, in the order `--help` lists them.
    pub const ALL: [Format; 27] = [
        Format::CocoCaptions,
        Format::Vqa,
        Format::TextVqa,
        Format::OcrVqa,
        Format::RefCoco,
        Format::DocVqa,
        Format::ChartQa,
        Format::Ai2d,
        Format::ScienceQa,
        Format::Gqa,
        Format::TallyQa,
        Format::VizWiz,
        Format::StVqa,
        Format::Vsr,
        Format::Docci,
        Format::PubTabNet,
        Format::Icdar15,
        Format::HierText,
        Format::TotalText,
        Format::MimicCxr,
        Format::Mlt,
        Format::TextOcr,
        Format::IntelOcr,
        Format::FinTabNet,
        Format::GrandStaff,
        Format::GrandStaffDistorted,
        Format::MolScribe,
    ];

    /// The name the CLI takes.
    pub fn name(self) -> &'static str {
        match self {
            Format::CocoCaptions => "coco-captions",
            Format::Vqa => "vqav2",
            Format::TextVqa => "textvqa",
            Format::OcrVqa => "ocrvqa",
            Format::RefCoco => "refcoco",
            Format::DocVqa => "docvqa",
            Format::ChartQa => "chartqa",
            Format::Ai2d => "ai2d",
            Format::ScienceQa => "scienceqa",
            Format::Gqa => "gqa",
            Format::TallyQa => "tallyqa",
            Format::VizWiz => "vizwiz",
            Format::StVqa => "stvqa",
            Format::Vsr => "vsr",
            Format::Docci => "docci",
            Format::PubTabNet => "pubtabnet",
            Format::Icdar15 => "icdar15",
            Format::HierText => "hiertext",
            Format::TotalText => "totaltext",
            Format::MimicCxr => "mimic-cxr",
            Format::Mlt => "mlt",
            Format::TextOcr => "textocr",
            Format::IntelOcr => "intelocr",
            Format::FinTabNet => "fintabnet",
            Format::GrandStaff => "grandstaff",
            Format::GrandStaffDistorted => "grandstaff-distorted",
            Format::MolScribe => "molscribe",
        }
    }

    /// The `--input` files this format takes, in order, and what `--images` is.
    pub fn usage(self) -> &'static str {
        match self {
            Format::CocoCaptions => {
                "CAPTIONS.json (captions_train2014.json, ...; images: the folder of file_name), or with \
                 --split train|val|test Karpathy's dataset_coco.json (train = train + restval; images: the \
                 folder holding train2014/ and val2014/)"
            }
            Format::Vqa => {
                "QUESTIONS.json [ANNOTATIONS.json] (v2_OpenEnded_mscoco_*_questions.json, \
                 v2_mscoco_*_annotations.json; no annotations for test); images: train2014/, val2014/ or test2015/"
            }
            Format::TextVqa => "TextVQA_0.5.1_{train,val,test}.json; images: train_images/ or test_images/",
            Format::OcrVqa => "dataset.json; images: the folder the download script filled; --split train|val|test",
            Format::RefCoco => {
                "INSTANCES.json REFS.json (refcoco/instances.json and refs(unc).p exported to JSON, a list of refs); \
                 images: train2014/; --split train|val|testA|testB|test"
            }
            Format::DocVqa => "{train,val,test}_v1.0.json; images: the folder holding documents/",
            Format::ChartQa => {
                "{train,val,test}_{human,augmented}.json of \"ChartQA Dataset/{split}/\"; images: that split's png/"
            }
            Format::Ai2d => "questions/ (the folder) ai2d_test_ids.csv; images: images/; --split train|test",
            Format::ScienceQa => {
                "problems.json pid_splits.json; images: the folder holding train/, val/ and test/; \
                 --split train|val|test|minival|... (a list of pid_splits.json)"
            }
            Format::Gqa => "{train,val,testdev}_balanced_questions.json; images: images/",
            Format::TallyQa => {
                "train.json or test.json; images: the folder holding train2014/, val2014/, VG_100K/ and \
                 VG_100K_2/; optional --split simple|complex"
            }
            Format::VizWiz => "Annotations/{train,val,test}.json; images: train/, val/ or test/",
            Format::StVqa => "train_task_3.json or test_task_3.json; images: the folder holding coco-text/, ...",
            Format::Vsr => "a split's {train,dev,test}.jsonl (splits/random/ or splits/zeroshot/); images: images/",
            Format::Docci => {
                "docci_descriptions.jsonlines; images: images/; optional --split train|test|qual_dev|qual_test"
            }
            Format::PubTabNet => {
                "PubTabNet_2.0.0.jsonl; images: the folder holding train/, val/ and test/; optional --split \
                 train|val|test"
            }
            Format::Icdar15 => {
                "the ground-truth folder (ch4_training_localization_transcription_gt/ or \
                 Challenge4_Test_Task4_GT/); images: ch4_training_images/ or ch4_test_images/"
            }
            Format::HierText => "train.jsonl or validation.jsonl (gunzipped); images: train/ or validation/",
            Format::TotalText => {
                "txt_format/Train/ or txt_format/Test/ (the folder); images: Images/Train/ or Images/Test/"
            }
            Format::MimicCxr => {
                "mimic-cxr-2.0.0-split.csv (gunzipped) and the reports' files/ folder; images: the MIMIC-CXR-JPG \
                 folder holding files/; --split train|validate|test"
            }
            Format::Mlt => {
                "the ground-truth folder (MLT17: ch8_training_localization_transcription_gt_v2/ or \
                 ch8_validation_localization_transcription_gt_v2/; MLT19: train_gt_t13/); images: the folder \
                 holding all of that set's images (MLT17's ch8_training_images_{1..8}.zip unzipped into one; \
                 MLT19's ImagesPart1/ and ImagesPart2/ merged)"
            }
            Format::TextOcr => "TextOCR_0.1_train.json or TextOCR_0.1_val.json; images: TextVQA's train_images/",
            Format::IntelOcr => {
                "text_spotting_openimages_v5_train_{1,2,5,f}.json (any of them, repeat --input) or \
                 text_spotting_openimages_v5_validation.json; images: the folder their file_name paths are \
                 relative to (Open Images' train_{1,2,5,f} and validation tars unpacked there)"
            }
            Format::FinTabNet => {
                "FinTabNet_1.0.0_cell_{train,val,test}.jsonl; images: a folder of the table crops {table_id}.png \
                 rendered beforehand from pdf/{filename}, clipped to the record's bbox (PDF points, y up from the \
                 page's bottom)"
            }
            Format::GrandStaff | Format::GrandStaffDistorted => {
                "partitions_grandstaff/types/{train,val,test}.txt; images: the folder the listed paths are \
                 relative to (holding grandstaff_dataset/)"
            }
            Format::MolScribe => {
                "a MolScribe csv (synthetic/chemdraw.csv, real/acs.csv, ...: file_path, SMILES, image_id columns); \
                 images: the folder file_path is relative to (MolScribe's data/)"
            }
        }
    }

    /// Whether [`ConvertArgs::split`] applies (the other formats keep one split per file).
    pub fn takes_split(self) -> bool {
        matches!(
            self,
            Format::CocoCaptions
                | Format::OcrVqa
                | Format::RefCoco
                | Format::Ai2d
                | Format::ScienceQa
                | Format::TallyQa
                | Format::Docci
                | Format::PubTabNet
                | Format::MimicCxr
        )
    }

    /// Whether [`ConvertArgs::pad_to_square`] applies: the OCR and table formats, whose
    /// `<loc>` boxes it bins on the padded square (RefCOCO's recipes do not pad).
    pub fn bins_boxes(self) -> bool {
        matches!(
            self,
            Format::Icdar15
                | Format::HierText
                | Format::TotalText
                | Format::Mlt
                | Format::TextOcr
                | Format::IntelOcr
                | Format::PubTabNet
                | Format::FinTabNet
        )
    }

    /// One line per format, name and usage, for `--help`.
    pub fn help() -> String {
        Format::ALL.iter().map(|f| format!("  {:<21} {}\n", f.name(), f.usage())).collect()
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Format {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Format::ALL.into_iter().find(|f| f.name() == s).ok_or_else(|| {
            let names: Vec<_> = Format::ALL.iter().map(|f| f.name()).collect();
            format!("unknown dataset format `{s}` (one of {})", names.join(", "))
        })
    }
}

/// What to convert: `pg2 convert FORMAT --input FILE... --images DIR --output FILE.jsonl
/// [--split NAME] [--skip-missing] [--pad-to-square]`.
#[derive(Debug, Clone)]
pub struct ConvertArgs {
    /// The format of `inputs`.
    pub format: Format,
    /// The dataset's annotation files, in the order [`Format::usage`] gives.
    pub inputs: Vec<PathBuf>,
    /// The folder the dataset's image names are relative to.
    pub images: PathBuf,
    /// The JSONL file to write; its folder is created if needed, and image paths are
    /// written relative to it.
    pub output: PathBuf,
    /// Keep only this split (formats with [`Format::takes_split`]; an error for the others).
    pub split: Option<String>,
    /// Leave out records whose image file is missing (counted in the summary) instead of failing.
    pub skip_missing: bool,
    /// big_vision's mask VQ-VAE (`vae-oid.npz`), for `refcoco` targets with the mask's
    /// `<seg>` tokens (an error for the other formats).
    pub mask_vae: Option<PathBuf>,
    /// Bin `<loc>` tokens on the image padded to a square (formats with [`Format::bins_boxes`];
    /// an error for the others), for recipes with `data.pad_to_square`.
    pub pad_to_square: bool,
}

/// What [`convert`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConvertSummary {
    /// Records in the output file.
    pub records: usize,
    /// Records left out because their image is missing (only with `skip_missing`).
    pub skipped_records: usize,
    /// The missing image files, each once, in the order first needed.
    pub missing_images: Vec<PathBuf>,
}

/// Converts `args.inputs` (in `args.format`) into the pg2 JSONL file `args.output`.
///
/// Errors name the file at fault: an input that is not JSON or lacks a field (with the key
/// and array index), a missing image (unless `skip_missing`), a wrong number of inputs.
/// On error no output file is left behind (an existing one is left as it was).
pub fn convert(args: &ConvertArgs) -> Result<ConvertSummary, DataError> {
    let format = args.format;
    if args.split.is_some() && !format.takes_split() {
        let names: Vec<_> = Format::ALL.iter().filter(|f| f.takes_split()).map(|f| f.name()).collect();
        return Err(usage_error(format, &format!("--split only applies to {}", names.join(", "))));
    }
    if args.mask_vae.is_some() && format != Format::RefCoco {
        return Err(usage_error(format, "--mask-vae only applies to refcoco"));
    }
    if args.pad_to_square && !format.bins_boxes() {
        let names: Vec<_> = Format::ALL.iter().filter(|f| f.bins_boxes()).map(|f| f.name()).collect();
        return Err(usage_error(format, &format!("--pad-to-square only applies to {}", names.join(", "))));
    }
    let split = args.split.as_deref();
    let square = args.pad_to_square;
    let examples = match format {
        Format::CocoCaptions => coco_captions::coco_captions(&args.inputs, split)?,
        Format::Vqa => vqav2::vqav2(&args.inputs)?,
        Format::TextVqa => textvqa::textvqa(&args.inputs)?,
        Format::OcrVqa => ocrvqa::ocrvqa(&args.inputs, split)?,
        Format::RefCoco => refcoco::refcoco(&args.inputs, split, args.mask_vae.as_deref())?,
        Format::DocVqa => docvqa::docvqa(&args.inputs)?,
        Format::ChartQa => chartqa::chartqa(&args.inputs)?,
        Format::Ai2d => ai2d::ai2d(&args.inputs, split)?,
        Format::ScienceQa => scienceqa::scienceqa(&args.inputs, split)?,
        Format::Gqa => gqa::gqa(&args.inputs)?,
        Format::TallyQa => tallyqa::tallyqa(&args.inputs, split)?,
        Format::VizWiz => vizwiz::vizwiz(&args.inputs)?,
        Format::StVqa => stvqa::stvqa(&args.inputs)?,
        Format::Vsr => vsr::vsr(&args.inputs)?,
        Format::Docci => docci::docci(&args.inputs, split)?,
        Format::PubTabNet => pubtabnet::pubtabnet(&args.inputs, &args.images, split, square)?,
        Format::Icdar15 => icdar15::icdar15(&args.inputs, &args.images, square)?,
        Format::HierText => hiertext::hiertext(&args.inputs, square)?,
        Format::TotalText => totaltext::totaltext(&args.inputs, &args.images, square)?,
        Format::MimicCxr => mimic_cxr::mimic_cxr(&args.inputs, split)?,
        Format::Mlt => icdar15::mlt(&args.inputs, &args.images, square)?,
        Format::TextOcr => textocr::textocr(&args.inputs, square)?,
        Format::IntelOcr => intelocr::intelocr(&args.inputs, square)?,
        Format::FinTabNet => pubtabnet::fintabnet(&args.inputs, &args.images, square)?,
        Format::GrandStaff => grandstaff::grandstaff(&args.inputs, &args.images, grandstaff::Render::Original)?,
        Format::GrandStaffDistorted => {
            grandstaff::grandstaff(&args.inputs, &args.images, grandstaff::Render::Distorted)?
        }
        Format::MolScribe => molscribe::molscribe(&args.inputs)?,
    };
    write::write_jsonl(args, &examples)
}

/// One output record before its image path is checked and made relative.
struct Example {
    /// Relative to the images folder.
    image: PathBuf,
    prefix: String,
    suffix: Option<String>,
    extra: Map<String, Value>,
}

/// A JSON object's fields for [`Example::extra`]; null fields (absent in the input) are left out.
fn fields(object: Value) -> Map<String, Value> {
    let Value::Object(mut map) = object else { unreachable!("fields() takes a json!({{...}}) object") };
    map.retain(|_, v| !v.is_null());
    map
}

/// A record's `answers`: the list, or null (which [`fields`] leaves out) when there are none.
fn answers_or_null(answers: &[String]) -> Value {
    if answers.is_empty() {
        Value::Null
    } else {
        Value::from(answers)
    }
}

fn vqa_prompt(question: &str) -> String {
    format!("answer en {question}")
}

/// The most frequent string, the earliest on ties.
fn most_common(items: &[String]) -> Option<&str> {
    let mut counts: Vec<(&str, usize)> = Vec::new(); // in order of first appearance
    for item in items {
        match counts.iter_mut().find(|(s, _)| *s == item.as_str()) {
            Some((_, n)) => *n += 1,
            None => counts.push((item, 1)),
        }
    }
    // max_by_key keeps the last of equal maxima; reversing makes it the first.
    counts.into_iter().rev().max_by_key(|&(_, n)| n).map(|(s, _)| s)
}

/// The 4 location tokens of a box `[y1, x1, y2, x2]` in pixels of a `width` x `height` image.
pub(super) fn loc_tokens(corners: [f64; 4], width: f64, height: f64) -> String {
    let sizes = [height, width, height, width];
    corners.iter().zip(sizes).map(|(&c, size)| loc_token(c, size)).collect()
}

/// `<locNNNN>` for a coordinate along an axis of `size` pixels: big_vision's
/// `round(coord / size * 1023)` clipped to [0, 1023]. `tf.round` rounds halves to even, so
/// does this; the product is taken before the division so that exact halves stay exact.
pub(super) fn loc_token(coord: f64, size: f64) -> String {
    let bin = (coord * 1023.0 / size).round_ties_even().clamp(0.0, 1023.0);
    format!("<loc{:04}>", bin as u32)
}

/// The text of an unreadable word (ICDAR'15's, and pg2's `ocr_f1` metric's).
const DONT_CARE: &str = "###";

/// An `ocr` record of the image `image` with `words` (text and box `[y1, x1, y2, x2]` in
/// pixels, unreadable ones as [`DONT_CARE`]) in reading order: prefix `ocr`, suffix = the
/// readable words, each as the four `<loc>` tokens of its box (y1 x1 y2 x2 on the image's
/// size) and its text, joined by ` ; ` (the format `ocr_f1` reads; the paper gives none);
/// `words` = all of them as `{text, box}`, the unreadable ones included (the metric leaves them
/// and the predictions on them out), with the image's `width` and `height`. Without a size
/// (the image is missing) there is no suffix. `size` is the frame of the tokens ([`frame`]:
/// with padding to a square, its side both ways).
fn ocr_example(image: PathBuf, id: &str, words: &[(String, [f64; 4])], size: Option<(f64, f64)>) -> Example {
    let suffix = size.map(|(width, height)| {
        let readable = words.iter().filter(|(text, _)| text != DONT_CARE);
        let segments: Vec<String> =
            readable.map(|(text, corners)| format!("{} {text}", loc_tokens(*corners, width, height))).collect();
        segments.join(" ; ")
    });
    let words: Vec<Value> =
        words.iter().map(|(text, corners)| serde_json::json!({"text": text, "box": corners})).collect();
    Example {
        image,
        prefix: "ocr".into(),
        suffix,
        extra: fields(serde_json::json!({
            "id": id,
            "words": words,
            "width": size.map(|(w, _)| w),
            "height": size.map(|(_, h)| h),
        })),
    }
}

/// The frame `<loc>` tokens are binned on: the image's size `(width, height)`, or with
/// `square` the side of the square it is padded to (below or to the right), both ways.
fn frame(size: Option<(f64, f64)>, square: bool) -> Option<(f64, f64)> {
    size.map(|(width, height)| if square { (width.max(height), width.max(height)) } else { (width, height) })
}

/// The enclosing box `[y1, x1, y2, x2]` of the points `(x, y)`.
fn enclosing_box(points: impl IntoIterator<Item = (f64, f64)>) -> [f64; 4] {
    let mut corners = [f64::INFINITY, f64::INFINITY, f64::NEG_INFINITY, f64::NEG_INFINITY];
    for (x, y) in points {
        corners = [corners[0].min(y), corners[1].min(x), corners[2].max(y), corners[3].max(x)];
    }
    corners
}

/// The size (width, height) of the image `image` under the folder `images`, read from its
/// header; `None` when there is no such file (the writer then reports or skips the record).
fn image_size(images: &Path, image: &Path) -> Result<Option<(f64, f64)>, DataError> {
    let path = images.join(image);
    if !path.is_file() {
        return Ok(None);
    }
    let (width, height) = ::image::image_dimensions(&path)
        .map_err(|e| DataError::File { path: path.display().to_string(), msg: format!("image size: {e}") })?;
    Ok(Some((f64::from(width), f64::from(height))))
}

/// The files of the folder `dir` whose names end in `suffix`, as (name without the suffix,
/// path), in [`natural_key`] order of their names.
fn folder_files(dir: &Path, suffix: &str) -> Result<Vec<(String, PathBuf)>, DataError> {
    let error = |e: std::io::Error| DataError::File { path: dir.display().to_string(), msg: e.to_string() };
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(error)? {
        let path = entry.map_err(error)?.path();
        let name = path.file_name().unwrap_or_default().to_string_lossy().into_owned();
        if let Some(stem) = name.strip_suffix(suffix).filter(|_| path.is_file()) {
            files.push((stem.to_owned(), path));
        }
    }
    files.sort_by(|(a, _), (b, _)| natural_key(a).cmp(&natural_key(b)));
    Ok(files)
}

/// A part of a name for [`natural_key`].
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Chunk<'a> {
    Number(u128),
    Text(&'a str),
}

/// Orders names as people do: runs of digits compare as numbers (`img_9` before `img_10`,
/// `2.png-2` before `2.png-10`).
fn natural_key(name: &str) -> Vec<Chunk<'_>> {
    let mut key = Vec::new();
    let mut rest = name;
    while let Some(first) = rest.chars().next() {
        let digits = first.is_ascii_digit();
        let end = rest.find(|c: char| c.is_ascii_digit() != digits).unwrap_or(rest.len());
        let (run, tail) = rest.split_at(end);
        key.push(if digits { Chunk::Number(run.parse().unwrap_or(u128::MAX)) } else { Chunk::Text(run) });
        rest = tail;
    }
    key
}

/// `split` checked against a format's split names (`None` passes).
fn known_split<'s>(format: Format, split: Option<&'s str>, names: &[&str]) -> Result<Option<&'s str>, DataError> {
    match split {
        Some(name) if !names.contains(&name) => {
            Err(usage_error(format, &format!("unknown split `{name}` (one of {})", names.join(", "))))
        }
        _ => Ok(split),
    }
}

/// The error for a `--split` no record of `path` is in, naming the splits it holds.
fn empty_split(path: &Path, what: &str, split: &str, found: BTreeSet<String>) -> DataError {
    let found: Vec<_> = found.into_iter().collect();
    let msg = format!("no {what} in split `{split}` (found: {})", found.join(", "));
    DataError::File { path: path.display().to_string(), msg }
}

/// The split a format cannot do without.
fn required_split(format: Format, split: Option<&str>) -> Result<&str, DataError> {
    split.ok_or_else(|| usage_error(format, "--split is required"))
}

fn usage_error(format: Format, msg: &str) -> DataError {
    DataError::File { path: format!("convert {format}"), msg: format!("{msg}; inputs: {}", format.usage()) }
}

fn wrong_inputs(format: Format, inputs: &[PathBuf]) -> DataError {
    usage_error(format, &format!("wrong number of inputs ({})", inputs.len()))
}

#[cfg(test)]
mod tests {
    use super::test_support::{args, fixture, no_temporary, TempDir};
    use super::*;

    #[test]
    fn natural_order_compares_digit_runs_as_numbers() {
        let mut names = ["img_10", "img_9", "2.png-10", "2.png-2", "10.png", "img_", "b"];
        names.sort_by(|a, b| natural_key(a).cmp(&natural_key(b)));
        assert_eq!(names, ["2.png-2", "2.png-10", "10.png", "b", "img_", "img_9", "img_10"]);
    }

    #[test]
    fn format_names_round_trip() {
        for format in Format::ALL {
            assert_eq!(format.name().parse::<Format>(), Ok(format));
            assert!(Format::help().contains(format.name()));
        }
    }

    #[test]
    fn bad_inputs_name_file_key_and_index() {
        let tmp = TempDir::new("bad");
        let write = |name: &str, text: &str| {
            let path = tmp.0.join(name);
            std::fs::write(&path, text).unwrap();
            path
        };
        let output = tmp.0.join("out.jsonl");
        let mut a = args(Format::CocoCaptions, &[], "val2014", &output);
        let expect_error = |a: &ConvertArgs, parts: &[&str]| {
            let err = convert(a).unwrap_err().to_string();
            assert!(parts.iter().all(|p| err.contains(p)), "{err} lacks {parts:?}");
            assert!(!output.exists() && no_temporary(&tmp.0), "no output, no temporary");
        };

        a.inputs = vec![write("broken.json", "{\"images\": [{\"id\": 1,")];
        expect_error(&a, &["broken.json", "invalid JSON", "EOF"]);
        let captions = r#"{"images": [{"id": 42, "file_name": "a.jpg"}],
            "annotations": [{"image_id": 42, "caption": "x"}, {"image_id": 42, "id": 2}]}"#;
        a.inputs = vec![write("captions.json", captions)];
        expect_error(&a, &["captions.json", "`annotations[1]`: missing key `caption`"]);
        a.inputs = vec![write("no_images.json", r#"{"annotations": []}"#)];
        expect_error(&a, &["no_images.json", "missing key `images`"]);
        a.inputs = vec![write("unknown.json", r#"{"images": [], "annotations": [{"image_id": 7, "caption": "x"}]}"#)];
        expect_error(&a, &["unknown.json", "`annotations[0].image_id`: no image with id 7"]);
        a.inputs = vec![write("list.json", "[]")];
        expect_error(&a, &["list.json", "invalid JSON", "expected a JSON object"]);
        a.inputs = vec![write("typed.json", r#"{"images": [{"id": 42, "file_name": 3}], "annotations": []}"#)];
        expect_error(&a, &["typed.json", "`images[0].file_name`: expected a string, found a number"]);

        // Refs with an annotation instances.json lacks; a bbox that is not 4 numbers.
        a.format = Format::RefCoco;
        let instances = write("instances.json", r#"{"images": [], "annotations": []}"#);
        let refs = r#"[{"ref_id": 5, "ann_id": 8, "image_id": 1, "split": "train", "sentences": []}]"#;
        a.inputs = vec![instances, write("refs.json", refs)];
        expect_error(&a, &["refs.json", "`[0]`: annotation 8 is not in", "instances.json"]);
        let instances = r#"{"images": [], "annotations": [{"id": 8, "bbox": [1, 2, 3]}]}"#;
        a.inputs[0] = write("instances.json", instances);
        expect_error(&a, &["instances.json", "`annotations[0].bbox`: expected [x, y, w, h]"]);

        // OCR-VQA entries are named by their key.
        a.format = Format::OcrVqa;
        let books = r#"{"b1": {"imageURL": "u.jpg", "questions": ["q"], "answers": [], "split": 1}}"#;
        a.inputs = vec![write("dataset.json", books)];
        expect_error(&a, &["dataset.json", "`b1`: 1 questions but 0 answers"]);

        // Answers that name no option; a VSR label that is not 0 or 1, named by its line.
        a.format = Format::ScienceQa;
        a.split = Some("train".into());
        let problem =
            r#"{"4": {"question": "q", "choices": ["x", "y"], "answer": 2, "image": "i.png", "split": "train"}}"#;
        a.inputs = vec![write("problems.json", problem), write("pid_splits.json", r#"{"train": ["4"]}"#)];
        expect_error(&a, &["problems.json", "`4.answer`: answer 2 of 2 choices"]);
        a.format = Format::Vsr;
        a.split = None;
        a.inputs =
            vec![write("test.jsonl", "{\"image\": \"a.jpg\", \"caption\": \"c\", \"label\": 1}\n{\"label\": 2}\n")];
        expect_error(&a, &["test.jsonl", "`line 2.label`: expected 0 or 1, found 2"]);
        a.format = Format::Ai2d;
        a.split = Some("train".into());
        let questions = tmp.0.join("questions");
        std::fs::create_dir_all(&questions).unwrap();
        let diagram = r#"{"imageName": "1.png", "questions": {"q": {"answerTexts": ["x"], "correctAnswer": 1, "questionId": "1.png-0"}}}"#;
        std::fs::write(questions.join("1.png.json"), diagram).unwrap();
        a.inputs = vec![questions, write("ai2d_test_ids.csv", "7\n")];
        expect_error(&a, &["1.png.json", "`questions.q.correctAnswer`: no option 1 among 1"]);
        a.inputs.pop();
        a.split = None;

        // Usage: input count, --split where it does not apply, unknown names.
        a.format = Format::RefCoco;
        expect_error(&a, &["convert refcoco", "wrong number of inputs (1)", "INSTANCES.json REFS.json"]);
        a.format = Format::DocVqa;
        a.split = Some("train".into());
        expect_error(&a, &["convert docvqa", "--split only applies to coco-captions, ocrvqa, refcoco, ai2d"]);
        a.split = None;
        a.images = tmp.0.join("nowhere");
        a.inputs = vec![fixture(Format::DocVqa).join("val_v1.0.json")];
        expect_error(&a, &["nowhere: images folder"]);
        assert!("vqa"
            .parse::<Format>()
            .unwrap_err()
            .contains("coco-captions, vqav2, textvqa, ocrvqa, refcoco, docvqa, chartqa, ai2d"));
    }
}
