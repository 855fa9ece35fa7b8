//! `pg2 data`: the embedded demo data.

use std::path::PathBuf;

use anyhow::Result;
use clap::Subcommand;
use pg2_data::synth;

#[derive(Subcommand)]
pub enum DataCommand {
    /// Write the synthetic multitask dataset (shapes, counts, colours, boxes, digits) with
    /// its tokenizer; deterministic from the seed.
    Synth {
        /// Output folder.
        #[arg(long, default_value = "data/synth")]
        out: PathBuf,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Training examples.
        #[arg(long, default_value_t = synth::SynthOptions::default().train)]
        train: usize,
        /// Validation examples.
        #[arg(long, default_value_t = synth::SynthOptions::default().val)]
        val: usize,
        /// Image side in pixels.
        #[arg(long, default_value_t = synth::SynthOptions::default().canvas)]
        canvas: u32,
    },
}

pub fn run(command: &DataCommand) -> Result<()> {
    let DataCommand::Synth { out, seed, train, val, canvas } = command;
    let start = std::time::Instant::now();
    let summary =
        synth::write_synth(out, &synth::SynthOptions { seed: *seed, train: *train, val: *val, canvas: *canvas })?;
    eprintln!(
        "pg2 data synth: {} train and {} val examples of {} in {} ({:.1}s), tokenizer of {} tokens",
        summary.train,
        summary.val,
        summary.tasks.join(", "),
        out.display(),
        start.elapsed().as_secs_f64(),
        summary.vocab_size
    );
    Ok(())
}
