//! `pg2 plan`: what one training step needs of each GPU's memory (weights, gradients,
//! optimizer state, activations) under each `train.sharding`, with and without activation
//! checkpointing and lean attention, the communication each moves, and the cheapest
//! setting that fits. `--measure` runs the step on the CPU and prints the measured peak
//! beside the estimate (the tiny and small benchmark shapes fit there).
//!
//! The activation figures count what the autograd graph keeps for backward, layer by layer,
//! as pg2's model computes it (see [`activation_bytes`]); the allocator's own slack and
//! libtorch's workspaces come on top, which is why a setting must leave a tenth of the GPU
//! free to count as fitting.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use pg2_model::{BaseDtype, Layer, Lora, LoraConfig, PaliGemmaConfig, Part};
use pg2_train::recipe::{Dtype, Init, Preset, Sharding};
use pg2_train::Recipe;

#[derive(Args)]
pub struct PlanArgs {
    /// A recipe: its model, dtype, frozen parts, micro-batch (`train.batch_size`, split over
    /// `--gpus`), accumulation, text lengths and options. Otherwise `--size` and the flags
    /// below.
    #[arg(long)]
    pub recipe: Option<PathBuf>,
    /// `key=value` overrides of the recipe, as `launch --set`.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub sets: Vec<String>,
    /// PaliGemma 2 size in billions (3, 10 or 28; 3 by default); with `--recipe`, plans
    /// the recipe at that size without reading its starting checkpoint (a LoRA recipe
    /// must name one, so `--set model.init=...` cannot stand in for it).
    #[arg(long)]
    pub size: Option<u32>,
    /// Image side in pixels (224, 448, 896), without `--recipe`.
    #[arg(long, default_value_t = 224)]
    pub resolution: usize,
    /// Examples each GPU runs at once (one micro-batch), without `--recipe`.
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Text tokens of an example (prompt and target), without `--recipe`.
    #[arg(long, default_value_t = 128)]
    pub text_tokens: usize,
    /// Target tokens of an example (the rows the loss reads), without `--recipe`.
    #[arg(long, default_value_t = 64)]
    pub target_tokens: usize,
    /// Weights in `bf16` or `f32`, without `--recipe`.
    #[arg(long, default_value = "bf16", value_parser = ["bf16", "f32"])]
    pub dtype: String,
    /// Attention and final-logit soft caps on (stages 1 and 2; transfer turns them off),
    /// without `--recipe`.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub soft_caps: bool,
    /// LoRA settings, without `--recipe`; with `--measure`, the step measured is this LoRA step.
    #[command(flatten)]
    pub lora: LoraArgs,
    /// Data-parallel workers (one per GPU).
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..))]
    pub gpus: u64,
    /// Memory of one GPU in GB (H100: 80, H200: 141).
    #[arg(long, default_value_t = 80.0)]
    pub gpu_memory: f64,
    /// Instead: run one training step of the `tiny` or `small` benchmark shape on the CPU
    /// (batch 8, f32, soft caps on) for each way of keeping activations, and print the
    /// measured peak memory beside the estimate.
    #[arg(long, value_enum)]
    pub measure: Option<crate::bench::Shape>,
    /// Set in the re-executed process that measures one way of keeping activations.
    #[arg(long, hide = true, value_enum)]
    pub measure_keep: Option<Keep>,
}

/// A LoRA step on the command line (`pg2 plan`, `pg2 bench model`).
#[derive(Args, Clone)]
pub struct LoraArgs {
    /// LoRA: the rank of adapters on the decoder's attention and MLP projections (the
    /// projector trained in full, as the LoRA recipes do); 0: a full fine-tune.
    #[arg(long, default_value_t = 0)]
    pub lora_rank: usize,
    /// How a LoRA step holds its frozen base (`lora.base_dtype`): `model` (the weights'
    /// dtype) or `int8`.
    #[arg(long, default_value = "model", value_parser = ["model", "int8"])]
    pub base_dtype: String,
}

impl LoraArgs {
    /// The LoRA settings, if any.
    pub fn lora(&self) -> Option<(LoraConfig, BaseDtype)> {
        let config = LoraConfig {
            rank: self.lora_rank,
            alpha: self.lora_rank as f64,
            dropout: 0.0,
            targets: LoraConfig::default_targets(),
            trained: vec![Part::Projector],
        };
        let base = if self.base_dtype == "int8" { BaseDtype::Int8 } else { BaseDtype::Model };
        (self.lora_rank > 0).then_some((config, base))
    }
}

