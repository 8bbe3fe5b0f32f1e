"""The communicator of the fused op: per-device workspaces (data + barrier flags), mapped on every
peer of one mesh axis, created once, outside ``jit``.

Two modes, chosen from the mesh:
  * one process driving several GPUs: peer access is enabled between every pair and the peers'
    plain device pointers are used;
  * ``jax.distributed`` with one GPU per process (one host): each process allocates its workspace
    and publishes a CUDA IPC handle through the distributed key-value store; the others open it.

Usage::

    comm = Communicator(mesh, "tp", max_bytes=64 << 20)   # becomes the default for axis "tp"
    normed, res = fused_allreduce_rmsnorm(x, r, g, axis_name="tp", impl="p2p")   # or comm=comm

Every process must create its communicators in the same order (their ids must agree).
"""
from __future__ import annotations

import itertools
import pickle

import jax
import numpy as np

from jax_tokenweave.collective import auto_table
from jax_tokenweave.collective.extension import extension, register_targets

_ids = itertools.count(1)


def cuda_ordinal(d) -> int:
    """The CUDA device ordinal of a local jax device (what the FFI handler sees as DeviceOrdinal)."""
    if d.local_hardware_id is not None:
        return int(d.local_hardware_id)
    # jax.distributed(local_device_ids=[i]) restricts the process to CUDA devices i (and leaves
    # local_hardware_id unset): map the device's local index onto that list.
    vis = str(getattr(jax.config, "jax_cuda_visible_devices", "all"))
    idx = jax.local_devices().index(d)
    if vis and vis != "all":
        return int(vis.split(",")[idx])
    return idx


