"""The per-sublayer tensor-parallel reduction, as one callable the layer functions take
(``models/layers.py``): ``(partial [T, D], residual, gamma) -> (normed [T, D], residual)``;
partial may also be a [S, T, D] stack of split-K pieces (layers.out_projection's on GPU).

    fused   fused_allreduce_rmsnorm: the residual stays sharded by token rows ([R, D],
            R = rows_per_rank(T, N), see fused.py). What the model runs.
    psum    XLA's native path: residual + psum(partial), RMSNorm; residual replicated [T, D].
            The benchmarks' baseline.
    nocomm  residual + partial, no collective at all: NOT a correct model, only the
            communication-free ideal for benchmarks.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from jax_tokenweave.collective.fused import (Pending, fused_allreduce_rmsnorm, fused_allreduce_rmsnorm_start,
                                             rmsnorm, rows_per_rank, sum_pieces)
from jax_tokenweave.compat import axis_size
from jax_tokenweave.kernels.layer_of import resolve

CUSTOM_CALL_IMPLS = ("p2p", "auto", "multimem")


@dataclasses.dataclass(frozen=True)
class Reducer:
    kind: str            # "fused" | "psum" | "nocomm"
    axis_name: str
    eps: float
    impl: str = "xla"    # fused_allreduce_rmsnorm implementation (kind "fused")
    comm: Any = None     # its Communicator for the CUDA implementations
    ctas: int = 0        # started (overlapped) calls beside attention; 0: the communicator's
    ctas_mlp: int = 0    # ... beside the FFN; 0: ctas

    def __post_init__(self):
        if self.kind not in ("fused", "psum", "nocomm"):
            raise ValueError(f"Reducer kind {self.kind!r}; use fused, psum or nocomm")

    def init(self, num_tokens: int, dim: int, dtype) -> jax.Array:
        """The zero residual of a batch of num_tokens rows, in this reducer's layout."""
        rows = (rows_per_rank(num_tokens, axis_size(self.axis_name)) if self.kind == "fused"
                else num_tokens)
        return jnp.zeros((rows, dim), dtype)

    def __call__(self, partial, residual, gamma):
        if self.kind == "fused":
            return fused_allreduce_rmsnorm(partial, residual, gamma, axis_name=self.axis_name,
                                           eps=self.eps, impl=self.impl, comm=self.comm)
        partial, gamma = sum_pieces(partial, residual.dtype), resolve(gamma)
        s = jax.lax.psum(partial, self.axis_name) if self.kind == "psum" else partial
        h = residual + s
        return rmsnorm(h, gamma, self.eps).astype(partial.dtype), h

    def start(self, partial, residual, gamma, slot: int, beside_mlp: bool = False) -> Pending:
        """The asynchronous form (fused.fused_allreduce_rmsnorm_start); other kinds compute now."""
        if self.kind != "fused":
            return Pending(*self(partial, residual, gamma))
        ctas = (self.ctas_mlp or self.ctas) if beside_mlp else self.ctas
        return fused_allreduce_rmsnorm_start(partial, residual, gamma, axis_name=self.axis_name,
                                             eps=self.eps, impl=self.impl, comm=self.comm,
                                             slot=slot, ctas=ctas or None)

    @property
    def custom_call(self) -> bool:
        return self.kind == "fused" and self.impl in CUSTOM_CALL_IMPLS
