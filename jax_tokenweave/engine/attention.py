"""How each layer's attention reads and writes the KV cache, as the ``attend`` callables the
model's forward takes (models/transformer.py, weave/schedule.py). One per kind of step:

    causal      logits without a cache: causal attention over the batch itself
    prefill     a padded [B, S] batch of whole prompts: causal attention over the fresh keys
                (cuDNN on GPU), and the keys/values written to the sequences' pages
    decode      one token per sequence: the Pallas paged decode kernel (flash-decoding) writes it
                to its page slot and attends over the sequence's valid pages
    ragged      a flat batch of prefill chunks and decode tokens (the continuous engine): written
                to their pages, then the Pallas ragged paged kernel (each chunk over its earlier
                pages plus causal within itself)

On GPU the paged modes run the Pallas kernels (kernels/paged_attention.py); on other backends
their XLA reference (Pallas' interpret mode, which CI uses to test the kernels against that
reference, is far too slow to serve with).

Each returns ``attend(q, k, v, cache, layer) -> (out, cache)``; ``cache`` is a kv_cache.KVPages
(or None for causal) and ``layer`` the scan's layer index. ``split_causal`` / ``split_prefill``
give the two halves' attention of a split batch (weave/schedule.py's attend0 / attend1).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jax_tokenweave.engine import kv_cache
from jax_tokenweave.kernels import paged_attention as kernels
from jax_tokenweave.models.layers import causal_attention


def use_kernels() -> bool:
    return jax.default_backend() == "gpu"


def decode_attention(q, k_new, v_new, cache, block_tables, lengths, layer, busy_rows=None):
    """One query per sequence: the token at position lengths[b]-1, whose k_new/v_new [B, KVH, hd]
    are written to its page slot, then attention over positions 0 .. lengths[b]-1.
    -> (out [B, H, hd], cache). On GPU the Pallas decode kernel does both (no scatter kernels);
    elsewhere a scatter and the XLA reference.
    busy_rows: rows that hold real sequences (the rest are padding of length 1); the kernel's
    split count follows them, so one long sequence padded to 8 rows still spreads over the SMs,
    and only they run (the padding rows' output is zeros, their K/V are not written)."""
    k_new, v_new = k_new.astype(cache.k.dtype), v_new.astype(cache.v.dtype)
    if use_kernels():
        splits = None
        if busy_rows is not None:
            splits = kernels.decode_num_splits(busy_rows, cache.k.shape[1], block_tables.shape[1],
                                               cache.page_size)
        out, k, v = kernels.paged_decode_attention(q, cache.k, cache.v, block_tables, lengths, layer,
                                                   num_splits=splits, new_kv=(k_new, v_new),
                                                   busy_rows=busy_rows)
        return out, kv_cache.KVPages(k, v)
    B = q.shape[0]
    page, off = kv_cache.slots(block_tables, (lengths - 1)[:, None], jnp.ones((B, 1), bool), cache.page_size)
    cache = kv_cache.write(cache, layer, k_new, v_new, page[:, 0], off[:, 0])
    return kernels.paged_attention_reference(q, cache.k, cache.v, block_tables, lengths, layer), cache


def ragged_paged_attention(q, k_pool, v_pool, block_tables, context_lens, query_start, num_seqs, layer):
    if use_kernels():
        return kernels.ragged_paged_attention(q, k_pool, v_pool, block_tables, context_lens, query_start,
                                              num_seqs, layer)
    return kernels.paged_attention_reference(q, k_pool, v_pool, block_tables, context_lens, layer,
                                             query_start=query_start, num_seqs=num_seqs)


def causal(impl: str):
    def attend(q, k, v, cache, layer):
        return causal_attention(q, k, v, impl), cache
    return attend


def prefill(impl: str, block_tables, lengths, prefix_len: int = 0):
    """q/k/v [B, S, ...] at positions prefix_len + [0, S) of each sequence; positions at or past
    lengths[b] are padding (written to the scratch page)."""
    def attend(q, k, v, cache, layer, prefix_kv=None):
        B, S = q.shape[:2]
        pos = prefix_len + jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
        page, off = kv_cache.slots(block_tables, pos, pos < lengths[:, None], cache.page_size)
        cache = kv_cache.write(cache, layer, k.reshape(B * S, *k.shape[2:]), v.reshape(B * S, *v.shape[2:]),
                               page.reshape(-1), off.reshape(-1))
        return causal_attention(q, k, v, impl, prefix_kv), cache
    return attend


def decode(block_tables, lengths, busy_rows=None):
    """q/k/v [B, 1, ...]: the token at position lengths[b] of each sequence (rows from
    `busy_rows` on are padding, see decode_attention)."""
    def attend(q, k, v, cache, layer):
        out, cache = decode_attention(q[:, 0], k[:, 0], v[:, 0], cache, block_tables, lengths + 1, layer,
                                      busy_rows=busy_rows)
        return out[:, None], cache
    return attend


def ragged(batch, *, rows=None):
    """q/k/v [1, T, ...]: the flat batch described by `batch` (engine/step_batch.StepBatch), or
    with rows=(start, stop) (static) only its tokens [start, stop) -- one half of a split step,
    whose sequences' earlier tokens (the other half's, written first) are read from the pages."""
    def attend(q, k, v, cache, layer):
        lo, hi = rows or (0, batch.num_tokens)
        if batch.decode_only:
            # token i is sequence i's, at position context_lens[i] - 1 (its slot); padding
            # sequences have length 1 and scratch tables, like their tokens' slots
            out, cache = decode_attention(q[0], k[0], v[0], cache, batch.block_tables, batch.context_lens, layer)
            return out[None], cache
        cache = kv_cache.write(cache, layer, k[0], v[0], batch.slot_pages[lo:hi], batch.slot_offsets[lo:hi])
        qs = jnp.clip(batch.query_start, lo, hi)
        # a sequence's queries are its last tokens: rows cut off after `hi` shorten its context
        ctx = batch.context_lens - (batch.query_start[1:] - qs[1:])
        out = ragged_paged_attention(q[0], cache.k, cache.v, batch.block_tables, ctx, qs - lo,
                                     batch.num_seqs, layer)
        return out[None], cache
    return attend


def split_ragged(batch):
    """The halves of a split flat batch (a "seq" plan of shape [1, T] cut at token n0)."""
    def make(plan):
        a0, a1 = ragged(batch, rows=(0, plan.n0)), ragged(batch, rows=(plan.n0, batch.num_tokens))

        def attend0(q, k, v, cache, layer):
            out, cache = a0(q, k, v, cache, layer)
            return out, (cache, None)

        def attend1(q, k, v, cache, layer, kv0):
            return a1(q, k, v, cache, layer)
        return attend0, attend1
    return make


def _halves(a0, a1, plan):
    """attend0 also hands half 0's keys/values on; half 1 reads them when the split cuts through
    sequences (kind "seq"), else its sequences are its own."""
    def attend0(q, k, v, cache, layer):
        out, cache = a0(q, k, v, cache, layer)
        return out, (cache, (k, v))

    def attend1(q, k, v, cache, layer, kv0):
        return a1(q, k, v, cache, layer, prefix_kv=kv0 if plan.kind == "seq" else None)
    return attend0, attend1


def split_causal(impl: str):
    def make(plan):
        def attend(q, k, v, cache, layer, prefix_kv=None):
            return causal_attention(q, k, v, impl, prefix_kv), cache
        return _halves(attend, attend, plan)
    return make


def split_prefill(impl: str, block_tables, lengths):
    def make(plan):
        if plan.kind == "batch":
            n = plan.n0
            a0 = prefill(impl, block_tables[:n], lengths[:n])
            a1 = prefill(impl, block_tables[n:], lengths[n:])
        else:
            a0 = prefill(impl, block_tables, lengths)
            a1 = prefill(impl, block_tables, lengths, prefix_len=plan.n0)
        return _halves(a0, a1, plan)
    return make
