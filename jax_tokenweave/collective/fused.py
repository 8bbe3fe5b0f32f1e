"""The fused AllReduce + residual-add + RMSNorm op: its contract, argument checks and dispatch.

Contract (TokenWeave's "RMSNorm reordering"): called inside ``shard_map`` over ``axis_name``
(size N). ``T`` tokens are split into N contiguous chunks of ``R = rows_per_rank(T, N)`` rows;
rank r *owns* global rows ``[r*R, r*R + R)`` (rows past T are padding). The residual stream is
kept sharded by token rows: each rank only ever holds its own R rows of it.

    partial   [T, D]  this rank's partial sum (e.g. output of a row-parallel matmul), all T rows;
              or [S, T, D]: S pieces of it (a split-K matmul's fp32 pieces), added in fp32 first
    residual  [R, D]  this rank's rows of the residual stream
    gamma     [D]     RMSNorm weight, replicated (or kernels.layer_of.LayerOf a stacked [L, D])

    s            = sum over ranks of partial          (fp32 accumulation)
    residual_out = residual + s[own rows]             [R, D], residual.dtype; padding rows keep
                                                      the input residual unchanged
    normed       = rmsnorm(residual_out) * gamma      [T, D], residual.dtype, every row, identical
                                                      on every rank (the owner normalises a row,
                                                      the others receive it)

RMSNorm is computed in fp32 from the *stored* (rounded) residual_out, as an unfused model would
compute ``norm(h)`` after ``h = residual + attn_out``:
``normed = round(f32(r) * rsqrt(mean(f32(r)**2) + eps) * f32(gamma))``.

Implementations, picked by ``impl``:
  ``xla``       psum_scatter + add + RMSNorm + all_gather in plain JAX. Runs anywhere; the reference.
  ``p2p``       CUDA kernel over NVLink peer memory (needs the compiled extension and a Communicator).
  ``multimem``  CUDA kernel on an NVLS multicast object. Opt-in only.
  ``auto``      ``p2p`` where the measured table says it beats ``xla``, else ``xla``.
At one rank there is nothing to all-reduce: ``xla`` and ``auto`` are then, on GPU, one Pallas
kernel (kernels/add_rmsnorm.py) instead of XLA's two (the add, the norm).

Asynchronous form (for overlap, see weave.py): ``fused_allreduce_rmsnorm_start`` returns a
``Pending`` handle, ``fused_allreduce_rmsnorm_done(pending, after=...)`` its two results. With the
CUDA impls the kernel runs on the communicator's own stream between the two, beside whatever XLA
runs on its stream; ``after`` names arrays whose computation must be issued before the wait (the
overlapped work). Implementations without an asynchronous form compute everything in start.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from jax_tokenweave.compat import axis_size
from jax_tokenweave.kernels.add_rmsnorm import add_rmsnorm
from jax_tokenweave.kernels.layer_of import resolve

IMPLS = ("xla", "p2p", "multimem", "auto")
_FLOAT_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)

# Implementations other than `xla` register themselves here when their extension loads:
# name -> fn(partial, residual, gamma, *, axis_name, eps, comm) -> (normed, residual_out).
_REGISTRY: dict[str, Callable] = {}
# name -> fn(partial, residual, gamma, *, axis_name, eps, comm, slot, ctas) -> Pending
_START_REGISTRY: dict[str, Callable] = {}


def register_impl(name: str, fn: Callable, start: Callable | None = None) -> None:
    if name not in IMPLS or name == "xla":
        raise ValueError(f"cannot register implementation {name!r}; expected one of {IMPLS[1:]}")
    _REGISTRY[name] = fn
    if start is not None:
        _START_REGISTRY[name] = start


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass(frozen=True)
class Pending:
    """An issued fused reduction: its results (valid only after ``finish``), the arrays the kernel
    still reads, and how to wait for it (``finish(pending, after)``; None: already complete)."""
    normed: jax.Array
    residual_out: jax.Array
    keep_alive: tuple = ()
    finish: Any = None

    def tree_flatten(self):
        return (self.normed, self.residual_out, self.keep_alive), self.finish

    @classmethod
    def tree_unflatten(cls, finish, children):
        return cls(*children, finish=finish)


def rows_per_rank(num_tokens: int, num_ranks: int) -> int:
    """Rows of the token-sharded residual that each rank owns: ceil(T / N)."""
    return -(-num_tokens // num_ranks)


def rmsnorm(x: jax.Array, gamma: jax.Array, eps: float) -> jax.Array:
    """RMSNorm in fp32, rounded to x's dtype (the precision rule of the contract above)."""
    xf = x.astype(jnp.float32)
    inv = jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return (xf * inv * gamma.astype(jnp.float32)).astype(x.dtype)


def check_args(partial: jax.Array, residual: jax.Array, gamma: jax.Array, num_ranks: int) -> None:
    """Raise a ValueError that names the problem and the fix, for any argument off the contract."""
    if partial.ndim not in (2, 3):
        raise ValueError(f"fused_allreduce_rmsnorm: partial must be [tokens, hidden] (or [pieces, "
                         f"tokens, hidden]), got shape {partial.shape}; flatten batch and sequence dims "
                         f"first (x.reshape(-1, D))")
    T, D = partial.shape[-2:]
    R = rows_per_rank(T, num_ranks)
    if residual.shape != (R, D):
        raise ValueError(f"fused_allreduce_rmsnorm: residual must hold this rank's {R} token rows "
                         f"(ceil({T} tokens / {num_ranks} ranks)) of hidden {D}, i.e. shape ({R}, {D}); "
                         f"got {residual.shape}. Start the residual stream with "
                         f"jnp.zeros((rows_per_rank(T, N), D)) and pass residual_out back in.")
    if gamma.shape != (D,):
        raise ValueError(f"fused_allreduce_rmsnorm: gamma must have shape ({D},) to match hidden "
                         f"size {D}; got {gamma.shape}")
    for name, a in (("partial", partial), ("residual", residual), ("gamma", gamma)):
        if a.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"fused_allreduce_rmsnorm: {name} has dtype {a.dtype}; use bfloat16, "
                             f"float16 or float32")
    if partial.ndim == 2 and partial.dtype != residual.dtype:
        raise ValueError(f"fused_allreduce_rmsnorm: partial ({partial.dtype}) and residual "
                         f"({residual.dtype}) must share a dtype; cast one of them")


