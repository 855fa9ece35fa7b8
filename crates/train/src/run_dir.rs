//! The run folder, `runs/<name>/`: what `launch` writes and what `pg2 report`, `sweep`,
//! `pg2 eval/score/predict/inspect` and `--resume` read, in one place.
//!
//! | path | what |
//! |---|---|
//! | `recipe.toml` | the fully resolved recipe |
//! | `metrics.jsonl` | one JSON object per logged step and per evaluation (`eval/<metric>`) |
//! | `tb/` | TensorBoard events |
//! | `eval/step-NNNNNN.jsonl` | every evaluated record with its prediction |
//! | `checkpoints/step-NNNNNN/` | a Hugging Face model folder plus `optimizer.safetensors` (sharded training: `optimizer-rank-RRRRR-of-WWWWW.safetensors`, one per rank), `tokenizer.json` and `trainer_state.json` |
//! | `checkpoints/latest` | the newest checkpoint's folder name |
//!
//! A checkpoint is written under a temporary name and renamed, then `latest` is replaced by
//! a rename, so a kill at any moment leaves the previous checkpoint and its pointer intact.
//! With sharded training every rank first writes its optimizer state into
//! `checkpoints/.shards-step-NNNNNN/`, whence rank 0 moves the files into the checkpoint.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use pg2_data::files::{write_atomically, Staged};
use pg2_data::MixturePosition;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::recipe::{Recipe, RecipeError};

/// Saved in each checkpoint as `trainer_state.json`: where the run stands.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// Updates done.
    pub step: u64,
    /// Updates the whole run makes (absent in checkpoints older than this field).
    #[serde(default)]
    pub total_steps: Option<u64>,
    /// Where the data stream continues.
    pub position: MixturePosition,
    pub seed: u64,
}

impl TrainerState {
    /// Reads a checkpoint's `trainer_state.json`.
    pub fn read(checkpoint: &Path) -> Result<TrainerState> {
        let path = checkpoint.join("trainer_state.json");
        let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| {
            format!("{}: not a trainer state (truncated?); resume from another checkpoint", path.display())
        })
    }
}

/// A run's metrics.jsonl merged by step (a resumed run logs the steps after its checkpoint
/// again; the later values win).
pub type Metrics = BTreeMap<u64, Map<String, Value>>;

/// A run's checkpoint folders with their steps, and the temporaries of interrupted writes.
type CheckpointEntries = (Vec<(u64, PathBuf)>, Vec<PathBuf>);

/// A run's last evaluation: the metric, its value and the step.
#[derive(Debug, Clone, PartialEq)]
pub struct Evaluation {
    pub metric: String,
    pub value: f64,
    pub step: u64,
}

/// A run folder.
#[derive(Debug, Clone)]
pub struct RunDir {
    root: PathBuf,
}

