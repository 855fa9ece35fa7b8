//! The training step: [`Trainer`] holds the model, the optimizer and the schedule, and
//! [`Trainer::step`] makes one update from its micro-batches, as `launch` runs it and as
//! `pg2 bench train` times it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use anyhow::{bail, Context, Result};
use pg2_data::{Batch, PgTokenizer};
use pg2_dist::Group;
use pg2_model::{checkpoint, Layer, LayerParams, Lora, PaliGemma, ParamKind, Part, RunOptions, Weights};
use pg2_optim::{AdamConfig, ParamGroup, Schedule};
use tch::{Device, Kind, Tensor};

use crate::recipe::{Init, LossNormalization, OnNonFinite, Recipe};
use crate::run_dir::checkpoint_dir;
use crate::update::{Trainable, Update};

/// How the recipe runs the model while training.
pub fn training_options(recipe: &Recipe) -> RunOptions {
    RunOptions {
        soft_caps: recipe.model.soft_caps,
        recompute: recipe.model.activation_checkpointing,
        lean_attention: recipe.model.lean_attention,
        ..RunOptions::default()
    }
}

/// The model folder `dir` at the recipe's resolution and dtype, run with `options`; an error
/// unless the recipe's tokenizer `tok` fits it. An adapter folder (a LoRA run's checkpoint)
/// is put on the recipe's `model.init`, the base it was trained on.
pub fn load_model(
    recipe: &Recipe,
    tok: &PgTokenizer,
    dir: &Path,
    device: Device,
    options: RunOptions,
) -> Result<PaliGemma> {
    if !dir.join(pg2_model::lora::CONFIG_FILE).is_file() {
        return load_with(recipe, tok, dir, None, device, options);
    }
    let Init::Checkpoint(base) = &recipe.model.init else {
        bail!("{}: an adapter folder needs the recipe's model.init to name its base checkpoint", dir.display())
    };
    load_adapted(recipe, tok, &checkpoint_dir(base)?, dir, device, options)
}

/// The model folder `base` with the PEFT adapter folder `adapter` on it, the base held as
/// the recipe's `lora.base_dtype` says; otherwise as [`load_model`] loads a model.
pub fn load_adapted(
    recipe: &Recipe,
    tok: &PgTokenizer,
    base: &Path,
    adapter: &Path,
    device: Device,
    options: RunOptions,
) -> Result<PaliGemma> {
    let lora = Lora::read(adapter)?.on_base(recipe.base_dtype());
    load_with(recipe, tok, base, Some(lora), device, options)
}

/// The model folder `dir` with `lora`'s adapters, as [`load_model`] loads it.
fn load_with(
    recipe: &Recipe,
    tok: &PgTokenizer,
    dir: &Path,
    lora: Option<Lora>,
    device: Device,
    options: RunOptions,
) -> Result<PaliGemma> {
    let (resolution, kind) = (Some(recipe.model.resolution), recipe.model.dtype.kind());
    let model = PaliGemma::load_at(dir, resolution, lora, device, kind, options)?;
    tok.check_fits(&recipe.data.tokenizer, &model.config, &dir.display().to_string())?;
    Ok(model)
}

