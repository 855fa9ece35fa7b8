//! `pg2 score`: the log-probability of each record's suffix (+ `<eos>`) given its image and prefix.

use anyhow::Result;
use clap::Args;

use crate::model_args::{ModelArgs, RecordArgs};

#[derive(Args)]
pub struct ScoreArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub records: RecordArgs,
}

/// Prints one JSON line per record: `{"logprob": ..., "tokens": ...}`.
pub fn run(args: &ScoreArgs) -> Result<()> {
    let (model, tok) = args.model.load()?;
    args.records.for_each_batch((&model, &tok), true, "score", |prepared| {
        let batch = &prepared.batch;
        let logprobs = tch::no_grad(|| model.sequence_logprobs(&batch.inputs, &batch.loss_mask))?;
        let lines = prepared.targets.iter().zip(logprobs);
        Ok(lines.map(|(tokens, logprob)| serde_json::json!({"logprob": logprob, "tokens": tokens})).collect())
    })
}
