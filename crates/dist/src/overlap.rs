//! Gradient averaging overlapped with backward, as DDP's reducer does it: parameters are
//! grouped into buckets in reverse order (the order backward produces their gradients),
//! each parameter gets a hook that fires once backward has accumulated its gradient, and a
//! bucket whose gradients are all there (and whose predecessors have gone) is flattened and
//! handed to a communication thread, which sums it over the group on a ring of its own while
//! backward goes on. [`OverlappedReduction::finish`] waits for the last bucket and writes
//! the means back into the gradients, before the optimizer steps.

use std::ffi::{c_char, c_void, CStr};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Mutex;
use std::thread::JoinHandle;

use tch::Tensor;

use crate::ring::Ring;
use crate::{Collective, DistError};

type Callback = extern "C" fn(ctx: *mut c_void, index: usize);

extern "C" {
    fn pg2_grad_hooks_error() -> *const c_char;
    fn pg2_on_grad_ready(param: *const c_void, callback: Callback, ctx: *mut c_void, index: usize) -> i32;
    fn pg2_clear_grad_ready(param: *const c_void) -> i32;
}

/// Where the backward pass stands, as the hooks see it.
#[derive(Default)]
struct Progress {
    /// Hooks count only while armed (the last micro-batch of an update).
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
    progress: Mutex<Progress>,
    to_comm: Mutex<Sender<(usize, Tensor)>>,
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
            let flat = crate::bucket::flatten(&self.grads(bucket));
            if self.to_comm.lock().unwrap_or_else(|e| e.into_inner()).send((bucket, flat)).is_err() {
                p.error = Some("the communication thread is gone".into());
                return;
            }
            p.launched += 1;
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

/// Overlapped gradient averaging for a list of trainable parameters; see the module docs.
pub struct OverlappedReduction {
    shared: Box<Shared>,
    from_comm: Receiver<Result<(usize, Tensor), DistError>>,
    comm: Option<JoinHandle<()>>,
    world: usize,
}

impl OverlappedReduction {
    /// Buckets `params` (with their `names`) in reverse order into buckets of at most
    /// `bucket_bytes` (a larger tensor goes alone), installs their hooks and starts the
    /// communication thread on `ring`.
    pub(crate) fn new(
        names: Vec<String>,
        params: Vec<Tensor>,
        bucket_bytes: usize,
        ring: Ring,
        world: usize,
    ) -> Result<Self, DistError> {
        let buckets = crate::bucket::buckets(&params, (0..params.len()).rev(), bucket_bytes);
        let (to_comm, comm_rx) = channel::<(usize, Tensor)>();
        let (comm_tx, from_comm) = channel();
        let comm = std::thread::Builder::new()
            .name("pg2-grad-comm".into())
            .spawn(move || communicate(ring, comm_rx, comm_tx))
            .map_err(|e| DistError::io("starting the gradient communication thread", e))?;
        let progress = Mutex::new(Progress { ready: vec![false; params.len()], ..Progress::default() });
        let shared = Box::new(Shared { names, params, buckets, progress, to_comm: Mutex::new(to_comm) });
        let reduction = OverlappedReduction { shared, from_comm, comm: Some(comm), world };
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

    /// Makes the next backward pass reduce (call before the last micro-batch's backward).
    pub fn arm(&self) {
        let mut p = self.shared.progress.lock().unwrap_or_else(|e| e.into_inner());
        *p = Progress { armed: true, ready: vec![false; self.shared.params.len()], ..Progress::default() };
    }

    /// Waits for every bucket of the armed pass and replaces each gradient by its mean over
    /// the group. A parameter that got no gradient is an error naming it.
    pub fn finish(&mut self) -> Result<(), DistError> {
        let (launched, error, missing) = {
            let mut p = self.shared.progress.lock().unwrap_or_else(|e| e.into_inner());
            p.armed = false;
            let missing = p.ready.iter().position(|r| !r);
            (p.launched, p.error.take(), missing)
        };
        // Collect what was sent, so the thread is idle whatever happens next.
        let mut results = Vec::with_capacity(launched);
        for _ in 0..launched {
            results.push(
                self.from_comm.recv().map_err(|_| DistError::Protocol("the communication thread is gone".into()))?,
            );
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
        for result in results {
            let (bucket, sum) = result?;
            crate::bucket::write_mean(sum, &self.shared.grads(bucket), self.world);
        }
        Ok(())
    }
}

impl Drop for OverlappedReduction {
    fn drop(&mut self) {
        for p in &self.shared.params {
            // SAFETY: a live tensor; clearing a hook cannot fail for a leaf.
            unsafe { pg2_clear_grad_ready(p.as_ptr() as *const c_void) };
        }
        // Closing the channel ends the thread.
        let (closed, _) = channel();
        *self.shared.to_comm.lock().unwrap_or_else(|e| e.into_inner()) = closed;
        if let Some(comm) = self.comm.take() {
            let _ = comm.join();
        }
    }
}

/// The communication thread: sums each bucket over the ring as it comes.
fn communicate(mut ring: Ring, buckets: Receiver<(usize, Tensor)>, done: Sender<Result<(usize, Tensor), DistError>>) {
    for (bucket, flat) in buckets {
        let summed = ring.all_reduce_sum(&flat).map(|()| (bucket, flat));
        if done.send(summed).is_err() {
            return;
        }
    }
}

fn hooks_error() -> String {
    // SAFETY: the shim returns a NUL-terminated thread-local string.
    unsafe { CStr::from_ptr(pg2_grad_hooks_error()) }.to_string_lossy().into_owned()
}
