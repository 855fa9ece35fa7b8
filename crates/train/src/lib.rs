//! pg2's training: recipes, the trainer, checkpoints and logging. So far the recipe
//! format (a first cut that the trainer issue extends); the trainer comes with that issue.

pub mod recipe;

pub use recipe::Recipe;
