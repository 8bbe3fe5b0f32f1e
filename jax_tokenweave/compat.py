"""The few JAX APIs that differ between jax 0.10.2 (CI, Python 3.11) and 0.11.2 (GPU image)."""
from __future__ import annotations

import jax

shard_map = jax.shard_map


def axis_size(axis_name: str) -> int:
    """Static size of a mesh axis, from inside shard_map."""
    return jax.lax.axis_size(axis_name)
