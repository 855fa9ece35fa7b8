//! The training loop: one recipe, one run folder.
//!
//! `runs/<name>/` holds `recipe.toml` (the fully resolved recipe), `metrics.jsonl` (one
//! line per logged step, and per evaluation with `eval/<metric>`), `eval/step-NNNNNN.jsonl`
//! (predictions with their references), TensorBoard event files under `tb/` (`train/loss`, `train/lr`,
//! `train/grad_norm`) and `checkpoints/step-NNNNNN/` (a Hugging Face model folder plus
//! `optimizer.safetensors` and `trainer_state.json`), with `checkpoints/latest` naming the
//! newest. Checkpoints are written to a temporary folder and renamed, and `latest` is
//! replaced by a rename, so a kill at any moment leaves the previous checkpoint valid.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use pg2_data::{
    pipeline::{self, TokenCounts}, source, synth, Mixture, MixturePosition, MixtureSource, OnBadLine, OnBadRecord, PgTokenizer, Pipeline, PipelineConfig,
    SourceData, StreamSource, TaskFormat, TextLimits,
};
use pg2_data::{image, Batch, EncodedExample, Record};
use pg2_model::{checkpoint, generate, DecodeOptions, PaliGemma, PaliGemmaConfig, RunOptions, Weights};
use serde_json::{Map, Value};
use pg2_optim::{decays_by_default, Adam, AdamConfig, ParamGroup, Schedule};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use crate::recipe::{EvalSection, LossNormalization, OnNonFinite, Recipe, PARTS, PRESETS};
use crate::tensorboard::EventWriter;
use pg2_dist::Group;

/// How `launch` was asked to run a recipe.
#[derive(Debug, Clone)]
pub struct LaunchOptions {
    /// The run folder (default `runs/<recipe name>`).
    pub out: PathBuf,
    /// Continue from the run folder's latest checkpoint.
    pub resume: bool,
    /// Start over in a run folder that holds checkpoints.
    pub overwrite: bool,
    pub device: Device,
}

/// What a finished run reports.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainSummary {
    /// Loss of every logged step this process ran (each `train.log_every`-th and the last), in order.
    pub losses: Vec<f64>,
    /// The last checkpoint written (on ranks other than 0: the newest found at the end).
    pub checkpoint: PathBuf,
}

/// Saved beside each checkpoint's weights.
#[derive(Debug, Serialize, Deserialize)]
struct TrainerState {
    step: u64,
    position: MixturePosition,
    seed: u64,
}

/// The mixture the recipe describes, from its first example.
fn mixture(recipe: &Recipe) -> Result<Mixture> {
    let d = &recipe.data;
    let policy = match d.on_bad_record {
        OnBadRecord::Error => OnBadLine::Error,
        OnBadRecord::Skip => OnBadLine::Skip,
    };
    let sources = d
        .mixture
        .iter()
        .map(|s| {
            let data = match s.shuffle_buffer {
                Some(buffer) => SourceData::Stream(StreamSource::open(&s.path, buffer, policy)?),
                None => {
                    let (records, skipped) = source::read_source(&s.path, policy)?;
                    if skipped > 0 {
                        eprintln!("launch: {} bad lines skipped in {}", skipped, s.path.display());
                    }
                    SourceData::Memory(records)
                }
            };
            let limits = TextLimits {
                max_prefix_tokens: s.max_prefix_tokens.or(d.max_prefix_tokens),
                max_suffix_tokens: s.max_suffix_tokens.or(d.max_suffix_tokens),
                keep_eos: d.keep_eos,
            };
            Ok(MixtureSource { name: s.path.display().to_string(), data, weight: s.weight, format: TaskFormat { prefix: s.prefix.clone(), limits } })
        })
        .collect::<Result<Vec<_>, pg2_data::DataError>>()?;
    Ok(Mixture::new(sources, recipe.seed)?)
}

/// How the recipe runs the model while training.
fn training_options(recipe: &Recipe) -> RunOptions {
    RunOptions {
        soft_caps: recipe.model.soft_caps,
        recompute: recipe.model.activation_checkpointing,
        lean_attention: recipe.model.lean_attention,
        ..RunOptions::default()
    }
}

/// The configuration of the recipe's preset (`model.init` names one).
fn preset_config(recipe: &Recipe, tok: &PgTokenizer) -> Result<PaliGemmaConfig> {
    let res = recipe.model.resolution;
    let mut config = match recipe.model.init.as_str() {
        "tiny" => PaliGemmaConfig::tiny(tok.vocab_size(), tok.image_id, res)?,
        preset => {
            let size = preset.trim_start_matches("paligemma2-").trim_end_matches('b').parse().context("model.init")?;
            PaliGemmaConfig::paligemma2(size, res)?
        }
    };
    // A fresh model takes its placeholder id from the tokenizer it is trained with.
    config.image_token_id = tok.image_id;
    Ok(config)
}

