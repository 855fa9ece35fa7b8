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
    /// 1 for greedy decoding, more for big_vision's beam search (hypotheses ranked by
    /// their summed log-probabilities, no length normalisation; see `search`).
    pub beam_size: usize,
    /// Generation ends at this token; it is not part of the output.
    pub eos_id: i64,
    /// Fed after a sequence has ended (never attended to).
    pub pad_id: i64,
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
    model.logits(hidden).log_softmax(-1, Kind::Float)
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

/// A hypothesis: its tokens (without `<eos>`) and summed log-probability.
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

/// big_vision's beam search (`_beam_decode` in `trainers/proj/paligemma/predict_fns.py`)
/// over `first` `(batch, vocab)` log-probabilities. `advance(parents, tokens, live)` makes
/// row `r` of the next step continue row `parents[r]` of the previous one with
/// `tokens[r]` (a dead row, `live[r]` false, with padding) and returns the next
/// log-probabilities `(rows, vocab)`.
///
/// A hypothesis scores the plain sum of its tokens' log-probabilities, `<eos>` included
/// (no length normalisation). At every step each live hypothesis may end: it followed by
/// `<eos>` replaces the best ended one if it scores strictly higher (so of equal scores
/// the one that ended first, then the better-ranked beam, stays). The live ones then grow
/// by the `k` best of their `k + 1` likeliest tokens each, `<eos>` left out. A prompt is
/// done once its best live hypothesis scores below its best ended one: log-probabilities
/// are never positive, so none can overtake it any more. The answer is the best ended
/// hypothesis; one cut at `max_new_tokens` without `<eos>` never is.
fn search(
    first: &Tensor,
    opts: &DecodeOptions,
    mut advance: impl FnMut(&[i64], &[i64], &[bool]) -> Result<Tensor, ModelError>,
) -> Result<Vec<Vec<i64>>, ModelError> {
    let (b, k) = (first.size()[0] as usize, opts.beam_size);
    let dead = || Beam { tokens: vec![], score: f64::NEG_INFINITY };
    // Each prompt's live hypotheses, best first: the empty one at first, then k.
    let mut beams: Vec<Vec<Beam>> = vec![vec![Beam { tokens: vec![], score: 0.0 }]; b];
    let mut best: Vec<Beam> = vec![dead(); b];
    let mut done = vec![false; b];
    let mut logprobs = first.shallow_clone();
    for n in 0..opts.max_new_tokens {
        let cpu = |t: Tensor| t.to_kind(Kind::Double).to_device(Device::Cpu).view([-1]);
        let eos = Vec::<f64>::try_from(cpu(logprobs.select(1, opts.eos_id))).unwrap();
        let (values, indices) = logprobs.topk(k as i64 + 1, -1, true, true);
        let values = Vec::<f64>::try_from(cpu(values)).unwrap();
        let indices = Vec::<i64>::try_from(indices.to_device(Device::Cpu).view([-1])).unwrap();
        let (mut parents, mut tokens) = (Vec::with_capacity(b * k), Vec::with_capacity(b * k));
        let mut row = 0;
        for i in 0..b {
            let live = std::mem::take(&mut beams[i]);
            let rows = row..row + live.len();
            row = rows.end;
            let mut grown: Vec<(f64, usize, i64)> = Vec::with_capacity(live.len() * (k + 1));
            if !done[i] {
                for (beam, r) in live.iter().zip(rows.clone()) {
                    if beam.score + eos[r] > best[i].score {
                        best[i] = Beam { tokens: beam.tokens.clone(), score: beam.score + eos[r] };
                    }
                }
                // (score, beam, token) in big_vision's order: by beam, each beam's tokens by
                // log-probability, ties to the lower id (jax's top_k); the stable sort keeps
                // that order among equal scores.
                for (j, (beam, r)) in live.iter().zip(rows.clone()).enumerate() {
                    let mut top: Vec<(f64, i64)> =
                        (r * (k + 1)..(r + 1) * (k + 1)).map(|c| (values[c], indices[c])).collect();
                    top.sort_by(|x, y| y.0.total_cmp(&x.0).then(x.1.cmp(&y.1)));
                    grown.extend(
                        top.into_iter().filter(|&(_, t)| t != opts.eos_id).map(|(v, t)| (beam.score + v, j, t)),
                    );
                }
                grown.sort_by(|x, y| y.0.total_cmp(&x.0));
                grown.truncate(k);
                done[i] = grown.iter().all(|&(score, _, _)| score < best[i].score);
            }
            if done[i] {
                // Dead rows keep the batch's shape.
                beams[i] = vec![dead(); k];
                parents.extend(vec![rows.start as i64; k]);
                tokens.extend(vec![opts.pad_id; k]);
            } else {
                for (score, j, token) in grown {
                    beams[i].push(Beam { tokens: [&live[j].tokens[..], &[token]].concat(), score });
                    parents.push((rows.start + j) as i64);
                    tokens.push(token);
                }
            }
        }
        if n + 1 == opts.max_new_tokens || !done.contains(&false) {
            break;
        }
        let live: Vec<bool> = beams.iter().flatten().map(|beam| beam.score > f64::NEG_INFINITY).collect();
        logprobs = advance(&parents, &tokens, &live)?;
    }
    Ok(best.into_iter().map(|beam| beam.tokens).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    const EOS: i64 = 1;

    /// Log-probabilities over 6 tokens (0 pad, 1 eos, 2 a, 3 b, 4 c, 5 d): the listed
    /// ones, and every other token far below them (each a little lower than the last).
    fn lp(listed: &[(i64, f64)]) -> Vec<f64> {
        (0..6).map(|t| listed.iter().find(|(l, _)| *l == t).map_or(-20.0 - 0.1 * t as f64, |(_, v)| *v)).collect()
    }

    /// Beam search (beam `k`, at most `max` tokens) over a model whose next-token
    /// log-probabilities after each prefix are `table(prefix)`.
    fn beam(table: impl Fn(&[i64]) -> Vec<f64>, k: usize, max: usize) -> Vec<i64> {
        let opts = DecodeOptions { max_new_tokens: max, beam_size: k, eos_id: EOS, pad_id: 0 };
        let row = |prefix: &[i64]| Tensor::from_slice(&table(prefix)).to_kind(Kind::Float);
        let mut rows: Vec<Vec<i64>> = vec![vec![]];
        let first = row(&[]).unsqueeze(0);
        let out = search(&first, &opts, |parents, tokens, _live| {
            rows = parents.iter().zip(tokens).map(|(&p, &t)| [&rows[p as usize][..], &[t]].concat()).collect();
            Ok(Tensor::stack(&rows.iter().map(|r| row(r)).collect::<Vec<_>>(), 0))
        });
        out.unwrap().remove(0)
    }

    #[test]
    fn beam_search_ranks_by_the_raw_sum_of_log_probs() {
        // "a <eos>" scores -1.609; "b c d <eos>" -1.938, better per token (-0.48 against
        // -0.80): big_vision does not normalise by length, so the short one wins.
        let table = |p: &[i64]| match p {
            [] => lp(&[(2, 0.5f64.ln()), (3, 0.45f64.ln())]),
            [2] => lp(&[(EOS, 0.4f64.ln()), (4, 0.3f64.ln())]),
            [3] => lp(&[(4, 0.8f64.ln())]),
            [3, 4] => lp(&[(5, 0.8f64.ln())]),
            [3, 4, 5] => lp(&[(EOS, 0.5f64.ln())]),
            _ => lp(&[]),
        };
        assert_eq!(beam(table, 2, 8), vec![2]);
    }

    #[test]
    fn beam_search_runs_until_no_live_beam_can_beat_the_best_ended_one() {
        // Two hypotheses end early ("" at -1.0, "a" at -2.1, "b" at -2.6), but the live
        // "a c" (-0.15) still scores above the best of them and ends at -0.2.
        let table = |p: &[i64]| match p {
            [] => lp(&[(2, -0.1), (EOS, -1.0), (3, -2.5)]),
            [2] => lp(&[(4, -0.05), (EOS, -2.0)]),
            [3] => lp(&[(EOS, -0.1)]),
            [2, 4] => lp(&[(EOS, -0.05)]),
            _ => lp(&[]),
        };
        assert_eq!(beam(table, 2, 8), vec![2, 4]);
    }

    #[test]
    fn beam_search_returns_an_ended_hypothesis_at_the_length_limit() {
        // With 2 tokens at most, "a c" (-0.11) and "b d" (-0.7) never end; big_vision
        // returns the best hypothesis that did, "b" (-3.2).
        let table = |p: &[i64]| match p {
            [] => lp(&[(2, -0.1), (3, -0.2), (EOS, -5.0)]),
            [2] => lp(&[(4, -0.01), (EOS, -4.0)]),
            [3] => lp(&[(5, -0.5), (EOS, -3.0)]),
            _ => lp(&[]),
        };
        assert_eq!(beam(table, 2, 2), vec![3]);
    }

    #[test]
    fn beam_search_keeps_the_earlier_of_equal_scores() {
        // "a <eos>" and "b c <eos>" both score exactly -1.5; the one that ended first stays.
        let table = |p: &[i64]| match p {
            [] => lp(&[(2, -0.5), (3, -0.75)]),
            [2] => lp(&[(EOS, -1.0)]),
            [3] => lp(&[(4, -0.25)]),
            [3, 4] => lp(&[(EOS, -0.5)]),
            _ => lp(&[]),
        };
        assert_eq!(beam(table, 2, 8), vec![2]);
    }
}
