//! `launch RECIPE.toml`: runs one training stage described by a recipe. This version
//! reads and checks the recipe; the trainer arrives with the trainer issue.

use std::path::PathBuf;

use anyhow::Result;
use clap::Parser;
use pg2_train::Recipe;

#[derive(Parser)]
#[command(name = "launch", version, about = "Train a PaliGemma 2 stage from a TOML recipe")]
struct Cli {
    /// The recipe, e.g. recipes/tiny/stage1.toml.
    recipe: PathBuf,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let recipe = Recipe::from_file(&cli.recipe)?;
    let name = recipe.name.clone().unwrap_or_else(|| cli.recipe.file_stem().unwrap().to_string_lossy().into_owned());
    eprintln!("launch: recipe {} is valid (run `{name}`: {} steps of batch {} at {} px, lr {})",
        cli.recipe.display(), recipe.train.steps, recipe.train.batch_size, recipe.model.resolution, recipe.train.lr);
    eprintln!("launch: training is not implemented yet in this version of pg2; nothing was trained");
    Ok(())
}
