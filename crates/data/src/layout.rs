//! The token layout of a PaliGemma example, exactly as transformers' PaliGemmaProcessor
//! builds it, with big_vision's `mask_ar`:
//!
//! | part | tokens | `mask_ar` | loss |
//! |---|---|---|---|
//! | image | N x `<image>` | 0 | no |
//! | prefix | `<bos>`, tokens of `prefix + "\n"` | 0 | no |
//! | suffix | tokens of `suffix`, `<eos>` | 1 | yes |
//! | padding | `<pad>` on the right | 1 | no |

use pg2_model::{Inputs, TokenLayout};
use tch::{Device, Kind, Tensor};

use crate::tokenizer::PgTokenizer;

/// One example's tokens before padding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedExample {
    pub ids: Vec<i64>,
    /// 0: part of the bidirectional prefix; 1: causal.
    pub mask_ar: Vec<i64>,
    /// True for the supervised tokens (suffix and `<eos>`).
    pub loss: Vec<bool>,
}

impl EncodedExample {
    /// Lays out `num_image_tokens` placeholders, the prompt and, when given, the target.
    pub fn new(tok: &PgTokenizer, num_image_tokens: usize, prefix: &str, suffix: Option<&str>) -> Self {
        let mut ids = vec![tok.image_id; num_image_tokens];
        ids.push(tok.bos_id);
        ids.extend(tok.encode(&format!("{prefix}\n")));
        let prompt_len = ids.len();
        if let Some(suffix) = suffix {
            ids.extend(tok.encode(suffix));
            ids.push(tok.eos_id);
        }
        let causal = ids.len() - prompt_len;
        Self {
            mask_ar: [vec![0; prompt_len], vec![1; causal]].concat(),
            loss: [vec![false; prompt_len], vec![true; causal]].concat(),
            ids,
        }
    }

    /// Number of supervised tokens.
    pub fn num_targets(&self) -> usize {
        self.loss.iter().filter(|&&l| l).count()
    }
}

/// Padded model inputs of several examples, with their loss mask.
pub struct Batch {
    pub inputs: Inputs,
    /// `(batch, tokens)` bool: which tokens the loss covers.
    pub loss_mask: Tensor,
}

impl Batch {
    /// Right-pads `examples` to the longest one and attaches `pixels` `(batch, 3, res, res)`.
    pub fn collate(examples: &[EncodedExample], pixels: Option<Tensor>, pad_id: i64, device: Device) -> Self {
        let len = examples.iter().map(|e| e.ids.len()).max().unwrap_or(0);
        let mut ids = Vec::with_capacity(examples.len() * len);
        let mut mask_ar = Vec::with_capacity(ids.capacity());
        let mut valid = Vec::with_capacity(ids.capacity());
        let mut loss = Vec::with_capacity(ids.capacity());
        for e in examples {
            let pad = len - e.ids.len();
            ids.extend(e.ids.iter().copied().chain(std::iter::repeat_n(pad_id, pad)));
            mask_ar.extend(e.mask_ar.iter().copied().chain(std::iter::repeat_n(1, pad)));
            valid.extend(std::iter::repeat_n(true, e.ids.len()).chain(std::iter::repeat_n(false, pad)));
            loss.extend(e.loss.iter().copied().chain(std::iter::repeat_n(false, pad)));
        }
        let shape = [examples.len() as i64, len as i64];
        let tensor = |t: Tensor| t.view(shape).to_device(device);
        Self {
            inputs: Inputs {
                pixels: pixels.map(|p| p.to_device(device)),
                ids: tensor(Tensor::from_slice(&ids)),
                layout: TokenLayout { mask_ar: tensor(Tensor::from_slice(&mask_ar)), valid: tensor(Tensor::from_slice(&valid)) },
            },
            loss_mask: tensor(Tensor::from_slice(&loss)).to_kind(Kind::Bool),
        }
    }
}
