"""Pallas attention over the paged KV cache: a flash-decoding kernel for one query per sequence
and a ragged kernel for the flat batch of continuous batching (decode rows + prefill chunks).

Cache layout (fixed; the engine writes it): ``k_pool``/``v_pool`` are
``[L, KVH, num_pages, page_size, head_dim]``. Both kernels take the *whole* pool plus a (possibly
traced) ``layer`` scalar and read the layer's pages in place: the layer index goes into the
kernel as a one-element int32 array and is applied inside the kernel to the pool ref (pointer
arithmetic on GPU), so no ``pool[layer]`` copy is ever made in XLA. Only pages that hold valid
positions are read; ``block_tables`` entries past a sequence's pages are never dereferenced
(they are replaced by page 0, whose contents are masked out).

Lowering: Pallas' Triton backend on GPU, interpret mode elsewhere (``interpret=None``). Why
Triton and not Mosaic GPU (Mosaic was not measured): the decode kernel is a memory-bound gather
of 16-128-token pages through a block table with a few query rows (G = H // KVH padded to 16);
Triton's pointer loads express the gather directly, its pipeliner keeps page loads in flight,
the same lowering runs on jax 0.10.2 and 0.11.2 and the same kernel runs in interpret mode for
CI. Mosaic GPU's strengths (TMA, wgmma with M >= 64) do not fit a 16-row kernel whose tiles are
single pages, and jax 0.11.2's Mosaic attention example refused bf16 here (DESIGN.md section 9).
What the measurements say there is left to win: on one H200 (jax 0.11.2, Llama-3.1-8B layer,
bf16, copy bandwidth 3.95 TB/s measured in the same way; bench/results/paged_attention_h200.json)
the default kernel at pages of 64 reads the *marginal* KV at 3.77 TB/s (batch 8: 85.6 us at
8192 tokens - 32.2 us at 2048 = 53.4 us for 201 MB), 95% of the copy rate; its time is
1.26x the valid-KV roofline at batch 8 / 8192 (cuDNN on a dense cache: 96.7 us, 1.42x) and
1.20x at batch 32 / 8192. The rest is a fixed ~15 us per call in the timing loop (cuDNN shows
the same: 22 us at batch 8 / 512, 17 MB), which no kernel-internal change removes.

Loads: with pages >= 16 tokens each page of an inner step is its own [page_size, head_dim]
load addressed by a scalar page id (default ``kv_gather=False``). Gathering several pages as
one tile through a vector of page ids (``kv_gather=True``, needed for 8-token pages: Triton's
dot wants N, K >= 16) measured 1.6x slower at pages of 16 (batch 8 / 8192: 150 us against
93 us). ``block_k`` (KV tokens per step) defaults to 64: 128 measured 1.3x (pages of 16) to
2.3x (pages of 64) slower at batch 8 / 8192 and within 10% at 2048; num_stages=3 no better
than 2. The ragged kernel uses the same loads; its per-page version is checked on the GPU but
was not timed (the second GPU call ran out of time first); the gathered version took 135 us for
a 512-token chunk on 1024 tokens of context plus 31 decode rows (83 TFLOP/s).

Appending (``paged_decode_attention(..., new_kv=(k_new, v_new))``, what the engine's decode
steps use): the token at position ``lengths[b] - 1`` is this step's. Its K/V come in as
arguments (as kernels.layer_qkv writes them, next to q); split 0 of each (sequence, kv head)
adds that key to its partial softmax from registers and stores K/V into the page slot, the pools
being aliased outputs. The splits read
only positions ``< lengths[b] - 1`` from the pages, so nothing in the call reads the slot being
written (no ordering between programs is needed). This replaces two XLA scatters per layer
(~2.7 us each in a decode step on the H200, bench/results/profile_decode_h200.json).

Split rule of ``paged_decode_attention`` (flash-decoding), static from shapes:
``num_splits = clamp(floor(3 * 132 / (B * KVH)), 1, max(1, max_pages * page_size // 128))`` --
as many (batch, kv head, split) programs as fit on an H200 at once (132 SMs, 3 programs each:
a program holds 2 stages of a 64-token K and V tile, 64 KB of the SM's 228 KB of shared
memory), never more, and never splits shorter than 128 tokens of capacity. Rounding down
keeps the programs in one wave: the earlier rule, ceil(2 * 132 / (B * KVH)), gave batch 32 two
splits, 512 programs, 1.3 waves; this one gives it one split, and its 8B decode step went from
5.31 to 5.14 ms in the same run (bench/results/profile_decode_h200.json, session_10
first_run); batch 8 gets six splits (five before). The split *boundaries* are dynamic: split
``s`` of sequence ``b`` handles pages ``[s * pps_b, (s + 1) * pps_b)`` with
``pps_b = round_up(ceil(ceil(lengths[b] / page_size) / num_splits), pages_per_block)``, so the
splits share the sequence's *valid* pages evenly whatever the block-table capacity (a sequence
of 560 tokens in a capacity of 8192 still spreads over several SMs). ``pages_per_split`` (a
static count) overrides this with fixed boundaries ``[s * pps, (s + 1) * pps)``, and
``num_splits`` fixes the count. With a single split the kernel normalises and writes the output
itself; otherwise each program writes its partial (unnormalised o, running max m, sum l, fp32)
and the last split of each (sequence, kv head) to finish, found by an arrival counter, combines
them (as a second kernel it cost 3.1 us a layer at batch 1 on the H200; fused, the 8B step was
0.1-0.4% faster at batch 1 / 8 / 32 in the same process, bench/results/profile_decode_h200.json
session_12). Splits
past a sequence's valid pages exit at once and the combine does not read them: before that, a
512-token sequence in a capacity of 8192 (33 splits, 8 with pages) paid a second wave of idle
programs. The 8B decode step at batch 1 and 512 valid on the H200 took 4.3% longer at capacity
8192 than at 2048; now 0.5% (bench/results/decode_h200.json and its previous_run).

The ragged kernel's grid is (query block, kv head): query blocks of BQ rows of one sequence
(BQ * G_pad >= 64 matrix rows, G_pad = G rounded up to a power of two), enumerated in XLA from
``query_start``/``num_seqs`` into a small [3, NB] table (sequence, first row, end row) with
``NB = ceil(T / BQ) + S + 2`` (an upper bound on the blocks any ``query_start`` needs, including
the blocks that write zeros into the padding rows). A block loops over KV blocks up to its
causal limit; KV blocks that every row of the block sees in full skip the masking. The ragged
kernel does not split along the KV axis: pure-decode batches with long contexts belong to
``paged_decode_attention``.

Imports: jax, numpy, the standard library, kernels.vma, kernels.arrival and kernels.skinny (the SM
count).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from jax_tokenweave.kernels.arrival import last_to_arrive
from jax_tokenweave.kernels.skinny import NUM_SMS
from jax_tokenweave.kernels.vma import most_varying_mat, out_struct

__all__ = [
    "paged_decode_attention",
    "ragged_paged_attention",
    "paged_attention_reference",
    "decode_num_splits",
]

# 3 decode programs fit on an SM at a time (see the split rule in the docstring)
_WAVE_PROGRAMS = 3 * NUM_SMS
_MIN_SPLIT_TOKENS = 128
# Default KV tokens per inner-loop step (``block_k // page_size`` pages loaded per step).
_DEFAULT_BLOCK_K = 64
# The decode kernel's Triton launch parameters (read at trace time: scripts/profile_decode.py's
# variants change them).
_DECODE_WARPS = 4
_DECODE_STAGES = 2
# Default number of matrix rows (query rows x padded q heads of a group) of a ragged query block.
_DEFAULT_RAGGED_ROWS = 64
_NEG = -1e30  # finite "minus infinity": exp2(_NEG - m) == 0 and _NEG - _NEG is no NaN
_LOG2E = math.log2(math.e)
_FLOAT_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


# ----------------------------------------------------------------------------------------------
# helpers


def _is_pow2(n: int) -> bool:
  return n >= 1 and (n & (n - 1)) == 0


def _next_pow2(n: int) -> int:
  return 1 << max(0, (int(n) - 1).bit_length())


def _resolve_interpret(interpret):
  if interpret is None:
    return jax.default_backend() != "gpu"
  return bool(interpret)


def _check_pool(q, k_pool, v_pool, block_tables, fn):
  if k_pool.ndim != 5:
    raise ValueError(
        f"{fn}: k_pool must be [L, KVH, num_pages, page_size, head_dim], got shape "
        f"{k_pool.shape}; pass the whole pool, not pool[layer] (the layer is an argument).")
  if v_pool.shape != k_pool.shape:
    raise ValueError(f"{fn}: v_pool shape {v_pool.shape} != k_pool shape {k_pool.shape}; both "
                     "pools must have the same [L, KVH, num_pages, page_size, head_dim] shape.")
  if not (q.dtype == k_pool.dtype == v_pool.dtype):
    raise ValueError(f"{fn}: q, k_pool, v_pool dtypes differ ({q.dtype}, {k_pool.dtype}, "
                     f"{v_pool.dtype}); cast them to one dtype (bf16, f16 or f32).")
  if jnp.dtype(q.dtype) not in _FLOAT_DTYPES:
    raise ValueError(f"{fn}: dtype {q.dtype} unsupported; use bfloat16, float16 or float32.")
  _, kvh, _, page_size, head_dim = k_pool.shape
  if q.ndim != 3:
    raise ValueError(f"{fn}: q must be 3-D, got shape {q.shape}.")
  if q.shape[-1] != head_dim:
    raise ValueError(f"{fn}: q head_dim {q.shape[-1]} != pool head_dim {head_dim}.")
  if q.shape[1] % kvh:
    raise ValueError(f"{fn}: q heads {q.shape[1]} not a multiple of kv heads {kvh}; under "
                     "shard_map shard q heads and kv heads by the same factor.")
  if not _is_pow2(page_size) or page_size < 8:
    raise ValueError(f"{fn}: page_size {page_size} must be a power of two >= 8.")
  if not _is_pow2(head_dim) or head_dim < 16:
    raise ValueError(f"{fn}: head_dim {head_dim} must be a power of two >= 16 (Triton tiles); "
                     "pad the head dim of q and the pools.")
  if block_tables.ndim != 2 or block_tables.dtype != jnp.int32:
    raise ValueError(f"{fn}: block_tables must be int32 [S, max_pages], got "
                     f"{block_tables.dtype}{list(block_tables.shape)}; use .astype(jnp.int32).")


def _check_int_vector(x, n, name, fn):
  if x.shape != (n,) or x.dtype != jnp.int32:
    raise ValueError(f"{fn}: {name} must be int32 [{n}], got {x.dtype}{list(x.shape)}; "
                     "use jnp.asarray(..., jnp.int32) with one entry per sequence.")


def _layer_array(layer, num_layers, fn):
  layer = jnp.asarray(layer)
  if layer.shape not in ((), (1,)) or not jnp.issubdtype(layer.dtype, jnp.integer):
    raise ValueError(f"{fn}: layer must be an integer scalar, got {layer.dtype}{layer.shape}.")
  lv = _concrete_int(layer)
  if lv is not None:
    if not 0 <= lv < num_layers:
      raise ValueError(f"{fn}: layer {lv} out of range for a pool of {num_layers} layers.")
  return layer


def _concrete_int(x):
  """The value of a concrete integer scalar, None when it is traced."""
  try:
    return int(np.asarray(x).reshape(()))
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError,
          jax.errors.TracerIntegerConversionError):
    return None


def _resolve_gather(kv_gather, page_size, fn):
  if kv_gather is None:
    return page_size < 16
  if not kv_gather and page_size < 16:
    raise ValueError(f"{fn}: kv_gather=False needs pages of >= 16 tokens (Triton dot), got "
                     f"{page_size}; leave kv_gather=None.")
  return bool(kv_gather)


def _pages_per_block(page_size: int, block_k: int | None, max_pages: int) -> int:
  """Pages gathered per inner step: block_k // page_size, at most max_pages (powers of two)."""
  block_k = _DEFAULT_BLOCK_K if block_k is None else int(block_k)
  if not _is_pow2(block_k):
    raise ValueError(f"block_k {block_k} must be a power of two.")
  ppb = max(1, block_k // page_size)
  while ppb > max_pages:
    ppb //= 2
  return ppb


def _needs_plain(interpret, mat):
  """Interpret mode inside shard_map with check_vma: jax's interpreter pads every masked access
  of a varying ref with an invariant constant and fails. There (only there) the kernels pad the
  small arrays (q, the output, the block table) in XLA so that nothing is out of bounds, and
  use plain loads/stores with selects. On GPU masked accesses go to the unpadded arrays."""
  return bool(interpret and mat is not None and getattr(mat, "varying", ()))


def _pad_axis(x, axis, size):
  if x.shape[axis] >= size:
    return x
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, pad)


