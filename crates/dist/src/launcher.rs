//! `launch --nproc-per-node N`: starts this node's workers like torchrun, watches them,
//! stops them all when one fails, and optionally restarts the group.

use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Command, ExitStatus};
use std::sync::mpsc;
use std::time::Duration;

use crate::env::{WorkerEnv, DEFAULT_MASTER_PORT};
use crate::DistError;

/// How many workers to start, and where rank 0 is.
#[derive(Debug, Clone)]
pub struct LaunchPlan {
    pub nproc_per_node: usize,
    pub nnodes: usize,
    /// This node's index, 0..nnodes.
    pub node_rank: usize,
    /// Host of rank 0 (on node 0).
    pub master_addr: String,
    /// Port of the rank-0 store: a free port on a single node when unset, 29500 across nodes.
    pub master_port: Option<u16>,
    /// Restarts of the whole group after a failure (each resumes from the latest checkpoint).
    pub max_restarts: usize,
}

/// Seconds between asking failed group's workers to stop and killing them.
const GRACE: Duration = Duration::from_secs(5);

/// How a process ended, in words.
pub fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with status {code}"),
        (_, Some(signal)) => format!("was killed by signal {signal}{}", signal_name(signal)),
        _ => format!("ended ({status})"),
    }
}

fn signal_name(signal: i32) -> &'static str {
    match signal {
        libc::SIGKILL => " (SIGKILL: out of memory?)",
        libc::SIGTERM => " (SIGTERM)",
        libc::SIGSEGV => " (SIGSEGV)",
        libc::SIGABRT => " (SIGABRT)",
        libc::SIGINT => " (SIGINT)",
        _ => "",
    }
}

fn free_port() -> Result<u16, DistError> {
    let probe = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| DistError::io("finding a free port", e))?;
    Ok(probe.local_addr().map_err(|e| DistError::io("finding a free port", e))?.port())
}

/// Runs this node's workers until all succeed. `worker(attempt)` builds one worker's
/// command (attempt 0 is the first start; restarts should resume); the launcher adds
/// torchrun's variables (`RANK`, `LOCAL_RANK`, `WORLD_SIZE`, ...). When a worker fails, the
/// others get SIGTERM, then SIGKILL after 5 s, and the error names the first failed rank.
pub fn supervise(plan: &LaunchPlan, worker: impl Fn(usize) -> Command) -> Result<(), DistError> {
    if plan.nproc_per_node == 0 || plan.nnodes == 0 || plan.node_rank >= plan.nnodes {
        return Err(DistError::Env {
            var: "--node-rank".into(),
            msg: format!(
                "node {} of {} with {} workers each is impossible",
                plan.node_rank, plan.nnodes, plan.nproc_per_node
            ),
        });
    }
    let mut attempt = 0;
    loop {
        let port = match plan.master_port {
            Some(port) => port,
            None if plan.nnodes == 1 => free_port()?,
            None => DEFAULT_MASTER_PORT,
        };
        let failure = run_group(plan, port, worker(attempt))?;
        let Some((rank, status)) = failure else { return Ok(()) };
        let what = format!("rank {rank} {}", describe(status));
        if attempt == plan.max_restarts {
            let advice = if plan.max_restarts == 0 {
                "; --max-restarts K restarts the group from its latest checkpoint"
            } else {
                ""
            };
            return Err(DistError::Worker(format!("{what}; stopped the group{advice}")));
        }
        attempt += 1;
        eprintln!(
            "launch: {what}; restarting the group from the latest checkpoint (restart {attempt} of {})",
            plan.max_restarts
        );
    }
}

