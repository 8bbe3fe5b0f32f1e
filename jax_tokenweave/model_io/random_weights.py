"""Random weights in the runtime layout (layers stacked), made on the devices, shard by shard.

Each value is a function of its parameter, its layer and its index, hashed (murmur3's finaliser
over ``lax.iota``) into a uniform and mapped through the inverse normal CDF: normally distributed
values with each parameter's own scale (fan-in**-0.5 for projections, 1 for the embedding, 0.02
for biases, ones for norm weights -- the scales the NNX containers declare). No PRNG state and one
elementwise expression per parameter, so XLA compiles it in seconds for any depth; the 272
``jax.random.normal`` initialisers of the NNX constructor took minutes on a GPU.
"""
from __future__ import annotations

import zlib

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jax_tokenweave.models.config import ModelConfig
from jax_tokenweave.models.llama import stacked_param_info
from jax_tokenweave.parallel.sharding import param_shardings


def _mix(x: jax.Array) -> jax.Array:
    x = x ^ (x >> 16)
    x = x * np.uint32(0x85EBCA6B)
    x = x ^ (x >> 13)
    x = x * np.uint32(0xC2B2AE35)
    return x ^ (x >> 16)


def hashed_normal(shape: tuple[int, ...], salt: int, *, layered: bool) -> jax.Array:
    """float32 standard-normal-like values of `shape`, a deterministic function of (salt, index).
    layered: the leading axis (layers) enters the hash on its own, so no index overflows 32 bits
    within one layer's slice."""
    flat = jnp.zeros(shape, jnp.uint32)
    stride = 1
    for ax in range(len(shape) - 1, 0 if layered else -1, -1):
        flat = flat + lax.broadcasted_iota(jnp.uint32, shape, ax) * np.uint32(stride % (1 << 32))
        stride *= shape[ax]
    seed = np.uint32(salt & 0xFFFFFFFF)
    if layered:
        seed = _mix(lax.broadcasted_iota(jnp.uint32, shape, 0) * np.uint32(0x9E3779B9) + seed)
    return normal_from_bits(_mix(_mix(flat ^ seed) + np.uint32(0x68E31DA4)))


def normal_from_bits(bits: jax.Array) -> jax.Array:
    """uint32 -> float32 normal through the inverse CDF. 23 bits make the uniform, so that
    u = (k + 0.5) / 2**23 is exact in float32 and stays inside (0, 1): with 24 bits the largest
    k rounds to u = 1 and erfinv(1) = inf."""
    u = ((bits >> 9).astype(jnp.float32) + 0.5) * np.float32(1.0 / (1 << 23))
    return np.float32(np.sqrt(2.0)) * jax.scipy.special.erfinv(2.0 * u - 1.0)


def random_params(cfg: ModelConfig, mesh, *, seed: int = 0, dtype=jnp.float32,
                  axis_name: str = "tp") -> dict[str, jax.Array]:
    """path -> array in the runtime layout, placed with the sharding rules."""
    info = stacked_param_info(cfg)
    shardings = param_shardings(cfg, mesh, axis_name, stacked=True)

    def init():
        out = {}
        for path, (shape, axes, std) in sorted(info.items()):
            if std is None:
                out[path] = jnp.ones(shape, dtype)
                continue
            salt = zlib.crc32(f"{seed}:{path}".encode())
            z = hashed_normal(shape, salt, layered=axes[:1] == ("layers",))
            out[path] = (std * z).astype(dtype)
        return out

    return jax.jit(init, out_shardings=shardings)()