def _dot_nt(a, b):
  """a [M, K] x b [N, K]^T -> [M, N] in fp32 (IEEE for fp32 inputs on Triton, not tf32)."""
  prec = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
  return lax.dot_general(a, b, (((1,), (1,)), ((), ())), precision=prec,
                         preferred_element_type=jnp.float32)


def _dot_nn(a, b):
  prec = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
  return lax.dot_general(a, b, (((1,), (0,)), ((), ())), precision=prec,
                         preferred_element_type=jnp.float32)


def _masked_load(view, mask, plain):
  """Masked load (masked-off elements read as 0, never touched in memory on GPU).

  ``plain``: the view is known to be in bounds (interpret mode under check_vma, see
  ``_needs_plain``): read it whole and select.
  """
  if plain:
    x = view[...]
    return jnp.where(mask, x, jnp.zeros_like(x))
  return pltriton.load(view, mask=mask, other=0)


def _masked_store(view, val, mask, plain):
  if plain:
    view[...] = jnp.where(mask, val, view[...])
  else:
    pltriton.store(view, val, mask=mask)


def _kv_parts(bt_ref, k_ref, v_ref, layer, seq, p0, n_pages, ppb, masked, plain, gather,
              max_pages):
  """K/V of pages p0 .. p0+ppb-1 of sequence ``seq`` as [(token offset, k, v)].

  ``gather``: one [ppb * page_size, head_dim] tile pair loaded through a vector of page ids
  (needed for pages of < 16 tokens: Triton's dot wants N, K >= 16). Otherwise one
  [page_size, head_dim] pair per page, each addressed by a scalar page id (the loads stay
  contiguous along head_dim; the gathered tile measured 1.6x slower on the H200). ``masked``: pages >= n_pages may be in the block; their table entries are
  not read (page 0 is read instead and the caller masks those positions).
  """
  page_size, head_dim = k_ref.shape[-2:]
  if gather and ppb > 1:
    pidx = p0 + jnp.arange(ppb, dtype=jnp.int32)
    if masked:
      pid = _masked_load(bt_ref.at[seq, pl.ds(p0, ppb)], pidx < n_pages, plain)
    else:
      pid = bt_ref[seq, pl.ds(p0, ppb)]
    k = k_ref[layer, pid].reshape(ppb * page_size, head_dim)
    v = v_ref[layer, pid].reshape(ppb * page_size, head_dim)
    return [(0, k, v)]
  parts = []
  for j in range(ppb):
    pj = p0 + j
    if masked:
      pid = bt_ref[seq, jnp.minimum(pj, max_pages - 1)]
      pid = jnp.where(pj < n_pages, pid, 0)
    else:
      pid = bt_ref[seq, pj]
    parts.append((j * page_size, k_ref[layer, pid], v_ref[layer, pid]))
  return parts


