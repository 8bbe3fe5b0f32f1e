"""The device-side description of one continuous-batching step: a flat ragged batch of T tokens
(prefill chunks and decode tokens of S sequences, back to back), padded to compile buckets, and
each sequence's sampling parameters. Built on the host from the scheduler's StepPlan
(``from_plan``); consumed by ``TPModel.step`` and ``engine/attention.ragged``."""
from __future__ import annotations

import jax
import numpy as np
from flax import struct

from jax_tokenweave.engine.kv_cache import SCRATCH_PAGE

MIN_TOKENS_BUCKET = 8
MIN_SEQS_BUCKET = 8


def _bucket(n: int, minimum: int) -> int:
    return max(minimum, 1 << (max(n, 1) - 1).bit_length())


@struct.dataclass
class StepBatch:
    token_ids: jax.Array      # [T] int32; rows past query_start[num_seqs] are padding
    positions: jax.Array      # [T] int32
    slot_pages: jax.Array     # [T] int32: where each token's K/V goes (padding: the scratch page)
    slot_offsets: jax.Array   # [T] int32
    query_start: jax.Array    # [S+1] int32 (padding sequences have no tokens)
    context_lens: jax.Array   # [S] int32: cached positions after this step
    block_tables: jax.Array   # [S, W] int32
    num_seqs: jax.Array       # () int32: real sequences
    sample_rows: jax.Array    # [S] int32: index into T of each sequence's last token
    temperature: jax.Array    # [S] float32
    top_k: jax.Array          # [S] int32
    top_p: jax.Array          # [S] float32
    keys: jax.Array           # [S, 2] uint32: each request's PRNG key data
    sample_step: jax.Array    # [S] int32: tokens the request has generated (folded into its key)
    decode_only: bool = struct.field(pytree_node=False, default=False)   # every sequence has 1 token

    @property
    def num_tokens(self) -> int:
        return self.token_ids.shape[0]


def buckets(num_tokens: int, num_seqs: int, tokens_bucket: int | None = None) -> tuple[int, int]:
    """(T, S) of the padded StepBatch: powers of two, T >= S; a decode-only step (one token per
    sequence) has T = S. The host knows the bucket, hence the split point, before building it."""
    Sb = _bucket(num_seqs, MIN_SEQS_BUCKET)
    if num_tokens == num_seqs:
        return Sb, Sb
    return max(tokens_bucket or _bucket(num_tokens, MIN_TOKENS_BUCKET), Sb), Sb


def split_order(lens, cut: int) -> list[int]:
    """An order of a step's chunks (token counts `lens`) in which the first `cut` tokens -- half 0
    of a split step, whose static cut the bucket fixes -- are whole chunks whenever possible.

    Half 0 takes the multi-token (prefill) chunks whose total comes closest to `cut` from below
    with a gap the single-token chunks (decodes) can fill, then those single tokens, which close
    the gap exactly; after the cut come the other prefill chunks, then the other single tokens.
    When the single tokens are too few to close the gap, half 0 takes the closest total and all
    of them, and the next prefill chunk straddles the cut (half 1 reads its first part's K/V from
    the pages). Each group keeps the scheduler's order. Padding stays after the real tokens: the
    halves' GEMMs and all-reduces have static shapes, so where the padding sits changes only
    attention work, which skips it anyway."""
    singles = [i for i, n in enumerate(lens) if n == 1]
    multi = [i for i, n in enumerate(lens) if n > 1]
    # subset sums up to `cut` as bitsets: bit s of reach[j] <=> some of multi[:j] hold s tokens
    keep = (1 << (cut + 1)) - 1
    reach = [1]
    for i in multi:
        reach.append((reach[-1] | reach[-1] << int(lens[i])) & keep)
    fillable = range(cut, max(cut - len(singles), 0) - 1, -1)
    s = next((s for s in fillable if reach[-1] >> s & 1), reach[-1].bit_length() - 1)
    first = []
    for j in range(len(multi), 0, -1):  # multi[j-1] is needed iff s is out of reach without it
        if not reach[j - 1] >> s & 1:
            first.append(multi[j - 1])
            s -= int(lens[multi[j - 1]])
    first.reverse()
    fill = singles[:cut - sum(int(lens[i]) for i in first)]
    chosen = set(first)
    return first + fill + [i for i in multi if i not in chosen] + singles[len(fill):]


def from_plan(plan, *, width: int, sampling_rows, tokens_bucket: int | None = None) -> StepBatch:
    """Numpy StepBatch for a scheduler StepPlan. sampling_rows: (temperature, top_k, top_p,
    keys [S, 2], sample_step) per chunk. T and S are padded to ``buckets``; the block table to
    `width` pages (a sequence's most pages, static for the engine)."""
    T, S = plan.num_tokens, plan.num_seqs
    decode_only = T == S
    Tb, Sb = buckets(T, S, tokens_bucket)

    def pad(a, n, fill=0, dtype=np.int32):
        out = np.full((n,) + a.shape[1:], fill, dtype)
        out[:len(a)] = a
        return out

    qs = np.full(Sb + 1, T, np.int32)
    qs[:S + 1] = plan.query_start
    bt = np.zeros((Sb, width), np.int32)
    bt[:S, :plan.block_tables.shape[1]] = plan.block_tables
    temp, top_k, top_p, keys, steps = sampling_rows
    return StepBatch(
        token_ids=pad(plan.token_ids, Tb), positions=pad(plan.positions, Tb),
        slot_pages=pad(plan.slot_pages, Tb, SCRATCH_PAGE), slot_offsets=pad(plan.slot_offsets, Tb),
        query_start=qs, context_lens=pad(plan.context_lens, Sb, 1), block_tables=bt,
        num_seqs=np.int32(S), sample_rows=pad(plan.sample_rows, Sb),
        temperature=pad(np.asarray(temp, np.float32), Sb, 0, np.float32), top_k=pad(np.asarray(top_k), Sb),
        top_p=pad(np.asarray(top_p, np.float32), Sb, 1.0, np.float32),
        keys=pad(np.asarray(keys, np.uint32), Sb, 0, np.uint32), sample_step=pad(np.asarray(steps), Sb),
        decode_only=decode_only)
