//! Checkpoints of a training run: when to save, what a checkpoint holds, how many to keep.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use pg2_dist::Group;
use tch::Kind;

use crate::recipe::Recipe;
use crate::run_dir::{RunDir, TrainerState};
use crate::trainer::Trainer;

/// Saves the trainer into the run folder as the recipe says.
pub struct Checkpointer {
    run: RunDir,
    /// Updates between checkpoints (the last update always saves one).
    every: Option<u64>,
    /// How many of the newest to keep (all when `None`).
    keep: Option<usize>,
    /// Copied into each checkpoint, so that it is a complete model folder.
    tokenizer: PathBuf,
    /// The kind the weights are stored in.
    kind: Kind,
}

impl Checkpointer {
    pub fn new(run: RunDir, recipe: &Recipe) -> Checkpointer {
        let t = &recipe.train;
        Checkpointer {
            run,
            every: t.checkpoint_every,
            keep: t.keep_checkpoints,
            tokenizer: recipe.data.tokenizer.clone(),
            kind: recipe.model.dtype.kind(),
        }
    }

    /// Whether the run saves after update `done` of `total`.
    pub fn due(&self, done: u64, total: u64) -> bool {
        self.every.is_some_and(|n| done.is_multiple_of(n)) || done == total
    }

    /// Writes `checkpoints/step-NNNNNN/` (the model folder, or with LoRA the adapter folder,
    /// with its tokenizer, the optimizer
    /// state and `state`), points `latest` at it and prunes old ones; returns its folder on
    /// rank 0. Every rank calls it: with sharded training each writes its optimizer state
    /// first, and rank 0 puts the files into the checkpoint once all are written.
    pub fn save(&self, trainer: &Trainer, state: &TrainerState, group: &mut Group) -> Result<Option<PathBuf>> {
        let (state_file, optimizer_state) = trainer.optimizer_state();
        let shards = self.run.shards_dir(state.step);
        if trainer.sharded() {
            let path = shards.join(&state_file);
            self.run.write_shard(&path, |tmp| pg2_model::checkpoint::write_file(tmp, &optimizer_state, Kind::Float))?;
            group.barrier(&format!("checkpoint-{}", state.step))?;
        }
        let weights = trainer.checkpoint_weights(group.is_main())?;
        if !group.is_main() {
            return Ok(None);
        }
        let dir = self.run.save_checkpoint(state.step, |dir: &Path| {
            trainer.model.save_weights(dir, &weights, self.kind)?;
            std::fs::copy(&self.tokenizer, dir.join("tokenizer.json"))
                .with_context(|| format!("copying {} into the checkpoint", self.tokenizer.display()))?;
            match trainer.sharded() {
                true => self.run.take_shards(state.step, dir, group.world())?,
                false => pg2_model::checkpoint::write_file(&dir.join(&state_file), &optimizer_state, Kind::Float)?,
            }
            std::fs::write(dir.join("trainer_state.json"), serde_json::to_string_pretty(state)?)
                .context("writing trainer_state.json")?;
            Ok(())
        });
        let dir = dir.with_context(|| {
            format!(
                "checkpoint step-{:06} not written (is the disk holding {} full?); the previous checkpoint and \
                 checkpoints/latest are intact: free space, then rerun with --resume",
                state.step,
                self.run.root().display()
            )
        })?;
        if let Some(keep) = self.keep {
            self.run.prune(keep, state.step)?;
        }
        Ok(Some(dir))
    }
}
