//! `pg2 bench ...`: benchmarks that print figures next to the same work done by the
//! tools users compare pg2 with, in the same run.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use pg2_data::image;
use pg2_model::{checkpoint, PaliGemma, PaliGemmaConfig, RunOptions, Weights};
use tch::{Device, Kind, Tensor};

mod decode;
mod overlap;
mod padding;
mod sources;
mod train;

pub use decode::{decode, DecodeBench};
pub use overlap::{overlap, OverlapBench};
pub use train::{train, TrainBench};

use crate::device::{keep_freed_memory, parse_device, prepare_device, user_tunes_allocator, KEEP_FREED_MEMORY_ENV};
use crate::model_args::DtypeArg;

const BASELINE: &str = include_str!("siglip_baseline.py");

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Images/s per core of decode + resize + normalise, against transformers' SigLIP image
    /// processor (PIL + numpy) on the same files; then examples/s of the whole input
    /// pipeline on one decoding thread, reading the images from JSONL + files, tar shards
    /// and parquet.
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
        /// The tokenizer of the pipeline table: by default the small one of the test fixtures;
        /// a checkpoint's `tokenizer.json` tokenizes as Gemma's 256k vocabulary does.
        #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/paligemma/tokenizer.json"))]
        tokenizer: PathBuf,
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
        /// With --train: train LoRA adapters alone (and the projector) on the frozen model.
        #[command(flatten)]
        lora: crate::plan::LoraArgs,
    },
    /// Training steps/s, first-step loss and peak memory of a random PaliGemma 2 on the CPU,
    /// against transformers + torch.optim.AdamW on the same checkpoint, batch and threads.
    Train {
        #[arg(long, value_enum, default_value = "tiny")]
        shape: Shape,
        #[arg(long, default_value_t = 16)]
        batch: i64,
        /// Timed steps (after one warm-up step).
        #[arg(long, default_value_t = 20, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
        steps: usize,
        /// Activation checkpointing on both sides: less memory, more compute.
        #[arg(long)]
        recompute: bool,
        /// pg2 only (transformers has no counterpart): soft-capped attention recomputes its
        /// scores in the backward pass (model.lean_attention).
        #[arg(long)]
        lean_attention: bool,
        #[command(flatten)]
        sides: Sides,
    },
    /// Generated tokens/s of greedy decoding with a KV cache from a random PaliGemma 2,
    /// against transformers' generate on the same checkpoint, prompts and threads.
    Decode {
        #[arg(long, value_enum, default_value = "tiny")]
        shape: Shape,
        #[arg(long, default_value_t = 16)]
        batch: i64,
        /// Tokens generated per prompt.
        #[arg(long, default_value_t = 32)]
        new_tokens: usize,
        /// Timed runs (after one warm-up run).
        #[arg(long, default_value_t = 3)]
        runs: usize,
        #[command(flatten)]
        sides: Sides,
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
    /// How much of the gradient all-reduce hides behind backward (train.overlap_reduction):
    /// starts --workers CPU worker processes, each timing launch's training step with the
    /// reduction after backward and during it, and the reduction alone.
    Overlap {
        #[arg(long, value_enum, default_value = "small")]
        shape: Shape,
        /// Examples per worker and step.
        #[arg(long, default_value_t = 4)]
        batch: i64,
        /// Timed steps of each mode (after one warm-up step).
        #[arg(long, default_value_t = 5, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
        steps: usize,
        /// Worker processes (the machine's cores are shared out among them).
        #[arg(long, default_value_t = 2)]
        workers: usize,
        /// Set in the worker processes: the folder with the model and batch.
        #[arg(long, hide = true)]
        worker_dir: Option<PathBuf>,
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

/// Runs one `pg2 bench` subcommand.
pub fn run(command: &BenchCommand) -> Result<()> {
    match command {
        BenchCommand::Data { images, count, resolutions, python, tokenizer } => {
            data(images.as_deref(), *count, resolutions, python, tokenizer)
        }
        BenchCommand::Model {
            size,
            resolution,
            batch,
            text_len,
            dtype,
            device,
            steps,
            train,
            no_soft_caps,
            optimizer,
            recompute,
            lean_attention,
            peak_tflops,
            lora,
        } => model(&ModelBench {
            size_b: *size,
            resolution: *resolution,
            batch: *batch,
            text_len: *text_len,
            kind: dtype.kind(),
            device: prepare_device(device)?,
            steps: (*steps).max(1),
            train: *train,
            no_soft_caps: *no_soft_caps,
            optimizer: *optimizer,
            recompute: *recompute,
            lean_attention: *lean_attention,
            peak_tflops: *peak_tflops,
            lora: lora.lora(),
        }),
        BenchCommand::Train { shape, batch, steps, recompute, lean_attention, sides } => train(&TrainBench {
            shape: *shape,
            batch: *batch,
            steps: *steps,
            recompute: *recompute,
            lean_attention: *lean_attention,
            sides: sides.clone(),
        }),
        BenchCommand::Decode { shape, batch, new_tokens, runs, sides } => decode(&DecodeBench {
            shape: *shape,
            batch: *batch,
            new_tokens: *new_tokens,
            runs: (*runs).max(1),
            sides: sides.clone(),
        }),
        BenchCommand::Padding { recipe, overrides, nproc, updates } => {
            padding::run(recipe, overrides, *nproc, *updates)
        }
        BenchCommand::Overlap { shape, batch, steps, workers, worker_dir } => overlap(&OverlapBench {
            shape: *shape,
            batch: *batch,
            steps: *steps,
            workers: *workers,
            worker_dir: worker_dir.clone(),
        }),
        BenchCommand::Allreduce { device, size_mb, iters } => allreduce(device, *size_mb, (*iters).max(1)),
    }
}

/// Writes `count` photo-like JPEGs (640x480, smooth colours plus noise, as COCO-sized
/// inputs) so the benchmark needs no download.
fn sample_images(dir: &Path, count: usize) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    (0..count)
        .map(|i| {
            let mut state = 0x2545_F491_4F6C_DD1Du64.wrapping_add(i as u64);
            let img = ::image::RgbImage::from_fn(640, 480, |x, y| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                let noise = (state % 32) as u32;
                let c = |k: u32| ((x * k / 7 + y * (9 - k) / 5 + i as u32 * 37 + noise) % 256) as u8;
                ::image::Rgb([c(1), c(4), c(8)])
            });
            let path = dir.join(format!("{i:03}.jpg"));
            img.save(&path).with_context(|| format!("writing {}", path.display()))?;
            Ok(path)
        })
        .collect()
}

