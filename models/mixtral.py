"""Mixtral: the Llama decoder with its dense MLP swapped for a sparse mixture of experts. These
are the MoE block's parameter containers; the math is models/moe.py, called from the same layer
function as the dense FFN (models/layers.py ``ffn_block``). ``DecoderLayer`` (models/llama.py)
builds an ``MoE`` for configs with ``num_experts`` > 0, so ``Llama(cfg)`` is the Mixtral model
for a Mixtral config.

Parameters (global shapes, logical axes):
    layers.i.mlp.gate.kernel        [D, E]     (embed, experts)       router, replicated
    layers.i.mlp.experts.w1 / w3    [E, D, F]  (experts, embed, ffn)  gate / up, column-parallel
    layers.i.mlp.experts.w2         [E, F, D]  (experts, ffn, embed)  down, row-parallel
"""
from __future__ import annotations

import math

from flax import nnx

from jax_tokenweave.models.config import ModelConfig
from jax_tokenweave.models.moe import MOE_IMPLS, capacity, moe_ffn, route, sort_by_expert  # noqa: F401
from jax_tokenweave.models.params import Proj, param


class Experts(nnx.Module):
    """E SwiGLU experts' weights, stacked on a leading experts axis."""

    def __init__(self, cfg: ModelConfig, *, rngs, dtype):
        E, D, F = cfg.num_experts, cfg.hidden_size, cfg.intermediate_size
        self.w1 = param(rngs, (E, D, F), ("experts", "embed", "ffn"), dtype, 1.0 / math.sqrt(D))
        self.w3 = param(rngs, (E, D, F), ("experts", "embed", "ffn"), dtype, 1.0 / math.sqrt(D))
        self.w2 = param(rngs, (E, F, D), ("experts", "ffn", "embed"), dtype, 1.0 / math.sqrt(F))


class MoE(nnx.Module):
    """Top-k sparse mixture of SwiGLU experts, experts tensor-parallel on their ffn axis."""

    def __init__(self, cfg: ModelConfig, *, rngs, dtype):
        self.gate = Proj((cfg.hidden_size, cfg.num_experts), ("embed", "experts"), rngs=rngs,
                         dtype=dtype)
        self.experts = Experts(cfg, rngs=rngs, dtype=dtype)
