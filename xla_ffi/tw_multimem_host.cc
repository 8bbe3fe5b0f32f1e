// Host logic of the multimem (NVLS) transport: multicast object set-up through the CUDA driver API,
// obtained at run time (no link against libcuda), behind a policy gate.
//
// NEVER call the real path on machines where NVLink multicast is disabled: it can take a shared
// host's GPUs down. The gate refuses unless JAX_TOKENWEAVE_ENABLE_MULTIMEM=1 and none of the
// machine-policy variables that switch NVLS off is set. Tests use `multimem_dry_run`, which runs
// the same sequence against stub driver functions that only record the calls.
#include "tw_multimem_host.h"

#include <cuda.h>
#include <cuda_runtime.h>

#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

namespace tw {
namespace {

std::string env(const char* k) { const char* v = std::getenv(k); return v ? std::string(v) : std::string(); }

void ck(CUresult r, const char* what) {
  if (r != CUDA_SUCCESS) throw std::runtime_error(std::string("jax_tokenweave multimem: ") + what + " failed (CUresult " + std::to_string(int(r)) + ")");
}

size_t round_up(size_t x, size_t a) { return (x + a - 1) / a * a; }

// ---- stubs: record calls, hand out fake handles / addresses -------------------------------------
std::vector<std::string>* g_log = nullptr;
unsigned long long g_next = 0x1000;
void rec(const std::string& s) { if (g_log) g_log->push_back(s); }

CUresult s_DeviceGet(CUdevice* d, int o) { *d = o; rec("cuDeviceGet " + std::to_string(o)); return CUDA_SUCCESS; }
CUresult s_DeviceGetAttribute(int* v, CUdevice_attribute a, CUdevice d) {
  *v = 1; rec("cuDeviceGetAttribute " + std::to_string(int(a)) + " " + std::to_string(d)); return CUDA_SUCCESS;
}
CUresult s_MulticastGetGranularity(size_t* g, const CUmulticastObjectProp* p, CUmulticastGranularity_flags) {
  *g = size_t(2) << 20; rec("cuMulticastGetGranularity n=" + std::to_string(p->numDevices)); return CUDA_SUCCESS;
}
CUresult s_MemGetAllocationGranularity(size_t* g, const CUmemAllocationProp* p, CUmemAllocationGranularity_flags) {
  *g = size_t(2) << 20; rec("cuMemGetAllocationGranularity dev=" + std::to_string(p->location.id)); return CUDA_SUCCESS;
}
CUresult s_MulticastCreate(CUmemGenericAllocationHandle* h, const CUmulticastObjectProp* p) {
  *h = g_next++; rec("cuMulticastCreate size=" + std::to_string(p->size) + " n=" + std::to_string(p->numDevices)); return CUDA_SUCCESS;
}
CUresult s_MulticastAddDevice(CUmemGenericAllocationHandle, CUdevice d) { rec("cuMulticastAddDevice " + std::to_string(d)); return CUDA_SUCCESS; }
CUresult s_MemCreate(CUmemGenericAllocationHandle* h, size_t sz, const CUmemAllocationProp* p, unsigned long long) {
  *h = g_next++; rec("cuMemCreate dev=" + std::to_string(p->location.id) + " size=" + std::to_string(sz)); return CUDA_SUCCESS;
}
CUresult s_MulticastBindMem(CUmemGenericAllocationHandle, size_t, CUmemGenericAllocationHandle, size_t, size_t sz, unsigned long long) {
  rec("cuMulticastBindMem size=" + std::to_string(sz)); return CUDA_SUCCESS;
}
CUresult s_MemAddressReserve(CUdeviceptr* p, size_t sz, size_t, CUdeviceptr, unsigned long long) {
  *p = CUdeviceptr(g_next++) << 32; rec("cuMemAddressReserve size=" + std::to_string(sz)); return CUDA_SUCCESS;
}
CUresult s_MemMap(CUdeviceptr, size_t sz, size_t, CUmemGenericAllocationHandle, unsigned long long) {
  rec("cuMemMap size=" + std::to_string(sz)); return CUDA_SUCCESS;
}
CUresult s_MemSetAccess(CUdeviceptr, size_t, const CUmemAccessDesc* d, size_t) {
  rec("cuMemSetAccess dev=" + std::to_string(d->location.id)); return CUDA_SUCCESS;
}

template <typename F>
void load(F*& f, const char* name) {
  void* p = nullptr;
  cudaDriverEntryPointQueryResult q;
  if (cudaGetDriverEntryPointByVersion(name, &p, 12000, cudaEnableDefault, &q) != cudaSuccess || q != cudaDriverEntryPointSuccess || !p)
    throw std::runtime_error(std::string("jax_tokenweave multimem: driver entry point ") + name + " not available");
  f = reinterpret_cast<F*>(p);
}

}  // namespace

void check_multimem_allowed() {
  if (env("JAX_TOKENWEAVE_ENABLE_MULTIMEM") != "1")
    throw std::runtime_error("jax_tokenweave: the multimem transport is opt-in: set JAX_TOKENWEAVE_ENABLE_MULTIMEM=1 "
                             "(only on machines whose owner allows NVLink multicast)");
  if (env("NCCL_NVLS_ENABLE") == "0" || env("NVSHMEM_DISABLE_NVLS") == "1" || env("TORCH_SYMM_MEM_DISABLE_MULTICAST") == "1")
    throw std::runtime_error("jax_tokenweave: NVLink multicast is disabled on this machine (NCCL_NVLS_ENABLE=0 / "
                             "NVSHMEM_DISABLE_NVLS=1 / TORCH_SYMM_MEM_DISABLE_MULTICAST=1); refusing to create a multicast object");
}

DriverApi stub_driver_api() {
  DriverApi d;
  d.DeviceGet = s_DeviceGet; d.DeviceGetAttribute = s_DeviceGetAttribute;
  d.MulticastGetGranularity = s_MulticastGetGranularity; d.MemGetAllocationGranularity = s_MemGetAllocationGranularity;
  d.MulticastCreate = s_MulticastCreate; d.MulticastAddDevice = s_MulticastAddDevice; d.MemCreate = s_MemCreate;
  d.MulticastBindMem = s_MulticastBindMem; d.MemAddressReserve = s_MemAddressReserve; d.MemMap = s_MemMap;
  d.MemSetAccess = s_MemSetAccess;
  return d;
}

DriverApi real_driver_api() {
  check_multimem_allowed();
  DriverApi d;
  load(d.DeviceGet, "cuDeviceGet"); load(d.DeviceGetAttribute, "cuDeviceGetAttribute");
  load(d.MulticastGetGranularity, "cuMulticastGetGranularity"); load(d.MemGetAllocationGranularity, "cuMemGetAllocationGranularity");
  load(d.MulticastCreate, "cuMulticastCreate"); load(d.MulticastAddDevice, "cuMulticastAddDevice");
  load(d.MemCreate, "cuMemCreate"); load(d.MulticastBindMem, "cuMulticastBindMem");
  load(d.MemAddressReserve, "cuMemAddressReserve"); load(d.MemMap, "cuMemMap"); load(d.MemSetAccess, "cuMemSetAccess");
  return d;
}

MulticastRegion multimem_setup(const DriverApi& d, const std::vector<int>& ordinals, size_t cap) {
  const int n = int(ordinals.size());
  if (n < 2) throw std::runtime_error("jax_tokenweave multimem: needs at least 2 devices");
  std::vector<CUdevice> devs(n);
  for (int i = 0; i < n; ++i) {
    ck(d.DeviceGet(&devs[i], ordinals[i]), "cuDeviceGet");
    int ok = 0;
    ck(d.DeviceGetAttribute(&ok, CU_DEVICE_ATTRIBUTE_MULTICAST_SUPPORTED, devs[i]), "cuDeviceGetAttribute");
    if (!ok) throw std::runtime_error("jax_tokenweave multimem: device " + std::to_string(ordinals[i]) + " does not support multicast");
  }
  MulticastRegion r;
  // Region: [input: cap][output: cap]; the kernel indexes both by global row.
  r.in_off = 0;
  r.out_off = round_up(cap, 4096);
  size_t bytes = 2 * r.out_off;
  CUmulticastObjectProp mp;
  std::memset(&mp, 0, sizeof(mp));
  mp.numDevices = unsigned(n);
  mp.handleTypes = CU_MEM_HANDLE_TYPE_NONE;  // one process: nothing to export
  mp.size = bytes;
  size_t mc_gran = 0;
  ck(d.MulticastGetGranularity(&mc_gran, &mp, CU_MULTICAST_GRANULARITY_RECOMMENDED), "cuMulticastGetGranularity");
  CUmemAllocationProp ap;
  std::memset(&ap, 0, sizeof(ap));
  ap.type = CU_MEM_ALLOCATION_TYPE_PINNED;
  ap.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
  ap.location.id = devs[0];
  size_t mem_gran = 0;
  ck(d.MemGetAllocationGranularity(&mem_gran, &ap, CU_MEM_ALLOC_GRANULARITY_RECOMMENDED), "cuMemGetAllocationGranularity");
  const size_t gran = mc_gran > mem_gran ? mc_gran : mem_gran;
  bytes = round_up(bytes, gran);
  mp.size = bytes;
  r.bytes = bytes;
  CUmemGenericAllocationHandle mc;
  ck(d.MulticastCreate(&mc, &mp), "cuMulticastCreate");
  // Every device joins the multicast object before any memory is bound to it.
  for (int i = 0; i < n; ++i) ck(d.MulticastAddDevice(mc, devs[i]), "cuMulticastAddDevice");
  for (int i = 0; i < n; ++i) {
    ap.location.id = devs[i];
    CUmemGenericAllocationHandle phys;
    ck(d.MemCreate(&phys, bytes, &ap, 0), "cuMemCreate");
    ck(d.MulticastBindMem(mc, 0, phys, 0, bytes, 0), "cuMulticastBindMem");
    CUmemAccessDesc acc;
    std::memset(&acc, 0, sizeof(acc));
    acc.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
    acc.location.id = devs[i];
    acc.flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE;
    CUdeviceptr uc = 0, mcp = 0;
    ck(d.MemAddressReserve(&uc, bytes, gran, 0, 0), "cuMemAddressReserve (unicast)");
    ck(d.MemMap(uc, bytes, 0, phys, 0), "cuMemMap (unicast)");
    ck(d.MemSetAccess(uc, bytes, &acc, 1), "cuMemSetAccess (unicast)");
    ck(d.MemAddressReserve(&mcp, bytes, gran, 0, 0), "cuMemAddressReserve (multicast)");
    ck(d.MemMap(mcp, bytes, 0, mc, 0), "cuMemMap (multicast)");
    ck(d.MemSetAccess(mcp, bytes, &acc, 1), "cuMemSetAccess (multicast)");
    r.uc.push_back(uintptr_t(uc));
    r.mc.push_back(uintptr_t(mcp));
  }
  return r;
}

std::vector<std::string> multimem_dry_run(const std::vector<int>& ordinals, size_t cap, MulticastRegion* out) {
  std::vector<std::string> log;
  g_log = &log;
  try {
    *out = multimem_setup(stub_driver_api(), ordinals, cap);
  } catch (...) { g_log = nullptr; throw; }
  g_log = nullptr;
  return log;
}

}  // namespace tw
