//! `pg2 shard`: a source (a JSONL file or folder, tar shards, or parquet files) written as
//! WebDataset tar shards, the form a cluster file system or object store serves well, or as
//! parquet files in Hugging Face's layout.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use pg2_data::parquet::{self, Columns};
use pg2_data::{stream, webdataset, OnBadLine};

/// What `pg2 shard` writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ShardFormat {
    /// WebDataset tar shards.
    Tar,
    /// Parquet files as Hugging Face datasets writes them.
    Parquet,
}

#[derive(Args)]
pub struct ShardArgs {
    /// The source: a JSONL file, a folder of JSONL shards, tar shards
    /// (`shard-{000000..000575}.tar`, globs, `pipe:CMD`), or parquet files
    /// (`train-*.parquet`).
    pub source: PathBuf,
    /// For parquet: a record field from the columns, as a recipe's `columns`
    /// (`--column prefix="answer en {question}" --column suffix={answer}`); repeatable.
    #[arg(long = "column", value_name = "KEY=VALUE", value_parser = parse_column)]
    pub columns: Vec<(String, String)>,
    /// The folder to write `shard-000000.tar`, ... and their `index.json` (or
    /// `part-00000.parquet`, ...) into.
    #[arg(long)]
    pub output: PathBuf,
    /// What to write.
    #[arg(long, value_enum, default_value = "tar")]
    pub format: ShardFormat,
    /// Samples per shard.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub shard_size: u64,
    /// Leave out records that are not valid instead of stopping at the first.
    #[arg(long)]
    pub skip_bad: bool,
}

pub fn run(args: &ShardArgs) -> Result<()> {
    let policy = if args.skip_bad { OnBadLine::Skip } else { OnBadLine::Error };
    let columns = Columns(args.columns.iter().cloned().collect());
    let records = stream::records(&args.source, policy, &columns)?;
    let bar = indicatif::ProgressBar::new_spinner().with_message("samples written");
    let (per_shard, records) = (args.shard_size as usize, bar.wrap_iter(records));
    let (written, use_as) = match args.format {
        ShardFormat::Tar => {
            let n = webdataset::write_shards(records, &args.output, per_shard)?.len();
            (n, webdataset::use_as(&args.output, n))
        }
        ShardFormat::Parquet => {
            let n = parquet::write_files(records, &args.output, per_shard)?.len();
            (n, format!("`path = \"{}\"`", parquet::files_pattern(&args.output, n).display()))
        }
    };
    bar.finish_and_clear();
    eprintln!("pg2 shard: {} samples in {written} file(s); use them as {use_as}", bar.position());
    Ok(())
}

fn parse_column(text: &str) -> Result<(String, String), String> {
    let (key, value) = text.split_once('=').ok_or_else(|| format!("`{text}`: expected KEY=VALUE"))?;
    Ok((key.to_string(), value.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Hugging Face parquet files re-sharded into tar shards keep every record: prompt,
    /// target, fields and image.
    #[test]
    fn parquet_files_become_tar_shards_holding_the_same_records() {
        let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/parquet");
        let output = std::env::temp_dir().join(format!("pg2-shard-parquet-{}", std::process::id()));
        let column = |text: &str| parse_column(text).unwrap();
        let args = ShardArgs {
            source: fixtures.join("train-*.parquet"),
            output: output.clone(),
            format: ShardFormat::Tar,
            shard_size: 2,
            skip_bad: false,
            columns: vec![column("prefix=answer en {question}"), column("suffix=answer")],
        };
        run(&args).unwrap();
        let mapping = Columns(args.columns.iter().cloned().collect());
        let read = |spec: &std::path::Path, columns: &Columns| -> Vec<pg2_data::Record> {
            stream::records(spec, OnBadLine::Error, columns).unwrap().collect::<Result<_, _>>().unwrap()
        };
        let before = read(&args.source, &mapping);
        let pattern = webdataset::shards_pattern(&output, 3);
        assert!(pattern.ends_with("shard-{000000..000002}.tar"), "{}", pattern.display());
        let after = read(&pattern, &Columns::default());
        assert_eq!(after.len(), 5);
        for (a, b) in before.iter().zip(&after) {
            assert_eq!((&a.prefix, &a.suffix), (&b.prefix, &b.suffix));
            assert_eq!(a.extra["answers"], b.extra["answers"]);
            assert_eq!(a.load_image().unwrap(), b.load_image().unwrap());
        }
        assert!(parse_column("prefix").unwrap_err().contains("expected KEY=VALUE"));
        std::fs::remove_dir_all(output).unwrap();
    }
}