/// Images per second of pg2's decode + resize + normalise on one thread, antialiased as the
/// baseline (transformers' processor resizes with PIL's antialiased bilinear).
fn pg2_rate(files: &[PathBuf], res: u32) -> Result<f64> {
    let start = Instant::now();
    for f in files {
        let img = image::load_rgb(f).map_err(anyhow::Error::msg)?;
        std::hint::black_box(image::preprocess(
            &img,
            image::Resize { size: res, antialias: true, pad_to_square: false },
        ));
    }
    Ok(files.len() as f64 / start.elapsed().as_secs_f64())
}

/// Runs the Python baseline; `None` (with the reason printed) when it cannot run here.
fn baseline_rates(python: &str, files: &[PathBuf], resolutions: &[u32]) -> Result<Option<Vec<f64>>> {
    let list = resolutions.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
    let args: Vec<&std::ffi::OsStr> =
        std::iter::once(list.as_ref()).chain(files.iter().map(|f| f.as_os_str())).collect();
    let Some(stdout) = run_script(python, "siglip-baseline", BASELINE, &args)? else { return Ok(None) };
    let rates = String::from_utf8(stdout)?
        .lines()
        .map(|l| -> Result<f64> {
            serde_json::from_str::<serde_json::Value>(l)?["images_per_s"].as_f64().context("baseline output")
        })
        .collect::<Result<Vec<f64>>>()?;
    if rates.len() != resolutions.len() {
        bail!("the baseline printed {} results for {} resolutions", rates.len(), resolutions.len());
    }
    Ok(Some(rates))
}

