//! `pg2 shard`: a source (a JSONL file or folder, or tar shards) written as WebDataset tar
//! shards, the form a cluster file system or object store serves well.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use pg2_data::{webdataset, OnBadLine};

#[derive(Args)]
pub struct ShardArgs {
    /// The source: a JSONL file, a folder of JSONL shards, or tar shards
    /// (`shard-{000000..000575}.tar`, globs, `pipe:CMD`).
    pub source: PathBuf,
    /// The folder to write `shard-000000.tar`, ... into.
    #[arg(long)]
    pub output: PathBuf,
    /// Samples per shard.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub shard_size: u64,
    /// Leave out records that are not valid instead of stopping at the first.
    #[arg(long)]
    pub skip_bad: bool,
}

pub fn run(args: &ShardArgs) -> Result<()> {
    let policy = if args.skip_bad { OnBadLine::Skip } else { OnBadLine::Error };
    let records = webdataset::records(&args.source, policy)?;
    let bar = indicatif::ProgressBar::new_spinner().with_message("samples written");
    let shards = webdataset::write_shards(bar.wrap_iter(records), &args.output, args.shard_size as usize)?;
    bar.finish_and_clear();
    eprintln!(
        "pg2 shard: {} samples in {} shard(s); use them as `path = \"{}/shard-{{000000..{:06}}}.tar\"`",
        bar.position(),
        shards.len(),
        args.output.display(),
        shards.len().saturating_sub(1)
    );
    Ok(())
}
