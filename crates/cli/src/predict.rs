//! `pg2 predict`: decodes a continuation of each record's prefix.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use pg2_data::{source, InferenceBatch, TaskFormat};
use pg2_model::{generate, DecodeOptions};

use crate::model_args::{progress, ModelArgs};

#[derive(Args)]
pub struct PredictArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// JSONL file of {"image", "prefix"} records (a "suffix" is ignored).
    #[arg(long)]
    pub data: PathBuf,
    /// Beam size; 1 decodes greedily.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub beam: u32,
    /// Most tokens generated per record.
    #[arg(long, default_value_t = 32)]
    pub max_len: usize,
    /// Beam hypotheses rank by sum logprob / length^penalty.
    #[arg(long, default_value_t = 1.0)]
    pub length_penalty: f64,
    /// Records decoded together.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..))]
    pub batch_size: u32,
    /// Longest record, in tokens (image tokens included); a longer one is an error naming it.
    #[arg(long, default_value_t = pg2_data::layout::DEFAULT_MAX_TOKENS)]
    pub max_tokens: usize,
}

/// Prints one `{"prediction": ...}` JSON line per record.
pub fn run(args: &PredictArgs) -> Result<()> {
    let (model, tok) = args.model.load()?;
    let records = source::read_jsonl(&args.data)?;
    let image = (model.config.vision.image_size as u32, model.config.vision.num_patches());
    let opts = DecodeOptions {
        max_new_tokens: args.max_len,
        beam_size: args.beam as usize,
        eos_id: tok.eos_id,
        pad_id: tok.pad_id,
        length_penalty: args.length_penalty,
    };
    let bar = progress(records.len(), "predict");
    for chunk in records.chunks(args.batch_size as usize) {
        let prepared =
            InferenceBatch::new(chunk, &tok, &TaskFormat::default(), image, (false, args.max_tokens), model.device())?;
        for tokens in generate(&model, &prepared.batch.inputs, &opts)? {
            bar.suspend(|| println!("{}", serde_json::json!({"prediction": tok.decode(&tokens)})));
        }
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();
    Ok(())
}
