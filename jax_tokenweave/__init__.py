"""jax_tokenweave: TokenWeave-style compute-communication overlap for tensor-parallel inference."""
from jax_tokenweave.fused import fused_allreduce_rmsnorm, rows_per_rank, rmsnorm

__all__ = ["fused_allreduce_rmsnorm", "rows_per_rank", "rmsnorm"]
