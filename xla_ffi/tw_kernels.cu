// CUDA kernels of the fused AllReduce + residual-add + RMSNorm (TokenWeave's "RMSNorm reordering").
//
// Every kernel follows one pattern: a CTA (block) b on rank p only ever exchanges data with block b
// of the other ranks, and the two meet at `block_barrier`, so no grid-wide synchronisation is needed.
// The data that block b writes into a peer before a barrier is exactly the data that the peer's
// block b reads after it (both sides compute the same row partition from T, R, G and b).
//
// Barrier values are `seq * 4 + phase` where `seq` numbers the calls of a communicator (the same on
// every rank; counted on the device, see CallCounter, so that launches replayed from a CUDA graph
// stay correct); flags only ever grow, so they never need resetting (ABA-safe: a waiter checks
// "flag >= expected" with wrap-around arithmetic).
//
// Re-use of workspace regions across calls (why two barriers suffice for the two-shot and one for
// the one-shot): kernels of one device run in stream order, so when any block of rank p has passed
// a barrier of call k, every block of rank p's call k-1 has finished, and so (through that barrier)
// every peer has at least started call k, i.e. finished call k-1 too.
//  * two-shot input slots are written before barrier 1 of call k+1 and read between barriers 1 and
//    2 of call k: the writer passed barrier 2 of call k, which every reader reached after reading.
//  * two-shot output rows are written after barrier 1 of call k+1 (all peers are in call k+1, so
//    they finished pulling call k's rows).
//  * one-shot slots are written before the only barrier, so they alternate by call parity: call k+2
//    writes the parity of call k only after passing the barrier of call k+1, when every reader of
//    call k has finished call k.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>

#include "tw_common.h"

namespace tw {
namespace {

// ----------------------------------------------------------------------------------------------
// 16-byte vectors <-> fp32

// The two 16-bit types differ only in their pair type and its conversions.
__device__ __forceinline__ float2 pair_to_f32(__nv_bfloat162 h) { return __bfloat1622float2(h); }
__device__ __forceinline__ float2 pair_to_f32(__half2 h) { return __half22float2(h); }
template <typename P> __device__ __forceinline__ P f32_to_pair(float a, float b);
template <> __device__ __forceinline__ __nv_bfloat162 f32_to_pair(float a, float b) { return __floats2bfloat162_rn(a, b); }
template <> __device__ __forceinline__ __half2 f32_to_pair(float a, float b) { return __floats2half2_rn(a, b); }

template <typename P>  // P: the type of two 16-bit elements
struct Vec16 {
  static constexpr int E = 8;
  __device__ static void to_f32(const uint4& v, float* f) {
    const P* h = reinterpret_cast<const P*>(&v);
#pragma unroll
    for (int i = 0; i < 4; ++i) { float2 t = pair_to_f32(h[i]); f[2 * i] = t.x; f[2 * i + 1] = t.y; }
  }
  __device__ static uint4 from_f32(const float* f) {
    uint4 v; P* h = reinterpret_cast<P*>(&v);
#pragma unroll
    for (int i = 0; i < 4; ++i) h[i] = f32_to_pair<P>(f[2 * i], f[2 * i + 1]);
    return v;
  }
};

template <typename T> struct Vec;
template <> struct Vec<__nv_bfloat16> : Vec16<__nv_bfloat162> {};
template <> struct Vec<__half> : Vec16<__half2> {};
template <> struct Vec<float> {
  static constexpr int E = 4;
  __device__ static void to_f32(const uint4& v, float* f) {
    f[0] = __uint_as_float(v.x); f[1] = __uint_as_float(v.y); f[2] = __uint_as_float(v.z); f[3] = __uint_as_float(v.w);
  }
  __device__ static uint4 from_f32(const float* f) {
    return make_uint4(__float_as_uint(f[0]), __float_as_uint(f[1]), __float_as_uint(f[2]), __float_as_uint(f[3]));
  }
};

// Loads of workspace data written by other GPUs bypass L1 (.cg): L1 is not coherent with remote
// writes. Ordering is given by the barrier's acquire, not by these loads.
__device__ __forceinline__ uint4 ld_cg(const void* p) { return __ldcg(reinterpret_cast<const uint4*>(p)); }
__device__ __forceinline__ uint4 ld_plain(const void* p) { return *reinterpret_cast<const uint4*>(p); }
__device__ __forceinline__ void st_plain(void* p, const uint4& v) { *reinterpret_cast<uint4*>(p) = v; }

__device__ __forceinline__ uint64_t global_timer_ns() {
  uint64_t t; asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t)); return t;
}
__device__ __forceinline__ void st_release_sys(uint32_t* p, uint32_t v) {
  asm volatile("st.release.sys.global.u32 [%0], %1;" :: "l"(p), "r"(v) : "memory");
}
__device__ __forceinline__ uint32_t ld_acquire_sys(const uint32_t* p) {
  uint32_t v; asm volatile("ld.acquire.sys.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory"); return v;
}

