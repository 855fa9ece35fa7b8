//! Evaluation during training and of a finished checkpoint (`pg2 eval`): decode a
//! held-out set, write every record with its prediction, score them.

use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use pg2_data::layout::DEFAULT_MAX_TOKENS;
use pg2_data::{stream, InferenceBatch, OnBadLine, PgTokenizer, Record, Resize, TaskFormat, TextLimits};
use pg2_dist::Group;
use pg2_eval::segmentation::DecodeMasks;
use pg2_model::vqvae::MaskVae;
use pg2_model::{generate, DecodeOptions, PaliGemma, RunOptions};
use serde_json::{Map, Value};
use tch::Device;

use crate::recipe::{DataSection, EvalSection, Recipe};
use crate::run_dir::{checkpoint_dir, RunDir, TrainerState};

/// A recipe's `[eval]` block with its records read.
pub struct Evaluator {
    spec: EvalSection,
    /// Whether images are antialiased as they are resized.
    antialias: bool,
    /// Whether images are padded to a square first (always as in training, `data.pad_to_square`:
    /// the `<loc>` tokens of the targets depend on it).
    pad_to_square: bool,
    /// The training data's `text_len`: prompts are cut to it as in training
    /// (big_vision's `combine_and_keep_eval(text_len)`).
    text_len: Option<usize>,
    records: Vec<Record>,
    tokenizer: Arc<PgTokenizer>,
    /// `eval.mask_vae`, for `refcoco_seg`.
    mask_vae: Option<MaskVae>,
}

impl Evaluator {
    /// Reads the first `max_examples` records of `spec.data`; images are antialiased as
    /// `spec.antialias` says, else as in training (`data.antialias`), padded to a square as in
    /// training (`data.pad_to_square`), and prompts are cut to `data.text_len`.
    pub fn new(spec: &EvalSection, data: &DataSection, tokenizer: Arc<PgTokenizer>) -> Result<Evaluator> {
        let records = stream::records(&spec.data, OnBadLine::Error, &spec.columns)?
            .take(spec.max_examples.unwrap_or(usize::MAX))
            .collect::<Result<_, _>>()?;
        let antialias = spec.antialias.unwrap_or(data.antialias);
        let pad_to_square = data.pad_to_square;
        let mask_vae = spec.mask_vae.as_deref().map(MaskVae::load).transpose()?;
        Ok(Evaluator {
            spec: spec.clone(),
            antialias,
            pad_to_square,
            text_len: data.text_len,
            records,
            tokenizer,
            mask_vae,
        })
    }

    /// Whether the run evaluates after update `done` of `total`.
    pub fn due(&self, done: u64, total: u64) -> bool {
        done.is_multiple_of(self.spec.every) || done == total
    }

    /// Decodes the records (each rank of `group` a contiguous share); on rank 0, writes
    /// `eval/step-NNNNNN.jsonl` in `run` (each record with its prediction) and returns the
    /// scores (`None` on the other ranks).
    pub fn run(
        &self,
        model: &PaliGemma,
        step: u64,
        run: &RunDir,
        group: &mut Group,
    ) -> Result<Option<Map<String, Value>>> {
        let (spec, tok) = (&self.spec, &self.tokenizer);
        let (rank, world) = (group.rank(), group.world());
        let records = &self.records[self.records.len() * rank / world..self.records.len() * (rank + 1) / world];
        let size = model.config.vision.image_size as u32;
        let resize = Resize { size, antialias: self.antialias, pad_to_square: self.pad_to_square };
        let image = (resize, model.config.vision.num_patches());
        let decode = DecodeOptions {
            max_new_tokens: spec.max_len,
            beam_size: spec.beam,
            eos_id: tok.eos_id,
            pad_id: tok.pad_id,
        };
        let limits = TextLimits { text_len: self.text_len, ..TextLimits::default() };
        let format = TaskFormat { prefix: spec.prefix.clone(), limits, ..TaskFormat::default() };
        let mut lines = String::new();
        for chunk in records.chunks(spec.batch_size) {
            let prepared =
                InferenceBatch::new(chunk, tok, &format, image, (false, DEFAULT_MAX_TOKENS), model.device())?;
            for ((record, prompt), tokens) in
                chunk.iter().zip(prepared.prompts).zip(generate(model, &prepared.batch.inputs, &decode)?)
            {
                let mut row = record.extra.clone();
                row.insert("prefix".into(), prompt.into());
                if let Some(suffix) = &record.suffix {
                    row.insert("suffix".into(), suffix.clone().into());
                }
                row.insert("prediction".into(), tok.decode(&tokens).into());
                lines += &format!("{}\n", Value::Object(row));
            }
        }
        let Some(parts) = group.gather_to_main(&format!("eval-{step}"), lines.as_bytes())? else { return Ok(None) };
        let lines: String = parts.iter().map(|p| String::from_utf8_lossy(p)).collect();
        let rows = lines.lines().map(serde_json::from_str).collect::<Result<Vec<Value>, _>>()?;
        run.write_predictions(step, lines.as_bytes())?;
        let decode = self.mask_vae.as_ref().map(mask_decoder);
        Ok(Some(pg2_eval::score_with(spec.metric, &rows, decode.as_ref().map(|d| d as DecodeMasks))?))
    }
}

