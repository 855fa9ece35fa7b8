// libtorch's c10d::ProcessGroupNCCL for pg2's GPU collectives: the backend PyTorch's DDP
// and FSDP run on, with its own NCCL streams synchronised with the caching allocator, its
// asynchronous error handling and its watchdog (a hung collective aborts the group with a
// message instead of hanging the job). Built when the CUDA headers are there (the
// bootstrap installs them with libtorch); otherwise every call says so.
// C ABI: 0 on success, -1 with the message in pg2_nccl_error().

#include <cstdint>
#include <string>

namespace {
thread_local std::string last_error;
}

extern "C" const char* pg2_nccl_error() { return last_error.c_str(); }

#ifdef PG2_WITH_C10D_NCCL

#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#include <chrono>
#include <vector>

namespace {
using Group = c10::intrusive_ptr<c10d::ProcessGroupNCCL>;
using Work = c10::intrusive_ptr<c10d::Work>;

int fail(const std::exception& e) {
  last_error = e.what();
  return -1;
}

int hand_over(Work work, void** out) {
  *out = new Work(std::move(work));
  return 0;
}
}  // namespace

extern "C" {

// The group of `size` ranks over `store` (a pg2_store_new handle); NCCL communicators are
// made lazily, on the first collective of each device.
int pg2_nccl_new(void* store, int rank, int size, int64_t timeout_ms, void** out) {
  try {
    auto opts = c10d::ProcessGroupNCCL::Options::create();
    opts->timeout = std::chrono::milliseconds(timeout_ms);
    auto s = *static_cast<c10::intrusive_ptr<c10d::TCPStore>*>(store);
    *out = new Group(c10::make_intrusive<c10d::ProcessGroupNCCL>(s, rank, size, opts));
    return 0;
  } catch (const std::exception& e) {
    return fail(e);
  }
}

void pg2_nccl_free(void* group) {
  auto* g = static_cast<Group*>(group);
  try {
    (*g)->shutdown();
  } catch (const std::exception&) {
  }
  delete g;
}

int pg2_nccl_all_reduce_sum(void* group, const at::Tensor* tensor, void** work) {
  try {
    std::vector<at::Tensor> tensors{*tensor};
    return hand_over((*static_cast<Group*>(group))->allreduce(tensors), work);
  } catch (const std::exception& e) {
    return fail(e);
  }
}

int pg2_nccl_broadcast(void* group, const at::Tensor* tensor, int root, void** work) {
  try {
    std::vector<at::Tensor> tensors{*tensor};
    c10d::BroadcastOptions opts;
    opts.rootRank = root;
    return hand_over((*static_cast<Group*>(group))->broadcast(tensors, opts), work);
  } catch (const std::exception& e) {
    return fail(e);
  }
}

// `output` (numel / size of `input`) gets this rank's share of the sum of every rank's `input`.
int pg2_nccl_reduce_scatter_sum(void* group, const at::Tensor* output, const at::Tensor* input, void** work) {
  try {
    at::Tensor out = *output, in = *input;
    return hand_over((*static_cast<Group*>(group))->_reduce_scatter_base(out, in), work);
  } catch (const std::exception& e) {
    return fail(e);
  }
}

// `output` (size x numel of `input`) gets every rank's `input`, in rank order.
int pg2_nccl_all_gather(void* group, const at::Tensor* output, const at::Tensor* input, void** work) {
  try {
    at::Tensor out = *output, in = *input;
    return hand_over((*static_cast<Group*>(group))->_allgather_base(out, in), work);
  } catch (const std::exception& e) {
    return fail(e);
  }
}

// Makes the current CUDA stream wait for the collective (the host does not block); a
// collective that failed or that the watchdog aborted is an error here.
int pg2_work_wait(void* work) {
  try {
    (*static_cast<Work*>(work))->wait();
    return 0;
  } catch (const std::exception& e) {
    return fail(e);
  }
}

void pg2_work_free(void* work) { delete static_cast<Work*>(work); }

}  // extern "C"

#else  // no CUDA headers: every entry point says what is missing

namespace {
int missing() {
  last_error =
      "pg2 was built without the CUDA headers ProcessGroupNCCL needs (nvidia-cuda-cccl, nvidia-cuda-crt): rerun "
      "./launch/launch, whose bootstrap installs them under .deps/cuda-headers, and rebuild";
  return -1;
}
}  // namespace

extern "C" {
int pg2_nccl_new(void*, int, int, int64_t, void**) { return missing(); }
void pg2_nccl_free(void*) {}
int pg2_nccl_all_reduce_sum(void*, const void*, void**) { return missing(); }
int pg2_nccl_broadcast(void*, const void*, int, void**) { return missing(); }
int pg2_nccl_reduce_scatter_sum(void*, const void*, const void*, void**) { return missing(); }
int pg2_nccl_all_gather(void*, const void*, const void*, void**) { return missing(); }
int pg2_work_wait(void*) { return missing(); }
void pg2_work_free(void*) {}
}

#endif
