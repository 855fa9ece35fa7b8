// Weight-only int8 linear layers (a frozen LoRA base, lora.base_dtype = "int8"): y = x W^T
// with W = diag(scales) values, `values` int8 (out, in) and `scales` f32 (out,). The weight
// is frozen, but gradients flow through it to the input (adapters and layers below need
// them): libtorch's _weight_int8pack_mm has no derivative, and a plain product of a
// dequantised weight would keep that weight alive until the backward pass, so this is an
// autograd function that keeps only the int8 values and scales and dequantises again there.
#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>

#include <string>

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

static thread_local std::string last_error;

namespace {

// At most this many rows (decoding: one token per sequence and beam) go through the int8
// kernel; more (training, prefill) are faster as a GEMM with the layer dequantised (CPU:
// 1 152 -> 4 608 in bf16, 3.3 ms against 5.1 at 16 rows, 12.5 against 7.9 at 64).
constexpr int64_t kKernelRows = 16;

at::Tensor dequantized(const at::Tensor &values, const at::Tensor &scales, at::ScalarType kind) {
  return (values.to(at::kFloat) * scales.unsqueeze(1)).to(kind);
}

// Whether _weight_int8pack_mm computes `x`: few rows, on CUDA (its kernel computes in f32)
// or in bf16/f16 on the CPU (whose f32 kernel is 4-30x slower than dequantising).
bool kernel_computes(const at::Tensor &x, int64_t rows) {
  auto kind = x.scalar_type();
  bool cpu_kernel = x.is_cpu() && (kind == at::kBFloat16 || kind == at::kHalf);
  return rows <= kKernelRows && (x.is_cuda() || cpu_kernel);
}

at::Tensor product(const at::Tensor &x, const at::Tensor &values, const at::Tensor &scales) {
  int64_t in = values.size(1), out = values.size(0);
  int64_t rows = in == 0 ? 0 : x.numel() / in;
  if (!kernel_computes(x, rows)) {
    return at::linear(x, dequantized(values, scales, x.scalar_type()));
  }
  // The CPU kernel wants x and scales of one kind; the CUDA one computes in f32.
  auto kind = x.is_cuda() ? at::kFloat : x.scalar_type();
  at::Tensor y = at::_weight_int8pack_mm(x.reshape({rows, in}).to(kind).contiguous(), values, scales.to(kind));
  auto shape = x.sizes().vec();
  shape.back() = out;
  return y.to(x.scalar_type()).view(shape);
}

struct Int8Linear : torch::autograd::Function<Int8Linear> {
  static at::Tensor forward(AutogradContext *ctx, const at::Tensor &x, const at::Tensor &values,
                            const at::Tensor &scales) {
    ctx->save_for_backward({values, scales});
    return product(x, values, scales);
  }

  static variable_list backward(AutogradContext *ctx, variable_list grad_outputs) {
    auto saved = ctx->get_saved_variables();
    at::Tensor grad = grad_outputs[0], grad_x;
    if (ctx->needs_input_grad(0)) {
      grad_x = grad.matmul(dequantized(saved[0], saved[1], grad.scalar_type()));
    }
    return {grad_x, at::Tensor(), at::Tensor()};
  }
};

}  // namespace

extern "C" {

// The message of the last failed call on this thread.
const char *pg2_int8_error() { return last_error.c_str(); }

// `x W^T` through Int8Linear: a new tensor the caller owns, or null (see pg2_int8_error).
at::Tensor *pg2_int8_linear(const at::Tensor *x, const at::Tensor *values, const at::Tensor *scales) {
  try {
    return new at::Tensor(Int8Linear::apply(*x, *values, *scales));
  } catch (const std::exception &e) {
    last_error = e.what();
    return nullptr;
  }
}
}
