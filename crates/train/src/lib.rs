//! pg2's training: recipes, the trainer loop, checkpoints and run logging (metrics.jsonl
//! and TensorBoard event files).

pub mod recipe;
pub mod tensorboard;
pub mod trainer;

pub use recipe::Recipe;
pub use trainer::{evaluate_checkpoint, padding, train, LaunchOptions, TrainSummary};
