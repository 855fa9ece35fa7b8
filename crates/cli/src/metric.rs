//! `pg2 metric`: scores a file of predictions.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use pg2_model::vqvae::MaskVae;
use pg2_train::evaluator::mask_decoder;

#[derive(Args)]
pub struct MetricArgs {
    /// cider, bleu4, vqa, anls, relaxed, exact, exact_cased, tallyqa, scienceqa, refcoco,
    /// refcoco_seg, teds, teds_struct or ocr_f1.
    #[arg(long)]
    pub metric: pg2_eval::Metric,
    /// JSONL with `prediction` and the references the metric needs.
    #[arg(long)]
    pub predictions: PathBuf,
    /// big_vision's mask VQ-VAE (`vae-oid.npz`), which refcoco_seg decodes the predicted
    /// `<seg>` tokens with.
    #[arg(long)]
    pub mask_vae: Option<PathBuf>,
}

/// Prints one JSON object, e.g. {"cider": 1.0132, "n": 40}.
pub fn run(args: &MetricArgs) -> Result<()> {
    let vae = args.mask_vae.as_deref().map(MaskVae::load).transpose()?;
    let decode = vae.as_ref().map(mask_decoder);
    let masks = decode.as_ref().map(|d| d as pg2_eval::segmentation::DecodeMasks);
    println!("{}", serde_json::Value::Object(pg2_eval::score_file(args.metric, &args.predictions, masks)?));
    Ok(())
}
