// Activation checkpointing: a layer whose activations are not kept; the backward pass
// recomputes them (torch.utils.checkpoint's reentrant form). tch has no custom autograd
// functions, so the layer is a Rust closure called back from here, and told when the
// backward pass through it is done (sharded parameters are released then).
#include <ATen/autocast_mode.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/custom_function.h>

#include <string>

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

static thread_local std::string last_error;

namespace {

// The Rust closure: `call` owns the input it is given and returns an output the caller
// owns (null after a panic); `done` follows the backward pass through the re-run; `drop`
// frees the closure with the autograd node.
struct RustLayer : torch::CustomClassHolder {
  void *closure;
  at::Tensor *(*call)(void *, at::Tensor *);
  void (*done)(void *);
  void (*drop)(void *);
  RustLayer(void *c, at::Tensor *(*f)(void *, at::Tensor *), void (*n)(void *), void (*d)(void *))
      : closure(c), call(f), done(n), drop(d) {}
  ~RustLayer() override { drop(closure); }
  at::Tensor run(const at::Tensor &x) {
    at::Tensor *out = call(closure, new at::Tensor(x));
    if (out == nullptr) {
      throw std::runtime_error("the recomputed layer panicked (its message is above)");
    }
    at::Tensor result = *out;
    delete out;
    return result;
  }
};

// Autocast settings of the CPU and CUDA, saved by the forward and restored for the recompute.
const c10::DeviceType kDevices[] = {c10::DeviceType::CPU, c10::DeviceType::CUDA};

struct Recompute : torch::autograd::Function<Recompute> {
  static at::Tensor forward(AutogradContext *ctx, const at::Tensor &input, c10::intrusive_ptr<RustLayer> layer) {
    ctx->save_for_backward({input});
    for (auto device : kDevices) {
      std::string key = c10::DeviceTypeName(device);
      ctx->saved_data[key + ".autocast"] = at::autocast::is_autocast_enabled(device);
      ctx->saved_data[key + ".dtype"] = static_cast<int64_t>(at::autocast::get_autocast_dtype(device));
    }
    at::Tensor output = layer->run(input);
    ctx->saved_data["layer"] = c10::IValue::make_capsule(std::move(layer));
    return output;
  }

  static variable_list backward(AutogradContext *ctx, variable_list grad_outputs) {
    auto layer = c10::static_intrusive_pointer_cast<RustLayer>(ctx->saved_data["layer"].toCapsule());
    at::Tensor saved = ctx->get_saved_variables()[0];
    at::Tensor input = saved.detach().requires_grad_(saved.requires_grad());
    bool was_enabled[2];
    at::ScalarType was_dtype[2];
    for (int i = 0; i < 2; i++) {
      std::string key = c10::DeviceTypeName(kDevices[i]);
      was_enabled[i] = at::autocast::is_autocast_enabled(kDevices[i]);
      was_dtype[i] = at::autocast::get_autocast_dtype(kDevices[i]);
      at::autocast::set_autocast_enabled(kDevices[i], ctx->saved_data[key + ".autocast"].toBool());
      at::autocast::set_autocast_dtype(kDevices[i], static_cast<at::ScalarType>(ctx->saved_data[key + ".dtype"].toInt()));
    }
    at::autocast::increment_nesting();
    at::Tensor output;
    {
      at::AutoGradMode grad(true);
      output = layer->run(input);
    }
    if (at::autocast::decrement_nesting() == 0) {
      at::autocast::clear_cache();
    }
    for (int i = 0; i < 2; i++) {
      at::autocast::set_autocast_enabled(kDevices[i], was_enabled[i]);
      at::autocast::set_autocast_dtype(kDevices[i], was_dtype[i]);
    }
    torch::autograd::backward({output}, {grad_outputs[0]});
    layer->done(layer->closure);
    return {input.requires_grad() ? input.grad() : at::Tensor(), at::Tensor()};
  }
};

}  // namespace

extern "C" {

// The message of the last failed call on this thread.
const char *pg2_recompute_error() { return last_error.c_str(); }

// `layer(input)` through Recompute; a new tensor the caller owns, or null (see
// pg2_recompute_error). Takes ownership of the closure in every case.
at::Tensor *pg2_recompute(const at::Tensor *input, void *closure, at::Tensor *(*call)(void *, at::Tensor *),
                          void (*done)(void *), void (*drop)(void *)) {
  auto layer = c10::make_intrusive<RustLayer>(closure, call, done, drop);
  try {
    return new at::Tensor(Recompute::apply(*input, std::move(layer)));
  } catch (const std::exception &e) {
    last_error = e.what();
    return nullptr;
  }
}
}
