//! `pg2 bench overlap`: how much of the gradient all-reduce hides behind backward on CPU
//! workers (`train.overlap_reduction`). Starts `--workers` processes of itself on this
//! machine, each timing `launch`'s own step with the reduction after backward and during
//! it, and the reduction alone.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use pg2_dist::{Group, WorkerEnv};
use tch::{Device, Kind, Tensor};

use super::train::{step_recipe, step_trainer};
use super::{all_cores, write_inputs, write_random_model, Shape, TempDir};

/// Settings of `pg2 bench overlap`.
pub struct OverlapBench {
    pub shape: Shape,
    /// Examples per worker and step.
    pub batch: i64,
    /// Timed steps of each mode, after one warm-up step.
    pub steps: usize,
    pub workers: usize,
    /// Set in the worker processes: the folder with the model and batch.
    pub worker_dir: Option<PathBuf>,
}

/// Runs the workers and prints rank 0's figures.
pub fn overlap(b: &OverlapBench) -> Result<()> {
    if let Some(dir) = &b.worker_dir {
        return worker(b, dir);
    }
    if b.workers < 2 {
        bail!("--workers must be at least 2: a group of one has nothing to reduce");
    }
    let dir = TempDir::new("overlap")?;
    let (config, params) = write_random_model(b.shape, &dir.0)?;
    write_inputs(&config, b.batch, true, &dir.0)?;
    let threads = (all_cores() / b.workers).max(1);
    println!(
        "{} CPU workers of {threads} thread(s), the {:?} PaliGemma 2 ({:.2}M parameters), batch {} per worker, f32: ms per training step",
        b.workers,
        b.shape,
        params as f64 / 1e6,
        b.batch
    );
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let exe = std::env::current_exe()?;
    let children = (0..b.workers)
        .map(|rank| {
            let env = WorkerEnv {
                rank,
                local_rank: rank,
                world: b.workers,
                local_world: b.workers,
                master_addr: "127.0.0.1".into(),
                master_port: port,
                agent_store: false,
            };
            let mut command = Command::new(&exe);
            command.args(std::env::args_os().skip(1)).arg("--worker-dir").arg(&dir.0).envs(env.vars());
            command.env("OMP_NUM_THREADS", threads.to_string()).stderr(std::process::Stdio::inherit());
            Ok(command.stdout(std::process::Stdio::piped()).spawn()?)
        })
        .collect::<Result<Vec<_>>>()?;
    for (rank, child) in children.into_iter().enumerate() {
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!("worker {rank} failed ({})", out.status);
        }
        print!("{}", String::from_utf8_lossy(&out.stdout));
    }
    Ok(())
}

/// One worker: times both modes and the reduction alone; rank 0 prints them.
fn worker(b: &OverlapBench, dir: &Path) -> Result<()> {
    let env = WorkerEnv::from_env()?.ok_or_else(|| anyhow::anyhow!("a worker needs RANK and WORLD_SIZE"))?;
    tch::set_num_threads((all_cores() / env.world).max(1) as i32);
    crate::device::keep_freed_memory(Device::Cpu);
    let main = env.rank == 0;
    let mut group = Group::join(env, Device::Cpu, Duration::from_secs(120))?;
    let mut per_step = vec![];
    for overlap in [false, true] {
        let recipe = step_recipe(
            dir,
            b.steps + 1,
            b.batch * group.world() as i64,
            "",
            &format!("overlap_reduction = {overlap}"),
        )?;
        let (mut trainer, batch, targets) = step_trainer(dir, &recipe, Device::Cpu, &mut group)?;
        trainer.step(&[&batch], &targets, &mut group)?; // warm-up
        let start = Instant::now();
        for _ in 0..b.steps {
            trainer.step(&[&batch], &targets, &mut group)?.loss.double_value(&[]);
        }
        per_step.push(start.elapsed().as_secs_f64() / b.steps as f64);
    }
    // The reduction alone: every trainable gradient's size, in the trainer's buckets.
    let recipe = step_recipe(dir, 1, b.batch, "", "")?;
    let (trainer, _, _) = step_trainer(dir, &recipe, Device::Cpu, &mut group)?;
    let grads: Vec<Tensor> =
        trainer.model.parameters().iter().map(|(_, p)| p.zeros_like().to_kind(Kind::Float)).collect();
    let bucket_bytes = (recipe.train.allreduce_bucket_mb * 1e6) as usize;
    group.all_reduce_mean(&grads, bucket_bytes)?;
    let start = Instant::now();
    for _ in 0..b.steps {
        group.all_reduce_mean(&grads, bucket_bytes)?;
    }
    let reduce = start.elapsed().as_secs_f64() / b.steps as f64;
    group.barrier("bench-overlap")?;
    if main {
        let (after, during) = (per_step[0], per_step[1]);
        println!("{:<28} {:>10.1}", "reduction after backward", after * 1e3);
        println!("{:<28} {:>10.1}", "reduction during backward", during * 1e3);
        println!("{:<28} {:>10.1}", "the reduction alone", reduce * 1e3);
        println!(
            "hidden behind backward: {:.0}% of the reduction ({:.2}x the step rate)",
            100.0 * (after - during) / reduce,
            after / during
        );
    }
    Ok(())
}
