//! Activation checkpointing: [`recompute`] runs a layer without keeping its activations,
//! and the backward pass runs it again to get them, trading about a third more compute for
//! the memory of every layer's intermediate tensors (attention scores included).

use std::ffi::{c_char, c_void, CStr};
use std::panic::{catch_unwind, AssertUnwindSafe};

use tch::Tensor;

/// The layer, and what runs once the backward pass through it is done.
struct Closures {
    layer: Box<dyn Fn(&Tensor) -> Tensor>,
    after_backward: Box<dyn Fn()>,
}

// The C++ shim beside this file (compiled by build/link_libtorch.rs); tensors cross as
// tch's `at::Tensor *`.
extern "C" {
    fn pg2_recompute(
        input: *const c_void,
        closure: *mut c_void,
        call: extern "C" fn(*mut c_void, *mut c_void) -> *mut c_void,
        done: extern "C" fn(*mut c_void),
        drop: extern "C" fn(*mut c_void),
    ) -> *mut c_void;
    fn pg2_recompute_error() -> *const c_char;
}

extern "C" fn call_layer(closure: *mut c_void, input: *mut c_void) -> *mut c_void {
    // SAFETY: `closure` is the `Box<Closures>` handed over in `recompute_then`, alive until
    // `drop_closures`; `input` is a heap tensor this call owns.
    let (closures, input) = unsafe { (&*(closure as *const Closures), Tensor::from_ptr(input.cast())) };
    match catch_unwind(AssertUnwindSafe(|| (closures.layer)(&input))) {
        Ok(mut output) => {
            let ptr = output.as_mut_ptr();
            std::mem::forget(output); // the C++ side takes the tensor
            ptr.cast()
        }
        Err(_) => std::ptr::null_mut(),
    }
}

extern "C" fn backward_done(closure: *mut c_void) {
    // SAFETY: as in `call_layer`.
    let closures = unsafe { &*(closure as *const Closures) };
    // A panic must not unwind into C++; its message is printed, and the hook that panicked
    // (a failed collective) has left the run unable to go on, which the next step reports.
    let _ = catch_unwind(AssertUnwindSafe(|| (closures.after_backward)()));
}

extern "C" fn drop_closures(closure: *mut c_void) {
    // SAFETY: called once, by the autograd node that owns the closure.
    drop(unsafe { Box::from_raw(closure as *mut Closures) });
}

/// `layer(input)`, keeping only `input` for the backward pass, which calls `layer` again
/// (with the autocast settings of this call) and backpropagates through that. `layer` must
/// compute the same thing both times: no dropout (its masks would differ).
pub fn recompute(input: &Tensor, layer: impl Fn(&Tensor) -> Tensor + 'static) -> Tensor {
    recompute_then(input, layer, || {})
}

/// [`recompute`], calling `after_backward` once the backward pass through the re-run is done.
pub fn recompute_then(
    input: &Tensor,
    layer: impl Fn(&Tensor) -> Tensor + 'static,
    after_backward: impl Fn() + 'static,
) -> Tensor {
    let closures = Closures { layer: Box::new(layer), after_backward: Box::new(after_backward) };
    let closure = Box::into_raw(Box::new(closures)) as *mut c_void;
    // SAFETY: the shim owns `closure` from here and frees it through `drop_closures`.
    let output = unsafe { pg2_recompute(input.as_ptr().cast(), closure, call_layer, backward_done, drop_closures) };
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

    #[test]
    fn after_backward_runs_once_the_re_run_has_given_its_gradients() {
        let w = Tensor::randn([4, 4], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let x = Tensor::randn([2, 4], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let seen = std::rc::Rc::new(std::cell::Cell::new(None));
        let (w2, seen2) = (w.shallow_clone(), seen.clone());
        let y = recompute_then(
            &x,
            {
                let w = w.shallow_clone();
                move |h| h.matmul(&w)
            },
            move || seen2.set(Some(w2.grad().defined())),
        );
        assert_eq!(seen.get(), None, "not before backward");
        y.sum(Kind::Float).backward();
        assert_eq!(seen.get(), Some(true), "once, with the layer's gradients in place");
    }
}
