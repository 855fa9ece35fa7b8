// libtorch's fused AdamW (`at::_fused_adamw_`), which tch does not generate: one kernel
// launch per tensor list instead of a dozen element-wise ops per parameter.
#include <ATen/ops/_foreach_add.h>
#include <ATen/ops/_fused_adamw.h>

#include <string>
#include <vector>

static thread_local std::string last_error;

extern "C" {

// The message of the last failed call on this thread.
const char *pg2_fused_adamw_error() { return last_error.c_str(); }

// Updates `n` parameters in place (tch tensors are `at::Tensor *`); returns 0, or 1 with
// the message in pg2_fused_adamw_error(). `steps` are float scalar update counts, advanced
// here as torch.optim does around the kernel. With `found_inf` (an f32 scalar, or null)
// at 1, nothing changes, the counts included.
int pg2_fused_adamw(const at::Tensor *const *params, const at::Tensor *const *grads, const at::Tensor *const *exp_avgs,
                    const at::Tensor *const *exp_avg_sqs, const at::Tensor *const *steps, long n, double lr, double beta1,
                    double beta2, double weight_decay, double eps, const at::Tensor *found_inf) {
  try {
    std::vector<at::Tensor> p, g, m, v, s;
    for (long i = 0; i < n; i++) {
      p.push_back(*params[i]);
      g.push_back(*grads[i]);
      m.push_back(*exp_avgs[i]);
      v.push_back(*exp_avg_sqs[i]);
      s.push_back(*steps[i]);
    }
    std::optional<at::Tensor> inf;
    if (found_inf != nullptr) {
      inf = *found_inf;
    }
    at::_foreach_add_(s, 1);
    at::_fused_adamw_(p, g, m, v, {}, s, lr, beta1, beta2, weight_decay, eps, /*amsgrad=*/false, /*maximize=*/false,
                      /*grad_scale=*/std::nullopt, inf);
    if (inf) {
      at::_foreach_add_(s, *inf, /*alpha=*/-1);  // a skipped update does not count
    }
    return 0;
  } catch (const std::exception &e) {
    last_error = e.what();
    return 1;
  }
}
}
