//! Typed access to the fields of one JSON example, with errors naming the example and field.

use serde_json::Value;

use crate::ocr::Word;
use crate::refcoco::Box;
use crate::EvalError;

/// One example of a list being scored: its 0-based index (for errors) and its JSON object.
pub struct Example<'a> {
    index: usize,
    value: &'a Value,
}

impl<'a> Example<'a> {
    pub fn new(index: usize, value: &'a Value) -> Self {
        Example { index, value }
    }

    /// The `prediction` string.
    pub fn prediction(&self) -> Result<&'a str, EvalError> {
        self.string("prediction")
    }

    /// A string (`prediction`, `html`).
    pub fn string(&self, name: &'static str) -> Result<&'a str, EvalError> {
        self.field(name)?.as_str().ok_or_else(|| self.error(name, "is not a string"))
    }

    /// A non-empty list of strings (`references`, `answers`).
    pub fn non_empty_strings(&self, name: &'static str) -> Result<Vec<&'a str>, EvalError> {
        let list = self.field(name)?.as_array().ok_or_else(|| self.error(name, "is not a list of strings"))?;
        if list.is_empty() {
            return Err(self.error(name, "is empty"));
        }
        list.iter().map(|v| v.as_str().ok_or_else(|| self.error(name, "is not a list of strings"))).collect()
    }

    /// A number (`width`, `height`).
    pub fn number(&self, name: &'static str) -> Result<f64, EvalError> {
        self.field(name)?.as_f64().ok_or_else(|| self.error(name, "is not a number"))
    }

    /// The first box of `boxes`, a list of `[y1, x1, y2, x2]` pixel boxes.
    pub fn first_box(&self) -> Result<Box, EvalError> {
        let bad = || self.error("boxes", "is not a non-empty list of [y1, x1, y2, x2] boxes");
        self.field("boxes")?.as_array().and_then(|b| b.first()).and_then(pixel_box).ok_or_else(bad)
    }

    /// A mask stored as COCO's RLE, its counts a list or pycocotools' compressed string (`mask`).
    pub fn mask(&self, name: &'static str) -> Result<crate::mask::Mask, EvalError> {
        crate::mask::Mask::from_json(self.field(name)?).map_err(|problem| self.error(name, &problem))
    }

    /// A list (possibly empty) of `{"text": "...", "box": [y1, x1, y2, x2]}` words (`words`).
    pub fn words(&self, name: &'static str) -> Result<Vec<Word<'a>>, EvalError> {
        let bad = || self.error(name, "is not a list of {\"text\", \"box\": [y1, x1, y2, x2]} words");
        self.field(name)?
            .as_array()
            .ok_or_else(bad)?
            .iter()
            .map(|w| {
                let text = w.get("text").and_then(Value::as_str);
                let bbox = w.get("box").and_then(pixel_box);
                match (text, bbox) {
                    (Some(text), Some(bbox)) => Ok(Word { text, bbox: Some(bbox) }),
                    _ => Err(bad()),
                }
            })
            .collect()
    }

    fn field(&self, name: &'static str) -> Result<&'a Value, EvalError> {
        self.value.get(name).ok_or_else(|| self.error(name, "is missing"))
    }

    /// An error about field `field` of this example.
    pub(crate) fn error(&self, field: &'static str, problem: &str) -> EvalError {
        EvalError::Field { index: self.index, field, problem: problem.to_string() }
    }
}

/// A `[y1, x1, y2, x2]` list of four numbers as a box.
fn pixel_box(value: &Value) -> Option<Box> {
    let coords: Vec<f64> = value.as_array()?.iter().filter_map(Value::as_f64).collect();
    Some(Box::from_yxyx(coords.try_into().ok()?))
}
