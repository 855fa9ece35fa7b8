//! pg2's training: recipes, the training step ([`Trainer`]) and the loop around it
//! ([`train`]), with its checkpointer, evaluator and log, and the run folder they write
//! ([`RunDir`]).

pub mod checkpointer;
pub mod evaluator;
pub mod input;
pub mod layer_shards;
pub mod recipe;
pub mod run;
pub mod run_dir;
pub mod run_log;
pub mod tensorboard;
pub mod trainer;
pub mod update;

pub use evaluator::{evaluate_checkpoint, Evaluator};
pub use recipe::Recipe;
pub use run::{train, LaunchOptions, TrainSummary};
pub use run_dir::{checkpoint_dir, RunDir, TrainerState};
pub use trainer::{StepStats, Trainer};
