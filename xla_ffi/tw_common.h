// Shared definitions of the fused AllReduce + residual + RMSNorm extension (host and device).
#pragma once
#include <cstddef>
#include <cstdint>

namespace tw {

constexpr int kMaxRanks = 8;        // ranks of one communicator
constexpr int kMaxBlocks = 512;     // CTAs of one launch (flag slots per rank)
constexpr int kThreads = 512;       // threads per CTA (128 registers each)
constexpr int kMaxVecPerThread = 4; // 16-B vectors of one row held per thread in the norm phase
constexpr int kAsyncSlots = 4;      // start/done pairs of one device that may be pending at once

// Workspace layout, identical on every rank (offsets from the workspace base).
//   [0, kCounterBytes)                 CallCounter of this rank (only this rank's kernels touch it)
//   [kCounterBytes, kSyncBytes)        flags[kMaxBlocks][kMaxRanks] uint32: flags[b][src] is written by
//                                      rank `src`'s block b, read by this rank's block b
//   [in_off,  in_off + cap)            two-shot input: slot[src] = src's partial for this rank's rows
//   [out_off, out_off + cap/N)         two-shot output: this rank's normalised rows (peers pull them)
//   [os_off,  os_off + 2*N*os_stride)  one-shot, double-buffered by call parity: slot[parity][src] =
//                                      src's partial (all T rows) followed by src's residual rows
constexpr size_t kCounterBytes = 256;
constexpr size_t kFlagBytes = size_t(kMaxBlocks) * kMaxRanks * sizeof(uint32_t);
constexpr size_t kSyncBytes = kCounterBytes + kFlagBytes;

// The call counter lives on the device, not the host: a launch that XLA captured into a CUDA graph
// replays with the arguments it was captured with, so a host-side count would freeze. Every block
// reads `seq` when it starts (this call is seq + 1); the last block to finish bumps it, so the
// next kernel of this rank (stream order, or the events between our two streams) reads seq + 1.
// Every rank runs the same calls in the same order, so the counts agree across ranks.
struct CallCounter {
  uint32_t seq;      // calls completed by this rank
  uint32_t arrived;  // blocks of the running call that have finished
};

enum DType : int { kBF16 = 0, kF16 = 1, kF32 = 2 };
enum Mode : int { kModeAuto = 0, kModeOneShot = 1, kModeTwoShot = 2 };

struct Params {
  void* ws[kMaxRanks];        // base address of every rank's workspace, as mapped on this device
  void* mc_base;              // multimem only: multicast address of the multicast-bound region
  void* uc_base;              // multimem only: this device's unicast view of the same region
  const void* partial;        // [T, D]
  const void* residual;       // [R, D]
  const float* gamma;         // [D], fp32
  void* normed;               // [T, D]
  void* residual_out;         // [R, D] (may alias residual)
  int64_t T, D, R;
  int N, rank;
  float eps;
  uint64_t timeout_ns;        // spin-wait limit
  int* err;                   // host-mapped error record: {code, rank, missing peer, seq, block}
  size_t in_off, out_off, os_off, os_stride;
  int dbg;                    // benchmarking only: bit 0 skips the push/copy-in phase, bit 1 the
                              // pull phase, bit 2 the reduce+norm phase (results are then wrong)
};

}  // namespace tw
