//! pg2's training: recipes, the trainer loop, checkpoints and run logging.

pub mod recipe;
pub mod trainer;

pub use recipe::Recipe;
pub use trainer::{train, LaunchOptions, TrainSummary};