/// `pg2 bench data`: decode + resize at each resolution, pg2 against transformers, then the
/// whole input pipeline over each kind of source.
pub fn data(images: Option<&Path>, count: usize, resolutions: &[u32], python: &str, tokenizer: &Path) -> Result<()> {
    keep_freed_memory(tch::Device::Cpu);
    let tmp = std::env::temp_dir().join(format!("pg2-bench-data-{}", std::process::id()));
    let files = match images {
        Some(dir) => {
            let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    p.extension()
                        .is_some_and(|x| ["jpg", "jpeg", "png"].contains(&x.to_string_lossy().to_lowercase().as_str()))
                })
                .collect();
            files.sort();
            files.truncate(count);
            files
        }
        None => sample_images(&tmp, count)?,
    };
    if files.is_empty() {
        bail!("no JPEG or PNG images to benchmark");
    }
    println!("decode + resize (bilinear, antialiased) + normalise, {} images, one thread each", files.len());
    let baseline = baseline_rates(python, &files, resolutions)?;
    println!("{:>10} {:>16} {:>22} {:>8}", "resolution", "pg2 images/s", "transformers images/s", "ratio");
    for (i, &res) in resolutions.iter().enumerate() {
        let ours = pg2_rate(&files, res)?;
        match &baseline {
            Some(rates) => println!("{res:>10} {ours:>16.1} {:>22.1} {:>7.2}x", rates[i], ours / rates[i]),
            None => println!("{res:>10} {ours:>16.1} {:>22} {:>8}", "n/a", "n/a"),
        }
    }
    let pipeline = sources::pipeline_rates(&files, &tmp.join("sources"), resolutions, tokenizer);
    std::fs::remove_dir_all(&tmp).ok(); // generated images and sources only: --images are elsewhere
    pipeline
}

/// Settings of `pg2 bench model`.
pub struct ModelBench {
    pub size_b: u32,
    pub resolution: usize,
    pub batch: i64,
    pub text_len: i64,
    pub kind: tch::Kind,
    pub device: tch::Device,
    pub steps: usize,
    pub train: bool,
    /// Transfer's setting: no soft-caps, so attention takes libtorch's fused kernel.
    pub no_soft_caps: bool,
    /// With `train`: the fused AdamW update too (f32 masters and moments for bf16).
    pub optimizer: bool,
    /// With `train`: activation checkpointing.
    pub recompute: bool,
    /// With `train`: soft-capped attention recomputes its scores in the backward pass.
    pub lean_attention: bool,
    pub peak_tflops: f64,
    /// With `train`: LoRA adapters train (and the parts they name), the rest frozen.
    pub lora: Option<(pg2_model::LoraConfig, pg2_model::BaseDtype)>,
}

