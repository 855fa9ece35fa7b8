//! `pg2 bench train`: full training steps (forward, loss, backward, clipping, AdamW) of a
//! random PaliGemma 2, pg2 against transformers on the same checkpoint, batch and thread
//! count. pg2's side is `launch`'s own step ([`Trainer::step`]) under a recipe that says
//! what the baseline does.

use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Result};
use pg2_data::Batch;
use pg2_dist::Group;
use pg2_model::{PaliGemma, PaliGemmaConfig};
use pg2_optim::{DecayShape, Schedule};
use pg2_train::trainer::training_options;
use pg2_train::{Recipe, Trainer};
use serde_json::{json, Value};
use tch::Kind;

use super::{
    peak_rss_mb, read_inputs, run_baseline, run_pg2_side, write_inputs, write_random_model, Shape, Sides, TempDir,
};

const BASELINE: &str = include_str!("train_baseline.py");

/// AdamW's settings on both sides (weight decay on every kernel, the decoder's and the
/// patch-embedding convolution included, not on embeddings, norms or biases; the baseline
/// builds the same two groups),
/// after clipping the gradient norm to 1 (big_vision's and pg2's default).
const LR: f64 = 1e-3;
const WEIGHT_DECAY: f64 = 0.01;

/// The recipe a benchmark's pg2 side trains with: the model in `dir`, the baseline's
/// optimizer, the mean over target tokens, plus `model` and `train` lines of its own. Its
/// data section is never read (the batch is given).
pub(super) fn step_recipe(dir: &Path, steps: usize, batch: i64, model: &str, train: &str) -> Result<Recipe> {
    let resolution = PaliGemmaConfig::from_file(&dir.join("config.json"))?.vision.image_size;
    let text = format!(
        "[model]\ninit = {init:?}\nresolution = {resolution}\n{model}\n\
         [data]\ntokenizer = \"unused.json\"\nmixture = [{{ path = \"unused.jsonl\", weight = 1.0 }}]\n\
         [train]\nsteps = {steps}\nbatch_size = {batch}\nlr = {LR}\nweight_decay = {WEIGHT_DECAY}\nweight_decay_mode = \"lr_coupled\"\n\
         wd_mults = {{ \"vision_tower.\" = 1.0, \"multi_modal_projector.\" = 1.0, \"language_model.\" = 1.0 }}\n\
         schedule = \"constant\"\nloss_normalization = \"token\"\ngrad_clip = 1.0\n{train}\n",
        init = dir.display().to_string(),
    );
    let path = dir.join(format!("bench-{}.toml", std::process::id()));
    std::fs::write(&path, text)?;
    Ok(Recipe::from_file(&path)?)
}

/// The trainer a benchmark's pg2 side times, with the batch from `dir` and its target count.
pub(super) fn step_trainer(
    dir: &Path,
    recipe: &Recipe,
    device: tch::Device,
    group: &mut Group,
) -> Result<(Trainer, Batch, tch::Tensor)> {
    let model = PaliGemma::load(dir, device, Kind::Float, training_options(recipe))?;
    let inputs = read_inputs(dir, device)?;
    let loss_mask = inputs.layout.mask_ar.to_kind(Kind::Bool);
    let schedule = Schedule { warmup_steps: 0, total_steps: u64::MAX, shape: DecayShape::Constant };
    // The benchmark shapes' `<image>` is their last id, past every text id.
    let text_ids = model.config.image_token_id as usize;
    let trainer = Trainer::new(model, recipe, schedule, 0, text_ids, group)?;
    let targets = trainer.update_targets(loss_mask.sum(Kind::Int64).int64_value(&[]) as usize, group)?;
    Ok((trainer, Batch { inputs, loss_mask }, targets))
}

/// First-step losses further apart than this (relative) mean the two sides compute
/// different things, so their times are not comparable.
const LOSS_TOLERANCE: f64 = 1e-3;

/// Settings of `pg2 bench train`.
pub struct TrainBench {
    /// Which random model to build.
    pub shape: Shape,
    /// Examples per step.
    pub batch: i64,
    /// Timed steps, after one warm-up step.
    pub steps: usize,
    /// Activation checkpointing on both sides (pg2's recomputed layers, transformers'
    /// `gradient_checkpointing_enable`).
    pub recompute: bool,
    /// pg2's soft-capped attention recomputes its scores in the backward pass.
    pub lean_attention: bool,
    /// Threads, device, baseline Python.
    pub sides: Sides,
}

