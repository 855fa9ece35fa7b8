//! Decoding: one prefill over image + prompt with the prefix-LM mask, then one token per
//! step with a [`KvCache`], greedily or by beam search, until `<eos>` or a length limit.

use tch::{Device, Kind, Tensor};

use crate::gemma2::{KvCache, TokenLayout};
use crate::paligemma::{Inputs, PaliGemma};
use crate::ModelError;

/// How to decode.
#[derive(Debug, Clone, Copy)]
pub struct DecodeOptions {
    /// Most tokens generated per sequence, `<eos>` included.
    pub max_new_tokens: usize,
    /// 1 for greedy decoding, more for beam search.
    pub beam_size: usize,
    /// Generation ends at this token; it is not part of the output.
    pub eos_id: i64,
    /// Fed after a sequence has ended (never attended to).
    pub pad_id: i64,
    /// Beam hypotheses are ranked by `sum logprob / length^length_penalty`, the length
    /// counting generated tokens with `<eos>` (transformers' default is 1.0).
    pub length_penalty: f64,
}

/// Decodes a continuation for each prompt. `prompts` holds right-padded prefixes (image,
/// `<bos>`, prompt, separator: all `mask_ar` 0). Returns the generated token ids without
/// `<eos>`.
pub fn generate(model: &PaliGemma, prompts: &Inputs, opts: &DecodeOptions) -> Result<Vec<Vec<i64>>, ModelError> {
    if opts.max_new_tokens == 0 {
        return Ok(vec![vec![]; prompts.ids.size()[0] as usize]);
    }
    tch::no_grad(|| {
        let (batch, prompt) = (prompts.ids.size()[0], prompts.ids.size()[1]);
        let reserve = prompt + opts.max_new_tokens as i64;
        let mut cache = KvCache::new(model.num_layers(), batch, reserve, model.device());
        let hidden = model.forward(prompts, Some(&mut cache))?;
        // The last real token of each right-padded prompt predicts the first new token.
        let last = prompts.layout.valid.to_kind(Kind::Int64).sum_dim_intlist(1, false, Kind::Int64) - 1;
        let index = last.view([-1, 1, 1]).expand([-1, 1, hidden.size()[2]], false);
        let hidden = hidden.gather(1, &index, false).squeeze_dim(1);
        let logprobs = log_probs(model, &hidden);
        if opts.beam_size <= 1 {
            greedy(model, cache, logprobs, opts)
        } else {
            beam_search(model, cache, logprobs, opts)
        }
    })
}

fn log_probs(model: &PaliGemma, hidden: &Tensor) -> Tensor {
    model.logits(hidden).to_kind(Kind::Float).log_softmax(-1, Kind::Float)
}

/// Feeds one token per sequence and returns the next log-probabilities `(batch, vocab)`.
fn step(model: &PaliGemma, cache: &mut KvCache, tokens: &[i64], live: &[bool]) -> Result<Tensor, ModelError> {
    let device = model.device();
    let n = tokens.len() as i64;
    let inputs = Inputs {
        pixels: None,
        ids: Tensor::from_slice(tokens).view([n, 1]).to_device(device),
        layout: TokenLayout {
            mask_ar: Tensor::ones([n, 1], (Kind::Int64, device)),
            valid: Tensor::from_slice(live).view([n, 1]).to_device(device),
        },
    };
    let hidden = model.forward(&inputs, Some(cache))?;
    Ok(log_probs(model, &hidden.squeeze_dim(1)))
}

fn greedy(
    model: &PaliGemma,
    mut cache: KvCache,
    mut logprobs: Tensor,
    opts: &DecodeOptions,
) -> Result<Vec<Vec<i64>>, ModelError> {
    let b = logprobs.size()[0] as usize;
    let mut out = vec![Vec::new(); b];
    let mut live = vec![true; b];
    for n in 0..opts.max_new_tokens {
        let next = Vec::<i64>::try_from(logprobs.argmax(-1, false).to_device(Device::Cpu)).unwrap();
        for i in 0..b {
            if live[i] {
                if next[i] == opts.eos_id {
                    live[i] = false;
                } else {
                    out[i].push(next[i]);
                }
            }
        }
        if n + 1 == opts.max_new_tokens || !live.contains(&true) {
            break;
        }
        let tokens: Vec<i64> = (0..b).map(|i| if live[i] { next[i] } else { opts.pad_id }).collect();
        logprobs = step(model, &mut cache, &tokens, &live)?;
    }
    Ok(out)
}

/// A live beam: its tokens and summed log-probability.
#[derive(Clone)]
struct Beam {
    tokens: Vec<i64>,
    score: f64,
}