/// One training step's shape, as the memory model reads it.
#[derive(Debug, Clone, PartialEq)]
pub struct StepShape {
    pub config: PaliGemmaConfig,
    /// Parameters, and those trained (not frozen).
    pub params: i64,
    pub trained: i64,
    /// The parts frozen.
    pub frozen: Vec<Part>,
    /// Bytes of a weight and of an activation.
    pub weight_bytes: usize,
    pub activation_bytes: usize,
    /// Examples per GPU per micro-batch, text and target tokens of each.
    pub batch: usize,
    pub text_tokens: usize,
    pub target_tokens: usize,
    pub soft_caps: bool,
    pub gpus: usize,
    pub accumulation: usize,
    /// Whether layers may be recomputed: not with dropout (`model.dropout`, `lora.dropout`),
    /// whose masks the recompute would draw again.
    pub recompute: bool,
    /// A LoRA step's adapters and int8 base ([`StepShape::with_lora`]); `None`: the
    /// parameters of the parts not frozen train.
    pub lora: Option<LoraShape>,
}

/// What LoRA changes in a step: few parameters train, and an int8 base takes less room.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraShape {
    /// Adapter parameters (counted in `params` and `trained`).
    pub adapters: i64,
    /// Trained parameters inside the layers (sharded by `full`), and those of the largest layer.
    pub in_layers: i64,
    pub largest_layer: i64,
    /// Base weights held in int8 (counted in `params`), and their output channels (an f32
    /// scale each).
    pub int8_params: i64,
    pub int8_channels: i64,
}

/// How the activations are kept for backward.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Keep {
    /// Everything the graph saves (`activation_checkpointing = false`).
    All,
    /// The soft-capped attention's scores recomputed (`lean_attention = true`).
    Lean,
    /// Each layer's input only, the layer recomputed (`activation_checkpointing = true`).
    Checkpointed,
}

impl Keep {
    const ALL: [Keep; 3] = [Keep::All, Keep::Lean, Keep::Checkpointed];

    fn describe(self) -> &'static str {
        match self {
            Keep::All => "activation_checkpointing = false",
            Keep::Lean => "lean_attention = true",
            Keep::Checkpointed => "activation_checkpointing = true",
        }
    }
}

/// Per-GPU bytes of the model state under one sharding mode, and bytes sent per step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StateBytes {
    pub weights: f64,
    pub gradients: f64,
    pub optimizer: f64,
    pub sent: f64,
}

