"""The few JAX APIs that differ between jax 0.10.2 (CI, Python 3.11) and 0.11.2 (GPU image)."""
from __future__ import annotations

import jax

shard_map = jax.shard_map


def axis_size(axis_name: str) -> int:
    """Static size of a mesh axis, from inside shard_map."""
    return jax.lax.axis_size(axis_name)


def compute_on(fn, compute_type: str):
    """``fn`` run as one non-inlined call with ``compute_type`` (e.g. ``"gpu_stream:1"``), outputs in
    device memory. jax 0.11.2: ``jax.experimental.compute_on.compute_on(fn, compute_type=...,
    out_memory_spaces=...)``; jax 0.10.2: the same function is called ``compute_on2`` (its
    ``compute_on`` is the older context manager)."""
    import inspect
    from jax.experimental import compute_on as _co
    new_style = "compute_type" in inspect.signature(_co.compute_on).parameters and \
        "out_memory_spaces" in inspect.signature(_co.compute_on).parameters
    wrap = _co.compute_on if new_style else _co.compute_on2
    return wrap(fn, compute_type=compute_type, out_memory_spaces=jax.memory.Space.Device)


def xla_metadata(**attrs):
    """Context manager attaching XLA frontend attributes (e.g. ``_scheduling_group_id``)."""
    from jax.experimental.xla_metadata import set_xla_metadata
    return set_xla_metadata(**attrs)
