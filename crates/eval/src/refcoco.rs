//! Referring expression detection (RefCOCO): the predicted box, read from PaliGemma's
//! `<locNNNN>` tokens, against the reference box.
//!
//! PaliGemma writes a box as four tokens `<locY1><locX1><locY2><locX2>`, each
//! `round(coord / size * 1023)` with `size` the image height (y) or width (x) in pixels. We
//! invert that as `value / 1023 * size` (exact up to the rounding, half a bin: `size / 2046`).

/// A prediction is correct when its IoU with the reference reaches this.
pub const IOU_THRESHOLD: f64 = 0.5;

/// An axis-aligned box in pixels.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Box {
    pub y1: f64,
    pub x1: f64,
    pub y2: f64,
    pub x2: f64,
}

impl Box {
    /// From `[y1, x1, y2, x2]`.
    pub fn from_yxyx([y1, x1, y2, x2]: [f64; 4]) -> Self {
        Box { y1, x1, y2, x2 }
    }

    /// Area, 0 for a box whose corners are swapped.
    pub fn area(&self) -> f64 {
        (self.y2 - self.y1).max(0.0) * (self.x2 - self.x1).max(0.0)
    }

    /// Area of the overlap with `other`.
    pub fn intersection(&self, other: &Box) -> f64 {
        Box {
            y1: self.y1.max(other.y1),
            x1: self.x1.max(other.x1),
            y2: self.y2.min(other.y2),
            x2: self.x2.min(other.x2),
        }
        .area()
    }

    /// Intersection over union; 0 when the union is empty.
    pub fn iou(&self, other: &Box) -> f64 {
        let inter = self.intersection(other);
        let union = self.area() + other.area() - inter;
        if union > 0.0 {
            inter / union
        } else {
            0.0
        }
    }
}

/// The box of the first four `<locNNNN>` tokens of `text` (four digits each, 0..=1023), in
/// pixels of a `width` x `height` image; `None` when there are fewer than four.
pub fn parse_box(text: &str, width: f64, height: f64) -> Option<Box> {
    let values: Vec<f64> = loc_values(text).take(4).collect();
    Some(from_locs(values.try_into().ok()?, width, height))
}

/// The box of the four `<locNNNN>` tokens `text` starts with (after any whitespace), and the
/// text after them; `None` when it does not start with four.
pub fn leading_box(text: &str, width: f64, height: f64) -> Option<(Box, &str)> {
    let mut rest = text.trim_start();
    let mut values = [0.0; 4];
    for value in &mut values {
        *value = loc_value(rest)?;
        rest = &rest[LOC_LEN..];
    }
    Some((from_locs(values, width, height), rest))
}

/// IoU of the box `prediction` names with `reference`; 0 when it names none.
pub fn prediction_iou(prediction: &str, reference: Box, width: f64, height: f64) -> f64 {
    parse_box(prediction, width, height).map_or(0.0, |b| b.iou(&reference))
}

/// The length of a `<locNNNN>` token.
const LOC_LEN: usize = 9;

/// `[y1, x1, y2, x2]` loc values to pixels.
fn from_locs([y1, x1, y2, x2]: [f64; 4], width: f64, height: f64) -> Box {
    Box { y1: y1 / 1023.0 * height, x1: x1 / 1023.0 * width, y2: y2 / 1023.0 * height, x2: x2 / 1023.0 * width }
}

/// The values of the `<locNNNN>` tokens of `text`, in order.
fn loc_values(text: &str) -> impl Iterator<Item = f64> + '_ {
    text.match_indices("<loc").filter_map(move |(k, _)| loc_value(&text[k..]))
}

/// The value of the `<locNNNN>` token `text` starts with, if it does.
fn loc_value(text: &str) -> Option<f64> {
    let digits = text.strip_prefix("<loc")?.get(..4)?;
    if !digits.bytes().all(|b| b.is_ascii_digit()) || !text[8..].starts_with('>') {
        return None;
    }
    let value: u16 = digits.parse().ok()?;
    (value <= 1023).then_some(f64::from(value))
}
