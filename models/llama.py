"""Llama-family decoder (Llama 3, Qwen2, SmolLM2) as Flax NNX modules, written for TokenWeave's
tensor-parallel layer schedule. Mixtral is this decoder with a mixture-of-experts FFN
(``make_ffn``, ``models/mixtral.py``).

The module code runs *inside* ``shard_map`` and sees local shards: local head counts, the local
vocabulary slice and the local FFN width come from parameter shapes, never from the config. Every
tensor-parallel reduction is one call of ``fused_allreduce_rmsnorm`` (see ``jax_tokenweave/collective/fused.py``):

    normed, res = fused(embed_partial, zeros(R, D), layers[0].input_norm)
    per layer:    h = attention(normed)          -> o_proj partial [T, D]
                  normed, res = fused(h, res, post_attn_norm)
                  h = mlp(normed)                -> down_proj partial [T, D]
                  normed, res = fused(h, res, next layer's input_norm | final_norm)
    logits = all_gather_vocab(normed @ lm_head_shard)

so a model of L layers makes 2L+1 fused calls, and the residual stream stays sharded by token rows.

Parameter layouts (global shapes; logical axis names in brackets, mapped to mesh axes by
``jax_tokenweave.parallel.sharding``):
    embed_tokens.embedding  [V, D]      (vocab, embed)
    layers.i.attn.q_proj.kernel [D, H, hd] (embed, heads, head_dim)   .bias [H, hd]
    layers.i.attn.k_proj / v_proj.kernel [D, KVH, hd] (embed, kv_heads, head_dim)  .bias [KVH, hd]
    layers.i.attn.o_proj.kernel [H, hd, D] (heads, head_dim, embed)
    layers.i.mlp.gate_proj / up_proj.kernel [D, F] (embed, ffn);  down_proj.kernel [F, D]
    layers.i.input_norm.weight, layers.i.post_attn_norm.weight, final_norm.weight  [D]
    lm_head.kernel [D, V] (embed, vocab) -- absent when embeddings are tied (embedding.T is used)
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jax_tokenweave.compat import axis_size
from jax_tokenweave.collective.fused import fused_allreduce_rmsnorm, rows_per_rank
from jax_tokenweave.models.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class TPContext:
    """How the model talks to its mesh axis. Static (hashable): it is part of the compiled graph."""
    axis_name: str = "tp"
    impl: str = "xla"          # fused_allreduce_rmsnorm implementation
    comm: Any = None           # Communicator for the CUDA implementations
    attn_impl: str = "xla"     # prefill attention: "xla" or "cudnn" (used for bf16/fp16 only)
    moe_impl: str = "ragged"   # MoE grouped matmul (Mixtral): "ragged" or "capacity", see mixtral.py
    split: Any = None          # weave.SplitConfig: split big full/prefill batches in two and
                               # overlap one half's fused call with the other's compute (weave.py)


# ----------------------------------------------------------------------------------------- RoPE

def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
    """Inverse frequencies [hd/2], float32, as HF computes them (incl. Llama-3 scaling)."""
    hd = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (np.arange(0, hd, 2, dtype=np.int64).astype(np.float32) / hd))
    inv = inv.astype(np.float32)
    s = cfg.rope_scaling
    if s is None:
        return inv
    # Llama 3: long wavelengths are slowed by `factor`, short ones kept, the band between blended.
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > low_wavelen, inv / s.factor, inv)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def rope_cos_sin(positions: jax.Array, inv_freq: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """cos, sin [B, S, hd] (float32) for integer positions [B, S]."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate-half RoPE (HF Llama/Qwen2 convention) on x [B, S, heads, hd]."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    cos, sin = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
    return x * cos + rotated * sin


# -------------------------------------------------------------------------------------- modules

