//! `pg2 metric`: scores a file of predictions.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

#[derive(Args)]
pub struct MetricArgs {
    /// cider, bleu4, vqa, anls, relaxed, exact, exact_cased, tallyqa, scienceqa, refcoco, teds,
    /// teds_struct or ocr_f1.
    #[arg(long)]
    pub metric: pg2_eval::Metric,
    /// JSONL with `prediction` and the references the metric needs.
    #[arg(long)]
    pub predictions: PathBuf,
}

/// Prints one JSON object, e.g. {"cider": 1.0132, "n": 40}.
pub fn run(args: &MetricArgs) -> Result<()> {
    println!("{}", serde_json::Value::Object(pg2_eval::score_file(args.metric, &args.predictions)?));
    Ok(())
}
