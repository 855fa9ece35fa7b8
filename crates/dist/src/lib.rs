//! Data-parallel training for pg2: who each worker is ([`WorkerEnv`]), the rendezvous
//! ([`store`]: libtorch's c10d `TCPStore`, hosted by rank 0 or by torchrun's agent), collectives with two backends (NCCL on GPUs, a TCP ring
//! on CPUs) behind one [`Collective`] interface, the [`Group`] the trainer talks to, and the
//! launcher that starts and watches a node's workers ([`launcher`]).

mod bucket;
pub mod env;
pub mod launcher;
pub mod nccl;
pub mod overlap;
pub mod ring;
pub mod shard;
pub mod store;

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tch::{Device, Tensor};

pub use env::WorkerEnv;
pub use launcher::{supervise, LaunchPlan};
pub use overlap::{release_grad, OverlappedReduction};
pub use shard::ShardLayout;

/// What went wrong between the workers.
#[derive(Debug, thiserror::Error)]
pub enum DistError {
    #[error("{var}: {msg}")]
    Env { var: String, msg: String },
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    #[error("{0}")]
    Timeout(String),
    /// The rendezvous store failed (libtorch's message).
    #[error("{0}")]
    Store(String),
    #[error("{0}")]
    Protocol(String),
    #[error("{0}")]
    Nccl(String),
    #[error("{0}")]
    Worker(String),
    #[error(transparent)]
    Tensor(#[from] tch::TchError),
}

impl DistError {
    fn io(what: impl Into<String>, source: std::io::Error) -> DistError {
        DistError::Io { what: what.into(), source }
    }
}

/// Collectives over one tensor, called in the same order on every rank.
pub trait Collective: Send {
    /// Sums `tensor` in place over the ranks; every rank ends with the same values.
    fn all_reduce_sum(&mut self, tensor: &Tensor) -> Result<(), DistError>;
    /// Copies rank `root`'s `tensor` into every other rank's.
    fn broadcast(&mut self, tensor: &Tensor, root: usize) -> Result<(), DistError>;
    /// `output` gets this rank's share (the `rank`-th of `world` equal parts) of the sum of
    /// every rank's `input`, which holds `world` times `output`'s elements.
    fn reduce_scatter_sum(&mut self, output: &Tensor, input: &Tensor) -> Result<(), DistError>;
    /// `output` (`world` times `input`'s elements) gets every rank's `input` in rank order.
    fn all_gather(&mut self, output: &Tensor, input: &Tensor) -> Result<(), DistError>;
    /// Starts [`Collective::all_reduce_sum`]; a backend that runs collectives
    /// asynchronously (NCCL) returns before it is done.
    fn start_all_reduce_sum(&mut self, tensor: &Tensor) -> Result<Pending, DistError> {
        self.all_reduce_sum(tensor).map(|()| Pending::Done)
    }
    /// Starts [`Collective::reduce_scatter_sum`], as [`Collective::start_all_reduce_sum`].
    fn start_reduce_scatter_sum(&mut self, output: &Tensor, input: &Tensor) -> Result<Pending, DistError> {
        self.reduce_scatter_sum(output, input).map(|()| Pending::Done)
    }
    /// Starts [`Collective::all_gather`], as [`Collective::start_all_reduce_sum`].
    fn start_all_gather(&mut self, output: &Tensor, input: &Tensor) -> Result<Pending, DistError> {
        self.all_gather(output, input).map(|()| Pending::Done)
    }
}

/// A collective once started.
pub enum Pending {
    /// Done already (the backend's collectives block).
    Done,
    /// In flight on NCCL's stream.
    Nccl(nccl::Work),
}

impl Pending {
    /// Waits for it: orders the current CUDA stream after an NCCL collective (the host goes
    /// on), and reports its failure.
    pub fn wait(self) -> Result<(), DistError> {
        match self {
            Pending::Done => Ok(()),
            Pending::Nccl(work) => work.wait(),
        }
    }
}

/// An error unless `whole` holds `world` times the elements of `share`.
fn check_shares(what: &str, share: &Tensor, whole: &Tensor, world: usize) -> Result<(), DistError> {
    if whole.numel() == share.numel() * world {
        return Ok(());
    }
    Err(DistError::Protocol(format!(
        "{what} of {} elements over {world} ranks needs shares of {}, got {}",
        whole.numel(),
        whole.numel() as f64 / world as f64,
        share.numel()
    )))
}

pub(crate) type SharedCollective = Arc<Mutex<Box<dyn Collective>>>;

/// All-gathers on a [`Group`]'s backend from wherever the parameters are needed (see
/// [`Group::param_gather`]); every rank makes them in the same order.
#[derive(Clone)]
pub struct ParamGather {
    collective: Option<SharedCollective>,
}

impl ParamGather {
    /// `output` gets every rank's `input` in rank order; in a group of one, `input` itself.
    pub fn all_gather(&self, output: &Tensor, input: &Tensor) -> Result<(), DistError> {
        self.start_all_gather(output, input)?.wait()
    }

