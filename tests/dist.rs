//! Data parallelism end to end on the CPU: `launch --nproc-per-node 2` (two worker
//! processes, the TCP ring), and two `--nnodes 2` launchers, against one process with the
//! whole batch; workers started by torchrun (from the torch wheel in `.deps/`) joining its
//! agent's store; an absent worker named; a killed worker stopping the group;
//! `--max-restarts` finishing the run from its latest checkpoint.

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

mod common;

fn launch(dir: &Path, out: &str, extra: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_launch"));
    c.arg(dir.join("recipe.toml")).args(["--device", "cpu", "--out"]).arg(dir.join(out)).args(extra);
    c
}

fn run(mut command: Command) -> Output {
    let out = command.output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    out
}

fn metric_lines(run: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap_or_default();
    // A run still going may be halfway through writing its last line: only whole lines count.
    text.split_inclusive('\n').filter(|l| l.ends_with('\n')).map(|l| serde_json::from_str(l).unwrap()).collect()
}

fn losses(run: &Path) -> Vec<f64> {
    metric_lines(run).iter().filter_map(|v| v.get("loss")?.as_f64()).collect()
}

fn weights(run: &Path) -> Vec<(String, tch::Tensor)> {
    let latest = std::fs::read_to_string(run.join("checkpoints/latest")).unwrap();
    let mut tensors =
        pg2_model::checkpoint::read_file(&run.join("checkpoints").join(latest.trim()).join("model.safetensors"))
            .unwrap();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    tensors
}

