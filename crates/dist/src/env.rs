//! Who this process is in a data-parallel group, read from the environment that
//! `launch --nproc-per-node`, torchrun or SLURM's `srun` gives each worker.

use crate::DistError;

/// Port of the rank-0 store when nothing names one (torchrun's default).
pub const DEFAULT_MASTER_PORT: u16 = 29500;

/// One worker's place in the group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerEnv {
    /// Global rank, 0..world.
    pub rank: usize,
    /// Rank on this node, which picks the GPU.
    pub local_rank: usize,
    pub world: usize,
    /// Workers on this node.
    pub local_world: usize,
    /// Host and port of the rank-0 store.
    pub master_addr: String,
    pub master_port: u16,
    /// Started by torchrun, whose agent hosts the store on `MASTER_PORT`
    /// (`TORCHELASTIC_USE_AGENT_STORE=True`): rank 0 joins it as a client too.
    pub agent_store: bool,
}

impl WorkerEnv {
    /// The worker this process is, or `None` for a process that nothing started as a
    /// worker. torchrun's variables (`RANK`, `WORLD_SIZE`, ...) win; otherwise a task of
    /// `srun` (`SLURM_STEP_ID` and `SLURM_PROCID` set) is one, with `MASTER_ADDR`
    /// defaulting to the job's first host and `MASTER_PORT` to one derived from the job id.
    pub fn from_env() -> Result<Option<WorkerEnv>, DistError> {
        Self::from_vars(|name| std::env::var(name).ok())
    }

    /// [`WorkerEnv::from_env`] over any variable lookup (tests pass a map).
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Option<WorkerEnv>, DistError> {
        let number = |name: &str| -> Result<Option<usize>, DistError> {
            var(name)
                .map(|v| {
                    v.trim()
                        .parse()
                        .map_err(|_| DistError::Env { var: name.into(), msg: format!("{v:?} is not a number") })
                })
                .transpose()
        };
        let master = |default_addr: Option<String>, default_port: u16| -> Result<(String, u16), DistError> {
            let addr = var("MASTER_ADDR").or(default_addr).ok_or_else(|| DistError::Env {
                var: "MASTER_ADDR".into(),
                msg: "not set: it names the host of rank 0".into(),
            })?;
            let port = match var("MASTER_PORT") {
                Some(p) => p
                    .trim()
                    .parse()
                    .map_err(|_| DistError::Env { var: "MASTER_PORT".into(), msg: format!("{p:?} is not a port") })?,
                None => default_port,
            };
            Ok((addr, port))
        };
        let env = if let (Some(rank), Some(world)) = (number("RANK")?, number("WORLD_SIZE")?) {
            let (master_addr, master_port) = master(Some("127.0.0.1".into()), DEFAULT_MASTER_PORT)?;
            WorkerEnv {
                rank,
                local_rank: number("LOCAL_RANK")?.unwrap_or(rank),
                world,
                local_world: number("LOCAL_WORLD_SIZE")?.unwrap_or(world),
                master_addr,
                master_port,
                agent_store: var("TORCHELASTIC_USE_AGENT_STORE").as_deref() == Some("True"),
            }
        } else if var("SLURM_STEP_ID").is_some() {
            let need = |name: &str| {
                number(name)?
                    .ok_or_else(|| DistError::Env { var: name.into(), msg: "not set inside an srun step".into() })
            };
            let job = number("SLURM_JOB_ID")?.unwrap_or(0);
            let first_host =
                var("SLURM_STEP_NODELIST").or_else(|| var("SLURM_JOB_NODELIST")).map(|list| first_host(&list));
            let (master_addr, master_port) = master(first_host, 20000 + (job % 20000) as u16)?;
            let world = need("SLURM_NTASKS")?;
            let nodes = number("SLURM_NNODES")?.unwrap_or(1).max(1);
            WorkerEnv {
                rank: need("SLURM_PROCID")?,
                local_rank: need("SLURM_LOCALID")?,
                world,
                local_world: number("SLURM_NTASKS_PER_NODE")?.unwrap_or(world.div_ceil(nodes)),
                master_addr,
                master_port,
                agent_store: false,
            }
        } else {
            return Ok(None);
        };
        if env.rank >= env.world || env.local_rank >= env.local_world.max(1) {
            return Err(DistError::Env {
                var: "RANK".into(),
                msg: format!(
                    "rank {} (local {}) does not fit a world of {} ({} per node)",
                    env.rank, env.local_rank, env.world, env.local_world
                ),
            });
        }
        Ok(Some(env))
    }

    /// The device this worker runs on for a `--device` request (`name`, parsed as
    /// `parsed`): its own GPU when the request names no index (`auto` with a GPU, `cuda`),
    /// the request as it is otherwise.
    pub fn place(&self, name: &str, parsed: tch::Device) -> Result<tch::Device, DistError> {
        Ok(match (name, parsed) {
            ("auto" | "cuda", tch::Device::Cuda(_)) => tch::Device::Cuda(self.gpu()?),
            (_, device) => device,
        })
    }

