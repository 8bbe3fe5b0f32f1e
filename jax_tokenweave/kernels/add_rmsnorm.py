"""Residual add + RMSNorm in one kernel: the fused reduction when the tensor-parallel axis has a
single rank (there is nothing to all-reduce, so it is the residual add and the norm).

Why it exists: XLA:GPU emitted two kernels per reduction for it in the decode step, the add
(which also summed layer_matmul's split-K pieces) and the norm, ~1.7 us each, 2 x 32 per 8B step
on an H200 (bench/results/profile_decode_h200.json). This kernel does both in one pass per
row and takes the split-K pieces themselves, so the o_proj partial is never summed separately.
Deferring it instead into the matmuls around it (the residual add in the o_proj / down_proj
split-K epilogue, the norm applied by q/k/v and gate/up as they load their input: no launch of
its own) made the step 2.3% / 1.8% / 4.5% slower at batch 1 / 8 / 32: q/k/v and the epilogues
got slower by more than the launches cost (profile_decode_h200.json session_14).

    partials  [S, T, D]  S pieces of the partial sum (S = 1: an ordinary partial), any float dtype
    residual  [T, D]
    gamma     [D], or LayerOf a stacked [L, D] (read in place: no copy of the layer's row)
    ->  residual_out = round(f32(residual) + sum_s f32(partials[s]))          residual.dtype
        normed       = round(f32(r) * rsqrt(mean(f32(r)^2) + eps) * f32(gamma)), r = residual_out

The rounding is fused.py's contract: the norm is computed from the stored residual_out.

Shape of the kernel: one program per token row, the whole row (D padded to a power of two by
masked loads) in registers. No program reads what another writes, so nothing is synchronised.
Lowering: Pallas' Triton backend on GPU, interpret mode elsewhere (how CI tests it).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from jax_tokenweave.kernels.layer_of import LayerOf
from jax_tokenweave.kernels.skinny import NUM_SMS
from jax_tokenweave.kernels.vma import most_varying_mat, out_struct

__all__ = ["add_rmsnorm", "add_rmsnorm_reference"]


def _kernel(layer_ref, p_ref, r_ref, g_ref, normed_ref, res_ref, *, pieces, dim, eps):
  width = 1 << (dim - 1).bit_length()
  cols = pl.ds(0, width)
  ok = jnp.arange(width, dtype=jnp.int32) < dim
  mask = None if width == dim else ok[None]   # unmasked where it can be (interpret mode under
  # check_vma fails on masked accesses of varying refs; a power-of-two D needs no mask)

  def load(ref, *idx):
    view = ref.at[idx + (cols,)]
    return (view[...] if mask is None else pltriton.load(view, mask=mask, other=0))[0]

  def store(ref, val):
    view = ref.at[pl.ds(0, 1), cols]
    if mask is None:
      view[...] = val[None]
    else:
      pltriton.store(view, val[None], mask=mask)

  h = load(p_ref, pl.ds(0, 1)).astype(jnp.float32)
  for s in range(1, pieces):   # the pieces first, then the residual: the reference's order
    h = h + load(p_ref, pl.ds(s, 1)).astype(jnp.float32)
  h = load(r_ref, pl.ds(0, 1)).astype(jnp.float32) + h
  stored = h.astype(res_ref.dtype)
  store(res_ref, stored)
  hf = stored.astype(jnp.float32)
  inv = jax.lax.rsqrt(jnp.sum(hf * hf) / dim + eps)
  g = load(g_ref, pl.ds(layer_ref[0], 1)).astype(jnp.float32)
  store(normed_ref, (hf * inv * g).astype(normed_ref.dtype))


def add_rmsnorm(partials: jax.Array, residual: jax.Array, gamma: jax.Array, *, eps: float,
                interpret=None) -> tuple[jax.Array, jax.Array]:
  """-> (normed [T, D], residual_out [T, D]), both in residual's dtype (see the module doc)."""
  if partials.ndim == 2:
    partials = partials[None]
  if partials.ndim != 3 or residual.ndim != 2 or partials.shape[1:] != residual.shape:
    raise ValueError(f"add_rmsnorm: partials must be [S, T, D] (or [T, D]) and residual [T, D] of "
                     f"the same T, D; got partials{list(partials.shape)}, residual"
                     f"{list(residual.shape)}.")
  if gamma.shape != residual.shape[1:]:
    raise ValueError(f"add_rmsnorm: gamma must be [{residual.shape[1]}] (or LayerOf a stacked "
                     f"[L, {residual.shape[1]}]), got {list(gamma.shape)}.")
  if isinstance(gamma, LayerOf):
    stacked, layer = gamma.stacked, jnp.asarray(gamma.layer, jnp.int32).reshape(1)
  else:
    stacked, layer = gamma[None], jnp.zeros((1,), jnp.int32)
  if interpret is None:
    interpret = jax.default_backend() != "gpu"
  pieces, t, d = partials.shape
  # Fewer rows than SMs (decode): each row's program gets 16 warps, the most loads in flight (the
  # 8B decode step on the H200 was 0.5% faster at batch 1 and 32 than with 4 / 8 warps,
  # bench/results/profile_decode_h200.json). Many rows: more warps as the row data grows, 4 for
  # one 4096-wide partial, 8 for 4 pieces, at most 16.
  warps = 16 if t < NUM_SMS else min(16, max(4, (pieces * d) // 4096 * 2))
  return _impl(layer, partials, residual, stacked, eps=float(eps), warps=warps,
               interpret=bool(interpret))


@functools.partial(jax.jit, static_argnames=("eps", "warps", "interpret"))
def _impl(layer, partials, residual, gamma, *, eps, warps, interpret):
  pieces, t, d = partials.shape
  row = lambda i: (i, 0)
  out = out_struct((t, d), residual.dtype, most_varying_mat(partials, residual, gamma))
  return pl.pallas_call(
      functools.partial(_kernel, pieces=pieces, dim=d, eps=eps),
      grid=(t,),
      in_specs=[pl.BlockSpec((1,), lambda i: (0,)),
                pl.BlockSpec((pieces, None, d), lambda i: (0, i, 0)),
                pl.BlockSpec((1, d), row),
                pl.BlockSpec(gamma.shape, lambda i: (0, 0))],   # all layers: the row is picked inside
      out_specs=(pl.BlockSpec((1, d), row), pl.BlockSpec((1, d), row)),
      out_shape=(out, out),
      interpret=interpret,
      compiler_params=pltriton.CompilerParams(num_warps=warps, num_stages=1),
      name=f"add_rmsnorm_s{pieces}",
  )(layer, partials, residual, gamma)


def add_rmsnorm_reference(partials, residual, gamma, *, eps: float):
  """The same in XLA."""
  gamma = gamma.slice() if isinstance(gamma, LayerOf) else gamma
  if partials.ndim == 2:
    partials = partials[None]
  h = residual.astype(jnp.float32) + partials.astype(jnp.float32).sum(0)
  stored = h.astype(residual.dtype)
  hf = stored.astype(jnp.float32)
  inv = jax.lax.rsqrt(jnp.mean(hf * hf, axis=-1, keepdims=True) + eps)
  return (hf * inv * gamma.astype(jnp.float32)).astype(residual.dtype), stored
