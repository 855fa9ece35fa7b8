//! `pg2`: score, predict with and inspect PaliGemma 2 checkpoints (Hugging Face model folders).

mod bench;

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use pg2_data::{convert, image, source, synth, Batch, EncodedExample, PgTokenizer};
use pg2_model::{checkpoint, generate, DecodeOptions, PaliGemma, RunOptions};
use tch::Kind;

#[derive(Parser)]
#[command(name = "pg2", version, about = "PaliGemma 2 tools: score, predict, inspect checkpoints")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Log-probability of each record's suffix (+ <eos>) given image and prefix: one JSON line per record.
    Score {
        #[command(flatten)]
        model: ModelArgs,
        /// JSONL file of {"image", "prefix", "suffix"} records.
        #[arg(long)]
        data: PathBuf,
        /// Records per forward pass.
        #[arg(long, default_value_t = 8)]
        batch_size: usize,
    },
    /// Decode a continuation of each record's prefix: one {"prediction": ...} JSON line per record.
    Predict {
        #[command(flatten)]
        model: ModelArgs,
        /// JSONL file of {"image", "prefix"} records (a "suffix" is ignored).
        #[arg(long)]
        data: PathBuf,
        /// Beam size; 1 decodes greedily.
        #[arg(long, default_value_t = 1)]
        beam: usize,
        /// Most tokens generated per record.
        #[arg(long, default_value_t = 32)]
        max_len: usize,
        /// Beam hypotheses rank by sum logprob / length^penalty.
        #[arg(long, default_value_t = 1.0)]
        length_penalty: f64,
        /// Records decoded together.
        #[arg(long, default_value_t = 8)]
        batch_size: usize,
    },
    /// Print a checkpoint's configuration, parameter counts per component and dtype.
    Inspect {
        /// Hugging Face model folder (config.json + safetensors).
        #[arg(long)]
        checkpoint: PathBuf,
    },
    /// Benchmarks that print pg2's figures next to the same work done by transformers.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Convert a public dataset's annotation files into pg2 JSONL.
    #[command(after_help = format!("Formats and their inputs:\n{}", convert::Format::help()))]
    Convert {
        /// Dataset format (see below).
        format: convert::Format,
        /// Annotation files, in the order the format lists them (repeat the flag).
        #[arg(long = "input", required = true)]
        inputs: Vec<PathBuf>,
        /// The folder the dataset's image names are relative to.
        #[arg(long)]
        images: PathBuf,
        /// The JSONL file to write (image paths are written relative to it).
        #[arg(long)]
        output: PathBuf,
        /// Keep one split (ocrvqa, refcoco).
        #[arg(long)]
        split: Option<String>,
        /// Leave out records whose image is missing instead of failing.
        #[arg(long)]
        skip_missing: bool,
    },
    /// The embedded demo data.
    #[command(subcommand)]
    Data(DataCommand),
    /// Evaluate a checkpoint with a recipe's [eval] block: prints the scores as JSON and
    /// writes the predictions to OUT/eval/step-NNNNNN.jsonl.
    Eval {
        /// A model folder, or a run folder (its checkpoints/latest).
        #[arg(long)]
        checkpoint: PathBuf,
        /// The recipe whose [eval] block (and model settings) to use.
        #[arg(long)]
        recipe: PathBuf,
        /// Override a recipe key (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        overrides: Vec<String>,
        /// Where the predictions go.
        #[arg(long, default_value = ".")]
        out: PathBuf,
        #[arg(long, default_value = "auto")]
        device: String,
    },
    /// A Markdown table of finished runs: task, metric, pg2's last evaluation, the paper's result.
    Report {
        /// Run folders (runs/<name>).
        #[arg(required = true)]
        runs: Vec<PathBuf>,
    },
    /// Score predictions: prints one JSON object, e.g. {"cider": 1.0132, "n": 40}.
    Metric {
        /// cider, bleu4, vqa, anls, relaxed, exact or refcoco.
        #[arg(long)]
        metric: pg2_eval::Metric,
        /// JSONL with `prediction` and the references the metric needs.
        #[arg(long)]
        predictions: PathBuf,
    },
}

