//! Referring expression segmentation (RefCOCO), as big_vision's segmentation evaluator
//! (`evaluators/proj/paligemma/transfers/segmentation.py`): the prediction is four
//! `<locNNNN>` box tokens then 16 `<segNNN>` mask codes; the codes go through the VQ-VAE's
//! decoder to a 64 x 64 mask, which is resized into the predicted box and compared with the
//! reference mask over the whole image.
//!
//! A prediction is valid when it starts with exactly that: four box tokens with y2 > y1 and
//! x2 > x1, then sixteen mask tokens (what follows is ignored). An invalid prediction, or one
//! whose box is empty once in whole pixels, scores IoU 0 and counts as `invalid`. Box
//! accuracy compares the predicted box (all zeros when invalid) with the reference box.

use crate::mask::{resize_bilinear, Mask};
use crate::refcoco::Box;

/// Mask codes per prediction.
pub const CODES: usize = 16;
/// Side of the masks the codes decode to.
pub const SIDE: usize = 64;

/// The VQ-VAE decoder: a `SIDE * SIDE` row-major mask (inside where positive) for each
/// list of codes. pg2's is `pg2_model::vqvae::MaskVae`, handed in by the caller so that
/// metrics stay free of the model.
pub type DecodeMasks<'a> = &'a dyn Fn(&[[u8; CODES]]) -> Result<Vec<Vec<f32>>, String>;

/// A prediction read as big_vision reads its tokens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Prediction {
    /// `<locNNNN>` values of y1, x1, y2, x2, in 0..=1023.
    pub locs: [u16; 4],
    /// `<segNNN>` values, in 0..128.
    pub codes: [u8; CODES],
}

impl Prediction {
    /// The four box and sixteen mask tokens `text` starts with; `None` when it does not
    /// (or when the box is empty in token units).
    pub fn parse(text: &str) -> Option<Prediction> {
        let mut rest = text;
        let mut token = |name: &str, digits: usize, limit: u16| -> Option<u16> {
            let body = rest.strip_prefix('<')?.strip_prefix(name)?;
            let (number, tail) = body.split_at_checked(digits)?;
            rest = tail.strip_prefix('>')?;
            let value: u16 = number.bytes().all(|b| b.is_ascii_digit()).then(|| number.parse().ok())??;
            (value < limit).then_some(value)
        };
        let mut locs = [0u16; 4];
        for loc in &mut locs {
            *loc = token("loc", 4, 1024)?;
        }
        let mut codes = [0u8; CODES];
        for code in &mut codes {
            *code = token("seg", 3, 128)? as u8;
        }
        (locs[2] > locs[0] && locs[3] > locs[1]).then_some(Prediction { locs, codes })
    }

    /// The box in pixels of a `width` x `height` image (`value / 1023 * size`).
    fn pixel_box(&self, width: f64, height: f64) -> Box {
        let [y1, x1, y2, x2] = self.locs.map(|v| f64::from(v) / 1023.0);
        Box { y1: y1 * height, x1: x1 * width, y2: y2 * height, x2: x2 * width }
    }
}

/// One example's scores.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Scored {
    /// Mask IoU (0 when invalid).
    pub iou: f64,
    /// IoU of the predicted box with the reference box.
    pub box_iou: f64,
    pub invalid: bool,
}

/// Scores predictions against reference masks (full image) and boxes (pixels); `decode`
/// turns the valid predictions' codes into masks, all in one call.
pub fn score(
    predictions: &[Option<Prediction>],
    references: &[(Mask, Box)],
    decode: DecodeMasks,
) -> Result<Vec<Scored>, String> {
    let codes: Vec<[u8; CODES]> = predictions.iter().flatten().map(|p| p.codes).collect();
    let mut masks = decode(&codes)?.into_iter();
    let mut scored = Vec::with_capacity(predictions.len());
    for (prediction, (reference, reference_box)) in predictions.iter().zip(references) {
        let (height, width) = (reference.height as f64, reference.width as f64);
        let Some(prediction) = prediction else {
            // big_vision scores an invalid prediction's box as all zeros: no overlap.
            scored.push(Scored { iou: 0.0, box_iou: 0.0, invalid: true });
            continue;
        };
        let mask64 = masks.next().ok_or("the mask decoder returned fewer masks than codes")?;
        if mask64.len() != SIDE * SIDE {
            return Err(format!("the mask decoder returned {} values, not 64 x 64", mask64.len()));
        }
        let predicted = prediction.pixel_box(width, height);
        let box_iou = predicted.iou(reference_box);
        // Whole pixels, truncated as big_vision's int().
        let [y1, x1, y2, x2] = [predicted.y1, predicted.x1, predicted.y2, predicted.x2].map(|v| v as usize);
        if x2 <= x1 || y2 <= y1 {
            scored.push(Scored { iou: 0.0, box_iou, invalid: true });
            continue;
        }
        let inside = resize_bilinear(&mask64, (SIDE, SIDE), (y2 - y1, x2 - x1));
        let (mut intersection, mut predicted_area) = (0usize, 0usize);
        for (i, value) in inside.iter().enumerate() {
            if *value > 0.0 {
                predicted_area += 1;
                let (y, x) = (y1 + i / (x2 - x1), x1 + i % (x2 - x1));
                intersection += usize::from(reference.pixels[y * reference.width + x]);
            }
        }
        let union = reference.area() + predicted_area - intersection;
        let iou = if union > 0 { intersection as f64 / union as f64 } else { 0.0 };
        scored.push(Scored { iou, box_iou, invalid: false });
    }
    Ok(scored)
}
