"""The `p2p`, `multimem` and `auto` implementations of the fused op (see fused.py for the contract).

How a call finds its communicator: pass ``comm=`` to ``fused_allreduce_rmsnorm`` explicitly, or
leave it None and the communicator created last for that axis name (``Communicator(...,
set_default=True)``, the default) is used.

Extra knobs for benchmarks and tests: ``p2p_fused(..., ctas=, mode="oneshot"|"twoshot"|"auto")``.
"""
from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from jax_tokenweave.collective import auto_table, fused
from jax_tokenweave.collective.communicator import Communicator
from jax_tokenweave.collective.extension import (DONE_TARGET, START_TARGET, TARGET, available, extension,
                                                 register_targets)
from jax_tokenweave.compat import axis_size

_MODES = {"auto": 0, "oneshot": 1, "twoshot": 2}


def _resolve_comm(comm, axis_name):
    extension()   # raises why the extension is unavailable, before anything else
    if comm is None:
        comm = Communicator.default(axis_name)
        if comm is None:
            raise RuntimeError(f"fused_allreduce_rmsnorm: impl='p2p' needs a Communicator for axis "
                               f"{axis_name!r}: create jax_tokenweave.Communicator(mesh, {axis_name!r}) "
                               f"once, outside jit, and pass comm= (or keep it as the axis default)")
    if comm.axis_name != axis_name:
        raise ValueError(f"fused_allreduce_rmsnorm: the Communicator was built for axis "
                         f"{comm.axis_name!r}, not {axis_name!r}")
    if comm.closed:
        raise RuntimeError("fused_allreduce_rmsnorm: the Communicator is closed")
    return comm


def _call(partial, residual, gamma, *, axis_name, eps, comm, ctas, mode, transport, slot=None):
    """The synchronous custom call, or (slot given) the start of an asynchronous one."""
    register_targets()
    n = axis_size(axis_name)
    if n != comm.num_ranks:
        raise ValueError(f"fused_allreduce_rmsnorm: axis {axis_name!r} has {n} devices here but the "
                         f"Communicator was built for a mesh of {comm.num_ranks}; build one for this mesh")
    T, D = partial.shape
    R = residual.shape[0]
    item = jnp.dtype(partial.dtype).itemsize
    if D % 8:
        raise ValueError(f"fused_allreduce_rmsnorm: impl='p2p' needs a hidden size that is a multiple of 8, got {D}")
    max_d = extension().MAX_HIDDEN_BF16 * 2 // item
    if D > max_d:
        raise ValueError(f"fused_allreduce_rmsnorm: hidden size {D} exceeds the kernel's limit {max_d} for {partial.dtype}")
    msg = n * R * D * item
    if msg > comm.max_bytes:
        raise ValueError(f"fused_allreduce_rmsnorm: message of {msg} bytes ({T} tokens x {D} x {item} B) exceeds "
                         f"the Communicator's workspace ({comm.max_bytes} bytes); create it with "
                         f"max_bytes>={msg} or split the tokens")
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {tuple(_MODES)}")
    ctas = comm.ctas if ctas is None else int(ctas)
    if not 1 <= ctas <= extension().MAX_CTAS:
        raise ValueError(f"fused_allreduce_rmsnorm: ctas={ctas}; use 1..{extension().MAX_CTAS}")
    shapes = (jax.ShapeDtypeStruct(partial.shape, partial.dtype), jax.ShapeDtypeStruct(residual.shape, residual.dtype))
    gamma32 = gamma.astype(jnp.float32)
    attrs = dict(comm_id=np.int64(comm.id), eps=np.float32(eps), ctas=np.int64(ctas), mode=np.int64(_MODES[mode]),
                 num_ranks=np.int64(n), transport=np.int64(transport))
    # residual -> residual_out: the kernel updates the rows in place.
    if slot is None:
        return jax.ffi.ffi_call(TARGET, shapes, input_output_aliases={1: 1})(partial, residual, gamma32, **attrs)
    slots = extension().ASYNC_SLOTS
    if not 0 <= slot < slots:
        raise ValueError(f"fused_allreduce_rmsnorm_start: slot={slot}; use 0..{slots - 1}")
    normed, residual_out = jax.ffi.ffi_call(START_TARGET, shapes, input_output_aliases={1: 1})(
        partial, residual, gamma32, slot=np.int64(slot), **attrs)
    return fused.Pending(normed, residual_out, keep_alive=(partial, gamma32),
                         finish=functools.partial(_done, comm_id=comm.id, slot=slot))


