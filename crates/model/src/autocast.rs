//! Mixed precision by autocast: weights stay f32, and libtorch runs matmuls and
//! convolutions in a lower precision (bf16 for PaliGemma) inside [`autocast`].

use tch::{Device, Kind};

// The C++ shim beside this file (compiled by build/link_libtorch.rs).
extern "C" {
    fn pg2_autocast_enter(device_type: i32, enabled: bool, dtype: i32, was_enabled: *mut bool, was_dtype: *mut i32);
    fn pg2_autocast_exit(device_type: i32, was_enabled: bool, was_dtype: i32);
}

/// Restores the previous autocast setting when dropped, panics included.
struct Restore {
    device_type: i32,
    was_enabled: bool,
    was_dtype: i32,
}

impl Drop for Restore {
    fn drop(&mut self) {
        // SAFETY: plain calls into libtorch's thread-local autocast state.
        unsafe { pg2_autocast_exit(self.device_type, self.was_enabled, self.was_dtype) }
    }
}

/// Runs `f` with autocast on for `device`'s type (CPU or CUDA) in `kind`, as
/// `torch.autocast(device, dtype=kind)` does. Run the forward pass inside and `backward`
/// outside, as PyTorch advises.
pub fn autocast<T>(device: Device, kind: Kind, f: impl FnOnce() -> T) -> T {
    // c10::ScalarType's numbers.
    let dtype = match kind {
        Kind::Half => 5,
        Kind::BFloat16 => 15,
        other => panic!("autocast computes in Half or BFloat16, not {other:?}"),
    };
    with_autocast(device, true, dtype, f)
}

/// Runs `f` with autocast off for `device`'s type, inside an [`autocast`] region too: for
/// what must stay in f32 (the output logits, as big_vision takes them).
pub fn without_autocast<T>(device: Device, f: impl FnOnce() -> T) -> T {
    with_autocast(device, false, 6, f) // 6: c10's Float, unused while off
}

fn with_autocast<T>(device: Device, enabled: bool, dtype: i32, f: impl FnOnce() -> T) -> T {
    let device_type = if device.is_cuda() { 1 } else { 0 };
    let mut restore = Restore { device_type, was_enabled: false, was_dtype: 0 };
    // SAFETY: the pointers are to live locals; the shim only reads and sets autocast state.
    unsafe { pg2_autocast_enter(device_type, enabled, dtype, &mut restore.was_enabled, &mut restore.was_dtype) };
    f()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Tensor;

    #[test]
    fn matmuls_run_in_the_chosen_kind_only_inside() {
        let a = Tensor::randn([4, 8], (Kind::Float, Device::Cpu));
        let b = Tensor::randn([8, 2], (Kind::Float, Device::Cpu));
        let inside = autocast(Device::Cpu, Kind::BFloat16, || {
            // Nested regions restore their outer setting.
            let nested = autocast(Device::Cpu, Kind::Half, || a.matmul(&b).kind());
            (nested, a.matmul(&b).kind())
        });
        assert_eq!(inside, (Kind::Half, Kind::BFloat16));
        let off = autocast(Device::Cpu, Kind::BFloat16, || {
            (without_autocast(Device::Cpu, || a.matmul(&b).kind()), a.matmul(&b).kind())
        });
        assert_eq!(off, (Kind::Float, Kind::BFloat16), "off inside, on again after");
        assert_eq!(a.matmul(&b).kind(), Kind::Float, "autocast is off again");
    }
}