/// How much of one worker's micro-batches padding fills over the next `updates` updates
/// with `world` workers: dealt out in stream order, and sorted by length
/// (`data.bucket_by_length`). Reads the sources and tokenizes, but no image.
pub fn padding(recipe: &Recipe, world: usize, updates: usize) -> Result<[TokenCounts; 2]> {
    let tok = PgTokenizer::from_file(&recipe.data.tokenizer)?;
    let mut model = match PRESETS.contains(&recipe.model.init.as_str()) {
        true => preset_config(recipe, &tok)?,
        false => PaliGemmaConfig::from_file(&checkpoint_dir(Path::new(&recipe.model.init))?.join("config.json"))?,
    };
    model.vision.image_size = recipe.model.resolution;
    let config = PipelineConfig { bucket_by_length: false, ..pipeline_config(recipe, &model, 0, world)? };
    let plain = pipeline::count_tokens(mixture(recipe)?, &tok, &config, updates)?;
    let bucketed = pipeline::count_tokens(mixture(recipe)?, &tok, &PipelineConfig { bucket_by_length: true, ..config }, updates)?;
    Ok([plain, bucketed])
}

/// Examples per micro-batch on each of `world` workers: `train.batch_size` is the global batch.
fn worker_batch(recipe: &Recipe, world: usize) -> Result<usize> {
    let batch = recipe.train.batch_size;
    if world == 0 || !batch.is_multiple_of(world) {
        bail!("train.batch_size = {batch} does not split evenly over {world} workers; make it a multiple of {world}");
    }
    Ok(batch / world)
}

/// The input pipeline of worker `rank` of `world` for the recipe and a model of `model`.
fn pipeline_config(recipe: &Recipe, model: &PaliGemmaConfig, rank: usize, world: usize) -> Result<PipelineConfig> {
    let (t, d) = (&recipe.train, &recipe.data);
    Ok(PipelineConfig {
        resolution: model.vision.image_size as u32,
        image_tokens: model.vision.num_patches(),
        batch_size: worker_batch(recipe, world)?,
        accumulation: t.grad_accumulation,
        bucket_by_length: d.bucket_by_length,
        rank,
        world,
        workers: d.workers,
        prefetch: d.prefetch,
        pad_to: d.pad_to,
        on_bad_record: d.on_bad_record,
    })
}

/// A fresh model of the recipe's preset, or its starting checkpoint.
fn build_model(recipe: &Recipe, tok: &PgTokenizer, device: Device) -> Result<PaliGemma> {
    let options = training_options(recipe);
    let kind = recipe.model.dtype.kind();
    if !PRESETS.contains(&recipe.model.init.as_str()) {
        let dir = checkpoint_dir(Path::new(&recipe.model.init))?;
        eprintln!("launch: starting from {}", dir.display());
        return Ok(PaliGemma::load_at(&dir, Some(recipe.model.resolution), device, kind, options)?);
    }
    let config = preset_config(recipe, tok)?;
    if tok.vocab_size() > config.text.vocab_size {
        bail!(
            "{}: {} tokens do not fit the model's {}-row embedding",
            recipe.data.tokenizer.display(),
            tok.vocab_size(),
            config.text.vocab_size
        );
    }
    tch::manual_seed(recipe.seed as i64);
    let model = PaliGemma::new(config, &mut Weights::random(device, kind), options)?;
    match &recipe.model.vision_init {
        Some(dir) => load_part(&model, Path::new(dir), Part::Vision)?,
        // The zero projector suits a pretrained vision tower; one trained from scratch would
        // get no gradient through it at first and learns much more slowly (tiny stage 1:
        // colour questions at 0.25 instead of 0.43 after 400 steps).
        None => tch::no_grad(|| {
            for (_, p) in model.parameters().iter().filter(|(n, _)| n.starts_with(checkpoint::PROJECTOR) && n.ends_with(".weight")) {
                let _ = p.shallow_clone().normal_(0.0, 0.02);
            }
        }),
    }
    if let Some(dir) = &recipe.model.text_init {
        load_part(&model, Path::new(dir), Part::Text)?;
    }
    Ok(model)
}

/// Which separate checkpoint a stage-1 model starts from.
#[derive(Clone, Copy, PartialEq)]
enum Part {
    /// SigLIP: `vision_model.*` (its text tower, logit scale/bias and pooling head are not
    /// part of PaliGemma and are left out).
    Vision,
    /// Gemma 2: `model.*` (a tied `lm_head` is the embedding).
    Text,
}