impl StepShape {
    fn from_args(args: &PlanArgs) -> Result<StepShape> {
        let Some(path) = &args.recipe else {
            let config = PaliGemmaConfig::paligemma2(args.size.unwrap_or(3), args.resolution)?;
            let params = config.parameter_counts().iter().map(|c| c.1).sum();
            let bytes = if args.dtype == "bf16" { 2 } else { 4 };
            return Ok(StepShape {
                config,
                params,
                trained: params,
                frozen: vec![],
                weight_bytes: bytes,
                activation_bytes: bytes,
                batch: args.batch,
                text_tokens: args.text_tokens,
                target_tokens: args.target_tokens,
                soft_caps: args.soft_caps,
                gpus: args.gpus as usize,
                accumulation: 1,
                recompute: true,
                lora: None,
            }
            .with_lora_of(args.lora.lora()));
        };
        // Planning reads no data: `$DATA` sources need a root only to resolve.
        let sets: Vec<String> =
            std::iter::once("data.root=\"/\"".to_string()).chain(args.sets.iter().cloned()).collect();
        let (recipe, _) = Recipe::load(path, &sets)?;
        let m = &recipe.model;
        let config = match (&m.init, args.size) {
            (_, Some(size)) => PaliGemmaConfig::paligemma2(size, m.resolution)?,
            (Init::Preset(preset), None) => {
                // The tiny model's vocabulary is its tokenizer's; the released sizes have their own.
                let vocab = match preset {
                    Preset::Tiny => pg2_data::PgTokenizer::from_file(&recipe.data.tokenizer)?.vocab_size(),
                    Preset::PaliGemma2(_) => 0,
                };
                preset.config(vocab, vocab as i64 - 1, m.resolution)?
            }
            (Init::Checkpoint(dir), None) => {
                let dir = pg2_train::checkpoint_dir(dir).context(
                    "pg2 plan reads the starting checkpoint's config.json: download it, or plan the recipe at a \
                     size, e.g. --size 3",
                )?;
                let mut config = PaliGemmaConfig::from_file(&dir.join("config.json"))?;
                config.vision.image_size = m.resolution;
                config
            }
        };
        let counts = config.parameter_counts();
        let params = counts.iter().map(|c| c.1).sum();
        let trained = counts.iter().filter(|(part, _)| !m.freeze.contains(part)).map(|c| c.1).sum();
        let t = &recipe.train;
        let gpus = args.gpus as usize;
        // `batch_size` is one micro-batch of the whole group (an update makes
        // `grad_accumulation` of them).
        if !t.batch_size.is_multiple_of(gpus) {
            bail!("train.batch_size = {} does not split evenly over {gpus} GPUs", t.batch_size);
        }
        // The longest text and target any source may give (its own limits, else the
        // data's): `text_len + 1` tokens under one budget, whose target leaves the prompt
        // at least its "\n"; `<bos>`, prompt, `\n`, target and `<eos>` under the caps.
        let d = &recipe.data;
        let bounds = d
            .mixture
            .iter()
            .map(|s| {
                let l = d.limits(s);
                let caps = l.max_prefix_tokens.zip(l.max_suffix_tokens).map(|(p, s)| p + s + 3);
                let text = [caps, l.text_len.map(|t| t + 1)].into_iter().flatten().min();
                let target =
                    [l.max_suffix_tokens.map(|s| s + 1), l.text_len.map(|t| t - 1)].into_iter().flatten().min();
                text.zip(target)
            })
            .collect::<Option<Vec<(usize, usize)>>>()
            .with_context(|| {
                format!(
                    "{}: a source has neither data.text_len nor data.max_prefix_tokens and max_suffix_tokens, so a \
                     text's length is open; set data.text_len",
                    path.display()
                )
            })?;
        let longest = |pick: fn(&(usize, usize)) -> usize| bounds.iter().map(pick).max().unwrap_or(0);
        Ok(StepShape {
            config,
            params,
            trained,
            frozen: m.freeze.clone(),
            weight_bytes: if m.dtype == Dtype::Bf16 { 2 } else { 4 },
            activation_bytes: if m.dtype == Dtype::F32 { 4 } else { 2 },
            batch: t.batch_size / gpus,
            text_tokens: longest(|b| b.0),
            target_tokens: longest(|b| b.1),
            soft_caps: m.soft_caps,
            gpus,
            accumulation: t.grad_accumulation,
            recompute: m.dropout == 0.0 && recipe.lora().is_none_or(|l| l.dropout == 0.0),
            lora: None,
        }
        .with_lora_of(recipe.lora().map(|l| (l, recipe.base_dtype()))))
    }

    /// [`StepShape::with_lora`] when there are LoRA settings.
    fn with_lora_of(self, lora: Option<(LoraConfig, BaseDtype)>) -> StepShape {
        match lora {
            Some((config, base)) => self.with_lora(&config, base),
            None => self,
        }
    }

    /// The same step training LoRA adapters as `config` says on a base held as `base`:
    /// `rank * (in + out)` adapter parameters per targeted linear layer join the parameters
    /// and, with the parts trained in full, are all that trains (gradients, f32 master
    /// weights and moments for them alone); an int8 base holds its decoder layers' linear
    /// weights in a byte each plus an f32 scale per output channel. Activations are
    /// counted as for a full fine-tune (the adapters' own are rank-sized; dropout on their
    /// inputs would add copies of them, which are not counted).
    pub fn with_lora(mut self, config: &LoraConfig, base: BaseDtype) -> StepShape {
        let lora = Lora::fresh(config.clone()).on_base(base);
        let (counts, [vision_layer, decoder_layer]) = (self.config.parameter_counts(), self.config.layer_sizes());
        let mut by_layer: BTreeMap<Layer, i64> = BTreeMap::new();
        let (mut adapters, mut int8_params, mut int8_channels) = (0, 0, 0);
        for (name, i, o) in self.config.linear_layers() {
            let (i, o) = (i as i64, o as i64);
            if config.targets(&name) {
                let size = config.rank as i64 * (i + o);
                adapters += size;
                if let Some(layer) = Layer::of(&name) {
                    *by_layer.entry(layer).or_default() += size;
                }
            }
            if lora.quantizes(&name) {
                (int8_params, int8_channels) = (int8_params + i * o, int8_channels + o);
            }
        }
        let (v, t) = (&self.config.vision, &self.config.text);
        for (part, layers, size) in
            [(Part::Vision, v.num_hidden_layers, vision_layer), (Part::Decoder, t.num_hidden_layers, decoder_layer)]
        {
            if config.trained.contains(&part) {
                let make = if part == Part::Vision { Layer::Vision } else { Layer::Text };
                (0..layers).for_each(|i| *by_layer.entry(make(i)).or_default() += size);
            }
        }
        let full: i64 = counts.iter().filter(|(part, _)| config.trained.contains(part)).map(|c| c.1).sum();
        self.params += adapters;
        self.trained = adapters + full;
        self.frozen = Part::ALL.into_iter().filter(|p| !config.trained.contains(p)).collect();
        self.lora = Some(LoraShape {
            adapters,
            in_layers: by_layer.values().sum(),
            largest_layer: by_layer.values().copied().max().unwrap_or(0),
            int8_params,
            int8_channels,
        });
        self
    }

