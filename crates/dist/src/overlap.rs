//! Gradient reduction overlapped with backward, as DDP's reducer does it: parameters are
//! grouped into buckets in reverse order (the order backward produces their gradients),
//! each parameter gets a hook that fires once backward has accumulated its gradient, and a
//! bucket whose gradients are all there (and whose predecessors have gone) is flattened and
//! its reduction launched while backward goes on: on CPU workers, by a communication
//! thread on a ring of its own (the ring's collectives block); on GPUs, as an asynchronous
//! collective of the group's ProcessGroupNCCL (NCCL runs it on its own stream), waited for
//! when backward is done. Replicated training sums each bucket
//! ([`OverlappedReduction::finish`] writes the means back into the gradients); sharded
//! training reduce-scatters it ([`OverlappedReduction::finish_shares`] hands over this
//! rank's shares) and frees the gradients as soon as they are flattened.

use std::ffi::{c_char, c_void, CStr};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Mutex;
use std::thread::JoinHandle;

use tch::Tensor;

use crate::shard::ShardLayout;
use crate::{Collective, DistError, Pending, SharedCollective};

type Callback = extern "C" fn(ctx: *mut c_void, index: usize);

extern "C" {
    fn pg2_grad_hooks_error() -> *const c_char;
    fn pg2_on_grad_ready(param: *const c_void, callback: Callback, ctx: *mut c_void, index: usize) -> i32;
    fn pg2_clear_grad_ready(param: *const c_void) -> i32;
    fn pg2_release_grad(param: *const c_void);
}

/// Frees `param`'s gradient (the next backward pass allocates a new one).
pub fn release_grad(param: &Tensor) {
    // SAFETY: a live tensor; resetting its grad cannot fail.
    unsafe { pg2_release_grad(param.as_ptr() as *const c_void) }
}

/// What the communication thread does with each bucket.
pub(crate) enum Reduce {
    /// Sums it over the group.
    AllReduce,
    /// Reduce-scatters it as the layout cuts it; the gradients are freed once flattened.
    Scatter(ShardLayout),
}

/// A flat bucket on its way to be reduced: its index, the values, and for a reduce-scatter
/// the length of this rank's share.
type Message = (usize, Tensor, Option<i64>);

/// A bucket's reduction once launched: its index, the tensor that gets the result, and the
/// collective. (NCCL's work keeps the flat input's memory until it is done, so a sharded
/// bucket's input goes as soon as it is launched.)
type Launched = (usize, Tensor, Pending);

/// Launches `message`'s reduction on `collective`.
fn launch(collective: &mut dyn Collective, (bucket, flat, share): Message) -> Result<Launched, DistError> {
    match share {
        None => {
            let pending = collective.start_all_reduce_sum(&flat)?;
            Ok((bucket, flat, pending))
        }
        Some(len) => {
            let out = Tensor::zeros([len], (flat.kind(), flat.device()));
            let pending = collective.start_reduce_scatter_sum(&out, &flat)?;
            Ok((bucket, out, pending))
        }
    }
}

/// A bucket's index and its reduced values (or what went wrong).
type Reduced = Result<(usize, Tensor), DistError>;

/// Buckets launched directly that may be in flight at once.
const IN_FLIGHT: usize = 2;

/// Where the hooks launch full buckets.
pub(crate) enum Launcher {
    /// To a communication thread that reduces them on a collective of its own (CPU
    /// workers: a ring whose collectives block).
    Thread(Box<dyn Collective>),
    /// Right away, on a collective that runs them asynchronously (the group's NCCL).
    Direct(SharedCollective),
}

/// The hooks' end of a [`Launcher`].
enum Launch {
    Thread(Mutex<Sender<Message>>),
    Direct { collective: SharedCollective, launched: Mutex<Vec<Launched>> },
}

/// Where the backward pass stands, as the hooks see it.
#[derive(Default)]
struct Progress {
    /// Hooks count only while armed (for the backward passes that reduce: an update's last,
    /// or each one with sharded gradients).
    armed: bool,
    /// Whether each parameter's gradient is complete in this pass.
    ready: Vec<bool>,
    /// Buckets handed to the communication thread, in order.
    launched: usize,
    /// The first thing that went wrong in a hook (reported by `finish`).
    error: Option<String>,
}

/// What the hooks reach through their context pointer.
struct Shared {
    names: Vec<String>,
    params: Vec<Tensor>,
    /// Parameter indices of each bucket, in launch order.
    buckets: Vec<Vec<usize>>,
    reduce: Reduce,
    progress: Mutex<Progress>,
    launch: Launch,
}

