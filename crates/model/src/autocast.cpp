// Autocast in a chosen dtype. tch turns CUDA autocast on and off but cannot set its dtype,
// and libtorch's CUDA default is fp16; PaliGemma trains in bf16.
#include <ATen/autocast_mode.h>

extern "C" {

// Turns autocast on (or, with `enabled` false, off) for `device_type` (a c10::DeviceType:
// 0 CPU, 1 CUDA) computing in `dtype` (a c10::ScalarType), and returns the previous setting
// for pg2_autocast_exit.
void pg2_autocast_enter(int device_type, bool enabled, int dtype, bool *was_enabled, int *was_dtype) noexcept {
  auto device = static_cast<c10::DeviceType>(device_type);
  *was_enabled = at::autocast::is_autocast_enabled(device);
  *was_dtype = static_cast<int>(at::autocast::get_autocast_dtype(device));
  at::autocast::set_autocast_enabled(device, enabled);
  at::autocast::set_autocast_dtype(device, static_cast<c10::ScalarType>(dtype));
  at::autocast::increment_nesting();
}

// Restores the setting pg2_autocast_enter returned; the outermost exit drops the cast cache.
void pg2_autocast_exit(int device_type, bool was_enabled, int was_dtype) noexcept {
  auto device = static_cast<c10::DeviceType>(device_type);
  if (at::autocast::decrement_nesting() == 0) {
    at::autocast::clear_cache();
  }
  at::autocast::set_autocast_enabled(device, was_enabled);
  at::autocast::set_autocast_dtype(device, static_cast<c10::ScalarType>(was_dtype));
}
}