    /// Bytes of the weights: each in the weights' dtype, but an int8 base's.
    fn weight_bytes_total(&self) -> f64 {
        let int8 = self
            .lora
            .as_ref()
            .map_or(0.0, |l| l.int8_params as f64 * (self.weight_bytes as f64 - 1.0) - l.int8_channels as f64 * 4.0);
        self.params as f64 * self.weight_bytes as f64 - int8
    }

    /// The model state per GPU under `sharding` at its peak (the end of a backward pass),
    /// and the bytes each GPU sends per step (ring collectives: an all-reduce sends twice
    /// the data, a reduce-scatter or an all-gather once, less one share).
    ///
    /// Replicated: the weights, their gradients, Adam's two f32 moments and, for weights in
    /// a lower precision, f32 master weights. Sharded, each GPU keeps an f32 share of the
    /// master weights, moments and averaged gradient (16 bytes a parameter over N). ZeRO-1
    /// accumulates the whole gradient; ZeRO-2 reduce-scatters each bucket as backward
    /// produces it (`train.overlap_reduction`), so that only the gradients whose bucket has
    /// not gone yet live: about a layer's, and the embedding's (its tied head's gradient
    /// comes first, its bucket goes last). `full` keeps the trained layers' weights as
    /// shares too, with two layers gathered at a time (the one running, the next on its
    /// way; the embeddings, norms and projector stay whole), and gathers each layer twice per micro-batch: for its forward pass and
    /// for its recompute in backward.
    pub fn state(&self, sharding: Sharding) -> StateBytes {
        let (n, trained) = (self.gpus as f64, self.trained as f64);
        let w = self.weight_bytes as f64;
        let (c, [vision_layer, decoder_layer]) = (&self.config, self.config.layer_sizes());
        let largest_layer = vision_layer.max(decoder_layer) as f64;
        let in_backward = ((c.text.vocab_size * c.text.hidden_size) as f64 + largest_layer).min(trained) * w;
        let ring = (n - 1.0) / n;
        let reduce_scatter = ring * trained * w;
        let all_gather = ring * trained * w;
        let weights = self.weight_bytes_total();
        let shares = StateBytes {
            weights,
            gradients: trained * w + trained * 4.0 / n,
            optimizer: trained * 12.0 / n,
            sent: reduce_scatter + all_gather,
        };
        match sharding {
            Sharding::None => StateBytes {
                weights,
                gradients: trained * w,
                optimizer: trained * if self.weight_bytes == 4 { 8.0 } else { 12.0 },
                sent: 2.0 * ring * trained * w,
            },
            Sharding::Optimizer => shares,
            Sharding::Gradients => StateBytes {
                gradients: in_backward + trained * 4.0 / n,
                sent: reduce_scatter * self.accumulation as f64 + all_gather,
                ..shares
            },
            Sharding::Full => {
                let trained_layers = |part: Part, layers: usize, size: i64| match self.frozen.contains(&part) {
                    true => 0.0,
                    false => (layers as i64 * size) as f64,
                };
                // With LoRA, only the trained tensors of a layer are sharded and gathered.
                let (sharded, gathered) = match &self.lora {
                    Some(l) => (l.in_layers as f64, l.largest_layer as f64),
                    None => (
                        trained_layers(Part::Vision, c.vision.num_hidden_layers, vision_layer)
                            + trained_layers(Part::Decoder, c.text.num_hidden_layers, decoder_layer),
                        largest_layer,
                    ),
                };
                let micro_batches = self.accumulation as f64;
                StateBytes {
                    // The layer running and the next one, on its way.
                    weights: weights - sharded * w * (1.0 - 1.0 / n) + 2.0 * gathered * w,
                    gradients: in_backward + trained * 4.0 / n,
                    sent: reduce_scatter * micro_batches
                        + 2.0 * micro_batches * ring * sharded * w
                        + ring * (trained - sharded) * w,
                    ..shares
                }
            }
        }
    }
}

