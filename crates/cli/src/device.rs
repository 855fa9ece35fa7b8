//! The device a command computes on, and the process settings that go with it.

use anyhow::{bail, Result};
use tch::Device;

/// A device by name: `cpu`, `cuda`, `cuda:N`, or `auto` (the first GPU if there is one). A
/// GPU this machine does not have is an error naming how many it has.
pub fn parse_device(name: &str) -> Result<Device> {
    let device = match name {
        "auto" => Device::cuda_if_available(),
        "cpu" => Device::Cpu,
        "cuda" => Device::Cuda(0),
        other => match other.strip_prefix("cuda:").and_then(|n| n.parse().ok()) {
            Some(n) => Device::Cuda(n),
            None => bail!("--device {other:?}: expected cpu, cuda, cuda:N or auto"),
        },
    };
    if let Device::Cuda(n) = device {
        let count = tch::Cuda::device_count() as usize;
        if n >= count {
            bail!(
                "--device {name}: this machine has {count} CUDA device(s){}",
                if count > 0 { format!(", cuda:0 to cuda:{}", count - 1) } else { String::new() }
            );
        }
    }
    Ok(device)
}

/// glibc's settings that keep freed memory in the process for reuse: no `mmap` for large
/// blocks, no returning the heap's top to the system (the value is the largest `mallopt`
/// takes). They act on the main thread's arena, where pg2 computes; a worker thread's own
/// arena still gives a wholly freed heap back. As environment variables they tune a
/// process at its start, such as a baseline.
pub const KEEP_FREED_MEMORY_ENV: [(&str, &str); 2] =
    [("MALLOC_MMAP_MAX_", "0"), ("MALLOC_TRIM_THRESHOLD_", "2147483647")];

/// True when the user has set any of [`KEEP_FREED_MEMORY_ENV`]'s variables: then their
/// settings, not pg2's, hold for this process and the processes it starts.
pub fn user_tunes_allocator() -> bool {
    KEEP_FREED_MEMORY_ENV.iter().any(|(name, _)| std::env::var_os(name).is_some())
}

/// Applies [`KEEP_FREED_MEMORY_ENV`] to this process when it computes on the CPU (`device`),
/// unless either variable is set (the user's choice wins); does nothing off glibc.
///
/// libtorch frees and allocates tensors of the same sizes in every step. By default glibc
/// serves each large one with a fresh `mmap` and unmaps it when freed, so every step
/// page-faults its activations in zeroed again: 20-40 % of a CPU step on this project's
/// benchmarks. Kept memory costs a higher peak resident size (freed blocks stay, with some
/// fragmentation). With a GPU the host's large blocks are mostly checkpoint tensors on
/// their way to the device, which should go back to the system: nothing changes there.
pub fn keep_freed_memory(device: Device) {
    if device != Device::Cpu || user_tunes_allocator() {
        return;
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        extern "C" {
            fn mallopt(param: std::ffi::c_int, value: std::ffi::c_int) -> std::ffi::c_int;
        }
        // <malloc.h>'s M_MMAP_MAX and M_TRIM_THRESHOLD.
        const M_MMAP_MAX: std::ffi::c_int = -4;
        const M_TRIM_THRESHOLD: std::ffi::c_int = -1;
        // SAFETY: mallopt only changes the allocator's thresholds; a failure (0) leaves the defaults.
        unsafe {
            mallopt(M_MMAP_MAX, 0);
            mallopt(M_TRIM_THRESHOLD, i32::MAX);
        }
    }
}

/// The device named by `name`, with the process tuned for it ([`keep_freed_memory`]).
pub fn prepare_device(name: &str) -> Result<Device> {
    let device = parse_device(name)?;
    keep_freed_memory(device);
    Ok(device)
}

// The C++ shim beside this file (compiled by build/link_libtorch.rs).
extern "C" {
    fn pg2_cuda_peak_allocated(device: i32) -> i64;
    fn pg2_cuda_reset_peak(device: i32);
}

/// The most bytes the CUDA caching allocator has had allocated on `device` since the last
/// [`reset_peak_memory`] (`torch.cuda.max_memory_allocated`); `None` off CUDA, or where pg2
/// was built without the CUDA headers.
pub fn peak_memory(device: Device) -> Option<u64> {
    let Device::Cuda(index) = device else { return None };
    // SAFETY: a plain query of libtorch's allocator; failures return -1.
    u64::try_from(unsafe { pg2_cuda_peak_allocated(index as i32) }).ok()
}

/// Starts a new peak for [`peak_memory`] on a CUDA `device`; nothing elsewhere.
pub fn reset_peak_memory(device: Device) {
    if let Device::Cuda(index) = device {
        // SAFETY: as above.
        unsafe { pg2_cuda_reset_peak(index as i32) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_parse_and_absent_gpus_are_named() {
        assert_eq!(parse_device("cpu").unwrap(), Device::Cpu);
        let err = parse_device("gpu").unwrap_err().to_string();
        assert!(err.contains("\"gpu\"") && err.contains("cuda:N"), "{err}");
        let err = parse_device("cuda:99").unwrap_err().to_string();
        assert!(err.contains("cuda:99") && err.contains("CUDA device(s)"), "{err}");
    }
}
