//! What `pg2 score` and `pg2 predict` share: the checkpoint to load and how to run it.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use pg2_data::{source, InferenceBatch, PgTokenizer, Resize, TaskFormat};
use pg2_model::{Lora, PaliGemma, RunOptions};
use serde_json::Value;
use tch::Kind;

/// A floating-point kind on the command line.
#[derive(Clone, Copy, ValueEnum)]
pub enum DtypeArg {
    F32,
    Bf16,
}

impl DtypeArg {
    pub fn kind(self) -> Kind {
        match self {
            DtypeArg::F32 => Kind::Float,
            DtypeArg::Bf16 => Kind::BFloat16,
        }
    }
}

/// The model a command runs.
#[derive(Args)]
pub struct ModelArgs {
    /// A Hugging Face model folder (config.json, safetensors, tokenizer.json), or a run
    /// folder (its checkpoints/latest).
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// A LoRA adapter folder (PEFT's format, e.g. a LoRA run's checkpoint, or the run folder)
    /// to put on the checkpoint.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Tokenizer file; defaults to the checkpoint's tokenizer.json.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Compute dtype.
    #[arg(long, value_enum, default_value = "f32")]
    pub dtype: DtypeArg,
    /// cpu, cuda, cuda:N, or auto (the first GPU if there is one).
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Switch off the attention and final-logit soft-caps (as transfer runs train without them).
    #[arg(long)]
    pub no_soft_caps: bool,
    /// Apply the config's sliding window on its local layers, as transformers does
    /// (big_vision, which trained the released weights, attends globally).
    #[arg(long)]
    pub sliding_window: bool,
}

impl ModelArgs {
    /// Loads the model and its tokenizer.
    pub fn load(&self) -> Result<(PaliGemma, PgTokenizer)> {
        let kind = self.dtype.kind();
        let options =
            RunOptions { soft_caps: !self.no_soft_caps, sliding_window: self.sliding_window, ..RunOptions::default() };
        let device = crate::device::prepare_device(&self.device)?;
        let dir = pg2_train::checkpoint_dir(&self.checkpoint)?;
        eprintln!("pg2: loading {} on {device:?} in {kind:?}", dir.display());
        let lora = self.adapter.as_ref().map(|a| pg2_train::checkpoint_dir(a).and_then(|a| Ok(Lora::read(&a)?)));
        let model = PaliGemma::load_at(&dir, None, lora.transpose()?, device, kind, options)?;
        let tokenizer_path = self.tokenizer.clone().unwrap_or_else(|| dir.join("tokenizer.json"));
        let tokenizer = PgTokenizer::from_file(&tokenizer_path)?;
        tokenizer.check_fits(&tokenizer_path, &model.config, &dir.display().to_string())?;
        Ok((model, tokenizer))
    }
}

/// The records a command runs the model over, and how many at a time.
#[derive(Args)]
pub struct RecordArgs {
    /// JSONL file of {"image", "prefix", "suffix"} records (`predict` ignores a suffix).
    #[arg(long)]
    pub data: PathBuf,
    /// Records run together.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..))]
    pub batch_size: u32,
    /// Longest record, in tokens (image tokens included); a longer one is an error naming it.
    #[arg(long, default_value_t = pg2_data::layout::DEFAULT_MAX_TOKENS)]
    pub max_tokens: usize,
    /// Low-pass filter images before downscaling them (big_vision's `resize(res,
    /// antialias=True)`, a recipe's `data.antialias`); by default TF's plain bilinear, as
    /// big_vision's `resize(res)`.
    #[arg(long)]
    pub antialias: bool,
    /// Pad images with white to a square (below or to the right) before resizing them, as a
    /// recipe's `data.pad_to_square`.
    #[arg(long)]
    pub pad_to_square: bool,
}

impl RecordArgs {
    /// Reads the records and runs `each` over them batch by batch (their suffixes as
    /// targets when `with_targets`), printing the JSON lines it returns, one per record,
    /// under a progress bar labelled `what`.
    pub fn for_each_batch(
        &self,
        (model, tok): (&PaliGemma, &PgTokenizer),
        with_targets: bool,
        what: &str,
        mut each: impl FnMut(&InferenceBatch) -> Result<Vec<Value>>,
    ) -> Result<()> {
        let records = source::read_jsonl(&self.data)?;
        let size = model.config.vision.image_size as u32;
        let resize = Resize { size, antialias: self.antialias, pad_to_square: self.pad_to_square };
        let image = (resize, model.config.vision.num_patches());
        let bar = progress(records.len(), what);
        for chunk in records.chunks(self.batch_size as usize) {
            let limits = (with_targets, self.max_tokens);
            let prepared = InferenceBatch::new(chunk, tok, &TaskFormat::default(), image, limits, model.device())?;
            for line in each(&prepared)? {
                bar.suspend(|| println!("{line}"));
            }
            bar.inc(chunk.len() as u64);
        }
        bar.finish_and_clear();
        Ok(())
    }
}

/// A progress bar over `len` records, labelled `what`.
fn progress(len: usize, what: &str) -> ProgressBar {
    let bar = ProgressBar::new(len as u64);
    bar.set_style(
        ProgressStyle::with_template("{msg} {bar:30} {pos}/{len} [{elapsed} < {eta}]").expect("a valid template"),
    );
    bar.set_message(what.to_string());
    bar
}
