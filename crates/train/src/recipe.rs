//! Training recipes: one TOML file describes one stage.
//!
//! - `base = "other.toml"` inherits another recipe; tables merge key by key, anything else
//!   (arrays included) is replaced.
//! - `--set key.path=value` overrides one key (the value is TOML, or else a string); a key
//!   set to `""` is cleared, so a recipe can drop what its base sets.
//! - Relative paths are relative to the file that sets them (the current folder for
//!   `--set`); a source path starting with `$DATA/` is relative to the data root
//!   (`data.root`, or the `PG2_DATA_ROOT` environment variable, which wins).
//! - Unknown keys, wrong types and impossible values are errors naming the key and the
//!   file, with the closest valid key for a typo.

use std::path::{Path, PathBuf};

use pg2_data::parquet::Columns;
use pg2_data::{OnBadRecord, RunLength, TextLimits};
use pg2_eval::anls::levenshtein;
use pg2_eval::Metric;
use pg2_model::{BaseDtype, LoraConfig, ModelError, PaliGemmaConfig, Part};
use pg2_optim::{Decay, DecayShape};
use serde::Deserialize;
use toml::{Table, Value};

/// A parsed recipe, with paths resolved against its folder.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    /// Names the run folder (`runs/<name>`); defaults to the file's stem.
    pub name: Option<String>,
    /// Seeds the initialisation and the data order.
    #[serde(default)]
    pub seed: u64,
    pub model: ModelSection,
    pub data: DataSection,
    pub train: TrainSection,
    /// Evaluation during training (before the first step, every `every` steps, at the end).
    pub eval: Option<EvalSection>,
    /// LoRA adapters: train them (and `train` parts) on a frozen base; absent or rank 0
    /// trains the whole model.
    pub lora: Option<LoraSection>,
}

/// LoRA: adapters `B A x * alpha / rank` on the targeted linear layers, as PEFT makes them;
/// checkpoints are PEFT adapter folders (`adapter_config.json`, `adapter_model.safetensors`).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LoraSection {
    /// The adapters' inner dimension; 0 turns LoRA off.
    pub rank: usize,
    /// Scales the adapters' outputs by `alpha / rank`; `rank` by default (a factor of 1).
    pub alpha: Option<f64>,
    /// Dropout on the adapters' inputs while training.
    #[serde(default)]
    pub dropout: f64,
    /// Linear layers to adapt, as patterns over pg2's parameter names without `.weight`
    /// (`*` any characters; a pattern may match the whole name or its part after a dot, so
    /// `"fc1"` picks every SigLIP `fc1`); by default the decoder's q/k/v/o and gate/up/down
    /// projections (`"language_model.model.layers.*.q_proj"`, ...).
    #[serde(default = "LoraConfig::default_targets")]
    pub targets: Vec<String>,
    /// Parts trained in full beside the adapters (PEFT's `modules_to_save`): `vision`,
    /// `projector`, `decoder`.
    #[serde(default)]
    pub train: Vec<Part>,
    /// How the frozen base's decoder layers are held: `"model"` (default: in `model.dtype`)
    /// or `"int8"` (their linear layers' weights in int8 with per-output-channel scales,
    /// half the bytes of bf16; see `pg2_model::int8`). Checkpoints are unchanged.
    #[serde(default)]
    pub base_dtype: BaseDtype,
}

impl Recipe {
    /// The recipe's LoRA settings, if it trains adapters (a `[lora]` section of positive rank).
    pub fn lora(&self) -> Option<LoraConfig> {
        let l = self.lora.as_ref().filter(|l| l.rank > 0)?;
        Some(LoraConfig {
            rank: l.rank,
            alpha: l.alpha.unwrap_or(l.rank as f64),
            dropout: l.dropout,
            targets: l.targets.clone(),
            trained: l.train.clone(),
        })
    }

    /// How the recipe holds the frozen base (`lora.base_dtype`; the model's dtype without LoRA).
    pub fn base_dtype(&self) -> BaseDtype {
        self.lora.as_ref().filter(|l| l.rank > 0).map_or(BaseDtype::Model, |l| l.base_dtype)
    }
}

/// Decode a held-out set and score it.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EvalSection {
    /// JSONL records with the fields the metric needs (`answers`, `references`, ...).
    pub data: PathBuf,
    /// `cider`, `bleu4`, `vqa`, `anls`, `relaxed`, `exact` (case ignored), `exact_cased`,
    /// `tallyqa`, `scienceqa`, `refcoco`, `refcoco_seg`, `teds`, `teds_struct` or `ocr_f1`.
    pub metric: Metric,
    /// big_vision's mask VQ-VAE (`vae-oid.npz`), whose decoder `refcoco_seg` turns the
    /// predicted `<seg>` tokens into masks with; `$DATA/...` or relative to the recipe.
    pub mask_vae: Option<PathBuf>,
    /// Prompt template, as a source's `prefix`; the records' own prefix by default.
    pub prefix: Option<String>,
    /// For parquet files: how their columns make records, as a source's `columns`.
    #[serde(default)]
    pub columns: Columns,
    #[serde(default = "default_eval_every")]
    pub every: u64,
    /// Evaluate the first N records only.
    pub max_examples: Option<usize>,
    /// 1 decodes greedily; more runs beam search.
    #[serde(default = "default_beam")]
    pub beam: usize,
    /// Most tokens decoded per example.
    #[serde(default = "default_max_len")]
    pub max_len: usize,
    #[serde(default = "default_eval_batch")]
    pub batch_size: usize,
    /// Antialias the eval images; `data.antialias` (as training) by default. Some
    /// big_vision configs train with `resize(res, antialias=True)` and evaluate with
    /// `resize(res)` (AI2D, VizWiz VQA).
    pub antialias: Option<bool>,
    /// The paper's result for this task, by `"<size>-<resolution>"` (e.g. `"3b-224"`), on
    /// the metric's scale as pg2 reports it; `pg2 report` prints it beside the run's.
    #[serde(default)]
    pub paper: std::collections::BTreeMap<String, f64>,
}

fn default_eval_every() -> u64 {
    100
}
fn default_beam() -> usize {
    1
}
fn default_max_len() -> usize {
    32
}
fn default_eval_batch() -> usize {
    16
}

