"""SwiGLU's two up-projections in one kernel: ``silu(x @ wg[layer]) * (x @ wu[layer])``.

Why it exists: in the decode step XLA ran the gate and the up GEMM as two kernels and their
product as a third (8B on an H200, batch 1: 30.3 + 30.9 + 2.3 us per layer,
bench/results/profile_decode_h200.json). Each short GEMM pays its own ramp-up and tail; the
lm_head, one long GEMM, streams its weight at 4.47 TB/s against their ~3.9. One launch streams
both weights and writes only the product: 58.3 us per layer in the 8B decode step at batch 1
(235 MB, 4.03 TB/s) against those 63.6 us; batch 32's step went 5.70 -> 5.38 ms.

Shape of the kernel (decode: a few rows): grid (F / block_n,). Program j accumulates
``x @ wg[layer, :, j-block]`` and ``x @ wu[layer, :, j-block]`` over all of K in fp32 (rows padded
to 16 by masked loads: Triton's dot wants M >= 16), rounds both to x's dtype (as the unfused
model stores them) and writes silu(gate) * up. No split-K: the product needs whole sums, so the
kernel only serves FFN widths whose F / 64 programs cover the SMs (``fills_the_gpu``: 224 for the
8B at TP1; a 70B's 7168 per rank at TP4 would give 112, and goes to XLA). Like layer_matmul it
takes the stacked weights and the layer index and reads the layer in place.

Lowering: Pallas' Triton backend on GPU, interpret mode elsewhere (how CI tests it).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from jax_tokenweave.kernels.skinny import NUM_SMS, check_stacked, padded_rows, tiles
from jax_tokenweave.kernels.vma import most_varying_mat, out_struct

__all__ = ["layer_swiglu", "layer_swiglu_reference", "fills_the_gpu"]

# Tile caps (each tile: the largest power of two <= its cap dividing N / K) and the Triton launch
# parameters, read at call time (scripts/profile_decode.py's variants change them).
# K tiles of 64: 128 (the other skinny kernels') made the 8B decode step on the H200 0.9% slower
# at batch 1 and 1.6% at batch 32 (4.346 / 5.139 ms against 4.309 / 5.055, same process); 32:
# 7.7% slower, 32 with 6 stages 0.4% faster at batch 1 and 1.3% slower at 32; 4 or 5 stages, 2 or
# 8 warps no better (bench/results/profile_decode_h200.json session_11 swiglu_tiles).
_BLOCK_N = 64
_BLOCK_K = 64
_WARPS = 4
_STAGES = 3


def fills_the_gpu(ffn_width: int) -> bool:
  """Whether an FFN of this (per-rank) width gives at least one program per SM."""
  return ffn_width % _BLOCK_N == 0 and ffn_width // _BLOCK_N >= NUM_SMS


def _kernel(layer_ref, x_ref, g_ref, u_ref, o_ref, *, rows, m, bk, steps):
  layer = layer_ref[0]
  row_ok = (jnp.arange(rows, dtype=jnp.int32) < m)[:, None]
  bn = g_ref.shape[-1]

  def body(i, accs):
    acc_g, acc_u = accs
    k0 = i * bk
    # rows >= m are read as 0 (never touched in memory) and masked out of the store
    xb = pltriton.load(x_ref.at[pl.ds(0, rows), pl.ds(k0, bk)], mask=row_ok, other=0)
    prec = lax.Precision.HIGHEST if xb.dtype == jnp.float32 else None
    dot = lambda w: lax.dot_general(xb, w, (((1,), (0,)), ((), ())), precision=prec,
                                    preferred_element_type=jnp.float32)
    return (acc_g + dot(g_ref[layer, pl.ds(k0, bk), :]),
            acc_u + dot(u_ref[layer, pl.ds(k0, bk), :]))

  zeros = jnp.zeros((rows, bn), jnp.float32)
  acc_g, acc_u = lax.fori_loop(0, steps, body, (zeros, zeros))
  g = acc_g.astype(o_ref.dtype).astype(jnp.float32)
  u = acc_u.astype(o_ref.dtype).astype(jnp.float32)
  out = g * jax.nn.sigmoid(g) * u
  pltriton.store(o_ref.at[pl.ds(0, rows)], out.astype(o_ref.dtype), mask=row_ok)


def layer_swiglu(x: jax.Array, w_gate: jax.Array, w_up: jax.Array, layer, *, block_n=None,
                 block_k=None, num_warps=None, num_stages=None, interpret=None) -> jax.Array:
  """x [M, K], stacked w_gate / w_up [L, K, F] -> silu(x @ w_gate[layer]) * (x @ w_up[layer])
  [M, F] in x's dtype. layer: integer scalar, may be traced."""
  layer = check_stacked("layer_swiglu", x, {"w_gate": w_gate, "w_up": w_up}, layer)
  k, f = w_gate.shape[1:]
  bn, bk = tiles("layer_swiglu", f, k, block_n, block_k, cap_n=_BLOCK_N, cap_k=_BLOCK_K,
                 n_name="F", hint="FFN widths that are not multiples of 16 go through jnp.einsum instead.")
  if interpret is None:
    interpret = jax.default_backend() != "gpu"
  return _impl(x, w_gate, w_up, layer, bn=bn, bk=bk, num_warps=int(num_warps or _WARPS),
               num_stages=int(num_stages or _STAGES), interpret=bool(interpret))


@functools.partial(jax.jit, static_argnames=("bn", "bk", "num_warps", "num_stages", "interpret"))
def _impl(x, w_gate, w_up, layer, *, bn, bk, num_warps, num_stages, interpret):
  m, k = x.shape
  num_layers, _, f = w_gate.shape
  rows = padded_rows(m)
  # all layers, the program's columns: the layer is applied inside (no w[layer] copy)
  weight = pl.BlockSpec((num_layers, k, bn), lambda j: (0, 0, j))
  return pl.pallas_call(
      functools.partial(_kernel, rows=rows, m=m, bk=bk, steps=k // bk),
      grid=(f // bn,),
      in_specs=[pl.BlockSpec((1,), lambda j: (0,)), pl.BlockSpec((m, k), lambda j: (0, 0)),
                weight, weight],
      out_specs=pl.BlockSpec((m, bn), lambda j: (0, j)),
      out_shape=out_struct((m, f), x.dtype, most_varying_mat(x, w_gate, w_up)),
      interpret=interpret,
      compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      name=f"layer_swiglu_n{bn}_k{bk}",
  )(layer, x, w_gate, w_up)


def layer_swiglu_reference(x, w_gate, w_up, layer):
  """The XLA reference: the unfused model's einsums on the layer's slices, then silu(gate) * up."""
  layer = jnp.asarray(layer).reshape(())
  prec = lax.Precision.HIGHEST if x.dtype == jnp.float32 else None
  mm = lambda w: jnp.dot(x, w[layer], precision=prec, preferred_element_type=jnp.float32).astype(x.dtype)
  return jax.nn.silu(mm(w_gate)) * mm(w_up)