/// `pg2 bench model`: forward (and backward) time of a released-shape PaliGemma 2 with
/// random weights on random inputs, with the FLOP count behind the utilisation figure.
pub fn model(b: &ModelBench) -> Result<()> {
    use pg2_model::{Inputs, PaliGemma, PaliGemmaConfig, RunOptions, TokenLayout, Weights};
    use tch::{Device, Kind, Tensor};

    let config = PaliGemmaConfig::paligemma2(b.size_b, b.resolution)?;
    let (t, v) = (&config.text, &config.vision);
    tch::manual_seed(0);
    let start = Instant::now();
    let options = RunOptions {
        soft_caps: !b.no_soft_caps,
        recompute: b.recompute,
        lean_attention: b.lean_attention,
        ..RunOptions::default()
    };
    let mut weights = Weights::random(b.device, b.kind);
    if let Some((lora, base)) = &b.lora {
        weights = weights.with_lora(pg2_model::Lora::fresh(lora.clone()).on_base(*base))?;
    }
    let model = PaliGemma::new(config.clone(), weights, options)?;
    // The parameters that train: all, or with LoRA the adapters and the parts it names.
    let trains = |p: &pg2_model::Param| model.lora().is_none_or(|l| pg2_model::lora::is_saved(l, p));
    let mut params: Vec<(String, Tensor)> =
        model.params().iter().filter(|p| trains(p)).map(|p| (p.name.clone(), p.tensor.shallow_clone())).collect();
    let counts = config.parameter_counts().map(|(part, n)| (part, n as f64));
    let (vision_params, text_params) = (counts[0].1, counts[1].1 + counts[2].1);
    println!(
        "PaliGemma 2 {}B at {} px: {:.3}B parameters, built in {:.1}s on {:?} in {:?}",
        b.size_b,
        b.resolution,
        (vision_params + text_params) / 1e9,
        start.elapsed().as_secs_f64(),
        b.device,
        b.kind
    );
    if b.train {
        for (_, p) in &params {
            let _ = p.set_requires_grad(true);
        }
    }
    let patches = v.num_patches() as i64;
    let seq = patches + b.text_len;
    let opts = (Kind::Int64, b.device);
    let text = Tensor::randint_low(4, 256_000, [b.batch, b.text_len], opts);
    let ids = Tensor::cat(&[Tensor::full([b.batch, patches], config.image_token_id, opts), text], 1);
    // Half the text is prompt (bidirectional), half target (causal, supervised).
    let position = Tensor::arange(seq, opts).unsqueeze(0).expand([b.batch, seq], false);
    let mask_ar = position.ge(patches + b.text_len / 2).to_kind(Kind::Int64);
    let inputs = Inputs {
        pixels: Some(
            Tensor::rand([b.batch, 3, b.resolution as i64, b.resolution as i64], (Kind::Float, b.device)) * 2.0 - 1.0,
        ),
        ids,
        layout: TokenLayout {
            mask_ar: mask_ar.shallow_clone(),
            valid: Tensor::ones([b.batch, seq], (Kind::Bool, b.device)),
        },
    };
    let loss_mask = mask_ar.to_kind(Kind::Bool);
    let mut adam = b.optimizer.then(|| {
        pg2_optim::Adam::new(
            params.iter().map(|(n, p)| (n.clone(), p.shallow_clone())).collect(),
            pg2_optim::AdamConfig::default(),
        )
    });
    let mut step = || -> Result<()> {
        if b.train {
            let (logprobs, _) = model.target_logprobs(&inputs, &loss_mask)?;
            (-logprobs.mean(Kind::Float)).backward();
            match adam.as_mut() {
                Some(adam) => adam.step(1.0), // clears the gradients too
                None => params.iter_mut().for_each(|(_, p)| p.zero_grad()),
            }
        } else {
            tch::no_grad(|| model.target_logprobs(&inputs, &loss_mask)).map(drop)?;
        }
        if let Device::Cuda(i) = b.device {
            tch::Cuda::synchronize(i as i64);
        }
        Ok(())
    };
    step()?; // warm-up: kernel selection, allocator
    crate::device::reset_peak_memory(b.device);
    let start = Instant::now();
    for _ in 0..b.steps {
        step()?;
    }
    let per_step = start.elapsed().as_secs_f64() / b.steps as f64;
    let peak = crate::device::peak_memory(b.device);
    // Matmul FLOPs: 2 per parameter per token (vision over patches, decoder over all tokens,
    // output head over supervised tokens), plus attention's two matmuls, 4 * T^2 * width per layer.
    let embed = (t.vocab_size * t.hidden_size) as f64;
    let (bt, targets) = (b.batch as f64, (b.text_len / 2) as f64);
    let vision = 2.0 * vision_params * patches as f64
        + 4.0 * (patches as f64).powi(2) * (v.hidden_size * v.num_hidden_layers) as f64;
    let text = 2.0 * (text_params - embed) * seq as f64
        + 2.0 * embed * targets
        + 4.0 * (seq as f64).powi(2) * (t.num_attention_heads * t.head_dim * t.num_hidden_layers) as f64;
    // Backward computes the inputs' gradients and the weights'; a frozen base's, the first alone.
    let passes = match (b.train, &b.lora) {
        (false, _) => 1.0,
        (true, None) => 3.0,
        (true, Some(_)) => 2.0,
    };
    let flops = bt * (vision + text) * passes;
    println!(
        "{} of batch {} x {} tokens: {:.1} ms/step, {:.0} tokens/s, {:.1} TFLOP/s = {:.1}% of {} TFLOP/s peak",
        match (b.train, b.optimizer) {
            (true, true) => "forward+backward+AdamW",
            (true, false) => "forward+backward",
            _ => "forward",
        },
        b.batch,
        seq,
        per_step * 1e3,
        bt * seq as f64 / per_step,
        flops / per_step / 1e12,
        100.0 * flops / per_step / 1e12 / b.peak_tflops,
        b.peak_tflops
    );
    let attention = match (b.no_soft_caps, b.train && b.lean_attention && !b.recompute) {
        (true, _) => "fused (no soft-caps)",
        (false, true) => "eager, soft-capped, scores recomputed in the backward pass (one layer's kept at a time)",
        (false, false) => "eager, soft-capped",
    };
    println!("attention: {attention}");
    if let (Some(peak), true) = (peak, b.train) {
        // What `pg2 plan` expects of this step: weights, gradients, the optimizer's state
        // and the activations kept for backward.
        let params = config.parameter_counts().iter().map(|c| c.1).sum();
        let mut shape = crate::plan::StepShape {
            config: config.clone(),
            params,
            trained: params,
            frozen: vec![],
            weight_bytes: b.kind.elt_size_in_bytes(),
            activation_bytes: b.kind.elt_size_in_bytes(),
            batch: b.batch as usize,
            text_tokens: b.text_len as usize,
            target_tokens: (b.text_len / 2) as usize,
            soft_caps: !b.no_soft_caps,
            gpus: 1,
            accumulation: 1,
            recompute: true,
            lora: None,
        };
        if let Some((lora, base)) = &b.lora {
            shape = shape.with_lora(lora, *base);
        }
        let state = shape.state(pg2_train::recipe::Sharding::None);
        let optimizer = if b.optimizer { state.optimizer } else { 0.0 };
        let keep = match (b.recompute, b.lean_attention) {
            (true, _) => crate::plan::Keep::Checkpointed,
            (false, true) => crate::plan::Keep::Lean,
            (false, false) => crate::plan::Keep::All,
        };
        let estimate = state.weights + state.gradients + optimizer + crate::plan::activation_bytes(&shape, keep);
        println!(
            "peak GPU memory allocated: {:.1} GB; pg2 plan estimates {:.1} GB (measured / estimated {:.2})",
            peak as f64 / 1e9,
            estimate / 1e9,
            peak as f64 / estimate
        );
    }
    Ok(())
}

