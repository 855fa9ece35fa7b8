//! Caption metrics as pycocoevalcap computes them (`Cider`, `Bleu(4)`), after its PTB
//! tokenisation of predictions and references ([`crate::ptb`]).
//!
//! Each input item is `(prediction, references)` for one image.

use std::collections::{HashMap, HashSet};

use crate::ptb;

const MAX_N: usize = 4;
/// Standard deviation of CIDEr-D's Gaussian length penalty.
const SIGMA: f64 = 6.0;

/// n-gram counts of one sentence, by order (index 0 holds unigrams).
type Counts = [HashMap<String, usize>; MAX_N];

/// CIDEr-D of each image, as pycocoevalcap's `CiderScorer` (the corpus score is their mean).
///
/// Document frequencies count, for each n-gram, the images whose references contain it;
/// each n-gram order's tf-idf vectors are compared by a cosine clipped at the reference's
/// weights, damped by `exp(-delta^2 / 2 sigma^2)`, averaged over orders and references and
/// scaled by 10. As in pycocoevalcap, the length difference `delta` counts bigrams (words
/// minus one, or 0 for an empty sentence), not words.
pub fn cider(items: &[(&str, Vec<&str>)]) -> Vec<f64> {
    let (hyps, refs) = tokenized_counts(items);
    let doc_freq = document_frequencies(&refs);
    let log_images = (items.len() as f64).ln();
    hyps.iter()
        .zip(&refs)
        .map(|(hyp, refs)| {
            let hyp = TfIdf::new(hyp, &doc_freq, log_images);
            let total: f64 =
                refs.iter().map(|r| hyp.similarity(&TfIdf::new(r, &doc_freq, log_images)).iter().sum::<f64>()).sum();
            total / MAX_N as f64 / refs.len() as f64 * 10.0
        })
        .collect()
}

/// Corpus BLEU-1..4 as pycocoevalcap's `Bleu(4)`: clipped n-gram precisions summed over the
/// corpus, brevity penalty from the reference length closest to each hypothesis (the shorter
/// on ties), and its smoothing constants (`1e-15` and `1e-9`) kept.
pub fn bleu(items: &[(&str, Vec<&str>)]) -> [f64; MAX_N] {
    const TINY: f64 = 1e-15;
    const SMALL: f64 = 1e-9;
    let mut correct = [0usize; MAX_N];
    let mut guess = [0usize; MAX_N];
    let (mut hyp_len, mut ref_len) = (0usize, 0usize);
    for (prediction, references) in items {
        let hyp = ptb::tokenize(prediction);
        let refs: Vec<Vec<String>> = references.iter().map(|r| ptb::tokenize(r)).collect();
        let max_ref_counts = max_counts(&refs);
        for (n, counts) in ngram_counts(&hyp).iter().enumerate() {
            correct[n] +=
                counts.iter().map(|(g, &c)| c.min(max_ref_counts[n].get(g).copied().unwrap_or(0))).sum::<usize>();
            guess[n] += (hyp.len() + 1).saturating_sub(n + 1);
        }
        hyp_len += hyp.len();
        ref_len += refs.iter().map(Vec::len).min_by_key(|&l| (l.abs_diff(hyp.len()), l)).unwrap_or(0);
    }
    let ratio = (hyp_len as f64 + TINY) / (ref_len as f64 + SMALL);
    let brevity = if ratio < 1.0 { (1.0 - 1.0 / ratio).exp() } else { 1.0 };
    let mut product = 1.0;
    std::array::from_fn(|n| {
        product *= (correct[n] as f64 + TINY) / (guess[n] as f64 + SMALL);
        product.powf(1.0 / (n + 1) as f64) * brevity
    })
}

/// PTB-tokenised n-gram counts of the predictions and of each image's references.
fn tokenized_counts(items: &[(&str, Vec<&str>)]) -> (Vec<Counts>, Vec<Vec<Counts>>) {
    let counts = |s: &str| ngram_counts(&ptb::tokenize(s));
    items.iter().map(|(p, refs)| (counts(p), refs.iter().map(|r| counts(r)).collect())).unzip()
}

/// Counts of every 1- to 4-gram of `words`, keyed by the n-gram's words joined with spaces.
fn ngram_counts(words: &[String]) -> Counts {
    std::array::from_fn(|k| {
        let mut counts = HashMap::new();
        for gram in words.windows(k + 1) {
            *counts.entry(gram.join(" ")).or_insert(0) += 1;
        }
        counts
    })
}

/// For BLEU's clipping: each n-gram's largest count in any one reference.
fn max_counts(refs: &[Vec<String>]) -> Counts {
    let mut max: Counts = Default::default();
    for counts in refs.iter().map(|r| ngram_counts(r)) {
        for (n, grams) in counts.into_iter().enumerate() {
            for (g, c) in grams {
                let entry = max[n].entry(g).or_insert(0);
                *entry = (*entry).max(c);
            }
        }
    }
    max
}

/// For each n-gram, the number of images whose references contain it.
fn document_frequencies(refs: &[Vec<Counts>]) -> HashMap<&str, f64> {
    let mut df = HashMap::new();
    for image in refs {
        let grams: HashSet<&str> =
            image.iter().flat_map(|r| r.iter().flat_map(|c| c.keys())).map(String::as_str).collect();
        for g in grams {
            *df.entry(g).or_insert(0.0) += 1.0;
        }
    }
    df
}

/// A sentence's tf-idf vector per n-gram order, with its norms and bigram count.
struct TfIdf<'a> {
    weights: [HashMap<&'a str, f64>; MAX_N],
    norms: [f64; MAX_N],
    bigrams: usize,
}

impl<'a> TfIdf<'a> {
    fn new(counts: &'a Counts, doc_freq: &HashMap<&str, f64>, log_images: f64) -> Self {
        let weights: [HashMap<&str, f64>; MAX_N] = std::array::from_fn(|n| {
            counts[n]
                .iter()
                .map(|(g, &tf)| {
                    // An n-gram absent from all references gets document frequency 1.
                    let df = doc_freq.get(g.as_str()).copied().unwrap_or(0.0).max(1.0);
                    (g.as_str(), tf as f64 * (log_images - df.ln()))
                })
                .collect()
        });
        let norms = std::array::from_fn(|n| weights[n].values().map(|w| w * w).sum::<f64>().sqrt());
        TfIdf { weights, norms, bigrams: counts[1].values().sum() }
    }

    /// CIDEr-D's per-order similarity of this hypothesis to one reference.
    fn similarity(&self, reference: &TfIdf) -> [f64; MAX_N] {
        let delta = self.bigrams as f64 - reference.bigrams as f64;
        let penalty = (-(delta * delta) / (2.0 * SIGMA * SIGMA)).exp();
        std::array::from_fn(|n| {
            let mut dot: f64 = self.weights[n]
                .iter()
                .map(|(g, &h)| {
                    let r = reference.weights[n].get(g).copied().unwrap_or(0.0);
                    h.min(r) * r // CIDEr-D's clipping of the hypothesis weight
                })
                .sum();
            if self.norms[n] != 0.0 && reference.norms[n] != 0.0 {
                dot /= self.norms[n] * reference.norms[n];
            }
            dot * penalty
        })
    }
}