    /// This worker's GPU: `local_rank`, or the only visible one when the scheduler gave
    /// each worker its own (`CUDA_VISIBLE_DEVICES` per task).
    fn gpu(&self) -> Result<usize, DistError> {
        match tch::Cuda::device_count() as usize {
            1 => Ok(0),
            n if self.local_rank < n => Ok(self.local_rank),
            n => Err(DistError::Env {
                var: "LOCAL_RANK".into(),
                msg: format!(
                    "rank {} wants GPU {}, but {n} are visible: start at most {n} workers per node",
                    self.rank, self.local_rank
                ),
            }),
        }
    }

    /// The variables that make a child process this worker (what torchrun sets).
    pub fn vars(&self) -> Vec<(&'static str, String)> {
        vec![
            ("RANK", self.rank.to_string()),
            ("LOCAL_RANK", self.local_rank.to_string()),
            ("WORLD_SIZE", self.world.to_string()),
            ("LOCAL_WORLD_SIZE", self.local_world.to_string()),
            ("MASTER_ADDR", self.master_addr.clone()),
            ("MASTER_PORT", self.master_port.to_string()),
        ]
    }
}

/// The first host of a SLURM node list such as `gpu[07-09,12],cpu3` (`gpu07`).
pub fn first_host(list: &str) -> String {
    let list = list.trim();
    let end = list.find([',', '[']).unwrap_or(list.len());
    let prefix = &list[..end];
    if list[end..].starts_with('[') {
        let first = list[end + 1..].split([',', '-', ']']).next().unwrap_or("");
        format!("{prefix}{first}")
    } else {
        prefix.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> Result<Option<WorkerEnv>, DistError> {
        let map: HashMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        WorkerEnv::from_vars(|k| map.get(k).cloned())
    }

    #[test]
    fn slurm_node_lists_give_their_first_host() {
        assert_eq!(first_host("gpu[07-09,12],cpu3"), "gpu07");
        assert_eq!(first_host("node12,node13"), "node12");
        assert_eq!(first_host("single"), "single");
        assert_eq!(first_host("a[3,5]"), "a3");
    }

    #[test]
    fn torchrun_and_srun_workers_are_recognised() {
        assert_eq!(env(&[]).unwrap(), None);
        assert_eq!(
            env(&[("SLURM_PROCID", "0"), ("SLURM_NTASKS", "8")]).unwrap(),
            None,
            "a batch script is not a worker"
        );
        let torchrun = env(&[
            ("RANK", "3"),
            ("WORLD_SIZE", "4"),
            ("LOCAL_RANK", "1"),
            ("LOCAL_WORLD_SIZE", "2"),
            ("MASTER_ADDR", "h0"),
            ("MASTER_PORT", "1234"),
        ]);
        let want = WorkerEnv {
            rank: 3,
            local_rank: 1,
            world: 4,
            local_world: 2,
            master_addr: "h0".into(),
            master_port: 1234,
            agent_store: false,
        };
        assert_eq!(torchrun.unwrap(), Some(want.clone()));
        // torchrun's agent hosts the store: rank 0 joins it instead of hosting its own.
        let agent = env(&[("RANK", "0"), ("WORLD_SIZE", "2"), ("TORCHELASTIC_USE_AGENT_STORE", "True")]).unwrap();
        assert!(agent.is_some_and(|e| e.agent_store));
        assert_eq!(
            WorkerEnv::from_vars(|k| want.vars().into_iter().find(|(n, _)| *n == k).map(|(_, v)| v)).unwrap(),
            Some(want)
        );
        let srun = env(&[
            ("SLURM_STEP_ID", "0"),
            ("SLURM_PROCID", "9"),
            ("SLURM_LOCALID", "1"),
            ("SLURM_NTASKS", "16"),
            ("SLURM_NNODES", "2"),
            ("SLURM_JOB_ID", "123456"),
            ("SLURM_JOB_NODELIST", "gpu[07-08]"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!((srun.rank, srun.local_rank, srun.world, srun.local_world), (9, 1, 16, 8));
        assert_eq!((srun.master_addr.as_str(), srun.master_port), ("gpu07", 20000 + 3456));
    }

    #[test]
    fn impossible_ranks_name_the_variable() {
        let err = env(&[("RANK", "4"), ("WORLD_SIZE", "4")]).unwrap_err().to_string();
        assert!(err.contains("RANK") && err.contains("world of 4"), "{err}");
        let err = env(&[("RANK", "x"), ("WORLD_SIZE", "4")]).unwrap_err().to_string();
        assert!(err.contains("RANK") && err.contains("not a number"), "{err}");
    }
}