def _param(rngs: nnx.Rngs, shape, axes, dtype, std: float | None) -> nnx.Param:
    """A parameter with its logical axis names; std=None means ones (norm weights)."""
    if std is None:
        value = jnp.ones(shape, dtype)
    else:
        value = (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
    return nnx.Param(value, axes=axes)


class Proj(nnx.Module):
    """A projection weight (no math of its own: the einsum lives where its dims are named)."""

    def __init__(self, shape, axes, *, rngs, dtype, bias_shape=None, bias_axes=None):
        fan_in = math.prod(shape[:-1]) if axes[-1] == "embed" else shape[0]
        self.kernel = _param(rngs, shape, axes, dtype, 1.0 / math.sqrt(fan_in))
        if bias_shape is not None:
            self.bias = _param(rngs, bias_shape, bias_axes, dtype, 0.02)


class RMSNorm(nnx.Module):
    """Only the weight: normalisation itself happens inside the fused all-reduce."""

    def __init__(self, dim, *, rngs, dtype):
        self.weight = _param(rngs, (dim,), ("embed",), dtype, None)


class Embedding(nnx.Module):
    def __init__(self, vocab, dim, *, rngs, dtype):
        self.embedding = _param(rngs, (vocab, dim), ("vocab", "embed"), dtype, 1.0)

    def __call__(self, ids: jax.Array, ctx: TPContext) -> jax.Array:
        """Vocab-parallel lookup: ids [T] -> partial sum [T, D] (zero rows for ids off this shard)."""
        table = self.embedding[...]
        local_vocab = table.shape[0]
        local = ids - jax.lax.axis_index(ctx.axis_name) * local_vocab
        inside = (local >= 0) & (local < local_vocab)
        rows = jnp.take(table, jnp.where(inside, local, 0), axis=0)
        return jnp.where(inside[:, None], rows, jnp.zeros_like(rows))


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs, dtype):
        D, H, KVH, hd = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        bias = cfg.attention_bias
        self.num_kv_heads = KVH
        self.q_proj = Proj((D, H, hd), ("embed", "heads", "head_dim"), rngs=rngs, dtype=dtype,
                           bias_shape=(H, hd) if bias else None, bias_axes=("heads", "head_dim"))
        for name in ("k_proj", "v_proj"):
            setattr(self, name, Proj((D, KVH, hd), ("embed", "kv_heads", "head_dim"), rngs=rngs,
                                     dtype=dtype, bias_shape=(KVH, hd) if bias else None,
                                     bias_axes=("kv_heads", "head_dim")))
        self.o_proj = Proj((H, hd, D), ("heads", "head_dim", "embed"), rngs=rngs, dtype=dtype)

    def _project(self, x, proj: Proj, kv_slice):
        w = proj.kernel[...]
        b = proj.bias[...] if hasattr(proj, "bias") else None
        if kv_slice is not None:
            # KV heads are replicated (tp > num_kv_heads): compute only the head this rank's
            # query heads read, instead of all of them.
            w = jax.lax.dynamic_slice_in_dim(w, kv_slice, 1, axis=1)
            b = None if b is None else jax.lax.dynamic_slice_in_dim(b, kv_slice, 1, axis=0)
        y = jnp.einsum("bsd,dhk->bshk", x, w)
        return y if b is None else y + b

    def __call__(self, x, cos, sin, *, ctx: TPContext, mode: str = "full", cache=None,
                 layer: int = 0, lengths=None):
        """x [B, S, D] (replicated) -> (o_proj partial [B, S, D], cache).

        mode "full": causal over x alone, no cache. "prefill": the same, and k/v are written to
        cache[layer, :, :S]. "decode": S == 1, k/v written at position lengths[b], attention over
        cache positions <= lengths[b]. cache = (k, v), each local [L, B, max_len, KVH_local, hd]."""
        tp = axis_size(ctx.axis_name)
        kv_slice = None
        if tp > self.num_kv_heads:
            kv_slice = jax.lax.axis_index(ctx.axis_name) * self.num_kv_heads // tp
        q = apply_rope(self._project(x, self.q_proj, None), cos, sin)
        k = apply_rope(self._project(x, self.k_proj, kv_slice), cos, sin)
        v = self._project(x, self.v_proj, kv_slice)

        if mode in ("full", "prefill"):
            # Right-padded batches need no padding mask: a valid query i < length only sees
            # keys j <= i, which are all valid. So plain causal attention (cuDNN-friendly).
            out = jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                               implementation=_prefill_attn_impl(ctx, q))
            if mode == "prefill":
                ck, cv = cache
                idx = (layer, 0, 0, 0, 0)
                cache = (jax.lax.dynamic_update_slice(ck, k[None].astype(ck.dtype), idx),
                         jax.lax.dynamic_update_slice(cv, v[None].astype(cv.dtype), idx))
        elif mode == "decode":
            ck, cv = cache
            batch = jnp.arange(x.shape[0])
            ck = ck.at[layer, batch, lengths].set(k[:, 0].astype(ck.dtype))
            cv = cv.at[layer, batch, lengths].set(v[:, 0].astype(cv.dtype))
            cache = (ck, cv)
            out = jax.nn.dot_product_attention(
                q, ck[layer].astype(q.dtype), cv[layer].astype(q.dtype),
                key_value_seq_lengths=lengths + 1, implementation="xla")
        else:
            raise ValueError(f"unknown attention mode {mode!r}")
        return jnp.einsum("bshk,hkd->bsd", out, self.o_proj.kernel[...]), cache