/// Copies a SigLIP or Gemma 2 checkpoint into the matching part of `model`. Every
/// parameter of that part must be found with its shape, except that the embedding may be
/// shorter (its first rows are copied) and position embeddings of another grid are resampled.
fn load_part(model: &PaliGemma, dir: &Path, part: Part) -> Result<()> {
    let params: BTreeMap<String, Tensor> = model.parameters().into_iter().collect();
    let (from, to) = match part {
        Part::Vision => ("vision_model.", checkpoint::VISION),
        Part::Text => ("model.", checkpoint::TEXT),
    };
    let mut filled = std::collections::BTreeSet::new();
    for file in checkpoint::weight_files(dir)? {
        for (name, tensor) in checkpoint::read_file(&file)? {
            let Some(rest) = name.strip_prefix(from) else { continue };
            if part == Part::Vision && rest.starts_with("head.") {
                continue;
            }
            let target = format!("{to}.{rest}");
            let param = params.get(&target).with_context(|| format!("{}: `{name}` has no place in the model", file.display()))?;
            let mut value = tensor.to_kind(param.kind()).to_device(param.device());
            if rest == "embeddings.position_embedding.weight" && value.size() != param.size() {
                value = pg2_model::siglip::resample_positions(&value, (param.size()[0] as f64).sqrt().round() as i64);
            }
            tch::no_grad(|| -> Result<()> {
                if rest == "embed_tokens.weight" && value.size()[0] <= param.size()[0] && value.size()[1] == param.size()[1] {
                    param.narrow(0, 0, value.size()[0]).copy_(&value);
                } else if value.size() == param.size() {
                    param.shallow_clone().copy_(&value);
                } else {
                    bail!("{}: `{name}` has shape {:?}, the model needs {:?}", file.display(), value.size(), param.size());
                }
                Ok(())
            })?;
            filled.insert(target);
        }
    }
    if let Some(missing) = params.keys().filter(|n| n.starts_with(to)).find(|n| !filled.contains(*n)) {
        bail!("{}: no tensor for `{missing}`", dir.display());
    }
    Ok(())
}

/// The training loss. Per example (big_vision): each example's summed target NLL over its
/// own target count, averaged over the batch; per token (transformers): the summed NLL
/// over `per_token` tokens (the whole update's target count over the number of workers, so
/// that averaging their gradients divides by all the update's targets). With
/// label smoothing `s` the target keeps `1 - s` and every other token gets `s / (V - 1)`.
fn loss(model: &PaliGemma, batch: &pg2_data::Batch, smoothing: f64, per_token: Option<f64>) -> Result<Tensor> {
    let targets = model.target_distributions(&batch.inputs, &batch.loss_mask)?;
    let nll = smoothed_nll(&targets.log_probs, &targets.targets, smoothing);
    if let Some(tokens) = per_token {
        return Ok(nll.sum(Kind::Float) / tokens.max(1.0));
    }
    let b = batch.inputs.ids.size()[0];
    let counts = target_counts(batch);
    let sums = Tensor::zeros([b], (Kind::Float, nll.device())).index_add(0, &targets.example, &nll);
    Ok((sums / counts.clamp_min(1.0)).mean(Kind::Float))
}

/// Each example's number of target tokens.
fn target_counts(batch: &pg2_data::Batch) -> Tensor {
    let t = batch.inputs.ids.size()[1];
    batch.loss_mask.narrow(1, 1, t - 1).sum_dim_intlist(1, false, Kind::Float)
}

/// A checkpoint folder, following a run's `checkpoints/latest` pointer (given as the
/// pointer file, the `checkpoints` folder or the run folder).
fn checkpoint_dir(path: &Path) -> Result<PathBuf> {
    if path.join("config.json").exists() {
        return Ok(path.to_path_buf());
    }
    let pointer = [path.to_path_buf(), path.join("latest"), path.join("checkpoints/latest")].into_iter().find(|p| p.is_file());
    let Some(pointer) = pointer else { bail!("{}: neither a model folder nor a run with checkpoints", path.display()) };
    let name = std::fs::read_to_string(&pointer).with_context(|| format!("reading {}", pointer.display()))?;
    Ok(pointer.parent().unwrap().join(name.trim()))
}

