"""A skinny matmul that reads one layer of a stacked weight in place: ``x @ w[layer]``.

Why it exists: in the unrolled decode step XLA:GPU hands the o_proj dot to cuBLAS-Lt, which
takes its weight as a buffer of its own, so each layer's slice of the stacked o_proj weights was
copied first (bench/results/profile_decode_h200.json: 32 memcpys, 0.51 ms of a 5.4 ms 8B step).
A Pallas call receives the whole stacked array and the layer index (a one-element int32 array,
as the paged attention kernels take theirs) and offsets its loads itself, so nothing is copied.
Gate and up have their own kernel (layer_swiglu.py). Not used for the down projection: a SwiGLU
prologue (silu(gate) * up formed on the loaded tiles, to drop XLA's product kernel of 2.3-4.9 us)
made it 101 us per layer against XLA's ~30 on the H200 (8B, batch 1-8), so it was removed; without
the prologue, its split-K pieces handed to the reduction (dropping XLA's split-K sum kernel, 1.6
us a layer), the 8B step was 4.268 against 4.256 ms at batch 1 and equal at batch 32 (same
process, 2026-12-02), so the down projection stays XLA's.

Shape of the kernel (decode GEMV: a few rows, a weight streamed once): grid (N / block_n,
split_k). Program (n, s) accumulates ``x[:, ks] @ w[layer, ks, n-block]`` over its share ks of
K in fp32 on the tensor cores (rows padded to 16 by masked loads: Triton's dot wants M >= 16);
split_k > 1 writes fp32 pieces [split_k, M, N]: XLA sums them, or with ``sum_splits=False``
the consumer does (the one-rank fused reduction, kernels/add_rmsnorm.py, adds them to the
residual in the same pass).
split_k is chosen so that about two programs per SM stream the weight.

Lowering: Pallas' Triton backend on GPU, interpret mode elsewhere (how CI tests it).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from jax_tokenweave.kernels.skinny import NUM_SMS, check_stacked, padded_rows, pow2_at_most, tiles
from jax_tokenweave.kernels.vma import most_varying_mat, out_struct

__all__ = ["layer_matmul", "layer_matmul_reference"]

# split_k is chosen so that about this many programs stream the weight (2 per SM)
_TARGET_PROGRAMS = 2 * NUM_SMS
# Tile caps (each tile: the largest power of two <= its cap dividing N / K) and the Triton launch
# parameters, read at call time (scripts/profile_decode.py's variants change them)
_BLOCK_N = 64
_BLOCK_K = 128
_WARPS = 4
_STAGES = 3


def _plan(k: int, n: int, block_n, block_k, split_k):
  # 64 x 128 tiles: the fastest on the shape this serves, the 8B o_proj, at 8 and 32 rows (13.1 /
  # 14.6 us per call against 14.8 / 15.6 for 128 x 128; bench/results/layer_matmul_h200.json)
  bn, bk = tiles("layer_matmul", n, k, block_n, block_k, cap_n=_BLOCK_N, cap_k=_BLOCK_K,
                 n_name="N", hint="weights whose N or K is not a multiple of 16 go through jnp.einsum instead.")
  steps = k // bk
  if split_k is None:
    want = max(1, -(-_TARGET_PROGRAMS // (n // bn)))
    split_k = pow2_at_most(steps, want)
  split_k = int(split_k)
  if split_k < 1 or steps % split_k:
    raise ValueError(f"layer_matmul: split_k={split_k} must divide K / block_k = {steps}.")
  return bn, bk, split_k


def _kernel(layer_ref, x_ref, w_ref, o_ref, *, rows, m, bk, steps):
  layer = layer_ref[0]
  s = pl.program_id(1)
  row_ok = (jnp.arange(rows, dtype=jnp.int32) < m)[:, None]
  bn = w_ref.shape[-1]

  def body(i, acc):
    k0 = (s * steps + i) * bk
    # rows >= m are read as 0 (never touched in memory) and masked out of the store
    xb = pltriton.load(x_ref.at[pl.ds(0, rows), pl.ds(k0, bk)], mask=row_ok, other=0)
    wb = w_ref[layer, pl.ds(k0, bk), :]
    prec = lax.Precision.HIGHEST if xb.dtype == jnp.float32 else None
    return acc + lax.dot_general(xb, wb, (((1,), (0,)), ((), ())), precision=prec,
                                 preferred_element_type=jnp.float32)

  acc = lax.fori_loop(0, steps, body, jnp.zeros((rows, bn), jnp.float32))
  pltriton.store(o_ref.at[pl.ds(0, rows)], acc.astype(o_ref.dtype), mask=row_ok)


def layer_matmul(x: jax.Array, w: jax.Array, layer, *, block_n=None, block_k=None, split_k=None,
                 num_warps=None, num_stages=None, sum_splits: bool = True,
                 interpret=None) -> jax.Array:
  """x [M, K] @ w[layer] for stacked w [L, K, N] -> [M, N] in x's dtype (fp32 accumulation);
  with sum_splits=False the [split_k, M, N] pieces (fp32 when split_k > 1) whose sum that is.

  layer: integer scalar, may be traced. Reads only w[layer], in place. Meant for few rows
  (decode); M up to a few hundred works but re-reads nothing, so it gains nothing there.
  """
  layer = check_stacked("layer_matmul", x, {"w": w}, layer)
  bn, bk, sk = _plan(x.shape[1], w.shape[2], block_n, block_k, split_k)
  if interpret is None:
    interpret = jax.default_backend() != "gpu"
  pieces = _impl(x, w, layer, bn=bn, bk=bk, sk=sk, num_warps=int(num_warps or _WARPS),
                 num_stages=int(num_stages or _STAGES), interpret=bool(interpret))
  if not sum_splits:
    return pieces
  return pieces[0] if sk == 1 else pieces.sum(axis=0).astype(x.dtype)


@functools.partial(jax.jit, static_argnames=("bn", "bk", "sk", "num_warps", "num_stages",
                                             "interpret"))
def _impl(x, w, layer, *, bn, bk, sk, num_warps, num_stages, interpret):
  m, k = x.shape
  num_layers, _, n = w.shape
  rows = padded_rows(m)
  ks = k // sk
  out_dtype = x.dtype if sk == 1 else jnp.float32
  return pl.pallas_call(
      functools.partial(_kernel, rows=rows, m=m, bk=bk, steps=ks // bk),
      grid=(n // bn, sk),
      in_specs=[
          pl.BlockSpec((1,), lambda j, s: (0,)),
          pl.BlockSpec((m, k), lambda j, s: (0, 0)),
          # all layers, the program's columns: the layer is applied inside (no w[layer] copy)
          pl.BlockSpec((num_layers, k, bn), lambda j, s: (0, 0, j)),
      ],
      out_specs=pl.BlockSpec((None, m, bn), lambda j, s: (s, 0, j)),
      out_shape=out_struct((sk, m, n), out_dtype, most_varying_mat(x, w)),
      interpret=interpret,
      compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      name=f"layer_matmul_n{bn}_k{bk}_s{sk}",
  )(layer, x, w)


def layer_matmul_reference(x: jax.Array, w: jax.Array, layer) -> jax.Array:
  """The XLA reference: the same product through a slice and jnp.dot (fp32 accumulation)."""
  wl = lax.dynamic_index_in_dim(w, jnp.asarray(layer).reshape(()), axis=0, keepdims=False)
  prec = lax.Precision.HIGHEST if x.dtype == jnp.float32 else None
  return jnp.dot(x, wl, precision=prec, preferred_element_type=jnp.float32).astype(x.dtype)