__device__ __forceinline__ uint32_t* flag_slot(void* ws, int block, int src) {
  return reinterpret_cast<uint32_t*>(static_cast<char*>(ws) + kCounterBytes) + size_t(block) * kMaxRanks + src;
}

// This call's number: one more than the calls this rank has completed. Read by every block before
// any block can bump it (end_call bumps only when all blocks have finished).
__device__ __forceinline__ uint32_t begin_call(const Params& p) {
  return *reinterpret_cast<const volatile uint32_t*>(&static_cast<CallCounter*>(p.ws[p.rank])->seq) + 1u;
}

// The last block of the call to finish publishes `seq` as completed. The next kernel of this rank
// starts after this one has finished (stream or event order), which makes the stores visible to it.
__device__ __forceinline__ void end_call(const Params& p, uint32_t seq) {
  __syncthreads();
  if (threadIdx.x == 0) {
    CallCounter* c = static_cast<CallCounter*>(p.ws[p.rank]);
    if (atomicAdd(&c->arrived, 1u) == gridDim.x - 1) { c->arrived = 0; c->seq = seq; }
  }
}

// A missing peer must become an error, not a hang: record who we waited for in host-mapped memory
// (readable by the host even after the context is lost), print it, and trap (the launch fails, XLA
// reports the error at the next synchronisation).
__device__ __noinline__ void fail_timeout(const Params& p, int peer, uint32_t value) {
  if (atomicCAS(p.err, 0, 1) == 0) {
    p.err[1] = p.rank; p.err[2] = peer; p.err[3] = int(value >> 2); p.err[4] = blockIdx.x;
    __threadfence_system();
  }
  printf("jax_tokenweave: rank %d block %d timed out waiting for peer rank %d (call %u, flag %u)\n",
         p.rank, blockIdx.x, peer, value >> 2, value);
  __trap();
}

// Block b of this rank meets block b of every other rank.
// Needs: every store this block issued before the call (to peers' workspaces, or to our own
// workspace that peers will read) is visible to a peer's block b before it leaves its barrier, and
// symmetrically every peer's stores are visible to us after we leave.
__device__ __forceinline__ void block_barrier(const Params& p, uint32_t value) {
  // (1) CTA-scope: all threads of the block have issued their stores before thread t < N signals.
  __syncthreads();
  if (threadIdx.x < p.N) {
    const int peer = threadIdx.x;
    // (2) release at system scope: cumulative over the stores of the block observed through the
    // bar.sync above, so the peer that acquires this flag value sees all of them.
    st_release_sys(flag_slot(p.ws[peer], blockIdx.x, p.rank), value);
    // (3) acquire at system scope on our own slot written by `peer`: after it, the peer's stores
    // made before its release are visible to this thread. Flags only grow (wrap-safe compare).
    const uint32_t* mine = flag_slot(p.ws[p.rank], blockIdx.x, peer);
    if (int32_t(ld_acquire_sys(mine) - value) < 0) {
      const uint64_t t0 = global_timer_ns();
      while (int32_t(ld_acquire_sys(mine) - value) < 0) {
        if (global_timer_ns() - t0 > p.timeout_ns) fail_timeout(p, peer, value);
      }
    }
  }
  // (4) CTA-scope: propagate the acquires of threads 0..N-1 to the whole block before it reads.
  __syncthreads();
}

// Copy n 16-byte items described by map(i, src, dst) -> bool (false: skip). U loads are issued
// before the first store so that U*16 bytes per thread are in flight (NVLink latency hiding).
template <int U, typename Map>
__device__ __forceinline__ void copy_items(uint32_t n, Map map) {
  for (uint32_t base = threadIdx.x; base < n; base += U * blockDim.x) {
    uint4 v[U]; void* dst[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const uint32_t i = base + u * blockDim.x;
      const void* src = nullptr; dst[u] = nullptr;
      if (i < n && map(i, src, dst[u])) v[u] = ld_cg(src); else dst[u] = nullptr;
    }
#pragma unroll
    for (int u = 0; u < U; ++u) if (dst[u]) st_plain(dst[u], v[u]);
  }
}

