"""NNX parameter containers shared by the model families: a parameter carries its logical axis
names (mapped to mesh axes by ``jax_tokenweave.parallel.sharding``) and its initialisation scale.
Containers hold weights only; the math lives in ``models/layers.py``."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx


def param(rngs: nnx.Rngs, shape, axes, dtype, std: float | None) -> nnx.Param:
    """A parameter with its logical axis names; std=None means ones (norm weights). `std` is kept
    as metadata so random weights can be made without building the module (random_weights.py)."""
    if std is None:
        value = jnp.ones(shape, dtype)
    else:
        value = (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
    return nnx.Param(value, axes=axes, init_std=std)


class Proj(nnx.Module):
    """A projection weight (no math of its own: the einsum lives where its dims are named)."""

    def __init__(self, shape, axes, *, rngs, dtype, bias_shape=None, bias_axes=None):
        fan_in = math.prod(shape[:-1]) if axes[-1] == "embed" else shape[0]
        self.kernel = param(rngs, shape, axes, dtype, 1.0 / math.sqrt(fan_in))
        if bias_shape is not None:
            self.bias = param(rngs, bias_shape, bias_axes, dtype, 0.02)


class RMSNorm(nnx.Module):
    """Only the weight: normalisation itself happens inside the fused all-reduce."""

    def __init__(self, dim, *, rngs, dtype):
        self.weight = param(rngs, (dim,), ("embed",), dtype, None)
