//! Activation checkpointing: [`recompute`] runs a layer without keeping its activations,
//! and the backward pass runs it again to get them, trading about a third more compute for
//! the memory of every layer's intermediate tensors (attention scores included).

use std::ffi::{c_char, c_void, CStr};
use std::panic::{catch_unwind, AssertUnwindSafe};

use tch::Tensor;

type Layer = Box<dyn Fn(&Tensor) -> Tensor>;

// The C++ shim beside this file (compiled by build/link_libtorch.rs); tensors cross as
// tch's `at::Tensor *`.
extern "C" {
    fn pg2_recompute(
        input: *const c_void,
        closure: *mut c_void,
        call: extern "C" fn(*mut c_void, *mut c_void) -> *mut c_void,
        drop: extern "C" fn(*mut c_void),
    ) -> *mut c_void;
    fn pg2_recompute_error() -> *const c_char;
}

extern "C" fn call_layer(closure: *mut c_void, input: *mut c_void) -> *mut c_void {
    // SAFETY: `closure` is the `Box<Layer>` handed over in `recompute`, alive until
    // `drop_layer`; `input` is a heap tensor this call owns.
    let (layer, input) = unsafe { (&*(closure as *const Layer), Tensor::from_ptr(input.cast())) };
    match catch_unwind(AssertUnwindSafe(|| layer(&input))) {
        Ok(mut output) => {
            let ptr = output.as_mut_ptr();
            std::mem::forget(output); // the C++ side takes the tensor
            ptr.cast()
        }
        Err(_) => std::ptr::null_mut(),
    }
}

extern "C" fn drop_layer(closure: *mut c_void) {
    // SAFETY: called once, by the autograd node that owns the closure.
    drop(unsafe { Box::from_raw(closure as *mut Layer) });
}

/// `layer(input)`, keeping only `input` for the backward pass, which calls `layer` again
/// (with the autocast settings of this call) and backpropagates through that. `layer` must
/// compute the same thing both times: no dropout (its masks would differ).
pub fn recompute(input: &Tensor, layer: impl Fn(&Tensor) -> Tensor + 'static) -> Tensor {
    let closure = Box::into_raw(Box::new(Box::new(layer) as Layer)) as *mut c_void;
    // SAFETY: the shim owns `closure` from here and frees it through `drop_layer`.
    let output = unsafe { pg2_recompute(input.as_ptr().cast(), closure, call_layer, drop_layer) };
    if output.is_null() {
        // SAFETY: a NUL-terminated string owned by the shim's thread-local.
        let message = unsafe { CStr::from_ptr(pg2_recompute_error()) };
        panic!("activation checkpointing failed: {}", message.to_string_lossy());
    }
    // SAFETY: a heap tensor we now own.
    unsafe { Tensor::from_ptr(output.cast()) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    #[test]
    fn gradients_equal_those_of_the_kept_activations() {
        let mut w = Tensor::randn([6, 6], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let mut x = Tensor::randn([3, 6], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let layer = |w: Tensor| move |h: &Tensor| (h.matmul(&w).tanh() * 2.0).softmax(-1, Kind::Float);
        layer(w.shallow_clone())(&x).square().sum(Kind::Float).backward();
        let (gw, gx) = (w.grad().copy(), x.grad().copy());
        w.zero_grad();
        x.zero_grad();
        let y = recompute(&x, layer(w.shallow_clone()));
        assert!(y.requires_grad());
        y.square().sum(Kind::Float).backward();
        assert!(w.grad().allclose(&gw, 1e-6, 1e-7, false) && x.grad().allclose(&gx, 1e-6, 1e-7, false));
    }
}