// A block normalises G rows at once: its threads split into G groups of kThreads/G, one row per
// group, G as large as lets a thread hold at most kMaxVecPerThread vectors of its row (capped at 8
// groups of 2 warps). More rows per pass = more independent loads in flight per SM, which is what
// the norm phase is bound by when the two-shot runs on few CTAs. The one-shot keeps one row per
// pass (max_g = 1): it is latency-bound, with about one row per CTA. G depends on D and the kernel
// only, not on the CTA count, so every rank, every CTA count and every run gives the same bits.
struct RowGroups {
  uint32_t G, threads, warps, group, lane;
  __device__ RowGroups(uint32_t V, uint32_t max_g) {
    G = 1;
    while (G < max_g && uint32_t(kMaxVecPerThread) * (kThreads / (2 * G)) >= V) G *= 2;
    threads = kThreads / G; warps = threads / 32;
    group = threadIdx.x / threads; lane = threadIdx.x % threads;
  }
};

__device__ __forceinline__ float group_sum(float v, float* smem, const RowGroups& rg) {
  // Fixed butterfly + fixed warp order: the same bits on every rank and every run.
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const uint32_t w = threadIdx.x >> 5;
  if ((threadIdx.x & 31) == 0) smem[w] = v;
  __syncthreads();
  const uint32_t w0 = rg.group * rg.warps;
  float s = 0.f;
  for (uint32_t i = 0; i < rg.warps; ++i) s += smem[w0 + i];
  __syncthreads();  // smem is reused by the next pass
  return s;
}

// One row per thread group: acc = sum of the N partials (fp32, rank order, by `sum_vec`),
// r = round(acc + residual), store r to rout (if any), normed = round(f32(r) * rsqrt(mean(r^2) +
// eps) * gamma) to out0/out1/(multicast out_mc). Called by the whole block (it synchronises); a
// group without a row this pass passes active = false. All loads of a thread's vectors are issued
// before its first store (residual_out may alias residual: the same thread reads, then writes).
template <typename T, typename SumVec, typename OutMc>
__device__ __forceinline__ void norm_row(const Params& p, const RowGroups& rg, bool active, SumVec sum_vec,
                                         const char* res, char* rout, char* out0, char* out1, OutMc out_mc,
                                         float* smem) {
  using VT = Vec<T>;
  constexpr int E = VT::E;
  const uint32_t V = uint32_t(p.D / E);
  uint4 rv[kMaxVecPerThread];
  float ss = 0.f;
#pragma unroll
  for (int k = 0; k < kMaxVecPerThread; ++k) {
    const uint32_t v = rg.lane + k * rg.threads;
    if (active && v < V) {
      float acc[E];
      sum_vec(v, acc);
      float fr[E];
      VT::to_f32(ld_cg(res + size_t(v) * 16), fr);
#pragma unroll
      for (int e = 0; e < E; ++e) acc[e] = acc[e] + fr[e];
      rv[k] = VT::from_f32(acc);
      float g[E];
      VT::to_f32(rv[k], g);
#pragma unroll
      for (int e = 0; e < E; ++e) ss += g[e] * g[e];
    }
  }
  // The stores come after every load of the row (no store between two loads keeps the compiler
  // from issuing all of them up front).
#pragma unroll
  for (int k = 0; k < kMaxVecPerThread; ++k) {
    const uint32_t v = rg.lane + k * rg.threads;
    if (active && v < V && rout) st_plain(rout + size_t(v) * 16, rv[k]);
  }
  const float inv = rsqrtf(group_sum(ss, smem, rg) / float(p.D) + p.eps);
  if (!active) return;
#pragma unroll
  for (int k = 0; k < kMaxVecPerThread; ++k) {
    const uint32_t v = rg.lane + k * rg.threads;
    if (v < V) {
      float g[E], w[E];
      VT::to_f32(rv[k], g);
      const float4* gp = reinterpret_cast<const float4*>(p.gamma + size_t(v) * E);
#pragma unroll
      for (int q = 0; q < E / 4; ++q) { float4 t = gp[q]; w[4*q] = t.x; w[4*q+1] = t.y; w[4*q+2] = t.z; w[4*q+3] = t.w; }
#pragma unroll
      for (int e = 0; e < E; ++e) g[e] = (g[e] * inv) * w[e];
      const uint4 o = VT::from_f32(g);
      if (out0) st_plain(out0 + size_t(v) * 16, o);
      if (out1) st_plain(out1 + size_t(v) * 16, o);
      out_mc(v, o);
    }
  }
}

struct NoMc { __device__ void operator()(uint32_t, const uint4&) const {} };

