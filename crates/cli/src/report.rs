//! `pg2 report`: a Markdown table of runs, each run's last evaluation beside the paper's.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use pg2_model::PaliGemmaConfig;
use pg2_train::recipe::Preset;
use pg2_train::RunDir;

#[derive(Args)]
pub struct ReportArgs {
    /// Run folders (runs/<name>).
    #[arg(required = true)]
    pub runs: Vec<PathBuf>,
}

pub fn run(args: &ReportArgs) -> Result<()> {
    println!("| task | metric | model | pg2 | paper |");
    println!("|---|---|---|---|---|");
    for run in &args.runs {
        println!("{}", row(&RunDir::new(run))?);
    }
    Ok(())
}

/// One run's row: its last `eval/<metric>` against the paper's number for the checkpoint's
/// size and resolution (the recipe's `eval.paper`).
fn row(run: &RunDir) -> Result<String> {
    let recipe = run.recipe()?;
    let eval = recipe.eval.as_ref().with_context(|| format!("{}: the recipe has no [eval]", run.root().display()))?;
    let last = run
        .last_evaluation(Some(eval.metric.primary()))?
        .with_context(|| format!("{}: no evaluation logged yet", run.root().display()))?;
    let config = run.latest()?.and_then(|dir| PaliGemmaConfig::from_file(&dir.join("config.json")).ok());
    let shape = config
        .map(|c| format!("{}-{}", Preset::released_size(&c).unwrap_or_else(|| "custom".into()), c.vision.image_size));
    let paper = shape.as_ref().and_then(|s| eval.paper.get(s)).map_or("n/a".to_string(), |p| format!("{p:.4}"));
    let name = recipe.name.clone().unwrap_or_default();
    Ok(format!(
        "| {name} | {} ({}) | {} | {:.4} (step {}) | {paper} |",
        eval.metric,
        last.metric,
        shape.unwrap_or_default(),
        last.value,
        last.step
    ))
}
