"""Reading the next GEMM's weights into L2 from kernels that leave HBM idle.

Why: in the one-rank decode step a layer runs ~18 us of latency-bound kernels between its GEMMs
(8B on an H200 at batch 1: the two norms, attention and its combine; each a few programs on a
few SMs, bench/results/profile_decode_h200.json) while the HBM has nothing to do, and each GEMM
then streams its whole weight. Such a kernel gets extra programs that read the first bytes of
the weight the next GEMM streams, so that its first tiles come from L2 (50 MB on the H200).

A ``WarmTarget`` names what to read: layer ``layer`` of each stacked weight [L, ...] (row-major:
a GEMM over K streams it from row 0 on; with split-K in ``pieces`` equal runs, each from its
start). ``warm_plan`` sizes the reads to a byte budget (the kernel's: about what HBM delivers
while the kernel runs anyway) and views each weight as [L, pieces, rows, width] (a reshape: no
copy); ``warm`` is the body of the extra programs. The loads' values are folded into one float
per program and stored to a scratch output nobody reads: a store that depends on them is what
keeps the compiler from dropping the loads. They carry ``evict_last`` so that the kernel's own
traffic does not push them out first.

Nothing here changes a result; only where the next GEMM finds its weights.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from jax_tokenweave.kernels.skinny import NUM_SMS
from jax_tokenweave.kernels.vma import out_struct

__all__ = ["WarmTarget", "WarmPlan", "warm_plan", "warm"]

PROGRAMS = NUM_SMS          # extra programs a warming kernel adds: one per SM
_TILE_BYTES = 16 * 1024     # one load of a warming program
_MAX_WIDTH = 512            # elements per row of a weight's [rows, width] view


@dataclasses.dataclass(frozen=True)
class WarmTarget:
  stacked: tuple            # stacked weights [L, ...], one dtype each
  layer: int | jax.Array    # the layer the next GEMM reads (an int, or an int32 scalar)
  pieces: int = 1           # the GEMM streams each of `pieces` equal parts of a layer from its start


@dataclasses.dataclass(frozen=True)
class WarmPlan:
  """Static: per weight, its view shape [L, pieces, rows, width], the tiles of `tile_rows` rows
  to read (the first `tiles_per_piece` of each piece) -- and the bytes that makes."""
  views: tuple              # ((L, pieces, rows, width), ...)
  tile_rows: tuple
  tiles_per_piece: tuple
  programs: int

  @property
  def num_tiles(self) -> tuple:
    return tuple(v[1] * t for v, t in zip(self.views, self.tiles_per_piece))

  def bytes_read(self, dtypes) -> int:
    return sum(n * r * v[3] * jnp.dtype(d).itemsize
               for n, r, v, d in zip(self.num_tiles, self.tile_rows, self.views, dtypes))


def _width(elements: int) -> int:
  w = 1
  while w * 2 <= _MAX_WIDTH and elements % (w * 2) == 0:
    w *= 2
  return w


def warm_plan(target: WarmTarget | None, budget_bytes: int, programs: int = PROGRAMS):
  """(plan, views of the weights, the layer as an int32 [1]) reading about `budget_bytes` of
  `target` (the same share of each weight), or None when there is nothing to read."""
  if target is None or budget_bytes <= 0 or programs <= 0:
    return None
  total = sum(w.size // w.shape[0] * w.dtype.itemsize for w in target.stacked)
  share = min(1.0, budget_bytes / max(1, total))
  views, tile_rows, per_piece, arrays = [], [], [], []
  for w in target.stacked:
    per_layer = w.size // w.shape[0]
    if per_layer % target.pieces:
      continue
    width = _width(per_layer // target.pieces)
    if width < 64:      # rows too narrow for full-width loads: not worth reading ahead
      continue
    rows = per_layer // target.pieces // width
    tr = max(1, min(rows, _TILE_BYTES // (width * w.dtype.itemsize)))
    tiles = int(share * rows) // tr
    if tiles == 0:
      continue
    view = (w.shape[0], target.pieces, rows, width)
    views.append(view)
    tile_rows.append(tr)
    per_piece.append(tiles)
    arrays.append(w.reshape(view))
  if not arrays:
    return None
  layer = jnp.asarray(target.layer, jnp.int32).reshape(1)
  return WarmPlan(tuple(views), tuple(tile_rows), tuple(per_piece), int(programs)), arrays, layer


def warm(plan: WarmPlan, layer_ref, weight_refs, sink_ref, p):
  """The body of warming program p (0 <= p < plan.programs): read tiles p, p + P, ... of each
  weight (a program past a weight's last tile reads that tile again: it is in L2 by then) and
  store their maximum to sink_ref[p]."""
  layer = layer_ref[0]
  # elementwise maxima per tile shape, reduced once at the end: a reduction per tile would put a
  # barrier between the loads and serialise them
  accs = {}
  for ref, view, tr, tpp, n in zip(weight_refs, plan.views, plan.tile_rows, plan.tiles_per_piece,
                                   plan.num_tiles):
    for j in range(-(-n // plan.programs)):
      t = jnp.minimum(p + j * plan.programs, n - 1)
      tile = pltriton.load(ref.at[layer, t // tpp, pl.ds((t % tpp) * tr, tr), :],
                           eviction_policy="evict_last")
      key = (tile.shape, tile.dtype)
      accs[key] = tile if key not in accs else jnp.maximum(accs[key], tile)
  m = None
  for a in accs.values():
    a = jnp.max(a).astype(jnp.float32)
    m = a if m is None else jnp.maximum(m, a)
  sink_ref[pl.ds(p, 1)] = jnp.full((1,), m, jnp.float32)


def sink_shape(plan: WarmPlan, mat) -> jax.ShapeDtypeStruct:
  """The scratch output of the warming programs (one float each, never read); mat: the
  kernel's manual-axis type (kernels/vma.py)."""
  return out_struct((plan.programs,), jnp.float32, mat)
