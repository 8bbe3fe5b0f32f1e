"""Loading the CUDA extension `jax_tokenweave.collective._C` (built from `xla_ffi/`, BUILD.md) and
handing its FFI handlers to XLA.

A failed load is not remembered: the next call tries again, so an extension built later in the
same process (``python setup.py build_ext --inplace``) is picked up. When the load fails, the
error says why: no built file, a file built for another Python, or the dynamic loader's own
message (an unresolved symbol, a missing CUDA runtime)."""
from __future__ import annotations

import glob
import importlib
import os
import sysconfig

import jax

MODULE = "jax_tokenweave.collective._C"
TARGET = "jax_tokenweave_fused_ar_rmsnorm"
START_TARGET = "jax_tokenweave_fused_start"
DONE_TARGET = "jax_tokenweave_fused_done"
_PKG_DIR = os.path.dirname(os.path.abspath(__file__))
_C = None
_REGISTERED = False
_HOW_TO_BUILD = ("build it with nvcc (`python setup.py build_ext --inplace` from the repository root, "
                 "see BUILD.md) or use impl='xla'")


def _why_not(err: ImportError) -> str:
    suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    built = sorted(os.path.basename(p) for p in glob.glob(os.path.join(_PKG_DIR, "_C*.so")))
    if not built:
        return (f"it is not built: no {_PKG_DIR}/_C{suffix} (the install skips it when nvcc or "
                f"jax's FFI headers are missing; its log says which)")
    if not any(b.endswith(suffix) for b in built):
        return (f"it was built for another Python: found {', '.join(built)}, this interpreter "
                f"loads _C{suffix}; rebuild with this Python")
    return f"loading {os.path.join(_PKG_DIR, '_C' + suffix)} failed: {err}"


def extension():
    """The compiled module, or a RuntimeError that names why it cannot be loaded."""
    global _C
    if _C is None:
        importlib.invalidate_caches()   # see a file that was built after the last attempt
        try:
            _C = importlib.import_module(MODULE)
        except ImportError as e:
            raise RuntimeError(f"jax_tokenweave: the CUDA extension {MODULE} is not available: "
                               f"{_why_not(e)}. To use it, {_HOW_TO_BUILD}") from e
    return _C


def available() -> bool:
    try:
        extension()
        return True
    except RuntimeError:
        return False


def register_targets() -> None:
    """Hand the FFI handlers to XLA (CUDA platform). Idempotent. The synchronous call is
    registered as command-buffer compatible, so XLA may capture it into its CUDA graphs with the
    kernels around it (no host launch per call: what decode is bound by)."""
    global _REGISTERED
    if _REGISTERED:
        return
    from jaxlib import xla_client
    for name, (capsule, graph_safe) in extension().handlers().items():
        traits = (xla_client.CustomCallTargetTraits.COMMAND_BUFFER_COMPATIBLE if graph_safe
                  else xla_client.CustomCallTargetTraits.DEFAULT)
        jax.ffi.register_ffi_target(name, capsule, platform="CUDA", traits=traits)
    _REGISTERED = True
