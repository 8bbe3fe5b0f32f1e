"""Hugging Face checkpoint keys <-> our parameter paths, one tensor at a time (so conversion can
stream). HF stores torch Linear weights as [out, in]; ours are [in, out] with heads split out."""
from __future__ import annotations

import functools
import re
from typing import Any, Callable

import numpy as np
from flax import nnx

from jax_tokenweave.models.config import ModelConfig
from jax_tokenweave.models.llama import abstract_model, param_info, path_str


@functools.lru_cache(maxsize=None)
def _shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    return {path: shape for path, (shape, _) in param_info(cfg).items()}


def param_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter of our model: flat dotted path -> global shape."""
    return dict(_shapes(cfg))


# (HF key regex, our path template, layout transform(cfg, tensor) -> array in our layout).
# The transforms reshape by the config, so a tensor of the wrong size fails loudly in the shape
# check of hf_to_param before any reshape.
def _heads_in(n_heads: Callable[[ModelConfig], int]):
    # torch [heads*hd, D] -> ours [D, heads, hd]
    return lambda c, t: t.T.reshape(c.hidden_size, n_heads(c), c.head_dim)


def _bias(n_heads: Callable[[ModelConfig], int]):
    return lambda c, t: t.reshape(n_heads(c), c.head_dim)


_H = lambda c: c.num_heads          # noqa: E731
_KVH = lambda c: c.num_kv_heads     # noqa: E731
_T = lambda c, t: t.T               # noqa: E731
_SAME = lambda c, t: t              # noqa: E731

_LAYER = r"model\.layers\.(\d+)\."
_TABLE: list[tuple[re.Pattern, str, Callable[[ModelConfig, np.ndarray], np.ndarray]]] = [
    (re.compile(r"model\.embed_tokens\.weight"), "embed_tokens.embedding", _SAME),
    (re.compile(r"model\.norm\.weight"), "final_norm.weight", _SAME),
    (re.compile(r"lm_head\.weight"), "lm_head.kernel", _T),
    (re.compile(_LAYER + r"input_layernorm\.weight"), "layers.{0}.input_norm.weight", _SAME),
    (re.compile(_LAYER + r"post_attention_layernorm\.weight"), "layers.{0}.post_attn_norm.weight", _SAME),
    (re.compile(_LAYER + r"self_attn\.q_proj\.weight"), "layers.{0}.attn.q_proj.kernel", _heads_in(_H)),
    (re.compile(_LAYER + r"self_attn\.k_proj\.weight"), "layers.{0}.attn.k_proj.kernel", _heads_in(_KVH)),
    (re.compile(_LAYER + r"self_attn\.v_proj\.weight"), "layers.{0}.attn.v_proj.kernel", _heads_in(_KVH)),
    (re.compile(_LAYER + r"self_attn\.q_proj\.bias"), "layers.{0}.attn.q_proj.bias", _bias(_H)),
    (re.compile(_LAYER + r"self_attn\.k_proj\.bias"), "layers.{0}.attn.k_proj.bias", _bias(_KVH)),
    (re.compile(_LAYER + r"self_attn\.v_proj\.bias"), "layers.{0}.attn.v_proj.bias", _bias(_KVH)),
    # torch [D, H*hd] -> ours [H, hd, D]
    (re.compile(_LAYER + r"self_attn\.o_proj\.weight"), "layers.{0}.attn.o_proj.kernel",
     lambda c, t: t.T.reshape(c.num_heads, c.head_dim, c.hidden_size)),
    (re.compile(_LAYER + r"mlp\.gate_proj\.weight"), "layers.{0}.mlp.gate_proj.kernel", _T),
    (re.compile(_LAYER + r"mlp\.up_proj\.weight"), "layers.{0}.mlp.up_proj.kernel", _T),
    (re.compile(_LAYER + r"mlp\.down_proj\.weight"), "layers.{0}.mlp.down_proj.kernel", _T),
]

# Buffers that are not parameters (old checkpoints store RoPE's inv_freq).
_IGNORED = re.compile(_LAYER + r"self_attn\.rotary_emb\.inv_freq|model\.rotary_emb\.inv_freq")


def is_ignored(cfg: ModelConfig, hf_key: str) -> bool:
    """True for HF keys with no parameter of ours: RoPE buffers, and lm_head.weight when tied
    (tied checkpoints sometimes store it as a copy of the embedding)."""
    if _IGNORED.fullmatch(hf_key):
        return True
    return cfg.tie_word_embeddings and hf_key == "lm_head.weight"


def hf_to_param(cfg: ModelConfig, hf_key: str, tensor: np.ndarray) -> tuple[str, np.ndarray] | None:
    """One HF tensor (torch layout) -> (our path, array in our layout); None for ignored keys
    (see is_ignored). Raises ValueError naming the key for unknown keys and wrong shapes."""
    if is_ignored(cfg, hf_key):
        return None
    shapes = _shapes(cfg)
    for pattern, template, transform in _TABLE:
        m = pattern.fullmatch(hf_key)
        if m is None:
            continue
        path = template.format(*m.groups())
        if path not in shapes:
            raise ValueError(f"HF key {hf_key!r} maps to {path!r}, which this model does not have "
                             f"(num_layers={cfg.num_layers}, attention_bias={cfg.attention_bias}, "
                             f"tie_word_embeddings={cfg.tie_word_embeddings}); wrong config?")
        expected = shapes[path]
        tensor = np.asarray(tensor)
        if tensor.size != int(np.prod(expected)):
            raise ValueError(f"HF key {hf_key!r}: got shape {tuple(tensor.shape)}, which does not "
                             f"fit our {path!r} of shape {expected}; does the config match the "
                             f"checkpoint?")
        out = np.ascontiguousarray(transform(cfg, tensor))
        if tuple(out.shape) != expected:
            raise ValueError(f"HF key {hf_key!r}: got shape {tuple(tensor.shape)}, which gives "
                             f"{tuple(out.shape)} for {path!r}; expected {expected}")
        return path, out
    raise ValueError(f"unknown HF key {hf_key!r}: not a parameter of a {cfg.model_type} model "
                     f"that jax_tokenweave knows")


def check_complete(cfg: ModelConfig, paths) -> None:
    """Raise ValueError naming missing and unexpected paths (after converting a whole checkpoint)."""
    expected, got = set(param_shapes(cfg)), set(paths)
    missing, unexpected = sorted(expected - got), sorted(got - expected)
    if missing or unexpected:
        raise ValueError(f"parameter set does not match the model: missing {missing[:8]}"
                         f"{'...' if len(missing) > 8 else ''} ({len(missing)}), unexpected "
                         f"{unexpected[:8]} ({len(unexpected)})")


def _parse_path(path: str) -> tuple:
    return tuple(int(p) if p.isdigit() else p for p in path.split("."))


def flat_to_state(model_or_graphdef: Any, flat: dict[str, Any]) -> nnx.State:
    """Our flat dict (path -> array) -> an nnx.State for ``nnx.merge(graphdef, state)`` /
    ``nnx.update(model, state)``. Given a module, keys and shapes are checked against it."""
    if isinstance(model_or_graphdef, nnx.Module):
        _, ref = nnx.split(model_or_graphdef)
        ref_flat = {path_str(p): v for p, v in nnx.to_flat_state(ref)}
        missing, unexpected = sorted(set(ref_flat) - set(flat)), sorted(set(flat) - set(ref_flat))
        if missing or unexpected:
            raise ValueError(f"flat_to_state: missing {missing}, unexpected {unexpected}")
        for k, v in flat.items():
            if tuple(v.shape) != tuple(ref_flat[k].shape):
                raise ValueError(f"flat_to_state: {k!r} has shape {tuple(v.shape)}, the model "
                                 f"expects {tuple(ref_flat[k].shape)}")
    return nnx.from_flat_state({_parse_path(k): v for k, v in flat.items()})


def state_to_flat(state_or_model: Any) -> dict[str, Any]:
    """An nnx.State (or a module) -> our flat dict path -> array."""
    state = state_or_model
    if isinstance(state_or_model, nnx.Module):
        _, state = nnx.split(state_or_model)
    out = {}
    for p, v in nnx.to_flat_state(state):
        out[path_str(p)] = v.get_value() if isinstance(v, nnx.Variable) else v
    return out
