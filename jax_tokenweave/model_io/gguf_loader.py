"""GGUF (llama.cpp) files -> our ModelConfig, parameters and tokenizer.

One mapping to our layout: every GGUF tensor is renamed to its Hugging Face key, dequantized to
float32 and put back into HF's layout, then handed to ``hf_keys.hf_to_param`` like a safetensors
tensor would be. Tensors are read one at a time from the memory-mapped file (``gguf.GGUFReader``
maps it; ``gguf.quants.dequantize`` touches only that tensor's blocks).

llama.cpp's converter permutes the rows of the q/k projections of *llama-architecture* models so
that its "normal" RoPE (rotating adjacent pairs x[2i], x[2i+1]) computes what HF's rotate-half
RoPE computed (pairs x[i], x[i + hd/2]). Per head it stored row ``2i + j`` (j in {0, 1}) from HF
row ``j*hd/2 + i``; ``_unpermute_rows`` undoes that (transformers' GGUF loader does the same).
Qwen2 files use llama.cpp's NeoX RoPE (rotate-half) and are stored unpermuted.

    cfg, params, tok = load_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")    # numpy, float32
"""
from __future__ import annotations

import os
import re
from typing import Iterator

import numpy as np

from jax_tokenweave.models.config import ModelConfig
from jax_tokenweave.models.hf_keys import check_complete, hf_to_param

SUPPORTED_ARCHS = ("llama", "qwen2")

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_BLOCK = re.compile(r"blk\.(\d+)\.(.+)")


def open_gguf(path_or_reader):
    """A ``gguf.GGUFReader`` (memory-maps the file; reads no tensor data)."""
    import gguf
    if isinstance(path_or_reader, gguf.GGUFReader):
        return path_or_reader
    path = os.fspath(path_or_reader)
    if not os.path.exists(path):
        raise FileNotFoundError(f"GGUF file {path} not found")
    return gguf.GGUFReader(path)


def _field(reader, key, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def gguf_to_hf_name(name: str) -> str:
    """A GGUF tensor name -> its Hugging Face key. Raises ValueError for names we do not know."""
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    m = _BLOCK.fullmatch(name)
    if m and m.group(2) in _BLOCK_NAMES:
        return f"model.layers.{m.group(1)}.{_BLOCK_NAMES[m.group(2)]}"
    raise ValueError(f"GGUF tensor {name!r} has no Hugging Face counterpart that jax_tokenweave "
                     f"knows (Llama-family tensors only)")


def config_from_gguf(path_or_reader) -> ModelConfig:
    """Our ModelConfig from the GGUF metadata (``<arch>.*`` keys) and the tensor list."""
    reader = open_gguf(path_or_reader)
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise ValueError(f"GGUF general.architecture is {arch!r}; supported: {SUPPORTED_ARCHS}")

    def get(key, default=None, required=True):
        v = _field(reader, f"{arch}.{key}", default)
        if v is None and required:
            raise ValueError(f"GGUF metadata lacks {arch}.{key}")
        return v

    names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in names:
        raise ValueError("this GGUF carries rope_freqs.weight (Llama 3.1-style scaled RoPE stored as "
                         "a frequency table), which jax_tokenweave does not read; convert the Hugging "
                         "Face checkpoint with scripts/convert_hf.py --hf-dir instead")
    scaling = _field(reader, f"{arch}.rope.scaling.type")
    if scaling not in (None, "none"):
        raise ValueError(f"GGUF rope scaling {scaling!r} is not supported")
    heads = int(get("attention.head_count"))
    hidden = int(get("embedding_length"))
    vocab = _field(reader, f"{arch}.vocab_size")
    if vocab is None:
        tokens = reader.fields.get("tokenizer.ggml.tokens")
        if tokens is None:
            raise ValueError(f"GGUF metadata has neither {arch}.vocab_size nor tokenizer.ggml.tokens")
        vocab = len(tokens.data)
    head_dim = _field(reader, f"{arch}.attention.key_length") \
        or _field(reader, f"{arch}.rope.dimension_count") or hidden // heads
    return ModelConfig(
        vocab_size=int(vocab), hidden_size=hidden,
        intermediate_size=int(get("feed_forward_length")), num_layers=int(get("block_count")),
        num_heads=heads, num_kv_heads=int(get("attention.head_count_kv", heads)),
        head_dim=int(head_dim), rope_theta=float(get("rope.freq_base", 10000.0)),
        rope_scaling=None, rms_norm_eps=float(get("attention.layer_norm_rms_epsilon")),
        tie_word_embeddings="output.weight" not in names,
        attention_bias="blk.0.attn_q.bias" in names,
        max_position_embeddings=int(get("context_length", 4096)), model_type=arch)


def _unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (see the module doc). w: [n_head*hd, ...] or [n_head*hd]."""
    hd = w.shape[0] // n_head
    return w.reshape(n_head, hd // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def dequantize_tensor(tensor) -> np.ndarray:
    """One GGUF tensor as float32 in row-major (HF) shape: GGUF lists dims innermost first."""
    from gguf.quants import dequantize
    out = np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
    shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
    return out.reshape(shape)


def iter_hf_tensors(path_or_reader, cfg: ModelConfig | None = None) -> Iterator[tuple[str, np.ndarray]]:
    """(HF key, float32 array in HF layout) for each tensor of the file, one at a time."""
    reader = open_gguf(path_or_reader)
    cfg = cfg or config_from_gguf(reader)
    permuted = cfg.model_type == "llama"
    for t in reader.tensors:
        key = gguf_to_hf_name(t.name)
        w = dequantize_tensor(t)
        if permuted and ".self_attn.q_proj." in key:
            w = _unpermute_rows(w, cfg.num_heads)
        elif permuted and ".self_attn.k_proj." in key:
            w = _unpermute_rows(w, cfg.num_kv_heads)
        yield key, w


def num_tensors(path_or_reader) -> int:
    return len(open_gguf(path_or_reader).tensors)


def load_gguf(path, dtype=np.float32):
    """(cfg, {path: numpy array in our layout}, Tokenizer) from a GGUF file, in host memory."""
    from jax_tokenweave.model_io.tokenizer import Tokenizer
    reader = open_gguf(path)
    cfg = config_from_gguf(reader)
    params = {}
    for key, w in iter_hf_tensors(reader, cfg):
        converted = hf_to_param(cfg, key, w)
        if converted is None:
            continue
        p, arr = converted
        if p in params:
            raise ValueError(f"GGUF tensor for {key!r} maps to {p!r} a second time")
        params[p] = arr.astype(dtype, copy=False)
    check_complete(cfg, params.keys())
    return cfg, params, Tokenizer.from_gguf(reader)
