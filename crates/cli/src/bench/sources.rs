//! `pg2 bench data`'s second table: the whole input pipeline (read, decode, resize,
//! tokenize, collate) on one decoding thread, over the same images stored three ways: a
//! JSONL file beside loose files, WebDataset tar shards, and parquet files.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use pg2_data::parquet::Columns;
use pg2_data::{
    parquet, stream, webdataset, Mixture, MixtureSource, OnBadLine, OnBadRecord, PgTokenizer, Pipeline, PipelineConfig,
    Resize, SourceData, StreamSource, TaskFormat,
};

/// Examples per batch, as a 3B run's per-GPU micro-batch might hold.
const BATCH: usize = 16;

/// Writes `images` as the three kinds of source in `dir` and prints examples/s of one
/// decoding thread for each at each resolution.
pub fn pipeline_rates(images: &[PathBuf], dir: &Path, resolutions: &[u32], tokenizer: &Path) -> Result<()> {
    let tok = Arc::new(
        PgTokenizer::from_file(tokenizer)
            .with_context(|| format!("the tokenizer {} (set --tokenizer)", tokenizer.display()))?,
    );
    let sources = write_sources(images, dir)?;
    println!();
    println!(
        "input pipeline (read + decode + resize + tokenize + collate), one decoding thread, batches of {BATCH}, \
         {} examples",
        images.len()
    );
    print!("{:>10}", "resolution");
    for (name, _) in &sources {
        print!(" {:>22}", format!("{name} examples/s"));
    }
    println!();
    for &res in resolutions {
        print!("{res:>10}");
        for (_, path) in &sources {
            print!(" {:>22.1}", rate(path, &tok, res, images.len())?);
        }
        println!();
    }
    Ok(())
}

/// The same records as JSONL beside the image files, tar shards and parquet files.
fn write_sources(images: &[PathBuf], dir: &Path) -> Result<Vec<(&'static str, PathBuf)>> {
    std::fs::create_dir_all(dir)?;
    let jsonl = dir.join("records.jsonl");
    let lines: Vec<String> = images
        .iter()
        .enumerate()
        .map(|(i, image)| {
            serde_json::json!({"image": image, "prefix": "caption en", "suffix": format!("test pattern number {i}")})
                .to_string()
        })
        .collect();
    std::fs::write(&jsonl, lines.join("\n") + "\n")?;
    let per_file = images.len().div_ceil(4).max(1);
    let records = || stream::records(&jsonl, OnBadLine::Error, &Columns::default());
    let (tar, parquet) = (dir.join("tar"), dir.join("parquet"));
    let shards = webdataset::write_shards(records()?, &tar, per_file)?.len();
    let files = parquet::write_files(records()?, &parquet, per_file)?.len();
    Ok(vec![
        ("jsonl + files", jsonl),
        ("tar", webdataset::shards_pattern(&tar, shards)),
        ("parquet", parquet::files_pattern(&parquet, files)),
    ])
}

/// Examples/s the pipeline delivers from `path` with one decoding thread, over `count`
/// examples (one epoch, streamed through a shuffle buffer as training reads it).
fn rate(path: &Path, tok: &Arc<PgTokenizer>, res: u32, count: usize) -> Result<f64> {
    let data = SourceData::Stream(StreamSource::open(path, 1000, OnBadLine::Error, &Columns::default())?);
    let source = MixtureSource { name: path.display().to_string(), data, weight: 1.0, format: TaskFormat::default() };
    let config = PipelineConfig {
        resize: Resize { size: res, antialias: false, pad_to_square: false },
        image_tokens: (res as usize / 14).pow(2),
        batch_size: BATCH,
        accumulation: 1,
        bucket_by_length: false,
        rank: 0,
        world: 1,
        workers: 1,
        prefetch: 1,
        pad_to: None,
        on_bad_record: OnBadRecord::Error,
    };
    let start = Instant::now();
    let pipeline = Pipeline::start(Mixture::new(vec![source], 0)?, tok.clone(), config)?;
    let batches = count.div_ceil(BATCH);
    for _ in 0..batches {
        std::hint::black_box(pipeline.next_batch()?);
    }
    Ok((batches * BATCH) as f64 / start.elapsed().as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The three sources hold the same records, and each feeds the pipeline.
    #[test]
    fn each_kind_of_source_holds_the_images_and_feeds_the_pipeline() {
        let dir = std::env::temp_dir().join(format!("pg2-bench-sources-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let images: Vec<PathBuf> = (0..5u8)
            .map(|i| {
                let path = dir.join(format!("{i}.png"));
                ::image::RgbImage::from_pixel(20, 10, ::image::Rgb([i * 40, 0, 0])).save(&path).unwrap();
                path
            })
            .collect();
        let sources = write_sources(&images, &dir.join("sources")).unwrap();
        let tok = Arc::new(
            PgTokenizer::from_file(
                &Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/paligemma/tokenizer.json"),
            )
            .unwrap(),
        );
        for (name, path) in &sources {
            let records: Vec<_> =
                stream::records(path, OnBadLine::Error, &Columns::default()).unwrap().map(Result::unwrap).collect();
            let reds: Vec<u8> = records.iter().map(|r| r.load_image().unwrap().get_pixel(0, 0).0[0]).collect();
            assert_eq!(reds, [0, 40, 80, 120, 160], "{name}");
            assert!(rate(path, &tok, 28, images.len()).unwrap() > 0.0, "{name}");
        }
        std::fs::remove_dir_all(dir).unwrap();
    }
}
