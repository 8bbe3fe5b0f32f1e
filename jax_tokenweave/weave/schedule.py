"""TokenWeave's overlapped layer: the two halves of a split batch (split.py) run the model's layer
functions (models/layers.py) in an order where one half's fused collective runs beside the other
half's compute. Half 1 lags half 0 by one step.

carry: x0 (half 0's normed input), r0, p1 (half 1's pending partial: previous FFN output or its
embedding), r1, cache; each residual is the half's own token-sharded residual
(``rows_per_rank(T_half, N)`` rows, see collective/fused.py). Per layer four pairs, each
"one half's fused collective  ||  the other half's compute":

    pair 1:  x1, r1 = reduce(p1, r1, input_norm)      ||  h0 = attention(x0)
    pair 2:  x0, r0 = reduce(h0, r0, post_attn_norm)  ||  h1 = attention(x1 [, k0, v0])
    pair 3:  x1, r1 = reduce(h1, r1, post_attn_norm)  ||  m0 = ffn(x0)
    pair 4:  x0, r0 = reduce(m0, r0, next_norm)       ||  p1 = m1 = ffn(x1)

The first reduction (half 0's embedding) runs alone; the last (half 1's final norm) too.
How a pair overlaps (``overlap_pair``): the collective is *started* (the kernel goes to the
communicator's own high-priority stream, ordered after its inputs by a CUDA event), the other
half's compute is issued on XLA's stream, then *done* makes XLA's stream wait for the kernel. An
optimization barrier puts the compute after the start; passing the compute's outputs to done puts
the wait after the compute. The collective takes ``SplitConfig.comm_ctas`` SMs beside attention
and ``comm_ctas_mlp`` beside the (longer) FFN; the matmuls get the rest. Used on GPU for the
custom-call impls; with ``impl="xla"`` the split relies on XLA's own async collectives. On CPU
the math is identical. (DESIGN.md §4's stream annotations were tried first: the fused calls ran
on their own streams but serialised against the matmuls; bench/results/README.md.)

Attention of the halves is the caller's: ``attend0(q, k, v, cache, layer) -> (out, (cache, kv0))``
and ``attend1(q, k, v, cache, layer, kv0) -> (out, cache)``; kv0 is half 0's keys/values of the
layer, which half 1 reads when the split cuts through sequences (kind "seq"), and half 0 writes
the cache before half 1 reads it.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from jax_tokenweave.collective.fused import fused_allreduce_rmsnorm_done
from jax_tokenweave.collective.reducer import Reducer
from jax_tokenweave.models import layers
from jax_tokenweave.models.layers import LayerSpec
from jax_tokenweave.models import transformer
from jax_tokenweave.weave.split import SplitConfig, SplitPlan, plan_split


def use_overlap(split: SplitConfig, red: Reducer) -> bool:
    """Whether split layers issue their collectives as start/done pairs around the other half's
    compute (see the module doc)."""
    if split.overlap == "force":
        return True
    if split.overlap == "off" or jax.default_backend() not in ("gpu", "cuda"):
        return False
    return red.custom_call


def overlap_pair(name: str, overlap: bool, red: Reducer, comm_args, slot: int, compute_fn,
                 compute_args, beside_mlp: bool = False):
    """The reduction red(*comm_args) beside compute_fn(*compute_args) (the other half's work).
    overlap: start the collective, issue the compute, then wait (module doc); else one after the
    other. Returns (reduction outputs, compute outputs)."""
    with jax.named_scope(name):
        if not overlap:
            return red(*comm_args), compute_fn(*compute_args)
        pending = red.start(*comm_args, slot=slot, beside_mlp=beside_mlp)
        pending, compute_args = jax.lax.optimization_barrier((pending, compute_args))
        y = compute_fn(*compute_args)
        return fused_allreduce_rmsnorm_done(pending, after=y), y


def split_layer(w, carry, next_norm, rope0, rope1, layer, *, plan: SplitPlan, spec: LayerSpec,
                red: Reducer, overlap: bool, attend0: Callable, attend1: Callable):
    """One overlapped layer (module doc). carry = (x0 [B0, S0, D] normed, r0, p1 [T1, D], r1,
    cache) -> the same after the layer."""
    x0, r0, p1, r1, cache = carry
    (B0, S0), (B1, S1) = plan.shapes
    D = x0.shape[-1]

    def attn0(w, x0, rope, cache):
        return layers.attention_block(w, x0, rope, spec, lambda q, k, v: attend0(q, k, v, cache, layer))

    def attn1(w, x1, rope, cache, kv0):
        return layers.attention_block(w, x1.reshape(B1, S1, D), rope, spec,
                                      lambda q, k, v: attend1(q, k, v, cache, layer, kv0))

    def ffn(w, x):
        return layers.ffn_block(w, x, spec)

    # slot = the half whose collective is pending (a half has at most one pending at a time).
    (x1, r1), (h0, (cache, kv0)) = overlap_pair(
        "pair1", overlap, red, (p1, r1, w["input_norm.weight"]), 1, attn0, (w, x0, rope0, cache))
    (x0f, r0), (h1, cache) = overlap_pair(
        "pair2", overlap, red, (h0, r0, w["post_attn_norm.weight"]), 0, attn1, (w, x1, rope1, cache, kv0))
    (x1, r1), m0 = overlap_pair("pair3", overlap, red, (h1, r1, w["post_attn_norm.weight"]), 1, ffn,
                                (w, x0f), beside_mlp=True)
    (x0f, r0), m1 = overlap_pair("pair4", overlap, red, (m0, r0, next_norm), 0, ffn, (w, x1),
                                 beside_mlp=True)
    return x0f.reshape(B0, S0, D), r0, m1, r1, cache


def split_forward(weights: dict, tokens: jax.Array, positions: jax.Array, plan: SplitPlan, *,
                  spec: LayerSpec, red: Reducer, inv_freq, overlap: bool, attend0: Callable,
                  attend1: Callable, cache=None):
    """models.transformer.forward for a split batch: the same outputs, final normed hidden
    [B, S, D] and the cache, with the layers in TokenWeave's overlapped order."""
    stacked = transformer.layer_weights(weights)
    tok0, tok1 = plan.split(tokens)
    pos0, pos1 = plan.split(positions)
    rope0, rope1 = layers.rope_cos_sin(pos0, inv_freq), layers.rope_cos_sin(pos1, inv_freq)
    table = weights["embed_tokens.embedding"]
    with jax.named_scope("embed"):
        p0 = layers.embed(table, tok0.reshape(-1), spec.axis_name)
        p1 = layers.embed(table, tok1.reshape(-1), spec.axis_name)
    (B0, S0), (B1, S1) = plan.shapes
    T0, T1 = plan.tokens
    D = p0.shape[-1]
    with jax.named_scope("reduce_embed"):
        x0, r0 = red(p0, red.init(T0, D, p0.dtype), stacked["input_norm.weight"][0])
    carry = (x0.reshape(B0, S0, D), r0, p1, red.init(T1, D, p1.dtype), cache)

    def body(carry, xs):
        w, next_norm, i = xs
        return split_layer(w, carry, next_norm, rope0, rope1, i, plan=plan, spec=spec, red=red,
                           overlap=overlap, attend0=attend0, attend1=attend1), None

    L = stacked["input_norm.weight"].shape[0]
    xs = (stacked, transformer.next_norms(stacked, weights["final_norm.weight"]), jnp.arange(L, dtype=jnp.int32))
    with jax.named_scope("layers"):
        (x0, r0, p1, r1, cache), _ = jax.lax.scan(body, carry, xs)
    with jax.named_scope("reduce_final"):
        x1, _ = red(p1, r1, weights["final_norm.weight"])
    return plan.join(x0, x1.reshape(B1, S1, D)), cache


def forward(weights: dict, tokens: jax.Array, positions: jax.Array, *, split: SplitConfig | None,
            spec: LayerSpec, red: Reducer, inv_freq, attend: Callable, split_attend: Callable | None = None,
            cache=None, unroll: bool = False):
    """The decoder on a [B, S] batch: TokenWeave's split schedule when `split` cuts this shape
    (split_attend(plan) -> (attend0, attend1) gives the halves' attention), else the unsplit
    scan (models/transformer.py) with `attend`. Same outputs either way."""
    B, S = tokens.shape
    plan = plan_split(B, S, split) if (split is not None and split_attend is not None) else None
    if plan is None:
        return transformer.forward(weights, tokens, positions, spec=spec, reduce=red, inv_freq=inv_freq,
                                   attend=attend, cache=cache, unroll=unroll)
    attend0, attend1 = split_attend(plan)
    return split_forward(weights, tokens, positions, plan, spec=spec, red=red, inv_freq=inv_freq,
                         overlap=use_overlap(split, red), attend0=attend0, attend1=attend1, cache=cache)