/// The VQ-VAE's decoder as the `refcoco_seg` metric calls it.
pub fn mask_decoder(vae: &MaskVae) -> impl Fn(&[[u8; 16]]) -> Result<Vec<Vec<f32>>, String> + '_ {
    |codes| vae.decode_lists(codes).map_err(|e| e.to_string())
}

/// `pg2 eval`: evaluates a checkpoint (a model folder or a run) with a recipe's `[eval]`
/// block and its model settings (resolution, dtype, soft-caps), with the PEFT adapter
/// folder (or LoRA run) `adapter` on it if given, writing `out/eval/step-NNNNNN.jsonl` (the
/// step the checkpoint, or the adapter, was saved at, else 0).
pub fn evaluate_checkpoint(
    recipe: &Recipe,
    checkpoint: &Path,
    adapter: Option<&Path>,
    device: Device,
    out: &Path,
) -> Result<Map<String, Value>> {
    let spec = recipe.eval.as_ref().context("the recipe has no [eval] block")?;
    let dir = checkpoint_dir(checkpoint)?;
    let options = RunOptions { soft_caps: recipe.model.soft_caps, ..RunOptions::default() };
    let tokenizer = Arc::new(PgTokenizer::from_file(&recipe.data.tokenizer)?);
    let (model, saved) = match adapter {
        Some(adapter) => {
            if dir.join(pg2_model::lora::CONFIG_FILE).is_file() {
                bail!("{} is an adapter folder: give its base model with --checkpoint", dir.display());
            }
            let adapter = checkpoint_dir(adapter)?;
            (crate::trainer::load_adapted(recipe, &tokenizer, &dir, &adapter, device, options)?, adapter)
        }
        None => (crate::trainer::load_model(recipe, &tokenizer, &dir, device, options)?, dir),
    };
    let evaluator = Evaluator::new(spec, &recipe.data, tokenizer)?;
    let step = TrainerState::read(&saved).map_or(0, |s| s.step);
    let scores = evaluator.run(&model, step, &RunDir::new(out), &mut Group::single())?;
    Ok(scores.expect("a group of one is its own main rank"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eval_images_are_antialiased_as_in_training_unless_the_eval_block_says() {
        let dir = std::env::temp_dir().join(format!("pg2-eval-antialias-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("val.jsonl"), "{\"image\": \"a.png\", \"prefix\": \"p\"}\n").unwrap();
        let tok = Arc::new(
            PgTokenizer::from_file(
                &Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/paligemma/tokenizer.json"),
            )
            .unwrap(),
        );
        for (eval, data, want) in
            [(None, false, false), (None, true, true), (Some(false), true, false), (Some(true), false, true)]
        {
            let text = format!(
                "data = {:?}\nmetric = \"exact\"\n{}",
                dir.join("val.jsonl"),
                eval.map_or(String::new(), |a| format!("antialias = {a}\n"))
            );
            let spec: EvalSection = toml::from_str(&text).unwrap();
            let mut section: DataSection =
                toml::from_str("tokenizer = \"t.json\"\nmixture = [{ path = \"d.jsonl\", weight = 1.0 }]").unwrap();
            section.antialias = data;
            section.pad_to_square = data;
            let evaluator = Evaluator::new(&spec, &section, tok.clone()).unwrap();
            assert_eq!(evaluator.antialias, want, "{eval:?} {data}");
            assert_eq!(evaluator.pad_to_square, data, "padded as in training, whatever eval.antialias");
        }
        std::fs::remove_dir_all(dir).unwrap();
    }
}