def one_rank_kernel() -> bool:
    """Whether a one-rank ``xla``/``auto`` call runs kernels.add_rmsnorm (on GPU; elsewhere XLA)."""
    return jax.default_backend() == "gpu"


def _one_rank(impl: str, n: int) -> bool:
    """Whether this call is the one-rank kernel's (nothing to all-reduce; see the module doc)."""
    return n == 1 and impl in ("xla", "auto") and one_rank_kernel()


def sum_pieces(partial: jax.Array, dtype) -> jax.Array:
    """A [S, T, D] stack of pieces as one [T, D] partial (fp32 sum, then ``dtype``)."""
    return partial if partial.ndim == 2 else partial.astype(jnp.float32).sum(0).astype(dtype)


def fused_allreduce_rmsnorm(partial: jax.Array, residual: jax.Array, gamma: jax.Array, *,
                            axis_name: str = "tp", eps: float = 1e-5, impl: str = "xla",
                            comm=None) -> tuple[jax.Array, jax.Array]:
    """All-reduce ``partial`` over ``axis_name``, add it to this rank's residual rows and
    RMSNorm every row. Returns ``(normed [T, D], residual_out [R, D])``; see the module doc."""
    if impl not in IMPLS:
        raise ValueError(f"fused_allreduce_rmsnorm: impl={impl!r} is unknown; choose one of {IMPLS}")
    n = axis_size(axis_name)
    check_args(partial, residual, gamma, n)
    if _one_rank(impl, n):
        return add_rmsnorm(partial, residual, gamma, eps=eps)
    partial, gamma = sum_pieces(partial, residual.dtype), resolve(gamma)
    impl = _resolve_impl(impl, partial, n)
    if impl == "xla":
        return _xla_impl(partial, residual, gamma, axis_name=axis_name, eps=eps, num_ranks=n)
    return _REGISTRY[impl](partial, residual, gamma, axis_name=axis_name, eps=eps, comm=comm)


def _resolve_impl(impl: str, partial, n: int) -> str:
    if impl not in IMPLS:
        raise ValueError(f"fused_allreduce_rmsnorm: impl={impl!r} is unknown; choose one of {IMPLS}")
    if impl == "auto":
        impl = _REGISTRY["auto"](partial, n) if "auto" in _REGISTRY else "xla"
    if impl != "xla" and impl not in _REGISTRY:
        raise RuntimeError(f"fused_allreduce_rmsnorm: impl={impl!r} needs the CUDA extension "
                           f"(jax_tokenweave.collective._C), which is not built or not loadable here; see "
                           f"BUILD.md, or use impl='xla'")
    return impl


def fused_allreduce_rmsnorm_start(partial, residual, gamma, *, axis_name: str = "tp",
                                  eps: float = 1e-5, impl: str = "xla", comm=None, slot: int = 0,
                                  ctas: int | None = None) -> Pending:
    """Issue the fused op and return a ``Pending``; ``slot`` (0..3) tells pending calls of one
    device apart (one per token half); ``ctas`` overrides the communicator's CTA count."""
    n = axis_size(axis_name)
    check_args(partial, residual, gamma, n)
    if _one_rank(impl, n):
        return Pending(*add_rmsnorm(partial, residual, gamma, eps=eps))
    partial, gamma = sum_pieces(partial, residual.dtype), resolve(gamma)
    impl = _resolve_impl(impl, partial, n)
    if impl in _START_REGISTRY:
        return _START_REGISTRY[impl](partial, residual, gamma, axis_name=axis_name, eps=eps,
                                     comm=comm, slot=slot, ctas=ctas)
    normed, residual_out = fused_allreduce_rmsnorm(partial, residual, gamma, axis_name=axis_name,
                                                   eps=eps, impl=impl, comm=comm)
    return Pending(normed, residual_out)


def fused_allreduce_rmsnorm_done(pending: Pending, *, after=()) -> tuple[jax.Array, jax.Array]:
    """Wait for ``pending`` (after the computation of the arrays in ``after`` has been issued)
    and return ``(normed, residual_out)``."""
    if pending.finish is None:
        return pending.normed, pending.residual_out
    return pending.finish(pending, tuple(jax.tree_util.tree_leaves(after)))


def _xla_impl(partial, residual, gamma, *, axis_name, eps, num_ranks):
    T, D = partial.shape
    R = residual.shape[0]
    padded = jnp.pad(partial, ((0, num_ranks * R - T), (0, 0)))
    # reduce-scatter in fp32 so that the reference rounds once, like the kernels do.
    own = jax.lax.psum_scatter(padded.astype(jnp.float32), axis_name, scatter_dimension=0, tiled=True)
    residual_out = (residual.astype(jnp.float32) + own).astype(residual.dtype)
    normed_own = rmsnorm(residual_out, gamma, eps).astype(partial.dtype)
    normed = jax.lax.all_gather(normed_own, axis_name, axis=0, tiled=True)
    return normed[:T], residual_out
