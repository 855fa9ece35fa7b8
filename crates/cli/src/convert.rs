//! `pg2 convert`: a public dataset's annotation files as pg2 JSONL.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use pg2_data::convert;

#[derive(Args)]
#[command(after_help = format!("Formats and their inputs:\n{}", convert::Format::help()))]
pub struct ConvertArgs {
    /// Dataset format (see below).
    pub format: convert::Format,
    /// Annotation files, in the order the format lists them (repeat the flag).
    #[arg(long = "input", required = true)]
    pub inputs: Vec<PathBuf>,
    /// The folder the dataset's image names are relative to.
    #[arg(long)]
    pub images: PathBuf,
    /// The JSONL file to write (image paths are written relative to it).
    #[arg(long)]
    pub output: PathBuf,
    /// Keep one split (the formats that take one say so below).
    #[arg(long)]
    pub split: Option<String>,
    /// Leave out records whose image is missing instead of failing.
    #[arg(long)]
    pub skip_missing: bool,
}

pub fn run(args: &ConvertArgs) -> Result<()> {
    let summary = convert::convert(&convert::ConvertArgs {
        format: args.format,
        inputs: args.inputs.clone(),
        images: args.images.clone(),
        output: args.output.clone(),
        split: args.split.clone(),
        skip_missing: args.skip_missing,
    })?;
    eprintln!("pg2 convert: wrote {} records to {}", summary.records, args.output.display());
    if let Some(example) = summary.missing_images.first() {
        eprintln!(
            "pg2 convert: left out {} records whose {} images are missing, e.g. {}",
            summary.skipped_records,
            summary.missing_images.len(),
            example.display()
        );
    }
    Ok(())
}