    /// Starts [`ParamGather::all_gather`]: on NCCL it runs while the caller goes on, until
    /// [`Pending::wait`].
    pub fn start_all_gather(&self, output: &Tensor, input: &Tensor) -> Result<Pending, DistError> {
        match &self.collective {
            Some(c) => c.lock().unwrap_or_else(|e| e.into_inner()).start_all_gather(output, input),
            None => {
                tch::no_grad(|| output.shallow_clone().copy_(input));
                Ok(Pending::Done)
            }
        }
    }
}

/// A data-parallel group as one worker sees it.
pub struct Group {
    pub env: WorkerEnv,
    /// `None` in a process that trains alone.
    store: Option<store::Store>,
    /// `None` in a group of one, where every collective is the identity. Shared with the
    /// [`ParamGather`]s handed out, which gather parameters during forward and backward,
    /// while the group itself is idle.
    collective: Option<SharedCollective>,
    /// Where the collectives' tensors live.
    device: Device,
    timeout: Duration,
    /// Overlapped reductions set up so far (each gets a ring of its own).
    overlapped: usize,
}

impl Group {
    /// Joins the group: rank 0 hosts libtorch's TCPStore (under torchrun, whose agent hosts
    /// it, every rank joins it as a client), the collective backend for `device` is set up
    /// (NCCL for CUDA, even for one rank; the TCP ring for the CPU, from two ranks), and all
    /// meet at a barrier. `timeout` bounds every wait for another rank. Port 0 lets a group
    /// of one pick a free port.
    pub fn join(mut env: WorkerEnv, device: Device, timeout: Duration) -> Result<Group, DistError> {
        let mut store = match env.rank == 0 && !env.agent_store {
            true => store::Store::host(env.master_port, &env.master_addr, timeout)?,
            false => store::Store::connect(&env.master_addr, env.master_port, timeout)?,
        };
        env.master_port = store.port();
        // Everyone first, so that an absent rank is named before any backend waits for it.
        store.barrier("rendezvous", env.rank, env.world, timeout)?;
        let collective: Option<Box<dyn Collective>> = match device {
            Device::Cuda(_) => Some(Box::new(nccl::Nccl::connect(&store, env.rank, env.world, timeout)?)),
            _ if env.world == 1 => None,
            _ => Some(Box::new(ring::Ring::connect(&mut store, "ring", env.rank, env.world, timeout)?)),
        };
        let collective = collective.map(|c| Arc::new(Mutex::new(c)));
        let mut group = Group { env, store: Some(store), collective, device, timeout, overlapped: 0 };
        group.barrier("join")?;
        Ok(group)
    }

    /// A process training alone: rank 0 of 1, every collective the identity.
    pub fn single() -> Group {
        let env = WorkerEnv {
            rank: 0,
            local_rank: 0,
            world: 1,
            local_world: 1,
            master_addr: String::new(),
            master_port: 0,
            agent_store: false,
        };
        Group { env, store: None, collective: None, device: Device::Cpu, timeout: Duration::ZERO, overlapped: 0 }
    }

    /// Whether this rank writes the run's logs and checkpoints (rank 0).
    pub fn is_main(&self) -> bool {
        self.env.rank == 0
    }

    pub fn rank(&self) -> usize {
        self.env.rank
    }

    pub fn world(&self) -> usize {
        self.env.world
    }