#[test]
fn two_workers_equal_one_process_with_the_whole_batch() {
    let dir = common::scratch(
        "dist",
        "equal",
        common::Tiny { steps: 6, batch_size: 8, lr: 3e-3, warmup_steps: 2, checkpoint_every: 6, eval_every: 100 },
    );
    for (tag, normalization) in [
        ("example", &[][..]),
        ("token", &["--set", "train.loss_normalization=\"token\"", "--set", "train.grad_accumulation=2"][..]),
    ] {
        let (one, two) = (format!("one-{tag}"), format!("two-{tag}"));
        run(launch(&dir, &one, normalization));
        run(launch(&dir, &two, &[normalization, &["--nproc-per-node", "2"]].concat()));
        let (a, b) = (losses(&dir.join(&one)), losses(&dir.join(&two)));
        assert_eq!((a.len(), b.len()), (6, 6), "{tag}: with two workers, rank 0 alone logs each step once");
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() < 1e-5, "{tag}: losses {a:?} vs {b:?}");
        }
        // Summed instead of averaged gradients would leave Adam's updates alone (it is
        // scale-free, and the norm is clipped): the logged norm tells them apart.
        let norms = |run: &str| -> Vec<f64> {
            metric_lines(&dir.join(run)).iter().filter_map(|v| v.get("grad_norm")?.as_f64()).collect()
        };
        assert_eq!(norms(&one).len(), norms(&two).len(), "{tag}: both runs log every step's norm");
        for (x, y) in norms(&one).iter().zip(norms(&two)) {
            assert!((x - y).abs() <= 1e-4 * x, "{tag}: gradient norms {x} vs {y}");
        }
        // Adam divides by the root of the second moment, so where a gradient is nearly zero
        // the rounding of a differently ordered sum becomes a step of up to lr: a handful of
        // elements move apart by up to ~1e-5 (measured: 109 of 553,408 above 1e-6).
        let (mut total, mut apart) = (0, 0);
        let (weights_one, weights_two) = (weights(&dir.join(&one)), weights(&dir.join(&two)));
        assert_eq!(weights_one.len(), weights_two.len(), "{tag}: both checkpoints hold every tensor");
        for ((name, x), (_, y)) in weights_one.iter().zip(weights_two) {
            let diff = (x - y).abs();
            let max = diff.max().double_value(&[]);
            assert!(max < 1e-4, "{tag}: {name} differs by {max}");
            total += diff.numel();
            apart += diff.gt(1e-6).sum(tch::Kind::Int64).int64_value(&[]) as usize;
        }
        assert!(apart * 1000 < total, "{tag}: {apart} of {total} weights differ by more than 1e-6");
        assert_eq!(std::fs::read_dir(dir.join(&two).join("tb")).unwrap().count(), 1, "one TensorBoard writer");
        // Evaluation is shared out over the ranks and gathered on rank 0, in record order.
        let predictions = |run: &str, step: &str| {
            std::fs::read_to_string(dir.join(run).join(format!("eval/step-{step}.jsonl"))).unwrap()
        };
        assert_eq!(predictions(&one, "000000"), predictions(&two, "000000"), "{tag}: the same weights decode the same");
        assert_eq!(predictions(&one, "000006").lines().count(), predictions(&two, "000006").lines().count());
    }
    // Two machines of one worker each (both on this one here): the same losses again.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port().to_string();
    let node = |rank: &str| {
        launch(&dir, "nodes", &["--nnodes", "2", "--node-rank", rank, "--master-port", &port])
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let nodes = [node("0"), node("1")];
    for n in nodes {
        let out = n.wait_with_output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    assert_eq!((losses(&dir.join("one-example")).len(), losses(&dir.join("nodes")).len()), (6, 6));
    for (x, y) in losses(&dir.join("one-example")).iter().zip(losses(&dir.join("nodes"))) {
        assert!((x - y).abs() < 1e-5, "two nodes: {x} vs {y}");
    }
    let out = launch(&dir, "three", &["--nproc-per-node", "3"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("train.batch_size = 8 does not split evenly over 3 workers"),
        "{err}"
    );
}

/// The pid of the worker of `rank` among the children of `launcher`.
fn worker_pid(launcher: u32, rank: usize) -> Option<u32> {
    std::fs::read_dir("/proc").ok()?.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok()).find(|pid| {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let ppid =
            stat.rsplit(')').next().and_then(|rest| rest.split_whitespace().nth(1)).and_then(|p| p.parse::<u32>().ok());
        let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
        ppid == Some(launcher) && environ.split(|&b| b == 0).any(|v| v == format!("RANK={rank}").as_bytes())
    })
}

/// Waits until rank 0 has logged `step`, then kills rank 1 with SIGKILL.
fn kill_rank_one_after(launcher: &Child, run: &Path, step: u64) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while !metric_lines(run).iter().any(|v| v.get("loss").is_some() && v["step"].as_u64() >= Some(step)) {
        assert!(Instant::now() < deadline, "the run never reached step {step}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let pid = worker_pid(launcher.id(), 1).expect("rank 1 among the launcher's children");
    Command::new("kill").args(["-9", &pid.to_string()]).status().unwrap();
}

#[test]
fn a_killed_worker_stops_the_group_and_a_restart_finishes_the_run() {
    let dir = common::scratch(
        "dist",
        "fault",
        common::Tiny { steps: 120, batch_size: 8, lr: 3e-3, warmup_steps: 2, checkpoint_every: 10, eval_every: 1000 },
    );
    let run_dir = dir.join("run");
    let group = launch(&dir, "run", &["--nproc-per-node", "2"]).stderr(Stdio::piped()).spawn().unwrap();
    kill_rank_one_after(&group, &run_dir, 15);
    let killed = Instant::now();
    let out = group.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("rank 1 was killed by signal 9"), "{err}");
    assert!(killed.elapsed() < Duration::from_secs(10), "the group took {:?} to stop", killed.elapsed());
    let stopped_at = losses(&run_dir).len();
    assert!(stopped_at < 120, "the group ran on after the kill");

    // Resume the run under --max-restarts 1, kill rank 1 again: the group restarts from
    // the latest checkpoint and finishes.
    let group = launch(&dir, "run", &["--nproc-per-node", "2", "--resume", "--max-restarts", "1"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    kill_rank_one_after(&group, &run_dir, stopped_at as u64 + 10);
    let out = group.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("restarting the group from the latest checkpoint (restart 1 of 1)"), "{err}");
    assert_eq!(std::fs::read_to_string(run_dir.join("checkpoints/latest")).unwrap().trim(), "step-000120");
    let steps: Vec<u64> = metric_lines(&run_dir)
        .iter()
        .filter(|v| v.get("loss").is_some())
        .map(|v| v["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps.last(), Some(&120));
    std::fs::remove_dir_all(dir).unwrap();
}

/// A free TCP port on this machine (closed again, so a store can take it).
fn free_port() -> String {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port().to_string()
}

#[test]
fn torchrun_workers_join_its_store_and_an_absent_worker_is_named() {
    let dir = common::scratch(
        "dist",
        "torchrun",
        common::Tiny { steps: 4, batch_size: 8, lr: 3e-3, warmup_steps: 2, checkpoint_every: 4, eval_every: 100 },
    );
    run(launch(&dir, "one", &[]));
    // torchrun from the torch package pg2's libtorch came from: its agent hosts the c10d
    // TCPStore and starts the workers, which join that store.
    let deps = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.deps/torch");
    let mut torchrun = Command::new("python3");
    torchrun.env("PYTHONPATH", &deps).args(["-m", "torch.distributed.run", "--nproc-per-node", "2"]);
    torchrun.args(["--master-port", &free_port(), "--no-python", env!("CARGO_BIN_EXE_launch")]);
    torchrun.arg(dir.join("recipe.toml")).args(["--device", "cpu", "--out"]).arg(dir.join("torchrun"));
    run(torchrun);
    let (one, two) = (losses(&dir.join("one")), losses(&dir.join("torchrun")));
    assert_eq!((one.len(), two.len()), (4, 4), "rank 0 alone logs each step once");
    for (x, y) in one.iter().zip(&two) {
        assert!((x - y).abs() < 1e-5, "torchrun: {one:?} vs {two:?}");
    }
    // Rank 0 of two, whose partner never comes: named after the rendezvous timeout.
    let mut alone = launch(&dir, "alone", &["--rendezvous-timeout", "2"]);
    alone.envs([("RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "127.0.0.1")]).env("MASTER_PORT", free_port());
    let started = Instant::now();
    let out = alone.output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("rank(s) 1 of 2 never arrived within 2s"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(30), "it took {:?}", started.elapsed());
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn overlapped_reduction_equals_reduction_after_backward() {
    let dir = common::scratch(
        "dist",
        "overlap",
        common::Tiny { steps: 4, batch_size: 8, lr: 3e-3, warmup_steps: 2, checkpoint_every: 4, eval_every: 100 },
    );
    // With accumulation (hooks armed for the last micro-batch only) and recomputed layers
    // (whose gradients arrive from nested backward passes).
    let common =
        ["--nproc-per-node", "2", "--set", "train.grad_accumulation=2", "--set", "model.activation_checkpointing=true"];
    run(launch(&dir, "during", &common));
    run(launch(&dir, "after", &[&common[..], &["--set", "train.overlap_reduction=false"]].concat()));
    let (during, after) = (losses(&dir.join("during")), losses(&dir.join("after")));
    assert_eq!((during.len(), after.len()), (4, 4));
    for (x, y) in during.iter().zip(&after) {
        assert!((x - y).abs() < 1e-5, "losses {during:?} vs {after:?}");
    }
    // Buckets hold other tensors in the two orders, so the ring sums other chunks: the
    // weights agree to rounding.
    let (a, b) = (weights(&dir.join("during")), weights(&dir.join("after")));
    assert_eq!(a.len(), b.len());
    for ((name, x), (_, y)) in a.iter().zip(&b) {
        let max = (x - y).abs().max().double_value(&[]);
        assert!(max < 1e-4, "{name} differs by {max}");
    }
    std::fs::remove_dir_all(dir).unwrap();
}

/// The tensors of a checkpoint's optimizer state files (`optimizer*.safetensors`) by file.
fn optimizer_files(run: &Path) -> Vec<(String, Vec<(String, tch::Tensor)>)> {
    let latest = std::fs::read_to_string(run.join("checkpoints/latest")).unwrap();
    let dir = run.join("checkpoints").join(latest.trim());
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("optimizer"))
        .collect();
    files.sort();
    files.into_iter().map(|n| (n.clone(), pg2_model::checkpoint::read_file(&dir.join(n)).unwrap())).collect()
}

/// Points `run`'s `latest` back at `step` and removes the checkpoints after it, as if the
/// run had been killed just after saving it.
fn rewind(run: &Path, step: u64) {
    let checkpoints = run.join("checkpoints");
    for entry in std::fs::read_dir(&checkpoints).unwrap() {
        let path = entry.unwrap().path();
        let later =
            path.file_name().unwrap().to_str().unwrap().strip_prefix("step-").map(|s| s.parse::<u64>().unwrap());
        if later.is_some_and(|s| s > step) {
            std::fs::remove_dir_all(path).unwrap();
        }
    }
    std::fs::write(checkpoints.join("latest"), format!("step-{step:06}")).unwrap();
}

fn assert_close(what: &str, a: &[f64], b: &[f64], tolerance: f64) {
    assert_eq!(a.len(), b.len(), "{what}: {a:?} vs {b:?}");
    for (x, y) in a.iter().zip(b) {
        assert!((x - y).abs() < tolerance, "{what}: {a:?} vs {b:?}");
    }
}

#[test]
fn sharded_training_equals_one_process_and_resumes_at_any_worker_count() {
    let dir = common::scratch(
        "dist",
        "sharded",
        common::Tiny { steps: 6, batch_size: 8, lr: 3e-3, warmup_steps: 2, checkpoint_every: 3, eval_every: 100 },
    );
    let mode = |m: &str| ["--set".to_string(), format!("train.sharding=\"{m}\"")];
    // Per token, with accumulation, a frozen tower, a learning-rate multiplier and decay.
    let token = [
        "--set",
        "train.loss_normalization=\"token\"",
        "--set",
        "train.grad_accumulation=2",
        "--set",
        "model.freeze=[\"vision\"]",
        "--set",
        "train.lr_mults={\"multi_modal_projector.\"=0.5}",
        "--set",
        "train.weight_decay=0.1",
    ];
    run(launch(&dir, "one", &[]));
    run(launch(&dir, "one-token", &token));
    let after = ["--set", "train.overlap_reduction=false"];
    // Parameter sharding gathers each layer again to recompute it in backward.
    let recompute = ["--set", "model.activation_checkpointing=true"];
    let runs: [(&str, &str, &str, &[&str]); 8] = [
        ("optimizer-2", "optimizer", "2", &[]),
        ("gradients-2", "gradients", "2", &[]),
        // ZeRO-2 reduces each micro-batch, ZeRO-1 the last.
        ("gradients-4-token", "gradients", "4", &token),
        ("optimizer-2-token-after", "optimizer", "2", &[&token[..], &after].concat()),
        // Reduced after each backward pass, as on GPUs.
        ("gradients-2-token-after", "gradients", "2", &[&token[..], &after].concat()),
        ("full-2", "full", "2", &recompute),
        ("full-4-token", "full", "4", &[&token[..], &recompute].concat()),
        ("full-2-token-after", "full", "2", &[&token[..], &after, &recompute].concat()),
    ];
    for (name, sharding, workers, extra) in runs {
        let args: Vec<String> = [&mode(sharding)[..], &["--nproc-per-node".into(), workers.into()]]
            .concat()
            .into_iter()
            .chain(extra.iter().map(|s| s.to_string()))
            .collect();
        run(launch(&dir, name, &args.iter().map(String::as_str).collect::<Vec<_>>()));
        let reference = if extra.contains(&token[1]) { "one-token" } else { "one" };
        assert_close(name, &losses(&dir.join(reference)), &losses(&dir.join(name)), 1e-5);
        let norms = |run: &str| -> Vec<f64> {
            metric_lines(&dir.join(run)).iter().filter_map(|v| v.get("grad_norm")?.as_f64()).collect()
        };
        for (x, y) in norms(reference).iter().zip(norms(name)) {
            assert!((x - y).abs() <= 1e-4 * x, "{name}: the global gradient norm {y}, one process {x}");
        }
        for ((tensor, x), (_, y)) in weights(&dir.join(reference)).iter().zip(weights(&dir.join(name))) {
            let max = (x - y).abs().max().double_value(&[]);
            assert!(max < 1e-4, "{name}: {tensor} differs by {max}");
        }
    }
    // Each rank keeps a 1/N share of the optimizer state: together exactly the whole.
    for (run, workers, reference) in
        [("gradients-2", 2, "one"), ("gradients-4-token", 4, "one-token"), ("full-4-token", 4, "one-token")]
    {
        let whole: usize = optimizer_files(&dir.join(reference))[0].1.iter().map(|(_, t)| t.numel()).sum();
        let files = optimizer_files(&dir.join(run));
        let names: Vec<&str> = files.iter().map(|(n, _)| n.as_str()).collect();
        let want: Vec<String> =
            (0..workers).map(|r| format!("optimizer-rank-{r:05}-of-{workers:05}.safetensors")).collect();
        assert_eq!(names, want, "{run}: one optimizer file per rank");
        let shares: Vec<usize> = files.iter().map(|(_, ts)| ts.iter().map(|(_, t)| t.numel()).sum()).collect();
        assert_eq!(shares.iter().sum::<usize>(), whole, "{run}: the shares add up to the whole");
        for share in &shares {
            let ideal = whole as f64 / workers as f64;
            assert!((*share as f64 - ideal).abs() < 0.01 * ideal, "{run}: a share of {share}, 1/{workers} is {ideal}");
        }
    }

    // --resume with the same workers (bf16 weights: the f32 master shares come back) ends
    // on the uninterrupted run's weights bit for bit, with the layers' weights sharded too.
    for (sharding, extra) in [("gradients", &[][..]), ("full", &recompute[..])] {
        let (whole, resumed) = (format!("bf16-{sharding}"), format!("bf16-{sharding}-resumed"));
        let args = [&mode(sharding)[..], &["--nproc-per-node".into(), "2".into()]].concat();
        let args: Vec<&str> = args
            .iter()
            .map(String::as_str)
            .chain(["--set", "model.dtype=\"bf16\""])
            .chain(extra.iter().copied())
            .collect();
        run(launch(&dir, &whole, &args));
        assert!(optimizer_files(&dir.join(&whole))[0].1.iter().any(|(n, _)| n.starts_with("master.")));
        Command::new("cp").arg("-r").arg(dir.join(&whole)).arg(dir.join(&resumed)).status().unwrap();
        rewind(&dir.join(&resumed), 3);
        // A kill while the ranks wrote step 6's shares left their folder behind, half written.
        let stale = dir.join(&resumed).join("checkpoints/.shards-step-000006");
        std::fs::create_dir_all(&stale).unwrap();
        std::fs::write(stale.join(".optimizer-rank-00000-of-00002.safetensors.tmp-1"), b"cut").unwrap();
        run(launch(&dir, &resumed, &[&args[..], &["--resume"]].concat()));
        for ((name, x), (_, y)) in weights(&dir.join(&whole)).iter().zip(weights(&dir.join(&resumed))) {
            assert!(x.equal(&y), "{sharding}: {name}: the resumed run differs");
        }
        assert!(!stale.exists(), "the stale shares went with step 6's save");
    }
    // With 4 workers, or one process without sharding, the state is cut anew.
    let reshards: [(&str, &str, &str, &[&str]); 3] = [
        ("reshard-4", "gradients-2", "gradients", &["--nproc-per-node", "4"]),
        ("reshard-1", "gradients-2", "none", &[]),
        ("reshard-full-4", "full-2", "full", &[&["--nproc-per-node", "4"][..], &recompute].concat()),
    ];
    for (name, from, sharding, args) in reshards {
        Command::new("cp").arg("-r").arg(dir.join(from)).arg(dir.join(name)).status().unwrap();
        rewind(&dir.join(name), 3);
        let args = [&mode(sharding)[..], &args.iter().map(|s| s.to_string()).collect::<Vec<_>>(), &["--resume".into()]]
            .concat();
        run(launch(&dir, name, &args.iter().map(String::as_str).collect::<Vec<_>>()));
        // The copied metrics hold steps 1 to 6, and the resumed run logs 4 to 6 again.
        let (whole, resumed) = (losses(&dir.join(from)), losses(&dir.join(name)));
        assert_close(name, &whole[3..], &resumed[resumed.len() - 3..], 1e-5);
    }
    std::fs::remove_dir_all(dir).unwrap();
}

/// LoRA under each sharding mode: only the adapters and the projector (`lora.train`) train,
/// and are what is sharded (with the layers' parameters, `full`), so two workers make the
/// updates of one process.
#[test]
fn lora_trains_alike_in_one_process_and_sharded_over_workers() {
    let dir = common::scratch(
        "dist",
        "lora",
        common::Tiny { steps: 2, batch_size: 8, lr: 3e-3, warmup_steps: 1, checkpoint_every: 4, eval_every: 100 },
    );
    run(launch(&dir, "base", &[]));
    let init = format!("model.init=\"{}\"", dir.join("base").display());
    let lora = [
        "--set",
        &init,
        "--set",
        "lora.rank=4",
        "--set",
        "lora.train=[\"projector\"]",
        "--set",
        "train.steps=4",
        "--set",
        "model.activation_checkpointing=true",
    ];
    run(launch(&dir, "one", &lora));
    let adapters = |run: &str| {
        let checkpoints = dir.join(run).join("checkpoints");
        let latest = std::fs::read_to_string(checkpoints.join("latest")).unwrap();
        let file = checkpoints.join(latest.trim()).join("adapter_model.safetensors");
        let mut tensors = pg2_model::checkpoint::read_file(&file).unwrap();
        tensors.sort_by(|a, b| a.0.cmp(&b.0));
        tensors
    };
    for sharding in ["optimizer", "gradients", "full"] {
        let mode = format!("train.sharding=\"{sharding}\"");
        run(launch(&dir, sharding, &[&lora[..], &["--set", &mode, "--nproc-per-node", "2"]].concat()));
        assert_close(sharding, &losses(&dir.join("one")), &losses(&dir.join(sharding)), 1e-5);
        let (one, sharded) = (adapters("one"), adapters(sharding));
        assert_eq!(one.len(), sharded.len());
        for ((name, x), (_, y)) in one.iter().zip(&sharded) {
            let max = (x - y).abs().max().double_value(&[]);
            assert!(max < 1e-4, "{sharding}: {name} differs by {max}");
        }
    }
    std::fs::remove_dir_all(dir).unwrap();
}