/// `pg2 bench allreduce`: sums a tensor of `size_mb` megabytes over the group, checks every
/// element, and prints the time per all-reduce with the algorithm and bus bandwidths (as
/// nccl-tests counts them: bytes / time, and that times 2 (world - 1) / world).
pub fn allreduce(device: &str, size_mb: f64, iters: usize) -> Result<()> {
    use pg2_dist::{Group, WorkerEnv};
    use tch::{Device, Kind, Tensor};

    let env = WorkerEnv::from_env()?.unwrap_or(WorkerEnv {
        rank: 0,
        local_rank: 0,
        world: 1,
        local_world: 1,
        master_addr: "127.0.0.1".into(),
        master_port: 0,
        agent_store: false,
    });
    let device = env.place(device, parse_device(device)?)?;
    let (rank, world) = (env.rank, env.world);
    if world == 1 && !device.is_cuda() {
        bail!("a group of one on the CPU exchanges nothing: start one process per rank with RANK, WORLD_SIZE and MASTER_PORT set, or use a GPU");
    }
    let mut group = Group::join(env, device, std::time::Duration::from_secs(120))?;
    let n = (size_mb * 1e6 / 4.0).max(1.0) as i64;
    let sync = || {
        if let Device::Cuda(i) = device {
            tch::Cuda::synchronize(i as i64);
        }
    };
    // Rank r contributes r + 1 (and the element's index mod 7), so a wrong or partial sum shows.
    let value = Tensor::arange(n, (Kind::Float, device)).fmod(7.0) + (rank + 1) as f64;
    let want = Tensor::arange(n, (Kind::Float, device)).fmod(7.0) * world as f64 + (world * (world + 1) / 2) as f64;
    let t = value.copy();
    group.all_reduce_sum(&t)?;
    sync();
    let wrong = t.ne_tensor(&want).sum(Kind::Int64).int64_value(&[]);
    if wrong > 0 {
        bail!("rank {rank}: {wrong} of {n} elements summed wrongly over {world} rank(s) ({} backend)", group.backend());
    }
    let start = Instant::now();
    for _ in 0..iters {
        group.all_reduce_sum(&t)?;
    }
    sync();
    let per = start.elapsed().as_secs_f64() / iters as f64;
    let bytes = n as f64 * 4.0;
    if rank == 0 {
        println!(
            "all-reduce of {:.1} MB over {world} rank(s) on {device:?} ({} backend): correct; {:.3} ms each, algbw {:.2} GB/s, busbw {:.2} GB/s",
            bytes / 1e6,
            group.backend(),
            per * 1e3,
            bytes / per / 1e9,
            bytes / per / 1e9 * 2.0 * (world as f64 - 1.0) / world as f64
        );
    }
    group.barrier("bench-allreduce")?;
    Ok(())
}

