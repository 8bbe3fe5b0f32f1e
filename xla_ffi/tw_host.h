// Host-side state of the communicators: per (communicator, device) workspace tables.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "tw_common.h"

namespace tw {

cudaError_t launch_p2p(const Params& p, int dtype, int mode, int ctas, cudaStream_t s);
cudaError_t launch_multimem(const Params& p, int ctas, cudaStream_t s);
cudaError_t launch_empty(int ctas, cudaStream_t s);  // benchmarks: the launch floor
cudaError_t warm_up_kernels();

struct Layout {
  size_t cap = 0, os_cap = 0, os_stride = 0;
  size_t in_off = 0, out_off = 0, os_off = 0, total = 0;
};
Layout make_layout(size_t cap, size_t os_cap, int n);

// State of one rank of one communicator, owned by the device it lives on. XLA calls each local
// device's handler on its own thread: one DeviceState is only touched by its device's thread, and
// the registry is guarded by a mutex.
struct DeviceState {
  int64_t comm_id = 0;
  int ordinal = 0, rank = 0, n = 0;
  Layout layout;
  void* ws[kMaxRanks] = {};
  bool ipc[kMaxRanks] = {};       // ws[r] was opened through CUDA IPC (close it on destroy)
  bool owns_local = false;        // ws[rank] was allocated by us
  int* err_host = nullptr;        // host-mapped error record (5 ints)
  int* err_dev = nullptr;
  uint64_t timeout_ns = 0;
  int ctas = 0;
  size_t oneshot_max = 0;         // auto mode: one-shot when T*D*elt <= this
  // Asynchronous calls (start/done pairs): the kernel runs on `side`, a high-priority stream of
  // our own, so that XLA's stream can run the other half's matmuls meanwhile. ready[s] orders the
  // launch after the inputs (recorded on XLA's stream), finished[s] orders the consumers after the
  // kernel (recorded on `side`). One slot per concurrently pending call (one per token half).
  // pending[s]: a Start of slot s was issued and its Done not yet (host program order, which is
  // the same on every rank). A synchronous call waits for the pending ones first, so that a
  // device never runs two of its communicator's kernels at once, whatever order XLA chose.
  cudaStream_t side = nullptr;
  cudaEvent_t ready[kAsyncSlots] = {};
  cudaEvent_t finished[kAsyncSlots] = {};
  bool pending[kAsyncSlots] = {};
  // Launches made by the handlers (host side). A call that XLA captured into a CUDA graph is
  // launched once, at capture, and then replayed without its handler: this count tells.
  uint64_t host_launches = 0;
  // multimem (NVLS), set only by the opt-in set-up
  void* mc_base = nullptr;
  void* uc_base = nullptr;
  size_t mm_in_off = 0, mm_out_off = 0, mm_cap = 0;
};

DeviceState* find_state(int64_t comm_id, int ordinal, std::string* why);

// Python-facing operations (module.cc wraps them). All throw std::runtime_error with a message.
uintptr_t alloc_workspace(int ordinal, size_t bytes);
void free_workspace(int ordinal, uintptr_t ptr);
std::string ipc_handle(int ordinal, uintptr_t ptr);
uintptr_t ipc_open(int ordinal, const std::string& handle);
void enable_peer_access(const std::vector<int>& ordinals);
void register_rank(int64_t comm_id, int ordinal, int rank, int n, const std::vector<uintptr_t>& ws,
                   const std::vector<bool>& ipc, bool owns_local, size_t cap, size_t os_cap,
                   uint64_t timeout_ns, int ctas, size_t oneshot_max);
void destroy_comm(int64_t comm_id);
std::vector<int> last_error(int64_t comm_id, int ordinal);
uint64_t host_launches(int64_t comm_id, int ordinal);
void set_multimem(int64_t comm_id, int ordinal, uintptr_t mc, uintptr_t uc, size_t in_off, size_t out_off, size_t cap);
std::vector<double> bench_raw(int64_t comm_id, const std::vector<int>& ordinals, int64_t T, int64_t D, int mode, int ctas,
                              int iters, int dbg);

}  // namespace tw
