"""What the unrolled decode step's one-rank reductions hand over unfinished, so that a reduction
is no kernel of its own: the row-parallel matmul before it (``Product``) and the RMSNorm after it
(``PreNorm``).

Why: at one rank the reduction is a residual add and an RMSNorm; as kernels.add_rmsnorm it was
two launches a layer of 2.4-3.3 us on the H200 (8B, batch 1: 5.7 us of a 133 us layer), mostly
launch, ramp-up and the row's dependent loads, not bytes. Instead the matmul that makes the
partial (o_proj, down_proj: kernels.layer_matmul's ``layer_matmul_residual``) adds the residual in
its split-K epilogue and stores the new residual with each column tile's sum of squares, and the
matmul that reads the normed activations (q/k/v: kernels.layer_qkv; gate/up: kernels.layer_swiglu)
normalises each tile of the residual as it loads it. What the step computes is the same: the norm
of the stored (rounded) residual, ``round(f32(r) * rsqrt(mean(f32(r)^2) + eps) * f32(gamma))``,
the mean summed per column tile first.

    Product(x [T, K], w: LayerOf [L, K, D])   x @ w[layer], not yet run; ``pieces()`` runs it as
                                              layer_matmul's split-K pieces (the reductions that
                                              do not defer)
    PreNorm(residual [.., D], sumsq [.., C], gamma: LayerOf [L, D], eps)
                                              rmsnorm(residual) * gamma, not yet applied; sumsq
                                              holds the sums of squares of C column tiles of the
                                              stored residual; ``value()`` applies it in XLA
                                              (for consumers without a kernel: the LM head, MoE)
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from jax_tokenweave.kernels.layer_matmul import layer_matmul
from jax_tokenweave.kernels.layer_of import LayerOf

# scripts/profile_decode.py's variant "norms_add_rmsnorm" turns deferring off (read by the reducer)
_ENABLED = True


@dataclasses.dataclass(frozen=True)
class Product:
    x: jax.Array
    w: LayerOf

    def pieces(self) -> jax.Array:
        return layer_matmul(self.x, self.w.stacked, self.w.layer, sum_splits=False)


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass(frozen=True)
class PreNorm:
    residual: jax.Array
    sumsq: jax.Array
    gamma: LayerOf
    eps: float

    def tree_flatten(self):
        return (self.residual, self.sumsq, self.gamma.stacked, self.gamma.layer), self.eps

    @classmethod
    def tree_unflatten(cls, eps, children):
        r, s, g, layer = children
        return cls(r, s, LayerOf(g, layer), eps)

    @property
    def shape(self) -> tuple:
        return self.residual.shape

    @property
    def dtype(self):
        return self.residual.dtype

    def reshape(self, *shape) -> "PreNorm":
        shape = shape[0] if len(shape) == 1 and isinstance(shape[0], tuple) else shape
        return PreNorm(self.residual.reshape(shape), self.sumsq.reshape(shape[:-1] + self.sumsq.shape[-1:]),
                       self.gamma, self.eps)

    def value(self) -> jax.Array:
        inv = jax.lax.rsqrt(self.sumsq.sum(-1, keepdims=True) / self.residual.shape[-1] + self.eps)
        g = self.gamma.slice().astype(jnp.float32)
        return (self.residual.astype(jnp.float32) * inv * g).astype(self.residual.dtype)


def value(x):
    """A plain array for x (an array, or a PreNorm applied)."""
    return x.value() if isinstance(x, PreNorm) else x


def prenorm_of(partial: jax.Array, residual: jax.Array, gamma: LayerOf, eps: float, tiles: int) -> PreNorm:
    """The deferred reduction of an ordinary partial ([T, D], or [S, T, D] pieces), in XLA: the
    embedding's, and MoE's down projection's (the layer_matmul epilogue does the dense ones)."""
    p = partial.astype(jnp.float32)
    p = p if p.ndim == 2 else p.sum(0)
    stored = (residual.astype(jnp.float32) + p).astype(residual.dtype)
    t, d = stored.shape
    sq = jnp.square(stored.astype(jnp.float32)).reshape(t, tiles, d // tiles).sum(-1)
    return PreNorm(stored, sq, gamma, float(eps))


# ------------------------------------------------------------------ inside the consumer kernels

def kernel_operands(x: PreNorm):
    """PreNorm -> (residual, sumsq, stacked gamma, gamma's layer as int32 [1]) as a consumer
    kernel takes them."""
    return (x.residual, x.sumsq, x.gamma.stacked,
            jnp.asarray(x.gamma.layer, jnp.int32).reshape(1))


def inv_rms(ss_ref, *, rows: int, m: int, dim: int, eps: float) -> jax.Array:
    """[rows, 1] fp32: rsqrt(mean of squares + eps) per row from the tiles' sums (rows >= m: 0
    sums, never read)."""
    c = ss_ref.shape[-1]
    width = 1 << (c - 1).bit_length()
    row_ok = jnp.arange(rows, dtype=jnp.int32)[:, None] < m
    ok = row_ok & (jnp.arange(width, dtype=jnp.int32)[None, :] < c)
    ss = pltriton.load(ss_ref.at[pl.ds(0, rows), pl.ds(0, width)], mask=ok, other=0)
    return jax.lax.rsqrt(jnp.sum(ss, axis=1, keepdims=True) / dim + eps)


def normed_tile(r: jax.Array, inv: jax.Array, g: jax.Array) -> jax.Array:
    """A loaded residual tile [rows, bk] normalised as add_rmsnorm / PreNorm.value do, in its dtype."""
    return (r.astype(jnp.float32) * inv * g.astype(jnp.float32)[None, :]).astype(r.dtype)
