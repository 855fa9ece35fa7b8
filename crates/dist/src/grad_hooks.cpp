// Per-parameter "gradient ready" hooks for overlapping the gradient all-reduce with
// backward, as DDP's reducer does: libtorch calls a post-accumulate-grad hook once the
// engine has added a backward pass's gradient into the parameter's `.grad`.

#include <torch/csrc/autograd/function_hook.h>
#include <torch/csrc/autograd/variable.h>

#include <memory>
#include <string>

namespace {
thread_local std::string last_error;

using Callback = void (*)(void* ctx, size_t index);

struct ReadyHook : torch::autograd::PostAccumulateGradHook {
  Callback callback;
  void* ctx;
  size_t index;
  ReadyHook(Callback callback, void* ctx, size_t index) : callback(callback), ctx(ctx), index(index) {}
  void operator()(const torch::autograd::Variable& /*tensor*/) override { callback(ctx, index); }
};
}  // namespace

extern "C" {

const char* pg2_grad_hooks_error() { return last_error.c_str(); }

// Calls callback(ctx, index) each time backward has accumulated `param`'s gradient (a
// tch tensor is an `at::Tensor *`); replaces the hook set before. Returns 0, or -1 with
// the message in pg2_grad_hooks_error().
int pg2_on_grad_ready(const at::Tensor* param, Callback callback, void* ctx, size_t index) {
  try {
    torch::autograd::impl::set_post_acc_grad_hooks(*param, std::make_unique<ReadyHook>(callback, ctx, index));
    return 0;
  } catch (const std::exception& e) {
    last_error = e.what();
    return -1;
  }
}

// Removes the hook of `param`.
int pg2_clear_grad_ready(const at::Tensor* param) {
  try {
    torch::autograd::impl::set_post_acc_grad_hooks(*param, nullptr);
    return 0;
  } catch (const std::exception& e) {
    last_error = e.what();
    return -1;
  }
}

// Frees `param`'s gradient, as `param.grad = None` does.
void pg2_release_grad(const at::Tensor* param) { param->mutable_grad().reset(); }

}  // extern "C"