/// What model to train and how to run it.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// Where the weights come from: a preset shape with fresh random weights (`"tiny"`,
    /// `"paligemma2-3b"`, `"paligemma2-10b"`, `"paligemma2-28b"`), or a checkpoint: a
    /// Hugging Face model folder, or a run folder (its `checkpoints/latest`).
    pub init: Init,
    /// Image side in pixels.
    pub resolution: usize,
    /// `"f32"`, `"bf16"` (bf16 weights and compute, with f32 master weights and Adam
    /// moments in the optimizer) or `"bf16_autocast"` (f32 weights, the training forward
    /// under autocast in bf16).
    #[serde(default)]
    pub dtype: Dtype,
    /// Attention and final-logit soft-caps: on in pretraining, off in transfer.
    #[serde(default = "default_true")]
    pub soft_caps: bool,
    /// With a preset `init`: a SigLIP checkpoint (transformers' `SiglipVisionModel` or
    /// `SiglipModel` folder, `vision_model.*`) for the vision tower, as stage 1 starts.
    pub vision_init: Option<String>,
    /// With a preset `init`: a Gemma 2 checkpoint (`Gemma2ForCausalLM` folder, `model.*`)
    /// for the decoder; rows past its vocabulary (loc/seg/`<image>`) are drawn from
    /// N(0, 0.02), as big_vision's `extend_rows`.
    pub text_init: Option<String>,
    /// Dropout on the decoder layers' branch outputs while training (big_vision's
    /// `llm.dropout`, e.g. 0.1 for some transfers); each step reseeds it from the seed and
    /// the step, so resumed runs stay exact.
    #[serde(default)]
    pub dropout: f64,
    /// Parts left untouched (no gradient, no optimizer state): `vision`, `projector`,
    /// `decoder`, or `img` for the first two, as big_vision's `img/.*` (its projector is the
    /// ViT's head, `img/head`).
    #[serde(default, deserialize_with = "freeze_parts")]
    pub freeze: Vec<Part>,
    /// Keep only each layer's input in the forward pass and recompute the layer in the
    /// backward (about a third more compute, far less memory: what lets 3B at 896 px and
    /// 10B train on 80 GB GPUs). Not with `dropout`.
    #[serde(default)]
    pub activation_checkpointing: bool,
    /// Soft-capped attention keeps only its queries, keys and values for the backward pass
    /// and computes its scores again there, so one layer's scores exist at a time: for
    /// long sequences (stage 2), where the scores of every layer dominate memory. Off by
    /// default, where the recompute would only cost time.
    #[serde(default)]
    pub lean_attention: bool,
}

/// Where a model's weights come from (`model.init`).
#[derive(Debug, Clone, PartialEq)]
pub enum Init {
    /// Fresh random weights of a preset shape.
    Preset(Preset),
    /// A Hugging Face model folder, or a run folder (its `checkpoints/latest`).
    Checkpoint(PathBuf),
}

impl<'de> Deserialize<'de> for Init {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let name = String::deserialize(deserializer)?;
        Ok(Preset::parse(&name).map_or_else(|| Init::Checkpoint(PathBuf::from(name)), Init::Preset))
    }
}

/// A model shape `model.init` can name, built with fresh weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preset {
    /// A few layers of a few dozen channels, sized to the tokenizer: trains on a CPU.
    Tiny,
    /// PaliGemma 2 of this many billion parameters (3, 10 or 28).
    PaliGemma2(u32),
}

impl Preset {
    /// Every preset with its name in recipes.
    pub const ALL: [(&'static str, Preset); 4] = [
        ("tiny", Preset::Tiny),
        ("paligemma2-3b", Preset::PaliGemma2(3)),
        ("paligemma2-10b", Preset::PaliGemma2(10)),
        ("paligemma2-28b", Preset::PaliGemma2(28)),
    ];

    /// The preset a recipe names, if `name` is one.
    pub fn parse(name: &str) -> Option<Preset> {
        Self::ALL.iter().find(|(n, _)| *n == name).map(|(_, p)| *p)
    }

    /// The configuration at `resolution`; the tiny model's vocabulary is the tokenizer's
    /// (`vocab_size` ids, `<image>` at `image_id`).
    pub fn config(self, vocab_size: usize, image_id: i64, resolution: usize) -> Result<PaliGemmaConfig, ModelError> {
        match self {
            Preset::Tiny => PaliGemmaConfig::tiny(vocab_size, image_id, resolution),
            Preset::PaliGemma2(size) => PaliGemmaConfig::paligemma2(size, resolution),
        }
    }

    /// The released PaliGemma 2 size (`"3b"`, ...) whose decoder `config` has, if any.
    pub fn released_size(config: &PaliGemmaConfig) -> Option<String> {
        [3, 10, 28].into_iter().find_map(|size| {
            let released = PaliGemmaConfig::paligemma2(size, config.vision.image_size).ok()?;
            (released.text == config.text).then(|| format!("{size}b"))
        })
    }
}

/// Where the examples come from and how they become tokens.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DataSection {
    /// Root of the sources written `$DATA/...`.
    pub root: Option<PathBuf>,
    /// The tokenizer (`tokenizer.json`).
    pub tokenizer: PathBuf,
    /// Write the synthetic demo data into this folder first when it is missing.
    pub synth: Option<PathBuf>,
    /// Weighted sources.
    pub mixture: Vec<Source>,
    /// big_vision's `text_len`: `<bos>`, prompt, `"\n"`, target and `<eos>` take at most
    /// `text_len + 1` tokens together, the prompt first (cut before its `"\n"`), the target
    /// what is left; evaluation then decodes up to `eval.max_len` (big_vision's
    /// `max_decode_len = text_len`). The transfer recipes set this.
    pub text_len: Option<usize>,
    /// Most prompt tokens (with its `"\n"`); longer prompts are cut before the `"\n"`. A
    /// cap beside `text_len` (the tighter wins), for pretraining mixtures that split the
    /// length between prompt and target.
    pub max_prefix_tokens: Option<usize>,
    /// Most target tokens (with `<eos>`); longer targets are cut and counted.
    pub max_suffix_tokens: Option<usize>,
    /// Keep `<eos>` when cutting a target.
    #[serde(default)]
    pub keep_eos: bool,
    /// Pad every batch to this many tokens (constant shapes) instead of to its longest example.
    pub pad_to: Option<usize>,
    /// Low-pass filter images before downscaling them to `model.resolution`, in training
    /// and evaluation alike: big_vision's `resize(res, antialias=True)`, which some transfer
    /// configs use. Off is big_vision's default `resize(res)`: TF's plain bilinear.
    #[serde(default)]
    pub antialias: bool,
    /// Pad images with white to a square of their longer side (below or to the right) before
    /// resizing them, in training and evaluation alike: the paper's set-up for OCR, tables,
    /// molecules and music. `<loc>` targets must then be binned on the square: `pg2 convert
    /// --pad-to-square` writes them so. Off: images are stretched to the square.
    #[serde(default)]
    pub pad_to_square: bool,
    /// Sort each worker's share of an update by length before cutting it into the
    /// micro-batches of `train.grad_accumulation`, so that short-text examples are not padded
    /// to the longest of a mixed batch. The update sees the same examples; this only pays
    /// when an update has several micro-batches.
    #[serde(default)]
    pub bucket_by_length: bool,
    /// `"error"` (stop, naming the record) or `"skip"` (count and go on) for bad records:
    /// unreadable lines, records without a prompt, missing or corrupt images.
    #[serde(default)]
    pub on_bad_record: OnBadRecord,
    /// Decoding threads.
    #[serde(default = "default_workers")]
    pub workers: usize,
    /// Batches prepared ahead.
    #[serde(default = "default_prefetch")]
    pub prefetch: usize,
}

