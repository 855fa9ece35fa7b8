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

use crate::mixture::TaskFormat;
use crate::source::Record;
use crate::tokenizer::PgTokenizer;
use crate::{image, DataError};

/// Token limits of one task, in tokens of text (image tokens not counted).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TextLimits {
    /// Most tokens of `prefix + "\n"` (`<bos>` not counted); a longer prompt is cut before
    /// its `"\n"`, which always survives.
    pub max_prefix_tokens: Option<usize>,
    /// Most tokens of `suffix` plus `<eos>`; longer targets are cut at the end.
    pub max_suffix_tokens: Option<usize>,
    /// big_vision's `text_len`: `<bos>`, prompt, `"\n"`, target and `<eos>` hold at most
    /// `text_len + 1` tokens together (its `tolen(text_len + 1)` of the concatenation; the
    /// model reads `text_len` of them). The prompt comes first, as in big_vision: the target
    /// gets what the prompt leaves, and a prompt that fills the budget leaves none.
    pub text_len: Option<usize>,
    /// When cutting a target, keep `<eos>` as its last token (the model then learns to stop
    /// early) instead of dropping it (big_vision's plain cut).
    pub keep_eos: bool,
}

/// What a cut removed from one example; summed into the pipeline's counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Truncation {
    pub prefix: bool,
    pub suffix: bool,
    /// The target lost its `<eos>`.
    pub eos_dropped: bool,
}

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
        Self::with_limits(tok, num_image_tokens, prefix, suffix, &TextLimits::default()).0
    }

    /// As [`EncodedExample::new`], cutting prompt and target to `limits`.
    pub fn with_limits(
        tok: &PgTokenizer,
        num_image_tokens: usize,
        prefix: &str,
        suffix: Option<&str>,
        limits: &TextLimits,
    ) -> (Self, Truncation) {
        let mut cut = Truncation::default();
        let mut prompt = tok.encode(&format!("{prefix}\n"));
        let max_prompt = [limits.max_prefix_tokens, limits.text_len].into_iter().flatten().min();
        if let Some(max) = max_prompt.filter(|&m| prompt.len() > m) {
            // Cut before the separator, so that the model still sees where the prompt ends.
            let separator = tok.encode("\n");
            let mut body = tok.encode(prefix);
            body.truncate(max.saturating_sub(separator.len()));
            prompt = [body, separator].concat();
            cut.prefix = true;
        }
        let mut target = match suffix {
            Some(suffix) => [tok.encode(suffix), vec![tok.eos_id]].concat(),
            None => vec![],
        };
        let left = limits.text_len.map(|t| t.saturating_sub(prompt.len()));
        let max_target = [limits.max_suffix_tokens, left].into_iter().flatten().min();
        if let Some(max) = max_target.filter(|&m| target.len() > m) {
            target.truncate(max);
            cut.suffix = true;
            if limits.keep_eos && max > 0 {
                target[max - 1] = tok.eos_id;
            } else {
                cut.eos_dropped = true;
            }
        }
        let mut ids = vec![tok.image_id; num_image_tokens];
        ids.push(tok.bos_id);
        ids.extend(prompt);
        let prompt_len = ids.len();
        ids.extend(&target);
        let example = Self {
            mask_ar: [vec![0; prompt_len], vec![1; target.len()]].concat(),
            loss: [vec![false; prompt_len], vec![true; target.len()]].concat(),
            ids,
        };
        (example, cut)
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
    /// The same batch on `device`.
    pub fn to_device(&self, device: Device) -> Self {
        let send = |t: &Tensor| upload(t, device);
        Self {
            inputs: Inputs {
                pixels: self.inputs.pixels.as_ref().map(send),
                ids: send(&self.inputs.ids),
                layout: TokenLayout {
                    mask_ar: send(&self.inputs.layout.mask_ar),
                    valid: send(&self.inputs.layout.valid),
                },
            },
            loss_mask: send(&self.loss_mask),
        }
    }

    /// Right-pads `examples` to the longest one and attaches `pixels` `(batch, 3, res, res)`.
    pub fn collate(examples: &[EncodedExample], pixels: Option<Tensor>, pad_id: i64, device: Device) -> Self {
        Self::collate_to(examples, pixels, pad_id, device, None)
    }

    /// As [`Batch::collate`], padding to at least `min_len` tokens (a fixed length keeps
    /// tensor shapes constant from step to step).
    pub fn collate_to(
        examples: &[EncodedExample],
        pixels: Option<Tensor>,
        pad_id: i64,
        device: Device,
        min_len: Option<usize>,
    ) -> Self {
        let longest = examples.iter().map(|e| e.ids.len()).max().unwrap_or(0);
        let len = longest.max(min_len.unwrap_or(0));
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
                layout: TokenLayout {
                    mask_ar: tensor(Tensor::from_slice(&mask_ar)),
                    valid: tensor(Tensor::from_slice(&valid)),
                },
            },
            loss_mask: tensor(Tensor::from_slice(&loss)).to_kind(Kind::Bool),
        }
    }
}

