"""The whole decoder as a function of stacked weights: embedding, the layers under one
``lax.scan`` (compile time does not grow with depth), the final norm, the LM head.

Weights (local shards inside ``shard_map``) are a flat dict keyed like the checkpoint, with the
layers stacked on a leading axis: ``embed_tokens.embedding``, ``final_norm.weight``,
``lm_head.kernel`` (absent when tied) and ``layers.<path>`` [L, ...] (``layer_weights`` strips
the prefix). A model of L layers makes 2L+1 reductions; with the fused op the residual stream
stays sharded by token rows (TokenWeave's RMSNorm reordering):

    normed, res = reduce(embed partial, zeros, layers[0].input_norm)
    per layer:    normed, res = forward_layer(...)     (models/layers.py)
    logits = lm_head(normed)

``attend(q, k, v, cache, layer) -> (out, cache)`` is the caller's (engine/attention.py): it says
how each layer reads and writes its keys and values; ``cache`` is threaded through the scan as
part of the carry, so in-place updates of it stay in place.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jax_tokenweave.kernels.layer_of import LayerOf
from jax_tokenweave.models import layers
from jax_tokenweave.models.layers import LayerSpec

LAYER_PREFIX = "layers."
# the layer weights the unrolled decode step hands to kernels whole (see forward's unroll)
IN_PLACE = ("attn.q_proj.kernel", "attn.k_proj.kernel", "attn.v_proj.kernel", "attn.q_proj.bias",
            "attn.k_proj.bias", "attn.v_proj.bias", "attn.o_proj.kernel", "post_attn_norm.weight",
            "mlp.gate_proj.kernel", "mlp.up_proj.kernel")


def layer_weights(weights: dict) -> dict:
    """The stacked layer weights, keyed by their path inside a layer (``attn.q_proj.kernel``)."""
    return {k[len(LAYER_PREFIX):]: v for k, v in weights.items() if k.startswith(LAYER_PREFIX)}


def output_weight(weights: dict) -> jax.Array:
    """The LM head [D, V_local]: its own weight, or the transposed embedding when tied."""
    w = weights.get("lm_head.kernel")
    return weights["embed_tokens.embedding"].T if w is None else w


def next_norms(stacked: dict, final_norm: jax.Array) -> jax.Array:
    """[L, D]: the norm applied after layer i's FFN reduction (layer i+1's input norm, the
    final norm after the last)."""
    return jnp.concatenate([stacked["input_norm.weight"][1:], final_norm[None]], axis=0)


def forward(weights: dict, tokens: jax.Array, positions: jax.Array, *, spec: LayerSpec,
            reduce, inv_freq, attend: Callable, cache=None, unroll: bool = False):
    """tokens, positions [B, S] -> (final normed hidden [B, S, D] (replicated), cache).

    unroll: emit the layers one after another instead of a loop. For memory-bound decode steps:
    inside the loop XLA on GPU copies each layer's weight slice before its GEMMs (measured on an
    H200: 6.5 of an 11.8 ms 8B decode step were those copies; unrolled, 6.2 ms). Unrolled, XLA's
    GEMMs read their slices in place, but a slice that feeds a custom call is still copied, so
    the weights that go to kernels (o_proj, gate/up, the norms of the reductions) are handed
    to the layer as LayerOf the stacked array (kernels/layer_of.py). Compute-bound steps
    (prefill, mixed batches) keep the loop, whose compile time does not grow with depth."""
    B, S = tokens.shape
    stacked = layer_weights(weights)
    with jax.named_scope("embed"):
        partial = layers.embed(weights["embed_tokens.embedding"], tokens.reshape(B * S), spec.axis_name)
    D = partial.shape[-1]
    with jax.named_scope("reduce_embed"):
        first_norm = stacked["input_norm.weight"]
        first_norm = LayerOf(first_norm, jnp.int32(0)) if unroll else first_norm[0]
        x, residual = reduce(partial, reduce.init(B * S, D, partial.dtype), first_norm)
    rope = layers.rope_cos_sin(positions, inv_freq)

    # The unrolled (decode) step reads these from the stacked weights in place (LayerOf).
    in_place = {k for k in IN_PLACE if k in stacked} if unroll else set()
    norms = next_norms(stacked, weights["final_norm.weight"])

    def body(carry, xs):
        x, residual, cache = carry
        w, next_norm, i = xs
        w = dict(w, **{k: LayerOf(stacked[k], i) for k in in_place})
        if unroll:
            next_norm = LayerOf(norms, i)

        def attend_layer(q, k, v):
            return attend(q, k, v, cache, i)
        x, residual, cache = layers.forward_layer(w, x, residual, next_norm, rope, spec=spec,
                                                  reduce=reduce, attend=attend_layer)
        return (x, residual, cache), None

    L = stacked["input_norm.weight"].shape[0]
    sliced = {k: v for k, v in stacked.items() if k not in in_place}
    # the layer indices as a constant, not an iota: XLA folds a constant's slices, but each
    # layer's slice of an iota was a kernel of its own in the unrolled step (0.8 us on the H200)
    xs = (sliced, norms, np.arange(L, dtype=np.int32))
    with jax.named_scope("layers"):
        (x, _, cache), _ = jax.lax.scan(body, (x.reshape(B, S, D), residual, cache), xs,
                                        unroll=L if unroll else 1)
    return x, cache


def logits_at(weights: dict, x: jax.Array, axis_name: str) -> jax.Array:
    """x [N, D] final normed hidden -> float32 logits [N, V]."""
    return layers.lm_head(x, output_weight(weights), axis_name)
