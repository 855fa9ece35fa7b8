//! A frozen base in int8 (`lora.base_dtype = "int8"`, QLoRA's idea with int8 in place of
//! 4-bit NormalFloat): a frozen linear layer's weight stored per output channel as
//! symmetric int8 values with an f32 scale, `W[o] ~ scale[o] * values[o]`, a quarter of
//! its f32 bytes and half its bf16 ones.
//!
//! The product `x W^T` runs through the C++ shim beside this file: libtorch's weight-only
//! int8 matmul (`_weight_int8pack_mm`) for a few rows (decoding) where it has a fast kernel
//! (bf16/f16 on the CPU, any dtype on CUDA), otherwise the layer's weight dequantised to
//! the input's dtype for that one product (training and prefill, and f32 on the CPU, where
//! the kernel is several times slower than dequantising). Gradients flow through to the
//! input (the adapters and the layers below need them) from a backward pass that
//! dequantises the weight again, so no layer's dequantised weight outlives its product.

use std::ffi::{c_char, c_void, CStr};

use tch::{Kind, Tensor};

// The C++ shim beside this file (compiled by build/link_libtorch.rs); tensors cross as
// tch's `at::Tensor *`.
extern "C" {
    fn pg2_int8_linear(x: *const c_void, values: *const c_void, scales: *const c_void) -> *mut c_void;
    fn pg2_int8_error() -> *const c_char;
}

/// A linear layer's frozen weight `(out, in)` in int8 with per-output-channel scales.
pub struct Int8Weight {
    /// `(out, in)` int8, in [-127, 127].
    values: Tensor,
    /// `(out,)` f32.
    scales: Tensor,
}

impl Int8Weight {
    /// Quantises `weight` `(out, in)` (any floating kind) row by row, symmetrically:
    /// `scale = max |w| / 127` (1 for a row of zeros), `values = round(w / scale)`, so each
    /// weight is off by at most half a step, `scale / 2`. On the weight's device.
    pub fn quantize(weight: &Tensor) -> Self {
        tch::no_grad(|| {
            let w = weight.to_kind(Kind::Float);
            let max = w.abs().amax([1], false);
            let scales = (&max / 127.0).where_self(&max.gt(0.0), &max.ones_like());
            let values = (w / scales.unsqueeze(1)).round().clamp(-127.0, 127.0).to_kind(Kind::Int8);
            Int8Weight { values, scales }
        })
    }