/// Bytes the autograd graph keeps for backward in one step of `shape` (one micro-batch on
/// one GPU), as pg2's layers compute it:
/// - a decoder layer keeps, per token, its input and its normed copy, q, k, v, the
///   attention output, the inputs of its two post-norms and the pre-MLP norm with its
///   output (6 widths plus 2 query and 2 key-value widths), and the MLP's gate, up,
///   activated gate and product (4 MLP widths); with soft caps, per head, the capped
///   scores, the f32 softmax and its copy in the activation dtype (T x T each);
/// - a SigLIP layer keeps, per patch, 8 widths (norm inputs and outputs, q, k, v and the
///   attention output: its attention is fused) and 2 MLP widths;
/// - the head keeps the target rows' f32 soft-capped logits and log-probabilities (f32
///   whatever the weights' precision).
///
/// Lean attention keeps q, k and v instead of the scores (recomputed in backward), one
/// layer's scores alive at a time; checkpointing keeps each layer's input and recomputes
/// one layer at a time in backward.
pub fn activation_bytes(shape: &StepShape, keep: Keep) -> f64 {
    let (t, v) = (&shape.config.text, &shape.config.vision);
    let a = shape.activation_bytes as f64;
    let tokens = (v.num_patches() + shape.text_tokens) as f64;
    let (d, m) = (t.hidden_size as f64, t.intermediate_size as f64);
    let (q, kv) = ((t.num_attention_heads * t.head_dim) as f64, (t.num_key_value_heads * t.head_dim) as f64);
    let scores = match shape.soft_caps {
        true => t.num_attention_heads as f64 * tokens * tokens * (2.0 * a + 4.0),
        false => 0.0,
    };
    let decoder_layer = tokens * (6.0 * d + 2.0 * q + 2.0 * kv + 4.0 * m) * a;
    let patches = v.num_patches() as f64;
    let vision_layer = patches * (8.0 * v.hidden_size as f64 + 2.0 * v.intermediate_size as f64) * a;
    let head = shape.target_tokens as f64 * t.vocab_size as f64 * 8.0;
    let (layers, vision_layers) = (t.num_hidden_layers as f64, v.num_hidden_layers as f64);
    let per_example = match keep {
        Keep::All => layers * (decoder_layer + scores) + vision_layers * vision_layer + head,
        Keep::Lean => layers * decoder_layer + scores + vision_layers * vision_layer + head,
        Keep::Checkpointed => {
            let inputs = layers * tokens * d * a + vision_layers * patches * v.hidden_size as f64 * a;
            inputs + (decoder_layer + scores).max(vision_layer) + head
        }
    };
    per_example * shape.batch as f64
}

const GB: f64 = 1e9;

/// The modes `pg2 plan` weighs, in order of preference (least communication first).
const MODES: [(Sharding, &str); 4] = [
    (Sharding::None, "none"),
    (Sharding::Optimizer, "optimizer"),
    (Sharding::Gradients, "gradients"),
    (Sharding::Full, "full"),
];