template <typename T, int NR>
__device__ __forceinline__ void sum_partials(const Params& p, const char* const* src, uint32_t v, float* acc) {
  using VT = Vec<T>;
  constexpr int E = VT::E;
  uint4 x[NR];
#pragma unroll
  for (int r = 0; r < NR; ++r) if (r < p.N) x[r] = ld_cg(src[r] + size_t(v) * 16);  // all loads first
#pragma unroll
  for (int e = 0; e < E; ++e) acc[e] = 0.f;
#pragma unroll
  for (int r = 0; r < NR; ++r) {
    if (r < p.N) {
      float f[E]; VT::to_f32(x[r], f);
#pragma unroll
      for (int e = 0; e < E; ++e) acc[e] += f[e];  // fixed rank order 0..N-1
    }
  }
}

// 16 loads of 16 B in flight per thread (128 KiB per 512-thread CTA) before the first store: NVLink
// latency needs that many bytes in flight per SM (the one-shot and multimem copies). Measured on
// 4xH200 with the two-shot's copies when they still used this loop, 16 MiB, kernel alone: 8 in
// flight took 176 us with 32 CTAs and 254 us with 16; 16 in flight 161 and 209 us (equal at 132).
constexpr int kUnroll = 16;

// ----------------------------------------------------------------------------------------------
// Bulk copies by the Tensor Memory Accelerator (cp.async.bulk): global -> shared -> global, issued
// by one thread. The TMA keeps far more bytes in flight per SM than 512 threads' registers can
// (kTmaStages x kTmaPiece), which is what NVLink's latency needs when a collective gets few SMs.
constexpr int kTmaStages = 4;
constexpr uint32_t kTmaPiece = 32u << 10;
constexpr size_t kTmaSmem = size_t(kTmaStages) * kTmaPiece;  // dynamic shared memory of the two-shot

__device__ __forceinline__ uint32_t smem_addr(const void* p) { return uint32_t(__cvta_generic_to_shared(p)); }

struct BulkPiece { const char* src; char* dst; uint32_t bytes; };

// Waits (bounded) for phase `parity` of an mbarrier: the bulk load into that stage has landed.
__device__ __forceinline__ void mbar_wait(const Params& p, uint32_t seq, uint64_t* bar, uint32_t parity) {
  uint32_t done = 0;
  const uint64_t t0 = global_timer_ns();
  while (true) {
    asm volatile("{ .reg .pred q; mbarrier.try_wait.parity.shared::cta.b64 q, [%1], %2; selp.u32 %0, 1, 0, q; }"
                 : "=r"(done) : "r"(smem_addr(bar)), "r"(parity) : "memory");
    if (done) return;
    if (global_timer_ns() - t0 > p.timeout_ns) fail_timeout(p, p.rank, seq * 4u);
  }
}

__device__ __forceinline__ void bulk_load(uint64_t* bar, char* stage, const BulkPiece& pc) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" :: "r"(smem_addr(bar)), "r"(pc.bytes) : "memory");
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
               :: "r"(smem_addr(stage)), "l"(pc.src), "r"(pc.bytes), "r"(smem_addr(bar)) : "memory");
}

__device__ __forceinline__ void bulk_store(const BulkPiece& pc, const char* stage) {
  asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;"
               :: "l"(pc.dst), "r"(smem_addr(stage)), "r"(pc.bytes) : "memory");
  asm volatile("cp.async.bulk.commit_group;" ::: "memory");
}

// Copies nchunks contiguous byte ranges chunk(k, src, dst, bytes) through kTmaStages shared-memory
// stages: up to kTmaStages loads in flight, each stage refilled once the store that drains it has
// read it. Called by thread 0 only; returns after every store has completed (its writes are done,
// so a release after this covers them) and after a proxy fence (so the generic-proxy code that
// follows, and the async-proxy loads issued here after an acquire, are ordered with each other).
template <typename Chunk>
__device__ void bulk_copy(const Params& p, uint32_t seq, uint32_t nchunks, Chunk chunk, char* stages, uint64_t* bars,
                          uint32_t* use) {
  asm volatile("fence.proxy.async;" ::: "memory");  // acquired data (generic proxy) -> TMA reads
  uint32_t k = 0; size_t off = 0;
  auto next = [&](BulkPiece& pc) {
    while (k < nchunks) {
      const char* src; char* dst; size_t len;
      chunk(k, src, dst, len);
      if (off < len) {
        const uint32_t b = uint32_t(min(len - off, size_t(kTmaPiece)));
        pc = BulkPiece{src + off, dst + off, b};
        off += b;
        return true;
      }
      ++k; off = 0;
    }
    return false;
  };
  BulkPiece ring[kTmaStages];
  int issued = 0;
  for (; issued < kTmaStages && next(ring[issued]); ++issued) bulk_load(&bars[issued], stages + issued * kTmaPiece, ring[issued]);
  for (int i = 0; i < issued; ++i) {
    const int st = i % kTmaStages;
    mbar_wait(p, seq, &bars[st], use[st] & 1u);  // parity of this stage's use count
    ++use[st];
    bulk_store(ring[st], stages + st * kTmaPiece);
    if (i >= 1) {
      // Piece i-1's store has read its stage once at most 1 group (piece i's) is still reading.
      asm volatile("cp.async.bulk.wait_group.read 1;" ::: "memory");
      const int sp = (i - 1) % kTmaStages;
      BulkPiece pc;
      if (next(pc)) { ring[sp] = pc; bulk_load(&bars[sp], stages + sp * kTmaPiece, pc); ++issued; }
    }
  }
  asm volatile("cp.async.bulk.wait_group 0;" ::: "memory");
  asm volatile("fence.proxy.async;" ::: "memory");  // TMA writes -> the generic release that follows
}