/// A fresh model of the recipe's preset (from its SigLIP and Gemma 2 checkpoints when it
/// names them), or its starting checkpoint; with fresh adapters when the recipe has `[lora]`.
pub fn build_model(recipe: &Recipe, tok: &PgTokenizer, device: Device) -> Result<PaliGemma> {
    let options = training_options(recipe);
    let kind = recipe.model.dtype.kind();
    let preset = match &recipe.model.init {
        Init::Checkpoint(path) => {
            let dir = checkpoint_dir(path)?;
            eprintln!("launch: starting from {}", dir.display());
            // The adapters' A is drawn at random.
            tch::manual_seed(recipe.seed as i64);
            let lora = recipe.lora().map(|l| Lora::fresh(l).on_base(recipe.base_dtype()));
            return load_with(recipe, tok, &dir, lora, device, options);
        }
        Init::Preset(preset) => preset,
    };
    // A fresh model takes its placeholder id from the tokenizer it is trained with.
    let mut config = preset.config(tok.vocab_size(), tok.image_id, recipe.model.resolution)?;
    config.image_token_id = tok.image_id;
    tok.check_fits(&recipe.data.tokenizer, &config, "the model.init preset")?;
    tch::manual_seed(recipe.seed as i64);
    let model = PaliGemma::new(config, Weights::random(device, kind), options)?;
    match &recipe.model.vision_init {
        Some(dir) => load_part(&model, Path::new(dir), Part::Vision)?,
        // The zero projector suits a pretrained vision tower; one trained from scratch would
        // get no gradient through it at first and learns much more slowly (tiny stage 1:
        // colour questions at 0.25 instead of 0.43 after 400 steps).
        None => tch::no_grad(|| {
            let kernels = model
                .params()
                .iter()
                .filter(|p| Part::of(&p.name) == Some(Part::Projector) && p.kind == ParamKind::Kernel);
            for p in kernels {
                let _ = p.tensor.shallow_clone().normal_(0.0, 0.02);
            }
        }),
    }
    if let Some(dir) = &recipe.model.text_init {
        load_part(&model, Path::new(dir), Part::Decoder)?;
    }
    Ok(model)
}