    /// Waits for every rank; a timeout names the ranks that never came.
    pub fn barrier(&mut self, name: &str) -> Result<(), DistError> {
        match &mut self.store {
            Some(store) => store.barrier(name, self.env.rank, self.env.world, self.timeout),
            None => Ok(()),
        }
    }

    /// The backend's name, for messages.
    pub fn backend(&self) -> &'static str {
        match (&self.collective, self.device) {
            (None, _) => "none",
            (Some(_), Device::Cuda(_)) => "nccl",
            (Some(_), _) => "tcp ring",
        }
    }

    /// Sums one tensor in place over the ranks (through the backend even in a group of one).
    pub fn all_reduce_sum(&mut self, tensor: &Tensor) -> Result<(), DistError> {
        match self.collective() {
            Some(mut c) => c.all_reduce_sum(tensor),
            None => Ok(()),
        }
    }

    /// `output` gets this rank's share of the sum over the ranks of `input` (see
    /// [`Collective::reduce_scatter_sum`]); in a group of one, `input` itself.
    pub fn reduce_scatter_sum(&mut self, output: &Tensor, input: &Tensor) -> Result<(), DistError> {
        match self.collective() {
            Some(mut c) => c.reduce_scatter_sum(output, input),
            None => {
                tch::no_grad(|| output.shallow_clone().copy_(input));
                Ok(())
            }
        }
    }

    /// `output` gets every rank's `input` in rank order; in a group of one, `input` itself.
    pub fn all_gather(&mut self, output: &Tensor, input: &Tensor) -> Result<(), DistError> {
        self.param_gather().all_gather(output, input)
    }

    /// A handle for all-gathers made while the group is idle (parameters gathered during
    /// forward and backward), on the group's own backend.
    pub fn param_gather(&self) -> ParamGather {
        ParamGather { collective: self.collective.clone() }
    }