def _done(pending, after, *, comm_id, slot):
    """XLA's stream waits for the kernel started in `slot`. The kernel's inputs (keep_alive) and
    the overlapped work (after) are operands, so XLA issues the wait after that work and keeps the
    inputs unreused until here."""
    shapes = (jax.ShapeDtypeStruct(pending.normed.shape, pending.normed.dtype),
              jax.ShapeDtypeStruct(pending.residual_out.shape, pending.residual_out.dtype))
    call = jax.ffi.ffi_call(DONE_TARGET, shapes, input_output_aliases={0: 0, 1: 1})
    return call(pending.normed, pending.residual_out, *pending.keep_alive, *after,
                comm_id=np.int64(comm_id), slot=np.int64(slot))


def p2p_fused(partial, residual, gamma, *, axis_name, eps=1e-5, comm=None, ctas=None, mode="auto"):
    """The `p2p` implementation (NVLink peer memory): one-shot for small messages, else two-shot."""
    comm = _resolve_comm(comm, axis_name)
    return _call(partial, residual, gamma, axis_name=axis_name, eps=eps, comm=comm, ctas=ctas, mode=mode,
                 transport=0)


def multimem_fused(partial, residual, gamma, *, axis_name, eps=1e-5, comm=None, ctas=None):
    """The `multimem` implementation (NVLS). Opt-in: needs JAX_TOKENWEAVE_ENABLE_MULTIMEM=1 and a
    Communicator built with transport='multimem' (whose set-up refuses machines with NVLS disabled)."""
    if os.environ.get("JAX_TOKENWEAVE_ENABLE_MULTIMEM") != "1":
        raise RuntimeError("fused_allreduce_rmsnorm: impl='multimem' is opt-in: set JAX_TOKENWEAVE_ENABLE_MULTIMEM=1 "
                           "and build the Communicator with transport='multimem' (never on machines where NVLink "
                           "multicast is disabled)")
    comm = _resolve_comm(comm, axis_name)
    if comm.transport != "multimem":
        raise RuntimeError("fused_allreduce_rmsnorm: impl='multimem' needs a Communicator built with transport='multimem'")
    if partial.dtype != jnp.bfloat16:
        raise ValueError("fused_allreduce_rmsnorm: impl='multimem' supports bfloat16 only; use impl='p2p'")
    return _call(partial, residual, gamma, axis_name=axis_name, eps=eps, comm=comm, ctas=ctas, mode="twoshot",
                 transport=1)


def _p2p_impl(partial, residual, gamma, *, axis_name, eps, comm):
    return p2p_fused(partial, residual, gamma, axis_name=axis_name, eps=eps, comm=comm)


def p2p_start(partial, residual, gamma, *, axis_name, eps=1e-5, comm=None, slot=0, ctas=None, mode="auto"):
    """The asynchronous `p2p` op: a fused.Pending for fused.fused_allreduce_rmsnorm_done."""
    comm = _resolve_comm(comm, axis_name)
    return _call(partial, residual, gamma, axis_name=axis_name, eps=eps, comm=comm, ctas=ctas, mode=mode,
                 transport=0, slot=slot)


def _multimem_impl(partial, residual, gamma, *, axis_name, eps, comm):
    return multimem_fused(partial, residual, gamma, axis_name=axis_name, eps=eps, comm=comm)


def _auto_chooser(partial, num_ranks):
    if not available() or jax.default_backend() != "gpu" or not Communicator.has_any_default():
        return "xla"
    return auto_table.choose(partial.shape[0], partial.shape[1], jnp.dtype(partial.dtype).itemsize, num_ranks)


def register_impls() -> None:
    # Registered whether or not the extension loads now: a call loads it (or raises why it
    # cannot), so an extension built later in the process is used.
    fused.register_impl("auto", _auto_chooser)
    fused.register_impl("p2p", _p2p_impl, start=p2p_start)
    fused.register_impl("multimem", _multimem_impl)


register_impls()
