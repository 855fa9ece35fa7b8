//! `launch RECIPE.toml`: trains one stage described by a recipe, in this process or, with
//! `--nproc-per-node`/`--nnodes`, in a data-parallel group of worker processes.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};
use pg2_dist::{Group, LaunchPlan, WorkerEnv};
use pg2_train::{train, LaunchOptions, Recipe};

use crate::device::{keep_freed_memory, parse_device};

#[derive(clap::Parser)]
#[command(name = "launch", version, about = "Train a PaliGemma 2 stage from a TOML recipe")]
#[command(after_help = "Several workers: --nproc-per-node N starts N processes on this machine (one per GPU, NCCL; \
on the CPU a TCP ring); train.batch_size stays the global batch. Multi-node: run the same command on every node with \
--nnodes, --node-rank and --master-addr, or start the workers with srun (launch/slurm.sbatch) or torchrun, whose \
variables launch recognises.")]
pub struct LaunchCli {
    /// The recipe, e.g. recipes/tiny/stage1.toml.
    pub recipe: PathBuf,
    /// Override a recipe key, e.g. --set train.lr=3e-5 (repeatable; values are TOML).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
    /// Run folder (default: runs/<recipe name>).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Continue from the run folder's latest checkpoint.
    #[arg(long)]
    pub resume: bool,
    /// Start over in a run folder that already holds checkpoints.
    #[arg(long, conflicts_with = "resume")]
    pub overwrite: bool,
    /// cpu, cuda, cuda:N, or auto (a GPU if there is one); a worker takes GPU LOCAL_RANK.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Worker processes on this machine.
    #[arg(long, default_value_t = 1, value_name = "N", value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub nproc_per_node: usize,
    /// Machines in the run (run this command on each).
    #[arg(long, default_value_t = 1, value_name = "M", value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub nnodes: usize,
    /// This machine's index among the --nnodes.
    #[arg(long, default_value_t = 0, value_name = "R")]
    pub node_rank: usize,
    /// Host of node 0, where rank 0 keeps the rendezvous store.
    #[arg(long, default_value = "127.0.0.1", value_name = "HOST")]
    pub master_addr: String,
    /// Port of the rendezvous store (default: a free port on one machine, 29500 on several).
    #[arg(long, value_name = "PORT")]
    pub master_port: Option<u16>,
    /// After a worker fails, restart the group from the latest checkpoint up to K times.
    #[arg(long, default_value_t = 0, value_name = "K")]
    pub max_restarts: usize,
    /// Seconds a worker waits for the others at the rendezvous before naming the absent.
    #[arg(long, default_value_t = 300, value_name = "SECS")]
    pub rendezvous_timeout: u64,
}

/// The command that starts one worker: this program with the recipe's arguments and the
/// rendezvous timeout (the launcher's own flags are dropped); a restart resumes instead of
/// overwriting.
fn worker_command(exe: &Path, cli: &LaunchCli, out: &Path, attempt: usize) -> Command {
    let mut command = Command::new(exe);
    command.arg(&cli.recipe).arg("--out").arg(out).arg("--device").arg(&cli.device);
    command.arg("--rendezvous-timeout").arg(cli.rendezvous_timeout.to_string());
    for o in &cli.overrides {
        command.arg("--set").arg(o);
    }
    if cli.resume || attempt > 0 {
        command.arg("--resume");
    } else if cli.overwrite {
        command.arg("--overwrite");
    }
    command
}

/// Trains the recipe: supervises a group of workers, or is one.
pub fn run(cli: &LaunchCli) -> Result<()> {
    let (recipe, resolved) = Recipe::load(&cli.recipe, &cli.overrides)?;
    let name = recipe.name.clone().unwrap_or_default();
    let out = cli.out.clone().unwrap_or_else(|| PathBuf::from("runs").join(&name));
    let worker = WorkerEnv::from_env()?;
    if worker.is_none() && (cli.nproc_per_node > 1 || cli.nnodes > 1 || cli.max_restarts > 0) {
        let plan = LaunchPlan {
            nproc_per_node: cli.nproc_per_node,
            nnodes: cli.nnodes,
            node_rank: cli.node_rank,
            master_addr: cli.master_addr.clone(),
            master_port: cli.master_port,
            max_restarts: cli.max_restarts,
        };
        eprintln!(
            "launch: {} with {} worker(s) on this node -> {}",
            cli.recipe.display(),
            cli.nproc_per_node,
            out.display()
        );
        let exe = std::env::current_exe().context("finding the launch binary")?;
        pg2_dist::supervise(&plan, |attempt| worker_command(&exe, cli, &out, attempt))?;
        return Ok(());
    }
    let (device, mut group) = match worker {
        // A group of one (a single worker under --max-restarts) has nothing to exchange.
        Some(env) if env.world == 1 => (env.place(&cli.device, parse_device(&cli.device)?)?, Group::single()),
        Some(env) => {
            let device = env.place(&cli.device, parse_device(&cli.device)?)?;
            let timeout = Duration::from_secs(cli.rendezvous_timeout);
            let (rank, world) = (env.rank, env.world);
            let group = Group::join(env, device, timeout)
                .with_context(|| format!("rank {rank} of {world} joining the group"))?;
            (device, group)
        }
        None => (parse_device(&cli.device)?, Group::single()),
    };
    if group.is_main() {
        let workers = if group.world() > 1 { format!(" x {} workers", group.world()) } else { String::new() };
        eprintln!("launch: {} on {device:?}{workers} -> {}", cli.recipe.display(), out.display());
    }
    keep_freed_memory(device);
    let opts = LaunchOptions { out, resume: cli.resume, overwrite: cli.overwrite, device };
    let (rank, world) = (group.rank(), group.world());
    let summary = train(&recipe, &resolved, &opts, &mut group).map_err(|e| {
        if world > 1 {
            e.context(format!("rank {rank} of {world}"))
        } else {
            e
        }
    })?;
    if let (Some(first), Some(last), true) = (summary.losses.first(), summary.losses.last(), group.is_main()) {
        eprintln!("launch: loss {first:.4} -> {last:.4}; checkpoint {}", summary.checkpoint.display());
    }
    Ok(())
}