/// Decodes the evaluation records (each rank a contiguous share), and on rank 0 scores them
/// all, writes `eval/step-NNNNNN.jsonl` (each record with its prediction) and returns the
/// scores (`None` on the other ranks).
fn evaluate(model: &PaliGemma, tok: &PgTokenizer, spec: &EvalSection, records: &[Record], step: u64, out: &Path, group: &mut Group) -> Result<Option<Map<String, Value>>> {
    let metric: pg2_eval::Metric = spec.metric.parse().map_err(anyhow::Error::msg)?;
    let (rank, world) = (group.rank(), group.world());
    let records = &records[records.len() * rank / world..records.len() * (rank + 1) / world];
    let (res, n_image) = (model.config.vision.image_size as u32, model.config.vision.num_patches());
    let decode = DecodeOptions { max_new_tokens: spec.max_len, beam_size: spec.beam, eos_id: tok.eos_id, pad_id: tok.pad_id, length_penalty: 1.0 };
    let format = TaskFormat { prefix: spec.prefix.clone(), ..TaskFormat::default() };
    let mut rows = Vec::with_capacity(records.len());
    for chunk in records.chunks(spec.batch_size) {
        let examples = chunk
            .iter()
            .map(|r| Ok(EncodedExample::new(tok, n_image, &format.prompt(r)?, None)))
            .collect::<Result<Vec<_>, pg2_data::DataError>>()?;
        let batch = Batch::collate(&examples, Some(image::load_pixels(chunk, res)?), tok.pad_id, model.device());
        for (record, tokens) in chunk.iter().zip(generate(model, &batch.inputs, &decode)?) {
            let mut row = record.extra.clone();
            row.insert("prefix".into(), format.prompt(record)?.into());
            if let Some(suffix) = &record.suffix {
                row.insert("suffix".into(), suffix.clone().into());
            }
            row.insert("prediction".into(), tok.decode(&tokens).into());
            rows.push(Value::Object(row));
        }
    }
    let lines: String = rows.iter().map(|r| format!("{r}\n")).collect();
    let Some(parts) = group.gather_to_main(&format!("eval-{step}"), lines.as_bytes())? else { return Ok(None) };
    let lines: String = parts.iter().map(|p| String::from_utf8_lossy(p)).collect();
    let rows = lines.lines().map(serde_json::from_str).collect::<Result<Vec<Value>, _>>()?;
    let dir = out.join("eval");
    std::fs::create_dir_all(&dir)?;
    write_atomically(&dir.join(format!("step-{step:06}.jsonl")), lines.as_bytes())?;
    Ok(Some(pg2_eval::score(metric, &rows)?))
}

/// `pg2 eval`: evaluates a checkpoint with a recipe's `[eval]` block (and its model
/// settings: resolution, dtype, soft-caps), writing `out/eval/step-NNNNNN.jsonl`.
pub fn evaluate_checkpoint(recipe: &Recipe, checkpoint: &Path, device: Device, out: &Path) -> Result<Map<String, Value>> {
    let spec = recipe.eval.as_ref().context("the recipe has no [eval] block")?;
    let dir = checkpoint_dir(checkpoint)?;
    let options = RunOptions { soft_caps: recipe.model.soft_caps, ..RunOptions::default() };
    let model = PaliGemma::load_at(&dir, Some(recipe.model.resolution), device, recipe.model.dtype.kind(), options)?;
    let tokenizer = PgTokenizer::from_file(&recipe.data.tokenizer)?;
    let mut records = source::read_jsonl(&spec.data)?;
    records.truncate(spec.max_examples.unwrap_or(usize::MAX));
    let step = std::fs::read_to_string(dir.join("trainer_state.json"))
        .ok()
        .and_then(|s| serde_json::from_str::<TrainerState>(&s).ok())
        .map_or(0, |s| s.step);
    Ok(evaluate(&model, &tokenizer, spec, &records, step, out, &mut Group::single())?.expect("a group of one is its own main rank"))
}

/// Per-token cross-entropy against the target smoothed by `s`: `(1 - s)` on the target,
/// `s / (V - 1)` on each other token (big_vision's label smoothing).
fn smoothed_nll(log_probs: &Tensor, targets: &Tensor, s: f64) -> Tensor {
    let picked = log_probs.gather(1, &targets.unsqueeze(1), false).squeeze_dim(1);
    if s == 0.0 {
        return -picked;
    }
    let others = log_probs.sum_dim_intlist(1, false, Kind::Float) - &picked;
    let vocab = log_probs.size()[1] as f64;
    -(picked * (1.0 - s) + others * (s / (vocab - 1.0)))
}

/// The newest checkpoint of a run folder, if any.
pub fn latest_checkpoint(out: &Path) -> Result<Option<PathBuf>> {
    let pointer = out.join("checkpoints/latest");
    if !pointer.exists() {
        return Ok(None);
    }
    let name = std::fs::read_to_string(&pointer).with_context(|| format!("reading {}", pointer.display()))?;
    Ok(Some(out.join("checkpoints").join(name.trim())))
}

/// Deletes all but the newest `keep` checkpoints (the one `latest` names is the newest).
fn prune_checkpoints(out: &Path, keep: usize) -> Result<()> {
    let dir = out.join("checkpoints");
    let mut steps: Vec<PathBuf> = std::fs::read_dir(&dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("step-")))
        .collect();
    steps.sort();
    for old in steps.iter().rev().skip(keep) {
        std::fs::remove_dir_all(old).with_context(|| format!("removing {}", old.display()))?;
    }
    Ok(())
}

