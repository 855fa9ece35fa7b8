//! End-to-end sweeps: the `sweep` binary (calling `launch`) over a tiny recipe on freshly
//! generated synthetic data; the results, resuming a half-finished sweep, the SLURM script
//! and a failing point.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

mod common;

/// A 4-step tiny run (checkpoints at steps 2 and 4, evaluated before training and at the end).
fn setup(name: &str) -> PathBuf {
    common::scratch(
        "sweep",
        name,
        common::Tiny { steps: 4, batch_size: 4, lr: 1e-3, warmup_steps: 1, checkpoint_every: 2, eval_every: 4 },
    )
}

/// Runs `sweep` on the scratch recipe into `dir/sweep`.
fn sweep(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sweep"))
        .arg(dir.join("recipe.toml"))
        .args(["--device", "cpu", "--out"])
        .arg(dir.join("sweep"))
        .args(args)
        .output()
        .unwrap()
}

fn summary(dir: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("sweep/sweep.json")).unwrap()).unwrap()
}

fn read(path: impl AsRef<Path>) -> String {
    std::fs::read_to_string(path.as_ref()).unwrap_or_else(|e| panic!("{}: {e}", path.as_ref().display()))
}

const LRS: &str = "train.lr=1e-4,1e-3,1e-2";

#[test]
fn three_learning_rates_give_a_table_a_best_point_and_a_plot() {
    let dir = setup("three");
    let out = sweep(&dir, &["--grid", LRS, "--parallel", "2"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(stdout.matches("<- best").count(), 1, "{stdout}");

    let json = summary(&dir);
    assert_eq!(json["metric"], "eval/vqa", "the first eval key is the default metric");
    assert_eq!(json["higher_is_better"], true);
    let points = json["points"].as_array().unwrap();
    let names: Vec<&str> = points.iter().map(|p| p["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["train.lr=1e-4", "train.lr=1e-3", "train.lr=1e-2"]);
    for p in points {
        assert_eq!(p["status"], "ran");
        assert!((0.0..=1.0).contains(&p["final"].as_f64().unwrap()), "{p}");
        assert!(p["best"].as_f64().unwrap() >= p["final"].as_f64().unwrap(), "{p}");
        assert!(p["final_loss"].as_f64().unwrap() > 0.0, "{p}");
        let run = dir.join("sweep").join(p["name"].as_str().unwrap());
        assert_eq!(read(run.join("checkpoints/latest")), "step-000004");
        let lr: f64 = p["values"]["train.lr"].as_str().unwrap().parse().unwrap();
        assert!(read(run.join("recipe.toml")).contains(&format!("lr = {lr}\n")), "the point's --set reached launch");
        assert!(read(run.join("launch.log")).contains("loss"), "launch's output is in launch.log");
    }
    assert!(names.contains(&json["best"].as_str().unwrap()));

    let csv = read(dir.join("sweep/sweep.csv"));
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines[0], "point,train.lr,status,final_eval/vqa,best_eval/vqa,final_loss,best_point");
    assert_eq!(lines.len(), 4, "{csv}");
    assert_eq!(lines.iter().filter(|l| l.ends_with(",true")).count(), 1, "{csv}");

    let png = std::fs::read(dir.join("sweep/sweep.png")).unwrap();
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"));
    assert!(png.len() > 5_000, "a plot with axes, labels and lines: {} bytes", png.len());
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_rerun_keeps_finished_points_and_completes_the_others() {
    let dir = setup("resume");
    assert!(sweep(&dir, &["--grid", LRS]).status.success());
    let [kept, deleted, killed] =
        ["train.lr=1e-4", "train.lr=1e-3", "train.lr=1e-2"].map(|name| dir.join("sweep").join(name));
    let kept_log = read(kept.join("launch.log"));
    std::fs::remove_dir_all(&deleted).unwrap();
    // A run killed during its last checkpoint: `latest` still names step 2.
    std::fs::remove_dir_all(killed.join("checkpoints/step-000004")).unwrap();
    std::fs::write(killed.join("checkpoints/latest"), "step-000002").unwrap();

    let out = sweep(&dir, &["--grid", LRS]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("train.lr=1e-4 finished earlier; kept"), "{stderr}");
    assert_eq!(read(kept.join("launch.log")), kept_log, "a finished point is not run again");
    for run in [&deleted, &killed] {
        assert_eq!(read(run.join("checkpoints/latest")), "step-000004", "{}", run.display());
    }
    assert!(read(killed.join("launch.log")).contains("resuming from"), "continued with --resume");
    let statuses: Vec<Value> =
        summary(&dir)["points"].as_array().unwrap().iter().map(|p| p["status"].clone()).collect();
    assert_eq!(statuses, ["kept", "ran", "ran"]);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn emit_slurm_writes_one_array_task_per_point() {
    let dir = setup("slurm");
    let out = sweep(&dir, &["--grid", "train.lr=1e-4,1e-3", "--grid", "train.warmup_steps=0,1", "--emit", "slurm"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("sbatch "));
    let script = read(dir.join("sweep/sweep.sbatch"));
    assert!(script.contains("#SBATCH --array=0-3\n"), "{script}");
    for name in [
        "train.lr=1e-4,train.warmup_steps=0",
        "train.lr=1e-4,train.warmup_steps=1",
        "train.lr=1e-3,train.warmup_steps=0",
        "train.lr=1e-3,train.warmup_steps=1",
    ] {
        assert!(script.contains(&format!("/{name}'")), "{name} in\n{script}");
    }
    assert_eq!(script.matches("exec ./launch/launch ").count(), 4);
    assert!(script.contains("'--set' 'train.warmup_steps=1'"), "{script}");
    let syntax = Command::new("bash").arg("-n").arg(dir.join("sweep/sweep.sbatch")).status().unwrap();
    assert!(syntax.success(), "bash reads the script");
    assert!(!dir.join("sweep/train.lr=1e-4,train.warmup_steps=0").exists(), "nothing trained");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_failing_point_is_reported_and_the_others_finish() {
    let dir = setup("fail");
    let out = sweep(&dir, &["--grid", "train.lr=-1e-3,1e-3", "--grid", "train.warmup_steps=0,1", "--metric", "loss"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a failed point fails the sweep");
    let failed_log = dir.join("sweep/train.lr=-1e-3,train.warmup_steps=0/launch.log");
    assert!(stderr.contains(&format!("failed; see {}", failed_log.display())), "{stderr}");
    assert!(stderr.contains("2 of 4 points failed"), "{stderr}");
    assert!(read(&failed_log).contains("train.lr"), "launch's error is in the log");

    let json = summary(&dir);
    assert_eq!((json["metric"].as_str(), json["higher_is_better"].as_bool()), (Some("loss"), Some(false)));
    let points = json["points"].as_array().unwrap();
    let statuses: Vec<&str> = points.iter().map(|p| p["status"].as_str().unwrap()).collect();
    assert_eq!(statuses, ["failed", "failed", "ran", "ran"]);
    assert!(points[2..].iter().all(|p| p["final"].as_f64().unwrap() > 0.0 && p["final"] == p["final_loss"]));
    let best = points[2..]
        .iter()
        .min_by(|a, b| a["final"].as_f64().unwrap().total_cmp(&b["final"].as_f64().unwrap()))
        .unwrap();
    assert_eq!(json["best"], best["name"], "lowest final loss");
    assert_eq!(read(dir.join("sweep/sweep.csv")).lines().count(), 5);
    assert!(std::fs::read(dir.join("sweep/sweep.png")).unwrap().starts_with(b"\x89PNG"));
    std::fs::remove_dir_all(dir).unwrap();
}