impl Shared {
    /// The gradients of bucket `b`, in its order.
    fn grads(&self, b: usize) -> Vec<Tensor> {
        self.buckets[b].iter().map(|&i| self.params[i].grad()).collect()
    }

    /// Marks parameter `index` ready and launches every bucket that now can go.
    fn ready(&self, index: usize) {
        let mut p = self.progress.lock().unwrap_or_else(|e| e.into_inner());
        if !p.armed || p.error.is_some() {
            return;
        }
        if p.ready[index] {
            p.error = Some(format!("`{}` got its gradient twice in one backward pass", self.names[index]));
            return;
        }
        p.ready[index] = true;
        while p.launched < self.buckets.len() && self.buckets[p.launched].iter().all(|&i| p.ready[i]) {
            let bucket = p.launched;
            let grads = self.grads(bucket);
            let message = match &self.reduce {
                Reduce::AllReduce => (bucket, crate::bucket::flatten(&grads), None),
                Reduce::Scatter(layout) => {
                    let flat = layout.flatten(bucket, &grads);
                    self.buckets[bucket].iter().for_each(|&i| release_grad(&self.params[i]));
                    (bucket, flat, Some(layout.buckets[bucket].share))
                }
            };
            if let Err(e) = self.send(message) {
                p.error = Some(e);
                return;
            }
            p.launched += 1;
        }
    }
}

impl Shared {
    fn send(&self, message: Message) -> Result<(), String> {
        match &self.launch {
            Launch::Thread(to_comm) => to_comm
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .send(message)
                .map_err(|_| "the communication thread is gone".to_string()),
            Launch::Direct { collective, launched } => {
                let mut collective = collective.lock().unwrap_or_else(|e| e.into_inner());
                let started = launch(collective.as_mut(), message).map_err(|e| e.to_string())?;
                let mut launched = launched.lock().unwrap_or_else(|e| e.into_inner());
                launched.push(started);
                // Backward waits for all but the newest buckets: NCCL may hold each input
                // until its work is waited for, and they would otherwise add up to the
                // whole gradient.
                let settled = launched.len().saturating_sub(IN_FLIGHT);
                for (_, _, pending) in &mut launched[..settled] {
                    std::mem::replace(pending, Pending::Done).wait().map_err(|e| e.to_string())?;
                }
                Ok(())
            }
        }
    }
}

/// Called by libtorch from the backward pass.
extern "C" fn on_ready(ctx: *mut c_void, index: usize) {
    // SAFETY: `ctx` is the `Shared` that the reduction owns and keeps alive while its hooks
    // are installed (they are removed in `Drop`).
    let shared = unsafe { &*(ctx as *const Shared) };
    // A panic must not unwind into C++.
    if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| shared.ready(index))).is_err() {
        let mut p = shared.progress.lock().unwrap_or_else(|e| e.into_inner());
        p.error = Some(format!("the hook of `{}` panicked", shared.names[index]));
    }
}

/// Overlapped gradient reduction for a list of trainable parameters; see the module docs.
pub struct OverlappedReduction {
    shared: Box<Shared>,
    /// The communication thread and its results, with [`Launcher::Thread`].
    comm: Option<(Receiver<Reduced>, JoinHandle<()>)>,
    world: usize,
}

impl OverlappedReduction {
    /// Installs hooks on `params` (with their `names`), to be reduced as `reduce` says in
    /// `buckets` (parameter indices, in launch order), launched by `launcher`.
    pub(crate) fn new(
        names: Vec<String>,
        params: Vec<Tensor>,
        buckets: Vec<Vec<usize>>,
        reduce: Reduce,
        launcher: Launcher,
        world: usize,
    ) -> Result<Self, DistError> {
        let (launch, comm) = match launcher {
            Launcher::Thread(collective) => {
                let (to_comm, comm_rx) = channel::<Message>();
                let (comm_tx, from_comm) = channel();
                let comm = std::thread::Builder::new()
                    .name("pg2-grad-comm".into())
                    .spawn(move || communicate(collective, comm_rx, comm_tx))
                    .map_err(|e| DistError::io("starting the gradient communication thread", e))?;
                (Launch::Thread(Mutex::new(to_comm)), Some((from_comm, comm)))
            }
            Launcher::Direct(collective) => (Launch::Direct { collective, launched: Mutex::default() }, None),
        };
        let progress = Mutex::new(Progress { ready: vec![false; params.len()], ..Progress::default() });
        let shared = Box::new(Shared { names, params, buckets, reduce, progress, launch });
        let reduction = OverlappedReduction { shared, comm, world };
        let ctx = &*reduction.shared as *const Shared as *mut c_void;
        for (i, p) in reduction.shared.params.iter().enumerate() {
            // SAFETY: a live tensor; `ctx` outlives the hook (removed in Drop before `shared` goes).
            if unsafe { pg2_on_grad_ready(p.as_ptr() as *const c_void, on_ready, ctx, i) } != 0 {
                return Err(DistError::Protocol(format!(
                    "installing the gradient hook of `{}`: {}",
                    reduction.shared.names[i],
                    hooks_error()
                )));
            }
        }
        Ok(reduction)
    }