fn beam_search(
    model: &PaliGemma,
    mut cache: KvCache,
    first: Tensor,
    opts: &DecodeOptions,
) -> Result<Vec<Vec<i64>>, ModelError> {
    let device = model.device();
    search(&first, opts, |parents, tokens, live| {
        cache.select(&Tensor::from_slice(parents).to_device(device));
        step(model, &mut cache, tokens, live)
    })
}

/// Beam search over `first` `(batch, vocab)` log-probabilities. `advance(parents, tokens,
/// live)` makes row `r` of the next step continue row `parents[r]` of the previous one
/// with `tokens[r]` (a dead row, `live[r]` false, with padding) and returns the next
/// log-probabilities `(rows, vocab)`.
fn search(
    first: &Tensor,
    opts: &DecodeOptions,
    mut advance: impl FnMut(&[i64], &[i64], &[bool]) -> Result<Tensor, ModelError>,
) -> Result<Vec<Vec<i64>>, ModelError> {
    let (b, k) = (first.size()[0] as usize, opts.beam_size);
    let vocab = first.size()[1];
    let device = first.device();
    let rank = |beam: &Beam, len: usize| beam.score / (len as f64).powf(opts.length_penalty);
    // Every prompt starts as k copies; only the first may expand at the first step.
    let repeat: Vec<i64> = (0..(b * k) as i64).map(|r| r / k as i64).collect();
    let mut logprobs = first.index_select(0, &Tensor::from_slice(&repeat).to_device(device));
    let mut pending = Some(repeat);
    let mut beams: Vec<Beam> =
        (0..b * k).map(|i| Beam { tokens: vec![], score: if i % k == 0 { 0.0 } else { f64::NEG_INFINITY } }).collect();
    let mut finished: Vec<Vec<(f64, Vec<i64>)>> = vec![Vec::new(); b];
    let mut done = vec![false; b];
    for n in 0..opts.max_new_tokens {
        let scores = Tensor::from_slice(&beams.iter().map(|beam| beam.score).collect::<Vec<_>>()).to_device(device);
        let total = (logprobs.to_kind(Kind::Double) + scores.unsqueeze(1)).view([b as i64, -1]);
        let (values, indices) = total.topk(2 * k as i64, -1, true, true);
        let values = Vec::<f64>::try_from(values.to_device(Device::Cpu).view([-1])).unwrap();
        let indices = Vec::<i64>::try_from(indices.to_device(Device::Cpu).view([-1])).unwrap();
        let mut next = Vec::with_capacity(b * k);
        let mut parents = Vec::with_capacity(b * k);
        for i in 0..b {
            let mut chosen = 0;
            for j in 0..2 * k {
                let (score, flat) = (values[i * 2 * k + j], indices[i * 2 * k + j]);
                if done[i] || chosen == k || score == f64::NEG_INFINITY {
                    break;
                }
                let parent = i * k + (flat / vocab) as usize;
                let token = flat % vocab;
                let mut beam = Beam { tokens: beams[parent].tokens.clone(), score };
                if token == opts.eos_id {
                    finished[i].push((rank(&beam, beam.tokens.len() + 1), beam.tokens));
                } else {
                    beam.tokens.push(token);
                    next.push(beam);
                    parents.push(parent as i64);
                    chosen += 1;
                }
            }
            // Ended prompts (and, rarely, prompts short of candidates) keep dead beams.
            while chosen < k {
                next.push(Beam { tokens: vec![], score: f64::NEG_INFINITY });
                parents.push((i * k) as i64);
                chosen += 1;
            }
            // Stop a prompt once k hypotheses have ended (transformers' early_stopping=True).
            done[i] = done[i] || finished[i].len() >= k;
        }
        beams = next;
        if n + 1 == opts.max_new_tokens || !done.contains(&false) {
            break;
        }
        let live: Vec<bool> = beams.iter().map(|beam| beam.score > f64::NEG_INFINITY).collect();
        let tokens: Vec<i64> = beams
            .iter()
            .zip(&live)
            .map(|(beam, &l)| if l { *beam.tokens.last().unwrap() } else { opts.pad_id })
            .collect();
        // The first step's parents index the k copies of each prompt.
        let parents: Vec<i64> = match pending.take() {
            Some(repeat) => parents.iter().map(|&p| repeat[p as usize]).collect(),
            None => parents,
        };
        logprobs = advance(&parents, &tokens, &live)?;
    }
    // Beams still running at the length limit compete with the ended ones.
    for (i, chunk) in beams.chunks(k).enumerate() {
        if !done[i] {
            for beam in chunk.iter().filter(|beam| beam.score > f64::NEG_INFINITY) {
                finished[i].push((rank(beam, beam.tokens.len()), beam.tokens.clone()));
            }
        }
    }
    Ok(finished
        .into_iter()
        .map(|mut hyps| {
            hyps.sort_by(|a, b| b.0.total_cmp(&a.0));
            hyps.into_iter().next().map(|(_, tokens)| tokens).unwrap_or_default()
        })
        .collect())
}