/// The models `pg2 bench train` and `pg2 bench decode` build with random weights.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum Shape {
    /// `PaliGemmaConfig::tiny` as the tiny recipes train it: 64 px (64 image tokens), the
    /// synthetic data's 1320-token vocabulary, about 0.6M parameters.
    Tiny,
    /// Four times wider and twice as deep, 224 px with 14-pixel patches (256 image tokens)
    /// and a 16k vocabulary: about 28M parameters, seconds per training step on two cores.
    Small,
}

/// Prompt tokens between `<bos>` and the separator, and target tokens before `<eos>` (the
/// tiny recipes' limits).
pub(crate) const PROMPT_LEN: i64 = 16;
pub(crate) const TARGET_LEN: i64 = 32;

impl Shape {
    pub(crate) fn config(self) -> Result<PaliGemmaConfig> {
        // The synthetic tokenizer's size, with `<image>` its last token.
        let mut config = PaliGemmaConfig::tiny(1320, 1319, 64)?;
        if let Shape::Small = self {
            let (t, v) = (&mut config.text, &mut config.vision);
            (t.vocab_size, config.image_token_id) = (16_384, 16_383);
            (t.hidden_size, t.intermediate_size, t.num_hidden_layers) = (512, 2048, 4);
            (t.num_attention_heads, t.num_key_value_heads, t.head_dim, t.query_pre_attn_scalar) = (8, 4, 64, 64.0);
            t.sliding_layers = (0..t.num_hidden_layers).map(|i| i % 2 == 0).collect();
            (v.hidden_size, v.intermediate_size, v.num_hidden_layers, v.num_attention_heads) = (256, 1024, 4, 4);
            (v.image_size, v.patch_size) = (224, 14);
        }
        Ok(config)
    }
}