#[derive(Subcommand)]
enum DataCommand {
    /// Write the synthetic multitask dataset (shapes, counts, colours, boxes, digits) with
    /// its tokenizer; deterministic from the seed.
    Synth {
        /// Output folder.
        #[arg(long, default_value = "data/synth")]
        out: PathBuf,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Training examples.
        #[arg(long, default_value_t = synth::SynthOptions::default().train)]
        train: usize,
        /// Validation examples.
        #[arg(long, default_value_t = synth::SynthOptions::default().val)]
        val: usize,
        /// Image side in pixels.
        #[arg(long, default_value_t = synth::SynthOptions::default().canvas)]
        canvas: u32,
    },
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Images/s per core of decode + resize + normalise, against transformers' SigLIP image
    /// processor (PIL + numpy) on the same files.
    Data {
        /// Folder of JPEG/PNG images; by default 640x480 JPEGs are generated.
        #[arg(long)]
        images: Option<PathBuf>,
        /// Images to time.
        #[arg(long, default_value_t = 64)]
        count: usize,
        /// Output resolutions.
        #[arg(long, value_delimiter = ',', default_value = "224,448,896")]
        resolutions: Vec<u32>,
        /// Python with transformers and pillow, for the baseline.
        #[arg(long, default_value = "python3")]
        python: String,
    },
    /// Step time and FLOP utilisation of a released-shape PaliGemma 2 with random weights.
    Model {
        /// Model size in billions: 3, 10 or 28.
        #[arg(long, default_value_t = 3)]
        size: u32,
        /// Image resolution: 224, 448 or 896.
        #[arg(long, default_value_t = 224)]
        resolution: usize,
        #[arg(long, default_value_t = 8)]
        batch: i64,
        /// Text tokens per example (half prompt, half target).
        #[arg(long, default_value_t = 128)]
        text_len: i64,
        #[arg(long, value_enum, default_value = "bf16")]
        dtype: DtypeArg,
        /// cpu, cuda, cuda:N, or auto.
        #[arg(long, default_value = "auto")]
        device: String,
        /// Timed steps (after one warm-up step).
        #[arg(long, default_value_t = 5)]
        steps: usize,
        /// Time forward + backward instead of forward alone.
        #[arg(long)]
        train: bool,
        /// Transfer's setting: soft-caps off, so attention runs libtorch's fused kernel.
        #[arg(long)]
        no_soft_caps: bool,
        /// With --train: also the fused AdamW update, with f32 master weights and moments
        /// for bf16 parameters, as the trainer runs it.
        #[arg(long, requires = "train")]
        optimizer: bool,
        /// With --train: activation checkpointing (model.activation_checkpointing); its
        /// recomputed forward is not counted in the utilisation.
        #[arg(long, requires = "train")]
        recompute: bool,
        /// With --train: soft-capped attention recomputes its scores in the backward pass
        /// (model.lean_attention), so one layer's scores exist at a time.
        #[arg(long, requires = "train")]
        lean_attention: bool,
        /// The accelerator's dense peak in TFLOP/s for the utilisation figure (H100/H200 bf16: 989).
        #[arg(long, default_value_t = 989.0)]
        peak_tflops: f64,
    },
    /// Training steps/s, first-step loss and peak memory of a random PaliGemma 2 on the CPU,
    /// against transformers + torch.optim.AdamW on the same checkpoint, batch and threads.
    Train {
        #[arg(long, value_enum, default_value = "tiny")]
        shape: bench::Shape,
        #[arg(long, default_value_t = 16)]
        batch: i64,
        /// Timed steps (after one warm-up step).
        #[arg(long, default_value_t = 20)]
        steps: usize,
        /// Activation checkpointing on both sides: less memory, more compute.
        #[arg(long)]
        recompute: bool,
        /// pg2 only (transformers has no counterpart): soft-capped attention recomputes its
        /// scores in the backward pass (model.lean_attention).
        #[arg(long)]
        lean_attention: bool,
        #[command(flatten)]
        sides: bench::Sides,
    },
    /// Generated tokens/s of greedy decoding with a KV cache from a random PaliGemma 2,
    /// against transformers' generate on the same checkpoint, prompts and threads.
    Decode {
        #[arg(long, value_enum, default_value = "tiny")]
        shape: bench::Shape,
        #[arg(long, default_value_t = 16)]
        batch: i64,
        /// Tokens generated per prompt.
        #[arg(long, default_value_t = 32)]
        new_tokens: usize,
        /// Timed runs (after one warm-up run).
        #[arg(long, default_value_t = 3)]
        runs: usize,
        #[command(flatten)]
        sides: bench::Sides,
    },
    /// How much of a recipe's batches padding fills, with its examples dealt out in stream
    /// order and sorted by length within each update (data.bucket_by_length). Tokenizes
    /// the sources; reads no image.
    Padding {
        /// The recipe whose mixture, text limits, batch size and accumulation to use.
        recipe: PathBuf,
        /// Override a recipe key (repeatable), e.g. --set train.grad_accumulation=8.
        #[arg(long = "set", value_name = "KEY=VALUE")]
        overrides: Vec<String>,
        /// Workers the batch is split over.
        #[arg(long, default_value_t = 1)]
        nproc: usize,
        /// Updates to count.
        #[arg(long, default_value_t = 50)]
        updates: usize,
    },
    /// Correctness and bandwidth of the gradient all-reduce (NCCL on CUDA, the TCP ring on
    /// the CPU): alone (a group of one), or one process per rank under torchrun-style
    /// variables (RANK, WORLD_SIZE, MASTER_ADDR, ...), e.g. started by srun.
    Allreduce {
        /// cpu, cuda, cuda:N, or auto; a worker takes GPU LOCAL_RANK.
        #[arg(long, default_value = "auto")]
        device: String,
        /// Megabytes of f32 per all-reduce (the trainer's default bucket is 25).
        #[arg(long, default_value_t = 64.0)]
        size_mb: f64,
        /// Timed all-reduces (after one warm-up).
        #[arg(long, default_value_t = 20)]
        iters: usize,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum DtypeArg {
    F32,
    Bf16,
}

#[derive(Args)]
struct ModelArgs {
    /// Hugging Face model folder (config.json, safetensors, tokenizer.json).
    #[arg(long)]
    checkpoint: PathBuf,
    /// Tokenizer file; defaults to CHECKPOINT/tokenizer.json.
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Compute dtype.
    #[arg(long, value_enum, default_value = "f32")]
    dtype: DtypeArg,
    /// cpu, cuda, cuda:N, or auto (the first GPU if there is one).
    #[arg(long, default_value = "auto")]
    device: String,
    /// Switch off the attention and final-logit soft-caps (as transfer runs train without them).
    #[arg(long)]
    no_soft_caps: bool,
    /// Apply the config's sliding window on its local layers, as transformers does
    /// (big_vision, which trained the released weights, attends globally).
    #[arg(long)]
    sliding_window: bool,
}

impl DtypeArg {
    fn kind(self) -> Kind {
        match self {
            DtypeArg::F32 => Kind::Float,
            DtypeArg::Bf16 => Kind::BFloat16,
        }
    }
}

impl ModelArgs {
    fn load(&self) -> Result<(PaliGemma, PgTokenizer)> {
        let kind = self.dtype.kind();
        let options = RunOptions { soft_caps: !self.no_soft_caps, sliding_window: self.sliding_window, ..RunOptions::default() };
        let device = pg2_model::parse_device(&self.device)?;
        pg2_model::keep_freed_memory(device);
        eprintln!("pg2: loading {} on {device:?} in {kind:?}", self.checkpoint.display());
        let model = PaliGemma::load(&self.checkpoint, device, kind, options)?;
        let tokenizer_path = self.tokenizer.clone().unwrap_or_else(|| self.checkpoint.join("tokenizer.json"));
        let tokenizer = PgTokenizer::from_file(&tokenizer_path)?;
        Ok((model, tokenizer))
    }
}

fn progress(len: usize, what: &str) -> ProgressBar {
    let bar = ProgressBar::new(len as u64);
    bar.set_style(ProgressStyle::with_template("{msg} {bar:30} {pos}/{len} [{elapsed} < {eta}]").unwrap());
    bar.set_message(what.to_string());
    bar
}

fn score(args: &ModelArgs, data: &Path, batch_size: usize) -> Result<()> {
    let (model, tok) = args.load()?;
    let records = source::read_jsonl(data)?;
    let (res, n_image) = (model.config.vision.image_size as u32, model.config.vision.num_patches());
    let bar = progress(records.len(), "score");
    for chunk in records.chunks(batch_size.max(1)) {
        let examples = chunk
            .iter()
            .map(|r| {
                let suffix = r.suffix.as_deref().ok_or_else(|| r.error("record has no `suffix` to score"))?;
                Ok(EncodedExample::new(&tok, n_image, &r.prefix, Some(suffix)))
            })
            .collect::<Result<Vec<_>, pg2_data::DataError>>()?;
        let batch = Batch::collate(&examples, Some(image::load_pixels(chunk, res)?), tok.pad_id, model.device());
        let logprobs = tch::no_grad(|| model.sequence_logprobs(&batch.inputs, &batch.loss_mask))?;
        for (example, logprob) in examples.iter().zip(logprobs) {
            bar.suspend(|| println!("{}", serde_json::json!({"logprob": logprob, "tokens": example.num_targets()})));
        }
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();
    Ok(())
}

fn predict(args: &ModelArgs, data: &Path, decode: DecodeOptions, batch_size: usize) -> Result<()> {
    let (model, tok) = args.load()?;
    let records = source::read_jsonl(data)?;
    let (res, n_image) = (model.config.vision.image_size as u32, model.config.vision.num_patches());
    let opts = DecodeOptions { eos_id: tok.eos_id, pad_id: tok.pad_id, ..decode };
    let bar = progress(records.len(), "predict");
    for chunk in records.chunks(batch_size.max(1)) {
        let examples: Vec<_> = chunk.iter().map(|r| EncodedExample::new(&tok, n_image, &r.prefix, None)).collect();
        let batch = Batch::collate(&examples, Some(image::load_pixels(chunk, res)?), tok.pad_id, model.device());
        for tokens in generate(&model, &batch.inputs, &opts)? {
            bar.suspend(|| println!("{}", serde_json::json!({"prediction": tok.decode(&tokens)})));
        }
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();
    Ok(())
}

fn inspect(dir: &Path) -> Result<()> {
    let config = pg2_model::PaliGemmaConfig::from_file(&dir.join("config.json"))?;
    let tensors = checkpoint::read_tensors(dir)?;
    let (t, v) = (&config.text, &config.vision);
    println!("checkpoint  {}", dir.display());
    println!("vision      SigLIP {}px /{} patches ({} tokens), width {}, depth {}, MLP {}, {} heads",
        v.image_size, v.patch_size, v.num_patches(), v.hidden_size, v.num_hidden_layers, v.intermediate_size, v.num_attention_heads);
    println!("decoder     Gemma 2 width {}, depth {}, MLP {}, {} heads / {} KV heads of {}, query scale 1/sqrt({})",
        t.hidden_size, t.num_hidden_layers, t.intermediate_size, t.num_attention_heads, t.num_key_value_heads, t.head_dim, t.query_pre_attn_scalar);
    println!("            vocab {}, soft-caps attention {:?} final {:?}, rope theta {}, window {:?} (off unless asked)",
        t.vocab_size, t.attn_logit_softcapping, t.final_logit_softcapping, t.rope_theta, t.sliding_window);
    let mut counts = [("vision", 0i64), ("projector", 0), ("decoder", 0)];
    let mut kinds = std::collections::BTreeSet::new();
    for (name, tensor) in &tensors {
        let part = if name.starts_with(checkpoint::VISION) { 0 } else if name.starts_with(checkpoint::PROJECTOR) { 1 } else { 2 };
        counts[part].1 += tensor.numel() as i64;
        kinds.insert(format!("{:?}", tensor.kind()));
    }
    for (part, n) in counts {
        println!("params      {part:<10} {n:>15} ({:.3}B)", n as f64 / 1e9);
    }
    let total: i64 = counts.iter().map(|c| c.1).sum();
    println!("params      {:<10} {total:>15} ({:.3}B)", "total", total as f64 / 1e9);
    println!("dtype       {}", kinds.into_iter().collect::<Vec<_>>().join(", "));
    Ok(())
}

/// One row of `pg2 report`: the run's last `eval/<metric>` line against the paper's number
/// for the checkpoint's size and resolution (the recipe's `eval.paper`).
fn report_row(run: &Path) -> Result<String> {
    let (recipe, _) = pg2_train::Recipe::load(&run.join("recipe.toml"), &[])?;
    let eval = recipe.eval.as_ref().with_context(|| format!("{}: the recipe has no [eval]", run.display()))?;
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).with_context(|| format!("{}: no metrics.jsonl", run.display()))?;
    let lines: Vec<serde_json::Value> = metrics.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    let last = lines.iter().rev().find_map(|v| {
        let (key, value) = v.as_object()?.iter().find(|(k, _)| k.starts_with("eval/"))?;
        Some((key.trim_start_matches("eval/").to_string(), value.as_f64()?, v["step"].as_u64()?))
    });
    let Some((key, value, step)) = last else { bail!("{}: no evaluation logged yet", run.display()) };
    let checkpoint = std::fs::read_to_string(run.join("checkpoints/latest")).map(|n| run.join("checkpoints").join(n.trim()));
    let shape = checkpoint.ok().and_then(|dir| pg2_model::PaliGemmaConfig::from_file(&dir.join("config.json")).ok()).map(|c| {
        let size = match c.text.hidden_size { 2304 => "3b", 3584 => "10b", 4608 => "28b", _ => "custom" };
        format!("{size}-{}", c.vision.image_size)
    });
    let paper = shape.as_ref().and_then(|s| eval.paper.get(s)).map_or("n/a".to_string(), |p| format!("{p:.4}"));
    let name = recipe.name.clone().unwrap_or_default();
    Ok(format!("| {name} | {} ({key}) | {} | {value:.4} (step {step}) | {paper} |", eval.metric, shape.unwrap_or_default()))
}

fn report(runs: &[PathBuf]) -> Result<()> {
    println!("| task | metric | model | pg2 | paper |");
    println!("|---|---|---|---|---|");
    for run in runs {
        println!("{}", report_row(run)?);
    }
    Ok(())
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Command::Score { model, data, batch_size } => score(&model, &data, batch_size),
        Command::Predict { model, data, beam, max_len, length_penalty, batch_size } => {
            let decode = DecodeOptions { max_new_tokens: max_len, beam_size: beam, eos_id: 0, pad_id: 0, length_penalty };
            predict(&model, &data, decode, batch_size)
        }
        Command::Inspect { checkpoint } => inspect(&checkpoint),
        Command::Report { runs } => report(&runs),
        Command::Eval { checkpoint, recipe, overrides, out, device } => {
            let (recipe, _) = pg2_train::Recipe::load(&recipe, &overrides)?;
            let device = pg2_model::parse_device(&device)?;
            pg2_model::keep_freed_memory(device);
            let scores = pg2_train::evaluate_checkpoint(&recipe, &checkpoint, device, &out)?;
            println!("{}", serde_json::Value::Object(scores));
            Ok(())
        }
        Command::Metric { metric, predictions } => {
            println!("{}", serde_json::Value::Object(pg2_eval::score_file(metric, &predictions)?));
            Ok(())
        }
        Command::Convert { format, inputs, images, output, split, skip_missing } => {
            let summary = convert::convert(&convert::ConvertArgs { format, inputs, images, output: output.clone(), split, skip_missing })?;
            eprintln!("pg2 convert: wrote {} records to {}", summary.records, output.display());
            if summary.skipped_records > 0 {
                eprintln!("pg2 convert: left out {} records whose {} images are missing, e.g. {}",
                    summary.skipped_records, summary.missing_images.len(), summary.missing_images[0].display());
            }
            Ok(())
        }
        Command::Data(DataCommand::Synth { out, seed, train, val, canvas }) => {
            let start = std::time::Instant::now();
            let summary = synth::write_synth(&out, &synth::SynthOptions { seed, train, val, canvas })?;
            eprintln!("pg2 data synth: {} train and {} val examples of {} in {} ({:.1}s), tokenizer of {} tokens",
                summary.train, summary.val, summary.tasks.join(", "), out.display(), start.elapsed().as_secs_f64(), summary.vocab_size);
            Ok(())
        }
        Command::Bench(BenchCommand::Data { images, count, resolutions, python }) => {
            bench::data(images.as_deref(), count, &resolutions, &python)
        }
        Command::Bench(BenchCommand::Model { size, resolution, batch, text_len, dtype, device, steps, train, no_soft_caps, optimizer, recompute, lean_attention, peak_tflops }) => {
            bench::model(&bench::ModelBench {
                size_b: size,
                resolution,
                batch,
                text_len,
                kind: dtype.kind(),
                device: pg2_model::parse_device(&device)?,
                steps: steps.max(1),
                train,
                no_soft_caps,
                optimizer,
                recompute,
                lean_attention,
                peak_tflops,
            })
        }
        Command::Bench(BenchCommand::Train { shape, batch, steps, recompute, lean_attention, sides }) => {
            bench::train(&bench::TrainBench { shape, batch, steps: steps.max(1), recompute, lean_attention, sides })
        }
        Command::Bench(BenchCommand::Decode { shape, batch, new_tokens, runs, sides }) => {
            bench::decode(&bench::DecodeBench { shape, batch, new_tokens, runs: runs.max(1), sides })
        }
        Command::Bench(BenchCommand::Padding { recipe, overrides, nproc, updates }) => {
            let (recipe, _) = pg2_train::Recipe::load(&recipe, &overrides)?;
            let t = &recipe.train;
            println!("{updates} updates of {} examples: {} micro-batch(es) each, {} examples per worker in each, {nproc} worker(s)", t.batch_size * t.grad_accumulation, t.grad_accumulation, t.batch_size / nproc.max(1));
            println!("{:<22} {:>12} {:>12} {:>9}", "order", "real tokens", "in batches", "padding");
            for (order, counts) in ["stream", "bucketed by length"].iter().zip(pg2_train::padding(&recipe, nproc, updates)?) {
                let share = 100.0 * (counts.padded - counts.real) as f64 / counts.padded.max(1) as f64;
                println!("{order:<22} {:>12} {:>12} {share:>8.1}%", counts.real, counts.padded);
            }
            Ok(())
        }
        Command::Bench(BenchCommand::Allreduce { device, size_mb, iters }) => bench::allreduce(&device, size_mb, iters.max(1)),
    }
}
