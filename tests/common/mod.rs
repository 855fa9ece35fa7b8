//! Shared by the end-to-end tests: a scratch folder with a small synthetic dataset and a
//! tiny recipe over it.

use std::path::PathBuf;
use std::process::Command;

/// The run's shape: `[train]` length and batch, checkpoint and evaluation intervals.
pub struct Tiny {
    pub steps: u64,
    pub batch_size: usize,
    pub lr: f64,
    pub warmup_steps: u64,
    pub checkpoint_every: u64,
    pub eval_every: u64,
}

/// Writes `synth/` (64 train, 8 val images of 48 px) and `recipe.toml` (the tiny model at
/// 32 px, evaluated with VQA accuracy on the counting questions) into a fresh folder.
pub fn scratch(tag: &str, name: &str, t: Tiny) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("pg2-{tag}-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let synth = Command::new(env!("CARGO_BIN_EXE_pg2"))
        .args(["data", "synth", "--train", "64", "--val", "8", "--canvas", "48", "--out"])
        .arg(dir.join("synth"))
        .output()
        .unwrap();
    assert!(synth.status.success(), "{}", String::from_utf8_lossy(&synth.stderr));
    let recipe = format!(
        r#"name = "{name}"
seed = 3
[model]
init = "tiny"
resolution = 32
[data]
tokenizer = "synth/tokenizer.json"
mixture = [{{ path = "synth/train.jsonl", weight = 1.0 }}]
workers = 1
[train]
steps = {}
batch_size = {}
lr = {}
warmup_steps = {}
log_every = 1
checkpoint_every = {}
[eval]
data = "synth/tasks/count/val.jsonl"
metric = "vqa"
every = {}
max_len = 4
"#,
        t.steps, t.batch_size, t.lr, t.warmup_steps, t.checkpoint_every, t.eval_every
    );
    std::fs::write(dir.join("recipe.toml"), recipe).unwrap();
    dir
}
