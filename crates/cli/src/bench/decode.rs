//! `pg2 bench decode`: greedy decoding with a KV cache from a random PaliGemma 2, pg2's
//! `generate` against transformers' `generate` on the same checkpoint, prompts and threads.

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};
use pg2_model::{generate, DecodeOptions, PaliGemma, PaliGemmaConfig, RunOptions};
use serde_json::{json, Value};
use tch::Kind;

use super::{
    peak_rss_mb, read_inputs, run_baseline, run_pg2_side, write_inputs, write_random_model, Shape, Sides, TempDir,
};

const BASELINE: &str = include_str!("decode_baseline.py");

/// Settings of `pg2 bench decode`.
pub struct DecodeBench {
    /// Which random model to build.
    pub shape: Shape,
    /// Prompts decoded together.
    pub batch: i64,
    /// Tokens generated per prompt, exactly: `<eos>` is set to an id past the vocabulary.
    pub new_tokens: usize,
    /// Timed runs, after one warm-up run.
    pub runs: usize,
    /// Threads, device, baseline Python.
    pub sides: Sides,
}

/// An end-of-sequence id no model of `config` can generate, so every run makes exactly
/// `new_tokens` tokens on both sides.
fn unreachable_eos(config: &PaliGemmaConfig) -> i64 {
    config.text.vocab_size as i64
}

/// `pg2 bench decode`: writes the model and prompts, runs pg2's side in a fresh process and
/// transformers' in Python, and prints generated tokens/s, peak memory and whether the
/// tokens agree.
pub fn decode(b: &DecodeBench) -> Result<()> {
    if let Some(dir) = &b.sides.pg2_side {
        println!("{}", pg2_side(b, dir)?);
        return Ok(());
    }
    let dir = TempDir::new("decode")?;
    let (config, params) = write_random_model(b.shape, &dir.0)?;
    write_inputs(&config, b.batch, false, &dir.0)?;
    let prompt = config.vision.num_patches() as i64 + super::PROMPT_LEN + 2;
    println!(
        "greedy decoding with a KV cache from the {:?} PaliGemma 2 ({:.2}M parameters): {} prompts of {prompt} tokens, {} new tokens each, f32, soft-caps on, {}, {} thread(s), {} timed run(s)",
        b.shape, params as f64 / 1e6, b.batch, b.new_tokens, b.sides.device, b.sides.threads, b.runs
    );
    let ours = run_pg2_side(&dir.0)?;
    let settings = json!({"new_tokens": b.new_tokens, "runs": b.runs, "threads": b.sides.threads, "device": b.sides.device,
        "eos_id": unreachable_eos(&config)});
    // Null when the baseline cannot run: its figures read as n/a.
    let theirs = run_baseline(
        &b.sides.python,
        "decode-baseline",
        BASELINE,
        &[dir.0.as_os_str(), settings.to_string().as_ref()],
    )?
    .unwrap_or_default();
    let cell = |x: Option<f64>, digits: usize| x.map_or("n/a".to_string(), |x| format!("{x:.digits$}"));
    println!("{:<20} {:>14} {:>14} {:>8}", "", "pg2", "transformers", "ratio");
    // Ratios are pg2's speed-up (above 1: pg2 is faster), and pg2 / transformers for memory.
    // (label, key, digits, whether the figure is a time)
    let rows = [
        ("tokens/s", "tokens_per_s", 1, false),
        ("first token (ms)", "first_token_ms", 0, true),
        ("later tokens/s", "later_tokens_per_s", 1, false),
        ("peak RSS (MB)", "peak_rss_mb", 0, false),
    ];
    for (label, key, digits, is_time) in rows {
        let (a, t) = (ours[key].as_f64(), theirs[key].as_f64());
        let ratio = a.zip(t).map_or(String::new(), |(a, t)| format!("{:.2}x", if is_time { t / a } else { a / t }));
        println!("{label:<20} {:>14} {:>14} {ratio:>8}", cell(a, digits), cell(t, digits));
    }
    if !theirs.is_null() {
        let tokens =
            |v: &Value| serde_json::from_value::<Vec<Vec<i64>>>(v["tokens"].clone()).context("generated tokens");
        let (a, t) = (tokens(&ours)?, tokens(&theirs)?);
        let total = a.iter().map(Vec::len).sum::<usize>().max(t.iter().map(Vec::len).sum());
        let same: usize = a.iter().zip(&t).map(|(x, y)| x.iter().zip(y).filter(|(p, q)| p == q).count()).sum();
        println!("generated tokens: {same} of {total} identical ({} mismatches)", total - same);
    }
    Ok(())
}

/// The rate of the decoding steps after the first token: the batch's other tokens over
/// the time a full run takes beyond a one-token run (prefill, vision tower included).
/// `None` with one new token, or when timing noise leaves no time for them.
fn later_tokens_per_s(batch: i64, new_tokens: usize, first_s: f64, total_s: f64) -> Option<f64> {
    (new_tokens > 1 && total_s > first_s).then(|| (batch * (new_tokens as i64 - 1)) as f64 / (total_s - first_s))
}

/// pg2's side: loads the model and prompts from `dir`, decodes once to warm up and
/// `b.runs` times timed, and returns its figures and tokens as one JSON object.
fn pg2_side(b: &DecodeBench, dir: &Path) -> Result<Value> {
    tch::set_num_threads(b.sides.threads as i32);
    let device = crate::device::prepare_device(&b.sides.device)?;
    let model = PaliGemma::load(dir, device, Kind::Float, RunOptions::default())?;
    let prompts = read_inputs(dir, device)?;
    let eos = unreachable_eos(&model.config);
    let opts = DecodeOptions { max_new_tokens: b.new_tokens, beam_size: 1, eos_id: eos, pad_id: 0 };
    // Each step brings the chosen tokens to the host, which waits for the device.
    let timed = |opts: &DecodeOptions| -> Result<(f64, Vec<Vec<i64>>)> {
        let mut tokens = generate(&model, &prompts, opts)?;
        let start = Instant::now();
        for _ in 0..b.runs {
            tokens = generate(&model, &prompts, opts)?;
        }
        Ok((start.elapsed().as_secs_f64() / b.runs as f64, tokens))
    };
    let (first_s, _) = timed(&DecodeOptions { max_new_tokens: 1, ..opts })?;
    let (total_s, tokens) = timed(&opts)?;
    let generated: usize = tokens.iter().map(Vec::len).sum();
    Ok(json!({"tokens_per_s": generated as f64 / total_s, "first_token_ms": first_s * 1e3,
        "later_tokens_per_s": later_tokens_per_s(b.batch, b.new_tokens, first_s, total_s), "peak_rss_mb": peak_rss_mb(), "tokens": tokens}))
}