/// `t` on `device`. To a GPU through pinned host memory and an asynchronous copy, so the
/// host does not wait for the GPU to finish its queued work (a plain copy from pageable
/// memory would).
pub fn upload(t: &Tensor, device: Device) -> Tensor {
    match device {
        Device::Cuda(_) if t.device() == Device::Cpu => t.pin_memory(device).to_device_(device, t.kind(), true, false),
        _ => t.to_device(device),
    }
}

/// The longest example [`InferenceBatch`] takes by default, image tokens included: well
/// past any PaliGemma 2 input (896 px makes 4,096 image tokens), well short of a record that
/// would exhaust memory (attention grows with the square of the length).
pub const DEFAULT_MAX_TOKENS: usize = 8192;

/// Records made ready for scoring or decoding (`pg2 score`, `pg2 predict`, evaluation).
pub struct InferenceBatch {
    /// Prompts (and targets), images, on the device.
    pub batch: Batch,
    /// Each record's prompt, as `format` made it.
    pub prompts: Vec<String>,
    /// Each record's number of target tokens (0 without targets).
    pub targets: Vec<usize>,
}

impl InferenceBatch {
    /// Encodes `records`: each one's prompt under `format` (its own `prefix` by default;
    /// cut to `format.limits` as in training, before its `"\n"`), its `suffix` plus `<eos>`
    /// as the target when `with_targets` (a record without one is an error naming it), and
    /// its image resized by `resize` for `image_tokens` placeholders.
    /// A record longer than `max_tokens` is an error naming it, before anything is allocated.
    pub fn new(
        records: &[Record],
        tok: &PgTokenizer,
        format: &TaskFormat,
        (resize, image_tokens): (image::Resize, usize),
        (with_targets, max_tokens): (bool, usize),
        device: Device,
    ) -> Result<Self, DataError> {
        let prompts = records.iter().map(|r| format.prompt(r)).collect::<Result<Vec<_>, _>>()?;
        let examples = records
            .iter()
            .zip(&prompts)
            .map(|(r, prompt)| {
                let suffix = match with_targets {
                    true => Some(r.suffix.as_deref().ok_or_else(|| r.error("record has no `suffix` to score"))?),
                    false => None,
                };
                let (example, _) = EncodedExample::with_limits(tok, image_tokens, prompt, suffix, &format.limits);
                if example.ids.len() > max_tokens {
                    let n = example.ids.len();
                    return Err(r.error(format!("{n} tokens, more than the {max_tokens} allowed (--max-tokens)")));
                }
                Ok(example)
            })
            .collect::<Result<Vec<_>, DataError>>()?;
        let batch = Batch::collate(&examples, Some(image::load_pixels(records, resize)?), tok.pad_id, device);
        Ok(Self { batch, prompts, targets: examples.iter().map(EncodedExample::num_targets).collect() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn tokenizer() -> PgTokenizer {
        PgTokenizer::from_file(
            &Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/paligemma/tokenizer.json"),
        )
        .unwrap()
    }

    /// Decoding prompts are cut to the format's budget as training's are (big_vision's
    /// `combine_and_keep_eval(text_len)`), keeping their `"\n"`.
    #[test]
    fn inference_prompts_are_cut_to_the_text_budget() {
        let tok = tokenizer();
        let dir = std::env::temp_dir().join(format!("pg2-layout-eval-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        ::image::RgbImage::new(2, 2).save(dir.join("a.png")).unwrap();
        let record = Record {
            image: crate::source::ImageData::File(dir.join("a.png")),
            prefix: "answer en how many circles are there".into(),
            suffix: None,
            extra: Default::default(),
            file: dir.join("val.jsonl"),
            line: 1,
        };
        let ids = |text_len| {
            let format =
                TaskFormat { limits: TextLimits { text_len, ..TextLimits::default() }, ..TaskFormat::default() };
            let resize = image::Resize { size: 14, antialias: false, pad_to_square: false };
            let batch = InferenceBatch::new(
                std::slice::from_ref(&record),
                &tok,
                &format,
                (resize, 1),
                (false, 100),
                Device::Cpu,
            );
            Vec::<i64>::try_from(batch.unwrap().batch.inputs.ids.view([-1])).unwrap()
        };
        let whole = ids(None);
        assert!(whole.len() > 5);
        assert_eq!(ids(Some(3)), [tok.image_id, tok.bos_id, whole[2], whole[3], newline(&tok)]);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn prompt_only_examples_have_no_targets() {
        let tok = tokenizer();
        let e = EncodedExample::new(&tok, 3, "caption en", None);
        assert_eq!(&e.ids[..4], &[tok.image_id, tok.image_id, tok.image_id, tok.bos_id]);
        assert_eq!(e.num_targets(), 0);
        assert!(e.mask_ar.iter().all(|&m| m == 0));
    }

    /// The token of the prompt's closing `"\n"`.
    fn newline(tok: &PgTokenizer) -> i64 {
        let ids = tok.encode("\n");
        assert_eq!(ids.len(), 1);
        ids[0]
    }

    /// big_vision's one budget: `<bos>`, prompt, `"\n"`, target and `<eos>` in `text_len + 1`
    /// tokens, the prompt served first and cut before its separator.
    #[test]
    fn one_text_budget_serves_the_prompt_first_and_keeps_its_separator() {
        let tok = tokenizer();
        let question = "answer en how many circles are there";
        let full = EncodedExample::new(&tok, 1, question, Some("two red circles"));
        let prompt = full.mask_ar.iter().filter(|&&m| m == 0).count() - 2; // less the image and <bos>
        assert!(full.num_targets() > 2);
        let budget = TextLimits { text_len: Some(prompt + 2), ..TextLimits::default() };
        let (e, t) = EncodedExample::with_limits(&tok, 1, question, Some("two red circles"), &budget);
        assert_eq!(e.ids.len(), 1 + prompt + 2 + 1, "image, then text_len + 1 tokens");
        assert_eq!((e.num_targets(), t), (2, Truncation { prefix: false, suffix: true, eos_dropped: true }));
        assert_eq!(e.ids[..e.ids.len() - 2], full.ids[..full.ids.len() - full.num_targets()]);
        let (e, t) = EncodedExample::with_limits(
            &tok,
            1,
            question,
            Some("two red circles"),
            &TextLimits { text_len: Some(3), ..budget },
        );
        assert_eq!(e.ids, [tok.image_id, tok.bos_id, full.ids[2], full.ids[3], newline(&tok)]);
        assert_eq!((e.num_targets(), t), (0, Truncation { prefix: true, suffix: true, eos_dropped: true }));
        // The tighter of the budget and a part's own cap wins.
        let both = TextLimits { max_suffix_tokens: Some(1), ..budget };
        let (e, _) = EncodedExample::with_limits(&tok, 1, question, Some("two red circles"), &both);
        assert_eq!(e.num_targets(), 1);
    }

    #[test]
    fn long_targets_are_cut_and_the_cut_is_reported() {
        let tok = tokenizer();
        let suffix = "a red circle above a blue square";
        let full = EncodedExample::new(&tok, 1, "caption en", Some(suffix));
        let n = full.num_targets();
        assert!(n > 4);
        let limits = TextLimits { max_suffix_tokens: Some(4), ..TextLimits::default() };
        let (cut, t) = EncodedExample::with_limits(&tok, 1, "caption en", Some(suffix), &limits);
        assert_eq!(cut.num_targets(), 4);
        assert_eq!(t, Truncation { prefix: false, suffix: true, eos_dropped: true });
        assert_ne!(*cut.ids.last().unwrap(), tok.eos_id);
        let keep = TextLimits { keep_eos: true, ..limits };
        let (cut, t) = EncodedExample::with_limits(&tok, 1, "caption en", Some(suffix), &keep);
        assert_eq!((*cut.ids.last().unwrap(), t.eos_dropped, cut.num_targets()), (tok.eos_id, false, 4));
        let prompt = TextLimits { max_prefix_tokens: Some(2), ..TextLimits::default() };
        let (cut, t) = EncodedExample::with_limits(&tok, 1, "answer en how many circles are there", Some("2"), &prompt);
        assert!(t.prefix && !t.suffix);
        assert_eq!(cut.mask_ar.iter().filter(|&&m| m == 0).count(), 1 + 1 + 2);
        assert_eq!(cut.ids[3], newline(&tok), "a cut prompt keeps its separator");
        let (_, t) =
            EncodedExample::with_limits(&tok, 1, "ocr", Some("4"), &TextLimits { max_suffix_tokens: Some(8), ..keep });
        assert_eq!(t, Truncation::default());
    }
}
