"""Checkpoints: Hugging Face folders and GGUF files -> Orbax, and Orbax -> sharded arrays on a mesh.

Layout of a converted checkpoint ``OUT/``::

    OUT/jax_tokenweave.json   manifest: format, every parameter's shape and stored dtype, source
                              (written last: a folder without it is not a checkpoint)
    OUT/config.json           the ModelConfig as a Hugging Face config.json (from_hf_config reads it)
    OUT/tokenizer/            tokenizer.json + tokenizer_meta.json (jax_tokenweave.model_io.tokenizer), if any
    OUT/params/               an Orbax composite checkpoint: one item per parameter, named by its
                              flat dotted path, each a standard PyTree checkpoint {"value": array}

Memory during conversion is bounded by O(largest tensor), not O(model): tensors are read one at
a time (safetensors files are memory-mapped by parsing their header and ``np.memmap``-ing each
tensor's byte range, GGUF files are memory-mapped by ``gguf.GGUFReader``), converted to our
layout by ``hf_keys.hf_to_param`` and written as their own Orbax item with a synchronous save
before the next one is touched. A tensor exists in host memory at most a few times over (the
converted copy, a dtype cast, Orbax's defensive copy), and every copy is dropped before the next
tensor is read. One item per parameter is what makes this possible with the public Orbax API: a
single PyTree save needs every leaf at once. ``load_checkpoint`` restores all items in one Orbax
composite restore with each parameter's ``NamedSharding`` as the target, so each process reads
only the shards of its own devices and no array is gathered on one device (works under
``jax.distributed`` with a shared file system).

Conversion is atomic: everything is written into ``OUT.tmp-<pid>`` and renamed to ``OUT`` once the
manifest is in place; on any error the temp folder is removed. Keys are checked before anything is
written: missing, unexpected and mis-shaped tensors are all named in one ``CheckpointError``.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from jax_tokenweave.models import hf_keys
from jax_tokenweave.models.llama import is_stacked, unstack_layers
from jax_tokenweave.models.config import ModelConfig, from_hf_config, to_hf_dict

FORMAT = "jax_tokenweave/orbax-per-param/v1"
MANIFEST = "jax_tokenweave.json"
PARAMS_DIR = "params"
TOKENIZER_DIR = "tokenizer"


class CheckpointError(ValueError):
    """A source checkpoint that does not match the model (names every offending tensor/file)."""


# ---------------------------------------------------------------------------------- dtypes

def _ml_dtypes():
    import ml_dtypes
    return ml_dtypes


def resolve_dtype(dtype) -> np.dtype | None:
    """None / "auto" -> None (keep the source dtype); names and dtypes -> a numpy dtype."""
    if dtype is None or (isinstance(dtype, str) and dtype in ("auto", "source")):
        return None
    if isinstance(dtype, str):
        names = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32",
                 "float": "float32"}
        dtype = names.get(dtype, dtype)
        if dtype == "bfloat16":
            return np.dtype(_ml_dtypes().bfloat16)
    return np.dtype(dtype)


_ST_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
              "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
              "BOOL": "bool", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


def _st_dtype(code: str, where: str) -> np.dtype:
    if code not in _ST_DTYPES:
        raise CheckpointError(f"{where}: safetensors dtype {code!r} is not supported")
    name = _ST_DTYPES[code]
    if name in ("bfloat16", "float8_e4m3fn", "float8_e5m2"):
        return np.dtype(getattr(_ml_dtypes(), name))
    return np.dtype(name)


# --------------------------------------------------------------------- safetensors reading

class _SafetensorsFile:
    """Zero-copy view of one .safetensors file: the header is parsed, each tensor is an
    ``np.memmap`` over its byte range (nothing is read until the converter touches it)."""

    def __init__(self, path: str):
        self.path = path
        try:
            with open(path, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                if n <= 0 or n > 100 * 2**20:
                    raise ValueError(f"header length {n}")
                header = json.loads(f.read(n))
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
        header.pop("__metadata__", None)
        self._base = 8 + n
        self.entries = header  # key -> {"dtype", "shape", "data_offsets"}

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.entries[key]["shape"])

    def get(self, key: str) -> np.ndarray:
        e = self.entries[key]
        dtype = _st_dtype(e["dtype"], f"{self.path}:{key}")
        start, end = e["data_offsets"]
        shape = tuple(e["shape"])
        if end - start != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
            raise CheckpointError(f"{self.path}: tensor {key!r} has {end - start} bytes, which does not "
                                  f"fit shape {shape} of {e['dtype']}")
        if end == start:
            return np.zeros(shape, dtype)
        return np.memmap(self.path, dtype=dtype, mode="r", offset=self._base + start, shape=shape)


def _open_safetensors(hf_dir: str) -> dict[str, _SafetensorsFile]:
    """HF key -> the file holding it. Uses model.safetensors.index.json when present."""
    index = os.path.join(hf_dir, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            weight_map: dict[str, str] = json.load(f)["weight_map"]
        missing_files = sorted({fn for fn in weight_map.values()
                                if not os.path.exists(os.path.join(hf_dir, fn))})
        if missing_files:
            raise CheckpointError(f"{index} lists shard files that are not in {hf_dir}: {missing_files}")
        files = {fn: _SafetensorsFile(os.path.join(hf_dir, fn)) for fn in sorted(set(weight_map.values()))}
        out, problems = {}, []
        for key, fn in weight_map.items():
            if key not in files[fn].entries:
                problems.append(f"{key!r} (index says {fn})")
            out[key] = files[fn]
        for fn, sf in files.items():
            for key in sf.entries:
                if key not in weight_map:
                    problems.append(f"{key!r} (in {fn}, not in the index)")
        if problems:
            raise CheckpointError(f"{index} does not match its shard files: {problems}")
        return out
    names = sorted(n for n in os.listdir(hf_dir) if n.endswith(".safetensors"))
    if not names:
        raise CheckpointError(f"no *.safetensors files in {hf_dir} (only safetensors checkpoints "
                              f"are read; convert .bin files with transformers' save_pretrained)")
    out: dict[str, _SafetensorsFile] = {}
    for n in names:
        sf = _SafetensorsFile(os.path.join(hf_dir, n))
        for key in sf.entries:
            if key in out:
                raise CheckpointError(f"tensor {key!r} is in both {out[key].path} and {sf.path}")
            out[key] = sf
    return out


# --------------------------------------------------------------------------- key checking

def _zero_view(shape: tuple[int, ...]) -> np.ndarray:
    """An array of `shape` that owns one element (all strides 0): layout transforms on it are views."""
    return np.lib.stride_tricks.as_strided(np.zeros(1, np.float32), shape=shape,
                                           strides=(0,) * len(shape))


def _plan_key(cfg: ModelConfig, key: str, shape: tuple[int, ...]) -> tuple[str | None, str | None]:
    """(our path or None if ignored, error or None) for one HF key, without reading its data."""
    if hf_keys.is_ignored(cfg, key):
        return None, None
    try:  # one expert of a stacked (Mixtral) parameter: its slot is (path, expert index)
        slot = hf_keys.stacked_slot(cfg, key, shape)
    except ValueError as e:
        return None, str(e)
    if slot is not None:
        return slot, None
    matched = hf_keys.match_key(key)
    if matched is None:
        return None, f"unexpected tensor {key!r}: not a parameter of a {cfg.model_type} model"
    path, transform = matched
    shapes = hf_keys.param_shapes(cfg)
    if path not in shapes:
        return None, f"unexpected tensor {key!r}: the model has no {path!r}"
    expected = shapes[path]
    try:
        got = tuple(transform(cfg, _zero_view(shape)).shape)
    except ValueError:
        got = None
    if got != expected:
        return path, (f"mis-shaped tensor {key!r}: shape {shape} does not give our {path!r} of "
                      f"shape {expected}")
    return path, None


def _hf_name_of(path) -> str:
    """Our path (or stacked slot) -> the HF key that feeds it (for error messages)."""
    if isinstance(path, tuple):
        return hf_keys.slot_hf_name(path) or str(path)
    for pattern, template, _ in getattr(hf_keys, "_TABLE", ()):
        rx = re.escape(template).replace(re.escape("{0}"), r"(\d+)")
        m = re.fullmatch(rx, path)
        if m:
            return re.sub(r"\(\\d\+\)", lambda _: m.group(1), pattern.pattern).replace("\\.", ".")
    return path


def check_keys(cfg: ModelConfig, key_shapes: Iterable[tuple[str, tuple[int, ...]]], *,
               source: str) -> dict[str, str]:
    """HF key -> our path for a whole checkpoint, before any data is read. Raises CheckpointError
    naming every missing, unexpected, duplicate and mis-shaped tensor."""
    plan, errors, seen = {}, [], {}
    for key, shape in key_shapes:
        path, err = _plan_key(cfg, key, tuple(shape))
        if err:
            errors.append(err)
            continue
        if path is None:
            continue
        if path in seen:
            errors.append(f"duplicate: {key!r} and {seen[path]!r} both give {path!r}")
            continue
        seen[path] = key
        plan[key] = path
    missing = sorted(hf_keys.expected_slots(cfg) - set(seen), key=str)
    errors += [f"missing tensor {_hf_name_of(p)!r} (our {p!r})" for p in missing]
    if errors:
        shown = "\n  ".join(errors[:40])
        more = f"\n  ... and {len(errors) - 40} more" if len(errors) > 40 else ""
        raise CheckpointError(f"{source} does not match its config.json ({len(errors)} problems):"
                              f"\n  {shown}{more}")
    return plan


# ---------------------------------------------------------------------------- the writer

def _orbax():
    import orbax.checkpoint as ocp
    return ocp


class _Writer:
    """Writes one parameter at a time into ``OUT.tmp-<pid>/params/<path>`` and renames the folder
    to ``OUT`` in ``finish``. Use as a context manager: an exception removes the temp folder."""

    def __init__(self, out_dir: str | os.PathLike, *, overwrite: bool = False):
        self.out = os.path.abspath(os.fspath(out_dir))
        if os.path.exists(self.out) and not overwrite:
            raise FileExistsError(f"{self.out} already exists; remove it or pass overwrite=True "
                                  f"(--overwrite)")
        self.overwrite = overwrite
        self.tmp = f"{self.out}.tmp-{os.getpid()}"
        self.params: dict[str, dict[str, Any]] = {}
        self._ckptr = None

    def __enter__(self):
        if os.path.exists(self.tmp):
            shutil.rmtree(self.tmp)
        os.makedirs(os.path.join(self.tmp, PARAMS_DIR))
        ocp = _orbax()
        self._ckptr = ocp.Checkpointer(ocp.StandardCheckpointHandler())
        return self

    def __exit__(self, exc_type, exc, tb):
        if self._ckptr is not None:
            self._ckptr.close()
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
        return False

    def put(self, path: str, array: np.ndarray) -> None:
        if path in self.params:
            raise CheckpointError(f"parameter {path!r} written twice")
        ocp = _orbax()
        array = np.ascontiguousarray(array)
        # Synchronous save: the array is on disk (and every copy of it freed) before we return.
        self._ckptr.save(os.path.join(self.tmp, PARAMS_DIR, path),
                         args=ocp.args.StandardSave({"value": array}))
        self.params[path] = {"shape": list(array.shape), "dtype": array.dtype.name}

    def finish(self, cfg: ModelConfig, tokenizer=None, source: dict | None = None) -> str:
        hf_keys.check_complete(cfg, self.params.keys())
        with open(os.path.join(self.tmp, "config.json"), "w") as f:
            json.dump(to_hf_dict(cfg), f, indent=1)
        if tokenizer is not None:
            tokenizer.save(os.path.join(self.tmp, TOKENIZER_DIR))
        manifest = {"format": FORMAT, "params": self.params, "source": source or {}}
        with open(os.path.join(self.tmp, MANIFEST), "w") as f:  # last: marks the folder complete
            json.dump(manifest, f, indent=1)
        old = None
        if os.path.exists(self.out):
            old = f"{self.out}.old-{os.getpid()}"
            os.rename(self.out, old)
        os.rename(self.tmp, self.out)
        if old:
            shutil.rmtree(old, ignore_errors=True)
        return self.out


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, unit="tensor", dynamic_ncols=True)


def _write_stream(out_dir, cfg: ModelConfig, tensors: Iterator[tuple[str, np.ndarray]], *,
                  total: int, dtype, tokenizer, source: dict, progress: bool, overwrite: bool,
                  desc: str, convert: Callable[[str, np.ndarray], tuple[str, np.ndarray] | None]) -> str:
    dtype = resolve_dtype(dtype)
    bar = _progress(total, desc, progress)
    try:
        with _Writer(out_dir, overwrite=overwrite) as w:
            for key, tensor in tensors:
                res = convert(key, tensor)
                del tensor
                if res is not None:
                    path, arr = res
                    if dtype is not None and arr.dtype != dtype:
                        arr = arr.astype(dtype)
                    w.put(path, arr)
                    del arr, res
                if bar is not None:
                    bar.set_postfix_str(key, refresh=False)
                    bar.update(1)
            return w.finish(cfg, tokenizer, source)
    finally:
        if bar is not None:
            bar.close()


# ----------------------------------------------------------------------- public converters

def convert_hf_to_orbax(hf_dir: str | os.PathLike, out_dir: str | os.PathLike, *, dtype=None,
                        progress: bool = True, overwrite: bool = False) -> str:
    """Convert a local Hugging Face folder (config.json, *.safetensors [+ index], optional
    tokenizer.json/tokenizer_config.json) into an Orbax checkpoint at ``out_dir``; returns its path.

    dtype: None/"auto" keeps each tensor's stored dtype; else "bfloat16", "float16", "float32" or a
    numpy dtype. Streams tensor by tensor (see the module doc for the memory bound) and is atomic.
    """
    hf_dir = os.fspath(hf_dir)
    cfg_path = os.path.join(hf_dir, "config.json")
    if not os.path.isdir(hf_dir):
        raise FileNotFoundError(f"Hugging Face folder {hf_dir} does not exist")
    if not os.path.exists(cfg_path):
        raise FileNotFoundError(f"{cfg_path} not found: a Hugging Face checkpoint folder needs "
                                f"config.json next to its *.safetensors files")
    cfg = from_hf_config(cfg_path)
    files = _open_safetensors(hf_dir)
    # Read in file order, then offset order, so the disk is read sequentially.
    order = sorted(files, key=lambda k: (files[k].path, files[k].entries[k]["data_offsets"][0]))
    plan = check_keys(cfg, ((k, files[k].shape(k)) for k in order), source=hf_dir)
    tokenizer = None
    if os.path.exists(os.path.join(hf_dir, "tokenizer.json")):
        from jax_tokenweave.model_io.tokenizer import Tokenizer
        tokenizer = Tokenizer.from_hf_dir(hf_dir)

    def tensors():
        for k in order:
            yield k, (files[k].get(k) if k in plan else None)

    assembler = hf_keys.ParamAssembler(cfg)  # stacks per-expert tensors (Mixtral) as they arrive

    def convert(key, tensor):
        if tensor is None:  # ignored key (e.g. rotary inv_freq): never read
            return None
        return assembler.add(key, tensor)

    return _write_stream(out_dir, cfg, tensors(), total=len(order), dtype=dtype, tokenizer=tokenizer,
                         source={"kind": "hf", "path": os.path.abspath(hf_dir)}, progress=progress,
                         overwrite=overwrite, desc="converting", convert=convert)


def convert_gguf_to_orbax(gguf_path: str | os.PathLike, out_dir: str | os.PathLike, *,
                          dtype="float32", progress: bool = True, overwrite: bool = False) -> str:
    """Convert a GGUF file (dequantized, q/k rows un-permuted; see gguf_loader) with its tokenizer
    and chat template into an Orbax checkpoint at ``out_dir``; returns its path."""
    from jax_tokenweave.model_io import gguf_loader
    from jax_tokenweave.model_io.tokenizer import Tokenizer
    reader = gguf_loader.open_gguf(gguf_path)
    cfg = gguf_loader.config_from_gguf(reader)
    names = []
    for t in reader.tensors:
        try:
            names.append((gguf_loader.gguf_to_hf_name(t.name),
                          tuple(int(d) for d in reversed(t.shape.tolist()))))
        except ValueError as e:
            raise CheckpointError(f"{gguf_path}: {e}") from None
    check_keys(cfg, names, source=os.fspath(gguf_path))
    tokenizer = Tokenizer.from_gguf(reader)
    return _write_stream(out_dir, cfg, gguf_loader.iter_hf_tensors(reader, cfg), total=len(names),
                         dtype=dtype, tokenizer=tokenizer,
                         source={"kind": "gguf", "path": os.path.abspath(os.fspath(gguf_path))},
                         progress=progress, overwrite=overwrite, desc="converting GGUF",
                         convert=lambda k, t: hf_keys.hf_to_param(cfg, k, t))


def save_params(out_dir: str | os.PathLike, cfg: ModelConfig, params: dict[str, Any], *,
                tokenizer=None, dtype=None, overwrite: bool = False, progress: bool = False) -> str:
    """Write a flat dict path -> array (numpy, or fully addressable jax arrays) in the same format.
    Runtime-layout params (layers stacked, TPModel.params) are written per layer, as checkpoints are."""
    if is_stacked(params):
        params = unstack_layers(params)

    def tensors():
        for k, v in params.items():
            yield k, np.asarray(v)
    return _write_stream(out_dir, cfg, tensors(), total=len(params), dtype=dtype, tokenizer=tokenizer,
                         source={"kind": "params"}, progress=progress, overwrite=overwrite,
                         desc="saving", convert=lambda k, v: (k, v))


# ---------------------------------------------------------------------------------- loading

def read_manifest(path: str | os.PathLike) -> dict:
    path = os.fspath(path)
    mpath = os.path.join(path, MANIFEST)
    if not os.path.exists(mpath):
        raise FileNotFoundError(f"{path} is not a jax_tokenweave checkpoint (no {MANIFEST}); convert "
                                f"one with scripts/convert_hf.py")
    with open(mpath) as f:
        manifest = json.load(f)
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{mpath}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    return manifest


def is_checkpoint(path: str | os.PathLike) -> bool:
    try:
        read_manifest(path)
        return True
    except (FileNotFoundError, ValueError):
        return False


def load_config(path: str | os.PathLike) -> ModelConfig:
    return from_hf_config(os.path.join(os.fspath(path), "config.json"))


def load_checkpoint(path: str | os.PathLike, mesh, axis_name: str = "tp", dtype=None):
    """(cfg, {path: jax.Array placed with its NamedSharding}, Tokenizer or None).

    Every parameter is restored straight into its target sharding (each process reads only the
    shards its devices hold). dtype: None keeps the stored dtype, else each array is cast while
    restoring."""
    import jax
    from jax_tokenweave.parallel.sharding import param_shardings
    ocp = _orbax()
    path = os.path.abspath(os.fspath(path))
    manifest = read_manifest(path)
    cfg = load_config(path)
    stored = manifest["params"]
    hf_keys.check_complete(cfg, stored.keys())
    shapes = hf_keys.param_shapes(cfg)
    for name, info in stored.items():
        if tuple(info["shape"]) != shapes[name]:
            raise ValueError(f"{path}: parameter {name!r} is stored with shape {tuple(info['shape'])}, "
                             f"config.json needs {shapes[name]}")
    shardings = param_shardings(cfg, mesh, axis_name)
    want = resolve_dtype(dtype)
    items = {}
    for name, info in stored.items():
        dt = want if want is not None else resolve_dtype(info["dtype"])
        items[name] = ocp.args.StandardRestore(
            {"value": jax.ShapeDtypeStruct(tuple(info["shape"]), dt, sharding=shardings[name])})
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
        restored = ckptr.restore(os.path.join(path, PARAMS_DIR), args=ocp.args.Composite(**items))
    params = {name: restored[name]["value"] for name in stored}
    tokenizer = None
    tok_dir = os.path.join(path, TOKENIZER_DIR)
    if os.path.isdir(tok_dir):
        from jax_tokenweave.model_io.tokenizer import Tokenizer
        tokenizer = Tokenizer.load(tok_dir)
    return cfg, params, tokenizer
