"""The attention block's q/k/v projection in one kernel, RoPE in its epilogue: from the normed
hidden x and the stacked q/k/v weights, read in place, to the rotated q and k and the v that the
decode-attention kernel takes as they are.

Why it exists: in the unrolled decode step XLA ran the three projections as one split-K GEMM
(14.6 us per layer for 50 MB, 8B at batch 1 on the H200) and a second kernel that summed its
pieces, added RoPE and packed q/k/v for the attention kernel (2.2 us per layer). Here they are one
kernel of 16.6 us; the 8B step in one process: -0.2% / -0.9% / -0.7% at batch 1 / 8 / 32
(bench/results/profile_decode_h200.json session_13).

Shape of the kernel (decode: a few rows): grid (H + 2 KVH, (hd / 2) / block_h, split_k). Program
(j, c, s) computes head j of the concatenation [q heads, k heads, v heads] at columns c * block_h
.. +block_h of *both halves* of the head dim, as two fp32 accumulators over its share s of K (rows
padded to 16 by masked loads: Triton's dot wants M >= 16). Rotate-half RoPE pairs column i with
column i + hd/2, so the two accumulators are exactly what the rotation of those columns needs and
no register shuffle is needed. With split_k > 1 each program stores its partial sums (fp32
scratch) and the last of the split_k programs of a column tile to finish (an arrival counter)
adds them up and finishes: rounds to x's dtype, adds the bias, rotates, stores -- the rounding
as the model's einsums store their products (models/layers.qkv, the reference of the tests).
Defaults: block_h 64 (a whole head of 128 per program: two 128-byte runs per weight row),
K tiles of 128, 3 stages, split_k 4: 192 programs for the 8B. Measured and not kept: no split
with 32-column tiles (96 programs, 2.2 TB/s: +3.6% on the step at batch 1; with K 256 and 4
stages as fast as XLA), 16-column tiles (+9% against XLA), split 2 or 8 (+0.8-1.0% at batch 1).

``kv_head0`` (traced; the replicated-KV case tp > num_kv_heads) is the first of the ``kv_heads``
k/v heads computed, so a rank projects only the one it reads.

Lowering: Pallas' Triton backend on GPU, interpret mode elsewhere (how CI tests it).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from jax_tokenweave.kernels.arrival import last_to_arrive
from jax_tokenweave.kernels.skinny import padded_rows, pow2_at_most
from jax_tokenweave.kernels.vma import most_varying_mat, out_struct

__all__ = ["layer_qkv", "fits"]

# Column tile per half of the head dim, K tile, Triton launch parameters, split-K (read at call
# time: scripts/profile_decode.py's variants change them; the docstring says what was measured)
_BLOCK_H = 64
_BLOCK_K = 128
_WARPS = 4
_STAGES = 3
# K in this many pieces at most (a power of two dividing D / block_k)
_SPLIT_K = 4
# scripts/profile_decode.py's variant "qkv_xla" turns the kernel off (the einsums instead)
_ENABLED = True


def fits(hidden: int, head_dim: int) -> bool:
  """Whether the kernel's tiles (>= 16, powers of two dividing D and hd / 2) fit these sizes."""
  return (_ENABLED and head_dim % 32 == 0 and pow2_at_most(head_dim // 2, _BLOCK_H) >= 16
          and pow2_at_most(hidden, _BLOCK_K) >= 16)


def _kernel(idx_ref, x_ref, cos_ref, sin_ref, *refs, rows, m, bh, bk, steps, heads, kv_heads,
            split_k, has_bias, interpret):
  n_w = 6 if has_bias else 3
  w_refs, refs = refs[:n_w], refs[n_w:]
  wq_ref, wk_ref, wv_ref = w_refs[:3]
  bq_ref, bk_ref, bv_ref = w_refs[3:] if has_bias else (None,) * 3
  if split_k > 1:   # the arrival counters (input, aliased), the pieces' scratch, the counters
    _, q_ref, k_ref, v_ref, part_ref, cnt_ref = refs
  else:
    q_ref, k_ref, v_ref = refs
  j = pl.program_id(0)
  c = pl.program_id(1)
  s = pl.program_id(2)
  layer = idx_ref[0]
  kv0 = idx_ref[1]
  half = q_ref.shape[-1] // 2
  lo = c * bh            # this program's columns in the first half of the head dim ...
  hi = half + c * bh     # ... and their RoPE partners in the second
  row_ok = (jnp.arange(rows, dtype=jnp.int32) < m)[:, None]
  load = lambda ref, col: pltriton.load(ref.at[pl.ds(0, rows), pl.ds(col, bh)], mask=row_ok, other=0)

  def project(w_ref, b_ref, head, out_ref, out_head, rope):
    def body(i, accs):
      a_lo, a_hi = accs
      k0 = (s * steps + i) * bk
      # rows >= m are read as 0 (never touched in memory) and masked out of the stores
      xb = pltriton.load(x_ref.at[pl.ds(0, rows), pl.ds(k0, bk)], mask=row_ok, other=0)
      prec = lax.Precision.HIGHEST if xb.dtype == jnp.float32 else None
      dot = lambda col: lax.dot_general(
          xb, w_ref[layer, pl.ds(k0, bk), head, pl.ds(col, bh)], (((1,), (0,)), ((), ())),
          precision=prec, preferred_element_type=jnp.float32)
      return a_lo + dot(lo), a_hi + dot(hi)

    zeros = jnp.zeros((rows, bh), jnp.float32)
    a_lo, a_hi = lax.fori_loop(0, steps, body, (zeros, zeros))

    def finish(a_lo, a_hi):
      dt = out_ref.dtype
      f32 = lambda a: a.astype(dt).astype(jnp.float32)   # a value as the model stores it
      y_lo, y_hi = f32(a_lo), f32(a_hi)
      if b_ref is not None:
        y_lo = f32(y_lo + b_ref[layer, head, pl.ds(lo, bh)].astype(jnp.float32)[None, :])
        y_hi = f32(y_hi + b_ref[layer, head, pl.ds(hi, bh)].astype(jnp.float32)[None, :])
      if rope:   # rotate-half: out = y * cos + [-y_hi, y_lo] * sin, cos/sin in x's dtype
        t = lambda ref, col: f32(load(ref, col))
        y_lo, y_hi = (y_lo * t(cos_ref, lo) - y_hi * t(sin_ref, lo),
                      y_hi * t(cos_ref, hi) + y_lo * t(sin_ref, hi))
      for col, y in ((lo, y_lo), (hi, y_hi)):
        pltriton.store(out_ref.at[pl.ds(0, rows), out_head, pl.ds(col, bh)], y.astype(dt), mask=row_ok)

    if split_k == 1:
      finish(a_lo, a_hi)
      return
    # split-K: each program stores its partial sums; the last of the split_k programs of these
    # columns to arrive adds them up and finishes (kernels/arrival.py says why it sees them all)
    for col, a in ((lo, a_lo), (hi, a_hi)):
      pltriton.store(part_ref.at[s, pl.ds(0, rows), j, pl.ds(col, bh)], a, mask=row_ok)

    @pl.when(last_to_arrive(cnt_ref, (j, c), split_k, interpret=interpret))
    def _last():
      rows_ok = jnp.broadcast_to(row_ok[None], (split_k, rows, 1))   # every piece, real rows
      total = lambda col: jnp.sum(pltriton.load(
          part_ref.at[pl.ds(0, split_k), pl.ds(0, rows), j, pl.ds(col, bh)], mask=rows_ok, other=0),
          axis=0)
      finish(total(lo), total(hi))

  @pl.when(j < heads)
  def _q():
    project(wq_ref, bq_ref, j, q_ref, j, rope=True)

  @pl.when((j >= heads) & (j < heads + kv_heads))
  def _k():
    project(wk_ref, bk_ref, kv0 + j - heads, k_ref, j - heads, rope=True)

  @pl.when(j >= heads + kv_heads)
  def _v():
    project(wv_ref, bv_ref, kv0 + j - heads - kv_heads, v_ref, j - heads - kv_heads, rope=False)


def layer_qkv(x, wq, wk, wv, layer, cos, sin, *, biases=None, kv_head0=0, kv_heads=None,
              block_h=None, block_k=None, split_k=None, num_warps=None, num_stages=None,
              interpret=None):
  """x [M, D]; stacked wq [L, D, H, hd], wk / wv [L, D, KVH, hd]; cos, sin [M, hd] (any float
  dtype; rounded to x's) -> q [M, H, hd], k, v [M, kv_heads, hd] in x's dtype, q and k rotated.

  biases: None or stacked (bq [L, H, hd], bk, bv [L, KVH, hd]), added before the rotation.
  kv_head0 (integer scalar, may be traced) and kv_heads (default KVH): the k/v heads computed.
  layer: integer scalar, may be traced. Reads only layer ``layer`` of the weights, in place.
  """
  fn = "layer_qkv"
  if x.ndim != 2 or wq.ndim != 4 or wk.shape != wv.shape or wk.ndim != 4 \
      or wq.shape[:2] != wk.shape[:2] or wq.shape[3] != wk.shape[3] or x.shape[1] != wq.shape[1]:
    raise ValueError(f"{fn}: x must be [M, D], wq [L, D, H, hd] and wk, wv [L, D, KVH, hd]; got "
                     f"x{list(x.shape)}, wq{list(wq.shape)}, wk{list(wk.shape)}, wv{list(wv.shape)}.")
  if any(w.dtype != x.dtype for w in (wq, wk, wv)):
    raise ValueError(f"{fn}: x is {x.dtype}, wq/wk/wv {wq.dtype}/{wk.dtype}/{wv.dtype}; cast x to "
                     "the weights' dtype.")
  m, d = x.shape
  num_layers, _, heads, hd = wq.shape
  kv_heads = wk.shape[2] if kv_heads is None else int(kv_heads)
  if not 1 <= kv_heads <= wk.shape[2]:
    raise ValueError(f"{fn}: kv_heads={kv_heads} must be in [1, KVH={wk.shape[2]}].")
  if cos.shape != (m, hd) or sin.shape != (m, hd):
    raise ValueError(f"{fn}: cos and sin must be [M, hd] = [{m}, {hd}], got {list(cos.shape)} and "
                     f"{list(sin.shape)}.")
  if biases is not None:
    want = ((num_layers, heads, hd), (num_layers,) + wk.shape[2:], (num_layers,) + wk.shape[2:])
    if tuple(b.shape for b in biases) != want:
      raise ValueError(f"{fn}: biases must be stacked [L, H, hd], [L, KVH, hd], [L, KVH, hd] = "
                       f"{[list(s) for s in want]}, got {[list(b.shape) for b in biases]}.")
  half = hd // 2
  bh = pow2_at_most(half, _BLOCK_H) if block_h is None else int(block_h)
  bk = pow2_at_most(d, _BLOCK_K) if block_k is None else int(block_k)
  if hd % 2 or half % bh or d % bk or bh < 16 or bk < 16:
    raise ValueError(f"{fn}: block_h={bh} / block_k={bk} must be >= 16 and divide hd/2={half} / "
                     f"D={d}; shapes for which `fits` is False go through the einsums instead.")
  sk = pow2_at_most(d // bk, _SPLIT_K) if split_k is None else int(split_k)
  if sk < 1 or (d // bk) % sk or sk & (sk - 1):
    raise ValueError(f"{fn}: split_k={sk} must be a power of two dividing D / block_k = {d // bk}.")
  idx = jnp.stack([jnp.asarray(layer).reshape(()), jnp.asarray(kv_head0).reshape(())]).astype(jnp.int32)
  if interpret is None:
    interpret = jax.default_backend() != "gpu"
  return _impl(x, wq, wk, wv, idx, cos.astype(x.dtype), sin.astype(x.dtype),
               None if biases is None else tuple(biases), kv_heads=kv_heads, bh=bh, bk=bk, sk=sk,
               num_warps=int(num_warps or _WARPS), num_stages=int(num_stages or _STAGES),
               interpret=bool(interpret))


@functools.partial(jax.jit, static_argnames=("kv_heads", "bh", "bk", "sk", "num_warps",
                                             "num_stages", "interpret"))
def _impl(x, wq, wk, wv, idx, cos, sin, biases, *, kv_heads, bh, bk, sk, num_warps, num_stages,
          interpret):
  m, d = x.shape
  heads, hd = wq.shape[2:]
  whole = lambda a: pl.BlockSpec(a.shape, lambda j, c, s: (0,) * len(a.shape))
  # every input whole: the program picks its head and columns (and the layer) inside, so no
  # weight slice is copied; the outputs whole: each program stores its own columns
  args = [idx, x, cos, sin, wq, wk, wv] + list(biases or ())
  mat = most_varying_mat(x, wq, wk, wv)
  num_heads = heads + 2 * kv_heads
  out_shape = (out_struct((m, heads, hd), x.dtype, mat),
               out_struct((m, kv_heads, hd), x.dtype, mat),
               out_struct((m, kv_heads, hd), x.dtype, mat))
  aliases = {}
  if sk > 1:   # the pieces' scratch and the arrival counters (zero on entry, aliased)
    counters = jnp.zeros((num_heads, hd // 2 // bh), jnp.int32)
    aliases = {len(args): len(out_shape) + 1}
    args.append(counters)
    out_shape += (out_struct((sk, m, num_heads, hd), jnp.float32, mat),
                  out_struct(counters.shape, jnp.int32, mat))
  out = pl.pallas_call(
      functools.partial(_kernel, rows=padded_rows(m), m=m, bh=bh, bk=bk, steps=d // bk // sk,
                        heads=heads, kv_heads=kv_heads, split_k=sk, has_bias=biases is not None,
                        interpret=interpret),
      grid=(num_heads, hd // 2 // bh, sk),
      in_specs=[whole(a) for a in args],
      out_specs=[whole(o) for o in out_shape],
      out_shape=out_shape,
      input_output_aliases=aliases,
      interpret=interpret,
      compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      name=f"layer_qkv_h{bh}_k{bk}_s{sk}",
  )(*args)
  return tuple(out[:3])
