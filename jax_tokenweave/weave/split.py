"""TokenWeave's split schedule: token splitting and the overlapped layer, in one module.

Splitting
    A batch of T >= ``threshold`` tokens is cut into two halves at a wave-aware point:
    ``t0 = round(T/2 / tile) * tile + offset`` (clamped to [1, T-1]), so the GEMMs of each half
    fill whole tiles (waves) of the GPU; ``tile``/``offset`` come from a per-model table that
    ``scripts/tune_split.py`` measures (``weave_table.json``). Below the threshold: no split, the
    fused op alone. Two kinds, chosen statically from the batch shape [B, S]:

    ``batch``  B >= 2 and some b sequences hold ~t0 tokens (|b*S - t0| <= max(tile,
               max_imbalance*T)): half 0 = sequences [0, b), half 1 = [b, B). The halves'
               attentions are independent.
    ``seq``    otherwise (one long prompt, or a batch split too unbalanced): every sequence is
               cut at position s0 = round(t0 / B): half 0 = x[:, :s0], half 1 = x[:, s0:]. Half 1
               attends to half 0's keys/values too (concatenated before its own, causal with an
               offset of s0). With cuDNN the offset is done by front-padding half 1's queries
               with s0 zero rows and running the ordinary causal kernel (exact; wastes the s0^2/2
               triangle); with XLA by an explicit window mask (key j <= s0 + i).

    Under ``prefill`` both halves write their k/v into the cache at their own offsets.

The overlapped layer (TokenWeave's order; half 1 lags half 0 by one step)
    carry: x0 (half 0's normed input), r0, p1 (half 1's pending partial: previous MLP output or
    its embedding), r1; each residual is the half's own token-sharded residual
    (``rows_per_rank(T_half, N)`` rows, see fused.py). Per layer four pairs, each
    "one half's fused collective  ||  the other half's compute":

        pair 1:  x1, r1 = fused(p1, r1, input_norm)      ||  h0 = attention(x0)
        pair 2:  x0, r0 = fused(h0, r0, post_attn_norm)  ||  h1 = attention(x1 [, k0, v0])
        pair 3:  x1, r1 = fused(h1, r1, post_attn_norm)  ||  m0 = mlp(x0)
        pair 4:  x0, r0 = fused(m0, r0, next_norm)       ||  p1 = m1 = mlp(x1)

    The first fused call (half 0's embedding) runs alone; the last (half 1's final norm) too.
    How the pair overlaps (``overlap_pair``): the collective is *started* (the kernel goes to the
    communicator's own high-priority stream, ordered after its inputs by a CUDA event), the other
    half's compute is issued on XLA's stream, then *done* makes XLA's stream wait for the kernel.
    An optimization barrier puts the compute after the start; passing the compute's outputs to
    done puts the wait after the compute. The collective takes ``SplitConfig.comm_ctas`` SMs
    beside attention and ``comm_ctas_mlp`` beside the (longer) MLP; the matmuls get the rest. Used on GPU for the custom-call impls (``p2p``/``auto``/``multimem``); with
    ``impl="xla"`` the split relies on XLA's own async collectives. On CPU the math is identical.
    (DESIGN.md §4's stream annotations were tried first: the fused calls ran on their own streams
    but serialised against the matmuls, 0 µs of overlap; bench/results/README.md.)

Reductions (for benchmarks; the model always uses ``fused``):
    ``fused``   fused_allreduce_rmsnorm (token-sharded residual [R, D]) with ctx.impl
    ``psum``    XLA's native path: h = residual + psum(partial); normed = rmsnorm(h); residual
                replicated [T, D]. The baseline.
    ``nocomm``  h = residual + partial, no collective at all: NOT a correct model, only the ideal
                (communication-free) time for benchmarks.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp

from jax_tokenweave.compat import axis_size
from jax_tokenweave.collective.fused import (Pending, fused_allreduce_rmsnorm, fused_allreduce_rmsnorm_done,
                                  fused_allreduce_rmsnorm_start, rmsnorm, rows_per_rank)

TABLE_PATH = os.path.join(os.path.dirname(__file__), "weave_table.json")
CUSTOM_CALL_IMPLS = ("p2p", "auto", "multimem")


# ------------------------------------------------------------------------------ configuration

@dataclasses.dataclass(frozen=True)
class SplitConfig:
    """When and where to split a batch. Hashable: it is part of the compiled graph (TPContext)."""
    threshold: int = 1024          # split batches of at least this many tokens
    tile: int = 128                # GEMM tile multiple the half is rounded to
    offset: int = 0                # tokens added to the rounded half (tuned; may be negative)
    offsets: tuple = ()            # ((min_tokens, offset), ...): per-size offsets, override `offset`
    max_imbalance: float = 0.125   # `batch` kind only if |b*S - t0| <= max(tile, this * T)
    comm_ctas: int = 0             # CTAs (SMs) of a collective overlapped with attention; 0: the
                                   # communicator's count
    comm_ctas_mlp: int = 0         # the same beside the MLP (longer: fewer SMs suffice); 0: comm_ctas
    overlap: str = "auto"          # "auto": start/done overlap for custom-call impls on GPU;
                                   # "off"; "force": the start/done structure everywhere (tests)

    def __post_init__(self):
        if self.threshold < 2 or self.tile < 1:
            raise ValueError(f"SplitConfig: threshold ({self.threshold}) must be >= 2 and tile "
                             f"({self.tile}) >= 1")
        if self.overlap not in ("auto", "off", "force"):
            raise ValueError(f"SplitConfig.overlap={self.overlap!r}; use auto, off or force")
        if self.comm_ctas < 0 or self.comm_ctas_mlp < 0:
            raise ValueError(f"SplitConfig.comm_ctas={self.comm_ctas}, comm_ctas_mlp="
                             f"{self.comm_ctas_mlp}; use 0 (the default) or a positive CTA count")

    def offset_for(self, num_tokens: int) -> int:
        off = self.offset
        for min_tokens, o in sorted(self.offsets):
            if num_tokens >= min_tokens:
                off = o
        return off

    @classmethod
    def from_dict(cls, d: dict) -> "SplitConfig":
        d = dict(d)
        if "offsets" in d:
            offs = d["offsets"]
            items = offs.items() if isinstance(offs, dict) else offs
            d["offsets"] = tuple(sorted((int(k), int(v)) for k, v in items))
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["offsets"] = {str(k): v for k, v in self.offsets}
        return d


def model_key(cfg, tp: int) -> str:
    """The table key of a model shape at a TP degree (layer count does not matter)."""
    return (f"h{cfg.hidden_size}-f{cfg.intermediate_size}-q{cfg.num_heads}-kv{cfg.num_kv_heads}"
            f"-d{cfg.head_dim}-tp{tp}")


def load_table(path: str = TABLE_PATH) -> dict[str, SplitConfig]:
    """model_key -> SplitConfig from weave_table.json ({"default": {...}, key: {...}})."""
    if not os.path.exists(path):
        return {"default": SplitConfig()}
    with open(path) as f:
        raw = json.load(f)
    table = {k: SplitConfig.from_dict(v) for k, v in raw.items() if not k.startswith("_")}
    table.setdefault("default", SplitConfig())
    return table


WEAVE_TABLE: dict[str, SplitConfig] = load_table()


def config_for(cfg, tp: int, table: dict[str, SplitConfig] | None = None) -> SplitConfig:
    table = WEAVE_TABLE if table is None else table
    return table.get(model_key(cfg, tp), table["default"])


def split_point(num_tokens: int, cfg: SplitConfig | None) -> int | None:
    """Tokens in half 0, or None when the batch is not split (below threshold or no config)."""
    if cfg is None or num_tokens < cfg.threshold or num_tokens < 2:
        return None
    half = int(num_tokens / 2 / cfg.tile + 0.5) * cfg.tile   # nearest tile multiple, half up
    if not 0 < half < num_tokens:                              # batch smaller than ~a tile
        half = num_tokens // 2
    t0 = half + cfg.offset_for(num_tokens)
    return min(max(t0, 1), num_tokens - 1)


@dataclasses.dataclass(frozen=True)
class SplitPlan:
    """How a [B, S] batch is cut: kind "batch" (n0 sequences) or "seq" (n0 positions)."""
    kind: str
    n0: int
    batch: int
    seq: int

    @property
    def tokens(self) -> tuple[int, int]:
        t0 = self.n0 * (self.seq if self.kind == "batch" else self.batch)
        return t0, self.batch * self.seq - t0

    @property
    def shapes(self) -> tuple[tuple[int, int], tuple[int, int]]:
        B, S, n = self.batch, self.seq, self.n0
        if self.kind == "batch":
            return (n, S), (B - n, S)
        return (B, n), (B, S - n)

    def split(self, x):
        """x [B, S, ...] -> (half 0, half 1)."""
        ax = 0 if self.kind == "batch" else 1
        return (jax.lax.slice_in_dim(x, 0, self.n0, axis=ax),
                jax.lax.slice_in_dim(x, self.n0, x.shape[ax], axis=ax))

    def join(self, a, b):
        return jnp.concatenate([a, b], axis=0 if self.kind == "batch" else 1)


def plan_split(batch: int, seq: int, cfg: SplitConfig | None) -> SplitPlan | None:
    """Choose the split of a [batch, seq] batch (see the module doc), or None."""
    T = batch * seq
    t0 = split_point(T, cfg)
    if t0 is None:
        return None
    if batch >= 2:
        b = min(max(int(t0 / seq + 0.5), 1), batch - 1)
        if abs(b * seq - t0) <= max(cfg.tile, cfg.max_imbalance * T):
            return SplitPlan("batch", b, batch, seq)
    if seq < 2:
        return None
    s0 = min(max(int(t0 / batch + 0.5), 1), seq - 1)
    return SplitPlan("seq", s0, batch, seq)


# ---------------------------------------------------------------------------------- reductions

@dataclasses.dataclass(frozen=True)
class Reducer:
    """The per-sublayer reduction: (partial [T, D], residual, gamma) -> (normed [T, D], residual)."""
    kind: str            # "fused" | "psum" | "nocomm"
    axis_name: str
    eps: float
    impl: str = "xla"
    comm: Any = None
    ctas: int = 0        # overlapped (started) calls beside attention; 0: the communicator's
    ctas_mlp: int = 0    # ... beside the MLP; 0: ctas

    def __post_init__(self):
        if self.kind not in ("fused", "psum", "nocomm"):
            raise ValueError(f"Reducer kind {self.kind!r}; use fused, psum or nocomm")

    def init(self, num_tokens: int, dim: int, dtype) -> jax.Array:
        rows = (rows_per_rank(num_tokens, axis_size(self.axis_name)) if self.kind == "fused"
                else num_tokens)
        return jnp.zeros((rows, dim), dtype)

    def __call__(self, partial, residual, gamma):
        if self.kind == "fused":
            return fused_allreduce_rmsnorm(partial, residual, gamma, axis_name=self.axis_name,
                                           eps=self.eps, impl=self.impl, comm=self.comm)
        s = jax.lax.psum(partial, self.axis_name) if self.kind == "psum" else partial
        h = residual + s
        return rmsnorm(h, gamma, self.eps).astype(partial.dtype), h

    def start(self, partial, residual, gamma, slot: int, beside_mlp: bool = False) -> Pending:
        if self.kind != "fused":
            return Pending(*self(partial, residual, gamma))
        ctas = (self.ctas_mlp or self.ctas) if beside_mlp else self.ctas
        return fused_allreduce_rmsnorm_start(partial, residual, gamma, axis_name=self.axis_name,
                                             eps=self.eps, impl=self.impl, comm=self.comm,
                                             slot=slot, ctas=ctas or None)

    @property
    def custom_call(self) -> bool:
        return self.kind == "fused" and self.impl in CUSTOM_CALL_IMPLS


def use_overlap(split: SplitConfig, red: Reducer) -> bool:
    """Whether split layers issue their collectives as start/done pairs around the other half's
    compute (see the module doc)."""
    if split.overlap == "force":
        return True
    if split.overlap == "off" or jax.default_backend() not in ("gpu", "cuda"):
        return False
    return red.custom_call


# ------------------------------------------------------------------------- layer computations

def layer_weights(layer) -> dict[str, jax.Array]:
    """The arrays of an NNX DecoderLayer (models/llama.py) as a flat dict (local shards)."""
    a, m = layer.attn, layer.mlp
    w = dict(wq=a.q_proj.kernel[...], wk=a.k_proj.kernel[...], wv=a.v_proj.kernel[...],
             wo=a.o_proj.kernel[...], input_norm=layer.input_norm.weight[...],
             post_attn_norm=layer.post_attn_norm.weight[...])
    if all(hasattr(m, n) for n in ("gate_proj", "up_proj", "down_proj")):  # dense SwiGLU
        w.update(w_gate=m.gate_proj.kernel[...], w_up=m.up_proj.kernel[...],
                 w_down=m.down_proj.kernel[...])
    for n in ("q", "k", "v"):
        proj = getattr(a, f"{n}_proj")
        if hasattr(proj, "bias"):
            w[f"b{n}"] = proj.bias[...]
    return w


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """Static facts the functional layer needs (hashable)."""
    num_kv_heads: int      # global
    axis_name: str = "tp"
    attn_impl: str = "xla"  # "xla" | "cudnn" (cuDNN used for bf16/fp16 only)


def qkv(w, x, cos, sin, spec: LayerSpec):
    """x [B, S, D] -> q [B, S, Hl, hd], k, v [B, S, KVHl, hd] (RoPE applied)."""
    from jax_tokenweave.models.llama import apply_rope
    tp = axis_size(spec.axis_name)
    kv_slice = None
    if tp > spec.num_kv_heads:   # KV heads replicated: compute only the one this rank reads
        kv_slice = jax.lax.axis_index(spec.axis_name) * spec.num_kv_heads // tp

    def proj(wn, bn, sl):
        wt, b = w[wn], w.get(bn)
        if sl is not None:
            wt = jax.lax.dynamic_slice_in_dim(wt, sl, 1, axis=1)
            b = None if b is None else jax.lax.dynamic_slice_in_dim(b, sl, 1, axis=0)
        y = jnp.einsum("bsd,dhk->bshk", x, wt)
        return y if b is None else y + b

    q = apply_rope(proj("wq", "bq", None), cos, sin)
    k = apply_rope(proj("wk", "bk", kv_slice), cos, sin)
    return q, k, proj("wv", "bv", kv_slice)


def _attn_impl(spec: LayerSpec, q) -> str:
    if (spec.attn_impl == "cudnn" and q.dtype in (jnp.bfloat16, jnp.float16)
            and q.shape[-1] % 8 == 0 and q.shape[-1] <= 256):
        return "cudnn"
    return "xla"


def attend(q, k, v, spec: LayerSpec, prev_k=None, prev_v=None):
    """Causal attention of q over its own k/v, after all of prev_k/prev_v (keys of earlier
    positions, e.g. half 0 of the same sequences): key j of the concatenation is visible from
    query i iff j <= P + i, P = prev length."""
    impl = _attn_impl(spec, q)
    if prev_k is None:
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=impl)
    P, Sq = prev_k.shape[1], q.shape[1]
    kk = jnp.concatenate([prev_k, k], axis=1)
    vv = jnp.concatenate([prev_v, v], axis=1)
    if impl == "cudnn":
        # cuDNN's causal mask is top-left aligned: front-pad the queries by P rows.
        qp = jnp.concatenate([jnp.zeros((q.shape[0], P) + q.shape[2:], q.dtype), q], axis=1)
        out = jax.nn.dot_product_attention(qp, kk, vv, is_causal=True, implementation="cudnn")
        return out[:, P:]
    # window (left=everything, right=P): key j visible iff j <= i + P.
    return jax.nn.dot_product_attention(q, kk, vv, is_causal=False,
                                        local_window_size=(P + Sq, P), implementation="xla")


def attention_block(w, x, cos, sin, spec: LayerSpec, prev_kv=None):
    """x [B, S, D] -> (o_proj partial [B*S, D], k, v)."""
    B, S, D = x.shape
    q, k, v = qkv(w, x, cos, sin, spec)
    pk, pv = prev_kv if prev_kv is not None else (None, None)
    out = attend(q, k, v, spec, pk, pv)
    h = jnp.einsum("bshk,hkd->bsd", out, w["wo"])
    return h.reshape(B * S, D), k, v


def mlp_block(w, x):
    """x [T, D] normed -> down_proj partial [T, D]."""
    from jax_tokenweave.models.llama import silu
    gate = x @ w["w_gate"]
    up = x @ w["w_up"]
    return (silu(gate) * up) @ w["w_down"]


# ------------------------------------------------------------------------- overlap

def overlap_pair(name: str, overlap: bool, red: Reducer, comm_args, slot: int, compute_fn,
                 compute_args, beside_mlp: bool = False):
    """Run the reduction red(*comm_args) beside compute_fn(*compute_args) (the other half's work).
    overlap: start the collective, issue the compute, then wait (module doc); else one after the
    other. Returns (reduction outputs, compute outputs)."""
    with jax.named_scope(name):
        if not overlap:
            return red(*comm_args), compute_fn(*compute_args)
        pending = red.start(*comm_args, slot=slot, beside_mlp=beside_mlp)
        pending, compute_args = jax.lax.optimization_barrier((pending, compute_args))
        y = compute_fn(*compute_args)
        return fused_allreduce_rmsnorm_done(pending, after=y), y


# ------------------------------------------------------------------------- the layers

def plain_layer(w, x, res, next_norm, rope, *, spec: LayerSpec, red: Reducer, prefix_kv=None):
    """One unsplit layer: x [B, S, D] normed -> (x, res, (k, v)). Reference / baseline variants.
    prefix_kv: (k, v) [B, P, KVHl, hd] of earlier positions (chunked prefill), seen by all."""
    B, S, D = x.shape
    cos, sin = rope
    with jax.named_scope("attention"):
        h, k, v = attention_block(w, x, cos, sin, spec, prefix_kv)
    with jax.named_scope("reduce_post_attn"):
        xf, res = red(h, res, w["post_attn_norm"])
    with jax.named_scope("mlp"):
        m = mlp_block(w, xf)
    with jax.named_scope("reduce_post_mlp"):
        xf, res = red(m, res, next_norm)
    return xf.reshape(B, S, D), res, (k, v)


def split_layer(w, carry, next_norm, rope0, rope1, *, plan: SplitPlan, spec: LayerSpec,
                red: Reducer, overlap: bool, ffn: Callable | None = None, prefix_kv=None):
    """One overlapped layer (TokenWeave's order, module doc). carry = (x0 [B0,S0,D] normed,
    r0, p1 [T1, D] pending partial of half 1, r1). Returns (carry, (k0, v0, k1, v1)).
    ffn: x [T, D] -> partial, replacing the dense SwiGLU on w's w_gate/w_up/w_down (e.g. MoE).
    prefix_kv: (k, v) [B, P, KVHl, hd] of positions before the batch (chunked prefill, seq kind
    only), prepended to what both halves attend to."""
    if prefix_kv is not None and plan.kind != "seq":
        raise ValueError("split_layer: prefix_kv needs a 'seq' split plan")
    x0, r0, p1, r1 = carry
    (B0, S0), (B1, S1) = plan.shapes
    D = x0.shape[-1]
    seq_kind = plan.kind == "seq"

    def attn0(w, x0, cos, sin, *pre):
        return attention_block(w, x0, cos, sin, spec, tuple(pre) if pre else None)

    def attn1(w, x1, cos, sin, k0, v0, *pre):
        if pre:
            k0, v0 = (jnp.concatenate([a, b], axis=1) for a, b in zip(pre, (k0, v0)))
        return attention_block(w, x1.reshape(B1, S1, D), cos, sin, spec, (k0, v0))

    def attn1_indep(w, x1, cos, sin):
        return attention_block(w, x1.reshape(B1, S1, D), cos, sin, spec)

    def mlp(w, x):
        return mlp_block(w, x) if ffn is None else ffn(x)

    wa = {k: v for k, v in w.items() if k not in ("w_gate", "w_up", "w_down")}
    wm = {k: w[k] for k in ("w_gate", "w_up", "w_down") if k in w}
    # slot = the half whose collective is pending (a half has at most one pending at a time).
    (x1, r1), (h0, k0, v0) = overlap_pair(
        "pair1", overlap, red, (p1, r1, w["input_norm"]), 1, attn0,
        (wa, x0, *rope0, *(prefix_kv or ())))
    if seq_kind:
        (x0f, r0), (h1, k1, v1) = overlap_pair(
            "pair2", overlap, red, (h0, r0, w["post_attn_norm"]), 0, attn1,
            (wa, x1, *rope1, k0, v0, *(prefix_kv or ())))
    else:
        (x0f, r0), (h1, k1, v1) = overlap_pair(
            "pair2", overlap, red, (h0, r0, w["post_attn_norm"]), 0, attn1_indep, (wa, x1, *rope1))
    (x1, r1), m0 = overlap_pair("pair3", overlap, red, (h1, r1, w["post_attn_norm"]), 1, mlp,
                                (wm, x0f), beside_mlp=True)
    (x0f, r0), m1 = overlap_pair("pair4", overlap, red, (m0, r0, next_norm), 0, mlp, (wm, x1),
                                 beside_mlp=True)
    return (x0f.reshape(B0, S0, D), r0, m1, r1), (k0, v0, k1, v1)


def split_begin(p0, p1, first_norm, plan: SplitPlan, red: Reducer):
    """Embedding partials of the halves [T0, D], [T1, D] -> the initial split-layer carry."""
    (B0, S0), _ = plan.shapes
    T0, T1 = plan.tokens
    D = p0.shape[-1]
    x0, r0 = red(p0, red.init(T0, D, p0.dtype), first_norm)
    return x0.reshape(B0, S0, D), r0, p1, red.init(T1, D, p1.dtype)


def split_end(carry, final_norm, plan: SplitPlan, red: Reducer):
    """Final carry -> normed hidden states [B, S, D] of the whole batch."""
    x0, r0, p1, r1 = carry
    _, (B1, S1) = plan.shapes
    x1, _ = red(p1, r1, final_norm)
    return plan.join(x0, x1.reshape(B1, S1, x0.shape[-1]))


# ------------------------------------------------------------------------- model integration

def weave_forward(model, tokens, positions, plan: SplitPlan, *, ctx, mode: str = "full",
                  cache=None):
    """Llama.__call__ for a split batch (mode "full" or "prefill"): same outputs as the unsplit
    forward, final normed hidden [B, S, D] and the cache (both halves written)."""
    from jax_tokenweave.models.llama import rope_cos_sin, rope_inv_freq
    cfg = model.cfg
    red = Reducer("fused", ctx.axis_name, cfg.rms_norm_eps, ctx.impl, ctx.comm, ctx.split.comm_ctas,
                  ctx.split.comm_ctas_mlp)
    spec = LayerSpec(cfg.num_kv_heads, ctx.axis_name, ctx.attn_impl)
    overlap = use_overlap(ctx.split, red)
    tok0, tok1 = plan.split(tokens)
    pos0, pos1 = plan.split(positions)
    inv = rope_inv_freq(cfg)
    rope0, rope1 = rope_cos_sin(pos0, inv), rope_cos_sin(pos1, inv)
    with jax.named_scope("embed"):
        p0 = model.embed_tokens(tok0.reshape(-1), ctx)
        p1 = model.embed_tokens(tok1.reshape(-1), ctx)
    weights = [layer_weights(l) for l in model.layers]
    norms = [w["input_norm"] for w in weights[1:]] + [model.final_norm.weight[...]]
    with jax.named_scope("fused_embed"):
        carry = split_begin(p0, p1, weights[0]["input_norm"], plan, red)
    for i, w in enumerate(weights):
        layer = model.layers[i]
        ffn = None if "w_gate" in w else (lambda x, _l=layer: _l.mlp(x, ctx))  # e.g. MoE
        with jax.named_scope(f"layer_{i}"):
            carry, (k0, v0, k1, v1) = split_layer(w, carry, norms[i], rope0, rope1, plan=plan,
                                                  spec=spec, red=red, overlap=overlap, ffn=ffn)
        if mode == "prefill":
            cache = write_cache(cache, i, plan, k0, v0, k1, v1)
    with jax.named_scope("fused_final"):
        x = split_end(carry, model.final_norm.weight[...], plan, red)
    return x, cache


def write_cache(cache, layer: int, plan: SplitPlan, k0, v0, k1, v1):
    """Both halves' k/v into cache (k, v) [L, B, max_len, KVHl, hd] at their offsets."""
    ck, cv = cache
    i1 = (layer, plan.n0, 0, 0, 0) if plan.kind == "batch" else (layer, 0, plan.n0, 0, 0)
    for k, v, idx in ((k0, v0, (layer, 0, 0, 0, 0)), (k1, v1, i1)):
        ck = jax.lax.dynamic_update_slice(ck, k[None].astype(ck.dtype), idx)
        cv = jax.lax.dynamic_update_slice(cv, v[None].astype(cv.dtype), idx)
    return ck, cv