/// Writes `path` by a rename, so readers see the old or the new content, never a part.
fn write_atomically(path: &Path, content: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, content).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming {}", tmp.display()))?;
    Ok(())
}

fn save_checkpoint(out: &Path, step: u64, model: &PaliGemma, adam: &Adam, tokenizer: &Path, state: &TrainerState, kind: Kind) -> Result<PathBuf> {
    let dir = out.join("checkpoints");
    let name = format!("step-{step:06}");
    let tmp = dir.join(format!(".{name}.tmp"));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)?;
    }
    model.save(&tmp, kind)?;
    std::fs::copy(tokenizer, tmp.join("tokenizer.json")).context("copying the tokenizer into the checkpoint")?;
    checkpoint::write_file(&tmp.join("optimizer.safetensors"), &adam.state(), Kind::Float)?;
    std::fs::write(tmp.join("trainer_state.json"), serde_json::to_string_pretty(state)?)?;
    let final_dir = dir.join(&name);
    if final_dir.exists() {
        std::fs::remove_dir_all(&final_dir)?;
    }
    std::fs::rename(&tmp, &final_dir)?;
    write_atomically(&dir.join("latest"), name.as_bytes())?;
    Ok(final_dir)
}

/// The run's `metrics.jsonl` and TensorBoard events, written by rank 0 alone.
struct RunLog {
    metrics: std::fs::File,
    events: EventWriter,
}

impl RunLog {
    fn open(out: &Path) -> Result<RunLog> {
        let metrics = std::fs::OpenOptions::new().create(true).append(true).open(out.join("metrics.jsonl"))?;
        Ok(RunLog { metrics, events: EventWriter::create(&out.join("tb"))? })
    }

    /// One line of `metrics.jsonl`, and TensorBoard scalars at `step`.
    fn write(&mut self, line: Value, step: u64, tags: &[(&str, f64)]) -> Result<()> {
        writeln!(self.metrics, "{line}")?;
        for (tag, v) in tags {
            self.events.scalar(tag, *v, step)?;
        }
        self.events.flush()?;
        Ok(())
    }
}

