"""The paged KV cache: one pool of fixed-size pages per layer for keys and one for values,
``[L, KVH_cache, num_pages, page_size, head_dim]``, sharded over the tensor-parallel axis by KV
head (``KVH_cache = max(num_kv_heads, tp)``: one head per rank when KV heads are replicated).

A sequence's keys/values live in the pages its block table lists: position p is in page
``table[p // page_size]`` at offset ``p % page_size``. Page 0 is scratch: padding tokens of a step
write there and nothing reads it. Who hands out pages: ``block_manager.BlockManager`` (the
continuous engine), or ``static_block_tables`` (the static-batch runner: each of B sequences owns
a fixed run of pages).

New keys/values are written in place, never by copying a layer's pool: a decode token by the
Pallas decode kernel itself (kernels.paged_decode_attention's new_kv), prefill tokens and mixed
batches by a scatter (``write``) into the pool carried through the layer scan.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jax_tokenweave.models.config import ModelConfig
from jax_tokenweave.parallel.sharding import cache_kv_heads, cache_spec

DEFAULT_PAGE_SIZE = 16   # the continuous engine's pages: sequences share the pool page by page
# The static-batch cache (TPModel.init_cache): each sequence owns a fixed run of pages, so the
# page size costs no memory there beyond the last page, and the decode kernel reads 64-token pages
# faster than 16-token ones: in the 8B decode step its time went from 354 to 307 us at batch 8
# and from 1085 to 901 us at batch 32 (bench/results/profile_decode_h200.json, top level against
# page64_run); alone, 32.2 against 40.9 us at batch 8 x 2048 (paged_attention_h200.json).
STATIC_PAGE_SIZE = 64
SCRATCH_PAGE = 0


@struct.dataclass
class KVPages:
    k: jax.Array   # [L, KVH_cache, num_pages, page_size, hd]
    v: jax.Array

    @property
    def num_pages(self) -> int:
        return self.k.shape[2]

    @property
    def page_size(self) -> int:
        return self.k.shape[3]


@struct.dataclass
class KVCache:
    """The static-batch runner's cache: the pools plus each sequence's pages and length."""
    pages: KVPages
    block_tables: jax.Array   # [B, pages_per_seq] int32 (replicated)
    lengths: jax.Array        # [B] int32: valid positions per sequence (replicated)
    max_len: int = struct.field(pytree_node=False, default=0)   # positions a sequence may hold

    @property
    def batch(self) -> int:
        return self.block_tables.shape[0]


def pages_bytes(cfg: ModelConfig, num_pages: int, page_size: int, dtype) -> int:
    """Bytes of both pools over all devices (replicated KV heads counted once per rank)."""
    return 2 * cfg.num_layers * cfg.num_kv_heads * num_pages * page_size * cfg.head_dim * jnp.dtype(dtype).itemsize


def init_pages(cfg: ModelConfig, mesh: Mesh, num_pages: int, page_size: int, dtype,
               axis_name: str = "tp") -> KVPages:
    """Zeroed pools created on the devices (each shard on its own device)."""
    if num_pages < 2 or page_size < 1:
        raise ValueError(f"init_pages: num_pages ({num_pages}) must be >= 2 (page 0 is scratch) and "
                         f"page_size ({page_size}) >= 1")
    shape = (cfg.num_layers, cache_kv_heads(cfg, mesh.shape[axis_name]), num_pages, page_size, cfg.head_dim)
    kv = NamedSharding(mesh, cache_spec(axis_name))
    return jax.jit(lambda: KVPages(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)),
                   out_shardings=KVPages(kv, kv))()


def static_block_tables(batch: int, pages_per_seq: int) -> np.ndarray:
    """Sequence b owns pages 1 + b*pages_per_seq ... (page 0 stays scratch)."""
    return (1 + np.arange(batch * pages_per_seq, dtype=np.int32)).reshape(batch, pages_per_seq)


def slots(block_tables: jax.Array, positions: jax.Array, valid: jax.Array, page_size: int):
    """(page, offset) of each position (any shape, rows of block_tables broadcast to it by the
    caller); invalid positions go to the scratch page."""
    page = jnp.take_along_axis(block_tables, jnp.clip(positions // page_size, 0, block_tables.shape[1] - 1), axis=1)
    return jnp.where(valid, page, SCRATCH_PAGE), jnp.where(valid, positions % page_size, 0)


def write(pages: KVPages, layer, k: jax.Array, v: jax.Array, page: jax.Array, offset: jax.Array) -> KVPages:
    """Write k, v [T, KVH, hd] of T tokens into `layer`'s pools at (page [T], offset [T])."""
    def put(pool, x):
        return pool.at[layer, :, page, offset].set(x.astype(pool.dtype), mode="promise_in_bounds")
    return KVPages(put(pages.k, k), put(pages.v, v))