def _prefill_attn_impl(ctx: TPContext, q: jax.Array) -> str:
    # cuDNN's fused attention takes half precision and head_dim a multiple of 8 up to 256;
    # anything else (float32 tests, odd shapes) goes to XLA.
    if (ctx.attn_impl == "cudnn" and q.dtype in (jnp.bfloat16, jnp.float16)
            and q.shape[-1] % 8 == 0 and q.shape[-1] <= 256):
        return "cudnn"
    return "xla"


def silu(x: jax.Array) -> jax.Array:
    return x * jax.lax.logistic(x)


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs, dtype):
        D, F = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = Proj((D, F), ("embed", "ffn"), rngs=rngs, dtype=dtype)
        self.up_proj = Proj((D, F), ("embed", "ffn"), rngs=rngs, dtype=dtype)
        self.down_proj = Proj((F, D), ("ffn", "embed"), rngs=rngs, dtype=dtype)

    def __call__(self, x, ctx: TPContext | None = None):
        """SwiGLU on x [..., D] -> down_proj partial [..., D] (column- then row-parallel)."""
        gate = jnp.einsum("...d,df->...f", x, self.gate_proj.kernel[...])
        up = jnp.einsum("...d,df->...f", x, self.up_proj.kernel[...])
        return jnp.einsum("...f,fd->...d", silu(gate) * up, self.down_proj.kernel[...])