/// Runs the recipe to its last step (or from the latest checkpoint with `resume`) as one
/// worker of `group`: rank 0 prepares the run folder and writes logs, evaluations and
/// checkpoints; every rank reads its share of each batch and steps the same optimizer on
/// the averaged gradients, so the weights stay identical.
pub fn train(recipe: &Recipe, resolved: &toml::Table, opts: &LaunchOptions, group: &mut Group) -> Result<TrainSummary> {
    let out = &opts.out;
    let main = group.is_main();
    let world = group.world();
    worker_batch(recipe, world)?; // before anything in the run folder changes
    let latest = latest_checkpoint(out)?;
    match (&latest, opts.resume, opts.overwrite) {
        (Some(_), false, false) => bail!(
            "{} already holds checkpoints: pass --resume to continue the run or --overwrite to start over",
            out.display()
        ),
        (Some(_), _, true) if main => {
            // Starting over: the old run's checkpoints, metrics, events and predictions go.
            for old in ["checkpoints", "tb", "eval", "metrics.jsonl"].map(|name| out.join(name)) {
                if old.is_dir() {
                    std::fs::remove_dir_all(&old)?;
                } else if old.exists() {
                    std::fs::remove_file(&old)?;
                }
            }
        }
        (None, true, _) if main => eprintln!("launch: nothing to resume in {}; starting from step 0", out.display()),
        _ => {}
    }
    let resume_from = latest.filter(|_| opts.resume && !opts.overwrite);
    let missing = recipe.missing_sources();
    if !missing.is_empty() {
        bail!("the recipe's data is missing; nothing was trained:\n  {}", missing.join("\n  "));
    }
    if main {
        std::fs::create_dir_all(out)?;
        std::fs::write(out.join("recipe.toml"), toml::to_string_pretty(resolved)?)?;
        if let Some(dir) = recipe.data.synth.as_ref().filter(|d| !d.exists()) {
            eprintln!("launch: writing the synthetic demo data to {} (once)", dir.display());
            synth::write_synth(dir, &synth::SynthOptions::default())?;
        }
    }
    // The other ranks read the data and checkpoints only once rank 0 has prepared them.
    group.barrier("setup")?;
    let tokenizer = Arc::new(PgTokenizer::from_file(&recipe.data.tokenizer)?);
    let kind = recipe.model.dtype.kind();
    let (mut model, mixture, first_step) = match &resume_from {
        None => (build_model(recipe, &tokenizer, opts.device)?, mixture(recipe)?, 0),
        Some(dir) => {
            let model = PaliGemma::load(dir, opts.device, kind, training_options(recipe))?;
            let state: TrainerState = serde_json::from_str(&std::fs::read_to_string(dir.join("trainer_state.json"))?)?;
            let mut m = mixture(recipe)?;
            m.seek(state.position)?;
            if main {
                eprintln!("launch: resuming from {} (step {})", dir.display(), state.step);
            }
            (model, m, state.step)
        }
    };
    // Every rank starts from rank 0's weights.
    group.broadcast_from_main(&model.parameters().into_iter().map(|(_, p)| p).collect::<Vec<_>>())?;
    // Frozen parts get no gradient and no optimizer state.
    let frozen: Vec<&str> = PARTS.iter().filter(|(part, _)| recipe.model.freeze.iter().any(|f| f == part)).map(|(_, prefix)| *prefix).collect();
    let params: Vec<(String, Tensor)> = model.parameters().into_iter().filter(|(name, _)| !frozen.iter().any(|f| name.starts_with(f))).collect();
    for (_, p) in &params {
        let _ = p.set_requires_grad(true);
    }
    let t = &recipe.train;
    let config = AdamConfig { lr: t.lr, b2: t.b2, weight_decay: t.weight_decay, decay: t.weight_decay_mode, fused: t.fused_optimizer, ..AdamConfig::default() };
    let mut adam = Adam::with_groups(params, config, |name, p| {
        let mult = t.lr_mults.iter().filter(|(prefix, _)| name.starts_with(prefix.as_str())).max_by_key(|(prefix, _)| prefix.len());
        let spared = t.no_weight_decay.iter().any(|prefix| name.starts_with(prefix.as_str()));
        ParamGroup { lr_mult: mult.map_or(1.0, |(_, &m)| m), decay: decays_by_default(name, p) && !spared }
    });
    if let Some(dir) = &resume_from {
        let state: BTreeMap<String, Tensor> = checkpoint::read_file(&dir.join("optimizer.safetensors"))?.into_iter().collect();
        adam.load_state(state, first_step as i64).map_err(anyhow::Error::msg)?;
    }
    let total_steps = t.length().steps(mixture.total_records(), t.batch_size * t.grad_accumulation);
    let warmup_steps = t.warmup_fraction.map_or(t.warmup_steps, |f| (f * total_steps as f64).round() as u64);
    let schedule = Schedule { warmup_steps, total_steps, shape: t.schedule };
    let pipeline_config = pipeline_config(recipe, &model.config, group.rank(), world)?;
    let pipeline = Pipeline::start(mixture, tokenizer.clone(), pipeline_config)?;
    let mut log = if main { Some(RunLog::open(out)?) } else { None };
    let eval_records = match &recipe.eval {
        Some(spec) => {
            let mut records = source::read_jsonl(&spec.data)?;
            records.truncate(spec.max_examples.unwrap_or(usize::MAX));
            records
        }
        None => vec![],
    };
    // Every rank decodes its share; rank 0's scores go to metrics.jsonl as `eval/<name>` and
    // to TensorBoard.
    let log_eval = |step: u64, model: &PaliGemma, group: &mut Group, log: Option<&mut RunLog>| -> Result<()> {
        let Some(spec) = &recipe.eval else { return Ok(()) };
        let (Some(scores), Some(log)) = (evaluate(model, &tokenizer, spec, &eval_records, step, out, group)?, log) else { return Ok(()) };
        let mut line = Map::new();
        line.insert("step".into(), step.into());
        for (name, value) in scores.iter().filter(|(name, _)| name.as_str() != "n") {
            line.insert(format!("eval/{name}"), value.clone());
        }
        let tags: Vec<(&str, f64)> = line.iter().filter_map(|(tag, v)| Some((tag.as_str(), v.as_f64()?))).filter(|(tag, _)| *tag != "step").collect();
        for (tag, v) in &tags {
            eprintln!("step {step} {tag} {v:.4}");
        }
        log.write(Value::Object(line.clone()), step, &tags)
    };
    if first_step == 0 {
        log_eval(0, &model, group, log.as_mut())?;
    }
    let interactive = main && std::io::stderr().is_terminal();
    let bar = if interactive { ProgressBar::new(total_steps) } else { ProgressBar::hidden() };
    bar.set_style(ProgressStyle::with_template("{prefix} {bar:30} {pos}/{len} {msg} [{elapsed} < {eta}]").unwrap());
    bar.set_prefix(recipe.name.clone().unwrap_or_default());
    bar.set_position(first_step);
    let (mut losses, mut last_checkpoint) = (Vec::new(), PathBuf::new());
    let (mut window_start, mut window_examples) = (Instant::now(), 0usize);
    let per_token = t.loss_normalization == LossNormalization::Token;
    let bucket_bytes = (t.allreduce_bucket_mb * 1e6) as usize;
    // Kept on the device and read back only at log, evaluation and checkpoint steps, so no
    // step waits for the GPU: the count of non-finite steps (whose updates the optimizer
    // skipped on the device) and the first of them.
    let float = (Kind::Float, opts.device);
    let mut nonfinite_steps = Tensor::zeros([], float);
    let mut first_nonfinite = Tensor::full([], -1.0, float);
    let (mut reported_nonfinite, mut skipped_records) = (0u64, 0usize);
    for step in first_step..total_steps {
        // Gradients of `grad_accumulation` batches add up; each loss is scaled to their mean.
        let mut loss_sum = Tensor::zeros([], float);
        let mut position = None;
        if recipe.model.dropout > 0.0 {
            // Dropout masks from (seed, step) alone: a resumed run draws the same ones.
            let stream = (recipe.seed as i64).wrapping_mul(1_000_003).wrapping_add(step as i64);
            tch::manual_seed(stream.wrapping_add((group.rank() as i64) << 40)); // each rank its own masks
            model.options.dropout = recipe.model.dropout;
        }
        for _ in 0..t.grad_accumulation {
            let loaded = pipeline.next_batch()?;
            skipped_records += loaded.stats.skipped;
            // Per token: the summed loss over the whole update's targets (all micro-batches
            // and ranks, as one big batch would; times `world`, for the ranks' gradients are
            // averaged). Per example: this micro-batch's mean, a 1/accumulation share.
            let tokens = per_token.then(|| loaded.update_targets as f64 / world as f64);
            let batch = loaded.batch.to_device(opts.device);
            let forward = || loss(&model, &batch, t.label_smoothing, tokens);
            let loss = match recipe.model.dtype.autocast() {
                Some(kind) => pg2_model::autocast(opts.device, kind, forward),
                None => forward(),
            }?;
            let loss = if per_token { loss } else { loss / t.grad_accumulation as f64 };
            // A non-finite loss still runs backward: its gradients reach every rank, so all
            // of them see a non-finite norm below and skip the update alike.
            loss.backward();
            loss_sum += loss.detach();
            position = Some(loaded.position);
        }
        let position = position.expect("at least one batch per step");
        model.options.dropout = 0.0; // evaluation and checkpoints see the model without it
        if world > 1 {
            let grads = adam
                .params()
                .iter()
                .map(|(name, p)| Some(p.grad()).filter(Tensor::defined).with_context(|| format!("`{name}` got no gradient; every trainable parameter needs one with several workers")))
                .collect::<Result<Vec<_>>>()?;
            group.all_reduce_mean(&grads, bucket_bytes)?;
            group.all_reduce_sum(&loss_sum)?;
            loss_sum /= world as f64;
        }
        let grad_norm = adam.clip_grad_norm(Some(t.grad_clip).filter(|&c| c > 0.0));
        let nonfinite = loss_sum.isfinite().logical_and(&grad_norm.to_device(opts.device).isfinite()).logical_not().to_kind(Kind::Float);
        adam.step_unless(schedule.factor(step), Some(&nonfinite));
        first_nonfinite = first_nonfinite.where_self(&(first_nonfinite.ge(0.0).logical_or(&nonfinite.eq(0.0))), &Tensor::full([], (step + 1) as f64, float));
        nonfinite_steps += &nonfinite;
        window_examples += t.batch_size * t.grad_accumulation;
        let done = step + 1;
        // The first step too, so the logged curve starts from the starting weights' loss.
        let log_step = done == 1 || done % t.log_every == 0 || done == total_steps;
        let eval_step = recipe.eval.as_ref().is_some_and(|e| done % e.every == 0 || done == total_steps);
        let checkpoint_step = t.checkpoint_every.is_some_and(|n| done % n == 0) || done == total_steps;
        if log_step || eval_step || checkpoint_step {
            // Here the host waits for the device: before anything is logged or saved.
            let bad = nonfinite_steps.double_value(&[]) as u64;
            if bad > reported_nonfinite {
                let first = first_nonfinite.double_value(&[]) as u64;
                if t.on_nonfinite == OnNonFinite::Stop {
                    bail!("step {first}: non-finite loss or gradient norm; its update was skipped, so the weights are as before it, and the run stopped (train.on_nonfinite = \"skip\" goes on past such steps)");
                }
                eprintln!("launch: {bad} step(s) with a non-finite loss or gradient norm so far (the first: step {first}); their updates were skipped");
                reported_nonfinite = bad;
            }
        }
        if log_step {
            let value = loss_sum.double_value(&[]);
            let grad_norm = grad_norm.double_value(&[]);
            let lr = t.lr * schedule.factor(step);
            let skipped = group.sum_scalars(&[skipped_records as f64])?[0] as u64;
            losses.push(value);
            let rate = window_examples as f64 / window_start.elapsed().as_secs_f64();
            if let Some(log) = log.as_mut() {
                let line = serde_json::json!({"step": done, "loss": value, "lr": lr, "grad_norm": grad_norm,
                    "examples_per_s": rate, "skipped_records": skipped, "skipped_steps": reported_nonfinite});
                log.write(line, done, &[("train/loss", value), ("train/lr", lr), ("train/grad_norm", grad_norm)])?;
                if interactive {
                    bar.set_message(format!("loss {value:.4} | {rate:.1} ex/s"));
                } else {
                    eprintln!("step {done}/{total_steps} loss {value:.4} lr {lr:.3e} grad_norm {grad_norm:.3} {rate:.1} ex/s");
                }
            }
            (window_start, window_examples) = (Instant::now(), 0);
        }
        if eval_step {
            bar.suspend(|| log_eval(done, &model, group, log.as_mut()))?;
        }
        bar.set_position(done);
        if checkpoint_step && main {
            let state = TrainerState { step: done, position: position.clone(), seed: recipe.seed };
            last_checkpoint = save_checkpoint(out, done, &model, &adam, &recipe.data.tokenizer, &state, kind)?;
            if let Some(keep) = t.keep_checkpoints {
                prune_checkpoints(out, keep)?;
            }
        }
    }
    bar.finish_and_clear();
    if last_checkpoint.as_os_str().is_empty() {
        last_checkpoint = latest_checkpoint(out)?.unwrap_or_default();
    }
    Ok(TrainSummary { losses, checkpoint: last_checkpoint })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stage_one_parts_load_from_siglip_and_gemma_checkpoints() {
        let config = PaliGemmaConfig::tiny(40, 39, 32).unwrap();
        tch::manual_seed(1);
        let source = PaliGemma::new(config.clone(), &mut Weights::random(Device::Cpu, Kind::Float), RunOptions::default()).unwrap();
        let dir = std::env::temp_dir().join(format!("pg2-parts-{}", std::process::id()));
        // transformers' names: SiglipModel has a text tower too; Gemma 2's vocabulary is shorter.
        let mut vision = vec![("text_model.final_layer_norm.weight".to_string(), Tensor::ones([4], (Kind::Float, Device::Cpu)))];
        let mut text = vec![];
        for (name, t) in source.parameters() {
            if let Some(rest) = name.strip_prefix("vision_tower.") {
                vision.push((rest.to_string(), t));
            } else if let Some(rest) = name.strip_prefix("language_model.") {
                let t = if rest.ends_with("embed_tokens.weight") { t.narrow(0, 0, 30) } else { t };
                text.push((rest.to_string(), t));
            }
        }
        for (folder, tensors) in [("siglip", &vision), ("gemma", &text)] {
            std::fs::create_dir_all(dir.join(folder)).unwrap();
            checkpoint::write_file(&dir.join(folder).join("model.safetensors"), tensors, Kind::Float).unwrap();
        }
        tch::manual_seed(2);
        let model = PaliGemma::new(config, &mut Weights::random(Device::Cpu, Kind::Float), RunOptions::default()).unwrap();
        load_part(&model, &dir.join("siglip"), Part::Vision).unwrap();
        load_part(&model, &dir.join("gemma"), Part::Text).unwrap();
        for ((name, got), (_, want)) in model.parameters().iter().zip(source.parameters()) {
            if name.ends_with("embed_tokens.weight") {
                assert!(got.narrow(0, 0, 30).equal(&want.narrow(0, 0, 30)));
                assert!(!got.narrow(0, 30, 10).equal(&want.narrow(0, 30, 10)), "rows past Gemma's vocabulary stay fresh");
            } else if name.starts_with("multi_modal_projector") {
                assert_eq!(got.abs().sum(Kind::Float).double_value(&[]), 0.0, "the projector starts at zero");
            } else {
                assert!(got.equal(&want), "{name}");
            }
        }
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn label_smoothing_spreads_mass_over_the_other_tokens() {
        let probs = [0.7f64, 0.2, 0.1];
        let log_probs = Tensor::from_slice(&probs.map(|p| p.ln() as f32)).view([1, 3]);
        let target = Tensor::from_slice(&[0i64]);
        let plain = smoothed_nll(&log_probs, &target, 0.0).double_value(&[0]);
        assert!((plain + 0.7f64.ln()).abs() < 1e-6);
        // s = 0.3: 0.7 on the target, 0.15 on each of the two others.
        let want = -(0.7 * 0.7f64.ln() + 0.15 * 0.2f64.ln() + 0.15 * 0.1f64.ln());
        assert!((smoothed_nll(&log_probs, &target, 0.3).double_value(&[0]) - want).abs() < 1e-6);
    }
}
