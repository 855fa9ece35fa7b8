//! End-to-end training: the `launch` binary on a tiny recipe over freshly generated
//! synthetic data; resume equality; a crash mid-checkpoint; the run-folder guard.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

mod common;

/// A tiny run of `steps` steps, evaluated every 20 steps.
fn setup(name: &str, steps: u64, checkpoint_every: u64) -> PathBuf {
    common::scratch(
        "train",
        name,
        common::Tiny { steps, batch_size: 8, lr: 3e-3, warmup_steps: 2, checkpoint_every, eval_every: 20 },
    )
}

fn launch(dir: &Path, extra: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_launch"))
        .arg(dir.join("recipe.toml"))
        .args(["--device", "cpu", "--out"])
        .arg(dir.join("run"))
        .args(extra)
        .output()
        .unwrap()
}

/// Runs the recipe again into `dir/run2`, starting from the run in `dir/run`.
fn next_stage(dir: &Path, extra: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_launch"))
        .arg(dir.join("recipe.toml"))
        .args(["--device", "cpu", "--set"])
        .arg(format!("model.init=\"{}\"", dir.join("run").display()))
        .arg("--out")
        .arg(dir.join("run2"))
        .args(extra)
        .output()
        .unwrap()
}

fn metric_lines(dir: &Path) -> Vec<Value> {
    std::fs::read_to_string(dir.join("run/metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn losses(dir: &Path) -> Vec<(u64, f64)> {
    metric_lines(dir)
        .iter()
        .filter(|v| v.get("loss").is_some())
        .map(|v| (v["step"].as_u64().unwrap(), v["loss"].as_f64().unwrap()))
        .collect()
}

#[test]
fn tiny_run_learns_and_its_checkpoint_scores() {
    let dir = setup("learn", 40, 20);
    let out = launch(&dir, &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let l = losses(&dir);
    assert_eq!(l.len(), 40);
    let mean = |xs: &[(u64, f64)]| xs.iter().map(|x| x.1).sum::<f64>() / xs.len() as f64;
    let (first, last) = (mean(&l[..5]), mean(&l[35..]));
    assert!(last < 0.5 * first, "loss should at least halve: {first} -> {last}");
    let lines = metric_lines(&dir);
    let metrics = lines.iter().rev().find(|v| v.get("loss").is_some()).unwrap();
    for key in ["lr", "grad_norm", "examples_per_s"] {
        assert!(metrics[key].as_f64().unwrap().is_finite(), "{key}");
    }
    for key in [
        "skipped_records",
        "skipped_steps",
        "prefix_truncated",
        "suffix_truncated",
        "eos_dropped",
        "tokens",
        "batch_tokens",
    ] {
        assert!(metrics[key].is_u64(), "{key}: {metrics}");
    }
    assert_eq!(std::fs::read_to_string(dir.join("run/checkpoints/latest")).unwrap(), "step-000040");
    // Evaluated before training, every 20 steps and at the end, predictions kept.
    let evals: Vec<(u64, f64)> =
        lines.iter().filter_map(|v| Some((v["step"].as_u64()?, v.get("eval/vqa")?.as_f64()?))).collect();
    assert_eq!(evals.iter().map(|e| e.0).collect::<Vec<_>>(), vec![0, 20, 40]);
    assert!(evals.iter().all(|e| (0.0..=1.0).contains(&e.1)), "{evals:?}");
    assert!(evals[2].1 > evals[0].1 + 0.1, "the metric rises well above its untrained value: {evals:?}");
    let predictions = std::fs::read_to_string(dir.join("run/eval/step-000040.jsonl")).unwrap();
    let first: Value = serde_json::from_str(predictions.lines().next().unwrap()).unwrap();
    assert!(first["prediction"].is_string() && first["answers"].is_array(), "{first}");
    let resolved = std::fs::read_to_string(dir.join("run/recipe.toml")).unwrap();
    assert!(resolved.contains("steps = 40") && resolved.contains("synth/tokenizer.json"), "{resolved}");
    let events: Vec<_> = std::fs::read_dir(dir.join("run/tb")).unwrap().collect();
    assert_eq!(events.len(), 1, "one TensorBoard events file");
    let report = Command::new(env!("CARGO_BIN_EXE_pg2")).arg("report").arg(dir.join("run")).output().unwrap();
    assert!(report.status.success(), "{}", String::from_utf8_lossy(&report.stderr));
    let table = String::from_utf8(report.stdout).unwrap();
    assert!(
        table
            .lines()
            .nth(2)
            .is_some_and(|row| row.starts_with("| learn | vqa (vqa) | custom-32 |") && row.ends_with("| n/a |")),
        "{table}"
    );
    // pg2 eval repeats the final evaluation outside training.
    let eval = Command::new(env!("CARGO_BIN_EXE_pg2"))
        .args(["eval", "--device", "cpu", "--checkpoint"])
        .arg(dir.join("run"))
        .arg("--recipe")
        .arg(dir.join("recipe.toml"))
        .arg("--out")
        .arg(dir.join("again"))
        .output()
        .unwrap();
    assert!(eval.status.success(), "{}", String::from_utf8_lossy(&eval.stderr));
    let scores: Value = serde_json::from_slice(&eval.stdout).unwrap();
    assert_eq!(scores["vqa"].as_f64(), Some(evals[2].1), "same checkpoint, same records, same score");
    assert!(dir.join("again/eval/step-000040.jsonl").exists());
    // The checkpoint is a Hugging Face folder pg2 score reads.
    let score = Command::new(env!("CARGO_BIN_EXE_pg2"))
        .args(["score", "--device", "cpu", "--checkpoint"])
        .arg(dir.join("run/checkpoints/step-000040"))
        .arg("--data")
        .arg(dir.join("synth/val.jsonl"))
        .output()
        .unwrap();
    assert!(score.status.success(), "{}", String::from_utf8_lossy(&score.stderr));
    let lines: Vec<Value> =
        String::from_utf8(score.stdout.clone()).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 8);
    assert!(lines.iter().all(|v| v["logprob"].as_f64().unwrap() < 0.0));
    // Every command that takes a checkpoint takes the run folder too (its latest checkpoint).
    let pg2 = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_pg2"))
            .args(args)
            .arg("--checkpoint")
            .arg(dir.join("run"))
            .output()
            .unwrap();
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    let val = dir.join("synth/val.jsonl");
    assert_eq!(
        pg2(&["score", "--device", "cpu", "--data", val.to_str().unwrap()]).as_bytes(),
        score.stdout,
        "the run folder is its latest checkpoint"
    );
    assert_eq!(
        pg2(&["predict", "--device", "cpu", "--max-len", "4", "--data", val.to_str().unwrap()]).lines().count(),
        8
    );
    assert!(pg2(&["inspect"]).contains("checkpoints/step-000040"));
    let state: Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("run/checkpoints/step-000040/trainer_state.json")).unwrap(),
    )
    .unwrap();
    assert_eq!((state["step"].as_u64(), state["total_steps"].as_u64()), (Some(40), Some(40)), "{state}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn resumed_run_repeats_the_uninterrupted_losses_exactly() {
    let dir = setup("resume", 8, 4);
    // With dropout: its masks are reseeded per step, so resuming stays exact.
    let dropout = ["--set", "model.dropout=0.1"];
    assert!(launch(&dir, &dropout).status.success());
    let whole = losses(&dir);
    // Simulate a kill during the step-8 checkpoint: its folder half-written, `latest` still
    // naming step 4.
    let ckpts = dir.join("run/checkpoints");
    std::fs::rename(ckpts.join("step-000008"), ckpts.join(".step-000008.tmp")).unwrap();
    std::fs::remove_file(ckpts.join(".step-000008.tmp/model.safetensors")).unwrap();
    std::fs::write(ckpts.join("latest"), "step-000004").unwrap();
    std::fs::write(dir.join("run/metrics.jsonl"), "").unwrap();
    // Without --resume the run folder is protected.
    let refused = launch(&dir, &dropout);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("--resume"));
    let resumed = launch(&dir, &[&dropout[..], &["--resume"]].concat());
    assert!(resumed.status.success(), "{}", String::from_utf8_lossy(&resumed.stderr));
    let rest = losses(&dir);
    assert_eq!(rest.iter().map(|x| x.0).collect::<Vec<_>>(), vec![5, 6, 7, 8]);
    assert_eq!(rest, whole[4..], "bit-identical losses after resuming");
    assert_eq!(std::fs::read_to_string(ckpts.join("latest")).unwrap(), "step-000008");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn next_stage_starts_from_the_run_at_a_higher_resolution() {
    let dir = setup("chain", 3, 3);
    assert!(launch(&dir, &[]).status.success());
    // Stage 2: the run folder as init, twice the resolution, a --set override.
    let out = next_stage(&dir, &["--set", "model.resolution=64", "--set", "train.steps=2"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("run2/checkpoints/step-000002/config.json")).unwrap())
            .unwrap();
    assert_eq!(config["vision_config"]["image_size"], 64);
    assert_eq!(config["vision_config"]["num_image_tokens"], 64, "8x8 patches of 8 px");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn streamed_sources_fixed_padding_and_per_task_limits_train() {
    let dir = setup("stream", 3, 3);
    // --set paths are relative to the current folder, so give an absolute one.
    let mixture = format!(
        "data.mixture=[{{path = {:?}, weight = 1.0, shuffle_buffer = 16, max_suffix_tokens = 6}}]",
        dir.join("synth/train.jsonl")
    );
    let out = launch(&dir, &["--set", &mixture, "--set", "data.pad_to=96"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let streamed = losses(&dir);
    assert_eq!(streamed.len(), 3);
    let last = metric_lines(&dir).into_iter().rev().find(|v| v.get("loss").is_some()).unwrap();
    assert_eq!(last["batch_tokens"], 3 * 8 * 96, "every batch padded to data.pad_to: {last}");
    assert!(last["tokens"].as_u64().unwrap() < 3 * 8 * 96, "{last}");
    assert!(last["suffix_truncated"].as_u64().unwrap() > 0, "the source's own max_suffix_tokens cut targets: {last}");
    // Read whole and shuffled in memory, the same source gives other batches.
    let whole =
        format!("data.mixture=[{{path = {:?}, weight = 1.0, max_suffix_tokens = 6}}]", dir.join("synth/train.jsonl"));
    let out = launch(&dir, &["--set", &whole, "--set", "data.pad_to=96", "--overwrite"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_ne!(losses(&dir)[0], streamed[0], "the shuffle buffer decides the order");
    std::fs::remove_dir_all(dir).unwrap();
}

/// WebDataset tar shards (written by `pg2 shard`; read from files through their index and
/// through a `pipe:` command), parquet files (written by `pg2 shard --format parquet`, read through a column
/// mapping) and a JSONL source train together, in one process and in two workers reading
/// their own shards, and a resumed run repeats the losses exactly.
#[test]
fn tar_shards_and_parquet_mixed_with_jsonl_train_and_resume_exactly() {
    let dir = setup("tar", 6, 3);
    let shard = Command::new(env!("CARGO_BIN_EXE_pg2"))
        .arg("shard")
        .arg(dir.join("synth/train.jsonl"))
        .arg("--output")
        .arg(dir.join("shards"))
        .args(["--shard-size", "20"])
        .output()
        .unwrap();
    assert!(shard.status.success(), "{}", String::from_utf8_lossy(&shard.stderr));
    assert!(String::from_utf8_lossy(&shard.stderr).contains("64 samples in 4 file(s)"));
    let shards = dir.join("shards");
    let to_parquet = Command::new(env!("CARGO_BIN_EXE_pg2"))
        .arg("shard")
        .arg(shards.join("shard-*.tar"))
        .arg("--output")
        .arg(dir.join("parquet"))
        .args(["--format", "parquet", "--shard-size", "24"])
        .output()
        .unwrap();
    assert!(to_parquet.status.success(), "{}", String::from_utf8_lossy(&to_parquet.stderr));
    let parquet = dir.join("parquet/part-{00000..00002}.parquet");
    let mixture = format!(
        "data.mixture=[{{path = {:?}, weight = 1.0}}, {{path = {:?}, weight = 1.0, shuffle_buffer = 8}}, \
         {{path = {:?}, weight = 1.0}}, \
         {{path = {:?}, weight = 1.0, shuffle_buffer = 16, columns = {{prefix = \"{{prefix}}\", suffix = \"{{suffix}}\"}}}}]",
        shards.join("index.json"),
        format!("pipe:cat {}/shard-{{000001..000002}}.tar", shards.display()),
        dir.join("synth/train.jsonl"),
        parquet,
    );
    let args = ["--set", &mixture];
    let out = launch(&dir, &args);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let whole = losses(&dir);
    assert_eq!(whole.len(), 6);
    // Two workers, each reading its own shards, train too, and resume exactly: rank 0's
    // checkpoint holds where each worker stood in its shards. (That the workers' shards are
    // disjoint and together hold every example is `pg2-data`'s
    // `ranks_read_disjoint_files_and_together_see_each_record_once_an_epoch`.)
    let two_workers = |extra: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_launch"))
            .arg(dir.join("recipe.toml"))
            .args(["--device", "cpu", "--nproc-per-node", "2", "--out"])
            .arg(dir.join("run-2"))
            .args(args)
            .args(extra)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        std::fs::read_to_string(dir.join("run-2/metrics.jsonl"))
            .unwrap()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).unwrap().get("loss")?.as_f64())
            .collect::<Vec<f64>>()
    };
    let two = two_workers(&[]);
    assert_eq!(two.len(), whole.len());
    assert!(two.iter().all(|l| l.is_finite()), "{two:?}");
    let ckpts = dir.join("run-2/checkpoints");
    std::fs::remove_dir_all(ckpts.join("step-000006")).unwrap();
    std::fs::write(ckpts.join("latest"), "step-000003").unwrap();
    std::fs::write(dir.join("run-2/metrics.jsonl"), "").unwrap();
    assert_eq!(two_workers(&["--resume"]), two[3..], "two workers resume mid-shard to the same losses");
    let ckpts = dir.join("run/checkpoints");
    std::fs::remove_dir_all(ckpts.join("step-000006")).unwrap();
    std::fs::write(ckpts.join("latest"), "step-000003").unwrap();
    std::fs::write(dir.join("run/metrics.jsonl"), "").unwrap();
    let resumed = launch(&dir, &[&args[..], &["--resume"]].concat());
    assert!(resumed.status.success(), "{}", String::from_utf8_lossy(&resumed.stderr));
    assert_eq!(losses(&dir), whole[3..], "bit-identical losses after resuming mid-shard");
    std::fs::remove_dir_all(dir).unwrap();
}

/// RefCOCO converted with mask tokens (the fixture VQ-VAE standing in for big_vision's
/// `vae-oid.npz`) trains, and `refcoco_seg` decodes the run's predictions with the VQ-VAE.
#[test]
fn referring_segmentation_trains_on_mask_tokens_and_scores_masks() {
    let dir = setup("seg", 2, 2);
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures");
    let (refcoco, vae) = (fixtures.join("convert/refcoco"), fixtures.join("segmentation/vae-tiny.npz"));
    let records = dir.join("refcoco.jsonl");
    let convert = Command::new(env!("CARGO_BIN_EXE_pg2"))
        .args(["convert", "refcoco", "--input"])
        .arg(refcoco.join("instances.json"))
        .arg("--input")
        .arg(refcoco.join("refs.json"))
        .arg("--images")
        .arg(refcoco.join("train2014"))
        .arg("--mask-vae")
        .arg(&vae)
        .arg("--output")
        .arg(&records)
        .output()
        .unwrap();
    assert!(convert.status.success(), "{}", String::from_utf8_lossy(&convert.stderr));
    let first: Value =
        serde_json::from_str(std::fs::read_to_string(&records).unwrap().lines().next().unwrap()).unwrap();
    assert_eq!(first["suffix"].as_str().unwrap().matches("<seg").count(), 16, "{first}");
    let sets = [
        format!("data.mixture=[{{path = {records:?}, weight = 1.0}}]"),
        format!("eval.data={records:?}"),
        "eval.metric=\"refcoco_seg\"".into(),
        format!("eval.mask_vae={vae:?}"),
        "eval.max_len=24".into(),
    ];
    let args: Vec<&str> = sets.iter().flat_map(|s| ["--set", s.as_str()]).collect();
    let out = launch(&dir, &args);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let evals: Vec<Value> = metric_lines(&dir).into_iter().filter(|v| v.get("eval/miou").is_some()).collect();
    assert!(!evals.is_empty(), "no refcoco_seg evaluation logged");
    for eval in &evals {
        let share = |k: &str| eval[k].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&share("eval/miou")) && (0.0..=1.0).contains(&share("eval/invalid")), "{eval}");
        assert!(eval.get("eval/box_accuracy@0.5").is_some(), "{eval}");
    }
    // `pg2 metric` scores the written predictions as the run did.
    let predictions = dir.join("run/eval/step-000002.jsonl");
    let metric = |extra: &[&std::ffi::OsStr]| {
        Command::new(env!("CARGO_BIN_EXE_pg2"))
            .args(["metric", "--metric", "refcoco_seg", "--predictions"])
            .arg(&predictions)
            .args(extra)
            .output()
            .unwrap()
    };
    let out = metric(&["--mask-vae".as_ref(), vae.as_os_str()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let scores: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(scores["miou"], evals.last().unwrap()["eval/miou"]);
    let out = metric(&[]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("--mask-vae"), "{}", String::from_utf8_lossy(&out.stderr));
    // Without the VQ-VAE the recipe is refused before anything runs.
    let out = launch(&dir, &[&args[..6], &["--overwrite"]].concat());
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("eval.mask_vae") && err.contains("refcoco_seg"), "{err}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn frozen_parts_stay_bit_identical() {
    let dir = setup("freeze", 2, 2);
    assert!(launch(&dir, &[]).status.success());
    let out =
        next_stage(&dir, &["--set", "model.freeze=[\"vision\", \"projector\"]", "--set", "train.label_smoothing=0.1"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let before = pg2_model::checkpoint::read_tensors(&dir.join("run/checkpoints/step-000002")).unwrap();
    let after = pg2_model::checkpoint::read_tensors(&dir.join("run2/checkpoints/step-000002")).unwrap();
    for (name, t) in &before {
        let same = t.equal(&after[name]);
        let frozen = name.starts_with("vision_tower.") || name.starts_with("multi_modal_projector.");
        assert_eq!(same, frozen, "{name}: frozen parts must not move, trained ones must");
    }
    std::fs::remove_dir_all(dir).unwrap();
}

/// LoRA on a finished run's weights: checkpoints are PEFT adapter folders holding the
/// adapters and the projector (`lora.train`) alone, all of which moved; with adapter
/// dropout, a resumed run repeats the uninterrupted losses exactly (adapters and optimizer
/// state come back from the checkpoint, the base from `model.init`).
#[test]
fn lora_trains_adapters_into_peft_checkpoints_and_resumes_exactly() {
    let dir = setup("lora", 2, 2);
    assert!(launch(&dir, &[]).status.success());
    std::fs::rename(dir.join("run"), dir.join("base")).unwrap();
    let init = format!("model.init=\"{}\"", dir.join("base").display());
    let lora = [
        "--set",
        &init,
        "--set",
        "lora.rank=4",
        "--set",
        "lora.alpha=8",
        "--set",
        "lora.dropout=0.1",
        "--set",
        "lora.train=[\"projector\"]",
        "--set",
        "train.steps=4",
    ];
    let out = launch(&dir, &lora);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let whole = losses(&dir);
    let ckpts = dir.join("run/checkpoints");
    let last = ckpts.join("step-000004");
    assert!(last.join("adapter_config.json").is_file() && !last.join("model.safetensors").exists());
    let base = pg2_model::checkpoint::read_tensors(&dir.join("base/checkpoints/step-000002")).unwrap();
    let saved = pg2_model::checkpoint::read_file(&last.join("adapter_model.safetensors")).unwrap();
    assert_eq!(saved.len(), 2 * 7 * 2 + 2, "A and B of 7 projections in 2 layers, the projector's weight and bias");
    for (name, t) in &saved {
        let name = name.strip_prefix("base_model.model.model.").expect("PEFT's names");
        match name.strip_prefix("multi_modal_projector.") {
            Some(rest) => assert!(!t.equal(&base[&format!("multi_modal_projector.{rest}")]), "{name} trained"),
            None if name.ends_with("lora_B.weight") => assert!(t.abs().sum(tch::Kind::Float).double_value(&[]) > 0.0),
            None => assert!(name.starts_with("language_model.layers.") && name.ends_with("lora_A.weight"), "{name}"),
        }
    }
    std::fs::write(ckpts.join("latest"), "step-000002").unwrap();
    std::fs::remove_dir_all(last).unwrap();
    std::fs::write(dir.join("run/metrics.jsonl"), "").unwrap();
    let resumed = launch(&dir, &[&lora[..], &["--resume"]].concat());
    assert!(resumed.status.success(), "{}", String::from_utf8_lossy(&resumed.stderr));
    assert_eq!(losses(&dir), whole[2..], "bit-identical losses after resuming");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn accumulated_gradients_match_one_big_batch() {
    let dir = setup("accumulate", 3, 1);
    let common = [
        "--set",
        "train.schedule=\"constant\"",
        "--set",
        "train.warmup_steps=0",
        "--set",
        "train.lr_mults={\"vision_tower.\" = 0.5}",
        "--set",
        "train.keep_checkpoints=2",
        "--set",
        "train.wd_mults={\"vision_tower.\" = 1.0, \"language_model.\" = 0.5}",
    ];
    let whole = launch(&dir, &common);
    assert!(whole.status.success(), "{}", String::from_utf8_lossy(&whole.stderr));
    let big = losses(&dir);
    let lrs: Vec<f64> = metric_lines(&dir).iter().filter_map(|v| v.get("lr")?.as_f64()).collect();
    assert!(lrs.iter().all(|&lr| (lr - 3e-3).abs() < 1e-12), "constant schedule: {lrs:?}");
    let mut kept: Vec<_> = std::fs::read_dir(dir.join("run/checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    kept.sort();
    assert_eq!(kept, ["latest", "step-000002", "step-000003"], "only the newest two checkpoints stay");
    // The same examples in two halves, dealt out in stream order or sorted by length: equal
    // up to float rounding (padding differs).
    let halves = |extra: &[&str]| {
        let args =
            [&common[..], &["--overwrite", "--set", "train.batch_size=4", "--set", "train.grad_accumulation=2"], extra]
                .concat();
        let out = launch(&dir, &args);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        losses(&dir)
    };
    let bucketed = ["--set", "data.bucket_by_length=true"];
    for (tag, split) in [("in order", halves(&[])), ("bucketed", halves(&bucketed))] {
        assert_eq!(big.len(), split.len(), "{tag}: both runs log the same steps");
        for ((step, a), (_, b)) in big.iter().zip(split) {
            assert!((a - b).abs() < 1e-4 * a.abs(), "{tag}, step {step}: {a} vs {b}");
        }
    }
    // transformers' per-token normalisation weighs long targets more: another first loss. It
    // divides by the targets of the whole update, so two halves again match one big batch.
    let per_token = ["--set", "train.loss_normalization=\"token\""];
    let whole = launch(&dir, &[&common[..], &["--overwrite"], &per_token].concat());
    assert!(whole.status.success(), "{}", String::from_utf8_lossy(&whole.stderr));
    let big_per_token = losses(&dir);
    assert!(
        big_per_token[0].1.is_finite() && (big_per_token[0].1 - big[0].1).abs() > 1e-6,
        "{:?} vs {:?}",
        big_per_token[0],
        big[0]
    );
    for (tag, split) in [("in order", halves(&per_token)), ("bucketed", halves(&[&per_token[..], &bucketed].concat()))]
    {
        assert_eq!(big_per_token.len(), split.len(), "per token, {tag}: both runs log the same steps");
        for ((step, a), (_, b)) in big_per_token.iter().zip(split) {
            assert!((a - b).abs() < 1e-4 * a.abs(), "per token, {tag}, step {step}: {a} vs {b}");
        }
    }
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn bf16_autocast_keeps_f32_weights_and_computes_in_bf16_also_with_recomputed_layers() {
    let dir = setup("autocast", 6, 6);
    // Also the op-by-op optimizer (the fused kernel's reference) and recomputed layers,
    // whose backward must recompute under the forward's autocast.
    let out = launch(
        &dir,
        &[
            "--set",
            "model.dtype=\"bf16_autocast\"",
            "--set",
            "train.fused_optimizer=false",
            "--set",
            "model.activation_checkpointing=true",
        ],
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let autocast = losses(&dir);
    assert!(autocast[5].1 < autocast[0].1, "the loss falls: {autocast:?}");
    for (name, t) in pg2_model::checkpoint::read_tensors(&dir.join("run/checkpoints/step-000006")).unwrap() {
        assert_eq!(t.kind(), tch::Kind::Float, "{name}: autocast keeps f32 weights");
    }
    assert!(launch(&dir, &["--overwrite"]).status.success());
    let f32 = losses(&dir);
    // The same weights and batch: only bf16 matmuls move the first loss.
    let (a, b) = (autocast[0].1, f32[0].1);
    assert!((a - b).abs() > 1e-5 && (a - b).abs() < 1e-2 * b, "first losses {a} (autocast) and {b} (f32)");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn non_finite_steps_stop_the_run_or_are_skipped_leaving_the_weights_alone() {
    let dir = setup("nonfinite", 4, 4);
    // An absurd learning rate without soft-caps: the first update throws the decoder's
    // weights to about 1e30, and every later loss or gradient is non-finite.
    let blowup = [
        "--set",
        "train.lr=1e30",
        "--set",
        "model.soft_caps=false",
        "--set",
        "train.warmup_steps=0",
        "--set",
        "train.schedule=\"constant\"",
        "--set",
        "eval=\"\"",
    ];
    let stopped = launch(&dir, &blowup);
    let err = String::from_utf8_lossy(&stopped.stderr);
    assert!(!stopped.status.success() && err.contains("step 2: non-finite loss or gradient norm"), "{err}");
    assert!(!dir.join("run/checkpoints/latest").exists(), "nothing is saved after a non-finite step");
    // Skipping: the run ends with the weights it had after step 1. Both come from the same
    // run: at lr 1e30 another run's step 1 differs wherever a gradient differs by one ulp
    // (libtorch's CPU reductions are not bitwise reproducible across processes every time).
    let skip = ["--set", "train.on_nonfinite=\"skip\"", "--set", "train.checkpoint_every=1", "--overwrite"];
    let skipped = launch(&dir, &[&blowup[..], &skip].concat());
    assert!(skipped.status.success(), "{}", String::from_utf8_lossy(&skipped.stderr));
    let last = metric_lines(&dir).into_iter().last().unwrap();
    assert_eq!((last["step"].as_u64(), last["skipped_steps"].as_u64()), (Some(4), Some(3)));
    let after_skips = pg2_model::checkpoint::read_tensors(&dir.join("run/checkpoints/step-000004")).unwrap();
    for (name, t) in pg2_model::checkpoint::read_tensors(&dir.join("run/checkpoints/step-000001")).unwrap() {
        assert!(t.equal(&after_skips[&name]), "{name} moved in a skipped step");
    }
    std::fs::remove_dir_all(dir).unwrap();
}

/// Checks that a command failed with an error, not a panic, whose message holds each of `parts`.
fn fails_naming(out: Output, parts: &[&str]) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "it succeeded: {err}");
    assert!(!err.contains("panicked"), "a panic, not an error: {err}");
    for part in parts {
        assert!(err.contains(part), "{part:?} is not in: {err}");
    }
}

#[test]
fn bad_inputs_end_with_errors_that_name_them() {
    let dir = setup("bad", 2, 2);
    assert!(launch(&dir, &[]).status.success());
    let pg2 = |args: &[&str]| Command::new(env!("CARGO_BIN_EXE_pg2")).args(args).output().unwrap();
    let path = |name: &str| dir.join(name).display().to_string();
    // Values that parse but cannot be meant; devices and counts that cannot exist. Each is
    // refused before the run folder is touched.
    fails_naming(launch(&dir, &["--overwrite", "--set", "model.resolution=0"]), &["model.resolution = 0"]);
    fails_naming(launch(&dir, &["--overwrite", "--set", "train.lr=inf"]), &["train.lr = inf", "positive"]);
    fails_naming(launch(&dir, &["--overwrite", "--set", "train.b2=1.0"]), &["train.b2 = 1", "[0, 1)"]);
    fails_naming(launch(&dir, &["--overwrite", "--nproc-per-node", "0"]), &["--nproc-per-node"]);
    let recipe = path("recipe.toml");
    let out = Command::new(env!("CARGO_BIN_EXE_launch")).args([&recipe, "--device", "cuda:99"]).output().unwrap();
    fails_naming(out, &["cuda:99", "CUDA device(s)"]);
    let run_file = path("run/recipe.toml");
    let out = Command::new(env!("CARGO_BIN_EXE_launch"))
        .arg(path("recipe.toml"))
        .args(["--device", "cpu", "--out", &run_file])
        .output()
        .unwrap();
    fails_naming(out, &["recipe.toml is a file", "--out"]);
    // Records without any target would train on nothing.
    let records = std::fs::read_to_string(dir.join("synth/train.jsonl")).unwrap();
    let untargeted: String = records
        .lines()
        .map(|l| {
            let mut v: Value = serde_json::from_str(l).unwrap();
            v.as_object_mut().unwrap().remove("suffix");
            v["image"] = Value::String(dir.join("synth").join(v["image"].as_str().unwrap()).display().to_string());
            format!("{v}\n")
        })
        .collect();
    std::fs::write(dir.join("untargeted.jsonl"), untargeted).unwrap();
    let mixture = format!("data.mixture=[{{path = {:?}, weight = 1.0}}]", path("untargeted.jsonl"));
    let out = Command::new(env!("CARGO_BIN_EXE_launch"))
        .arg(path("recipe.toml"))
        .args(["--device", "cpu", "--out", &path("untargeted"), "--set", &mixture])
        .output()
        .unwrap();
    fails_naming(out, &["none of its 8 examples has a target token", "untargeted.jsonl", "`suffix`"]);
    assert!(!dir.join("untargeted/checkpoints").exists(), "nothing was saved");
    // A tokenizer that does not fit the checkpoint, a record far too long, a beam of 0.
    let fixture_tokenizer = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/paligemma/tokenizer.json");
    let val = path("synth/val.jsonl");
    let out = pg2(&[
        "score",
        "--device",
        "cpu",
        "--checkpoint",
        &path("run"),
        "--data",
        &val,
        "--tokenizer",
        fixture_tokenizer.to_str().unwrap(),
    ]);
    fails_naming(
        out,
        &["fixtures/paligemma/tokenizer.json", "checkpoints/step-000002", "use the model's own tokenizer"],
    );
    let first: Value = serde_json::from_str(std::fs::read_to_string(&val).unwrap().lines().next().unwrap()).unwrap();
    let image = dir.join("synth").join(first["image"].as_str().unwrap());
    let long = serde_json::json!({"image": image, "prefix": "caption en", "suffix": "a red square ".repeat(20_000)});
    std::fs::write(dir.join("long.jsonl"), format!("{long}\n")).unwrap();
    let out = pg2(&["score", "--device", "cpu", "--checkpoint", &path("run"), "--data", &path("long.jsonl")]);
    fails_naming(out, &["long.jsonl:1", "more than the 8192 allowed"]);
    fails_naming(pg2(&["predict", "--checkpoint", &path("run"), "--data", &val, "--beam", "0"]), &["--beam"]);
    // A pointer emptied by an interrupted write names itself and the way out.
    std::fs::write(dir.join("run/checkpoints/latest"), "").unwrap();
    fails_naming(launch(&dir, &["--resume"]), &["run/checkpoints/latest is empty", "--overwrite"]);
    std::fs::remove_dir_all(dir).unwrap();
}

/// The weights of a run's latest checkpoint, after checking every file of it reads whole.
fn latest_weights(run: &Path) -> Vec<(String, tch::Tensor)> {
    let latest = std::fs::read_to_string(run.join("checkpoints/latest")).unwrap();
    let checkpoint = run.join("checkpoints").join(latest.trim());
    let state: Value =
        serde_json::from_str(&std::fs::read_to_string(checkpoint.join("trainer_state.json")).unwrap()).unwrap();
    assert!(state["step"].is_u64(), "{state}");
    serde_json::from_str::<Value>(&std::fs::read_to_string(checkpoint.join("config.json")).unwrap()).unwrap();
    pg2_model::checkpoint::read_file(&checkpoint.join("optimizer.safetensors")).unwrap();
    let mut weights = pg2_model::checkpoint::read_file(&checkpoint.join("model.safetensors")).unwrap();
    weights.sort_by(|a, b| a.0.cmp(&b.0));
    weights
}

#[test]
fn killed_at_random_moments_a_run_resumes_from_a_complete_checkpoint_to_the_same_weights() {
    let dir = setup("crash", 300, 1);
    let run = |out: &str, resume: bool| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_launch"));
        c.arg(dir.join("recipe.toml"))
            .args(["--device", "cpu", "--set", "train.keep_checkpoints=3", "--out"])
            .arg(dir.join(out));
        if resume {
            c.arg("--resume");
        }
        c.stderr(std::process::Stdio::null());
        c
    };
    assert!(run("whole", false).status().unwrap().success());
    // 20 kills with SIGKILL at pseudo-random moments (a checkpoint is written every step, so
    // many land inside a write), each followed by a look at what the run folder holds.
    let mut seed = 0x9E37_79B9_7F4A_7C15u64;
    let mut kills = 0;
    for attempt in 0..20 {
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let mut child = run("crashed", attempt > 0).spawn().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(100 + (seed >> 33) % 400));
        if child.try_wait().unwrap().is_none() {
            child.kill().unwrap(); // SIGKILL
            kills += 1;
        }
        child.wait().unwrap();
        if dir.join("crashed/checkpoints/latest").exists() {
            latest_weights(&dir.join("crashed")); // every file of the newest checkpoint reads whole
        }
    }
    assert!(kills >= 10, "only {kills} of 20 attempts were killed mid-run");
    assert!(run("crashed", true).status().unwrap().success());
    let left: Vec<_> =
        std::fs::read_dir(dir.join("crashed/checkpoints")).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert!(left.iter().all(|name| !name.to_string_lossy().starts_with(".step-")), "killed writes left {left:?}");
    let (whole, crashed) = (latest_weights(&dir.join("whole")), latest_weights(&dir.join("crashed")));
    assert_eq!(whole.len(), crashed.len());
    for ((name, a), (_, b)) in whole.iter().zip(&crashed) {
        assert!(a.equal(b), "{name}: the resumed run ends elsewhere than the uninterrupted one");
    }
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_full_disk_during_a_checkpoint_leaves_the_previous_one_and_says_so() {
    let dir = setup("disk", 4, 2);
    assert!(launch(&dir, &["--set", "train.steps=2"]).status.success());
    let weights = std::fs::metadata(dir.join("run/checkpoints/step-000002/model.safetensors")).unwrap().len();
    // Files may not grow past half the weights' size (ulimit -f, in KiB; SIGXFSZ ignored so a
    // write fails with an error, as on a full disk).
    let out = Command::new("bash")
        .args([
            "-c",
            &format!("trap '' XFSZ; ulimit -f {}; exec \"$@\"", weights / 2048),
            "bash",
            env!("CARGO_BIN_EXE_launch"),
        ])
        .arg(dir.join("recipe.toml"))
        .args(["--device", "cpu", "--resume", "--out"])
        .arg(dir.join("run"))
        .output()
        .unwrap();
    fails_naming(out, &["checkpoint step-000004 not written", "disk", "intact", "--resume"]);
    assert_eq!(std::fs::read_to_string(dir.join("run/checkpoints/latest")).unwrap(), "step-000002");
    latest_weights(&dir.join("run"));
    let left: Vec<_> =
        std::fs::read_dir(dir.join("run/checkpoints")).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(left.len(), 2, "the failed write left nothing behind: {left:?}");
    std::fs::remove_dir_all(dir).unwrap();
}
