//! The CUDA backend: libtorch's own `c10d::ProcessGroupNCCL` (through `c10d_nccl.cpp`), the
//! engine PyTorch's DDP and FSDP run on. Its collectives run on NCCL streams of its own,
//! ordered after the kernels that wrote their tensors; [`Work::wait`] orders the current
//! stream after them without blocking the host. NCCL's asynchronous error handling and
//! c10d's watchdog come with it: with torch's default `TORCH_NCCL_ASYNC_ERROR_HANDLING`, a
//! collective that fails or hangs past the group's timeout takes the worker down with
//! libtorch's message, and the launcher then stops the group naming the rank.

use std::ffi::{c_char, c_void, CStr};
use std::time::Duration;

use tch::Tensor;

use crate::store::Store;
use crate::{Collective, DistError, Pending};

extern "C" {
    fn pg2_nccl_error() -> *const c_char;
    fn pg2_nccl_new(store: *mut c_void, rank: i32, size: i32, timeout_ms: i64, out: *mut *mut c_void) -> i32;
    fn pg2_nccl_free(group: *mut c_void);
    fn pg2_nccl_all_reduce_sum(group: *mut c_void, tensor: *const c_void, work: *mut *mut c_void) -> i32;
    fn pg2_nccl_broadcast(group: *mut c_void, tensor: *const c_void, root: i32, work: *mut *mut c_void) -> i32;
    fn pg2_nccl_reduce_scatter_sum(
        group: *mut c_void,
        output: *const c_void,
        input: *const c_void,
        work: *mut *mut c_void,
    ) -> i32;
    fn pg2_nccl_all_gather(
        group: *mut c_void,
        output: *const c_void,
        input: *const c_void,
        work: *mut *mut c_void,
    ) -> i32;
    fn pg2_work_wait(work: *mut c_void) -> i32;
    fn pg2_work_free(work: *mut c_void);
}

fn nccl_error(what: &str) -> DistError {
    // SAFETY: the shim returns a NUL-terminated thread-local string.
    let msg = unsafe { CStr::from_ptr(pg2_nccl_error()) }.to_string_lossy().into_owned();
    DistError::Nccl(format!("{what}: {msg}"))
}

/// One rank's share of a ProcessGroupNCCL.
pub struct Nccl {
    group: *mut c_void,
}

// SAFETY: ProcessGroupNCCL is used from one thread at a time: the group keeps it behind a
// mutex (parameters are gathered from the autograd engine's thread in backward).
unsafe impl Send for Nccl {}

/// A collective in flight.
pub struct Work {
    handle: *mut c_void,
    what: &'static str,
}

// SAFETY: a c10d Work is reference-counted and may be waited for from any thread (DDP's
// reducer does so from the autograd engine's); pg2 waits for each once.
unsafe impl Send for Work {}

impl Work {
    /// Orders the current CUDA stream after the collective (the host goes on); an error if
    /// it failed or the watchdog aborted it.
    pub fn wait(self) -> Result<(), DistError> {
        // SAFETY: a live handle, freed once in Drop.
        match unsafe { pg2_work_wait(self.handle) } {
            0 => Ok(()),
            _ => Err(nccl_error(self.what)),
        }
    }
}

impl Drop for Work {
    fn drop(&mut self) {
        // SAFETY: a live handle, freed once.
        unsafe { pg2_work_free(self.handle) }
    }
}

impl Nccl {
    /// Joins the ProcessGroupNCCL of `world` ranks over the group's store (rank 0's NCCL id
    /// travels through it); `timeout` is the watchdog's limit for one collective.
    pub fn connect(store: &Store, rank: usize, world: usize, timeout: Duration) -> Result<Nccl, DistError> {
        let mut group = std::ptr::null_mut();
        // SAFETY: a live store handle and an out-pointer; the shim catches C++ exceptions.
        let code =
            unsafe { pg2_nccl_new(store.raw(), rank as i32, world as i32, timeout.as_millis() as i64, &mut group) };
        match code {
            0 => Ok(Nccl { group }),
            _ => Err(nccl_error(&format!("creating the NCCL group (rank {rank} of {world})"))),
        }
    }

    fn start(&self, what: &'static str, launch: impl FnOnce(*mut *mut c_void) -> i32) -> Result<Work, DistError> {
        let mut handle = std::ptr::null_mut();
        match launch(&mut handle) {
            0 => Ok(Work { handle, what }),
            _ => Err(nccl_error(what)),
        }
    }

