//! The recipe's `[data]` as an input pipeline: its weighted sources as a mixture, and the
//! share of each batch one worker reads.

use anyhow::{bail, Result};
use pg2_data::{
    source, Mixture, MixtureSource, OnBadLine, OnBadRecord, PipelineConfig, Resize, SourceData, StreamSource,
    TaskFormat,
};
use pg2_model::PaliGemmaConfig;

use crate::recipe::Recipe;

/// The shuffle buffer of tar-shard and parquet sources that set none (webdataset's usual
/// size).
const STREAM_SHUFFLE_BUFFER: usize = 1000;

/// The mixture the recipe describes, from its first example.
pub fn mixture(recipe: &Recipe) -> Result<Mixture> {
    let d = &recipe.data;
    let policy = match d.on_bad_record {
        OnBadRecord::Error => OnBadLine::Error,
        OnBadRecord::Skip => OnBadLine::Skip,
    };
    let sources = d
        .mixture
        .iter()
        .map(|s| {
            let spec = s.path.to_string_lossy();
            let streamed = pg2_data::webdataset::is_webdataset(&spec) || pg2_data::parquet::is_parquet(&spec);
            let data = match s.shuffle_buffer.or(streamed.then_some(STREAM_SHUFFLE_BUFFER)) {
                Some(buffer) => SourceData::Stream(StreamSource::open(&s.path, buffer, policy, &s.columns)?),
                None => {
                    let (records, skipped) = source::read_source(&s.path, policy)?;
                    if skipped > 0 {
                        eprintln!("launch: {} bad lines skipped in {}", skipped, s.path.display());
                    }
                    SourceData::Memory(records)
                }
            };
            let format = TaskFormat {
                prefix: s.prefix.clone(),
                limits: d.limits(s),
                suffix_from: s.suffix_from.clone(),
                shuffle_choices: s.shuffle_choices.clone(),
                suffix: s.suffix.clone(),
            };
            Ok(MixtureSource { name: s.path.display().to_string(), data, weight: s.weight, format })
        })
        .collect::<Result<Vec<_>, pg2_data::DataError>>()?;
    Ok(Mixture::new(sources, recipe.seed)?)
}

/// Examples per micro-batch on each of `world` workers: `train.batch_size` is the global batch.
pub fn worker_batch(recipe: &Recipe, world: usize) -> Result<usize> {
    let batch = recipe.train.batch_size;
    if world == 0 || !batch.is_multiple_of(world) {
        bail!("train.batch_size = {batch} does not split evenly over {world} workers; make it a multiple of {world}");
    }
    Ok(batch / world)
}

/// The input pipeline of worker `rank` of `world` for the recipe and a model of `model`.
pub fn pipeline_config(recipe: &Recipe, model: &PaliGemmaConfig, rank: usize, world: usize) -> Result<PipelineConfig> {
    let (t, d) = (&recipe.train, &recipe.data);
    Ok(PipelineConfig {
        resize: Resize { size: model.vision.image_size as u32, antialias: d.antialias, pad_to_square: d.pad_to_square },
        image_tokens: model.vision.num_patches(),
        batch_size: worker_batch(recipe, world)?,
        accumulation: t.grad_accumulation,
        bucket_by_length: d.bucket_by_length,
        rank,
        world,
        workers: d.workers,
        prefetch: d.prefetch,
        pad_to: d.pad_to,
        on_bad_record: d.on_bad_record,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_recipe_s_antialias_and_padding_reach_the_pipeline() {
        let text = "[model]\ninit = \"tiny\"\nresolution = 32\n[data]\ntokenizer = \"t.json\"\n\
                    mixture = [{ path = \"d.jsonl\", weight = 1.0 }]\n[train]\nsteps = 1\nbatch_size = 1\nlr = 1e-3\n";
        let model = PaliGemmaConfig::tiny(40, 39, 32).unwrap();
        for (extra, antialias, pad_to_square) in
            [("", false, false), ("antialias = true\n", true, false), ("pad_to_square = true\n", false, true)]
        {
            let recipe: Recipe = toml::from_str(&text.replace("[train]", &format!("{extra}[train]"))).unwrap();
            let config = pipeline_config(&recipe, &model, 0, 1).unwrap();
            assert_eq!(config.resize, Resize { size: 32, antialias, pad_to_square }, "{extra:?}");
        }
    }
}
