//! `sweep RECIPE.toml --grid train.lr=1e-6,3e-6,1e-5 [--grid KEY=A,B]...`: trains one run per
//! point of the grids' cartesian product, by calling the `launch` binary that sits next to
//! this one, and compares the runs.
//!
//! - Each point is a run folder `DIR/<key=value,...>` (DIR defaults to `sweeps/<recipe stem>`),
//!   trained with `launch --set KEY=VALUE... --out DIR/<point>`, its output appended to
//!   `DIR/<point>/launch.log`; `--parallel N` points train at a time.
//! - Running the same command again keeps the finished points (their latest checkpoint's
//!   `trainer_state.json` says the run made its last update; checkpoints older than that
//!   field never count as finished) and continues the others with `launch --resume`.
//! - A failed point is reported with its log and does not stop the others; the sweep exits
//!   non-zero once the results of all are written.
//! - Results: `DIR/sweep.csv`, `DIR/sweep.json`, a table on stdout with the best point marked,
//!   and `DIR/sweep.png`, the metric against the learning rate.
//! - `--emit slurm` writes `DIR/sweep.sbatch`, a SLURM array job, instead of training.

mod grid;
mod plot;
mod results;
mod run;
mod slurm;

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};

use grid::{grid_points, Axis};
use pg2_train::RunDir;

#[derive(clap::Parser)]
#[command(
    name = "sweep",
    version,
    about = "Train a recipe over a grid of overrides (learning rates, ...) and compare the runs"
)]
pub struct SweepCli {
    /// The recipe, e.g. recipes/tiny/transfer-color.toml.
    pub recipe: PathBuf,
    /// One axis of the grid, e.g. --grid train.lr=1e-6,3e-6,1e-5 (repeatable; each value is
    /// passed to launch as --set KEY=VALUE, so values are TOML; none may hold a comma).
    #[arg(long = "grid", value_name = "KEY=V1,V2,...", required = true)]
    pub grids: Vec<String>,
    /// Sweep folder, holding one run folder per point (default: sweeps/<recipe stem>).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Points trained at the same time (default 1); with --emit slurm, the most array tasks
    /// running at once (default: no limit).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub parallel: Option<u32>,
    /// Write a job script for this scheduler instead of training.
    #[arg(long, value_enum)]
    pub emit: Option<Emit>,
    /// The metric to compare (default: the recipe's eval metric's main score, e.g. `eval/cider`
    /// or `eval/miou`, else the first `eval/...` key of the runs' metrics.jsonl, else `loss`);
    /// lower is better for a name ending in `loss`, higher for any other.
    #[arg(long)]
    pub metric: Option<String>,
    /// Passed to launch: cpu, cuda, cuda:N or auto (launch's default).
    #[arg(long)]
    pub device: Option<String>,
}

#[derive(Clone, Copy, PartialEq, clap::ValueEnum)]
pub enum Emit {
    Slurm,
}

/// Runs (or, with `--emit slurm`, writes a job for) every point of the grid, then compares them.
pub fn run(cli: &SweepCli) -> Result<()> {
    ensure!(cli.recipe.is_file(), "no recipe at {}", cli.recipe.display());
    let axes = cli.grids.iter().map(|g| Axis::parse(g)).collect::<Result<Vec<_>>>()?;
    let stem = cli.recipe.file_stem().unwrap_or_default().to_string_lossy().into_owned();
    let dir = cli.out.clone().unwrap_or_else(|| Path::new("sweeps").join(&stem));
    let points = grid_points(&axes, &dir)?;
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    if cli.emit == Some(Emit::Slurm) {
        return slurm::emit_slurm(cli, &stem, &dir, &points);
    }

    let statuses = run::run_points(cli, &points)?;
    let runs: Vec<_> = points.iter().map(|p| results::read_metrics(&p.dir)).collect();
    let primary = points.iter().find_map(|p| Some(RunDir::new(&p.dir).recipe().ok()?.eval?.metric.primary()));
    let metric = cli.metric.clone().unwrap_or_else(|| results::default_metric(&runs, primary));
    let rows: Vec<results::Row> = points
        .iter()
        .zip(statuses)
        .zip(&runs)
        .map(|((point, status), run)| results::Row::new(point, status, run, &metric))
        .collect();
    let best = results::best_row(&rows, &metric);
    fs::write(dir.join("sweep.csv"), results::csv(&axes, &rows, &metric, best))?;
    fs::write(
        dir.join("sweep.json"),
        serde_json::to_string_pretty(&results::summary_json(&cli.recipe, &rows, &metric, best))? + "\n",
    )?;
    print!("{}", results::table(&rows, &metric, best));
    let png = dir.join("sweep.png");
    if let Err(e) = plot::plot(&png, &axes, &rows, &metric, best) {
        eprintln!("sweep: sweep.png not drawn: {e:#}");
        let _ = fs::remove_file(&png);
    }

    let failed: Vec<&results::Row> = rows.iter().filter(|r| r.status == run::Status::Failed).collect();
    for row in &failed {
        eprintln!("sweep: {} failed; see {}", row.point.name, row.point.log().display());
    }
    if !failed.is_empty() {
        bail!("{} of {} points failed", failed.len(), rows.len());
    }
    Ok(())
}
