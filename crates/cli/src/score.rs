//! `pg2 score`: the log-probability of each record's suffix (+ `<eos>`) given its image and prefix.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use pg2_data::{source, InferenceBatch, TaskFormat};

use crate::model_args::{progress, ModelArgs};

#[derive(Args)]
pub struct ScoreArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// JSONL file of {"image", "prefix", "suffix"} records.
    #[arg(long)]
    pub data: PathBuf,
    /// Records per forward pass.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..))]
    pub batch_size: u32,
    /// Longest record, in tokens (image tokens included); a longer one is an error naming it.
    #[arg(long, default_value_t = pg2_data::layout::DEFAULT_MAX_TOKENS)]
    pub max_tokens: usize,
}

/// Prints one JSON line per record: `{"logprob": ..., "tokens": ...}`.
pub fn run(args: &ScoreArgs) -> Result<()> {
    let (model, tok) = args.model.load()?;
    let records = source::read_jsonl(&args.data)?;
    let image = (model.config.vision.image_size as u32, model.config.vision.num_patches());
    let bar = progress(records.len(), "score");
    for chunk in records.chunks(args.batch_size as usize) {
        let prepared =
            InferenceBatch::new(chunk, &tok, &TaskFormat::default(), image, (true, args.max_tokens), model.device())?;
        let batch = &prepared.batch;
        let logprobs = tch::no_grad(|| model.sequence_logprobs(&batch.inputs, &batch.loss_mask))?;
        for (tokens, logprob) in prepared.targets.iter().zip(logprobs) {
            bar.suspend(|| println!("{}", serde_json::json!({"logprob": logprob, "tokens": tokens})));
        }
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();
    Ok(())
}
