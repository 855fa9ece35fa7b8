//! `pg2 bench padding`: how much of a recipe's batches padding fills, in stream order and
//! bucketed by length (`data.bucket_by_length`). Tokenizes the sources; reads no image.

use std::path::Path;

use anyhow::Result;
use pg2_data::pipeline::{self, TokenCounts};
use pg2_data::{PgTokenizer, PipelineConfig};
use pg2_model::PaliGemmaConfig;
use pg2_train::recipe::Init;
use pg2_train::{checkpoint_dir, input, Recipe};

/// Prints the real and padded tokens of the recipe's next `updates` updates on one of
/// `nproc` workers, in stream order and bucketed by length.
pub fn run(recipe: &Path, overrides: &[String], nproc: usize, updates: usize) -> Result<()> {
    let (recipe, _) = Recipe::load(recipe, overrides)?;
    let t = &recipe.train;
    let per_worker = input::worker_batch(&recipe, nproc)?;
    println!(
        "{updates} updates of {} examples: {} micro-batch(es) each, {per_worker} examples per worker in each, {nproc} worker(s)",
        t.batch_size * t.grad_accumulation,
        t.grad_accumulation
    );
    println!("{:<22} {:>12} {:>12} {:>9}", "order", "real tokens", "in batches", "padding");
    for (order, counts) in ["stream", "bucketed by length"].iter().zip(count(&recipe, nproc, updates)?) {
        let share = 100.0 * (counts.padded - counts.real) as f64 / counts.padded.max(1) as f64;
        println!("{order:<22} {:>12} {:>12} {share:>8.1}%", counts.real, counts.padded);
    }
    Ok(())
}

/// The token counts of one worker's micro-batches over the next `updates` updates with
/// `world` workers: dealt out in stream order, and sorted by length.
fn count(recipe: &Recipe, world: usize, updates: usize) -> Result<[TokenCounts; 2]> {
    let tok = PgTokenizer::from_file(&recipe.data.tokenizer)?;
    let mut model = match &recipe.model.init {
        Init::Preset(preset) => preset.config(tok.vocab_size(), tok.image_id, recipe.model.resolution)?,
        Init::Checkpoint(path) => PaliGemmaConfig::from_file(&checkpoint_dir(path)?.join("config.json"))?,
    };
    model.vision.image_size = recipe.model.resolution;
    let config = PipelineConfig { bucket_by_length: false, ..input::pipeline_config(recipe, &model, 0, world)? };
    let plain = pipeline::count_tokens(input::mixture(recipe)?, &tok, &config, updates)?;
    let bucketed = pipeline::count_tokens(
        input::mixture(recipe)?,
        &tok,
        &PipelineConfig { bucket_by_length: true, ..config },
        updates,
    )?;
    Ok([plain, bucketed])
}