def _online_step(carry, q, parts, qk_scale, mask_fn):
  """One flash step over the tiles ``parts`` (base-2 logits, one rescale for all of them).

  ``mask_fn(offset, n)`` -> (score mask [M or 1, n], V row mask [n, 1]) or None: unmasked.
  Masked scores get probability exactly 0 and masked V rows are zeroed, so stale or
  non-finite cache contents past a sequence's end never reach the output.
  """
  m_i, l_i, acc = carry
  scored = []
  m_new = m_i
  for off, k, v in parts:
    s = _dot_nt(q, k) * qk_scale
    masks = None if mask_fn is None else mask_fn(off, k.shape[0])
    if masks is not None:
      s = jnp.where(masks[0], s, _NEG)
    m_new = jnp.maximum(m_new, jnp.max(s, axis=1))
    scored.append((s, masks, v))
  alpha = jnp.exp2(m_i - m_new)
  l_new = l_i * alpha
  acc = acc * alpha[:, None]
  for s, masks, v in scored:
    p = jnp.exp2(s - m_new[:, None])
    if masks is not None:
      p = jnp.where(masks[0], p, 0.0)
      v = jnp.where(masks[1], v, jnp.zeros_like(v))
    l_new = l_new + jnp.sum(p, axis=1)
    acc = acc + _dot_nn(p.astype(v.dtype), v)
  return m_new, l_new, acc


# ----------------------------------------------------------------------------------------------
# decode (flash-decoding)


