// pybind11 module jax_tokenweave._C: hands the FFI handler to Python (for
// jax.ffi.register_ffi_target) and exposes the communicator's host operations.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>

#include "tw_host.h"
#include "tw_multimem_host.h"
#include "xla/ffi/api/c_api.h"

namespace py = pybind11;

extern "C" XLA_FFI_Error* TwFusedAllReduceRMSNorm(XLA_FFI_CallFrame* call_frame);
extern "C" XLA_FFI_Error* TwFusedStart(XLA_FFI_CallFrame* call_frame);
extern "C" XLA_FFI_Error* TwFusedDone(XLA_FFI_CallFrame* call_frame);

PYBIND11_MODULE(_C, m) {
  m.doc() = "jax_tokenweave CUDA extension: fused AllReduce + residual + RMSNorm (XLA FFI)";
  // name -> (handler, may XLA capture it into a command buffer): the second matches the traits
  // each handler declares in tw_host.cc (XLA takes them from the registration).
  m.def("handlers", []() {
    auto target = [](XLA_FFI_Error* (*fn)(XLA_FFI_CallFrame*), bool graph_safe) {
      return py::make_tuple(py::capsule(reinterpret_cast<void*>(fn), "xla._CUSTOM_CALL_TARGET"), graph_safe);
    };
    py::dict d;
    d["jax_tokenweave_fused_ar_rmsnorm"] = target(&TwFusedAllReduceRMSNorm, true);
    d["jax_tokenweave_fused_start"] = target(&TwFusedStart, false);
    d["jax_tokenweave_fused_done"] = target(&TwFusedDone, false);
    return d;
  });
  m.def("layout", [](size_t cap, size_t os_cap, int n) {
    tw::Layout l = tw::make_layout(cap, os_cap, n);
    py::dict d;
    d["cap"] = l.cap; d["os_stride"] = l.os_stride; d["in_off"] = l.in_off; d["out_off"] = l.out_off;
    d["os_off"] = l.os_off; d["total"] = l.total; d["flag_bytes"] = tw::kFlagBytes;
    return d;
  });
  m.attr("MAX_RANKS") = tw::kMaxRanks;
  m.attr("MAX_CTAS") = tw::kMaxBlocks;
  m.attr("ASYNC_SLOTS") = tw::kAsyncSlots;
  m.attr("THREADS") = tw::kThreads;
  m.attr("MAX_HIDDEN_BF16") = tw::kMaxVecPerThread * tw::kThreads * 8;
  m.def("device_count", []() { int n = 0; cudaError_t e = cudaGetDeviceCount(&n); return e == cudaSuccess ? n : 0; });
  m.def("sm_count", [](int ordinal) {
    int v = 0; cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, ordinal); return v; });
  m.def("alloc_workspace", &tw::alloc_workspace);
  m.def("free_workspace", &tw::free_workspace);
  m.def("ipc_handle", [](int o, uintptr_t p) { return py::bytes(tw::ipc_handle(o, p)); });
  m.def("ipc_open", [](int o, py::bytes h) { return tw::ipc_open(o, std::string(h)); });
  m.def("enable_peer_access", &tw::enable_peer_access);
  m.def("register_rank", &tw::register_rank);
  m.def("destroy_comm", &tw::destroy_comm);
  m.def("last_error", &tw::last_error);
  m.def("host_launches", &tw::host_launches);
  m.def("bench_raw", &tw::bench_raw);
  m.def("check_multimem_allowed", &tw::check_multimem_allowed);
  m.def("multimem_setup", [](int64_t comm_id, const std::vector<int>& ordinals, size_t cap) {
    tw::MulticastRegion r = tw::multimem_setup(tw::real_driver_api(), ordinals, cap);
    for (size_t i = 0; i < ordinals.size(); ++i)
      tw::set_multimem(comm_id, ordinals[i], r.mc[i], r.uc[i], r.in_off, r.out_off, r.out_off);
    return r.bytes;
  });
  m.def("multimem_dry_run", [](const std::vector<int>& ordinals, size_t cap) {
    tw::MulticastRegion r;
    std::vector<std::string> log = tw::multimem_dry_run(ordinals, cap, &r);
    py::dict d;
    d["log"] = log; d["uc"] = r.uc; d["mc"] = r.mc; d["bytes"] = r.bytes; d["in_off"] = r.in_off; d["out_off"] = r.out_off;
    return d;
  });
}