impl DataSection {
    /// The token limits of `source`: its own where it sets them, else the data's.
    pub fn limits(&self, source: &Source) -> TextLimits {
        TextLimits {
            text_len: source.text_len.or(self.text_len),
            max_prefix_tokens: source.max_prefix_tokens.or(self.max_prefix_tokens),
            max_suffix_tokens: source.max_suffix_tokens.or(self.max_suffix_tokens),
            keep_eos: self.keep_eos,
        }
    }
}

/// One weighted source of the mixture.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Source {
    /// A JSONL file, a folder of JSONL shards, WebDataset tar shards
    /// (`shard-{000000..000575}.tar`, globs, `pipe:CMD`; see [`pg2_data::webdataset`]), or
    /// parquet files in Hugging Face's layout (`train-*.parquet`; see [`pg2_data::parquet`]).
    pub path: PathBuf,
    /// For parquet files: which column is the image, and the prompt, target and other fields
    /// as templates over the columns or column names
    /// (`{ prefix = "answer en {question}", suffix = "{answer}", answers = "answers" }`).
    #[serde(default)]
    pub columns: Columns,
    pub weight: f64,
    /// Prompt template such as `"answer en {question}"`; the records' own prefix by default.
    pub prefix: Option<String>,
    /// How to make a missing source (shown when it is missing), e.g. a `pg2 convert` line.
    pub make: Option<String>,
    /// This task's own text budget and prompt and target limits (default: the `[data]`
    /// ones).
    pub text_len: Option<usize>,
    pub max_prefix_tokens: Option<usize>,
    pub max_suffix_tokens: Option<usize>,
    /// Draw each visit's target from this list field of the records (e.g. `"answers"`)
    /// instead of taking their `suffix`: big_vision's `choice_no_replacement`, which shows
    /// each of a record's targets once before repeating one.
    pub suffix_from: Option<String>,
    /// Target template such as `"The answer is {indexed_answer}."`, as `prefix`; the records'
    /// own suffix by default.
    pub suffix: Option<String>,
    /// A list field (ScienceQA's `choices`, the right one's index in `answer`) put in a fresh
    /// order each visit, as big_vision's `sci_qa_choices_shuffle`, giving the fields
    /// `indexed_choices` (`"(A) x, (B) y"`) and `indexed_answer` (`"B"`) to the templates.
    pub shuffle_choices: Option<String>,
    /// Read the source lazily through a shuffle buffer of this many records instead of
    /// holding it in memory (for sources too large for memory). Tar shards and parquet
    /// files are always read so, with 1,000 by default.
    pub shuffle_buffer: Option<usize>,
}

/// `model.freeze`'s names as parts, `img` standing for the vision tower and the projector.
fn freeze_parts<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<Part>, D::Error> {
    let mut parts = vec![];
    for name in Vec::<String>::deserialize(d)? {
        match name.as_str() {
            "img" => parts.extend([Part::Vision, Part::Projector]),
            _ => parts.push(Part::ALL.into_iter().find(|p| p.name() == name).ok_or_else(|| {
                serde::de::Error::custom(format!(
                    "unknown part `{name}`, expected `vision`, `projector`, `decoder` or `img` (vision and projector)"
                ))
            })?),
        }
    }
    Ok(parts)
}

