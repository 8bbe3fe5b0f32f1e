"""The KV cache: a pytree of three arrays, sharded over the tensor-parallel axis by KV head."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jax_tokenweave.models.config import ModelConfig
from jax_tokenweave.parallel.sharding import cache_kv_heads, cache_spec


@struct.dataclass
class KVCache:
    k: jax.Array        # [L, B, max_len, KVH_cache, hd], KVH_cache = max(num_kv_heads, tp), sharded over tp
    v: jax.Array        # same
    lengths: jax.Array  # [B] int32: valid positions per sequence (replicated)

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    @property
    def max_len(self) -> int:
        return self.k.shape[2]


def cache_shardings(mesh: Mesh, axis_name: str = "tp") -> KVCache:
    kv = NamedSharding(mesh, cache_spec(axis_name))
    return KVCache(k=kv, v=kv, lengths=NamedSharding(mesh, P()))


def init_cache(cfg: ModelConfig, mesh: Mesh, batch: int, max_len: int, dtype,
               axis_name: str = "tp") -> KVCache:
    """Zeros, created directly on the devices (each shard on its own device)."""
    if batch < 1 or max_len < 1:
        raise ValueError(f"init_cache: batch ({batch}) and max_len ({max_len}) must be >= 1")
    tp = mesh.shape[axis_name]
    shape = (cfg.num_layers, batch, max_len, cache_kv_heads(cfg, tp), cfg.head_dim)

    def make():
        return KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                       lengths=jnp.zeros((batch,), jnp.int32))

    return jax.jit(make, out_shardings=cache_shardings(mesh, axis_name))()
