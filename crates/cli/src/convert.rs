//! `pg2 convert`: a public dataset's annotation files as pg2 JSONL, or as WebDataset tar
//! shards holding the images too.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use pg2_data::parquet::Columns;
use pg2_data::{convert, stream, webdataset, OnBadLine};

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
    /// The JSONL file to write (image paths are written relative to it); with
    /// `--shard-size`, the folder to write tar shards into.
    #[arg(long)]
    pub output: PathBuf,
    /// Write WebDataset tar shards of this many samples (images inside) into the `--output`
    /// folder instead of a JSONL file.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub shard_size: Option<u64>,
    /// Keep one split (the formats that take one say so below).
    #[arg(long)]
    pub split: Option<String>,
    /// Leave out records whose image is missing instead of failing.
    #[arg(long)]
    pub skip_missing: bool,
    /// refcoco: big_vision's mask VQ-VAE (`vae-oid.npz`); targets then hold the object's
    /// mask as 16 `<seg>` tokens after its box, for referring segmentation.
    #[arg(long)]
    pub mask_vae: Option<PathBuf>,
    /// Bin the `<loc>` tokens of box targets (OCR and table formats) on the image padded with
    /// white to a square, for recipes with `data.pad_to_square = true`.
    #[arg(long)]
    pub pad_to_square: bool,
}

pub fn run(args: &ConvertArgs) -> Result<()> {
    // Shards are written from a JSONL file converted first beside them, then removed.
    let jsonl = match args.shard_size {
        Some(_) => args.output.join(format!(".{}-records.jsonl", args.format)),
        None => args.output.clone(),
    };
    let summary = convert::convert(&convert::ConvertArgs {
        format: args.format,
        inputs: args.inputs.clone(),
        images: args.images.clone(),
        output: jsonl.clone(),
        split: args.split.clone(),
        skip_missing: args.skip_missing,
        mask_vae: args.mask_vae.clone(),
        pad_to_square: args.pad_to_square,
    })?;
    match args.shard_size {
        None => eprintln!("pg2 convert: wrote {} records to {}", summary.records, args.output.display()),
        Some(per_shard) => {
            let records = stream::records(&jsonl, OnBadLine::Error, &Columns::default())?;
            let bar = indicatif::ProgressBar::new(summary.records as u64).with_message("samples sharded");
            let written = webdataset::write_shards(bar.wrap_iter(records), &args.output, per_shard as usize);
            bar.finish_and_clear();
            std::fs::remove_file(&jsonl)?;
            let shards = written?;
            eprintln!(
                "pg2 convert: wrote {} records in {} shard(s); use them as {}",
                summary.records,
                shards.len(),
                webdataset::use_as(&args.output, shards.len())
            );
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// `--shard-size` writes the records a JSONL conversion gives as tar shards, images
    /// inside, and leaves no JSONL behind.
    #[test]
    fn shard_size_writes_the_converted_records_as_tar_shards() {
        let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/convert/docvqa");
        let out = std::env::temp_dir().join(format!("pg2-convert-shards-{}", std::process::id()));
        let mut args = ConvertArgs {
            format: convert::Format::DocVqa,
            inputs: vec![fixtures.join("val_v1.0.json")],
            images: fixtures.clone(),
            output: out.join("val.jsonl"),
            shard_size: None,
            split: None,
            skip_missing: false,
            mask_vae: None,
            pad_to_square: false,
        };
        run(&args).unwrap();
        let read = |spec: &std::path::Path| -> Vec<pg2_data::Record> {
            stream::records(spec, OnBadLine::Error, &Columns::default()).unwrap().collect::<Result<_, _>>().unwrap()
        };
        let jsonl = read(&args.output);
        (args.output, args.shard_size) = (out.join("shards"), Some(1));
        run(&args).unwrap();
        let shards = read(&out.join("shards/index.json"));
        assert_eq!(shards.len(), jsonl.len());
        for (a, b) in jsonl.iter().zip(&shards) {
            assert_eq!((&a.prefix, &a.suffix, &a.extra["answers"]), (&b.prefix, &b.suffix, &b.extra["answers"]));
            assert_eq!(a.load_image().unwrap(), b.load_image().unwrap());
        }
        let names: Vec<_> = std::fs::read_dir(out.join("shards")).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names.len(), jsonl.len() + 1, "only the shards and their index: {names:?}");
        std::fs::remove_dir_all(out).unwrap();
    }
}