impl RunDir {
    pub fn new(root: impl Into<PathBuf>) -> RunDir {
        RunDir { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn recipe_path(&self) -> PathBuf {
        self.root.join("recipe.toml")
    }

    pub fn metrics_path(&self) -> PathBuf {
        self.root.join("metrics.jsonl")
    }

    pub fn tensorboard_dir(&self) -> PathBuf {
        self.root.join("tb")
    }

    fn checkpoints(&self) -> PathBuf {
        self.root.join("checkpoints")
    }

    fn pointer(&self) -> PathBuf {
        self.checkpoints().join("latest")
    }

    /// The newest checkpoint (`checkpoints/latest`), `None` when the run has none. A pointer
    /// that is empty or names a missing folder is an error saying what to do.
    pub fn latest(&self) -> Result<Option<PathBuf>> {
        let pointer = self.pointer();
        if !pointer.exists() {
            return Ok(None);
        }
        resolve_pointer(&pointer).map(Some)
    }

    /// The run's recipe as it was resolved when it started.
    pub fn recipe(&self) -> Result<Recipe, RecipeError> {
        Recipe::from_file(&self.recipe_path())
    }

    /// Whether the run has made its last update: its latest checkpoint's step is the run's
    /// `total_steps`.
    pub fn finished(&self) -> bool {
        let state = self.latest().ok().flatten().and_then(|dir| TrainerState::read(&dir).ok());
        state.is_some_and(|s| s.total_steps == Some(s.step))
    }

    /// Removes what a run writes (checkpoints, metrics, events, predictions), to start over.
    pub fn clear(&self) -> Result<()> {
        for old in [self.checkpoints(), self.tensorboard_dir(), self.eval_dir(), self.metrics_path()] {
            let removed = match old.is_dir() {
                true => std::fs::remove_dir_all(&old),
                false if old.exists() => std::fs::remove_file(&old),
                false => Ok(()),
            };
            removed.with_context(|| format!("removing {}", old.display()))?;
        }
        Ok(())
    }

    /// Writes checkpoint `step-NNNNNN` by `write` (into a temporary folder, renamed when
    /// complete) and points `latest` at it; returns its folder.
    pub fn save_checkpoint(&self, step: u64, write: impl FnOnce(&Path) -> Result<()>) -> Result<PathBuf> {
        let dir = self.checkpoints();
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let name = format!("step-{step:06}");
        let folder = dir.join(&name);
        // Only rank 0 writes checkpoints (the other ranks only their optimizer shares, into
        // this step's shard folder, already there): any other temporary was left by a
        // killed process.
        for leftover in self.entries()?.1.into_iter().filter(|t| *t != self.shards_dir(step)) {
            std::fs::remove_dir_all(&leftover).with_context(|| format!("removing {}", leftover.display()))?;
        }
        let staged = Staged::new(&folder).with_context(|| format!("preparing {}", folder.display()))?;
        write(staged.path())?;
        if folder.exists() {
            // The same step saved again (a rerun after a crash between rename and pointer).
            std::fs::remove_dir_all(&folder).with_context(|| format!("replacing {}", folder.display()))?;
        }
        staged.commit().with_context(|| format!("renaming the new checkpoint to {}", folder.display()))?;
        write_atomically(&self.pointer(), name.as_bytes())
            .with_context(|| format!("writing {}", self.pointer().display()))?;
        Ok(folder)
    }

    /// Where the ranks put their optimizer state for checkpoint `step` (sharded training).
    pub fn shards_dir(&self, step: u64) -> PathBuf {
        self.checkpoints().join(format!(".shards-step-{step:06}"))
    }

    /// Writes one rank's file at `path` (in [`RunDir::shards_dir`]) by `write`, under a
    /// temporary name renamed when complete.
    pub fn write_shard(
        &self,
        path: &Path,
        write: impl FnOnce(&Path) -> Result<(), pg2_model::ModelError>,
    ) -> Result<()> {
        let dir = path.parent().expect("a shard file is in a folder");
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let staged = Staged::new(path).with_context(|| format!("preparing {}", path.display()))?;
        write(staged.path())?;
        staged.commit().with_context(|| format!("renaming {} into place", path.display()))
    }

    /// Moves the `world` ranks' optimizer files of checkpoint `step` into `dir` (the
    /// checkpoint being written); an error naming any that is missing.
    pub fn take_shards(&self, step: u64, dir: &Path, world: usize) -> Result<()> {
        let shards = self.shards_dir(step);
        for rank in 0..world {
            let name = crate::update::shard_file(rank, world);
            let from = shards.join(&name);
            std::fs::rename(&from, dir.join(&name)).with_context(|| {
                format!("moving {} into the checkpoint (did rank {rank} write it?)", from.display())
            })?;
        }
        // What else is there was left by an earlier, interrupted attempt at this step.
        std::fs::remove_dir_all(&shards).with_context(|| format!("removing {}", shards.display()))
    }

    /// Deletes all but the newest `keep` checkpoints up to step `current` (the one just
    /// saved), and any past it (left by an interrupted run that got further).
    pub fn prune(&self, keep: usize, current: u64) -> Result<()> {
        let mut steps = self.entries()?.0;
        steps.sort();
        let (done, stale): (Vec<_>, Vec<_>) = steps.into_iter().partition(|(step, _)| *step <= current);
        for (_, old) in done.iter().rev().skip(keep).chain(&stale) {
            std::fs::remove_dir_all(old).with_context(|| format!("removing {}", old.display()))?;
        }
        Ok(())
    }

    /// The `step-NNNNNN` checkpoints by step, and the temporaries of interrupted writes.
    fn entries(&self) -> Result<CheckpointEntries> {
        let dir = self.checkpoints();
        let (mut steps, mut temporaries) = (vec![], vec![]);
        for entry in std::fs::read_dir(&dir).with_context(|| format!("listing {}", dir.display()))? {
            let path = entry.with_context(|| format!("listing {}", dir.display()))?.path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            if let Some(step) = name.strip_prefix("step-").and_then(|n| n.parse().ok()) {
                steps.push((step, path));
            } else if (name.starts_with(".step-") && name.contains(".tmp-")) || name.starts_with(".shards-step-") {
                temporaries.push(path);
            }
        }
        Ok((steps, temporaries))
    }

    fn eval_dir(&self) -> PathBuf {
        self.root.join("eval")
    }

    /// Writes the predictions of the evaluation at `step` (`eval/step-NNNNNN.jsonl`).
    pub fn write_predictions(&self, step: u64, lines: &[u8]) -> Result<PathBuf> {
        let dir = self.eval_dir();
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let path = dir.join(format!("step-{step:06}.jsonl"));
        write_atomically(&path, lines).with_context(|| format!("writing {}", path.display()))?;
        Ok(path)
    }

    /// The logged metrics by step; empty when nothing was logged yet. Lines that do not
    /// parse (one cut by a kill) are passed over.
    pub fn metrics(&self) -> Result<Metrics> {
        let path = self.metrics_path();
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        let mut steps = Metrics::new();
        for line in text.lines() {
            let Ok(Value::Object(fields)) = serde_json::from_str::<Value>(line) else { continue };
            if let Some(step) = fields.get("step").and_then(Value::as_u64) {
                steps.entry(step).or_default().extend(fields);
            }
        }
        Ok(steps)
    }

    /// The newest logged `eval/<score>` value, if any: of `score` when given (a metric's
    /// [`pg2_eval::Metric::primary`]), else of the first score in name order.
    pub fn last_evaluation(&self, score: Option<&str>) -> Result<Option<Evaluation>> {
        let metrics = self.metrics()?;
        let wanted = |k: &str| score.map_or(k.starts_with("eval/"), |s| k.strip_prefix("eval/") == Some(s));
        Ok(metrics.iter().rev().find_map(|(&step, fields)| {
            let (key, value) = fields.iter().find(|(k, _)| wanted(k))?;
            Some(Evaluation { metric: key.trim_start_matches("eval/").to_string(), value: value.as_f64()?, step })
        }))
    }
}

/// Reads a `latest` pointer: the checkpoint folder it names, beside it.
fn resolve_pointer(pointer: &Path) -> Result<PathBuf> {
    let name = std::fs::read_to_string(pointer).with_context(|| format!("reading {}", pointer.display()))?;
    let name = name.trim();
    if name.is_empty() {
        bail!("{} is empty: the run's last checkpoint write was interrupted? point it at a checkpoint folder beside it (step-NNNNNN) or pass --overwrite", pointer.display());
    }
    let dir = pointer.parent().unwrap_or(Path::new(".")).join(name);
    if !dir.is_dir() {
        bail!(
            "{} names {name}, which does not exist: point it at a checkpoint folder beside it or pass --overwrite",
            pointer.display()
        );
    }
    Ok(dir)
}

/// A model folder (or a LoRA run's adapter folder), given as itself or as a run folder, its
/// `checkpoints` folder or its `latest` pointer (the newest checkpoint): what every command
/// that takes a checkpoint accepts.
pub fn checkpoint_dir(path: &Path) -> Result<PathBuf> {
    if path.join("config.json").is_file() || path.join(pg2_model::lora::CONFIG_FILE).is_file() {
        return Ok(path.to_path_buf());
    }
    let pointer =
        [path.to_path_buf(), path.join("latest"), path.join("checkpoints/latest")].into_iter().find(|p| p.is_file());
    match pointer {
        Some(pointer) => resolve_pointer(&pointer),
        None if !path.exists() => bail!("{}: no such model or run folder", path.display()),
        None => bail!(
            "{}: neither a model folder (config.json), an adapter folder (adapter_config.json) nor a run with checkpoints (checkpoints/latest)",
            path.display()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> RunDir {
        let dir = std::env::temp_dir().join(format!("pg2-rundir-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        RunDir::new(dir)
    }

    fn state(step: u64, total: u64) -> TrainerState {
        TrainerState {
            step,
            total_steps: Some(total),
            position: MixturePosition { next: step, consumed: vec![vec![step]] },
            seed: 0,
        }
    }

    fn save(run: &RunDir, step: u64, total: u64) -> PathBuf {
        run.save_checkpoint(step, |dir| {
            std::fs::create_dir_all(dir)?;
            std::fs::write(dir.join("config.json"), "{}")?;
            std::fs::write(dir.join("trainer_state.json"), serde_json::to_string(&state(step, total))?)?;
            Ok(())
        })
        .unwrap()
    }

    #[test]
    fn checkpoints_pointer_pruning_and_finishing() {
        let run = scratch("checkpoints");
        assert_eq!(run.latest().unwrap(), None);
        assert!(!run.finished());
        for step in [2, 4, 6] {
            assert_eq!(save(&run, step, 6), run.root().join(format!("checkpoints/step-{step:06}")));
            assert_eq!(run.latest().unwrap(), Some(run.root().join(format!("checkpoints/step-{step:06}"))));
            assert_eq!(run.finished(), step == 6, "step {step}");
        }
        // A temporary left by a killed writer goes with the next save.
        std::fs::create_dir_all(run.root().join("checkpoints/.step-000007.tmp-1")).unwrap();
        save(&run, 6, 6);
        // A checkpoint past the one just saved is stale (an interrupted run that got further).
        std::fs::create_dir_all(run.root().join("checkpoints/step-000009")).unwrap();
        // A checkpoint past the one just saved is stale (an interrupted run that got further).
        std::fs::create_dir_all(run.root().join("checkpoints/step-000009")).unwrap();
        assert!(!run.root().join("checkpoints/.step-000007.tmp-1").exists());
        run.prune(2, 6).unwrap();
        let mut left: Vec<String> = std::fs::read_dir(run.root().join("checkpoints"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, ["latest", "step-000004", "step-000006"]);
        // Every form a user may pass resolves to the newest checkpoint.
        for given in [
            run.root().to_path_buf(),
            run.root().join("checkpoints"),
            run.root().join("checkpoints/latest"),
            run.root().join("checkpoints/step-000006"),
        ] {
            assert_eq!(
                checkpoint_dir(&given).unwrap(),
                run.root().join("checkpoints/step-000006"),
                "{}",
                given.display()
            );
        }
        // A failed write leaves the previous checkpoint and its pointer alone.
        let failed = run.save_checkpoint(8, |dir| {
            std::fs::create_dir_all(dir)?;
            bail!("disk full")
        });
        assert!(failed.is_err());
        assert_eq!(run.latest().unwrap(), Some(run.root().join("checkpoints/step-000006")));
        assert!(!run.root().join("checkpoints/step-000008").exists());
        assert_eq!(std::fs::read_dir(run.root().join("checkpoints")).unwrap().count(), 3, "no temporary is left");
        run.clear().unwrap();
        assert_eq!(run.latest().unwrap(), None);
        std::fs::remove_dir_all(run.root()).unwrap();
    }

    #[test]
    fn broken_pointers_and_states_are_named_with_what_to_do() {
        let run = scratch("broken");
        save(&run, 1, 3);
        let pointer = run.root().join("checkpoints/latest");
        std::fs::write(&pointer, "").unwrap();
        let err = run.latest().unwrap_err().to_string();
        assert!(err.contains("checkpoints/latest is empty") && err.contains("--overwrite"), "{err}");
        std::fs::write(&pointer, "step-000009").unwrap();
        let err = format!("{:#}", checkpoint_dir(run.root()).unwrap_err());
        assert!(err.contains("step-000009") && err.contains("does not exist"), "{err}");
        let state = run.root().join("checkpoints/step-000001/trainer_state.json");
        std::fs::write(&state, "{\"step\": 1, \"posi").unwrap();
        let err = format!("{:#}", TrainerState::read(state.parent().unwrap()).unwrap_err());
        assert!(err.contains("trainer_state.json") && err.contains("truncated"), "{err}");
        let err = checkpoint_dir(&run.root().join("nowhere")).unwrap_err().to_string();
        assert!(err.contains("nowhere") && err.contains("no such"), "{err}");
        std::fs::remove_dir_all(run.root()).unwrap();
    }

    #[test]
    fn metrics_merge_by_step_and_the_last_evaluation_is_found() {
        let run = scratch("metrics");
        assert_eq!(run.last_evaluation(None).unwrap(), None);
        let lines = [
            r#"{"step": 0, "eval/cider": 0.0}"#,
            r#"{"step": 10, "loss": 2.0}"#,
            r#"{"step": 10, "eval/cider": 0.5, "eval/bleu1": 0.7}"#,
            r#"{"step": 20, "loss": 1.5}"#,
            r#"{"step": 10, "loss": 1.9}"#,
            r#"{"step": 30, "lo"#,
        ];
        std::fs::write(run.metrics_path(), lines.join("\n")).unwrap();
        let metrics = run.metrics().unwrap();
        assert_eq!(metrics.keys().copied().collect::<Vec<_>>(), [0, 10, 20]);
        assert_eq!(metrics[&10]["loss"], 1.9, "a resumed run's later line wins");
        let cider = Evaluation { metric: "cider".into(), value: 0.5, step: 10 };
        assert_eq!(run.last_evaluation(Some("cider")).unwrap(), Some(cider));
        let first = Evaluation { metric: "bleu1".into(), value: 0.7, step: 10 };
        assert_eq!(run.last_evaluation(None).unwrap(), Some(first));
        std::fs::remove_dir_all(run.root()).unwrap();
    }
}
