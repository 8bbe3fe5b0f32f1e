#pragma once
#include <cuda.h>

#include <cstdint>
#include <string>
#include <vector>

namespace tw {

// The driver functions the multicast set-up needs; filled at run time (real) or with stubs (tests).
struct DriverApi {
  CUresult (*DeviceGet)(CUdevice*, int) = nullptr;
  CUresult (*DeviceGetAttribute)(int*, CUdevice_attribute, CUdevice) = nullptr;
  CUresult (*MulticastGetGranularity)(size_t*, const CUmulticastObjectProp*, CUmulticastGranularity_flags) = nullptr;
  CUresult (*MemGetAllocationGranularity)(size_t*, const CUmemAllocationProp*, CUmemAllocationGranularity_flags) = nullptr;
  CUresult (*MulticastCreate)(CUmemGenericAllocationHandle*, const CUmulticastObjectProp*) = nullptr;
  CUresult (*MulticastAddDevice)(CUmemGenericAllocationHandle, CUdevice) = nullptr;
  CUresult (*MemCreate)(CUmemGenericAllocationHandle*, size_t, const CUmemAllocationProp*, unsigned long long) = nullptr;
  CUresult (*MulticastBindMem)(CUmemGenericAllocationHandle, size_t, CUmemGenericAllocationHandle, size_t, size_t, unsigned long long) = nullptr;
  CUresult (*MemAddressReserve)(CUdeviceptr*, size_t, size_t, CUdeviceptr, unsigned long long) = nullptr;
  CUresult (*MemMap)(CUdeviceptr, size_t, size_t, CUmemGenericAllocationHandle, unsigned long long) = nullptr;
  CUresult (*MemSetAccess)(CUdeviceptr, size_t, const CUmemAccessDesc*, size_t) = nullptr;
};

struct MulticastRegion {
  std::vector<uintptr_t> uc, mc;  // per device: unicast view, multicast address
  size_t bytes = 0, in_off = 0, out_off = 0;
};

void check_multimem_allowed();   // throws unless opted in and allowed by machine policy
DriverApi real_driver_api();     // calls check_multimem_allowed() first
DriverApi stub_driver_api();
MulticastRegion multimem_setup(const DriverApi& d, const std::vector<int>& ordinals, size_t cap);
std::vector<std::string> multimem_dry_run(const std::vector<int>& ordinals, size_t cap, MulticastRegion* out);

}  // namespace tw
