"""Multi-process start-up under ``jax.distributed``, and the helpers that multi-controller code needs.

One process per GPU (or several CPU processes on one host, with gloo collectives). The settings
come from arguments or from the environment:

    JAX_COORDINATOR_ADDRESS   host:port of process 0's coordinator service
    JAX_NUM_PROCESSES         number of processes
    JAX_PROCESS_ID            this process's id, 0..N-1
    JAX_LOCAL_DEVICE_ID       (GPU, optional) the local GPU this process drives; default
                              process_id % local GPU count
    JAX_DISTRIBUTED_TIMEOUT   seconds to wait for every process to join (default 120)

With none of them set, ``maybe_initialize`` does nothing and the program runs single-process on
all local devices. It must run before anything touches a JAX backend (``jax.devices()``, the
first array).
"""
from __future__ import annotations

import glob
import os
import sys

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

_ENV_COORD = "JAX_COORDINATOR_ADDRESS"
_ENV_NPROC = "JAX_NUM_PROCESSES"
_ENV_PID = "JAX_PROCESS_ID"
_ENV_LOCAL = "JAX_LOCAL_DEVICE_ID"
_ENV_TIMEOUT = "JAX_DISTRIBUTED_TIMEOUT"

_initialized = False


def _platform_guess() -> str:
    """'cpu' or 'gpu', decided without initialising a backend (that would be too early)."""
    plats = (os.environ.get("JAX_PLATFORMS") or os.environ.get("JAX_PLATFORM_NAME") or "").lower()
    if plats:
        first = plats.split(",")[0].strip()
        return "gpu" if first in ("cuda", "gpu", "rocm") else "cpu"
    return "gpu" if glob.glob("/dev/nvidia[0-9]*") else "cpu"


def _local_gpu_count() -> int:
    vis = os.environ.get("CUDA_VISIBLE_DEVICES")
    if vis is not None and vis.strip():
        return len([d for d in vis.split(",") if d.strip()])
    return max(1, len(glob.glob("/dev/nvidia[0-9]*")))


def maybe_initialize(coordinator: str | None = None, num_processes: int | None = None,
                     process_id: int | None = None, *, local_device_id: int | None = None,
                     timeout_s: int | None = None) -> bool:
    """Start ``jax.distributed`` when a coordinator and more than one process are given (by
    argument or environment); return whether this is a multi-process run.

    On CPU the cross-process collectives go through gloo; on GPU each process drives one local
    GPU. A process that does not join within ``timeout_s`` makes every other one fail with an
    error instead of hanging."""
    global _initialized
    if _initialized:
        return True
    coordinator = coordinator or os.environ.get(_ENV_COORD) or None
    if num_processes is None and os.environ.get(_ENV_NPROC):
        num_processes = int(os.environ[_ENV_NPROC])
    if process_id is None and os.environ.get(_ENV_PID):
        process_id = int(os.environ[_ENV_PID])
    if timeout_s is None:
        timeout_s = int(os.environ.get(_ENV_TIMEOUT, "120"))
    if num_processes is None or num_processes <= 1:
        if coordinator and num_processes is None:
            raise ValueError(f"a coordinator address ({coordinator}) was given but not the number of "
                             f"processes: pass --num-processes or set {_ENV_NPROC}")
        return False
    if not coordinator:
        raise ValueError(f"{num_processes} processes need a coordinator address (host:port of process "
                         f"0): pass --coordinator or set {_ENV_COORD}")
    if process_id is None:
        raise ValueError(f"a multi-process run needs this process's id: pass --process-id or set "
                         f"{_ENV_PID}")
    if not 0 <= process_id < num_processes:
        raise ValueError(f"process id {process_id} is outside 0..{num_processes - 1}")

    kwargs = dict(coordinator_address=coordinator, num_processes=num_processes,
                  process_id=process_id, initialization_timeout=timeout_s,
                  heartbeat_timeout_seconds=max(10, timeout_s),
                  shutdown_timeout_seconds=max(10, timeout_s))
    if _platform_guess() == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    else:
        if local_device_id is None and os.environ.get(_ENV_LOCAL):
            local_device_id = int(os.environ[_ENV_LOCAL])
        if local_device_id is None:
            local_device_id = process_id % _local_gpu_count()
        kwargs["local_device_ids"] = [local_device_id]
    if process_id == 0:
        print(f"jax.distributed: {num_processes} processes, coordinator {coordinator}; waiting up to "
              f"{timeout_s} s for all to join", file=sys.stderr, flush=True)
    try:
        jax.distributed.initialize(**kwargs)
    except TypeError:  # an older/newer jax without some of the timeout keywords
        for k in ("heartbeat_timeout_seconds", "shutdown_timeout_seconds"):
            kwargs.pop(k, None)
        jax.distributed.initialize(**kwargs)
    _initialized = True
    return True


def is_main_process() -> bool:
    return jax.process_index() == 0


def print0(*args, **kwargs) -> None:
    """print() on process 0 only (kwargs as print's; flush by default)."""
    if jax.process_index() == 0:
        kwargs.setdefault("flush", True)
        print(*args, **kwargs)


def replicate(x, mesh: Mesh) -> jax.Array:
    """A host value as a global array replicated over ``mesh`` (every process passes the same
    value). Works single- and multi-process, where passing numpy to a jit spanning other
    processes' devices is not allowed."""
    x = np.asarray(x)
    sharding = NamedSharding(mesh, P())
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def to_host(x: jax.Array) -> np.ndarray:
    """A replicated (or fully addressable) global array as numpy on every process."""
    if not isinstance(x, jax.Array) or x.is_fully_addressable:
        return np.asarray(x)
    if x.is_fully_replicated:
        return np.asarray(x.addressable_data(0))
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def sync(name: str = "sync") -> None:
    """Barrier over all processes (no-op single-process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def free_port() -> int:
    """A TCP port free on localhost right now (for a test's coordinator)."""
    import socket
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def add_cli_flags(parser) -> None:
    """--coordinator / --num-processes / --process-id on an argparse parser."""
    g = parser.add_argument_group("multi-process (jax.distributed); defaults from the environment")
    g.add_argument("--coordinator", default=None,
                   help=f"host:port of process 0 (env {_ENV_COORD})")
    g.add_argument("--num-processes", type=int, default=None, help=f"(env {_ENV_NPROC})")
    g.add_argument("--process-id", type=int, default=None, help=f"(env {_ENV_PID})")


def initialize_from_args(args) -> bool:
    return maybe_initialize(args.coordinator, args.num_processes, args.process_id)


__all__ = ["maybe_initialize", "is_main_process", "print0", "replicate", "to_host", "sync",
           "free_port", "add_cli_flags", "initialize_from_args"]
