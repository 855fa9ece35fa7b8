//! `pg2 predict`: decodes a continuation of each record's prefix.

use anyhow::Result;
use clap::Args;
use pg2_model::{generate, DecodeOptions};

use crate::model_args::{ModelArgs, RecordArgs};

#[derive(Args)]
pub struct PredictArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub records: RecordArgs,
    /// Beam size; 1 decodes greedily. Beam search is big_vision's: hypotheses ranked by
    /// their summed log-probabilities, no length normalisation.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub beam: u32,
    /// Most tokens generated per record.
    #[arg(long, default_value_t = 32)]
    pub max_len: usize,
}

/// Prints one `{"prediction": ...}` JSON line per record.
pub fn run(args: &PredictArgs) -> Result<()> {
    let (model, tok) = args.model.load()?;
    let opts = DecodeOptions {
        max_new_tokens: args.max_len,
        beam_size: args.beam as usize,
        eos_id: tok.eos_id,
        pad_id: tok.pad_id,
    };
    args.records.for_each_batch((&model, &tok), false, "predict", |prepared| {
        let generated = generate(&model, &prepared.batch.inputs, &opts)?;
        Ok(generated.iter().map(|tokens| serde_json::json!({"prediction": tok.decode(tokens)})).collect())
    })
}