/// How long and how fast to train.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TrainSection {
    /// The length: exactly one of `steps`, `examples` (pretraining) and `epochs` (transfer).
    pub steps: Option<u64>,
    pub examples: Option<u64>,
    pub epochs: Option<f64>,
    pub batch_size: usize,
    /// Base learning rate of Adam.
    pub lr: f64,
    /// Linear warmup steps before the decay (or `warmup_fraction` of the run, e.g. 0.05).
    #[serde(default)]
    pub warmup_steps: u64,
    pub warmup_fraction: Option<f64>,
    /// After the warmup: `"cosine"` (default), `"linear"`, `"rsqrt"` or `"constant"`.
    #[serde(default)]
    pub schedule: DecayShape,
    /// Weight decay, on the kernels `wd_mults` selects (never on norms, biases, embeddings
    /// and position embeddings).
    #[serde(default)]
    pub weight_decay: f64,
    /// `"decoupled"` (big_vision's, default: scaled by the schedule, not the base rate) or
    /// `"lr_coupled"` (AdamW's: scaled by the learning rate too).
    #[serde(default)]
    pub weight_decay_mode: Decay,
    /// Weight-decay multipliers of kernels by checkpoint-name prefix (the longest matching
    /// prefix wins; a kernel no prefix matches is not decayed). The default is big_vision's:
    /// its `wd_mults = [(".*/kernel$", 1.0)]` decays the SigLIP and projector kernels and
    /// never the decoder, whose big_vision names (`w`, `gating_einsum`, `linear`) are not
    /// `kernel`. `{ "language_model." = 1.0, ... }` decays the decoder too.
    #[serde(default = "default_wd_mults")]
    pub wd_mults: std::collections::BTreeMap<String, f64>,
    /// Learning-rate multipliers by checkpoint-name prefix, e.g.
    /// `{ "vision_tower." = 0.1 }`; the longest matching prefix wins.
    #[serde(default)]
    pub lr_mults: std::collections::BTreeMap<String, f64>,
    /// Batches whose gradients are summed per update (the update sees
    /// `batch_size * grad_accumulation` examples).
    #[serde(default = "default_accumulation")]
    pub grad_accumulation: usize,
    /// Global gradient-norm clip (big_vision: 1.0); 0 turns it off.
    #[serde(default = "default_clip")]
    pub grad_clip: f64,
    #[serde(default = "default_b2")]
    pub b2: f64,
    /// Steps between log lines (the first and the last step are always logged).
    #[serde(default = "default_log_every")]
    pub log_every: u64,
    /// Steps between checkpoints; the last step always saves one.
    pub checkpoint_every: Option<u64>,
    /// Keep only the newest N checkpoints (all by default).
    pub keep_checkpoints: Option<usize>,
    /// `"example"` (big_vision: each example's loss over its own target count, then the
    /// batch mean) or `"token"` (transformers: over all target tokens of the batch).
    #[serde(default)]
    pub loss_normalization: LossNormalization,
    /// big_vision's label smoothing: the target keeps `1 - s`, the other tokens share `s`.
    #[serde(default)]
    pub label_smoothing: f64,
    /// A non-finite loss or gradient: `"stop"` naming the step, or `"skip"` the update and count it.
    #[serde(default)]
    pub on_nonfinite: OnNonFinite,
    /// With several workers (`launch --nproc-per-node`): gradients travel in flat buckets
    /// of this many megabytes. `batch_size` is the global batch, split evenly over them.
    #[serde(default = "default_bucket_mb")]
    pub allreduce_bucket_mb: f64,
    /// With several workers: reduce each bucket of gradients as soon as backward has
    /// produced it, while backward goes on (DDP's overlap: on a ring thread on CPUs, as
    /// asynchronous NCCL collectives on GPUs; with accumulation and no gradient sharding,
    /// during the last micro-batch's backward only). `false` reduces them all after
    /// backward.
    #[serde(default = "default_true")]
    pub overlap_reduction: bool,
    /// With several workers: `"none"` (every rank keeps the whole optimizer state, as DDP),
    /// `"optimizer"` (ZeRO-1: each keeps the f32 master weights and Adam moments of a
    /// `1 / workers` share), `"gradients"` (ZeRO-2: also only its share of the averaged
    /// gradients, reduced as backward produces them) or `"full"` (ZeRO-3: also only its
    /// share of each layer's weights, gathered around each use; needs
    /// `model.activation_checkpointing`).
    #[serde(default)]
    pub sharding: Sharding,
    /// Update with libtorch's fused AdamW kernel (same math as the op-by-op update, which
    /// `false` selects).
    #[serde(default = "default_true")]
    pub fused_optimizer: bool,
}

/// The model's storage and compute precision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Dtype {
    #[default]
    F32,
    /// bf16 weights and compute; the optimizer keeps f32 master weights and moments.
    Bf16,
    /// f32 weights; the training forward runs under autocast, matmuls in bf16.
    Bf16Autocast,
}

impl Dtype {
    /// The kind of the weights.
    pub fn kind(self) -> tch::Kind {
        match self {
            Dtype::F32 | Dtype::Bf16Autocast => tch::Kind::Float,
            Dtype::Bf16 => tch::Kind::BFloat16,
        }
    }

    /// The kind autocast computes in, when it is on.
    pub fn autocast(self) -> Option<tch::Kind> {
        (self == Dtype::Bf16Autocast).then_some(tch::Kind::BFloat16)
    }
}

/// How the loss averages over target tokens (`example`, `token`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LossNormalization {
    /// big_vision: each example over its own target count, then the batch mean.
    #[default]
    Example,
    /// transformers: the mean over all target tokens of the batch.
    Token,
}

/// Which training state is cut into shares over the workers (`none`, `optimizer`,
/// `gradients`, `full`); see [`crate::update`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Sharding {
    /// Replicated, as DDP.
    #[default]
    None,
    /// ZeRO-1: optimizer state sharded.
    Optimizer,
    /// ZeRO-2: optimizer state and gradients sharded.
    Gradients,
    /// ZeRO-3 (FSDP): the layers' parameters too, gathered around each use; needs
    /// `model.activation_checkpointing`.
    Full,
}

/// What a non-finite loss or gradient does (`stop`, `skip`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnNonFinite {
    /// Stop with a message naming the step.
    #[default]
    Stop,
    /// Skip the update and count it.
    Skip,
}

impl TrainSection {
    /// The run's length in the mixture's terms.
    pub fn length(&self) -> RunLength {
        match (self.steps, self.examples, self.epochs) {
            (Some(n), _, _) => RunLength::Steps(n),
            (_, Some(n), _) => RunLength::Examples(n),
            (_, _, Some(e)) => RunLength::Epochs(e),
            _ => unreachable!("checked when the recipe is read"),
        }
    }
}

fn default_true() -> bool {
    true
}
fn default_workers() -> usize {
    2
}
fn default_prefetch() -> usize {
    4
}
fn default_clip() -> f64 {
    1.0
}
fn default_b2() -> f64 {
    0.999
}
/// big_vision's weight-decay mask on pg2's names: the vision tower's and the projector's
/// kernels.
fn default_wd_mults() -> std::collections::BTreeMap<String, f64> {
    [("vision_tower.".to_string(), 1.0), ("multi_modal_projector.".to_string(), 1.0)].into()
}

fn default_accumulation() -> usize {
    1
}
fn default_log_every() -> u64 {
    10
}
fn default_bucket_mb() -> f64 {
    25.0
}

