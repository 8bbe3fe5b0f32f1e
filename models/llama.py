"""Llama-family decoder (Llama 3, Qwen2, SmolLM2) as Flax NNX parameter containers: what the
weights are, their logical axes and their checkpoint paths. Mixtral is the same decoder with a
mixture-of-experts FFN (models/mixtral.py). The math that runs on these weights is in
models/layers.py (one layer) and models/transformer.py (the scanned stack).

Parameter layouts (global shapes; logical axis names in brackets, mapped to mesh axes by
``jax_tokenweave.parallel.sharding``):
    embed_tokens.embedding  [V, D]      (vocab, embed)
    layers.i.attn.q_proj.kernel [D, H, hd] (embed, heads, head_dim)   .bias [H, hd]
    layers.i.attn.k_proj / v_proj.kernel [D, KVH, hd] (embed, kv_heads, head_dim)  .bias [KVH, hd]
    layers.i.attn.o_proj.kernel [H, hd, D] (heads, head_dim, embed)
    layers.i.mlp.gate_proj / up_proj.kernel [D, F] (embed, ffn);  down_proj.kernel [F, D]
    layers.i.input_norm.weight, layers.i.post_attn_norm.weight, final_norm.weight  [D]
    lm_head.kernel [D, V] (embed, vocab) -- absent when embeddings are tied (embedding.T is used)

Checkpoints keep one entry per layer (``layers.i.*``); the runner stacks them into ``layers.*``
[L, ...] (``stack_layers``) so the layers run under one ``lax.scan``.
"""
from __future__ import annotations

import functools
import re

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jax_tokenweave.models.config import ModelConfig
from jax_tokenweave.models.mixtral import MoE
from jax_tokenweave.models.params import Proj, RMSNorm, param


class Embedding(nnx.Module):
    def __init__(self, vocab, dim, *, rngs, dtype):
        self.embedding = param(rngs, (vocab, dim), ("vocab", "embed"), dtype, 1.0)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs, dtype):
        D, H, KVH, hd = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        bias = cfg.attention_bias
        self.q_proj = Proj((D, H, hd), ("embed", "heads", "head_dim"), rngs=rngs, dtype=dtype,
                           bias_shape=(H, hd) if bias else None, bias_axes=("heads", "head_dim"))
        for name in ("k_proj", "v_proj"):
            setattr(self, name, Proj((D, KVH, hd), ("embed", "kv_heads", "head_dim"), rngs=rngs,
                                     dtype=dtype, bias_shape=(KVH, hd) if bias else None,
                                     bias_axes=("kv_heads", "head_dim")))
        self.o_proj = Proj((H, hd, D), ("heads", "head_dim", "embed"), rngs=rngs, dtype=dtype)


class MLP(nnx.Module):
    """Dense SwiGLU: column-parallel gate/up, row-parallel down."""

    def __init__(self, cfg: ModelConfig, *, rngs, dtype):
        D, F = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = Proj((D, F), ("embed", "ffn"), rngs=rngs, dtype=dtype)
        self.up_proj = Proj((D, F), ("embed", "ffn"), rngs=rngs, dtype=dtype)
        self.down_proj = Proj((F, D), ("ffn", "embed"), rngs=rngs, dtype=dtype)


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs, dtype):
        self.input_norm = RMSNorm(cfg.hidden_size, rngs=rngs, dtype=dtype)
        self.attn = Attention(cfg, rngs=rngs, dtype=dtype)
        self.post_attn_norm = RMSNorm(cfg.hidden_size, rngs=rngs, dtype=dtype)
        self.mlp = (MoE if cfg.num_experts else MLP)(cfg, rngs=rngs, dtype=dtype)


class Llama(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.cfg = cfg
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size, rngs=rngs, dtype=dtype)
        self.layers = nnx.List([DecoderLayer(cfg, rngs=rngs, dtype=dtype)
                                for _ in range(cfg.num_layers)])
        self.final_norm = RMSNorm(cfg.hidden_size, rngs=rngs, dtype=dtype)
        if not cfg.tie_word_embeddings:
            self.lm_head = Proj((cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), rngs=rngs,
                                dtype=dtype)


# ------------------------------------------------------------------------- abstract structure

@functools.lru_cache(maxsize=None)
def abstract_model(cfg: ModelConfig, dtype=jnp.float32) -> Llama:
    """The model with ShapeDtypeStructs for values: structure, paths, shapes and axes, no memory."""
    return nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0), dtype=dtype))


def path_str(path: tuple) -> str:
    return ".".join(str(p) for p in path)


@functools.lru_cache(maxsize=None)
def _info(cfg: ModelConfig) -> dict:
    _, state = nnx.split(abstract_model(cfg))
    return {path_str(p): (tuple(v.shape), tuple(v.get_metadata()["axes"]), v.get_metadata()["init_std"])
            for p, v in nnx.to_flat_state(state)}


def param_info(cfg: ModelConfig) -> dict[str, tuple[tuple[int, ...], tuple]]:
    """Checkpoint layout: flat dotted path -> (global shape, logical axes) for every parameter."""
    return {p: (shape, axes) for p, (shape, axes, _) in _info(cfg).items()}


_LAYER_PATH = re.compile(r"layers\.(\d+)\.(.+)")


def stacked_param_info(cfg: ModelConfig) -> dict[str, tuple[tuple[int, ...], tuple, float | None]]:
    """Runtime layout: path -> (global shape, logical axes, init std), the layers stacked as
    ``layers.<path>`` [L, ...] on a leading "layers" axis."""
    out = {}
    for p, (shape, axes, std) in _info(cfg).items():
        m = _LAYER_PATH.fullmatch(p)
        if m is None:
            out[p] = (shape, axes, std)
        elif m.group(1) == "0":
            out[f"layers.{m.group(2)}"] = ((cfg.num_layers,) + shape, ("layers",) + axes, std)
    return out


def is_stacked(params) -> bool:
    return any(k.startswith("layers.") and not _LAYER_PATH.fullmatch(k) for k in params)


def stack_layers(params: dict, cfg: ModelConfig) -> dict:
    """Checkpoint layout (``layers.i.<path>``) -> runtime layout (``layers.<path>`` [L, ...]).
    Arrays may be numpy or jax; jax arrays are stacked where they are."""
    out, per_layer = {}, {}
    for k, v in params.items():
        m = _LAYER_PATH.fullmatch(k)
        if m is None:
            out[k] = v
        else:
            per_layer.setdefault(m.group(2), {})[int(m.group(1))] = v
    for sub, by_layer in per_layer.items():
        missing = sorted(set(range(cfg.num_layers)) - set(by_layer))
        if missing:
            raise ValueError(f"parameter layers.*.{sub} is missing for layers {missing}")
        arrs = [by_layer[i] for i in range(cfg.num_layers)]
        stack = np.stack if all(isinstance(a, np.ndarray) for a in arrs) else jnp.stack
        out[f"layers.{sub}"] = stack(arrs)
    return out


def unstack_layers(params: dict) -> dict:
    """Runtime layout -> checkpoint layout (the inverse of stack_layers), numpy or jax slices."""
    out = {}
    for k, v in params.items():
        if k.startswith("layers.") and not _LAYER_PATH.fullmatch(k):
            sub = k[len("layers."):]
            for i in range(v.shape[0]):
                out[f"layers.{i}.{sub}"] = v[i]
        else:
            out[k] = v
    return out