/// `pg2 bench train`: writes the model and batch, runs pg2's side in a fresh process and
/// transformers' in Python, and prints steps/s, first-step and last losses and peak memory.
pub fn train(b: &TrainBench) -> Result<()> {
    if let Some(dir) = &b.sides.pg2_side {
        println!("{}", pg2_side(b, dir)?);
        return Ok(());
    }
    let dir = TempDir::new("train")?;
    let (config, params) = write_random_model(b.shape, &dir.0)?;
    write_inputs(&config, b.batch, true, &dir.0)?;
    let tokens = config.vision.num_patches() as i64 + super::PROMPT_LEN + super::TARGET_LEN + 3;
    println!(
        "training step (forward, mean target NLL, backward, clipping, AdamW) of the {:?} PaliGemma 2 ({:.2}M parameters), batch {} x {tokens} tokens ({} targets each), f32, soft-caps on, {}, {} thread(s){}{}",
        b.shape, params as f64 / 1e6, b.batch, super::TARGET_LEN + 1, b.sides.device, b.sides.threads,
        if b.recompute { ", activation checkpointing" } else { "" },
        if b.lean_attention { ", lean attention (pg2)" } else { "" }
    );
    let ours = run_pg2_side(&dir.0)?;
    let settings = json!({"steps": b.steps, "threads": b.sides.threads, "device": b.sides.device, "lr": LR, "weight_decay": WEIGHT_DECAY, "recompute": b.recompute});
    // Null when the baseline cannot run: its figures read as n/a.
    let theirs =
        run_baseline(&b.sides.python, "train-baseline", BASELINE, &[dir.0.as_os_str(), settings.to_string().as_ref()])?
            .unwrap_or_default();
    let cell = |x: Option<f64>, digits: usize| x.map_or("n/a".to_string(), |x| format!("{x:.digits$}"));
    println!("{:<16} {:>14} {:>14} {:>8}", "", "pg2", "transformers", "ratio");
    // Ratios are pg2 / transformers: above 1 is faster for steps/s, more memory for RSS.
    for (label, key, digits, with_ratio) in [
        ("steps/s", "steps_per_s", 3, true),
        ("first loss", "first_loss", 6, false),
        ("last loss", "last_loss", 6, false),
        ("peak RSS (MB)", "peak_rss_mb", 0, true),
    ] {
        let (a, t) = (ours[key].as_f64(), theirs[key].as_f64());
        let ratio = match (a, t) {
            (Some(a), Some(t)) if with_ratio => format!("{:.2}x", a / t),
            _ => String::new(),
        };
        println!("{label:<16} {:>14} {:>14} {ratio:>8}", cell(a, digits), cell(t, digits));
    }
    if let (Some(a), Some(t)) = (ours["first_loss"].as_f64(), theirs["first_loss"].as_f64()) {
        let rel = (a - t).abs() / t.abs().max(1e-12);
        println!("first-step losses differ by {rel:.1e} (relative)");
        if rel > LOSS_TOLERANCE {
            bail!("pg2's first-step loss {a} and transformers' {t} differ by {rel:.1e} > {LOSS_TOLERANCE:.0e}: the two sides do not compute the same step");
        }
    }
    Ok(())
}

/// pg2's side: loads the model and batch from `dir`, runs one warm-up step and `b.steps`
/// timed ones, and returns its figures as one JSON object.
fn pg2_side(b: &TrainBench, dir: &Path) -> Result<Value> {
    tch::set_num_threads(b.sides.threads as i32);
    let device = crate::device::prepare_device(&b.sides.device)?;
    let model_lines = format!("activation_checkpointing = {}\nlean_attention = {}", b.recompute, b.lean_attention);
    let recipe = step_recipe(dir, b.steps + 1, b.batch, &model_lines, "")?;
    let mut group = Group::single();
    let (mut trainer, batch, targets) = step_trainer(dir, &recipe, device, &mut group)?;
    // Reading the loss each step waits for the device, as the baseline's `loss.item()`.
    let mut step = || -> Result<f64> { Ok(trainer.step(&[&batch], &targets, &mut group)?.loss.double_value(&[])) };
    let first = step()?;
    let start = Instant::now();
    let mut last = first;
    for _ in 0..b.steps {
        last = step()?;
    }
    let elapsed = start.elapsed().as_secs_f64();
    Ok(
        json!({"steps_per_s": b.steps as f64 / elapsed, "first_loss": first, "last_loss": last, "peak_rss_mb": peak_rss_mb()}),
    )
}