def decode_num_splits(batch: int, kv_heads: int, max_pages: int, page_size: int) -> int:
  """The static split count of ``paged_decode_attention`` (see the module docstring)."""
  want = _WAVE_PROGRAMS // max(1, batch * kv_heads)
  cap = max(1, (max_pages * page_size) // _MIN_SPLIT_TOKENS)
  return int(max(1, min(want, cap)))


def _split_pages(length, page_size, max_pages, num_splits, static_pps, ppb, append):
  """(positions read from the cache, their pages, pages per split, splits holding any) of a
  sequence of `length`; split 0 always counts: it holds the new key (append) or the first page."""
  cached = length - 1 if append else length
  n_pages = jnp.minimum((cached + page_size - 1) // page_size, max_pages)
  if static_pps is None:
    per = (n_pages + num_splits - 1) // num_splits
    pps = ((per + ppb - 1) // ppb) * ppb
  else:
    pps = static_pps
  used = jnp.maximum((n_pages + pps - 1) // jnp.maximum(pps, 1), 1)
  return cached, n_pages, pps, used


def _decode_kernel(layer_ref, len_ref, bt_ref, q_ref, *refs, group, rows, ppb, max_pages,
                   num_splits, static_pps, qk_scale, plain, gather, append, zero_init, interpret):
  if append:   # the new token's k/v [hd] come in; the pools are also outputs (aliased)
    kn_ref, vn_ref, k_ref, v_ref, *out_refs = refs
    out_refs, (ko_ref, vo_ref) = out_refs[:-2], out_refs[-2:]
  else:
    k_ref, v_ref, *out_refs = refs
  if zero_init:   # zeros for the output rows no program writes (aliased to the output)
    o_init_ref, *out_refs = out_refs
  if num_splits > 1:   # the per-(sequence, kv head) arrival counters
    cnt_in_ref, *out_refs = out_refs
  b = pl.program_id(0)
  h = pl.program_id(1)
  s = pl.program_id(2)
  page_size, head_dim = k_ref.shape[-2:]
  bk = ppb * page_size
  layer = layer_ref[0]
  length = len_ref[b]
  # positions read from the pages: with append the last one (length - 1) is the new token, taken
  # from kn/vn instead, so no program reads the slot that is written below
  cached, n_pages, pps, used = _split_pages(length, page_size, max_pages, num_splits, static_pps,
                                            ppb, append)

  def split():
    p_start = s * pps
    p_end = jnp.minimum(p_start + pps, n_pages)
    t_start = p_start * page_size
    t_end = jnp.minimum(p_end * page_size, cached)
    n_tok = jnp.maximum(t_end - t_start, 0)
    n_full = n_tok // bk
    n_all = (n_tok + bk - 1) // bk

    row_ok = jnp.arange(rows, dtype=jnp.int32) < group
    q = _masked_load(q_ref.at[pl.ds(0, rows)], row_ok[:, None], plain)

    def body(c, carry, masked):
      p0 = p_start + c * ppb
      parts = _kv_parts(bt_ref, k_ref, v_ref, layer, b, p0, n_pages, ppb, masked, plain, gather,
                        max_pages)

      def mask_fn(off, n):
        ok = t_start + c * bk + off + jnp.arange(n, dtype=jnp.int32) < cached
        return ok[None, :], ok[:, None]

      return _online_step(carry, q, parts, qk_scale, mask_fn if masked else None)

    carry = (jnp.full((rows,), _NEG, jnp.float32), jnp.zeros((rows,), jnp.float32),
             jnp.zeros((rows, head_dim), jnp.float32))
    carry = lax.fori_loop(0, n_full, functools.partial(body, masked=False), carry)
    m_i, l_i, acc = lax.fori_loop(n_full, n_all, functools.partial(body, masked=True), carry)

    if append:
      kn = kn_ref[...]
      vn = vn_ref[...]
      first = s == 0   # split 0 adds the new key to its partial softmax and writes the page slot
      s_new = jnp.sum(q.astype(jnp.float32) * kn.astype(jnp.float32)[None, :], axis=1) * qk_scale
      s_new = jnp.where(first, s_new, _NEG)
      m_new = jnp.maximum(m_i, s_new)
      alpha = jnp.exp2(m_i - m_new)
      p_new = jnp.where(first, jnp.exp2(s_new - m_new), 0.0)
      l_i = l_i * alpha + p_new
      acc = acc * alpha[:, None] + p_new[:, None] * vn.astype(jnp.float32)[None, :]
      m_i = m_new

      @pl.when(first)
      def _write():
        # One program per (sequence, kv head) writes; the slot is position length - 1, which no
        # program of this call reads (they stop at length - 2). Rows of padding all hold length 1
        # and a table of scratch pages: they write page 0, which nothing reads.
        pos = length - 1
        page = bt_ref[b, jnp.minimum(pos // page_size, max_pages - 1)]
        ko_ref[layer, page, pos % page_size, :] = kn
        vo_ref[layer, page, pos % page_size, :] = vn

    if num_splits == 1:
      (o_ref,) = out_refs
      out = acc / jnp.where(l_i > 0, l_i, 1.0)[:, None]
      _masked_store(o_ref.at[pl.ds(0, rows)], out.astype(o_ref.dtype), row_ok[:, None], plain)
    else:
      o_ref, m_ref, l_ref = out_refs[:3]
      _masked_store(o_ref.at[s, pl.ds(0, rows)], acc, row_ok[:, None], plain)
      _masked_store(m_ref.at[s, pl.ds(0, rows)], m_i, row_ok, plain)
      _masked_store(l_ref.at[s, pl.ds(0, rows)], l_i, row_ok, plain)
      out_ref, cnt_ref = out_refs[3:5]

      # the last of the `used` splits of (b, h) to finish combines them (kernels/arrival.py says
      # why it sees every partial), so no second kernel runs
      @pl.when(last_to_arrive(cnt_ref, (b, h), used, interpret=interpret))
      def _combine():
        _combine_into(o_ref, m_ref, l_ref, out_ref, used, group=group, rows=rows, plain=plain)

  if num_splits == 1:
    split()
  else:
    # a split past the sequence's pages does nothing (the combine stops at `used`), so a short
    # sequence in a large capacity costs no wave of idle programs (batch 1, 512 tokens of 8192:
    # 33 splits of which 8 hold pages)
    pl.when(s < used)(split)


def paged_decode_attention(q, k_pool, v_pool, block_tables, lengths, layer, *, scale=None,
                           pages_per_split=None, interpret=None, num_splits=None, block_k=None,
                           kv_gather=None, num_warps=None, num_stages=None, new_kv=None,
                           busy_rows=None):
  """Flash-decoding attention of one query per sequence over its pages of layer ``layer``.

  q [B, H, hd]; k_pool, v_pool [L, KVH, num_pages, page_size, hd]; block_tables int32
  [B, max_pages]; lengths int32 [B] (>= 1, <= max_pages * page_size): the query attends to
  positions 0 .. lengths[b]-1; layer: int32 scalar (may be traced). Returns [B, H, hd] in q's
  dtype. ``pages_per_split`` fixes the pages of each split (static boundaries), ``num_splits``
  the split count; by default both follow the rule of the module docstring. ``block_k``: KV
  tokens per inner step (power of two; default 64, at least one page). ``kv_gather``: load the
  pages of a step as one gathered tile (default only for pages < 16 tokens; see _kv_parts).

  ``new_kv=(k_new, v_new)``, each [B, KVH, hd] in the pools' dtype: the keys/values of the token
  at position lengths[b]-1 (this step's). The kernel writes them to their page slot in place (the
  pools are aliased outputs: pass them donated, or XLA copies them) and attends to them from
  registers, so no separate scatter runs. Returns (out, k_pool, v_pool) then.

  ``busy_rows`` (static): only rows 0 .. busy_rows-1 hold sequences (the rest pad the batch);
  no program runs for the others, whose output is zeros and whose new K/V are not written.
  """
  fn = "paged_decode_attention"
  _check_pool(q, k_pool, v_pool, block_tables, fn)
  if new_kv is not None:
    want = (q.shape[0], k_pool.shape[1], k_pool.shape[-1])
    for name, x in zip(("k_new", "v_new"), new_kv):
      if x.shape != want or x.dtype != k_pool.dtype:
        raise ValueError(f"{fn}: {name} must be {k_pool.dtype}{list(want)} (batch, kv heads, "
                         f"head_dim), got {x.dtype}{list(x.shape)}; cast it to the pools' dtype.")
  num_layers, kvh, _, page_size, head_dim = k_pool.shape
  batch, heads, _ = q.shape
  if block_tables.shape[0] != batch:
    raise ValueError(f"{fn}: block_tables has {block_tables.shape[0]} rows for a batch of "
                     f"{batch}; one block-table row per query.")
  _check_int_vector(lengths, batch, "lengths", fn)
  layer_arr = _layer_array(layer, num_layers, fn)
  interpret = _resolve_interpret(interpret)
  max_pages = block_tables.shape[1]
  group = heads // kvh
  rows = max(16, _next_pow2(group))
  ppb = _pages_per_block(page_size, block_k, max_pages)
  scale = head_dim ** -0.5 if scale is None else float(scale)

  static_pps = None
  if pages_per_split is not None:
    pages_per_split = int(pages_per_split)
    if pages_per_split < 1:
      raise ValueError(f"{fn}: pages_per_split must be >= 1, got {pages_per_split}.")
    # the inner block must tile the split: the largest power of two <= ppb dividing it
    while pages_per_split % ppb:
      ppb //= 2
    static_pps = pages_per_split
    ns = -(-max_pages // pages_per_split)
    if num_splits is not None and int(num_splits) != ns:
      raise ValueError(f"{fn}: pass pages_per_split or num_splits, not both inconsistent.")
  elif num_splits is not None:
    ns = int(num_splits)
    if ns < 1:
      raise ValueError(f"{fn}: num_splits must be >= 1, got {ns}.")
  else:
    ns = decode_num_splits(batch, kvh, max_pages, page_size)

  gather = _resolve_gather(kv_gather, page_size, fn)
  busy = batch if busy_rows is None else int(busy_rows)
  if not 1 <= busy <= batch:
    raise ValueError(f"{fn}: busy_rows={busy_rows} must be in [1, batch={batch}].")
  return _decode_impl(q, k_pool, v_pool, block_tables, lengths, layer_arr, new_kv, group=group,
                      rows=rows, ppb=ppb, ns=ns, static_pps=static_pps, scale=scale,
                      interpret=interpret, gather=gather, busy=busy,
                      num_warps=int(num_warps or _DECODE_WARPS),
                      num_stages=int(num_stages or _DECODE_STAGES))


@functools.partial(jax.jit, static_argnames=("group", "rows", "ppb", "ns", "static_pps", "scale",
                                             "interpret", "gather", "busy", "num_warps",
                                             "num_stages"))
def _decode_impl(q, k_pool, v_pool, block_tables, lengths, layer_arr, new_kv, *, group, rows, ppb, ns,
                 static_pps, scale, interpret, gather, busy, num_warps, num_stages):
  num_layers, kvh, _, page_size, head_dim = k_pool.shape
  batch, heads, _ = q.shape
  max_pages = block_tables.shape[1]
  layer_arr = layer_arr.astype(jnp.int32).reshape(1)
  mat = most_varying_mat(q, k_pool, v_pool, block_tables, lengths)
  pad = _needs_plain(interpret, mat)
  gq = group
  bt = block_tables
  if pad:
    gq = rows
    bt = _pad_axis(bt, 1, -(-max_pages // ppb) * ppb)
  zero_init = busy < batch
  kernel = functools.partial(
      _decode_kernel, group=group, rows=rows, ppb=ppb, max_pages=max_pages, num_splits=ns,
      static_pps=static_pps, qk_scale=scale * _LOG2E, plain=pad, gather=gather,
      append=new_kv is not None, zero_init=zero_init, interpret=interpret)
  pool_spec = pl.BlockSpec((num_layers, None) + k_pool.shape[2:], lambda b, h, s: (0, h, 0, 0, 0))
  whole = lambda shape: pl.BlockSpec(shape, lambda b, h, s: (0,) * len(shape))
  in_specs = [whole((1,)), whole((batch,)), whole(bt.shape)]
  args = [layer_arr, lengths, bt]
  # q, k_new and v_new as separate operands: kernels.layer_qkv writes them as three buffers
  in_specs.append(pl.BlockSpec((None, None, gq, head_dim), lambda b, h, s: (b, h, 0, 0)))
  qg = q.reshape(batch, kvh, group, head_dim)
  args.append(_pad_axis(qg, 2, rows) if pad else qg)
  if new_kv is not None:
    in_specs += [pl.BlockSpec((None, None, head_dim), lambda b, h, s: (b, h, 0))] * 2
    args += list(new_kv)
  in_specs += [pool_spec, pool_spec]
  args += [k_pool, v_pool]
  pools_at = len(args) - 2
  o_struct = out_struct((batch, kvh, gq, head_dim), q.dtype, mat)
  o_spec = pl.BlockSpec((None, None, gq, head_dim), lambda b, h, s: (b, h, 0, 0))
  aliases = {}
  if ns == 1:
    out_shape, out_specs = (o_struct,), (o_spec,)
  else:
    # the split axis rounded up to a power of two, so that the combine's tiles over it are in
    # bounds; the entries past ns are never written nor read
    ns_p = _next_pow2(ns)
    part = lambda *shape: out_struct((batch, kvh, ns_p) + shape, jnp.float32, mat)
    counters = jnp.zeros((batch, kvh), jnp.int32)
    out_shape = (part(gq, head_dim), part(gq), part(gq), o_struct,
                 out_struct(counters.shape, jnp.int32, mat))
    # every split of (b, h) in one block: program s writes its row s, the combine reads them all
    out_specs = (pl.BlockSpec((None, None, ns_p, gq, head_dim), lambda b, h, s: (b, h, 0, 0, 0)),
                 pl.BlockSpec((None, None, ns_p, gq), lambda b, h, s: (b, h, 0, 0)),
                 pl.BlockSpec((None, None, ns_p, gq), lambda b, h, s: (b, h, 0, 0)),
                 o_spec, whole(counters.shape))
  o_at = len(out_shape) - (1 if ns == 1 else 2)
  if zero_init:   # rows from `busy` on run no program: their output is zeros, set by XLA
    aliases[len(args)] = o_at
    in_specs.append(o_spec)
    args.append(jnp.zeros(o_struct.shape, o_struct.dtype))
  if ns > 1:   # arrival counters, zero on entry (aliased to an output: the kernel adds to them)
    aliases[len(args)] = len(out_shape) - 1
    in_specs.append(whole(counters.shape))
    args.append(counters)
  if new_kv is not None:   # the pools come back as outputs, updated in place
    aliases.update({pools_at: len(out_shape), pools_at + 1: len(out_shape) + 1})
    out_shape += (out_struct(k_pool.shape, k_pool.dtype, mat),) * 2
    out_specs += (pool_spec, pool_spec)
  out = pl.pallas_call(
      kernel,
      # only the busy rows run: at batch 1 padded to 8, 7 of 8 (row, kv head, split) programs
      # would have been padding
      grid=(busy, kvh, ns),
      in_specs=in_specs,
      out_specs=out_specs,
      out_shape=out_shape,
      input_output_aliases=aliases,
      interpret=interpret,
      compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      name=f"paged_decode_attention_s{ns}_bk{ppb * page_size}",
  )(*args)
  o = out[o_at][:, :, :group].reshape(batch, heads, head_dim)
  return (o,) + tuple(out[-2:]) if new_kv is not None else o


def _combine_into(o_ref, m_ref, l_ref, out_ref, used, *, group, rows, plain):
  """The splits' partial softmaxes of one (sequence, kv head) rescaled to their common max:
  o = sum_s 2^(m_s - m) o_s / l. o_ref [splits, gq, hd], m_ref / l_ref [splits, gq] (splits: a
  power of two); splits from ``used`` on held no pages and wrote nothing: they are not read
  (masked loads). Every split's m and l come in one load, the partial outputs in chunks of
  64 / rows splits: one load per split, each used before the next was issued, made the
  combine (then a kernel of its own) 3.5 us a layer at batch 1 on the H200 (16 splits) against
  3.1 us chunked."""
  splits = o_ref.shape[0]
  chunk = min(splits, max(1, 64 // rows))
  head_ok = jnp.arange(rows, dtype=jnp.int32)[None, :] < group
  load = functools.partial(_masked_load, plain=plain)

  def ok(s0, n):
    return (s0 + jnp.arange(n, dtype=jnp.int32)[:, None] < used) & head_ok

  def tile(ref, s0, n):
    return ref.at[pl.ds(s0, n), pl.ds(0, rows)]

  ok_all = ok(0, splits)
  m = jnp.where(ok_all, load(tile(m_ref, 0, splits), ok_all), _NEG)
  m_max = jnp.max(m, axis=0)
  w = jnp.where(ok_all, jnp.exp2(m - m_max[None, :]), 0.0)
  l_tot = jnp.sum(w * load(tile(l_ref, 0, splits), ok_all), axis=0)
  acc = jnp.zeros((rows, o_ref.shape[-1]), jnp.float32)
  for s0 in range(0, splits, chunk):
    # m is loaded again per chunk (from L2): Triton cannot slice the register tile loaded above
    okc = ok(s0, chunk)
    wc = jnp.where(okc, jnp.exp2(load(tile(m_ref, s0, chunk), okc) - m_max[None, :]), 0.0)
    oc = load(tile(o_ref, s0, chunk), okc[:, :, None])
    acc = acc + jnp.sum(wc[:, :, None] * oc, axis=0)
  out = acc / jnp.where(l_tot > 0, l_tot, 1.0)[:, None]
  _masked_store(out_ref.at[pl.ds(0, rows)], out.astype(out_ref.dtype), head_ok[0][:, None], plain)


# ----------------------------------------------------------------------------------------------
# ragged (continuous batching: decode rows + prefill chunks)


def _ragged_kernel(layer_ref, meta_ref, qs_ref, ctx_ref, bt_ref, q_ref, k_ref, v_ref, o_ref, *,
                   group, gpad, bq, ppb, max_pages, num_seqs_static, qk_scale, plain, gather):
  i = pl.program_id(0)
  page_size, head_dim = k_ref.shape[-2:]
  bk = ppb * page_size
  m_rows = bq * gpad
  seq = meta_ref[0, i]
  r0 = meta_ref[1, i]
  r1 = meta_ref[2, i]
  row = r0 + jnp.arange(bq, dtype=jnp.int32)
  row_ok = row < r1
  g_ok = jnp.arange(gpad, dtype=jnp.int32) < group
  io_mask = row_ok[:, None, None] & g_ok[None, :, None]

  @pl.when(seq < num_seqs_static)
  def _attend():
    layer = layer_ref[0]
    q_start = qs_ref[seq]
    q_len = qs_ref[seq + 1] - q_start
    ctx = ctx_ref[seq]
    n_pages = jnp.minimum((ctx + page_size - 1) // page_size, max_pages)
    base = ctx - q_len - q_start  # position of row r is base + r
    p_lo = base + r0
    p_hi = base + r1 - 1
    n_full = jnp.maximum(p_lo + 1, 0) // bk
    n_all = jnp.maximum(p_hi + 1 + bk - 1, 0) // bk
    q = _masked_load(q_ref.at[pl.ds(r0, bq), pl.ds(0, gpad)], io_mask, plain)
    q = q.reshape(m_rows, head_dim)
    pos = jnp.broadcast_to((base + row)[:, None], (bq, gpad)).reshape(m_rows)

    def body(c, carry, masked):
      parts = _kv_parts(bt_ref, k_ref, v_ref, layer, seq, c * ppb, n_pages, ppb, masked, plain,
                        gather, max_pages)

      def mask_fn(off, n):
        key = c * bk + off + jnp.arange(n, dtype=jnp.int32)
        return key[None, :] <= pos[:, None], (key < ctx)[:, None]

      return _online_step(carry, q, parts, qk_scale, mask_fn if masked else None)

    carry = (jnp.full((m_rows,), _NEG, jnp.float32), jnp.zeros((m_rows,), jnp.float32),
             jnp.zeros((m_rows, head_dim), jnp.float32))
    carry = lax.fori_loop(0, n_full, functools.partial(body, masked=False), carry)
    _, l_i, acc = lax.fori_loop(n_full, n_all, functools.partial(body, masked=True), carry)
    out = acc / jnp.where(l_i > 0, l_i, 1.0)[:, None]
    out = out.reshape(bq, gpad, head_dim).astype(o_ref.dtype)
    _masked_store(o_ref.at[pl.ds(r0, bq), pl.ds(0, gpad)], out, io_mask, plain)

  @pl.when(seq >= num_seqs_static)
  def _zero():
    _masked_store(o_ref.at[pl.ds(r0, bq), pl.ds(0, gpad)],
                  jnp.zeros((bq, gpad, head_dim), o_ref.dtype), io_mask, plain)


def _ragged_block_table(query_start, num_seqs, num_rows, num_seq_slots, bq):
  """[3, NB] int32: (sequence or S for a zero block, first row, end row) of each query block."""
  s_slots = num_seq_slots
  nb = -(-num_rows // bq) + s_slots + 2
  qs = query_start
  ns = jnp.clip(jnp.asarray(num_seqs, jnp.int32).reshape(()), 0, s_slots)
  q_len = jnp.maximum(qs[1:] - qs[:-1], 0)
  live = jnp.arange(s_slots, dtype=jnp.int32) < ns
  nblk = jnp.where(live, (q_len + bq - 1) // bq, 0)
  cum = jnp.cumsum(nblk)
  start = cum - nblk
  total = cum[-1]
  qs0 = jnp.clip(qs[0], 0, num_rows)
  qs_end = jnp.clip(qs[ns], qs0, num_rows)
  lead = (qs0 + bq - 1) // bq
  trail = (num_rows - qs_end + bq - 1) // bq
  idx = jnp.arange(nb, dtype=jnp.int32)
  seq = jnp.sum((cum[None, :] <= idx[:, None]).astype(jnp.int32), axis=1)  # owner if idx < total
  seq_c = jnp.minimum(seq, s_slots - 1)
  j = idx - start[seq_c]
  a_r0 = qs[seq_c] + j * bq
  a_r1 = jnp.minimum(a_r0 + bq, qs[seq_c + 1])
  k_lead = idx - total
  l_r0 = k_lead * bq
  l_r1 = jnp.minimum(l_r0 + bq, qs0)
  k_trail = idx - total - lead
  t_r0 = qs_end + k_trail * bq
  t_r1 = jnp.minimum(t_r0 + bq, num_rows)
  is_attn = idx < total
  is_lead = (~is_attn) & (k_lead < lead)
  is_trail = (~is_attn) & (~is_lead) & (k_trail < trail)
  out_seq = jnp.where(is_attn, seq_c, s_slots)
  r0 = jnp.where(is_attn, a_r0, jnp.where(is_lead, l_r0, jnp.where(is_trail, t_r0, 0)))
  r1 = jnp.where(is_attn, a_r1, jnp.where(is_lead, l_r1, jnp.where(is_trail, t_r1, 0)))
  return jnp.stack([out_seq, r0, r1]).astype(jnp.int32), nb


def ragged_paged_attention(q, k_pool, v_pool, block_tables, context_lens, query_start, num_seqs,
                           layer, *, scale=None, interpret=None, block_q=None, block_k=None,
                           kv_gather=None, num_warps=4, num_stages=2):
  """Causal attention of a flat ragged batch of query rows over the paged cache.

  q [T, H, hd]: sequence s owns rows query_start[s] : query_start[s+1] (query_start int32
  [S+1], nondecreasing, query_start[0] normally 0); its K/V (the new rows included, already in
  the pages) has context_lens[s] positions (int32 [S]); row j of its chunk sits at position
  context_lens[s] - q_len + j and attends to keys 0 .. that position. num_seqs (int32 scalar,
  may be traced): sequences >= num_seqs and rows outside [query_start[0],
  query_start[num_seqs]) are padding and come back as zeros. block_tables int32 [S, max_pages].
  ``block_q``: query rows per block (power of two, default 64 // G_pad, at least 1);
  ``block_k``: KV tokens per inner step; ``kv_gather`` as in ``paged_decode_attention``.
  Returns [T, H, hd] in q's dtype.
  """
  fn = "ragged_paged_attention"
  _check_pool(q, k_pool, v_pool, block_tables, fn)
  num_layers, kvh, _, page_size, head_dim = k_pool.shape
  num_rows, heads, _ = q.shape
  s_slots, max_pages = block_tables.shape
  _check_int_vector(context_lens, s_slots, "context_lens", fn)
  _check_int_vector(query_start, s_slots + 1, "query_start", fn)
  num_seqs = jnp.asarray(num_seqs)
  if num_seqs.shape not in ((), (1,)) or not jnp.issubdtype(num_seqs.dtype, jnp.integer):
    raise ValueError(f"{fn}: num_seqs must be an integer scalar, got "
                     f"{num_seqs.dtype}{num_seqs.shape}.")
  layer_arr = _layer_array(layer, num_layers, fn)
  interpret = _resolve_interpret(interpret)
  group = heads // kvh
  gpad = _next_pow2(group)
  if block_q is None:
    bq = max(1, _DEFAULT_RAGGED_ROWS // gpad)
  else:
    bq = int(block_q)
    if not _is_pow2(bq):
      raise ValueError(f"{fn}: block_q {bq} must be a power of two.")
  if bq * gpad < 16:
    bq = 16 // gpad  # Triton dot needs M >= 16
  ppb = _pages_per_block(page_size, block_k, max_pages)
  scale = head_dim ** -0.5 if scale is None else float(scale)

  gather = _resolve_gather(kv_gather, page_size, fn)
  return _ragged_impl(q, k_pool, v_pool, block_tables, context_lens, query_start,
                      num_seqs.astype(jnp.int32).reshape(()), layer_arr, group=group, gpad=gpad,
                      bq=bq, ppb=ppb, scale=scale, interpret=interpret, gather=gather,
                      num_warps=int(num_warps), num_stages=int(num_stages))


@functools.partial(jax.jit, static_argnames=("group", "gpad", "bq", "ppb", "scale", "interpret",
                                             "gather", "num_warps", "num_stages"))
def _ragged_impl(q, k_pool, v_pool, block_tables, context_lens, query_start, num_seqs, layer_arr,
                 *, group, gpad, bq, ppb, scale, interpret, gather, num_warps, num_stages):
  num_layers, kvh, _, page_size, head_dim = k_pool.shape
  num_rows, heads, _ = q.shape
  s_slots, max_pages = block_tables.shape
  layer_arr = layer_arr.astype(jnp.int32).reshape(1)
  meta, nb = _ragged_block_table(query_start, num_seqs, num_rows, s_slots, bq)
  mat = most_varying_mat(q, k_pool, v_pool, block_tables, context_lens, query_start)
  pad = _needs_plain(interpret, mat)  # see _decode_impl
  qg = q.reshape(num_rows, kvh, group, head_dim)
  rows_p, gq, bt = num_rows, group, block_tables
  if pad:
    rows_p, gq = (-(-num_rows // bq) + 1) * bq, gpad
    qg = _pad_axis(_pad_axis(qg, 0, rows_p), 2, gpad)
    bt = _pad_axis(bt, 1, -(-max_pages // ppb) * ppb)
  kernel = functools.partial(
      _ragged_kernel, group=group, gpad=gpad, bq=bq, ppb=ppb, max_pages=max_pages,
      num_seqs_static=s_slots, qk_scale=scale * _LOG2E, plain=pad, gather=gather)
  pool_spec = pl.BlockSpec((num_layers, None) + k_pool.shape[2:], lambda i, h: (0, h, 0, 0, 0))
  out = pl.pallas_call(
      kernel,
      grid=(nb, kvh),
      in_specs=[
          pl.BlockSpec((1,), lambda i, h: (0,)),
          pl.BlockSpec(meta.shape, lambda i, h: (0, 0)),
          pl.BlockSpec((s_slots + 1,), lambda i, h: (0,)),
          pl.BlockSpec((s_slots,), lambda i, h: (0,)),
          pl.BlockSpec(bt.shape, lambda i, h: (0, 0)),
          pl.BlockSpec((rows_p, None, gq, head_dim), lambda i, h: (0, h, 0, 0)),
          pool_spec,
          pool_spec,
      ],
      out_specs=pl.BlockSpec((rows_p, None, gq, head_dim), lambda i, h: (0, h, 0, 0)),
      out_shape=out_struct((rows_p, kvh, gq, head_dim), q.dtype, mat),
      interpret=interpret,
      compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      name=f"ragged_paged_attention_bq{bq}_bk{ppb * page_size}",
  )(layer_arr, meta, query_start, context_lens, bt, qg, k_pool, v_pool)
  return out[:num_rows, :, :group].reshape(num_rows, heads, head_dim)


# ----------------------------------------------------------------------------------------------
# XLA reference


def paged_attention_reference(q, k_pool, v_pool, block_tables, context_lens, layer, *,
                              query_start=None, num_seqs=None, scale=None):
  """Plain XLA attention over gathered pages, fp32 softmax; the tests' ground truth.

  Decode form (``query_start`` None): q [B, H, hd], one query per sequence at position
  context_lens[b] - 1 (so ``context_lens`` is ``lengths``). Ragged form: the arguments of
  ``ragged_paged_attention``; rows outside [query_start[0], query_start[num_seqs]) give zeros.
  """
  if query_start is None:
    query_start = jnp.arange(q.shape[0] + 1, dtype=jnp.int32)
    num_seqs = q.shape[0]
  scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
  return _reference_impl(q, k_pool, v_pool, block_tables, context_lens, layer, query_start,
                         num_seqs, scale=scale)


@functools.partial(jax.jit, static_argnames=("scale",))
def _reference_impl(q, k_pool, v_pool, block_tables, context_lens, layer, query_start, num_seqs,
                    *, scale):
  num_rows, heads, head_dim = q.shape
  _, kvh, _, page_size, _ = k_pool.shape
  s_slots, max_pages = block_tables.shape
  group = heads // kvh
  n_keys = max_pages * page_size
  # [S, KVH, n_keys, hd] per sequence, fp32
  k = k_pool[layer][:, block_tables].astype(jnp.float32)
  v = v_pool[layer][:, block_tables].astype(jnp.float32)
  k = k.reshape(kvh, s_slots, n_keys, head_dim).transpose(1, 0, 2, 3)
  v = v.reshape(kvh, s_slots, n_keys, head_dim).transpose(1, 0, 2, 3)
  rows = jnp.arange(num_rows)
  seq = jnp.clip(jnp.sum(query_start[None, :] <= rows[:, None], axis=1) - 1, 0, s_slots - 1)
  live = (rows >= query_start[0]) & (rows < query_start[num_seqs])
  q_len = query_start[seq + 1] - query_start[seq]
  pos = context_lens[seq] - q_len + (rows - query_start[seq])
  qf = q.astype(jnp.float32).reshape(num_rows, kvh, group, head_dim)
  logits = jnp.einsum("tkgd,tknd->tkgn", qf, k[seq], precision=lax.Precision.HIGHEST) * scale
  key = jnp.arange(n_keys)
  mask = (key[None, :] <= pos[:, None]) & (key[None, :] < context_lens[seq][:, None])
  logits = jnp.where(mask[:, None, None, :], logits, -jnp.inf)
  w = jax.nn.softmax(logits, axis=-1)
  w = jnp.where(live[:, None, None, None], w, 0.0)
  o = jnp.einsum("tkgn,tknd->tkgd", w, v[seq], precision=lax.Precision.HIGHEST)
  return o.reshape(num_rows, heads, head_dim).astype(q.dtype)