pub fn run(args: &PlanArgs) -> Result<()> {
    match (&args.measure, &args.measure_keep) {
        (Some(shape), Some(keep)) => return measure_one(*shape, *keep, args.lora.lora()),
        (Some(shape), None) => return measure(*shape, args),
        _ => {}
    }
    let shape = StepShape::from_args(args)?;
    let (c, total) = (&shape.config, shape.params as f64);
    println!(
        "PaliGemma 2 at {} px: {:.2}B parameters ({:.2}B trained), {}-byte weights; {} GPUs of {} GB",
        c.vision.image_size,
        total / 1e9,
        shape.trained as f64 / 1e9,
        shape.weight_bytes,
        shape.gpus,
        args.gpu_memory
    );
    if let Some(l) = &shape.lora {
        let int8 = match l.int8_params {
            0 => String::new(),
            n => format!(", {:.2}B frozen decoder weights in int8", n as f64 / 1e9),
        };
        println!("LoRA: {:.1}M adapter parameters on a frozen base{int8}", l.adapters as f64 / 1e6);
    }
    println!(
        "per GPU: micro-batches of {} x ({} image + {} text tokens), {} target tokens each; soft caps {}",
        shape.batch,
        c.vision.num_patches(),
        shape.text_tokens,
        shape.target_tokens,
        if shape.soft_caps { "on" } else { "off" }
    );
    // GB, or MB for models too small to show in GB.
    let whole = shape.state(Sharding::None);
    let (unit, scale) = match whole.weights + whole.gradients + whole.optimizer < GB {
        true => ("MB", 1e6),
        false => ("GB", GB),
    };
    println!();
    println!(
        "{:<10} {:>8} {:>8} {:>9} | {:>22} | {:>22} | {:>10}",
        "sharding", "weights", "grads", "optimizer", "activations all/lean/ckpt", "total all/lean/ckpt", "sent/step"
    );
    let budget = 0.9 * args.gpu_memory * GB;
    let mut cheapest = None;
    for (mode, name) in MODES {
        let s = shape.state(mode);
        let state = s.weights + s.gradients + s.optimizer;
        let acts = Keep::ALL.map(|keep| activation_bytes(&shape, keep));
        let totals = acts.map(|a| state + a);
        for (keep, total) in Keep::ALL.iter().zip(totals) {
            // Parameter sharding recomputes every layer (it gathers them again for that);
            // dropout rules out recomputing.
            let recomputes = *keep == Keep::Checkpointed;
            let possible = (mode != Sharding::Full || recomputes) && (shape.recompute || !recomputes);
            if cheapest.is_none() && possible && total <= budget {
                cheapest = Some((name, *keep, total));
            }
        }
        let three = |xs: [f64; 3]| format!("{:.1} / {:.1} / {:.1}", xs[0] / scale, xs[1] / scale, xs[2] / scale);
        println!(
            "{name:<10} {:>8.1} {:>8.1} {:>9.1} | {:>22} | {:>22} | {:>7.1} {unit}",
            s.weights / scale,
            s.gradients / scale,
            s.optimizer / scale,
            three(acts),
            three(totals),
            s.sent / scale
        );
    }
    println!(
        "({unit} per GPU; activations: everything kept / lean attention / activation checkpointing; full runs \
         with activation checkpointing only)"
    );
    match cheapest {
        Some((name, keep, total)) => println!(
            "\ncheapest that fits in 90 % of {} GB: train.sharding = \"{name}\", model.{} ({:.1} {unit})",
            args.gpu_memory,
            keep.describe(),
            total / scale
        ),
        None => println!(
            "\nnothing fits in 90 % of {} GB: more GPUs or a smaller micro-batch (more train.grad_accumulation){}",
            args.gpu_memory,
            if shape.recompute { "" } else { "; without dropout, activation checkpointing" }
        ),
    }
    Ok(())
}

/// The benchmark shape's step as the plan sees it: batch 8 of f32 examples with the
/// benchmarks' prompt and target lengths, soft caps on.
fn benchmark_step(shape: crate::bench::Shape) -> Result<StepShape> {
    let config = shape.config()?;
    let params: i64 = config.parameter_counts().iter().map(|c| c.1).sum();
    Ok(StepShape {
        config,
        params,
        trained: params,
        frozen: vec![],
        weight_bytes: 4,
        activation_bytes: 4,
        batch: 8,
        // `<bos>`, prompt, `\n`, target, `<eos>`.
        text_tokens: (crate::bench::PROMPT_LEN + crate::bench::TARGET_LEN + 3) as usize,
        target_tokens: (crate::bench::TARGET_LEN + 1) as usize,
        soft_caps: true,
        gpus: 1,
        accumulation: 1,
        recompute: true,
        lora: None,
    })
}