class Communicator:
    _defaults: dict[str, "Communicator"] = {}

    def __init__(self, mesh, axis_name: str = "tp", *, max_bytes: int = 64 << 20,
                 oneshot_max_bytes: int | None = None, ctas: int | None = None, timeout_s: float = 30.0,
                 transport: str = "p2p", set_default: bool = True):
        """max_bytes: largest message (tokens x hidden x itemsize, tokens rounded up to a multiple
        of the axis size) a call may carry. oneshot_max_bytes: messages up to this size use the
        one-shot kernel (default from the measured table). ctas: CTAs per launch (default: one
        per SM). timeout_s: how long a kernel waits for a peer before it fails with an error."""
        C = extension()
        register_targets()
        if transport not in ("p2p", "multimem"):
            raise ValueError(f"Communicator: transport must be 'p2p' or 'multimem', got {transport!r}")
        if axis_name not in mesh.axis_names:
            raise ValueError(f"Communicator: mesh has axes {mesh.axis_names}, not {axis_name!r}")
        others = [a for a in mesh.axis_names if a != axis_name and mesh.shape[a] != 1]
        if others:
            raise ValueError(f"Communicator: only meshes whose other axes have size 1 are supported; "
                             f"{others} have more devices. Build the mesh with jax_tokenweave.parallel.mesh.make_mesh")
        devices = list(np.asarray(mesh.devices).reshape(-1))
        if any(d.platform != "gpu" for d in devices):
            raise RuntimeError("Communicator: the p2p transport needs CUDA GPUs; on other platforms use impl='xla'")
        n = len(devices)
        if n > C.MAX_RANKS:
            raise ValueError(f"Communicator: axis of {n} devices; at most {C.MAX_RANKS} are supported")
        self.axis_name, self.num_ranks, self.transport = axis_name, n, transport
        self.devices = devices
        self.id = next(_ids)
        self.oneshot_max_bytes = int(auto_table.ONESHOT_MAX_BYTES if oneshot_max_bytes is None else oneshot_max_bytes)
        self.max_bytes = int(max_bytes)
        os_cap = min(self.max_bytes, max(self.oneshot_max_bytes, 1 << 16))
        layout = C.layout(self.max_bytes, os_cap, n)
        sms = C.sm_count(cuda_ordinal(next(d for d in devices if d.process_index == jax.process_index())))
        self.ctas = int(ctas) if ctas else max(1, min(sms, C.MAX_CTAS))
        self.timeout_s = float(timeout_s)
        me = jax.process_index()
        local = [(r, d) for r, d in enumerate(devices) if d.process_index == me]
        self.local_ranks = [r for r, _ in local]
        multiprocess = len(local) < n
        ords = {r: cuda_ordinal(d) for r, d in local}
        ptrs = {r: C.alloc_workspace(ords[r], layout["total"]) for r in ords}
        self._owned = dict(ptrs)
        if not multiprocess:
            C.enable_peer_access([ords[r] for r in range(n)])
            table = {r: [ptrs[q] for q in range(n)] for r in ords}
            ipc = {r: [False] * n for r in ords}
        else:
            if len(local) != 1:
                raise RuntimeError("Communicator: under jax.distributed each process must hold exactly one "
                                   f"device of the axis (this one holds {len(local)})")
            table, ipc = self._exchange_ipc(C, local[0][0], ords[local[0][0]], ptrs[local[0][0]], n)
        for r in ords:
            C.register_rank(self.id, ords[r], r, n, table[r], ipc[r], True, self.max_bytes, os_cap,
                            int(self.timeout_s * 1e9), self.ctas, self.oneshot_max_bytes)
        self.closed = False
        if transport == "multimem":
            if multiprocess:
                raise RuntimeError("Communicator: transport='multimem' is implemented for one process only")
            C.multimem_setup(self.id, [ords[r] for r in range(n)], self.max_bytes)  # refuses unless opted in
        if set_default:
            Communicator._defaults[axis_name] = self

    def _exchange_ipc(self, C, rank, ordinal, ptr, n):
        from jax._src import distributed
        client = distributed.global_state.client
        if client is None:
            raise RuntimeError("Communicator: devices of the axis live in other processes but jax.distributed "
                               "is not initialised")
        prefix = f"jax_tokenweave/comm{self.id}/{self.axis_name}/n{n}"
        client.key_value_set_bytes(f"{prefix}/rank{rank}",
                                   pickle.dumps((jax.process_index(), C.ipc_handle(ordinal, ptr))))
        ws, ipc = [], []
        for r in range(n):
            if r == rank:
                ws.append(ptr); ipc.append(False)
                continue
            blob = client.blocking_key_value_get_bytes(f"{prefix}/rank{r}", int(max(self.timeout_s, 60) * 1000))
            _, handle = pickle.loads(blob)
            try:
                ws.append(C.ipc_open(ordinal, handle)); ipc.append(True)
            except RuntimeError as e:
                raise RuntimeError(f"Communicator: cannot map rank {r}'s workspace on this GPU ({e}); the p2p "
                                   f"transport needs all devices of the axis on one host with peer access") from e
        return {rank: ws}, {rank: ipc}

    @classmethod
    def default(cls, axis_name: str):
        return cls._defaults.get(axis_name)

    @classmethod
    def has_any_default(cls) -> bool:
        return bool(cls._defaults)

    def set_default(self):
        Communicator._defaults[self.axis_name] = self
        return self

    def last_error(self):
        """Error records of the local ranks: {rank: (code, rank, missing_peer, call, block)}; code 0 = none."""
        C = extension()
        return {r: tuple(C.last_error(self.id, cuda_ordinal(self.devices[r]))) for r in self.local_ranks}

    def host_launches(self):
        """{rank: kernels the fused op's host handlers launched on that local rank}. A call that XLA
        captured into a CUDA graph (command buffer) is launched once, when captured, and replayed
        without its handler, so this grows by less than the number of calls executed."""
        C = extension()
        return {r: C.host_launches(self.id, cuda_ordinal(self.devices[r])) for r in self.local_ranks}

    def close(self):
        """Free the workspaces (after the device work that uses them has finished)."""
        if self.closed:
            return
        extension().destroy_comm(self.id)
        self.closed = True
        if Communicator._defaults.get(self.axis_name) is self:
            del Communicator._defaults[self.axis_name]

    def __repr__(self):
        return (f"Communicator(axis={self.axis_name!r}, ranks={self.num_ranks}, transport={self.transport!r}, "
                f"max_bytes={self.max_bytes}, ctas={self.ctas})")
