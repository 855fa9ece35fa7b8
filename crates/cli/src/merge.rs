//! `pg2 merge`: folds a LoRA adapter into its base model, giving a plain model folder that
//! any tool loads without PEFT.
//!
//! The base is read as stored, also for an adapter trained on a base held in int8
//! (`lora.base_dtype`): that copy only ever lived in the run's memory, and folding into the
//! full-precision weights gives the adapter's model up to the base's int8 rounding.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use pg2_model::{Lora, PaliGemma, RunOptions};
use tch::Device;

use crate::model_args::DtypeArg;

#[derive(Args)]
pub struct MergeArgs {
    /// The base model folder the adapter was trained on (or a run folder).
    #[arg(long)]
    pub base: PathBuf,
    /// A PEFT adapter folder (adapter_config.json + adapter_model.safetensors), e.g. a LoRA
    /// run's checkpoint, or the run folder.
    #[arg(long)]
    pub adapter: PathBuf,
    /// Where the merged model folder goes.
    #[arg(long)]
    pub out: PathBuf,
    /// The dtype the merged weights are stored in (the folding itself is done in f32).
    #[arg(long, value_enum, default_value = "f32")]
    pub dtype: DtypeArg,
}

pub fn run(args: &MergeArgs) -> Result<()> {
    let base = pg2_train::checkpoint_dir(&args.base)?;
    let adapter = pg2_train::checkpoint_dir(&args.adapter)?;
    let lora = Lora::read(&adapter)?;
    let model = PaliGemma::load_at(&base, None, Some(lora), Device::Cpu, tch::Kind::Float, RunOptions::default())?;
    model.save_merged(&args.out, args.dtype.kind())?;
    // The tokenizer travels with the model, from the adapter's folder or else the base's.
    if let Some(tokenizer) = [&adapter, &base].iter().map(|d| d.join("tokenizer.json")).find(|p| p.is_file()) {
        let to = args.out.join("tokenizer.json");
        std::fs::copy(&tokenizer, &to)
            .with_context(|| format!("copying {} to {}", tokenizer.display(), to.display()))?;
    }
    eprintln!("pg2: {} merged into {}: {}", adapter.display(), base.display(), args.out.display());
    Ok(())
}
