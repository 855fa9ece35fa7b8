// libtorch's c10d::TCPStore for pg2's rendezvous: the store torchrun's agent and
// torch.distributed's env:// rendezvous host, so pg2's workers can join theirs (and
// theirs ours). C ABI: every call returns 0 on success, 1 on a timeout, -1 on another
// error, with the message in pg2_c10d_error().

#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#include <chrono>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <string>
#include <vector>

namespace {
thread_local std::string last_error;

int fail(const std::exception& e) {
  last_error = e.what();
  return -1;
}
}  // namespace

extern "C" {

const char* pg2_c10d_error() { return last_error.c_str(); }

// Connects to (or, with is_server, hosts and connects to) the store at host:port; a
// client retries until timeout_ms. Port 0 with is_server picks a free port.
int pg2_store_new(const char* host, uint16_t port, bool is_server, int64_t timeout_ms, void** out) {
  try {
    c10d::TCPStoreOptions opts;
    opts.port = port;
    opts.isServer = is_server;
    opts.waitWorkers = false;
    opts.timeout = std::chrono::milliseconds(timeout_ms);
    auto store = c10::make_intrusive<c10d::TCPStore>(std::string(host), opts);
    if (is_server) {
      // The server lives as long as the process (as torch's does in rank 0), so a rank
      // still finishing its last barrier never loses it when rank 0's group is dropped.
      static auto* hosted = new std::vector<c10::intrusive_ptr<c10d::TCPStore>>();
      static std::mutex lock;
      std::lock_guard<std::mutex> guard(lock);
      hosted->push_back(store);
    }
    *out = new c10::intrusive_ptr<c10d::TCPStore>(store);
    return 0;
  } catch (const c10::DistNetworkError& e) {
    // A client that found no server in time; a server that could not listen (port in use).
    last_error = e.what();
    return is_server ? -1 : 1;
  } catch (const std::exception& e) {
    return fail(e);
  }
}

void pg2_store_free(void* store) { delete static_cast<c10::intrusive_ptr<c10d::TCPStore>*>(store); }

uint16_t pg2_store_port(void* store) { return (*static_cast<c10::intrusive_ptr<c10d::TCPStore>*>(store))->getPort(); }

int pg2_store_set(void* store, const char* key, const uint8_t* data, size_t len) {
  try {
    (*static_cast<c10::intrusive_ptr<c10d::TCPStore>*>(store))->set(key, std::vector<uint8_t>(data, data + len));
    return 0;
  } catch (const std::exception& e) {
    return fail(e);
  }
}

// Waits up to timeout_ms for key to be set, then hands its value over in a buffer that
// pg2_buffer_free releases.
int pg2_store_get(void* store, const char* key, int64_t timeout_ms, uint8_t** data, size_t* len) {
  auto& s = *static_cast<c10::intrusive_ptr<c10d::TCPStore>*>(store);
  try {
    s->wait({std::string(key)}, std::chrono::milliseconds(timeout_ms));
  } catch (const c10::DistStoreError& e) {
    last_error = e.what();
    return 1;
  } catch (const std::exception& e) {
    return fail(e);
  }
  try {
    std::vector<uint8_t> value = s->get(key);
    *len = value.size();
    *data = static_cast<uint8_t*>(std::malloc(value.size() > 0 ? value.size() : 1));
    if (*data == nullptr) throw std::bad_alloc();
    std::memcpy(*data, value.data(), value.size());
    return 0;
  } catch (const std::exception& e) {
    return fail(e);
  }
}

void pg2_buffer_free(uint8_t* data) { std::free(data); }

int pg2_store_delete(void* store, const char* key) {
  try {
    (*static_cast<c10::intrusive_ptr<c10d::TCPStore>*>(store))->deleteKey(key);
    return 0;
  } catch (const std::exception& e) {
    return fail(e);
  }
}

}  // extern "C"