def make_ffn(cfg: ModelConfig, *, rngs, dtype) -> nnx.Module:
    """The layer's FFN block: dense SwiGLU, or Mixtral's mixture of experts when cfg.num_experts.
    Either returns a partial sum over the tp shards, reduced by the same fused call."""
    if cfg.num_experts:
        from jax_tokenweave.models.mixtral import MoE  # late: mixtral.py imports this module
        return MoE(cfg, rngs=rngs, dtype=dtype)
    return MLP(cfg, rngs=rngs, dtype=dtype)


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs, dtype):
        self.input_norm = RMSNorm(cfg.hidden_size, rngs=rngs, dtype=dtype)
        self.attn = Attention(cfg, rngs=rngs, dtype=dtype)
        self.post_attn_norm = RMSNorm(cfg.hidden_size, rngs=rngs, dtype=dtype)
        self.mlp = make_ffn(cfg, rngs=rngs, dtype=dtype)
        self.eps = cfg.rms_norm_eps

    def __call__(self, x, residual, next_norm, cos, sin, *, ctx: TPContext, mode="full",
                 cache=None, layer=0, lengths=None):
        """x [B, S, D] normed input (replicated), residual [R, D] (this rank's token rows).
        Returns (next normed input [B, S, D], residual, cache)."""
        B, S, D = x.shape
        fused = functools.partial(fused_allreduce_rmsnorm, axis_name=ctx.axis_name, eps=self.eps,
                                  impl=ctx.impl, comm=ctx.comm)
        with jax.named_scope("attention"):
            h, cache = self.attn(x, cos, sin, ctx=ctx, mode=mode, cache=cache, layer=layer,
                                 lengths=lengths)
        with jax.named_scope("fused_post_attn"):
            x, residual = fused(h.reshape(B * S, D), residual, self.post_attn_norm.weight[...])
        with jax.named_scope("mlp"):
            h = self.mlp(x.reshape(B, S, D), ctx)
        with jax.named_scope("fused_post_mlp"):
            x, residual = fused(h.reshape(B * S, D), residual, next_norm)
        return x.reshape(B, S, D), residual, cache


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

    def __call__(self, tokens, positions, *, ctx: TPContext, mode="full", cache=None, lengths=None):
        """tokens, positions [B, S] -> (final normed hidden [B, S, D] (replicated), cache)."""
        cfg = self.cfg
        B, S = tokens.shape
        if ctx.split is not None and mode in ("full", "prefill"):
            from jax_tokenweave import weave  # late: weave.py imports this module
            plan = weave.plan_split(B, S, ctx.split)
            if plan is not None:  # below the threshold: the unsplit path below
                return weave.weave_forward(self, tokens, positions, plan, ctx=ctx, mode=mode,
                                           cache=cache)
        T, D = B * S, cfg.hidden_size
        with jax.named_scope("embed"):
            partial = self.embed_tokens(tokens.reshape(T), ctx)
        residual = jnp.zeros((rows_per_rank(T, axis_size(ctx.axis_name)), D), partial.dtype)
        with jax.named_scope("fused_embed"):
            x, residual = fused_allreduce_rmsnorm(
                partial, residual, self.layers[0].input_norm.weight[...], axis_name=ctx.axis_name,
                eps=cfg.rms_norm_eps, impl=ctx.impl, comm=ctx.comm)
        x = x.reshape(B, S, D)
        cos, sin = rope_cos_sin(positions, rope_inv_freq(cfg))
        next_norms = [l.input_norm.weight[...] for l in self.layers[1:]] + [self.final_norm.weight[...]]
        for i, layer in enumerate(self.layers):
            with jax.named_scope(f"layer_{i}"):
                x, residual, cache = layer(x, residual, next_norms[i], cos, sin, ctx=ctx, mode=mode,
                                           cache=cache, layer=i, lengths=lengths)
        return x, cache

    def lm_head_logits(self, x: jax.Array, ctx: TPContext) -> jax.Array:
        """x [N, D] (replicated) -> float32 logits [N, V] over the full vocabulary."""
        if self.cfg.tie_word_embeddings:
            w = self.embed_tokens.embedding[...].T
        else:
            w = self.lm_head.kernel[...]
        with jax.named_scope("lm_head"):
            local = jnp.einsum("nd,dv->nv", x, w).astype(jnp.float32)
            return jax.lax.all_gather(local, ctx.axis_name, axis=1, tiled=True)


# ------------------------------------------------------------------------- abstract structure

@functools.lru_cache(maxsize=None)
def abstract_model(cfg: ModelConfig, dtype=jnp.float32) -> Llama:
    """The model with ShapeDtypeStructs for values: structure, paths, shapes and axes, no memory."""
    return nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0), dtype=dtype))


def path_str(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def param_info(cfg: ModelConfig, dtype=jnp.float32) -> dict[str, tuple[tuple[int, ...], tuple]]:
    """Flat dotted path -> (global shape, logical axes) for every parameter."""
    _, state = nnx.split(abstract_model(cfg, dtype))
    return {path_str(p): (tuple(v.shape), tuple(v.get_metadata()["axes"]))
            for p, v in nnx.to_flat_state(state)}
