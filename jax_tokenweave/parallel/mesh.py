"""The tensor-parallel mesh. One place that builds it, so every module agrees on the axis name."""
from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh

DEFAULT_AXIS = "tp"


def make_mesh(tp: int | None = None, axis_name: str = DEFAULT_AXIS, devices=None) -> Mesh:
    """A 1-D mesh of `tp` devices (default: all devices, across processes under jax.distributed).

    Built with `jax.sharding.Mesh` (axis type Auto): `jax.make_mesh` defaults to Explicit axes in
    jax >= 0.10, under which shard_map refuses unsharded inputs."""
    devices = list(jax.devices() if devices is None else devices)
    tp = len(devices) if tp is None else tp
    if tp < 1 or tp > len(devices):
        raise ValueError(f"make_mesh: tp={tp} but {len(devices)} devices are visible; pick 1..{len(devices)}")
    return Mesh(np.array(devices[:tp]), (axis_name,))