/// One start of the group: `None` when every worker succeeded, else the first failure.
fn run_group(plan: &LaunchPlan, port: u16, mut command: Command) -> Result<Option<(usize, ExitStatus)>, DistError> {
    let (tx, rx) = mpsc::channel();
    let mut pids = Vec::new();
    if std::env::var_os("OMP_NUM_THREADS").is_none() {
        // As torchrun does: workers that each spin up a thread per core fight over the
        // cores and run many times slower (measured: 50x on 2 cores with 2 CPU workers).
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        command.env("OMP_NUM_THREADS", (cores / plan.nproc_per_node).max(1).to_string());
    }
    // SAFETY: prctl is async-signal-safe; it makes the kernel kill a worker whose
    // launcher dies, so no worker outlives the launcher.
    unsafe {
        command.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    for local in 0..plan.nproc_per_node {
        let env = WorkerEnv {
            rank: plan.node_rank * plan.nproc_per_node + local,
            local_rank: local,
            world: plan.nnodes * plan.nproc_per_node,
            local_world: plan.nproc_per_node,
            master_addr: plan.master_addr.clone(),
            master_port: port,
            agent_store: false,
        };
        command.envs(env.vars());
        let mut child = command.spawn().map_err(|e| DistError::io(format!("starting worker {}", env.rank), e))?;
        pids.push(child.id() as libc::pid_t);
        let tx = tx.clone();
        std::thread::spawn(move || {
            let status = child.wait();
            let _ = tx.send((env.rank, status));
        });
    }
    drop(tx);
    let mut failure = None;
    let mut stopped_at = None;
    let signal_all = |signal| {
        for &pid in &pids {
            // SAFETY: plain kill(2); a worker that already exited is ignored (ESRCH),
            // and its pid is not reused before our waiting thread reaps it.
            unsafe { libc::kill(pid, signal) };
        }
    };
    loop {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok((rank, status)) => {
                let status = status.map_err(|e| DistError::io(format!("waiting for rank {rank}"), e))?;
                if !status.success() && failure.is_none() {
                    failure = Some((rank, status));
                    eprintln!("launch: rank {rank} {}; stopping the other workers", describe(status));
                    signal_all(libc::SIGTERM);
                    stopped_at = Some(std::time::Instant::now());
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if stopped_at.is_some_and(|t| t.elapsed() > GRACE) {
                    signal_all(libc::SIGKILL);
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => return Ok(failure),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(nproc: usize, restarts: usize) -> LaunchPlan {
        LaunchPlan {
            nproc_per_node: nproc,
            nnodes: 1,
            node_rank: 0,
            master_addr: "127.0.0.1".into(),
            master_port: None,
            max_restarts: restarts,
        }
    }

    fn sh(script: &str) -> Command {
        let mut c = Command::new("sh");
        c.arg("-c").arg(script);
        c
    }

    #[test]
    fn workers_get_torchrun_variables_and_all_succeed() {
        let dir = std::env::temp_dir().join(format!("pg2-launcher-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let script =
            format!("echo $RANK $LOCAL_RANK $WORLD_SIZE $LOCAL_WORLD_SIZE $MASTER_ADDR > {}/$RANK", dir.display());
        supervise(&plan(3, 0), |_| sh(&script)).unwrap();
        for rank in 0..3 {
            let line = std::fs::read_to_string(dir.join(rank.to_string())).unwrap();
            assert_eq!(line.trim(), format!("{rank} {rank} 3 3 127.0.0.1"));
        }
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_failed_worker_stops_the_group_promptly_and_is_named() {
        let start = std::time::Instant::now();
        let err =
            supervise(&plan(2, 0), |_| sh("if [ $RANK = 1 ]; then exit 3; fi; sleep 60")).unwrap_err().to_string();
        assert!(err.contains("rank 1 exited with status 3"), "{err}");
        assert!(start.elapsed() < Duration::from_secs(10), "the sleeping rank 0 was not stopped");
    }

    #[test]
    fn restarts_run_the_group_again_with_the_attempt_number() {
        // The first attempt fails on rank 0; the restart (attempt 1) succeeds.
        let attempts = std::sync::Mutex::new(Vec::new());
        supervise(&plan(2, 1), |attempt| {
            attempts.lock().unwrap().push(attempt);
            sh(&format!("[ {attempt} = 1 ] || [ $RANK = 1 ]"))
        })
        .unwrap();
        assert_eq!(*attempts.lock().unwrap(), vec![0, 1]);
        let err = supervise(&plan(1, 2), |_| sh("kill -9 $$")).unwrap_err().to_string();
        assert!(err.contains("rank 0 was killed by signal 9"), "{err}");
    }
}
