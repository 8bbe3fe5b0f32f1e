"""Mixtral's sparse mixture-of-experts FFN as a function of its (local) weights.

Tensor parallelism (as vLLM and TokenWeave shard Mixtral): every expert's FFN is split over the tp
axis on its ffn dimension, the router is replicated. Each rank routes all tokens identically,
runs its 1/N slice of every chosen expert (column-parallel w1/w3, row-parallel w2) and so ends
with a partial sum [T, D] -- the same contract as the dense MLP's down_proj output, so the layer
feeds it to the same fused AllReduce + residual + RMSNorm.

Routing (HF ``MixtralSparseMoeBlock``): router logits in the model dtype, softmax in fp32,
top-k experts, their k weights renormalised to sum 1. Grouped expert matmuls: the T*k
(token, expert) assignments are sorted by expert and run as ``jax.lax.ragged_dot`` over the
contiguous groups, then unsorted and weight-summed -- no loop over experts, no dense
all-experts compute.

``impl`` picks the grouped matmul:
  ``ragged``    jax.lax.ragged_dot over the sorted assignments (the default).
  ``capacity``  scatter the sorted assignments into a [E, C, D] buffer of static per-expert
                capacity C = ceil(capacity_factor * T*k / E), one batched matmul per weight, gather
                back. Exact: when any expert gets more than C rows the layer takes the ragged path
                instead (lax.cond on the group sizes, identical on every rank). Useful where
                XLA lowers ragged_dot by padding every group to the full row count.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

MOE_IMPLS = ("ragged", "capacity")
CAPACITY_FACTOR = 1.25


def route(router_logits: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """HF Mixtral routing: softmax in fp32 over experts, top-k, renormalise.
    router_logits [T, E] -> (weights [T, k] float32 summing to 1, expert ids [T, k] int32)."""
    probs = jax.nn.softmax(router_logits.astype(jnp.float32), axis=-1)
    weights, experts = jax.lax.top_k(probs, k)
    return weights / jnp.sum(weights, axis=-1, keepdims=True), experts.astype(jnp.int32)


def sort_by_expert(experts: jax.Array, num_experts: int):
    """experts [T, k] -> (order [T*k]: assignment slots sorted by expert (stable), sorted expert
    ids [T*k], group_sizes [E] int32). Slot s is token s // k's (s % k)-th choice."""
    flat = experts.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    group_sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
    return order, flat[order], group_sizes


def _swiglu_ragged(xs, w1, w3, w2, group_sizes):
    """Rows xs [N, D] sorted by expert, groups of group_sizes [E] -> [N, D] (partial over tp)."""
    gate = jax.lax.ragged_dot(xs, w1, group_sizes)
    up = jax.lax.ragged_dot(xs, w3, group_sizes)
    return jax.lax.ragged_dot(jax.nn.silu(gate) * up, w2, group_sizes)


def capacity(num_rows: int, num_experts: int, factor: float = CAPACITY_FACTOR) -> int:
    """Static rows per expert for the capacity path: factor x the balanced share, a multiple of
    8, at most num_rows."""
    c = math.ceil(factor * num_rows / num_experts)
    return min(num_rows, -(-c // 8) * 8)


def _swiglu_capacity(xs, sorted_experts, w1, w3, w2, group_sizes, cap):
    """The same as _swiglu_ragged when every group fits `cap` rows: scatter into [E, cap, D],
    batched matmuls, gather back."""
    E = w1.shape[0]
    starts = jnp.cumsum(group_sizes) - group_sizes
    pos = jnp.arange(xs.shape[0], dtype=jnp.int32) - starts[sorted_experts]
    buf = jnp.zeros((E, cap, xs.shape[1]), xs.dtype).at[sorted_experts, pos].set(xs, mode="drop")
    gate = jnp.einsum("ecd,edf->ecf", buf, w1)
    up = jnp.einsum("ecd,edf->ecf", buf, w3)
    out = jnp.einsum("ecf,efd->ecd", jax.nn.silu(gate) * up, w2)
    return out.at[sorted_experts, pos].get(mode="fill", fill_value=0)


def moe_ffn(x: jax.Array, router: jax.Array, w1: jax.Array, w3: jax.Array, w2: jax.Array, *,
            k: int, impl: str = "ragged") -> jax.Array:
    """x [..., D] (replicated) -> partial [..., D]. router [D, E]; w1, w3 [E, D, F_local];
    w2 [E, F_local, D]."""
    if impl not in MOE_IMPLS:
        raise ValueError(f"moe_impl={impl!r}; choose one of {MOE_IMPLS}")
    shape, D = x.shape, x.shape[-1]
    x = x.reshape(-1, D)
    T, E = x.shape[0], w1.shape[0]
    with jax.named_scope("router"):
        weights, experts = route(jnp.einsum("td,de->te", x, router), k)
        order, sorted_experts, group_sizes = sort_by_expert(experts, E)
        xs = jnp.take(x, order // k, axis=0)                            # [T*k, D] sorted rows
    with jax.named_scope("experts"):
        cap = capacity(T * k, E)
        if impl == "capacity" and cap < T * k:
            ys = jax.lax.cond(
                jnp.max(group_sizes) <= cap,
                lambda: _swiglu_capacity(xs, sorted_experts, w1, w3, w2, group_sizes, cap),
                lambda: _swiglu_ragged(xs, w1, w3, w2, group_sizes))
        else:
            ys = _swiglu_ragged(xs, w1, w3, w2, group_sizes)
    with jax.named_scope("combine"):
        inverse = jnp.argsort(order)                                    # slot -> sorted row
        y = jnp.take(ys, inverse, axis=0).reshape(T, k, D)
        out = jnp.einsum("tkd,tk->td", y.astype(jnp.float32), weights).astype(x.dtype)
    return out.reshape(shape)