    /// The number of buckets.
    pub fn buckets(&self) -> usize {
        self.shared.buckets.len()
    }

    /// Makes the next backward pass reduce (call before the backward pass whose gradients
    /// are to be reduced: the last micro-batch's, or each one's when sharded gradients are
    /// accumulated).
    pub fn arm(&self) {
        let mut p = self.shared.progress.lock().unwrap_or_else(|e| e.into_inner());
        *p = Progress { armed: true, ready: vec![false; self.shared.params.len()], ..Progress::default() };
    }

    /// Waits for every bucket of the armed pass and replaces each gradient by its mean over
    /// the group. A parameter that got no gradient is an error naming it.
    pub fn finish(&mut self) -> Result<(), DistError> {
        for (bucket, sum) in self.collect()? {
            crate::bucket::write_mean(sum, &self.shared.grads(bucket), self.world);
        }
        Ok(())
    }

    /// Waits for every bucket of the armed pass (reduce-scattered) and returns this rank's
    /// shares of the sums, as (bucket, share) pairs.
    pub fn finish_shares(&mut self) -> Result<Vec<(usize, Tensor)>, DistError> {
        self.collect()
    }

    /// The reduced buckets of the armed pass, once all have come back.
    fn collect(&mut self) -> Result<Vec<(usize, Tensor)>, DistError> {
        let (launched, error, missing) = {
            let mut p = self.shared.progress.lock().unwrap_or_else(|e| e.into_inner());
            p.armed = false;
            let missing = p.ready.iter().position(|r| !r);
            (p.launched, p.error.take(), missing)
        };
        // Collect what was launched, so nothing is in flight whatever happens next.
        let mut results = Vec::with_capacity(launched);
        match (&self.comm, &self.shared.launch) {
            (Some((from_comm, _)), _) => {
                for _ in 0..launched {
                    let gone = || DistError::Protocol("the communication thread is gone".into());
                    results.push(from_comm.recv().map_err(|_| gone())?);
                }
            }
            (None, Launch::Direct { launched, .. }) => {
                let launched = std::mem::take(&mut *launched.lock().unwrap_or_else(|e| e.into_inner()));
                for (bucket, result, pending) in launched {
                    results.push(pending.wait().map(|()| (bucket, result)));
                }
            }
            (None, Launch::Thread(_)) => unreachable!("a thread launcher has its thread"),
        }
        if let Some(error) = error {
            return Err(DistError::Protocol(error));
        }
        if let Some(i) = missing {
            return Err(DistError::Protocol(format!(
                "`{}` got no gradient; every trainable parameter needs one with several workers",
                self.shared.names[i]
            )));
        }
        results.into_iter().collect()
    }
}

impl Drop for OverlappedReduction {
    fn drop(&mut self) {
        for p in &self.shared.params {
            // SAFETY: a live tensor; clearing a hook cannot fail for a leaf.
            unsafe { pg2_clear_grad_ready(p.as_ptr() as *const c_void) };
        }
        // Closing the channel ends the thread.
        if let Launch::Thread(to_comm) = &self.shared.launch {
            *to_comm.lock().unwrap_or_else(|e| e.into_inner()) = channel().0;
        }
        if let Some((_, comm)) = self.comm.take() {
            let _ = comm.join();
        }
    }
}

/// The communication thread: reduces each bucket on `collective` as it comes.
fn communicate(mut collective: Box<dyn Collective>, buckets: Receiver<Message>, done: Sender<Reduced>) {
    for message in buckets {
        let reduced = launch(collective.as_mut(), message)
            .and_then(|(bucket, result, pending)| pending.wait().map(|()| (bucket, result)));
        if done.send(reduced).is_err() {
            return;
        }
    }
}

fn hooks_error() -> String {
    // SAFETY: the shim returns a NUL-terminated thread-local string.
    unsafe { CStr::from_ptr(pg2_grad_hooks_error()) }.to_string_lossy().into_owned()
}