/// Writes a PaliGemma of `shape` with random weights to `dir` as transformers saves one
/// (config.json + model.safetensors) and returns its config and parameter count.
fn write_random_model(shape: Shape, dir: &Path) -> Result<(PaliGemmaConfig, i64)> {
    let config = shape.config()?;
    tch::manual_seed(0);
    let model = PaliGemma::new(config.clone(), Weights::random(Device::Cpu, Kind::Float), RunOptions::default())?;
    let params = model.parameters();
    // big_vision starts the projector at zero; a random one lets the image reach the loss.
    for (_, p) in params.iter().filter(|(name, _)| name.starts_with(checkpoint::PROJECTOR)) {
        tch::no_grad(|| p.shallow_clone().copy_(&(Tensor::randn_like(p) * 0.02)));
    }
    model.save(dir, Kind::Float)?;
    Ok((config, params.iter().map(|(_, p)| p.numel() as i64).sum()))
}

/// Writes `DIR/inputs.safetensors`: a batch laid out as transformers' PaliGemma processor lays
/// it out (image placeholders, `<bos>`, prompt, `\n`, then target + `<eos>` when
/// `with_target`), with random text and pixels: `input_ids`, `pixel_values`,
/// `token_type_ids` (1 on the target) and `attention_mask`.
pub(crate) fn write_inputs(config: &PaliGemmaConfig, batch: i64, with_target: bool, dir: &Path) -> Result<()> {
    const BOS: i64 = 2;
    const EOS: i64 = 1;
    const NEWLINE: i64 = 108; // Gemma's "\n"
    let (image_tokens, res) = (config.vision.num_patches() as i64, config.vision.image_size as i64);
    let opts = (Kind::Int64, Device::Cpu);
    let fill = |n: i64, id: i64| Tensor::full([batch, n], id, opts);
    // Text from the ids after the special ones, below `<image>`.
    let text = |n: i64| Tensor::randint_low(4, config.image_token_id, [batch, n], opts);
    tch::manual_seed(1);
    let mut parts = vec![fill(image_tokens, config.image_token_id), fill(1, BOS), text(PROMPT_LEN), fill(1, NEWLINE)];
    let prefix_len = image_tokens + PROMPT_LEN + 2;
    if with_target {
        parts.extend([text(TARGET_LEN), fill(1, EOS)]);
    }
    let ids = Tensor::cat(&parts, 1);
    let len = ids.size()[1];
    let token_type_ids = Tensor::arange(len, opts)
        .ge(prefix_len)
        .to_kind(Kind::Int64)
        .unsqueeze(0)
        .expand([batch, len], false)
        .contiguous();
    let pixels = Tensor::rand([batch, 3, res, res], (Kind::Float, Device::Cpu)) * 2.0 - 1.0;
    let tensors = [
        ("input_ids", ids),
        ("pixel_values", pixels),
        ("token_type_ids", token_type_ids),
        ("attention_mask", Tensor::ones([batch, len], opts)),
    ];
    Tensor::write_safetensors(&tensors, dir.join("inputs.safetensors"))?;
    Ok(())
}

/// Reads `DIR/inputs.safetensors` (see [`write_inputs`]) as pg2's model inputs on `device`.
pub(crate) fn read_inputs(dir: &Path, device: Device) -> Result<pg2_model::Inputs> {
    let mut tensors: std::collections::HashMap<String, Tensor> =
        Tensor::read_safetensors(dir.join("inputs.safetensors"))?.into_iter().collect();
    let mut take = |name: &str| {
        tensors.remove(name).with_context(|| format!("inputs.safetensors lacks `{name}`")).map(|t| t.to_device(device))
    };
    Ok(pg2_model::Inputs {
        ids: take("input_ids")?,
        pixels: Some(take("pixel_values")?),
        layout: pg2_model::TokenLayout {
            mask_ar: take("token_type_ids")?,
            valid: take("attention_mask")?.to_kind(Kind::Bool),
        },
    })
}

