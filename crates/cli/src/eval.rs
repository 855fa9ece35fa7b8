//! `pg2 eval`: evaluates a checkpoint with a recipe's `[eval]` block.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use pg2_train::Recipe;

#[derive(Args)]
pub struct EvalArgs {
    /// A model folder, or a run folder (its checkpoints/latest).
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// The recipe whose [eval] block (and model settings) to use.
    #[arg(long)]
    pub recipe: PathBuf,
    /// Override a recipe key (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
    /// Where the predictions go.
    #[arg(long, default_value = ".")]
    pub out: PathBuf,
    #[arg(long, default_value = "auto")]
    pub device: String,
}

/// Prints the scores as JSON and writes the predictions to OUT/eval/step-NNNNNN.jsonl.
pub fn run(args: &EvalArgs) -> Result<()> {
    let (recipe, _) = Recipe::load(&args.recipe, &args.overrides)?;
    let device = crate::device::prepare_device(&args.device)?;
    let scores = pg2_train::evaluate_checkpoint(&recipe, &args.checkpoint, device, &args.out)?;
    println!("{}", serde_json::Value::Object(scores));
    Ok(())
}