    /// Sums `tensor` over the ranks, in place.
    pub fn all_reduce_sum_async(&mut self, tensor: &Tensor) -> Result<Work, DistError> {
        let t = tensor.as_ptr() as *const c_void;
        // SAFETY: live group and tensor; c10d keeps the tensor's memory until the work is done.
        self.start("all-reduce", |w| unsafe { pg2_nccl_all_reduce_sum(self.group, t, w) })
    }

    /// Copies rank `root`'s `tensor` into every rank's.
    pub fn broadcast_async(&mut self, tensor: &Tensor, root: usize) -> Result<Work, DistError> {
        let t = tensor.as_ptr() as *const c_void;
        // SAFETY: as above.
        self.start("broadcast", |w| unsafe { pg2_nccl_broadcast(self.group, t, root as i32, w) })
    }

    /// `output` (a `1 / world` share of `input`'s elements) gets this rank's share of the
    /// sum of every rank's `input`: the gradient step of sharded data parallelism.
    pub fn reduce_scatter_sum_async(&mut self, output: &Tensor, input: &Tensor) -> Result<Work, DistError> {
        let (o, i) = (output.as_ptr() as *const c_void, input.as_ptr() as *const c_void);
        // SAFETY: as above.
        self.start("reduce-scatter", |w| unsafe { pg2_nccl_reduce_scatter_sum(self.group, o, i, w) })
    }

    /// `output` (`world` times `input`'s elements) gets every rank's `input` in rank order:
    /// the parameter step of sharded data parallelism.
    pub fn all_gather_async(&mut self, output: &Tensor, input: &Tensor) -> Result<Work, DistError> {
        let (o, i) = (output.as_ptr() as *const c_void, input.as_ptr() as *const c_void);
        // SAFETY: as above.
        self.start("all-gather", |w| unsafe { pg2_nccl_all_gather(self.group, o, i, w) })
    }
}

impl Drop for Nccl {
    fn drop(&mut self) {
        // SAFETY: a live group, shut down and freed once.
        unsafe { pg2_nccl_free(self.group) }
    }
}

impl Collective for Nccl {
    fn all_reduce_sum(&mut self, tensor: &Tensor) -> Result<(), DistError> {
        self.all_reduce_sum_async(tensor)?.wait()
    }

    fn broadcast(&mut self, tensor: &Tensor, root: usize) -> Result<(), DistError> {
        self.broadcast_async(tensor, root)?.wait()
    }

    fn reduce_scatter_sum(&mut self, output: &Tensor, input: &Tensor) -> Result<(), DistError> {
        self.reduce_scatter_sum_async(output, input)?.wait()
    }

    fn all_gather(&mut self, output: &Tensor, input: &Tensor) -> Result<(), DistError> {
        self.all_gather_async(output, input)?.wait()
    }

    fn start_all_reduce_sum(&mut self, tensor: &Tensor) -> Result<Pending, DistError> {
        self.all_reduce_sum_async(tensor).map(Pending::Nccl)
    }

    fn start_reduce_scatter_sum(&mut self, output: &Tensor, input: &Tensor) -> Result<Pending, DistError> {
        self.reduce_scatter_sum_async(output, input).map(Pending::Nccl)
    }

    fn start_all_gather(&mut self, output: &Tensor, input: &Tensor) -> Result<Pending, DistError> {
        self.all_gather_async(output, input).map(Pending::Nccl)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shim links against libtorch_cuda's ProcessGroupNCCL (when built with the CUDA
    /// headers: otherwise the stub says what is missing); on a machine without a GPU
    /// libtorch's constructor says so instead of crashing. (`launch/gpu-check` runs it on GPUs.)
    #[test]
    fn the_nccl_group_is_created_or_refused_with_a_message() {
        let store = Store::host(0, "127.0.0.1", Duration::from_secs(60)).unwrap();
        match Nccl::connect(&store, 0, 1, Duration::from_secs(60)) {
            Ok(mut nccl) if tch::Cuda::is_available() => {
                let t = Tensor::from_slice(&[1.0f32, 2.0]).to_device(tch::Device::Cuda(0));
                nccl.all_reduce_sum(&t).unwrap();
                assert_eq!(Vec::<f32>::try_from(t.to_device(tch::Device::Cpu)).unwrap(), [1.0, 2.0]);
            }
            Ok(_) => panic!("a NCCL group without a GPU"),
            Err(e) => {
                assert!(!tch::Cuda::is_available(), "{e}");
                let msg = e.to_string();
                let why = match cfg!(pg2_c10d_nccl) {
                    true => "ProcessGroupNCCL is only supported with GPUs",
                    false => "built without the CUDA headers",
                };
                assert!(msg.contains("creating the NCCL group") && msg.contains(why), "{msg}");
            }
        }
    }
}