/// What both sides of a pg2-against-transformers benchmark share (`bench train`, `bench decode`).
#[derive(Clone, Debug, clap::Args)]
pub struct Sides {
    /// Intra-op threads of both sides.
    #[arg(long, default_value_t = all_cores())]
    pub threads: usize,
    /// cpu, cuda or cuda:N, as both pg2 and torch spell it.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Python with torch and transformers, for the baseline (e.g. a virtualenv's bin/python).
    #[arg(long, default_value = "python3")]
    pub python: String,
    /// Set in the re-executed process that runs pg2's side on the model and inputs in this folder.
    #[arg(long, hide = true)]
    pub pg2_side: Option<PathBuf>,
}

/// The default thread count of `pg2 bench train` and `pg2 bench decode`: every core.
fn all_cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// The process's peak resident memory (VmHWM) in MB; `None` where /proc is unavailable.
fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb: f64 =
        status.lines().find_map(|l| l.strip_prefix("VmHWM:"))?.trim().trim_end_matches("kB").trim().parse().ok()?;
    Some(kb / 1024.0)
}

/// Runs pg2's side in a fresh process (this binary, same arguments, plus `--pg2-side DIR`),
/// so its peak memory is its own; returns the JSON line it prints.
fn run_pg2_side(dir: &Path) -> Result<serde_json::Value> {
    let exe = std::env::current_exe()?;
    let out = Command::new(exe).args(std::env::args_os().skip(1)).arg("--pg2-side").arg(dir).output()?;
    if !out.status.success() {
        bail!("pg2's side failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    last_json_line(&out.stdout)
}

/// [`KEEP_FREED_MEMORY_ENV`], less what the user has set: pg2's process kept the user's
/// settings then, and the baseline inherits them.
fn baseline_env() -> Vec<(&'static str, &'static str)> {
    if user_tunes_allocator() {
        vec![]
    } else {
        KEEP_FREED_MEMORY_ENV.to_vec()
    }
}

/// Runs a baseline script (written to a temporary file) with `args` and returns its
/// stdout; `None`, with the reason printed, when it cannot run here.
fn run_script(python: &str, name: &str, source: &str, args: &[&std::ffi::OsStr]) -> Result<Option<Vec<u8>>> {
    let script = std::env::temp_dir().join(format!("pg2-{name}-{}.py", std::process::id()));
    std::fs::File::create(&script)?.write_all(source.as_bytes())?;
    // The baseline's allocator keeps freed memory as pg2's does, so the ratio measures the
    // code, not glibc's defaults (which slow transformers more than pg2).
    let out = Command::new(python).arg(&script).args(args).envs(baseline_env()).output();
    std::fs::remove_file(&script).ok();
    match out {
        Ok(out) if out.status.success() => Ok(Some(out.stdout)),
        Ok(out) => {
            eprintln!(
                "baseline unavailable: {python} failed: {}",
                String::from_utf8_lossy(&out.stderr).lines().last().unwrap_or("")
            );
            Ok(None)
        }
        Err(e) => {
            eprintln!("baseline unavailable: cannot run {python}: {e}");
            Ok(None)
        }
    }
}

/// [`run_script`] for a baseline whose last stdout line is JSON.
fn run_baseline(
    python: &str,
    name: &str,
    source: &str,
    args: &[&std::ffi::OsStr],
) -> Result<Option<serde_json::Value>> {
    run_script(python, name, source, args)?.map(|stdout| last_json_line(&stdout)).transpose()
}

/// The last line of a side's output, as JSON.
fn last_json_line(stdout: &[u8]) -> Result<serde_json::Value> {
    let text = String::from_utf8_lossy(stdout);
    let line = text.lines().last().context("no output")?;
    serde_json::from_str(line).with_context(|| format!("expected a JSON line, got {line:?}"))
}

/// A temporary folder removed when dropped.
pub(crate) struct TempDir(pub(crate) PathBuf);

impl TempDir {
    pub(crate) fn new(name: &str) -> Result<Self> {
        let dir = std::env::temp_dir().join(format!("pg2-bench-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        Ok(Self(dir))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        std::fs::remove_dir_all(&self.0).ok();
    }
}
