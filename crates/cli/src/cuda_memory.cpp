// The CUDA caching allocator's peak of allocated bytes (torch.cuda.max_memory_allocated),
// which tch does not expose. Built against the CUDA headers when the bootstrap installed
// them (as the c10d NCCL shim); without them every call says "unknown".
#include <cstdint>

#ifdef PG2_WITH_CUDA_HEADERS
#include <c10/cuda/CUDACachingAllocator.h>

extern "C" {
// Peak bytes allocated on `device` since the last reset, or -1 if unknown.
int64_t pg2_cuda_peak_allocated(int device) {
  try {
    auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(static_cast<c10::DeviceIndex>(device));
    return stats.allocated_bytes[static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE)].peak;
  } catch (const std::exception&) {
    return -1;
  }
}

// Starts a new peak on `device` (torch.cuda.reset_peak_memory_stats).
void pg2_cuda_reset_peak(int device) {
  try {
    c10::cuda::CUDACachingAllocator::resetPeakStats(static_cast<c10::DeviceIndex>(device));
  } catch (const std::exception&) {
  }
}
}
#else
extern "C" {
int64_t pg2_cuda_peak_allocated(int) { return -1; }
void pg2_cuda_reset_peak(int) {}
}
#endif