/// A recipe that cannot be used, with the file it came from.
#[derive(Debug, thiserror::Error)]
#[error("{file}: {msg}")]
pub struct RecipeError {
    pub file: String,
    pub msg: String,
}

/// Keys whose relative paths resolve against the folder of the file that sets them.
const PATH_KEYS: [(&str, &str); 8] = [
    ("model", "init"),
    ("model", "vision_init"),
    ("model", "text_init"),
    ("data", "tokenizer"),
    ("data", "synth"),
    ("data", "root"),
    ("eval", "data"),
    ("eval", "mask_vae"),
];

/// Reads `path` and the chain of its `base` recipes into one table, resolving each file's
/// relative paths against its own folder.
fn load_table(path: &Path, depth: usize) -> Result<Table, RecipeError> {
    let err = |msg: String| RecipeError { file: path.display().to_string(), msg };
    if depth > 8 {
        return Err(err("`base` recipes nest more than 8 deep (a cycle?)".into()));
    }
    let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    let mut table: Table = toml::from_str(&text).map_err(|e| err(e.to_string()))?;
    let dir = path.parent().unwrap_or(Path::new("."));
    resolve_paths(&mut table, dir);
    match table.remove("base") {
        None => Ok(table),
        Some(Value::String(base)) => {
            let mut merged = load_table(&dir.join(base), depth + 1)?;
            merge(&mut merged, table);
            Ok(merged)
        }
        Some(other) => Err(err(format!("`base` must be a file name, found {other}"))),
    }
}

fn resolve_paths(table: &mut Table, dir: &Path) {
    let join = |v: &mut Value| {
        if let Value::String(p) = v {
            // `pipe:` sources are shell commands, run where `launch` runs.
            if !p.is_empty() && Preset::parse(p).is_none() && !p.starts_with("$DATA/") && !p.starts_with("pipe:") {
                *p = dir.join(&*p).display().to_string();
            }
        }
    };
    for (section, key) in PATH_KEYS {
        if let Some(v) = table.get_mut(section).and_then(Value::as_table_mut).and_then(|t| t.get_mut(key)) {
            join(v);
        }
    }
    let sources = table
        .get_mut("data")
        .and_then(Value::as_table_mut)
        .and_then(|d| d.get_mut("mixture"))
        .and_then(Value::as_array_mut);
    for source in sources.into_iter().flatten() {
        if let Some(v) = source.as_table_mut().and_then(|s| s.get_mut("path")) {
            join(v);
        }
    }
}

/// Drops keys set to `""`: how a recipe clears a value its base sets.
fn drop_cleared(table: &mut Table) {
    let cleared: Vec<String> = table.iter().filter(|(_, v)| v.as_str() == Some("")).map(|(k, _)| k.clone()).collect();
    for key in cleared {
        table.remove(&key);
    }
    for (_, v) in table.iter_mut() {
        if let Value::Table(t) = v {
            drop_cleared(t);
        }
    }
}

/// Merges `over` into `base`: tables key by key, anything else replaced.
fn merge(base: &mut Table, over: Table) {
    for (key, value) in over {
        match (base.get_mut(&key), value) {
            (Some(Value::Table(b)), Value::Table(o)) => merge(b, o),
            (_, value) => {
                base.insert(key, value);
            }
        }
    }
}

/// Applies `key.path=value`; the value is read as TOML, or else taken as a string.
fn set(table: &mut Table, assignment: &str) -> Result<(), String> {
    let (key, raw) =
        assignment.split_once('=').ok_or_else(|| format!("--set {assignment}: expected key.path=value"))?;
    let value = toml::from_str::<Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| Value::String(raw.to_string()));
    let mut parts: Vec<&str> = key.trim().split('.').collect();
    let last = parts.pop().filter(|k| !k.is_empty()).ok_or_else(|| format!("--set {assignment}: empty key"))?;
    let mut node = table;
    for part in parts {
        node = node
            .entry(part)
            .or_insert_with(|| Value::Table(Table::new()))
            .as_table_mut()
            .ok_or_else(|| format!("--set {assignment}: `{part}` is not a table"))?;
    }
    node.insert(last.to_string(), value);
    Ok(())
}

/// Adds the closest valid key to serde's "unknown field `x`, expected one of `a`, `b`".
fn with_hint(msg: String) -> String {
    let Some(rest) = msg.split("unknown field `").nth(1) else { return msg };
    let unknown = rest.split('`').next().unwrap_or_default();
    let valid: Vec<&str> = rest.split("expected ").nth(1).unwrap_or_default().split('`').skip(1).step_by(2).collect();
    match valid.iter().min_by_key(|v| levenshtein(unknown, v)) {
        Some(best) if levenshtein(unknown, best) <= best.len().max(unknown.len()) / 2 => {
            format!("{msg} (did you mean `{best}`?)")
        }
        _ => msg,
    }
}

impl Recipe {
    /// Reads and checks a recipe file (no overrides).
    pub fn from_file(path: &Path) -> Result<Self, RecipeError> {
        Self::load(path, &[]).map(|(recipe, _)| recipe)
    }

    /// Reads a recipe with its `base` chain and `--set` overrides; returns it with the fully
    /// resolved table (what the run folder keeps as `recipe.toml`).
    pub fn load(path: &Path, overrides: &[String]) -> Result<(Self, Table), RecipeError> {
        let err = |msg: String| RecipeError { file: path.display().to_string(), msg };
        let mut table = load_table(path, 0)?;
        for assignment in overrides {
            set(&mut table, assignment).map_err(err)?;
        }
        if let Ok(root) = std::env::var("PG2_DATA_ROOT") {
            set(&mut table, &format!("data.root={}", Value::String(root))).map_err(err)?;
        }
        drop_cleared(&mut table);
        if !table.contains_key("name") {
            let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
            table.insert("name".into(), Value::String(stem));
        }
        let mut recipe: Recipe =
            Value::Table(table.clone()).try_into().map_err(|e: toml::de::Error| err(with_hint(e.to_string())))?;
        recipe.check().map_err(err)?;
        let root = recipe.data.root.clone();
        let place = |path: &mut PathBuf| -> Result<(), RecipeError> {
            if let Ok(rest) = path.strip_prefix("$DATA") {
                let root = root.as_ref().ok_or_else(|| {
                    err(format!(
                        "{} needs a data root: set data.root, --set data.root=DIR or PG2_DATA_ROOT",
                        path.display()
                    ))
                })?;
                *path = root.join(rest);
            }
            Ok(())
        };
        for source in &mut recipe.data.mixture {
            place(&mut source.path)?;
        }
        if let Some(eval) = &mut recipe.eval {
            place(&mut eval.data)?;
            if let Some(vae) = &mut eval.mask_vae {
                place(vae)?;
            }
        }
        Ok((recipe, table))
    }