/// Copies a SigLIP (`Part::Vision`) or Gemma 2 (`Part::Decoder`) checkpoint into that part
/// of `model`. Every parameter of the part must be found with its shape, except that the
/// embedding may be shorter (its first rows are copied, the others drawn from N(0, 0.02))
/// and position embeddings of another grid are resampled. SigLIP's text tower, logit scale and pooling head are passed over.
fn load_part(model: &PaliGemma, dir: &Path, part: Part) -> Result<()> {
    let params: BTreeMap<String, Tensor> = model.parameters().into_iter().collect();
    let (from, to) = match part {
        Part::Vision => ("vision_model.", checkpoint::VISION),
        Part::Decoder => ("model.", checkpoint::TEXT),
        Part::Projector => bail!("the projector has no checkpoint of its own"),
    };
    let mut filled = BTreeSet::new();
    for file in checkpoint::weight_files(dir)? {
        for (name, tensor) in checkpoint::read_file(&file)? {
            let Some(rest) = name.strip_prefix(from) else { continue };
            if part == Part::Vision && rest.starts_with("head.") {
                continue;
            }
            let target = format!("{to}.{rest}");
            let param = params
                .get(&target)
                .with_context(|| format!("{}: `{name}` has no place in the model", file.display()))?;
            let mut value = tensor.to_kind(param.kind()).to_device(param.device());
            if rest == "embeddings.position_embedding.weight" && value.size() != param.size() {
                value = pg2_model::siglip::resample_positions(&value, (param.size()[0] as f64).sqrt().round() as i64);
            }
            tch::no_grad(|| -> Result<()> {
                if rest == "embed_tokens.weight"
                    && value.size()[0] <= param.size()[0]
                    && value.size()[1] == param.size()[1]
                {
                    let (rows, extra) = (value.size()[0], param.size()[0] - value.size()[0]);
                    param.narrow(0, 0, rows).copy_(&value);
                    // Rows past the checkpoint's vocabulary (loc, seg, <image>) start as
                    // big_vision's `extend_rows` makes them.
                    let _ = param.narrow(0, rows, extra).normal_(0.0, 0.02);
                } else if value.size() == param.size() {
                    param.shallow_clone().copy_(&value);
                } else {
                    bail!(
                        "{}: `{name}` has shape {:?}, the model needs {:?}",
                        file.display(),
                        value.size(),
                        param.size()
                    );
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

/// A parameter's optimizer settings: its `lr_mults` multiplier (the longest matching
/// prefix's, else 1), and for kernels its `wd_mults` one (else 0: norms, biases and
/// embeddings are never decayed).
fn param_group(recipe: &Recipe, p: &pg2_model::Param) -> ParamGroup {
    let longest = |mults: &BTreeMap<String, f64>| -> Option<f64> {
        let matching = mults.iter().filter(|(prefix, _)| p.name.starts_with(prefix.as_str()));
        matching.max_by_key(|(prefix, _)| prefix.len()).map(|(_, &m)| m)
    };
    let t = &recipe.train;
    let decay_mult = match p.kind.decays_by_default() {
        true => longest(&t.wd_mults).unwrap_or(0.0),
        false => 0.0,
    };
    ParamGroup { lr_mult: longest(&t.lr_mults).unwrap_or(1.0), decay_mult }
}

/// What [`Trainer::step`] reports. The tensors stay on the device: reading them makes the
/// host wait, which the loop does only at log steps.
pub struct StepStats {
    /// The number of updates made, this one included.
    pub step: u64,
    /// The update's loss, averaged over the ranks.
    pub loss: Tensor,
    /// The global gradient norm before clipping.
    pub grad_norm: Tensor,
    /// The learning rate of this update.
    pub lr: f64,
}

/// The recipe's settings that one step reads.
struct StepSettings {
    accumulation: usize,
    loss_normalization: LossNormalization,
    label_smoothing: f64,
    /// The leading ids that label smoothing spreads over (the tokenizer's text ids).
    text_ids: i64,
    grad_clip: Option<f64>,
    autocast: Option<Kind>,
    dropout: f64,
    /// Whether the adapters have dropout.
    lora_dropout: bool,
    seed: u64,
    lr: f64,
}

/// The model, its optimizer and schedule, and the step count.
pub struct Trainer {
    pub model: PaliGemma,
    /// The gradient reduction and the optimizer, replicated or sharded.
    update: Update,
    schedule: Schedule,
    settings: StepSettings,
    /// Updates made so far.
    step: u64,
    /// Steps whose update was skipped for a non-finite loss or gradient norm, and the first
    /// of them (-1 for none), counted on the device so that no step waits for it.
    nonfinite_steps: Tensor,
    first_nonfinite: Tensor,
    /// How many of them have been reported.
    reported_nonfinite: u64,
}

impl Trainer {
    /// Trains `model` as the recipe says from update `first_step` on: frozen parts (with
    /// adapters, everything but them and the parts LoRA trains in full) get no gradient and no
    /// optimizer state, `lr_mults` and weight decay are set per parameter, and every rank of
    /// `group` starts from rank 0's weights.
    pub fn new(
        mut model: PaliGemma,
        recipe: &Recipe,
        schedule: Schedule,
        first_step: u64,
        text_ids: usize,
        group: &mut Group,
    ) -> Result<Trainer> {
        group.broadcast_from_main(&model.parameters().into_iter().map(|(_, p)| p).collect::<Vec<_>>())?;
        let trains = |p: &pg2_model::Param| match model.lora() {
            Some(lora) => pg2_model::lora::is_saved(lora, p),
            None => Part::of(&p.name).is_none_or(|part| !recipe.model.freeze.contains(&part)),
        };
        let trainable: Vec<&pg2_model::Param> = model.params().iter().filter(|p| trains(p)).collect();
        let t = &recipe.train;
        for p in &trainable {
            let _ = p.tensor.set_requires_grad(true);
        }
        let groups = trainable.iter().map(|p| param_group(recipe, p)).collect();
        let params = trainable.iter().map(|p| (p.name.clone(), p.tensor.shallow_clone())).collect();
        let config = AdamConfig {
            lr: t.lr,
            b2: t.b2,
            weight_decay: t.weight_decay,
            decay: t.weight_decay_mode,
            fused: t.fused_optimizer,
            ..AdamConfig::default()
        };
        let bucket_bytes = (t.allreduce_bucket_mb * 1e6) as usize;
        let update =
            Update::new(Trainable { params, groups }, config, t.sharding, bucket_bytes, t.overlap_reduction, group)?;
        if let Some(layers) = update.layer_shards() {
            model.shard_layers(layers);
        }
        let settings = StepSettings {
            accumulation: t.grad_accumulation,
            loss_normalization: t.loss_normalization,
            label_smoothing: t.label_smoothing,
            text_ids: text_ids as i64,
            grad_clip: Some(t.grad_clip).filter(|&c| c > 0.0),
            autocast: recipe.model.dtype.autocast(),
            dropout: recipe.model.dropout,
            lora_dropout: recipe.lora().is_some_and(|l| l.dropout > 0.0),
            seed: recipe.seed,
            lr: t.lr,
        };
        let float = (Kind::Float, model.device());
        let (nonfinite_steps, first_nonfinite) = (Tensor::zeros([], float), Tensor::full([], -1.0, float));
        Ok(Trainer {
            model,
            update,
            schedule,
            settings,
            step: first_step,
            nonfinite_steps,
            first_nonfinite,
            reported_nonfinite: 0,
        })
    }

    /// Updates made so far.
    pub fn steps_done(&self) -> u64 {
        self.step
    }

    /// The optimizer state this rank saves: its file name in a checkpoint and its tensors
    /// by name (see [`crate::update`]).
    pub fn optimizer_state(&self) -> (String, Vec<(String, Tensor)>) {
        self.update.state()
    }

    /// `f` on the model with every layer's parameters whole: where they are sharded
    /// (`full`), every rank gathers them first (so every rank calls this together) and lets
    /// them go after. For evaluation, which would otherwise gather each layer on every
    /// forward pass, on ranks that decode different numbers of steps.
    pub fn with_whole_model<T>(&self, f: impl FnOnce(&PaliGemma) -> T) -> Result<T> {
        let _whole = self.update.whole_layers()?;
        Ok(f(&self.model))
    }

    /// The weights a checkpoint saves, by name: the parameters themselves, or where the
    /// layers are sharded (`full`) host copies made one gathered layer at a time, so that
    /// the device never holds the whole model (a collective: every rank calls this
    /// together; a rank that does not write passes `keep = false` and gets none).
    pub fn checkpoint_weights(&self, keep: bool) -> Result<Vec<(String, Tensor)>> {
        // With adapters, only they and the parts trained in full are saved.
        let saved = self.model.parameters().into_iter().filter(|(name, _)| self.model.saves(name));
        let Some(shards) = self.update.layer_shards() else { return Ok(saved.collect()) };
        let mut weights = vec![];
        let mut gathered = None;
        for (name, param) in saved {
            let layer = Layer::of(&name);
            if layer != gathered {
                if let Some(done) = gathered {
                    shards.release(done);
                }
                if let Some(next) = layer {
                    shards.gather_layer(next)?;
                }
                gathered = layer;
            }
            if keep {
                // A copy: the parameter's own storage goes when its layer is released.
                weights.push((name, param.detach().to_device(Device::Cpu).copy()));
            }
        }
        if let Some(done) = gathered {
            shards.release(done);
        }
        Ok(weights)
    }

    /// Whether each rank saves optimizer state of its own (sharded training).
    pub fn sharded(&self) -> bool {
        self.update.sharded()
    }

    /// Restores the optimizer from a checkpoint's state, saved by any number of workers,
    /// sharded or not.
    pub fn load_optimizer_state(&mut self, checkpoint: &Path) -> Result<()> {
        self.update.load_state(checkpoint, self.step)
    }

    /// The update's target tokens from this rank's `rank_targets`, summed over the ranks:
    /// a number on the device, summed there, so the host does not wait for the device.
    pub fn update_targets(&self, rank_targets: usize, group: &mut Group) -> Result<Tensor> {
        let targets = Tensor::from(rank_targets as f32).to_device(self.model.device());
        group.all_reduce_sum(&targets)?;
        Ok(targets)
    }

    /// One update from `micro_batches` (the update's share of this rank, on the CPU or the
    /// device), whose whole update across ranks holds `update_targets` target tokens (a
    /// number on the device: see [`Trainer::update_targets`]).
    /// Gradients of the micro-batches add up, are averaged over the ranks, clipped by the
    /// global norm, and the optimizer steps unless the loss or the norm is non-finite (then
    /// the weights stay as they were, decided on the device without waiting for it).
    pub fn step(&mut self, micro_batches: &[&Batch], update_targets: &Tensor, group: &mut Group) -> Result<StepStats> {
        let s = &self.settings;
        if micro_batches.len() != s.accumulation {
            bail!(
                "an update needs {} micro-batches (train.grad_accumulation), got {}",
                s.accumulation,
                micro_batches.len()
            );
        }
        let (device, world) = (self.model.device(), group.world());
        let per_token = s.loss_normalization == LossNormalization::Token;
        if s.dropout > 0.0 || s.lora_dropout {
            // Dropout masks from (seed, step, rank) alone: a resumed run draws the same ones.
            let stream = (s.seed as i64).wrapping_mul(1_000_003).wrapping_add(self.step as i64);
            tch::manual_seed(stream.wrapping_add((group.rank() as i64) << 40));
            self.model.options.dropout = s.dropout;
            self.model.options.lora_dropout = s.lora_dropout;
        }
        // Per token: the summed loss over the whole update's targets (all micro-batches
        // and ranks, as one big batch would; times `world`, for the ranks' gradients are
        // averaged). Per example: each micro-batch's mean, a 1/accumulation share.
        let tokens = per_token.then(|| update_targets.clamp_min(1.0) / world as f64);
        let mut loss_sum = Tensor::zeros([], (Kind::Float, device));
        for (i, batch) in micro_batches.iter().enumerate() {
            let last = i + 1 == micro_batches.len();
            self.update.before_backward(last);
            let batch = batch.to_device(device);
            let forward = || loss(&self.model, &batch, (s.label_smoothing, s.text_ids), tokens.as_ref());
            let loss = match s.autocast {
                Some(kind) => pg2_model::autocast(device, kind, forward),
                None => forward(),
            }?;
            let loss = if per_token { loss } else { loss / s.accumulation as f64 };
            // A non-finite loss still runs backward: its gradients reach every rank, so all
            // of them see a non-finite norm below and skip the update alike.
            loss.backward();
            loss_sum += loss.detach();
            self.update.after_backward(last, group)?;
        }
        // Evaluation and checkpoints see the model without dropout.
        (self.model.options.dropout, self.model.options.lora_dropout) = (0.0, false);
        if world > 1 {
            group.all_reduce_sum(&loss_sum)?;
            loss_sum /= world as f64;
        }
        let grad_norm = self.update.clip(s.grad_clip, group)?;
        let nonfinite =
            loss_sum.isfinite().logical_and(&grad_norm.to_device(device).isfinite()).logical_not().to_kind(Kind::Float);
        let factor = self.schedule.factor(self.step);
        self.update.step(factor, &nonfinite, group)?;
        self.step += 1;
        let first_unset = self.first_nonfinite.ge(0.0).logical_or(&nonfinite.eq(0.0));
        self.first_nonfinite =
            self.first_nonfinite.where_self(&first_unset, &Tensor::full([], self.step as f64, (Kind::Float, device)));
        self.nonfinite_steps += &nonfinite;
        Ok(StepStats { step: self.step, loss: loss_sum, grad_norm, lr: s.lr * factor })
    }

    /// The number of updates skipped so far for a non-finite loss or gradient norm (the
    /// host waits for the device here). With `policy` stop, the first such step ends the
    /// run with an error naming it; with skip, each new one is reported once.
    pub fn check_nonfinite(&mut self, policy: OnNonFinite) -> Result<u64> {
        let bad = self.nonfinite_steps.double_value(&[]) as u64;
        if bad > self.reported_nonfinite {
            let first = self.first_nonfinite.double_value(&[]) as u64;
            if policy == OnNonFinite::Stop {
                bail!("step {first}: non-finite loss or gradient norm; its update was skipped, so the weights are as before it, and the run stopped (train.on_nonfinite = \"skip\" goes on past such steps)");
            }
            eprintln!("launch: {bad} step(s) with a non-finite loss or gradient norm so far (the first: step {first}); their updates were skipped");
            self.reported_nonfinite = bad;
        }
        Ok(self.reported_nonfinite)
    }
}

/// The training loss. Per example (big_vision): each example's summed target NLL over its
/// own target count, averaged over the batch; per token (transformers): the summed NLL
/// over `per_token` tokens (the whole update's target count over the number of workers, so
/// that averaging their gradients divides by all the update's targets). With
/// label smoothing `s` the target keeps `1 - s` and every other text id gets `s / (V - 1)`.
fn loss(model: &PaliGemma, batch: &Batch, smoothing: (f64, i64), per_token: Option<&Tensor>) -> Result<Tensor> {
    let targets = model.target_distributions(&batch.inputs, &batch.loss_mask)?;
    let nll = smoothed_nll(&targets.log_probs, &targets.targets, smoothing.0, smoothing.1);
    if let Some(tokens) = per_token {
        return Ok(nll.sum(Kind::Float) / tokens);
    }
    let b = batch.inputs.ids.size()[0];
    let t = batch.inputs.ids.size()[1];
    let counts = batch.loss_mask.narrow(1, 1, t - 1).sum_dim_intlist(1, false, Kind::Float);
    let sums = Tensor::zeros([b], (Kind::Float, nll.device())).index_add(0, &targets.example, &nll);
    Ok((sums / counts.clamp_min(1.0)).mean(Kind::Float))
}

/// Per-token cross-entropy against the target smoothed by `s`: `(1 - s)` on the target,
/// `s / (V - 1)` on each other of the first `V = text_ids` ids (big_vision's label
/// smoothing over its text vocabulary; embedding rows past the tokenizer get none).
fn smoothed_nll(log_probs: &Tensor, targets: &Tensor, s: f64, text_ids: i64) -> Tensor {
    let picked = log_probs.gather(1, &targets.unsqueeze(1), false).squeeze_dim(1);
    if s == 0.0 {
        return -picked;
    }
    let vocab = text_ids.min(log_probs.size()[1]);
    let others = log_probs.narrow(1, 0, vocab).sum_dim_intlist(1, false, Kind::Float) - &picked;
    -(picked * (1.0 - s) + others * (s / (vocab as f64 - 1.0)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use pg2_model::PaliGemmaConfig;

    #[test]
    fn stage_one_parts_load_from_siglip_and_gemma_checkpoints() {
        let config = PaliGemmaConfig::tiny(40, 39, 32).unwrap();
        tch::manual_seed(1);
        let source =
            PaliGemma::new(config.clone(), Weights::random(Device::Cpu, Kind::Float), RunOptions::default()).unwrap();
        let dir = std::env::temp_dir().join(format!("pg2-parts-{}", std::process::id()));
        // transformers' names: SiglipModel has a text tower too; Gemma 2's vocabulary is shorter.
        let mut vision =
            vec![("text_model.final_layer_norm.weight".to_string(), Tensor::ones([4], (Kind::Float, Device::Cpu)))];
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
        let model = PaliGemma::new(config, Weights::random(Device::Cpu, Kind::Float), RunOptions::default()).unwrap();
        load_part(&model, &dir.join("siglip"), Part::Vision).unwrap();
        load_part(&model, &dir.join("gemma"), Part::Decoder).unwrap();
        assert_eq!(model.parameters().len(), source.parameters().len());
        for ((name, got), (_, want)) in model.parameters().iter().zip(source.parameters()) {
            if name.ends_with("embed_tokens.weight") {
                assert!(got.narrow(0, 0, 30).equal(&want.narrow(0, 0, 30)));
                assert!(
                    !got.narrow(0, 30, 10).equal(&want.narrow(0, 30, 10)),
                    "rows past Gemma's vocabulary are drawn afresh"
                );
            } else if name.starts_with("multi_modal_projector") {
                assert_eq!(got.abs().sum(Kind::Float).double_value(&[]), 0.0, "the projector starts at zero");
            } else {
                assert!(got.equal(&want), "{name}");
            }
        }
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn rows_past_gemma_s_vocabulary_start_as_big_vision_s_extend_rows() {
        // The tiny model's own embedding init is N(0, 128^-0.5 = 0.088); big_vision's rows
        // past the checkpoint are N(0, 0.02).
        let config = PaliGemmaConfig::tiny(1040, 1039, 32).unwrap();
        tch::manual_seed(3);
        let model = PaliGemma::new(config, Weights::random(Device::Cpu, Kind::Float), RunOptions::default()).unwrap();
        let text: Vec<(String, Tensor)> = model
            .parameters()
            .into_iter()
            .filter_map(|(name, t)| {
                let rest = name.strip_prefix("language_model.")?.to_string();
                let t = if rest.ends_with("embed_tokens.weight") { t.narrow(0, 0, 40) } else { t };
                Some((rest, t))
            })
            .collect();
        let dir = std::env::temp_dir().join(format!("pg2-extend-rows-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        checkpoint::write_file(&dir.join("model.safetensors"), &text, Kind::Float).unwrap();
        tch::manual_seed(4);
        load_part(&model, &dir, Part::Decoder).unwrap();
        std::fs::remove_dir_all(dir).unwrap();
        let (_, embed) = model.parameters().into_iter().find(|(n, _)| n.ends_with("embed_tokens.weight")).unwrap();
        let new = embed.narrow(0, 40, 1000);
        let (std, mean) = (new.std(true).double_value(&[]), new.mean(Kind::Float).double_value(&[]));
        assert!((std - 0.02).abs() < 5e-4 && mean.abs() < 5e-4, "128,000 new values: std {std}, mean {mean}");
    }

    #[test]
    fn weight_decay_falls_on_vision_and_projector_kernels_as_big_vision_s_mask() {
        let recipe_text = "[model]\ninit = \"tiny\"\nresolution = 32\n[data]\ntokenizer = \"t.json\"\n\
                           mixture = [{ path = \"d.jsonl\", weight = 1.0 }]\n[train]\nsteps = 1\nbatch_size = 1\nlr = 1e-3\n";
        let recipe: Recipe = toml::from_str(recipe_text).unwrap();
        let config = PaliGemmaConfig::tiny(40, 39, 32).unwrap();
        let model = PaliGemma::new(config, Weights::random(Device::Cpu, Kind::Float), RunOptions::default()).unwrap();
        let decay_in = |recipe: &Recipe, name: &str| {
            let p = model.params().iter().find(|p| p.name == name).unwrap_or_else(|| panic!("{name}"));
            param_group(recipe, p).decay_mult
        };
        let decay = |name: &str| decay_in(&recipe, name);
        let vision = "vision_tower.vision_model";
        assert_eq!(decay(&format!("{vision}.embeddings.patch_embedding.weight")), 1.0);
        assert_eq!(decay(&format!("{vision}.encoder.layers.0.mlp.fc1.weight")), 1.0);
        assert_eq!(decay("multi_modal_projector.linear.weight"), 1.0);
        // big_vision never decays the LLM (its parameters are not named `kernel`), nor biases,
        // norms, embeddings and position embeddings.
        assert_eq!(decay("language_model.model.layers.0.mlp.gate_proj.weight"), 0.0);
        assert_eq!(decay("language_model.model.layers.0.self_attn.q_proj.weight"), 0.0);
        assert_eq!(decay(&format!("{vision}.encoder.layers.0.mlp.fc1.bias")), 0.0);
        assert_eq!(decay(&format!("{vision}.embeddings.position_embedding.weight")), 0.0);
        assert_eq!(decay("language_model.model.embed_tokens.weight"), 0.0);
        // A recipe's multipliers: the longest prefix wins.
        let mut own = recipe.clone();
        own.train.wd_mults = [("language_model.".to_string(), 0.5), ("vision_tower.".to_string(), 0.0)].into();
        assert_eq!(decay_in(&own, "language_model.model.layers.0.mlp.gate_proj.weight"), 0.5);
        assert_eq!(decay_in(&own, &format!("{vision}.encoder.layers.0.mlp.fc1.weight")), 0.0);
        assert_eq!(decay_in(&own, "multi_modal_projector.linear.weight"), 0.0);
        assert_eq!(decay_in(&own, "language_model.model.norm.weight"), 0.0);
    }

    /// With `[lora]` the base is frozen: only the adapters and the parts `lora.train` names
    /// take gradients, and only they move; on an int8 base (`lora.base_dtype`) as well,
    /// every decoder layer's adapters included, whose gradients pass through the int8 layers
    /// above them.
    #[test]
    fn with_lora_only_the_adapters_and_the_named_parts_train() {
        let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/paligemma");
        for base in ["model", "int8"] {
            let text = format!(
                "[model]\ninit = {:?}\nresolution = 28\nsoft_caps = false\n[data]\ntokenizer = {:?}\n\
                 mixture = [{{ path = \"d.jsonl\", weight = 1.0 }}]\n[train]\nsteps = 2\nbatch_size = 1\nlr = 1e-2\n\
                 [lora]\nrank = 2\ntrain = [\"projector\"]\nbase_dtype = \"{base}\"\n",
                fixtures.join("released"),
                fixtures.join("tokenizer.json")
            );
            let recipe: Recipe = toml::from_str(&text).unwrap();
            let tok = PgTokenizer::from_file(&recipe.data.tokenizer).unwrap();
            let model = build_model(&recipe, &tok, Device::Cpu).unwrap();
            let decoder_kernels = model.params().iter().filter(|p| p.name.ends_with("_proj.weight")).count();
            let vision_kernels = 4 * model.config.vision.num_hidden_layers;
            assert_eq!(decoder_kernels - vision_kernels, if base == "int8" { 0 } else { 7 * model.num_layers() });
            let before: Vec<(String, Tensor)> = model.parameters().into_iter().map(|(n, t)| (n, t.copy())).collect();
            let schedule = Schedule { warmup_steps: 0, total_steps: 2, shape: Default::default() };
            let mut group = Group::single();
            let mut trainer = Trainer::new(model, &recipe, schedule, 0, tok.text_ids(), &mut group).unwrap();
            let trains = |name: &str| name.contains(".lora_") || name.starts_with("multi_modal_projector.");
            for p in trainer.model.params() {
                assert_eq!(p.tensor.requires_grad(), trains(&p.name), "{}", p.name);
            }
            let n_image = trainer.model.config.vision.num_patches();
            let example = pg2_data::EncodedExample::new(&tok, n_image, "caption en", Some("a red circle"));
            let pixels = Tensor::rand([1, 3, 28, 28], (Kind::Float, Device::Cpu)) * 2.0 - 1.0;
            let batch = Batch::collate(&[example], Some(pixels), tok.pad_id, Device::Cpu);
            let targets = batch.loss_mask.sum(Kind::Float);
            for _ in 0..2 {
                trainer.step(&[&batch], &targets, &mut group).unwrap();
            }
            for ((name, old), (_, new)) in before.iter().zip(trainer.model.parameters()) {
                assert_eq!(!old.equal(&new), trains(name), "{base}: {name}: only the trained parameters move");
            }
        }
    }

    #[test]
    fn label_smoothing_spreads_mass_over_the_other_tokens() {
        let probs = [0.7f64, 0.2, 0.1];
        let log_probs = Tensor::from_slice(&probs.map(|p| p.ln() as f32)).view([1, 3]);
        let target = Tensor::from_slice(&[0i64]);
        let plain = smoothed_nll(&log_probs, &target, 0.0, 3).double_value(&[0]);
        assert!((plain + 0.7f64.ln()).abs() < 1e-6);
        // s = 0.3: 0.7 on the target, 0.15 on each of the two others.
        let want = -(0.7 * 0.7f64.ln() + 0.15 * 0.2f64.ln() + 0.15 * 0.1f64.ln());
        assert!((smoothed_nll(&log_probs, &target, 0.3, 3).double_value(&[0]) - want).abs() < 1e-6);
        // A fourth embedding row past the tokenizer's ids (the released checkpoints pad the
        // table to a multiple of 64) gets no share.
        let padded = Tensor::cat(&[log_probs, Tensor::from_slice(&[-20.0f32]).view([1, 1])], 1);
        assert!((smoothed_nll(&padded, &target, 0.3, 3).double_value(&[0]) - want).abs() < 1e-6);
    }
}
