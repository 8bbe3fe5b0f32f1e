// Communicator registry, workspace management and the XLA FFI handlers.
#include "tw_host.h"

#include <cstring>
#include <map>
#include <mutex>
#include <stdexcept>
#include <utility>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace tw {
namespace {

std::mutex g_mu;
std::map<std::pair<int64_t, int>, std::unique_ptr<DeviceState>> g_states;

size_t align_up(size_t x, size_t a) { return (x + a - 1) / a * a; }

void check(cudaError_t e, const std::string& what) {
  if (e != cudaSuccess) throw std::runtime_error("jax_tokenweave: " + what + ": " + cudaGetErrorString(e));
}

struct DeviceGuard {
  int prev = 0;
  explicit DeviceGuard(int d) { cudaGetDevice(&prev); check(cudaSetDevice(d), "cudaSetDevice(" + std::to_string(d) + ")"); }
  ~DeviceGuard() { cudaSetDevice(prev); }
};

}  // namespace

Layout make_layout(size_t cap, size_t os_cap, int n) {
  Layout l;
  l.cap = align_up(cap, 256);
  l.os_cap = os_cap;
  // A one-shot slot holds T rows of partial and R = ceil(T/N) rows of residual; one extra 32 KiB
  // row covers the rounding of R (rows are at most 16384 bf16 elements).
  l.os_stride = align_up(os_cap + os_cap / n + 32768, 256);
  l.in_off = kSyncBytes;
  l.out_off = l.in_off + l.cap;
  l.os_off = l.out_off + align_up(l.cap / n + 32768, 256);
  l.total = l.os_off + 2 * size_t(n) * l.os_stride;
  return l;
}

DeviceState* find_state(int64_t comm_id, int ordinal, std::string* why) {
  std::lock_guard<std::mutex> lk(g_mu);
  auto it = g_states.find({comm_id, ordinal});
  if (it != g_states.end()) return it->second.get();
  // Under jax.distributed with one device per process the ordinal may be renumbered: accept the
  // only rank this process holds for the communicator.
  DeviceState* only = nullptr; int count = 0; std::string have;
  for (auto& kv : g_states) {
    if (kv.first.first != comm_id) continue;
    only = kv.second.get(); ++count;
    have += (have.empty() ? "" : ", ") + std::to_string(kv.first.second);
  }
  if (count == 1) return only;
  if (why) {
    *why = "communicator " + std::to_string(comm_id) + " has no rank on device ordinal " + std::to_string(ordinal) +
           (count ? " (it was built for device ordinals [" + have + "]); build a Communicator for this mesh"
                  : " (unknown or closed communicator); create jax_tokenweave.Communicator(mesh, axis) outside jit");
  }
  return nullptr;
}

