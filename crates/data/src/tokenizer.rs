//! The checkpoint's `tokenizer.json`, with PaliGemma's special tokens located by content.

use std::path::Path;

use tokenizers::{AddedToken, Tokenizer};

use crate::DataError;

/// A tokenizer with the ids PaliGemma's layout needs.
pub struct PgTokenizer {
    inner: Tokenizer,
    pub bos_id: i64,
    pub eos_id: i64,
    pub pad_id: i64,
    pub image_id: i64,
}

/// `<loc0000>`..`<loc1023>` (box coordinates) then `<seg000>`..`<seg127>` (mask codes).
pub fn location_and_segment_tokens() -> Vec<String> {
    (0..1024).map(|i| format!("<loc{i:04}>")).chain((0..128).map(|i| format!("<seg{i:03}>"))).collect()
}

impl PgTokenizer {
    /// Loads `tokenizer.json`. `<bos>`, `<eos>` and `<pad>` must exist; `<image>` is added
    /// as a special token and the loc/seg tokens as plain tokens when missing, as
    /// transformers' PaliGemmaProcessor does.
    pub fn from_file(path: &Path) -> Result<Self, DataError> {
        let err = |msg: String| DataError::Tokenizer { path: path.display().to_string(), msg };
        let mut inner = Tokenizer::from_file(path).map_err(|e| err(format!("cannot load: {e}")))?;
        if inner.token_to_id("<image>").is_none() {
            inner
                .add_special_tokens([AddedToken::from("<image>", true)])
                .map_err(|e| err(format!("cannot add <image>: {e}")))?;
        }
        let missing: Vec<AddedToken> = location_and_segment_tokens()
            .into_iter()
            .filter(|t| inner.token_to_id(t).is_none())
            .map(|t| AddedToken::from(t, false))
            .collect();
        inner.add_tokens(missing).map_err(|e| err(format!("cannot add loc/seg tokens: {e}")))?;
        let id =
            |token: &str| inner.token_to_id(token).map(i64::from).ok_or_else(|| err(format!("has no {token} token")));
        Ok(Self { bos_id: id("<bos>")?, eos_id: id("<eos>")?, pad_id: id("<pad>")?, image_id: id("<image>")?, inner })
    }

    /// An error naming both unless this tokenizer (read from `path`) fits the model of
    /// `config` (`model` names it: its folder, or a preset): every id but `<image>`'s has a
    /// row in its embedding (a larger tokenizer would index past the table), and its
    /// `<image>` id is the one the model replaces with image tokens.
    pub fn check_fits(&self, path: &Path, config: &pg2_model::PaliGemmaConfig, model: &str) -> Result<(), DataError> {
        let err = |msg: String| DataError::Tokenizer { path: path.display().to_string(), msg };
        if self.image_id != config.image_token_id {
            return Err(err(format!(
                "its <image> id is {}, but {model} expects {}: use the model's own tokenizer",
                self.image_id, config.image_token_id
            )));
        }
        let rows = config.text.vocab_size;
        let largest = (0..self.vocab_size() as i64).rev().find(|&id| id != self.image_id).unwrap_or(0);
        if largest as usize >= rows {
            return Err(err(format!(
                "{} ids do not fit the {rows}-row embedding of {model}: use the model's own tokenizer",
                self.vocab_size()
            )));
        }
        Ok(())
    }

    /// Token ids of `text`, without any template tokens (the layout adds those).
    pub fn encode(&self, text: &str) -> Vec<i64> {
        let encoding = self.inner.encode(text, false).expect("tokenizers encodes any string");
        encoding.get_ids().iter().map(|&id| i64::from(id)).collect()
    }

    /// Text of `ids`, special tokens (`<eos>`, `<pad>`, ...) left out.
    pub fn decode(&self, ids: &[i64]) -> String {
        let ids: Vec<u32> = ids.iter().map(|&id| id as u32).collect();
        self.inner.decode(&ids, true).expect("ids come from this tokenizer's vocabulary")
    }

    /// Number of ids, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The ids a target can be: the first this many (every id but `<image>` when it is the
    /// last one, as in the released and the synthetic tokenizers). Label smoothing spreads
    /// over these, as big_vision's over its text vocabulary, not over embedding rows past it.
    pub fn text_ids(&self) -> usize {
        let n = self.vocab_size();
        n - usize::from(self.image_id as usize + 1 == n)
    }
}
