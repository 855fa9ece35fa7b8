//! pg2's commands: `pg2` (one module per subcommand), `launch` and `sweep`. The binaries
//! under `src/bin/` and `src/main.rs` only parse their arguments and call in here.

pub mod bench;
pub mod convert;
pub mod data;
pub mod device;
pub mod eval;
pub mod inspect;
pub mod launch;
pub mod merge;
pub mod metric;
pub mod model_args;
pub mod plan;
pub mod predict;
pub mod report;
pub mod score;
pub mod shard;
pub mod sweep;

use anyhow::Result;
use clap::{Parser, Subcommand};

/// `pg2`'s command line.
#[derive(Parser)]
#[command(
    name = "pg2",
    version,
    about = "PaliGemma 2 tools: score, predict, evaluate, inspect and merge checkpoints; convert data; benchmark"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// `pg2`'s subcommands.
#[derive(Subcommand)]
pub enum Command {
    /// Log-probability of each record's suffix (+ <eos>) given image and prefix: one JSON line per record.
    Score(score::ScoreArgs),
    /// Decode a continuation of each record's prefix: one {"prediction": ...} JSON line per record.
    Predict(predict::PredictArgs),
    /// Print a checkpoint's configuration, parameter counts per component and dtype.
    Inspect(inspect::InspectArgs),
    /// Benchmarks that print pg2's figures next to the same work done by transformers.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Convert a public dataset's annotation files into pg2 JSONL.
    Convert(convert::ConvertArgs),
    /// Re-shard a source (JSONL, tar shards or parquet) as WebDataset tar shards with their
    /// index, or as parquet files, of --shard-size samples.
    Shard(shard::ShardArgs),
    /// The embedded demo data.
    #[command(subcommand)]
    Data(data::DataCommand),
    /// Evaluate a checkpoint with a recipe's [eval] block: prints the scores as JSON and
    /// writes the predictions to OUT/eval/step-NNNNNN.jsonl.
    Eval(eval::EvalArgs),
    /// A Markdown table of finished runs: task, metric, pg2's last evaluation, the paper's result.
    Report(report::ReportArgs),
    /// Score predictions: prints one JSON object, e.g. {"cider": 1.0132, "n": 40}.
    Metric(metric::MetricArgs),
    /// Per-GPU memory of a training step (weights, gradients, optimizer state, activations)
    /// for each train.sharding, the communication each moves, and the cheapest setting that fits.
    Plan(plan::PlanArgs),
    /// Fold a LoRA adapter (PEFT's format, as LoRA runs save) into its base: a plain model folder.
    Merge(merge::MergeArgs),
}

/// Runs one `pg2` subcommand.
pub fn run(cli: Cli) -> Result<()> {
    match &cli.command {
        Command::Score(args) => score::run(args),
        Command::Predict(args) => predict::run(args),
        Command::Inspect(args) => inspect::run(args),
        Command::Bench(command) => bench::run(command),
        Command::Convert(args) => convert::run(args),
        Command::Shard(args) => shard::run(args),
        Command::Data(command) => data::run(command),
        Command::Eval(args) => eval::run(args),
        Command::Report(args) => report::run(args),
        Command::Metric(args) => metric::run(args),
        Command::Plan(args) => plan::run(args),
        Command::Merge(args) => merge::run(args),
    }
}
