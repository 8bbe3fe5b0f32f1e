"""The transformer layer math, written once, as plain functions over a layer's (local) weights.

Everything here runs inside ``shard_map`` and sees local shards: local head counts, the local
vocabulary slice and the local FFN width come from weight shapes, never from the config. A layer's
weights are a dict keyed by the parameter paths below ``layers.{i}.`` (``attn.q_proj.kernel``,
``mlp.down_proj.kernel``, ...; models/llama.py declares them); under ``lax.scan`` every leaf
carries no layer axis, outside it the caller passes one layer's slice.

Two things vary between callers and are passed in:
  ``attend(q, k, v) -> (out, aux)``      how attention reads and writes keys/values: causal over
                                         the batch itself (prefill, logits), over the paged KV
                                         cache (decode, mixed batches), with a prefix (split
                                         halves); ``aux`` is whatever it threads back (the cache)
  ``reduce(partial, residual, gamma)``   the tensor-parallel reduction, ``collective.reducer``:
                                         the fused AllReduce + residual + RMSNorm for the model;
                                         psum or none in the benchmark variants

One layer (TokenWeave's order; each reduction also applies the next norm):
    h = attention_block(x)      -> o_proj partial [T, D]
    x, res = reduce(h, res, post_attn_norm)
    m = ffn_block(x)            -> down_proj partial [T, D]   (dense SwiGLU or Mixtral's MoE)
    x, res = reduce(m, res, next layer's input_norm | final_norm)
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jax_tokenweave.compat import axis_size
from jax_tokenweave.kernels.layer_matmul import layer_matmul
from jax_tokenweave.kernels.layer_of import LayerOf, resolve
from jax_tokenweave.kernels.layer_qkv import fits as layer_qkv_fits, layer_qkv
from jax_tokenweave.kernels.layer_swiglu import fills_the_gpu, layer_swiglu
from jax_tokenweave.models.config import ModelConfig
from jax_tokenweave.models.moe import moe_ffn


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """Static facts the layer functions need (hashable: part of the compiled graph)."""
    num_kv_heads: int              # global KV heads (replicated over ranks when tp exceeds them)
    axis_name: str = "tp"
    experts_per_token: int = 0     # > 0: Mixtral's MoE FFN
    moe_impl: str = "ragged"

    @classmethod
    def of(cls, cfg: ModelConfig, axis_name: str = "tp", moe_impl: str = "ragged") -> "LayerSpec":
        return cls(cfg.num_kv_heads, axis_name, cfg.num_experts_per_tok if cfg.num_experts else 0,
                   moe_impl)


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


# ------------------------------------------------------------------------ embedding and head

def embed(table: jax.Array, ids: jax.Array, axis_name: str) -> jax.Array:
    """Vocab-parallel lookup: ids [T] -> partial sum [T, D] (zero rows for ids off this shard)."""
    local_vocab = table.shape[0]
    local = ids - jax.lax.axis_index(axis_name) * local_vocab
    inside = (local >= 0) & (local < local_vocab)
    rows = jnp.take(table, jnp.where(inside, local, 0), axis=0)
    return jnp.where(inside[:, None], rows, jnp.zeros_like(rows))


def lm_head(x: jax.Array, w_out: jax.Array, axis_name: str) -> jax.Array:
    """x [N, D] (replicated), w_out [D, V_local] -> float32 logits [N, V] over the full vocabulary."""
    with jax.named_scope("lm_head"):
        local = jnp.einsum("nd,dv->nv", x, w_out).astype(jnp.float32)
        return jax.lax.all_gather(local, axis_name, axis=1, tiled=True)


# ---------------------------------------------------------------------------------- attention

def qkv(w, x: jax.Array, rope, spec: LayerSpec):
    """x [B, S, D] -> q [B, S, Hl, hd], k, v [B, S, KVHl, hd] (RoPE applied to q and k).

    The weights as ``LayerOf`` the stacked arrays (the unrolled decode step): on GPU one kernel,
    kernels.layer_qkv, projects all three and rotates q and k where its tiles fit; otherwise the
    einsums on the slices."""
    cos, sin = rope
    kv_slice = None
    tp = axis_size(spec.axis_name)
    if tp > spec.num_kv_heads:
        # KV heads are replicated (tp > num_kv_heads): compute only the head this rank's query
        # heads read, instead of all of them.
        kv_slice = jax.lax.axis_index(spec.axis_name) * spec.num_kv_heads // tp

    names = ("q_proj", "k_proj", "v_proj")
    wq = w["attn.q_proj.kernel"]
    if isinstance(wq, LayerOf) and use_kernels() and layer_qkv_fits(*wq.shape[::2]):
        B, S, D = x.shape
        stacked = [w[f"attn.{n}.kernel"].stacked for n in names]
        biases = [w.get(f"attn.{n}.bias") for n in names]
        biases = None if biases[0] is None else [b.stacked for b in biases]
        flat = lambda a: a.reshape(B * S, a.shape[-1])
        q, k, v = layer_qkv(x.reshape(B * S, D), *stacked, wq.layer, flat(cos), flat(sin), biases=biases,
                            kv_head0=0 if kv_slice is None else kv_slice,
                            kv_heads=None if kv_slice is None else 1)
        return tuple(a.reshape(B, S, *a.shape[1:]) for a in (q, k, v))

    def project(name, sl):
        wt, b = resolve(w[f"attn.{name}.kernel"]), w.get(f"attn.{name}.bias")
        b = None if b is None else resolve(b)
        if sl is not None:
            wt = jax.lax.dynamic_slice_in_dim(wt, sl, 1, axis=1)
            b = None if b is None else jax.lax.dynamic_slice_in_dim(b, sl, 1, axis=0)
        y = jnp.einsum("bsd,dhk->bshk", x, wt)
        return y if b is None else y + b

    q = apply_rope(project("q_proj", None), cos, sin)
    k = apply_rope(project("k_proj", kv_slice), cos, sin)
    return q, k, project("v_proj", kv_slice)


def causal_attention(q, k, v, impl: str = "xla", prefix_kv=None):
    """Causal attention of q [B, S, H, hd] over its own k/v [B, S, KVH, hd], after all of
    prefix_kv (keys of earlier positions, e.g. the first half of the same sequences): key j of
    the concatenation is visible from query i iff j <= P + i, P = prefix length. Right-padded
    batches need no padding mask: a valid query i < length only sees keys j <= i, all valid.
    impl "cudnn" is used for half precision and head dims the kernel takes, else XLA."""
    if not (impl == "cudnn" and q.dtype in (jnp.bfloat16, jnp.float16)
            and q.shape[-1] % 8 == 0 and q.shape[-1] <= 256):
        impl = "xla"
    if prefix_kv is None:
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=impl)
    pk, pv = prefix_kv
    P, Sq = pk.shape[1], q.shape[1]
    kk, vv = jnp.concatenate([pk, k], axis=1), jnp.concatenate([pv, v], axis=1)
    if impl == "cudnn":
        # cuDNN's causal mask is top-left aligned: front-pad the queries by P rows.
        qp = jnp.concatenate([jnp.zeros((q.shape[0], P) + q.shape[2:], q.dtype), q], axis=1)
        return jax.nn.dot_product_attention(qp, kk, vv, is_causal=True, implementation="cudnn")[:, P:]
    # window (left = everything, right = P): key j visible iff j <= i + P.
    return jax.nn.dot_product_attention(q, kk, vv, is_causal=False, local_window_size=(P + Sq, P),
                                        implementation="xla")


def use_kernels() -> bool:
    """Whether the LayerOf weights go to the Pallas kernels (on GPU; elsewhere the einsums on the
    slices, with the same numerics as the other paths)."""
    return jax.default_backend() == "gpu"


def out_projection(out: jax.Array, wo) -> jax.Array:
    """o_proj: attention output [B, S, Hl, hd] -> partial [B*S, D]. ``wo`` is the layer's
    [Hl, hd, D], or ``LayerOf`` the stacked [L, Hl, hd, D] (the unrolled decode step); then on
    GPU the partial is the kernel's split-K pieces [S, B*S, D], which the reduction adds itself
    (collective/reducer.py), so no kernel of its own sums them.

    Why LayerOf: XLA:GPU sends this dot in the unrolled decode step to cuBLAS-Lt, which needs its
    weight as a buffer of its own, so each layer's slice was copied every step (a memcpy of
    0.5 ms in a 5.4 ms 8B step on the H200; bench/results/profile_decode_h200.json). On GPU
    kernels.layer_matmul reads the layer from the stacked weight in place instead (as fast as
    XLA's own dot on these shapes: bench/results/layer_matmul_h200.json); elsewhere the einsum
    runs on the slice, with the same numerics as the other paths."""
    B, S, H, K = out.shape
    if isinstance(wo, LayerOf):
        if use_kernels():
            L, _, _, D = wo.stacked.shape
            return layer_matmul(out.reshape(B * S, H * K), wo.stacked.reshape(L, H * K, D), wo.layer,
                                sum_splits=False)
        wo = wo.slice()
    return jnp.einsum("bshk,hkd->bsd", out, wo).reshape(B * S, -1)


def attention_block(w, x: jax.Array, rope, spec: LayerSpec, attend: Callable):
    """x [B, S, D] normed -> (o_proj partial [B*S, D], attend's aux)."""
    q, k, v = qkv(w, x, rope, spec)
    out, aux = attend(q, k, v)
    return out_projection(out.astype(x.dtype), w["attn.o_proj.kernel"]), aux


# ---------------------------------------------------------------------------------------- FFN

def dense_ffn(w, x: jax.Array) -> jax.Array:
    """SwiGLU, x [T, D] normed -> down_proj partial [T, D] (column- then row-parallel).
    Gate and up as ``LayerOf`` the stacked weights (the unrolled decode step): on GPU one kernel,
    kernels.layer_swiglu, computes both and their product where the FFN width fills the GPU;
    otherwise the einsums on the slices."""
    wg, wu = w["mlp.gate_proj.kernel"], w["mlp.up_proj.kernel"]
    if isinstance(wg, LayerOf) and use_kernels() and fills_the_gpu(wg.shape[-1]):
        h = layer_swiglu(x, wg.stacked, wu.stacked, wg.layer)
    else:
        gate = jnp.einsum("td,df->tf", x, resolve(wg))
        up = jnp.einsum("td,df->tf", x, resolve(wu))
        h = jax.nn.silu(gate) * up
    return jnp.einsum("tf,fd->td", h, w["mlp.down_proj.kernel"])


def ffn_block(w, x: jax.Array, spec: LayerSpec) -> jax.Array:
    """The layer's FFN: dense SwiGLU, or Mixtral's mixture of experts (models/moe.py). Either
    returns a partial sum over the tp shards, reduced by the same fused call."""
    if spec.experts_per_token:
        return moe_ffn(x, w["mlp.gate.kernel"], w["mlp.experts.w1"], w["mlp.experts.w3"],
                       w["mlp.experts.w2"], k=spec.experts_per_token, impl=spec.moe_impl)
    return dense_ffn(w, x)


# -------------------------------------------------------------------------------------- layer

def forward_layer(w, x: jax.Array, residual, next_norm, rope, *, spec: LayerSpec,
                  reduce: Callable, attend: Callable):
    """One layer: x [B, S, D] normed input (replicated), residual (the reducer's layout) ->
    (next normed input [B, S, D], residual, attend's aux)."""
    B, S, D = x.shape
    with jax.named_scope("attention"):
        h, aux = attention_block(w, x, rope, spec, attend)
    with jax.named_scope("reduce_post_attn"):
        xf, residual = reduce(h, residual, w["post_attn_norm.weight"])
    with jax.named_scope("ffn"):
        m = ffn_block(w, xf, spec)
    with jax.named_scope("reduce_post_ffn"):
        xf, residual = reduce(m, residual, next_norm)
    return xf.reshape(B, S, D), residual, aux