uintptr_t alloc_workspace(int ordinal, size_t bytes) {
  DeviceGuard g(ordinal);
  void* p = nullptr;
  check(cudaMalloc(&p, bytes), "cudaMalloc of a " + std::to_string(bytes) + "-byte workspace on device " + std::to_string(ordinal));
  // Flags and the call counter start at 0; make the zeroes visible before any peer can see
  // the pointer (the caller publishes it only after this returns).
  check(cudaMemset(p, 0, bytes), "cudaMemset");
  check(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
  return reinterpret_cast<uintptr_t>(p);
}

void free_workspace(int ordinal, uintptr_t ptr) {
  DeviceGuard g(ordinal);
  cudaFree(reinterpret_cast<void*>(ptr));
}

std::string ipc_handle(int ordinal, uintptr_t ptr) {
  DeviceGuard g(ordinal);
  cudaIpcMemHandle_t h;
  check(cudaIpcGetMemHandle(&h, reinterpret_cast<void*>(ptr)), "cudaIpcGetMemHandle");
  return std::string(reinterpret_cast<const char*>(&h), sizeof(h));
}

uintptr_t ipc_open(int ordinal, const std::string& handle) {
  if (handle.size() != sizeof(cudaIpcMemHandle_t)) throw std::runtime_error("jax_tokenweave: malformed CUDA IPC handle");
  DeviceGuard g(ordinal);
  cudaIpcMemHandle_t h;
  std::memcpy(&h, handle.data(), sizeof(h));
  void* p = nullptr;
  check(cudaIpcOpenMemHandle(&p, h, cudaIpcMemLazyEnablePeerAccess),
        "cudaIpcOpenMemHandle on device " + std::to_string(ordinal) + " (is peer access possible between these GPUs?)");
  return reinterpret_cast<uintptr_t>(p);
}

void enable_peer_access(const std::vector<int>& ordinals) {
  for (int a : ordinals) {
    for (int b : ordinals) {
      if (a == b) continue;
      int ok = 0;
      check(cudaDeviceCanAccessPeer(&ok, a, b), "cudaDeviceCanAccessPeer");
      if (!ok)
        throw std::runtime_error("jax_tokenweave: GPU " + std::to_string(a) + " cannot access GPU " + std::to_string(b) +
                                 " peer-to-peer (no NVLink / P2P path); the p2p transport needs peer access between "
                                 "every pair of the axis. Use impl='xla'.");
      DeviceGuard g(a);
      cudaError_t e = cudaDeviceEnablePeerAccess(b, 0);
      if (e == cudaErrorPeerAccessAlreadyEnabled) { cudaGetLastError(); continue; }
      check(e, "cudaDeviceEnablePeerAccess(" + std::to_string(a) + " -> " + std::to_string(b) + ")");
    }
  }
}

void register_rank(int64_t comm_id, int ordinal, int rank, int n, const std::vector<uintptr_t>& ws,
                   const std::vector<bool>& ipc, bool owns_local, size_t cap, size_t os_cap,
                   uint64_t timeout_ns, int ctas, size_t oneshot_max) {
  if (n < 1 || n > kMaxRanks) throw std::runtime_error("jax_tokenweave: " + std::to_string(n) + " ranks; at most " + std::to_string(kMaxRanks) + " are supported");
  if (int(ws.size()) != n || int(ipc.size()) != n) throw std::runtime_error("jax_tokenweave: register_rank needs one workspace per rank");
  if (ctas < 1 || ctas > kMaxBlocks) throw std::runtime_error("jax_tokenweave: ctas must be in [1, " + std::to_string(kMaxBlocks) + "]");
  auto st = std::make_unique<DeviceState>();
  st->comm_id = comm_id; st->ordinal = ordinal; st->rank = rank; st->n = n;
  st->layout = make_layout(cap, os_cap, n);
  for (int r = 0; r < n; ++r) { st->ws[r] = reinterpret_cast<void*>(ws[r]); st->ipc[r] = ipc[r]; }
  st->owns_local = owns_local;
  st->timeout_ns = timeout_ns; st->ctas = ctas; st->oneshot_max = oneshot_max;
  {
    DeviceGuard g(ordinal);
    check(cudaHostAlloc(&st->err_host, 8 * sizeof(int), cudaHostAllocMapped | cudaHostAllocPortable), "cudaHostAlloc");
    std::memset(st->err_host, 0, 8 * sizeof(int));
    check(cudaHostGetDevicePointer(reinterpret_cast<void**>(&st->err_dev), st->err_host, 0), "cudaHostGetDevicePointer");
    check(warm_up_kernels(), "loading the kernels on device " + std::to_string(ordinal));
    // Highest priority: when a matmul on XLA's stream retires CTAs, the waiting collective gets
    // the freed SMs first (its peers are spinning on it).
    int lo = 0, hi = 0;
    check(cudaDeviceGetStreamPriorityRange(&lo, &hi), "cudaDeviceGetStreamPriorityRange");
    check(cudaStreamCreateWithPriority(&st->side, cudaStreamNonBlocking, hi), "cudaStreamCreateWithPriority");
    for (int k = 0; k < kAsyncSlots; ++k) {
      check(cudaEventCreateWithFlags(&st->ready[k], cudaEventDisableTiming), "cudaEventCreate");
      check(cudaEventCreateWithFlags(&st->finished[k], cudaEventDisableTiming), "cudaEventCreate");
    }
  }
  std::lock_guard<std::mutex> lk(g_mu);
  g_states[{comm_id, ordinal}] = std::move(st);
}

void destroy_comm(int64_t comm_id) {
  std::vector<std::unique_ptr<DeviceState>> dead;
  {
    std::lock_guard<std::mutex> lk(g_mu);
    for (auto it = g_states.begin(); it != g_states.end();) {
      if (it->first.first == comm_id) { dead.push_back(std::move(it->second)); it = g_states.erase(it); }
      else ++it;
    }
  }
  for (auto& st : dead) {
    DeviceGuard g(st->ordinal);
    cudaDeviceSynchronize();
    for (int r = 0; r < st->n; ++r) if (st->ipc[r]) cudaIpcCloseMemHandle(st->ws[r]);
    if (st->owns_local) cudaFree(st->ws[st->rank]);
    if (st->err_host) cudaFreeHost(st->err_host);
    for (int k = 0; k < kAsyncSlots; ++k) {
      if (st->ready[k]) cudaEventDestroy(st->ready[k]);
      if (st->finished[k]) cudaEventDestroy(st->finished[k]);
    }
    if (st->side) cudaStreamDestroy(st->side);
  }
}

std::vector<int> last_error(int64_t comm_id, int ordinal) {
  DeviceState* st = find_state(comm_id, ordinal, nullptr);
  if (!st) return {};
  volatile int* e = st->err_host;
  return {e[0], e[1], e[2], e[3], e[4]};
}

uint64_t host_launches(int64_t comm_id, int ordinal) {
  DeviceState* st = find_state(comm_id, ordinal, nullptr);
  return st ? st->host_launches : 0;
}

void set_multimem(int64_t comm_id, int ordinal, uintptr_t mc, uintptr_t uc, size_t in_off, size_t out_off, size_t cap) {
  std::string why;
  DeviceState* st = find_state(comm_id, ordinal, &why);
  if (!st) throw std::runtime_error("jax_tokenweave: " + why);
  st->mc_base = reinterpret_cast<void*>(mc); st->uc_base = reinterpret_cast<void*>(uc);
  st->mm_in_off = in_off; st->mm_out_off = out_off; st->mm_cap = cap;
}

// ------------------------------------------------------------------------------------------------
// FFI handler: (partial [T,D], residual [R,D], gamma f32 [D]) -> (normed [T,D], residual_out [R,D])

static int dtype_code(ffi::DataType t) {
  switch (t) {
    case ffi::DataType::BF16: return kBF16;
    case ffi::DataType::F16: return kF16;
    case ffi::DataType::F32: return kF32;
    default: return -1;
  }
}

// The communicator's part of a launch's parameters (peers, workspace layout, error record); the
// call's buffers and shapes are the caller's.
static void set_rank_params(const DeviceState& st, Params& p) {
  p.N = st.n; p.rank = st.rank; p.timeout_ns = st.timeout_ns; p.err = st.err_dev;
  for (int r = 0; r < st.n; ++r) p.ws[r] = st.ws[r];
  p.in_off = st.layout.in_off; p.out_off = st.layout.out_off; p.os_off = st.layout.os_off;
  p.os_stride = st.layout.os_stride;
}

// Everything a launch needs, checked and resolved on the host (the same for the synchronous call
// and the start of an asynchronous one).
struct Launch {
  DeviceState* st = nullptr;
  Params p{};
  int dtype = 0, mode = 0, grid = 0, transport = 0;
};

static ffi::Error Prepare(int32_t ordinal, ffi::AnyBuffer partial, ffi::AnyBuffer residual, ffi::Buffer<ffi::F32> gamma,
                          ffi::AnyBuffer normed, ffi::AnyBuffer residual_out, int64_t comm_id, float eps, int64_t ctas,
                          int64_t mode, int64_t num_ranks, int64_t transport, Launch* L) {
  std::string why;
  DeviceState* st = find_state(comm_id, ordinal, &why);
  if (!st) return ffi::Error::InvalidArgument("jax_tokenweave: " + why);
  if (st->err_host[0]) {
    return ffi::Error::Internal("jax_tokenweave: an earlier call of communicator " + std::to_string(comm_id) +
                                " timed out: rank " + std::to_string(st->err_host[1]) + " waited for rank " +
                                std::to_string(st->err_host[2]) + " (call " + std::to_string(st->err_host[3]) + ")");
  }
  if (num_ranks != st->n)
    return ffi::Error::InvalidArgument("jax_tokenweave: the mesh axis has " + std::to_string(num_ranks) +
                                       " devices but the communicator was built for " + std::to_string(st->n));
  auto pd = partial.dimensions();
  auto rd = residual.dimensions();
  if (pd.size() != 2 || rd.size() != 2) return ffi::Error::InvalidArgument("jax_tokenweave: partial/residual must be 2-D");
  const int dt = dtype_code(partial.element_type());
  if (dt < 0 || partial.element_type() != residual.element_type())
    return ffi::Error::InvalidArgument("jax_tokenweave: partial and residual must both be bf16, f16 or f32");
  Params& p = L->p;
  p = Params{};
  p.T = pd[0]; p.D = pd[1]; p.R = rd[0];
  const int elt = dt == kF32 ? 4 : 2;
  if (p.D % 8 != 0 || p.D / (16 / elt) > int64_t(kMaxVecPerThread) * kThreads)
    return ffi::Error::InvalidArgument("jax_tokenweave: hidden size " + std::to_string(p.D) + " must be a multiple of 8 and at most " +
                                       std::to_string(kMaxVecPerThread * kThreads * 16 / elt));
  if (p.R != (p.T + st->n - 1) / st->n || rd[1] != p.D)
    return ffi::Error::InvalidArgument("jax_tokenweave: residual must be [ceil(T/N), D]");
  const size_t msg = size_t(st->n) * p.R * p.D * elt;
  set_rank_params(*st, p);
  p.eps = eps;
  p.partial = partial.untyped_data(); p.residual = residual.untyped_data(); p.gamma = gamma.typed_data();
  p.normed = normed.untyped_data(); p.residual_out = residual_out.untyped_data();
  const int g = int(ctas > 0 ? ctas : st->ctas);
  if (g < 1 || g > kMaxBlocks) return ffi::Error::InvalidArgument("jax_tokenweave: ctas out of range");
  L->st = st; L->dtype = dt; L->grid = g; L->transport = int(transport);

  if (transport == 1) {
    if (!st->mc_base) return ffi::Error::InvalidArgument("jax_tokenweave: impl='multimem' needs a Communicator built with transport='multimem'");
    if (dt != kBF16) return ffi::Error::InvalidArgument("jax_tokenweave: the multimem transport supports bfloat16 only");
    if (msg > st->mm_cap) return ffi::Error::InvalidArgument("jax_tokenweave: message larger than the multicast region");
    p.mc_base = st->mc_base; p.uc_base = st->uc_base; p.in_off = st->mm_in_off; p.out_off = st->mm_out_off;
  } else {
    if (msg > st->layout.cap)
      return ffi::Error::InvalidArgument("jax_tokenweave: message of " + std::to_string(msg) + " bytes exceeds the communicator's " +
                                         std::to_string(st->layout.cap) + "-byte workspace; build it with a larger max_bytes");
    const size_t os_need = size_t(p.T + p.R) * p.D * elt;
    const bool os_fits = os_need <= st->layout.os_stride;
    int m = int(mode);
    if (m == kModeAuto) m = (os_fits && size_t(p.T) * p.D * elt <= st->oneshot_max) ? kModeOneShot : kModeTwoShot;
    if (m == kModeOneShot && !os_fits)
      return ffi::Error::InvalidArgument("jax_tokenweave: message too large for the one-shot region (raise oneshot_max_bytes)");
    L->mode = m;
  }
  return ffi::Error::Success();
}

static ffi::Error Enqueue(const Launch& L, cudaStream_t stream) {
  ++L.st->host_launches;
  const cudaError_t e = L.transport == 1 ? launch_multimem(L.p, L.grid, stream)
                                         : launch_p2p(L.p, L.dtype, L.mode, L.grid, stream);
  if (e != cudaSuccess) return ffi::Error::Internal(std::string("jax_tokenweave: kernel launch failed: ") + cudaGetErrorString(e));
  return ffi::Error::Success();
}

// Synchronous: the kernel runs on XLA's stream.
static ffi::Error FusedImpl(cudaStream_t stream, int32_t ordinal, ffi::AnyBuffer partial, ffi::AnyBuffer residual,
                            ffi::Buffer<ffi::F32> gamma, ffi::Result<ffi::AnyBuffer> normed,
                            ffi::Result<ffi::AnyBuffer> residual_out, int64_t comm_id, float eps, int64_t ctas,
                            int64_t mode, int64_t num_ranks, int64_t transport) {
  Launch L;
  ffi::Error err = Prepare(ordinal, partial, residual, gamma, *normed, *residual_out, comm_id, eps, ctas, mode,
                           num_ranks, transport, &L);
  if (err.failure()) return err;
  for (int k = 0; k < kAsyncSlots; ++k) {
    if (!L.st->pending[k]) continue;
    // Inside XLA's command buffers this launch is captured once and replayed; the wait becomes an
    // external-event node, which at each replay waits for the latest record (the pending Start of
    // this execution: a program issues its calls in the same order every time).
    cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
    if (cudaStreamIsCapturing(stream, &capture) != cudaSuccess) capture = cudaStreamCaptureStatusNone;
    const unsigned wait_flags = capture == cudaStreamCaptureStatusActive ? cudaEventWaitExternal : cudaEventWaitDefault;
    const cudaError_t e = cudaStreamWaitEvent(stream, L.st->finished[k], wait_flags);
    if (e != cudaSuccess) return ffi::Error::Internal(std::string("jax_tokenweave: cudaStreamWaitEvent: ") + cudaGetErrorString(e));
  }
  return Enqueue(L, stream);
}

static ffi::Error CheckSlot(int64_t slot) {
  if (slot < 0 || slot >= kAsyncSlots)
    return ffi::Error::InvalidArgument("jax_tokenweave: async slot " + std::to_string(slot) + " out of [0, " +
                                       std::to_string(kAsyncSlots) + ")");
  return ffi::Error::Success();
}

// Start of an asynchronous call: the kernel goes to the communicator's side stream, after
// everything XLA has queued so far (which produced partial and residual). XLA's stream does not
// wait; the matching Done makes it wait. The buffers the kernel reads (partial, gamma) are passed
// to Done as well, so XLA keeps them alive, unreused, until then; the buffers it writes are
// Start's results, which only Done consumes.
static ffi::Error FusedStartImpl(cudaStream_t stream, int32_t ordinal, ffi::AnyBuffer partial, ffi::AnyBuffer residual,
                                 ffi::Buffer<ffi::F32> gamma, ffi::Result<ffi::AnyBuffer> normed,
                                 ffi::Result<ffi::AnyBuffer> residual_out, int64_t comm_id, float eps, int64_t ctas,
                                 int64_t mode, int64_t num_ranks, int64_t transport, int64_t slot) {
  ffi::Error err = CheckSlot(slot);
  if (err.failure()) return err;
  Launch L;
  err = Prepare(ordinal, partial, residual, gamma, *normed, *residual_out, comm_id, eps, ctas, mode, num_ranks,
                transport, &L);
  if (err.failure()) return err;
  DeviceState* st = L.st;
  cudaError_t e = cudaEventRecord(st->ready[slot], stream);
  if (e == cudaSuccess) e = cudaStreamWaitEvent(st->side, st->ready[slot], 0);
  if (e != cudaSuccess) return ffi::Error::Internal(std::string("jax_tokenweave: ordering the side stream: ") + cudaGetErrorString(e));
  err = Enqueue(L, st->side);
  if (err.failure()) return err;
  // Waiting on a later record of the same slot is still correct (the side stream is in order).
  e = cudaEventRecord(st->finished[slot], st->side);
  if (e != cudaSuccess) return ffi::Error::Internal(std::string("jax_tokenweave: cudaEventRecord: ") + cudaGetErrorString(e));
  st->pending[slot] = true;
  return ffi::Error::Success();
}

// Done: XLA's stream waits for the kernel of the same slot. Results alias the first two operands
// (Start's results); the rest are only kept alive.
static ffi::Error FusedDoneImpl(cudaStream_t stream, int32_t ordinal, ffi::AnyBuffer normed_in, ffi::AnyBuffer residual_in,
                                ffi::RemainingArgs keep_alive, ffi::Result<ffi::AnyBuffer> normed,
                                ffi::Result<ffi::AnyBuffer> residual_out, int64_t comm_id, int64_t slot) {
  (void)keep_alive;
  ffi::Error err = CheckSlot(slot);
  if (err.failure()) return err;
  std::string why;
  DeviceState* st = find_state(comm_id, ordinal, &why);
  if (!st) return ffi::Error::InvalidArgument("jax_tokenweave: " + why);
  cudaError_t e = cudaStreamWaitEvent(stream, st->finished[slot], 0);
  st->pending[slot] = false;
  // Aliasing makes these the same buffers; if XLA ever gave us copies, copy after the wait.
  if (e == cudaSuccess && normed->untyped_data() != normed_in.untyped_data())
    e = cudaMemcpyAsync(normed->untyped_data(), normed_in.untyped_data(), normed_in.size_bytes(), cudaMemcpyDeviceToDevice, stream);
  if (e == cudaSuccess && residual_out->untyped_data() != residual_in.untyped_data())
    e = cudaMemcpyAsync(residual_out->untyped_data(), residual_in.untyped_data(), residual_in.size_bytes(), cudaMemcpyDeviceToDevice, stream);
  if (e != cudaSuccess) return ffi::Error::Internal(std::string("jax_tokenweave: waiting for the collective: ") + cudaGetErrorString(e));
  return ffi::Error::Success();
}

}  // namespace tw

