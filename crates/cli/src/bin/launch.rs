//! `launch RECIPE.toml`: trains one stage described by a recipe.

use std::path::PathBuf;

use anyhow::Result;
use clap::Parser;
use pg2_train::{train, LaunchOptions, Recipe};

#[derive(Parser)]
#[command(name = "launch", version, about = "Train a PaliGemma 2 stage from a TOML recipe")]
struct Cli {
    /// The recipe, e.g. recipes/tiny/stage1.toml.
    recipe: PathBuf,
    /// Override a recipe key, e.g. --set train.lr=3e-5 (repeatable; values are TOML).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    overrides: Vec<String>,
    /// Run folder (default: runs/<recipe name>).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Continue from the run folder's latest checkpoint.
    #[arg(long)]
    resume: bool,
    /// Start over in a run folder that already holds checkpoints.
    #[arg(long, conflicts_with = "resume")]
    overwrite: bool,
    /// cpu, cuda, cuda:N, or auto (the first GPU if there is one).
    #[arg(long, default_value = "auto")]
    device: String,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let (recipe, resolved) = Recipe::load(&cli.recipe, &cli.overrides)?;
    let name = recipe.name.clone().unwrap_or_default();
    let device = pg2_model::parse_device(&cli.device)?;
    let out = cli.out.unwrap_or_else(|| PathBuf::from("runs").join(&name));
    eprintln!("launch: {} on {device:?} -> {}", cli.recipe.display(), out.display());
    let opts = LaunchOptions { out, resume: cli.resume, overwrite: cli.overwrite, device };
    let summary = train(&recipe, &resolved, &opts)?;
    if let (Some(first), Some(last)) = (summary.losses.first(), summary.losses.last()) {
        eprintln!("launch: loss {first:.4} -> {last:.4}; checkpoint {}", summary.checkpoint.display());
    }
    Ok(())
}