    /// Sources that do not exist, each with how to make it.
    pub fn missing_sources(&self) -> Vec<String> {
        let synth = self.data.synth.is_some();
        self.data
            .mixture
            .iter()
            .filter(|_| !synth)
            .filter_map(|s| {
                let spec = s.path.to_string_lossy();
                let patterned = pg2_data::webdataset::is_webdataset(&spec) || pg2_data::parquet::is_parquet(&spec);
                let missing = match patterned {
                    true => pg2_data::webdataset::missing_shards(&spec).into_iter().next(),
                    false => Some(spec.to_string()).filter(|_| !s.path.exists()),
                }?;
                Some(match &s.make {
                    Some(how) => format!("{missing} (make it with: {how})"),
                    None => missing,
                })
            })
            .collect()
    }

    fn check(&self) -> Result<(), String> {
        if self.data.mixture.is_empty() || self.data.mixture.iter().any(|s| !s.weight.is_finite() || s.weight <= 0.0) {
            return Err("data.mixture needs at least one source, each with a positive weight (a finite number)".into());
        }
        if let Some(s) = self.data.mixture.iter().find(|s| s.suffix.is_some() && s.suffix_from.is_some()) {
            return Err(format!("data.mixture[] of {} sets both suffix and suffix_from; keep one", s.path.display()));
        }
        let eval = self.eval.iter().map(|e| ("eval", &e.data, &e.columns, &e.prefix));
        let sources = self.data.mixture.iter().map(|s| ("data.mixture[]", &s.path, &s.columns, &s.prefix));
        for (key, path, columns, prefix) in sources.chain(eval) {
            let parquet = pg2_data::parquet::is_parquet(&path.to_string_lossy());
            if !columns.0.is_empty() && !parquet {
                return Err(format!("{key}.columns is for parquet sources; {} is not one", path.display()));
            }
            if prefix.is_some() && columns.0.contains_key("prefix") {
                return Err(format!("{key} of {} sets both prefix and columns.prefix; keep one", path.display()));
            }
        }
        if let Some(eval) = &self.eval {
            if (eval.metric == Metric::RefCocoSeg) != eval.mask_vae.is_some() {
                return Err(format!(
                    "eval.mask_vae (big_vision's vae-oid.npz) goes with eval.metric = \"refcoco_seg\", which needs it; the metric is {}",
                    eval.metric
                ));
            }
        }
        if self.model.resolution == 0 {
            return Err(
                "model.resolution = 0: expected a positive multiple of the patch size (14 for PaliGemma 2)".into()
            );
        }
        let t = &self.train;
        let (positive, non_negative) = ("a positive, finite number", "a non-negative, finite number");
        let finite_at_least = |value: f64, low: f64| value.is_finite() && value >= low;
        for (key, value, ok, expected) in [
            ("train.lr", t.lr, finite_at_least(t.lr, f64::MIN_POSITIVE), positive),
            ("train.b2", t.b2, (0.0..1.0).contains(&t.b2), "a value in [0, 1)"),
            ("train.weight_decay", t.weight_decay, finite_at_least(t.weight_decay, 0.0), non_negative),
            ("train.grad_clip", t.grad_clip, finite_at_least(t.grad_clip, 0.0), non_negative),
            (
                "train.allreduce_bucket_mb",
                t.allreduce_bucket_mb,
                finite_at_least(t.allreduce_bucket_mb, 1e-6),
                positive,
            ),
        ] {
            if !ok {
                return Err(format!("{key} = {value}: expected {expected}"));
            }
        }
        for (key, mults) in [("lr_mults", &t.lr_mults), ("wd_mults", &t.wd_mults)] {
            if let Some((prefix, m)) = mults.iter().find(|(_, m)| !m.is_finite() || **m < 0.0) {
                return Err(format!("train.{key}.\"{prefix}\" = {m}: expected a non-negative, finite number"));
            }
        }
        let d = &self.data;
        let text_lens = d.mixture.iter().filter_map(|s| s.text_len).chain(d.text_len);
        if let Some(n) = text_lens.into_iter().find(|&n| n < 2) {
            return Err(format!("text_len = {n}: expected at least 2 (the prompt's \"\\n\" and one target token)"));
        }
        if let Some(e) = &self.eval {
            if e.every == 0 || e.beam == 0 || e.batch_size == 0 {
                return Err("eval.every, eval.beam and eval.batch_size must be positive".into());
            }
        }
        let t = &self.train;
        let lengths = [t.steps.is_some(), t.examples.is_some(), t.epochs.is_some()].iter().filter(|&&x| x).count();
        if lengths != 1 {
            return Err("set exactly one of train.steps, train.examples and train.epochs".into());
        }
        let positive_length =
            t.steps.is_none_or(|n| n > 0) && t.examples.is_none_or(|n| n > 0) && t.epochs.is_none_or(|e| e > 0.0);
        if t.sharding == Sharding::Full && !self.model.activation_checkpointing {
            return Err("train.sharding = \"full\" needs model.activation_checkpointing = true: a layer's parameters are let go after its forward pass and gathered again to recompute it in the backward pass".into());
        }
        if self.model.activation_checkpointing && self.model.dropout > 0.0 {
            return Err("model.activation_checkpointing does not go with model.dropout: the recompute would draw other dropout masks".into());
        }
        if !positive_length || t.batch_size == 0 || t.log_every == 0 || t.checkpoint_every == Some(0) {
            return Err(
                "the length, train.batch_size, train.log_every and train.checkpoint_every must be positive".into()
            );
        }
        if !(0.0..1.0).contains(&t.label_smoothing) {
            return Err(format!("train.label_smoothing = {}: expected a value in [0, 1)", t.label_smoothing));
        }
        if t.warmup_fraction.is_some_and(|f| !(0.0..=1.0).contains(&f))
            || (t.warmup_fraction.is_some() && t.warmup_steps > 0)
        {
            return Err("train.warmup_fraction must lie in [0, 1], and not come with train.warmup_steps".into());
        }
        if t.keep_checkpoints == Some(0) {
            return Err("train.keep_checkpoints must be positive".into());
        }
        if !(0.0..1.0).contains(&self.model.dropout) {
            return Err(format!("model.dropout = {}: expected a value in [0, 1)", self.model.dropout));
        }
        if t.grad_accumulation == 0 {
            return Err("train.grad_accumulation must be positive".into());
        }
        if let Some(lora) = self.lora.as_ref().filter(|l| l.rank > 0) {
            if !(0.0..1.0).contains(&lora.dropout) {
                return Err(format!("lora.dropout = {}: expected a value in [0, 1)", lora.dropout));
            }
            if lora.dropout > 0.0 && self.model.activation_checkpointing {
                return Err("model.activation_checkpointing does not go with lora.dropout: the recompute would draw other dropout masks".into());
            }
            if lora.alpha.is_some_and(|a| !a.is_finite()) || lora.targets.is_empty() {
                return Err("lora.alpha must be finite and lora.targets not empty".into());
            }
            if lora.base_dtype == BaseDtype::Int8 && lora.train.contains(&Part::Decoder) {
                return Err("lora.base_dtype = \"int8\" holds the frozen decoder in int8: it does not go with lora.train = [\"decoder\"]".into());
            }
            if !self.model.freeze.is_empty() {
                return Err("model.freeze does not go with [lora], whose base is frozen: name the parts to train in full in lora.train".into());
            }
            // A resumed or evaluated adapter checkpoint is put on this base again.
            if !matches!(self.model.init, Init::Checkpoint(_)) {
                return Err("[lora] needs model.init to name the base checkpoint the adapters train on".into());
            }
        }
        let from_parts = self.model.vision_init.is_some() || self.model.text_init.is_some();
        if from_parts && !matches!(self.model.init, Init::Preset(_)) {
            return Err("model.vision_init and model.text_init need a preset model.init (the shape to fill)".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[model]
init = "tiny"
resolution = 64

[data]
tokenizer = "synth/tokenizer.json"
mixture = [{ path = "train.jsonl", weight = 1.0 }]

[train]
steps = 10
batch_size = 4
lr = 1e-5
"#;

    fn parse(text: &str) -> Result<Recipe, RecipeError> {
        let dir = std::env::temp_dir().join(format!("pg2-recipe-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let path = dir.join(format!("r{}.toml", NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)));
        std::fs::write(&path, text).unwrap();
        let out = Recipe::from_file(&path);
        std::fs::remove_file(&path).unwrap();
        out
    }

    #[test]
    fn defaults_fill_in_and_paths_resolve() {
        let r = parse(GOOD).unwrap();
        assert_eq!((r.model.dtype, r.model.soft_caps, r.seed, r.train.grad_clip), (Dtype::F32, true, 0, 1.0));
        assert!(r.data.tokenizer.is_absolute() && r.data.tokenizer.ends_with("synth/tokenizer.json"));
        assert!(r.name.as_deref().unwrap().starts_with('r'));
    }

    /// A source's own budget wins over the data's; caps the source leaves open come from
    /// `[data]`.
    #[test]
    fn text_budgets_come_from_the_source_or_the_data() {
        let text = GOOD.replace(
            "mixture = [{ path = \"train.jsonl\", weight = 1.0 }]",
            "text_len = 32\nmax_suffix_tokens = 8\nmixture = [{ path = \"a.jsonl\", weight = 1.0 }, \
             { path = \"b.jsonl\", weight = 1.0, text_len = 128 }]",
        );
        let d = parse(&text).unwrap().data;
        let limits: Vec<_> = d.mixture.iter().map(|s| d.limits(s)).collect();
        let expect =
            |text_len| TextLimits { text_len: Some(text_len), max_suffix_tokens: Some(8), ..TextLimits::default() };
        assert_eq!(limits, [expect(32), expect(128)]);
    }

    #[test]
    fn unknown_key_names_key_and_section() {
        let err = parse(&GOOD.replace("lr = 1e-5", "lr = 1e-5\nlearning_rate = 3")).unwrap_err().to_string();
        assert!(err.contains("learning_rate") && err.contains("train"), "{err}");
    }

    #[test]
    fn typos_get_the_closest_key() {
        let err = parse(&GOOD.replace("lr = 1e-5", "lr = 1e-5\nbatch_sise = 3")).unwrap_err().to_string();
        assert!(err.contains("did you mean `batch_size`?"), "{err}");
    }

    #[test]
    fn base_recipes_merge_and_overrides_win() {
        let dir = std::env::temp_dir().join(format!("pg2-recipe-base-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        std::fs::write(dir.join("base.toml"), GOOD).unwrap();
        let child =
            "base = \"../base.toml\"\nname = \"child\"\n[train]\nsteps = 99\n[data]\ntokenizer = \"tok.json\"\n";
        std::fs::write(dir.join("sub/child.toml"), child).unwrap();
        let overrides = [
            "train.lr=0.5".to_string(),
            "data.mixture=[{path = \"$DATA/x.jsonl\", weight = 2.0}]".into(),
            "data.root=/data".into(),
        ];
        let (r, table) = Recipe::load(&dir.join("sub/child.toml"), &overrides).unwrap();
        assert_eq!(
            (r.name.as_deref(), r.train.steps, r.train.batch_size, r.train.lr),
            (Some("child"), Some(99), 4, 0.5)
        );
        assert_eq!(r.data.tokenizer, dir.join("sub/tok.json"), "paths resolve against the file that sets them");
        assert_eq!(r.data.mixture[0].path, PathBuf::from("/data/x.jsonl"));
        assert_eq!(table["train"]["steps"].as_integer(), Some(99));
        assert!(r.missing_sources()[0].starts_with("/data/x.jsonl"));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn lora_sections_default_and_refuse_what_cannot_work() {
        let lora = GOOD.replace("init = \"tiny\"", "init = \"base\"") + "[lora]\nrank = 8\n";
        let config = parse(&lora).unwrap().lora().unwrap();
        assert_eq!((config.rank, config.alpha, config.dropout), (8, 8.0, 0.0));
        assert_eq!(config.targets, LoraConfig::default_targets());
        assert!(parse(&lora.replace("rank = 8", "rank = 0")).unwrap().lora().is_none(), "rank 0: full fine-tune");
        assert_eq!(parse(&lora).unwrap().base_dtype(), BaseDtype::Model);
        assert_eq!(parse(&(lora.clone() + "base_dtype = \"int8\"\n")).unwrap().base_dtype(), BaseDtype::Int8);
        for (edit, names) in [
            (GOOD.to_string() + "[lora]\nrank = 8\n", &["model.init"][..]),
            (
                lora.replace("resolution = 64", "resolution = 64\nfreeze = [\"vision\"]"),
                &["model.freeze", "lora.train"],
            ),
            (lora.clone() + "dropout = 1.0\n", &["lora.dropout"]),
            (
                lora.replace("resolution = 64", "resolution = 64\nactivation_checkpointing = true") + "dropout = 0.1\n",
                &["activation_checkpointing", "lora.dropout"],
            ),
            (lora.clone() + "targets = []\n", &["lora.targets"]),
            (lora.clone() + "base_dtype = \"int4\"\n", &["base_dtype", "int4", "int8"]),
            (lora.clone() + "base_dtype = \"int8\"\ntrain = [\"decoder\"]\n", &["lora.base_dtype", "lora.train"]),
        ] {
            let err = parse(&edit).unwrap_err().to_string();
            assert!(names.iter().all(|n| err.contains(n)), "{names:?}: {err}");
        }
    }

    #[test]
    fn impossible_values_are_rejected() {
        let err = parse(&GOOD.replace("dtype", "x").replace("resolution = 64", "resolution = 64\ndtype = \"f16\""))
            .unwrap_err()
            .to_string();
        assert!(err.contains("f16"), "{err}");
        // NaN fails every comparison, so `x <= 0.0` alone would let it through.
        for weight in ["0.0", "nan"] {
            let err = parse(&GOOD.replace("weight = 1.0", &format!("weight = {weight}"))).unwrap_err().to_string();
            assert!(err.contains("positive weight"), "{weight}: {err}");
        }
        assert!(parse(&GOOD.replace("lr = 1e-5", "lr = nan")).is_err());
        // Values that parse but cannot be meant, named with their valid range.
        for (edit, names) in [
            (("lr = 1e-5", "lr = inf"), "train.lr = inf: expected a positive"),
            (("lr = 1e-5", "lr = 1e-5\nb2 = 1.0"), "train.b2 = 1: expected a value in [0, 1)"),
            (("lr = 1e-5", "lr = 1e-5\nb2 = -0.5"), "train.b2 = -0.5"),
            (("lr = 1e-5", "lr = 1e-5\nweight_decay = inf"), "train.weight_decay = inf"),
            (
                ("lr = 1e-5", "lr = 1e-5\nlr_mults = { \"vision_tower.\" = inf }"),
                "train.lr_mults.\"vision_tower.\" = inf",
            ),
            (("weight = 1.0", "weight = inf"), "positive weight"),
            (("resolution = 64", "resolution = 0"), "model.resolution = 0"),
        ] {
            let err = parse(&GOOD.replace(edit.0, edit.1)).unwrap_err().to_string();
            assert!(err.contains(names), "{edit:?}: {err}");
        }
        let err = parse(&GOOD.replace("mixture =", "text_len = 1\nmixture =")).unwrap_err().to_string();
        assert!(err.contains("text_len = 1: expected at least 2"), "{err}");
        let err = parse(&GOOD.replace("steps = 10", "steps = 10\nepochs = 2.0")).unwrap_err().to_string();
        assert!(err.contains("exactly one of"), "{err}");
        let err =
            parse(&GOOD.replace("resolution = 64", "resolution = 64\nfreeze = [\"vit\"]")).unwrap_err().to_string();
        assert!(err.contains("`vit`") && err.contains("`vision`"), "{err}");
        let img = parse(&GOOD.replace("resolution = 64", "resolution = 64\nfreeze = [\"img\"]")).unwrap();
        assert_eq!(img.model.freeze, [Part::Vision, Part::Projector], "big_vision's img/.* holds the projector");
        let err = parse(&GOOD.replace("steps = 10", "steps = \"ten\"")).unwrap_err().to_string();
        assert!(err.contains("steps") && err.contains("ten"), "{err}");
        let err =
            parse(&GOOD.replace("resolution = 64", "resolution = 64\ndropout = 0.1\nactivation_checkpointing = true"))
                .unwrap_err()
                .to_string();
        assert!(err.contains("activation_checkpointing") && err.contains("dropout"), "{err}");
        let columns = "columns = { prefix = \"{question}\" } }]";
        let err = parse(&GOOD.replace("weight = 1.0 }]", &format!("weight = 1.0, {columns}"))).unwrap_err().to_string();
        assert!(
            err.contains("data.mixture[].columns is for parquet sources; ") && err.contains("train.jsonl"),
            "{err}"
        );
        let parquet = GOOD.replace("train.jsonl\", weight = 1.0 }]", &format!("t.parquet\", weight = 1.0, {columns}"));
        parse(&parquet).unwrap();
        let err = parse(&parquet.replace("weight = 1.0,", "weight = 1.0, prefix = \"x\",")).unwrap_err().to_string();
        assert!(err.contains("sets both prefix and columns.prefix"), "{err}");
        let both = "weight = 1.0, suffix = \"{x}\", suffix_from = \"answers\" }]";
        let err = parse(&GOOD.replace("weight = 1.0 }]", both)).unwrap_err().to_string();
        assert!(err.contains("sets both suffix and suffix_from"), "{err}");
        let full = GOOD.replace("steps = 10", "steps = 10\nsharding = \"full\"");
        let err = parse(&full).unwrap_err().to_string();
        assert!(err.contains("train.sharding") && err.contains("model.activation_checkpointing"), "{err}");
        parse(&full.replace("resolution = 64", "resolution = 64\nactivation_checkpointing = true")).unwrap();
    }
}