/// `--measure`: each way of keeping activations measured in a fresh process (so that each
/// peak is its own), beside the estimate; and the weights' resident bytes beside theirs.
fn measure(shape: crate::bench::Shape, args: &PlanArgs) -> Result<()> {
    let shape_name = value_name(&shape);
    let step = benchmark_step(shape)?.with_lora_of(args.lora.lora());
    let lora = match args.lora.lora() {
        Some((l, _)) => format!("; LoRA rank {} (projector trained), base {}", l.rank, args.lora.base_dtype),
        None => String::new(),
    };
    println!(
        "{shape_name} shape on the CPU: batch {} x ({} image + {} text tokens), f32, soft caps on{lora}",
        step.batch,
        step.config.vision.num_patches(),
        step.text_tokens
    );
    let mut weights = None;
    for keep in Keep::ALL {
        let keep_name = value_name(&keep);
        let lora_args =
            ["--lora-rank", &args.lora.lora_rank.to_string(), "--base-dtype", &args.lora.base_dtype].map(String::from);
        let out = std::process::Command::new(std::env::current_exe()?)
            .args(["plan", "--measure", &shape_name, "--measure-keep", &keep_name])
            .args(lora_args)
            .output()?;
        if !out.status.success() {
            bail!("measuring `{keep_name}`: {}", String::from_utf8_lossy(&out.stderr));
        }
        let stdout = String::from_utf8_lossy(&out.stdout);
        let figures: Vec<f64> = stdout.split_whitespace().map(str::parse).collect::<Result<_, _>>()?;
        let [measured, model] = figures[..] else { bail!("measuring `{keep_name}` printed {stdout:?}") };
        weights.get_or_insert(model);
        let estimate = activation_bytes(&step, keep);
        println!(
            "activations {keep_name:<13} estimated {:>7.1} MB, measured {:>7.1} MB (ratio {:.2})",
            estimate / 1e6,
            measured / 1e6,
            measured / estimate
        );
    }
    let (estimate, measured) = (step.state(Sharding::None).weights, weights.unwrap_or_default());
    println!(
        "weights estimated {:.1} MB, measured {:.1} MB (measured / estimated {:.2})",
        estimate / 1e6,
        measured / 1e6,
        measured / estimate
    );
    println!(
        "(measured: the step's peak resident memory less the weights, inputs and gradients; the weights: what \
         building the model added)"
    );
    Ok(())
}

/// How `value` is spelt on the command line.
fn value_name(value: &impl clap::ValueEnum) -> String {
    value.to_possible_value().expect("a named value").get_name().to_string()
}

/// One forward and backward pass of the benchmark shape keeping activations as `keep`
/// says (training LoRA adapters as `lora` says, if given); prints the bytes the step added
/// to the process's peak beyond its gradients, and the bytes building the model added. A
/// first step runs before, so that libtorch's one-time buffers are not counted, and every
/// large block is returned to the system when freed, so that the second step's peak is its
/// own.
fn measure_one(shape: crate::bench::Shape, keep: Keep, lora: Option<(LoraConfig, BaseDtype)>) -> Result<()> {
    use pg2_model::{PaliGemma, RunOptions, Weights};
    use tch::{Device, Kind};
    return_freed_memory();
    let step = benchmark_step(shape)?.with_lora_of(lora.clone());
    let options = RunOptions {
        recompute: keep == Keep::Checkpointed,
        lean_attention: keep == Keep::Lean,
        ..RunOptions::default()
    };
    tch::manual_seed(0);
    let empty = resident_bytes("VmRSS")?;
    let mut weights = Weights::random(Device::Cpu, Kind::Float);
    if let Some((config, base)) = lora {
        weights = weights.with_lora(Lora::fresh(config).on_base(base))?;
    }
    let model = PaliGemma::new(step.config.clone(), weights, options)?;
    let model_bytes = resident_bytes("VmRSS")? - empty;
    let trains = |p: &pg2_model::Param| model.lora().is_none_or(|l| pg2_model::lora::is_saved(l, p));
    for p in model.params().iter().filter(|p| trains(p)) {
        let _ = p.tensor.set_requires_grad(true);
    }
    // The benchmarks' inputs: image tokens, `<bos>`, prompt, `\n`, target, `<eos>`.
    let dir = crate::bench::TempDir::new("plan")?;
    crate::bench::write_inputs(&step.config, step.batch as i64, true, &dir.0)?;
    let inputs = crate::bench::read_inputs(&dir.0, Device::Cpu)?;
    let targets = inputs.layout.mask_ar.to_kind(Kind::Bool);
    let run = || -> Result<()> {
        let (logprobs, _) = model.target_logprobs(&inputs, &targets)?;
        (-logprobs.mean(Kind::Float)).backward();
        Ok(())
    };
    run()?;
    model.params().iter().for_each(|p| pg2_dist::release_grad(&p.tensor));
    std::fs::write("/proc/self/clear_refs", "5")?; // the peak starts again from here
    let before = resident_bytes("VmRSS")?;
    run()?;
    let gradients = step.trained as f64 * 4.0;
    println!("{} {model_bytes}", resident_bytes("VmHWM")? - before - gradients);
    Ok(())
}

