"""jax_tokenweave: TokenWeave-style compute-communication overlap for tensor-parallel inference."""
from jax_tokenweave.collective.fused import (fused_allreduce_rmsnorm, fused_allreduce_rmsnorm_done,
                                  fused_allreduce_rmsnorm_start, rmsnorm, rows_per_rank)
from jax_tokenweave.collective import cuda_ops as _cuda_ops  # registers p2p/multimem/auto when the extension loads
from jax_tokenweave.collective.communicator import Communicator

__all__ = ["fused_allreduce_rmsnorm", "fused_allreduce_rmsnorm_start", "fused_allreduce_rmsnorm_done",
           "rows_per_rank", "rmsnorm", "Communicator", "TPModel", "KVCache", "to_host"]


def __getattr__(name):
    # The runner pulls in flax and the models; load it only when asked for.
    if name in ("TPModel", "KVCache", "to_host"):
        from jax_tokenweave.engine import runner
        return getattr(runner, name)
    raise AttributeError(f"module 'jax_tokenweave' has no attribute {name!r}")