    /// `x W^T` for `x` `(..., in)`, in `x`'s kind (or autocast's); differentiable in `x`.
    pub fn linear(&self, x: &Tensor) -> Tensor {
        // SAFETY: the pointers are live tensors; the shim returns a new heap tensor or null.
        let out =
            unsafe { pg2_int8_linear(x.as_ptr().cast(), self.values.as_ptr().cast(), self.scales.as_ptr().cast()) };
        if out.is_null() {
            // SAFETY: a NUL-terminated string owned by the shim's thread-local.
            let message = unsafe { CStr::from_ptr(pg2_int8_error()) };
            panic!("int8 linear layer: {}", message.to_string_lossy());
        }
        // SAFETY: a heap tensor we now own.
        unsafe { Tensor::from_ptr(out.cast()) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    /// The weight as `kind`: `scale * values`, computed in f32 and rounded once (as the shim does).
    fn dequantize(q: &Int8Weight, kind: Kind) -> Tensor {
        (q.values.to_kind(Kind::Float) * q.scales.unsqueeze(1)).to_kind(kind)
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a.to_kind(Kind::Float) - b.to_kind(Kind::Float)).abs().max().double_value(&[])
    }

    /// Each weight within half a quantisation step of the original; zero rows stay zero.
    #[test]
    fn quantized_weights_are_within_half_a_step() {
        tch::manual_seed(1);
        let w = Tensor::randn([24, 40], (Kind::Float, Device::Cpu)) * 0.05;
        let _ = w.get(3).zero_();
        let q = Int8Weight::quantize(&w);
        assert_eq!((q.values.kind(), q.values.size(), q.scales.size()), (Kind::Int8, vec![24, 40], vec![24]));
        let step = w.abs().amax([1], true) / 127.0;
        let err = (dequantize(&q, Kind::Float) - &w).abs();
        assert!(bool::try_from(err.le_tensor(&(step * 0.5 + 1e-9)).all()).unwrap());
        assert_eq!(dequantize(&q, Kind::Float).get(3).abs().sum(Kind::Float).double_value(&[]), 0.0);
    }

    /// One linear layer: the int8 product is that of the dequantised weight (both the
    /// kernel's few rows and the dequantising path's many, f32 and bf16), and within 3 % of
    /// the full-precision weight's largest output; the input's gradient is that of the
    /// dequantised weight.
    #[test]
    fn products_and_gradients_match_the_dequantized_weight() {
        tch::manual_seed(2);
        let w = Tensor::randn([48, 64], (Kind::Float, Device::Cpu)) * 0.05;
        let q = Int8Weight::quantize(&w);
        for kind in [Kind::Float, Kind::BFloat16] {
            // 4 rows: the int8 kernel in bf16; 3 x 20: dequantised.
            for shape in [vec![4, 64], vec![3, 20, 64]] {
                let x =
                    Tensor::randn(shape.as_slice(), (Kind::Float, Device::Cpu)).to_kind(kind).set_requires_grad(true);
                let y = q.linear(&x);
                assert_eq!((y.kind(), y.size().last().copied()), (kind, Some(48)));
                if kind == Kind::BFloat16 && shape.len() == 2 {
                    let kernel = x.internal_weight_int8pack_mm(&q.values, &q.scales.to_kind(kind));
                    assert!(y.equal(&kernel), "few bf16 rows go through libtorch's int8 kernel");
                }
                let dense = x.linear::<&Tensor>(&dequantize(&q, kind), None);
                let full = x.to_kind(Kind::Float).linear::<&Tensor>(&w, None);
                let scale = full.abs().max().double_value(&[]);
                let tol = if kind == Kind::Float { 1e-5 } else { 2e-2 };
                assert!(max_diff(&y, &dense) <= tol * scale, "{kind:?} {shape:?}: {}", max_diff(&y, &dense));
                // Rounding error, random with inputs other tests' draws interleave with: up to
                // about 1 % of the largest output, and more now and then.
                assert!(max_diff(&y, &full) <= 3e-2 * scale, "{kind:?} {shape:?}: {}", max_diff(&y, &full));
                // d/dx of sum(y * g) is g W: the dequantised weight's.
                let g = Tensor::randn(y.size().as_slice(), (Kind::Float, Device::Cpu)).to_kind(kind);
                let loss = (&y * &g).sum(Kind::Float);
                let got = Tensor::run_backward(&[&loss], &[&x], false, false).pop().unwrap();
                let want = g.matmul(&dequantize(&q, kind));
                let gscale = want.abs().max().double_value(&[]);
                assert!(max_diff(&got, &want) <= tol * gscale, "{kind:?} {shape:?}: {}", max_diff(&got, &want));
            }
        }
    }

    /// Under autocast (`model.dtype = "bf16_autocast"`) the product runs in bf16 like any
    /// other, and the f32 input still gets its gradient.
    #[test]
    fn autocast_computes_in_bf16_and_gradients_reach_f32_inputs() {
        let q = Int8Weight::quantize(&(Tensor::randn([8, 16], (Kind::Float, Device::Cpu)) * 0.1));
        let x = Tensor::randn([5, 16], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let y = crate::autocast(Device::Cpu, Kind::BFloat16, || q.linear(&x));
        assert_eq!(y.kind(), Kind::BFloat16);
        let grad = Tensor::run_backward(&[&y.sum(Kind::Float)], &[&x], false, false).pop().unwrap();
        assert_eq!(grad.kind(), Kind::Float);
        let want = dequantize(&q, Kind::Float).sum_dim_intlist([0i64].as_slice(), false, Kind::Float);
        assert!(max_diff(&grad, &want.expand([5, 16], false)) < 0.05 * want.abs().max().double_value(&[]));
    }
}