/// Makes glibc hand every block of 64 kB or more back to the system when it is freed (its
/// default raises that threshold as blocks are freed, keeping them).
fn return_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        extern "C" {
            fn mallopt(param: std::ffi::c_int, value: std::ffi::c_int) -> std::ffi::c_int;
        }
        const M_MMAP_THRESHOLD: std::ffi::c_int = -3; // <malloc.h>
                                                      // SAFETY: mallopt only changes a threshold; a failure leaves the default.
        unsafe { mallopt(M_MMAP_THRESHOLD, 64 * 1024) };
    }
}

/// A `/proc/self/status` memory figure in bytes.
fn resident_bytes(field: &str) -> Result<f64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let kb = status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok());
    match kb {
        Some(kb) => Ok(kb * 1024.0),
        None => bail!("/proc/self/status has no {field} (measuring needs Linux)"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan_args(recipe: Option<&str>, sets: &[&str], lora_rank: usize, base_dtype: &str) -> PlanArgs {
        let recipes = concat!(env!("CARGO_MANIFEST_DIR"), "/../../recipes/");
        PlanArgs {
            recipe: recipe.map(|r| PathBuf::from(recipes).join(r)),
            sets: sets.iter().map(|s| s.to_string()).collect(),
            size: Some(3),
            resolution: 224,
            batch: 1,
            text_tokens: 128,
            target_tokens: 64,
            dtype: "bf16".into(),
            soft_caps: true,
            lora: LoraArgs { lora_rank, base_dtype: base_dtype.into() },
            gpus: 1,
            gpu_memory: 24.0,
            measure: None,
            measure_keep: None,
        }
    }

    /// A LoRA recipe is costed as adapters on a frozen base, not as a full fine-tune: the
    /// 3B's rank-16 adapters on its 26 decoder layers' seven projections (16 x 49 920 each)
    /// and the projector train; all 3B weights stay, in bf16 or (the decoder layers'
    /// projections) in int8.
    #[test]
    fn a_lora_recipe_is_planned_as_adapters_on_a_frozen_base() {
        let shape =
            |sets: &[&str]| StepShape::from_args(&plan_args(Some("transfer/vqav2-lora.toml"), sets, 0, "")).unwrap();
        let (lora, full, int8) = (shape(&[]), shape(&["lora.rank=0"]), shape(&["lora.base_dtype=\"int8\""]));
        let adapters = 16 * 26 * 49_920;
        let projector = 1152 * 2304 + 2304;
        assert_eq!(lora.lora.as_ref().map(|l| l.adapters), Some(adapters));
        assert_eq!((lora.params, lora.trained), (full.params + adapters, adapters + projector));
        assert_eq!(full.trained, full.params);
        let (s, f, q) = (lora.state(Sharding::None), full.state(Sharding::None), int8.state(Sharding::None));
        // bf16 weights; gradients of the trained parameters, their f32 master and moments.
        assert_eq!(
            (s.weights, s.gradients, s.optimizer),
            (lora.params as f64 * 2.0, lora.trained as f64 * 2.0, lora.trained as f64 * 12.0)
        );
        assert!(f.gradients + f.optimizer > 100.0 * (s.gradients + s.optimizer));
        // 2.02B decoder weights a byte each instead of two, plus an f32 scale per output channel.
        let int8_params = 26 * (2304 * 2048 * 2 + 2304 * 1024 * 2 + 3 * 2304 * 9216);
        let channels = 26 * (2048 + 1024 * 2 + 2304 + 9216 * 2 + 2304);
        assert_eq!(int8.lora.as_ref().map(|l| (l.int8_params, l.int8_channels)), Some((int8_params, channels)));
        assert_eq!(s.weights - q.weights, int8_params as f64 - channels as f64 * 4.0);
        assert_eq!((q.gradients, q.optimizer), (s.gradients, s.optimizer));
        // The recipe's lora.dropout rules out activation checkpointing.
        assert!(!lora.recompute && shape(&["lora.dropout=0.0"]).recompute);
        // `--lora-rank` plans the same adapters without a recipe.
        let flags = StepShape::from_args(&plan_args(None, &[], 16, "int8")).unwrap();
        assert_eq!(flags.lora, int8.lora);
        assert_eq!(flags.trained, int8.trained);
    }
}