namespace {
// The synchronous call and Start take the same operands, results and attributes (Start adds a slot).
auto FusedBinding() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::PlatformStream<cudaStream_t>>()
      .Ctx<ffi::DeviceOrdinal>()
      .Arg<ffi::AnyBuffer>()          // partial
      .Arg<ffi::AnyBuffer>()          // residual
      .Arg<ffi::Buffer<ffi::F32>>()   // gamma (fp32)
      .Ret<ffi::AnyBuffer>()          // normed (Start: valid after Done)
      .Ret<ffi::AnyBuffer>()          // residual_out (Start: valid after Done)
      .Attr<int64_t>("comm_id")
      .Attr<float>("eps")
      .Attr<int64_t>("ctas")
      .Attr<int64_t>("mode")
      .Attr<int64_t>("num_ranks")
      .Attr<int64_t>("transport");
}
}  // namespace

// The synchronous call may be captured into XLA's command buffers (CUDA graphs): its barrier
// values come from the device-side call counter, and everything else it launches with is fixed
// for given buffers (XLA re-captures when those change). Start/Done are not: they order a stream
// of our own with events, which a capture of XLA's stream cannot hold.
XLA_FFI_DEFINE_HANDLER_SYMBOL(TwFusedAllReduceRMSNorm, tw::FusedImpl, FusedBinding(),
                              {xla::ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(TwFusedStart, tw::FusedStartImpl, FusedBinding().Attr<int64_t>("slot"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(TwFusedDone, tw::FusedDoneImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Ctx<ffi::DeviceOrdinal>()
                                  .Arg<ffi::AnyBuffer>()          // Start's normed
                                  .Arg<ffi::AnyBuffer>()          // Start's residual_out
                                  .RemainingArgs()                // buffers to keep alive until here
                                  .Ret<ffi::AnyBuffer>()          // normed (aliases arg 0)
                                  .Ret<ffi::AnyBuffer>()          // residual_out (aliases arg 1)
                                  .Attr<int64_t>("comm_id")
                                  .Attr<int64_t>("slot"));

namespace tw {
// Benchmark helper, no XLA: captures `iters` launches of the p2p kernel into one CUDA graph per
// local device of a communicator, replays them, and returns the mean time per call on each device
// (CUDA events around a replay). The graph keeps the host out of the timing: back-to-back
// dependent kernels, as in a decode step that XLA replays from its command buffers. mode < 0
// times an empty kernel of `ctas` blocks instead (the floor: launch gap between dependent
// kernels). Inputs are uninitialised-but-finite patterns.
std::vector<double> bench_raw(int64_t comm_id, const std::vector<int>& ordinals, int64_t T, int64_t D, int mode, int ctas,
                              int iters, int dbg) {
  const int n = int(ordinals.size());
  std::vector<DeviceState*> sts(n);
  std::vector<cudaStream_t> streams(n);
  std::vector<cudaEvent_t> e0(n), e1(n);
  std::vector<Params> ps(n);
  std::vector<void*> bufs;
  for (int i = 0; i < n; ++i) {
    std::string why;
    sts[i] = find_state(comm_id, ordinals[i], &why);
    if (!sts[i]) throw std::runtime_error(why);
    DeviceState* st = sts[i];
    DeviceGuard g(ordinals[i]);
    check(cudaStreamCreateWithFlags(&streams[i], cudaStreamNonBlocking), "stream");
    cudaEventCreate(&e0[i]); cudaEventCreate(&e1[i]);
    const int64_t R = (T + st->n - 1) / st->n;
    void *a, *b, *c, *gm;
    check(cudaMalloc(&a, T * D * 2), "malloc"); check(cudaMalloc(&b, R * D * 2), "malloc");
    check(cudaMalloc(&c, T * D * 2), "malloc"); check(cudaMalloc(&gm, D * 4), "malloc");
    cudaMemset(a, 0x3c, T * D * 2); cudaMemset(b, 0x3c, R * D * 2); cudaMemset(gm, 0, D * 4);
    bufs.insert(bufs.end(), {a, b, c, gm});
    Params& p = ps[i];
    p = Params{};
    set_rank_params(*st, p);
    p.partial = a; p.residual = b; p.gamma = static_cast<float*>(gm); p.normed = c; p.residual_out = b;
    p.T = T; p.D = D; p.R = R; p.eps = 1e-5f;
    p.dbg = dbg;
    check(cudaDeviceSynchronize(), "sync");
  }
  std::vector<cudaGraphExec_t> graphs(n);
  for (int i = 0; i < n; ++i) {
    DeviceGuard g(ordinals[i]);
    check(cudaStreamBeginCapture(streams[i], cudaStreamCaptureModeThreadLocal), "cudaStreamBeginCapture");
    for (int k = 0; k < iters; ++k)
      check(mode < 0 ? launch_empty(ctas, streams[i]) : launch_p2p(ps[i], kBF16, mode, ctas, streams[i]), "launch");
    cudaGraph_t graph;
    check(cudaStreamEndCapture(streams[i], &graph), "cudaStreamEndCapture");
    check(cudaGraphInstantiate(&graphs[i], graph, 0), "cudaGraphInstantiate");
    cudaGraphDestroy(graph);
  }
  // The replays of the ranks start up to a few host launches apart; the first kernel absorbs
  // that skew, a share of 1/iters of the mean.
  auto replay_all = [&](bool timed) {
    for (int i = 0; i < n; ++i) {
      DeviceGuard g(ordinals[i]);
      if (timed) cudaEventRecord(e0[i], streams[i]);
      check(cudaGraphLaunch(graphs[i], streams[i]), "cudaGraphLaunch");
      if (timed) cudaEventRecord(e1[i], streams[i]);
    }
  };
  replay_all(false);
  replay_all(true);
  std::vector<double> out(n);
  for (int i = 0; i < n; ++i) {
    DeviceGuard g(ordinals[i]);
    check(cudaEventSynchronize(e1[i]), "kernel (bench_raw)");
    float ms = 0; cudaEventElapsedTime(&ms, e0[i], e1[i]);
    out[i] = ms * 1e3 / iters;
  }
  for (int i = 0; i < n; ++i) {
    DeviceGuard g(ordinals[i]);
    for (int j = 0; j < 4; ++j) cudaFree(bufs[4 * i + j]);
    cudaGraphExecDestroy(graphs[i]);
    cudaStreamDestroy(streams[i]); cudaEventDestroy(e0[i]); cudaEventDestroy(e1[i]);
  }
  return out;
}
}  // namespace tw