// ----------------------------------------------------------------------------------------------
// Two-shot: push (reduce-scatter into owners' workspaces), owner reduces + norms its rows, pull.
template <typename T, int NR>
__global__ void __launch_bounds__(kThreads) twoshot_kernel(const Params p) {
  __shared__ float smem[33];
  __shared__ __align__(8) uint64_t bars[kTmaStages];
  __shared__ uint32_t use[kTmaStages];
  extern __shared__ __align__(128) char stages[];
  if (threadIdx.x == 0) {
    for (int i = 0; i < kTmaStages; ++i) {
      asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" :: "r"(smem_addr(&bars[i])) : "memory");
      use[i] = 0;
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  const uint32_t seq = begin_call(p);
  constexpr int E = Vec<T>::E;
  const uint32_t V = uint32_t(p.D / E), R = uint32_t(p.R), Tn = uint32_t(p.T);
  const uint32_t G = gridDim.x, b = blockIdx.x;
  const uint32_t r0 = uint32_t(uint64_t(R) * b / G), r1 = uint32_t(uint64_t(R) * (b + 1) / G);
  const size_t rb = size_t(p.D) * sizeof(T);
  const char* part = static_cast<const char*>(p.partial);
  char* my_ws = static_cast<char*>(p.ws[p.rank]);

  // Phase 1: rows [o*R + r0, o*R + r1) of our partial -> owner o's input slot [rank]. Those rows
  // are contiguous in both places: one chunk per peer (padding rows, >= T, carry nothing).
  auto rows_of = [&](int o) -> size_t {
    const int64_t hi = min(int64_t(r1), int64_t(Tn) - int64_t(o) * R);
    return hi > int64_t(r0) ? size_t(hi - r0) : 0;
  };
  if (threadIdx.x == 0 && !(p.dbg & 1)) {
    bulk_copy(p, seq, uint32_t(p.N - 1), [&](uint32_t k, const char*& src, char*& dst, size_t& len) {
      const int o = int(k) + (int(k) >= p.rank);
      src = part + (size_t(o) * R + r0) * rb;
      dst = static_cast<char*>(p.ws[o]) + p.in_off + (size_t(p.rank) * R + r0) * rb;
      len = rows_of(o) * rb;
    }, stages, bars, use);
  }
  block_barrier(p, seq * 4u + 1u);  // inputs of our rows from every peer's block b are visible

  // Phase 2: our rows [r0, r1), G at a time: sum in rank order, add residual, norm, write result +
  // workspace.
  const RowGroups rg(V, 8);
  const uint32_t r_end = (p.dbg & 4) ? r0 : r1;
  for (uint32_t base = r0; base < r_end; base += rg.G) {
    const uint32_t i = base + rg.group;
    const uint32_t g = uint32_t(p.rank) * R + i;
    const char* res = static_cast<const char*>(p.residual) + size_t(i) * rb;
    char* rout = static_cast<char*>(p.residual_out) + size_t(i) * rb;
    if (i < r_end && g >= Tn)  // padding row: residual_out keeps the input residual (same thread reads, writes)
      for (uint32_t v = rg.lane; v < V; v += rg.threads) st_plain(rout + size_t(v) * 16, ld_plain(res + size_t(v) * 16));
    const char* src[NR];
#pragma unroll
    for (int r = 0; r < NR; ++r)
      src[r] = (r == p.rank) ? part + size_t(g) * rb : my_ws + p.in_off + (size_t(r) * R + i) * rb;
    norm_row<T>(p, rg, i < r_end && g < Tn, [&](uint32_t v, float* acc) { sum_partials<T, NR>(p, src, v, acc); },
                res, rout, static_cast<char*>(p.normed) + size_t(g) * rb, my_ws + p.out_off + size_t(i) * rb, NoMc{}, smem);
  }
  block_barrier(p, seq * 4u + 2u);  // every owner's normalised rows [r0, r1) are visible

  // Phase 3: pull the other owners' normalised rows [r0, r1) into our result.
  if (threadIdx.x == 0 && !(p.dbg & 2)) {
    bulk_copy(p, seq, uint32_t(p.N - 1), [&](uint32_t k, const char*& src, char*& dst, size_t& len) {
      const int o = int(k) + (int(k) >= p.rank);
      src = static_cast<const char*>(p.ws[o]) + p.out_off + size_t(r0) * rb;
      dst = static_cast<char*>(p.normed) + (size_t(o) * R + r0) * rb;
      len = rows_of(o) * rb;
    }, stages, bars, use);
  }
  end_call(p, seq);
}

// ----------------------------------------------------------------------------------------------
// One-shot: every rank pushes its partial (all rows) and its residual rows to every peer, one
// barrier, then every rank computes every row itself, in the same order as everyone else
// (bitwise identical results everywhere). Used for small messages.
template <typename T, int NR>
__global__ void __launch_bounds__(kThreads) oneshot_kernel(const Params p) {
  __shared__ float smem[33];
  const uint32_t seq = begin_call(p);
  constexpr int E = Vec<T>::E;
  const uint32_t V = uint32_t(p.D / E), R = uint32_t(p.R), Tn = uint32_t(p.T);
  const uint32_t G = gridDim.x, b = blockIdx.x;
  const uint32_t j0 = uint32_t(uint64_t(Tn) * b / G), j1 = uint32_t(uint64_t(Tn) * (b + 1) / G);
  const uint32_t own_lo = uint32_t(p.rank) * R, own_hi = min(own_lo + R, Tn);
  const uint32_t o0 = max(j0, own_lo), o1 = min(j1, own_hi);
  const uint32_t nj = j1 - j0, nown = o1 > o0 ? o1 - o0 : 0;
  const uint32_t per = (nj + nown) * V;
  const size_t rb = size_t(p.D) * sizeof(T);
  const char* part = static_cast<const char*>(p.partial);
  const char* resid = static_cast<const char*>(p.residual);
  const size_t par = size_t(seq & 1u) * p.N;
  auto slot = [&](int o, int src) -> char* {
    return static_cast<char*>(p.ws[o]) + p.os_off + (par + src) * p.os_stride;
  };

  // Phase 1: partial rows [j0, j1) and our residual rows inside [j0, j1) -> every peer's slot [rank].
  copy_items<kUnroll>((p.dbg & 1) ? 0u : uint32_t(p.N - 1) * per, [&](uint32_t idx, const void*& s, void*& d) {
    const uint32_t k = idx / per, rem = idx - k * per, q = rem / V, v = rem % V;
    const int o = int(k) + (int(k) >= p.rank);
    if (q < nj) {
      const uint32_t g = j0 + q;
      s = part + g * rb + size_t(v) * 16;
      d = slot(o, p.rank) + g * rb + size_t(v) * 16;
    } else {
      const uint32_t i = o0 + (q - nj) - own_lo;
      s = resid + i * rb + size_t(v) * 16;
      d = slot(o, p.rank) + (size_t(Tn) + i) * rb + size_t(v) * 16;
    }
    return true;
  });
  block_barrier(p, seq * 4u + 1u);  // every peer's rows [j0, j1) (and their residuals) are visible

  // Phase 2: rows [j0, j1), everyone computes them identically.
  const RowGroups rg(V, 1);
  const uint32_t j_end = (p.dbg & 4) ? j0 : j1;
  for (uint32_t base = j0; base < j_end; base += rg.G) {
    const uint32_t g = min(base + rg.group, j_end - 1);  // an idle group points at a valid row
    const int o = int(g / R);
    const uint32_t i = g - uint32_t(o) * R;
    const char* src[NR];
#pragma unroll
    for (int r = 0; r < NR; ++r) src[r] = (r == p.rank) ? part + size_t(g) * rb : slot(p.rank, r) + size_t(g) * rb;
    const char* res = (o == p.rank) ? resid + size_t(i) * rb : slot(p.rank, o) + (size_t(Tn) + i) * rb;
    char* rout = (o == p.rank) ? static_cast<char*>(p.residual_out) + size_t(i) * rb : nullptr;
    norm_row<T>(p, rg, base + rg.group < j_end, [&](uint32_t v, float* acc) { sum_partials<T, NR>(p, src, v, acc); },
                res, rout, static_cast<char*>(p.normed) + size_t(g) * rb, nullptr, NoMc{}, smem);
  }
  // Our padding rows (global index >= T): residual_out = residual. Local, no ordering needed.
  for (uint32_t i = (own_lo < Tn ? Tn - own_lo : 0) + b; i < R; i += G) {
    const char* res = resid + i * rb;
    char* rout = static_cast<char*>(p.residual_out) + i * rb;
    for (uint32_t v = threadIdx.x; v < V; v += blockDim.x) st_plain(rout + size_t(v) * 16, ld_plain(res + size_t(v) * 16));
  }
  end_call(p, seq);
}

// ----------------------------------------------------------------------------------------------
// Multimem (NVLS) two-shot, bf16 only. NEVER run on machines whose NVLink multicast is disabled.
// Each rank copies its partial into its multicast-bound buffer; the owner of a row reads the sum of
// all ranks' copies with multimem.ld_reduce (fp32 accumulation in the switch), adds the residual,
// norms, and broadcasts the normalised row with multimem.st into every rank's buffer.
__device__ __forceinline__ void mm_ld_reduce_bf16x8(const void* mc, float* acc) {
  uint32_t a, b, c, d;
  asm volatile("multimem.ld_reduce.relaxed.sys.global.add.acc::f32.v4.bf16x2 {%0, %1, %2, %3}, [%4];"
               : "=r"(a), "=r"(b), "=r"(c), "=r"(d) : "l"(mc) : "memory");
  const uint4 v = make_uint4(a, b, c, d);
  Vec<__nv_bfloat16>::to_f32(v, acc);
}
__device__ __forceinline__ void mm_st_v4(void* mc, const uint4& v) {
  asm volatile("multimem.st.relaxed.sys.global.v4.f32 [%0], {%1, %2, %3, %4};"
               :: "l"(mc), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w) : "memory");
}

template <int NR>
__global__ void __launch_bounds__(kThreads) multimem_kernel(const Params p) {
  using T = __nv_bfloat16;
  __shared__ float smem[33];
  const uint32_t seq = begin_call(p);
  const uint32_t V = uint32_t(p.D / 8), R = uint32_t(p.R), Tn = uint32_t(p.T);
  const uint32_t G = gridDim.x, b = blockIdx.x;
  const uint32_t r0 = uint32_t(uint64_t(R) * b / G), r1 = uint32_t(uint64_t(R) * (b + 1) / G);
  const uint32_t per = (r1 - r0) * V;
  const size_t rb = size_t(p.D) * sizeof(T);
  const char* part = static_cast<const char*>(p.partial);
  char* uc = static_cast<char*>(p.uc_base);
  char* mc = static_cast<char*>(p.mc_base);

  // Phase 1: local copy of rows [o*R + r0, o*R + r1) for every owner o into our multicast-bound input.
  copy_items<kUnroll>(uint32_t(p.N) * per, [&](uint32_t idx, const void*& s, void*& d) {
    const uint32_t o = idx / per, rem = idx - o * per, i = r0 + rem / V, v = rem % V;
    const uint32_t g = o * R + i;
    if (g >= Tn) return false;
    s = part + g * rb + size_t(v) * 16;
    d = uc + p.in_off + g * rb + size_t(v) * 16;
    return true;
  });
  block_barrier(p, seq * 4u + 1u);  // every rank's copy of rows (owner, [r0, r1)) is in place

  const RowGroups rg(V, 8);
  for (uint32_t base = r0; base < r1; base += rg.G) {
    const uint32_t i = base + rg.group;
    const uint32_t g = uint32_t(p.rank) * R + i;
    const char* res = static_cast<const char*>(p.residual) + size_t(i) * rb;
    char* rout = static_cast<char*>(p.residual_out) + size_t(i) * rb;
    if (i < r1 && g >= Tn)
      for (uint32_t v = rg.lane; v < V; v += rg.threads) st_plain(rout + size_t(v) * 16, ld_plain(res + size_t(v) * 16));
    const char* mrow = mc + p.in_off + size_t(g) * rb;
    char* mout = mc + p.out_off + size_t(g) * rb;
    norm_row<T>(p, rg, i < r1 && g < Tn, [&](uint32_t v, float* acc) { mm_ld_reduce_bf16x8(mrow + size_t(v) * 16, acc); },
                res, rout, static_cast<char*>(p.normed) + size_t(g) * rb, nullptr,
                [&](uint32_t v, const uint4& o) { mm_st_v4(mout + size_t(v) * 16, o); }, smem);
  }
  // The multimem stores must be visible in every rank's memory before the peers' blocks b read
  // them: a system-scope fence orders them before the release of the barrier flag.
  asm volatile("fence.acq_rel.sys;" ::: "memory");
  block_barrier(p, seq * 4u + 2u);

  // Phase 3: other owners' rows [r0, r1) from our unicast copy of the broadcast output.
  copy_items<kUnroll>(uint32_t(p.N) * per, [&](uint32_t idx, const void*& s, void*& d) {
    const uint32_t o = idx / per, rem = idx - o * per, i = r0 + rem / V, v = rem % V;
    const uint32_t g = o * R + i;
    if (g >= Tn || int(o) == p.rank) return false;
    s = uc + p.out_off + g * rb + size_t(v) * 16;
    d = static_cast<char*>(p.normed) + g * rb + size_t(v) * 16;
    return true;
  });
  end_call(p, seq);
}

template <typename T, int NR>
cudaError_t launch_nr(const Params& p, int mode, int ctas, cudaStream_t s) {
  if (mode == kModeOneShot) {
    const int g = int(std::min<int64_t>(ctas, p.T));
    oneshot_kernel<T, NR><<<g, kThreads, 0, s>>>(p);
  } else {
    const int g = int(std::min<int64_t>(ctas, p.R));
    twoshot_kernel<T, NR><<<g, kThreads, kTmaSmem, s>>>(p);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_t(const Params& p, int mode, int ctas, cudaStream_t s) {
  if (p.N <= 2) return launch_nr<T, 2>(p, mode, ctas, s);
  if (p.N <= 4) return launch_nr<T, 4>(p, mode, ctas, s);
  return launch_nr<T, 8>(p, mode, ctas, s);
}

template <typename F>
cudaError_t touch(F f) { cudaFuncAttributes a; return cudaFuncGetAttributes(&a, f); }

// The two-shot's TMA stages are dynamic shared memory beyond the default 48 KiB (per device).
template <typename F>
cudaError_t touch_tma(F f) {
  cudaError_t e = touch(f);
  if (e == cudaSuccess) e = cudaFuncSetAttribute(f, cudaFuncAttributeMaxDynamicSharedMemorySize, int(kTmaSmem));
  return e;
}

}  // namespace

cudaError_t launch_p2p(const Params& p, int dtype, int mode, int ctas, cudaStream_t s) {
  switch (dtype) {
    case kBF16: return launch_t<__nv_bfloat16>(p, mode, ctas, s);
    case kF16: return launch_t<__half>(p, mode, ctas, s);
    case kF32: return launch_t<float>(p, mode, ctas, s);
  }
  return cudaErrorInvalidValue;
}

__global__ void empty_kernel() {}

cudaError_t launch_empty(int ctas, cudaStream_t s) {
  empty_kernel<<<ctas, kThreads, 0, s>>>();
  return cudaGetLastError();
}

cudaError_t launch_multimem(const Params& p, int ctas, cudaStream_t s) {
  const int g = int(std::min<int64_t>(ctas, p.R));
  if (p.N <= 2) multimem_kernel<2><<<g, kThreads, 0, s>>>(p);
  else if (p.N <= 4) multimem_kernel<4><<<g, kThreads, 0, s>>>(p);
  else multimem_kernel<8><<<g, kThreads, 0, s>>>(p);
  return cudaGetLastError();
}

// Loads every kernel of this module on the current device (lazy module loading takes a process-wide
// lock; a spinning kernel on one GPU plus a module load for another could deadlock).
cudaError_t warm_up_kernels() {
  cudaError_t e = cudaSuccess;
#define TW_TOUCH(T)                                                                   \
  if (e == cudaSuccess) e = touch_tma(twoshot_kernel<T, 2>);                          \
  if (e == cudaSuccess) e = touch_tma(twoshot_kernel<T, 4>);                          \
  if (e == cudaSuccess) e = touch_tma(twoshot_kernel<T, 8>);                          \
  if (e == cudaSuccess) e = touch(oneshot_kernel<T, 2>);                              \
  if (e == cudaSuccess) e = touch(oneshot_kernel<T, 4>);                              \
  if (e == cudaSuccess) e = touch(oneshot_kernel<T, 8>);
  TW_TOUCH(__nv_bfloat16) TW_TOUCH(__half) TW_TOUCH(float)
#undef TW_TOUCH
  if (e == cudaSuccess) e = touch(multimem_kernel<2>);
  if (e == cudaSuccess) e = touch(multimem_kernel<4>);
  if (e == cudaSuccess) e = touch(multimem_kernel<8>);
  if (e == cudaSuccess) e = touch(empty_kernel);
  return e;
}

}  // namespace tw
