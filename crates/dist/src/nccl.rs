//! The CUDA backend: NCCL through `cudarc`, on the tensors' device memory.
//!
//! NCCL is loaded at run time (the torch wheel ships `libnccl.so.2`; the bootstrap links
//! `libnccl.so` beside it and the binaries' rpath covers that folder). Collectives are
//! enqueued on the legacy default stream, the one libtorch's kernels run on here (tch never
//! switches streams), so they are ordered after the backward pass that wrote the gradients
//! and before the optimizer reads them, with no host round trip.

use std::sync::Arc;
use std::time::Duration;

use cudarc::driver::CudaContext;
use cudarc::nccl::{result, sys};
use tch::{Kind, Tensor};

use crate::store::Store;
use crate::{Collective, DistError};

/// One rank's NCCL communicator, bound to one GPU.
pub struct Nccl {
    comm: sys::ncclComm_t,
    /// Keeps the device's primary context alive and current on this thread.
    _context: Arc<CudaContext>,
}

fn nccl_error(what: &str, e: impl std::fmt::Debug) -> DistError {
    DistError::Nccl(format!("{what}: {e:?}"))
}

impl Nccl {
    /// Creates the communicator of `world` ranks on GPU `device`: rank 0 makes the unique
    /// id and shares it through the store.
    pub fn connect(
        store: &mut Store,
        rank: usize,
        world: usize,
        device: usize,
        timeout: Duration,
    ) -> Result<Nccl, DistError> {
        // SAFETY: only probes whether the library can be opened.
        if !unsafe { sys::is_culib_present() } {
            return Err(DistError::Nccl(
                "libnccl.so was not found: rerun ./launch/launch (its bootstrap links the torch wheel's NCCL), or set LD_LIBRARY_PATH to a folder holding libnccl.so".into(),
            ));
        }
        let context = CudaContext::new(device).map_err(|e| nccl_error(&format!("opening cuda:{device}"), e))?;
        context.bind_to_thread().map_err(|e| nccl_error("binding the CUDA context", e))?;
        let id = if rank == 0 {
            let id = result::get_uniqueid().map_err(|e| nccl_error("ncclGetUniqueId", e))?;
            store.set("nccl/id", &id.internal.map(|c| c as u8))?;
            id
        } else {
            let bytes = store.get("nccl/id", timeout)?.ok_or_else(|| {
                DistError::Timeout(format!("rank 0 never published the NCCL id within {}s", timeout.as_secs()))
            })?;
            let mut id = sys::ncclUniqueId { internal: [0; 128] };
            for (c, b) in id.internal.iter_mut().zip(bytes) {
                *c = b as _;
            }
            id
        };
        let mut comm = std::mem::MaybeUninit::uninit();
        // SAFETY: `comm` is written by NCCL on success; the id came from rank 0.
        unsafe { result::comm_init_rank(comm.as_mut_ptr(), world as i32, id, rank as i32) }
            .map_err(|e| nccl_error("ncclCommInitRank", e))?;
        // SAFETY: initialised by the successful call above.
        Ok(Nccl { comm: unsafe { comm.assume_init() }, _context: context })
    }

    fn data_type(tensor: &Tensor) -> Result<sys::ncclDataType_t, DistError> {
        Ok(match tensor.kind() {
            Kind::Float => sys::ncclDataType_t::ncclFloat32,
            Kind::BFloat16 => sys::ncclDataType_t::ncclBfloat16,
            Kind::Half => sys::ncclDataType_t::ncclFloat16,
            Kind::Double => sys::ncclDataType_t::ncclFloat64,
            other => return Err(DistError::Nccl(format!("no NCCL type for {other:?} tensors"))),
        })
    }

    fn check(tensor: &Tensor) -> Result<(), DistError> {
        if !tensor.device().is_cuda() || !tensor.is_contiguous() {
            return Err(DistError::Nccl(format!(
                "NCCL needs contiguous CUDA tensors, got one on {:?}",
                tensor.device()
            )));
        }
        Ok(())
    }
}

/// The legacy default stream, libtorch's unless a stream is set.
const DEFAULT_STREAM: sys::cudaStream_t = std::ptr::null_mut();

impl Collective for Nccl {
    fn all_reduce_sum(&mut self, tensor: &Tensor) -> Result<(), DistError> {
        Self::check(tensor)?;
        let ptr = tensor.data_ptr();
        // SAFETY: in place on a contiguous tensor of `numel` elements that outlives the call;
        // the stream orders it after the kernels that wrote it.
        unsafe {
            result::all_reduce(
                ptr,
                ptr,
                tensor.numel(),
                Self::data_type(tensor)?,
                sys::ncclRedOp_t::ncclSum,
                self.comm,
                DEFAULT_STREAM,
            )
        }
        .map_err(|e| nccl_error("ncclAllReduce", e))?;
        Ok(())
    }

    fn broadcast(&mut self, tensor: &Tensor, root: usize) -> Result<(), DistError> {
        Self::check(tensor)?;
        let ptr = tensor.data_ptr();
        // SAFETY: as for all_reduce.
        unsafe {
            result::broadcast(
                ptr,
                ptr,
                tensor.numel(),
                Self::data_type(tensor)?,
                root as i32,
                self.comm,
                DEFAULT_STREAM,
            )
        }
        .map_err(|e| nccl_error("ncclBroadcast", e))?;
        Ok(())
    }
}

impl Drop for Nccl {
    fn drop(&mut self) {
        // SAFETY: the communicator is not used after this.
        unsafe {
            let _ = result::comm_destroy(self.comm);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bootstrap's `libnccl.so` link and the rpath let the wheel's NCCL load (no GPU
    /// needed to ask its version).
    #[test]
    fn the_wheels_nccl_loads_through_the_rpath() {
        // SAFETY: only opens the library.
        assert!(
            unsafe { sys::is_culib_present() },
            "libnccl.so not found: rerun ./launch/test, whose bootstrap links it"
        );
        let version = result::get_nccl_version().unwrap();
        assert!(version >= 22800, "NCCL {version}: the torch 2.11 wheel ships 2.28");
    }
}