    fn collective(&self) -> Option<MutexGuard<'_, Box<dyn Collective>>> {
        self.collective.as_ref().map(|c| c.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// The sums over the ranks of a few numbers (losses, counts), read back to the host.
    pub fn sum_scalars(&mut self, values: &[f64]) -> Result<Vec<f64>, DistError> {
        let Some(mut collective) = self.collective().filter(|_| self.env.world > 1) else {
            return Ok(values.to_vec());
        };
        let t = Tensor::from_slice(values).to_device(self.device);
        collective.all_reduce_sum(&t)?;
        Ok(Vec::<f64>::try_from(&t.to_device(Device::Cpu))?)
    }

    /// Every rank's `data` on rank 0, in rank order (`None` elsewhere), through the store:
    /// for small, uneven results such as evaluation predictions. `name` must be new.
    pub fn gather_to_main(&mut self, name: &str, data: &[u8]) -> Result<Option<Vec<Vec<u8>>>, DistError> {
        let Some(store) = self.store.as_mut().filter(|_| self.env.world > 1) else {
            return Ok(Some(vec![data.to_vec()]));
        };
        let key = |rank: usize| format!("gather/{name}/{rank}");
        store.set(&key(self.env.rank), data)?;
        if self.env.rank != 0 {
            return Ok(None);
        }
        let mut all = Vec::with_capacity(self.env.world);
        for rank in 0..self.env.world {
            let part = store.get(&key(rank), self.timeout)?.ok_or_else(|| {
                DistError::Timeout(format!(
                    "rank {rank} never sent its part of `{name}` within {}s",
                    self.timeout.as_secs()
                ))
            })?;
            store.delete(&key(rank))?; // the store keeps no copy
            all.push(part);
        }
        Ok(Some(all))
    }

    /// Averages `tensors` in place over the ranks, flattened into buckets of at most
    /// `bucket_bytes` (a larger tensor travels alone) so that each collective moves a
    /// sizeable message rather than one small tensor at a time.
    pub fn all_reduce_mean(&mut self, tensors: &[Tensor], bucket_bytes: usize) -> Result<(), DistError> {
        let Some(mut collective) = self.collective().filter(|_| self.env.world > 1) else { return Ok(()) };
        for indices in bucket::buckets(tensors, 0..tensors.len(), bucket_bytes) {
            // Buckets are runs of consecutive tensors.
            let bucket = &tensors[indices[0]..indices[0] + indices.len()];
            let flat = bucket::flatten(bucket);
            collective.all_reduce_sum(&flat)?;
            bucket::write_mean(flat, bucket, self.env.world);
        }
        Ok(())
    }

    /// Gradient averaging for `params` (named) overlapped with backward, in buckets of at
    /// most `bucket_bytes` (see [`overlap`]: on a ring of its own on CPU workers, as
    /// asynchronous NCCL collectives on GPUs); every rank must call this together. `None`
    /// in a group of one, where there is nothing to reduce.
    pub fn overlapped_reduction(
        &mut self,
        params: Vec<(String, Tensor)>,
        bucket_bytes: usize,
    ) -> Result<Option<OverlappedReduction>, DistError> {
        let tensors: Vec<Tensor> = params.iter().map(|(_, t)| t.shallow_clone()).collect();
        let buckets = bucket::buckets(&tensors, (0..tensors.len()).rev(), bucket_bytes);
        self.overlapped(params, buckets, overlap::Reduce::AllReduce)
    }

    /// Gradient reduce-scatter for `params` (named) as `layout` cuts them, overlapped with
    /// backward as [`Group::overlapped_reduction`] (each gradient is freed as soon as its
    /// bucket leaves); every rank must call this together. `None` in a group of one.
    pub fn sharded_reduction(
        &mut self,
        params: Vec<(String, Tensor)>,
        layout: &ShardLayout,
    ) -> Result<Option<OverlappedReduction>, DistError> {
        let buckets = layout.buckets.iter().map(|b| b.members.clone()).collect();
        self.overlapped(params, buckets, overlap::Reduce::Scatter(layout.clone()))
    }

    fn overlapped(
        &mut self,
        params: Vec<(String, Tensor)>,
        buckets: Vec<Vec<usize>>,
        reduce: overlap::Reduce,
    ) -> Result<Option<OverlappedReduction>, DistError> {
        let direct = self.device.is_cuda();
        self.overlapped_with(params, buckets, reduce, direct)
    }

    /// [`Group::overlapped`], launching on the group's own backend (`direct`: NCCL runs
    /// collectives asynchronously) or on a thread with a ring of its own.
    fn overlapped_with(
        &mut self,
        params: Vec<(String, Tensor)>,
        buckets: Vec<Vec<usize>>,
        reduce: overlap::Reduce,
        direct: bool,
    ) -> Result<Option<OverlappedReduction>, DistError> {
        let (Some(store), Some(collective)) = (self.store.as_mut(), &self.collective) else { return Ok(None) };
        if self.env.world == 1 {
            return Ok(None);
        }
        let launcher = match direct {
            true => overlap::Launcher::Direct(collective.clone()),
            false => {
                self.overlapped += 1;
                let name = format!("grad-ring-{}", self.overlapped);
                overlap::Launcher::Thread(Box::new(ring::Ring::connect(
                    store,
                    &name,
                    self.env.rank,
                    self.env.world,
                    self.timeout,
                )?))
            }
        };
        let (names, tensors) = params.into_iter().unzip();
        OverlappedReduction::new(names, tensors, buckets, reduce, launcher, self.env.world).map(Some)
    }

    /// Copies rank 0's `tensors` into every rank's (parameters at the start of training).
    pub fn broadcast_from_main(&mut self, tensors: &[Tensor]) -> Result<(), DistError> {
        let Some(mut collective) = self.collective().filter(|_| self.env.world > 1) else { return Ok(()) };
        tch::no_grad(|| tensors.iter().try_for_each(|t| collective.broadcast(t, 0)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Kind;

    fn join(rank: usize, world: usize, port: u16) -> Group {
        let env = WorkerEnv {
            rank,
            local_rank: rank,
            world,
            local_world: world,
            master_addr: "127.0.0.1".into(),
            master_port: port,
            agent_store: false,
        };
        Group::join(env, Device::Cpu, Duration::from_secs(60)).unwrap()
    }

    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
    }

    /// Both launchers (a thread with a ring of its own, as CPU workers use; the group's own
    /// backend, as GPUs use with NCCL) give the sums during backward, replicated and sharded.
    #[test]
    fn overlapped_reductions_launched_on_a_thread_or_directly_give_the_sums() {
        let port = free_port();
        std::thread::scope(|s| {
            for rank in 0..2 {
                s.spawn(move || {
                    let mut group = join(rank, 2, port);
                    // Three tensors of 3, 5 and 2 elements; rank r's gradient of tensor i is (r + 1)(i + 1).
                    let params: Vec<Tensor> = [3, 5, 2]
                        .iter()
                        .map(|&n| Tensor::zeros([n], (Kind::Float, Device::Cpu)).set_requires_grad(true))
                        .collect();
                    let named = || -> Vec<(String, Tensor)> {
                        params.iter().enumerate().map(|(i, p)| (format!("p{i}"), p.shallow_clone())).collect()
                    };
                    let backward = || {
                        let loss =
                            params.iter().enumerate().map(|(i, p)| p.sum(Kind::Float) * ((rank + 1) * (i + 1)) as f64);
                        loss.reduce(|a, b| a + b).unwrap().backward();
                    };
                    let sums: Vec<Tensor> =
                        params.iter().enumerate().map(|(i, p)| p.ones_like() * (3 * (i + 1)) as f64).collect();
                    for direct in [false, true] {
                        let buckets = bucket::buckets(&params, (0..3).rev(), 16);
                        let reduce = overlap::Reduce::AllReduce;
                        let mut r = group.overlapped_with(named(), buckets, reduce, direct).unwrap().unwrap();
                        r.arm();
                        backward();
                        r.finish().unwrap();
                        for (p, sum) in params.iter().zip(&sums) {
                            assert!(p.grad().equal(&(sum / 2.0)), "direct {direct}: the mean {:?}", p.grad());
                        }
                        params.iter().for_each(release_grad);
                        drop(r);

                        let layout = ShardLayout::new(&params, 16, rank, 2);
                        let buckets = layout.buckets.iter().map(|b| b.members.clone()).collect();
                        let reduce = overlap::Reduce::Scatter(layout.clone());
                        let mut r = group.overlapped_with(named(), buckets, reduce, direct).unwrap().unwrap();
                        r.arm();
                        backward();
                        let shares = r.finish_shares().unwrap();
                        assert_eq!(shares.len(), layout.buckets.len());
                        for (b, share) in shares {
                            let whole = layout.flatten(b, &layout.select(b, &sums));
                            let len = layout.buckets[b].share;
                            assert!(
                                share.equal(&whole.narrow(0, rank as i64 * len, len)),
                                "direct {direct}, bucket {b}"
                            );
                        }
                        assert!(params.iter().all(|p| !p.grad().defined()), "the gradients went with their buckets");
                    }
                    group.barrier("end").unwrap();
                });
            }
        });
    }

    #[test]
    fn groups_of_three_average_in_buckets_broadcast_and_gather() {
        let port = free_port();
        let results: Vec<_> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..3)
                .map(|rank| {
                    s.spawn(move || {
                        let mut group = join(rank, 3, port);
                        // Four tensors of 8, 8, 40 and 8 bytes in 16-byte buckets: [a, b], [c], [d].
                        let grads: Vec<Tensor> = [2, 2, 10, 2]
                            .iter()
                            .map(|&n| Tensor::full([n], rank as f64, (Kind::Float, Device::Cpu)))
                            .collect();
                        group.all_reduce_mean(&grads, 16).unwrap();
                        let params = [Tensor::full([3], rank as f64 + 5.0, (Kind::Float, Device::Cpu))];
                        group.broadcast_from_main(&params).unwrap();
                        let gathered = group.gather_to_main("ranks", format!("rank {rank}").as_bytes()).unwrap();
                        let want =
                            (rank == 0).then(|| (0..3).map(|r| format!("rank {r}").into_bytes()).collect::<Vec<_>>());
                        assert_eq!(gathered, want);
                        group.barrier("end").unwrap();
                        (
                            grads.iter().map(|g| Vec::<f32>::try_from(g).unwrap()).collect::<Vec<_>>(),
                            Vec::<f32>::try_from(&params[0]).unwrap(),
                        )
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (grads, params) in results {
            assert!(grads.iter().flatten().all(|&g| g == 1.0), "the mean of ranks 0, 1, 2 is 1: {grads:?}");
            assert_eq!(grads.iter().map(Vec::len).collect::<Vec<_>>(), [2, 2, 10, 2]);
            assert_eq!(params, vec![5.0; 3]);
        }
    }
}
