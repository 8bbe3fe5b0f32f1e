"""Hugging Face checkpoint keys <-> our parameter paths, one tensor at a time (so conversion can
stream). HF stores torch Linear weights as [out, in]; ours are [in, out] with heads split out.

Mixtral checkpoints store each expert's weights as its own tensor
(``model.layers.{i}.block_sparse_moe.experts.{e}.w1.weight``), while our experts are stacked
(``layers.{i}.mlp.experts.w1`` [E, D, F]). Such a key maps to a *slot*: our path plus the index on
the stacked axis (``hf_to_slice``). ``ParamAssembler`` collects the slices of a stacked parameter
and hands out the whole parameter as soon as its last expert arrives, so a converter still sees
one whole parameter at a time (memory: one stacked parameter per stack in flight)."""
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
    # Mixtral router: torch [E, D] -> ours [D, E]
    (re.compile(_LAYER + r"block_sparse_moe\.gate\.weight"), "layers.{0}.mlp.gate.kernel", _T),
]

# Per-expert tensors -> one slice [e] of a stacked parameter: (HF key regex with groups (layer,
# expert), our path template, transform of the one expert's tensor into its slice).
_STACKED: list[tuple[re.Pattern, str, Callable[[ModelConfig, np.ndarray], np.ndarray]]] = [
    # w1 (gate) / w3 (up): torch [F, D] -> [D, F];  w2 (down): torch [D, F] -> [F, D]
    (re.compile(_LAYER + r"block_sparse_moe\.experts\.(\d+)\.w([123])\.weight"),
     "layers.{0}.mlp.experts.w{2}", _T),
]
_STACKED_PATH = re.compile(r"layers\.(\d+)\.mlp\.experts\.w([123])")

# Buffers that are not parameters (old checkpoints store RoPE's inv_freq).
_IGNORED = re.compile(_LAYER + r"self_attn\.rotary_emb\.inv_freq|model\.rotary_emb\.inv_freq")


def is_ignored(cfg: ModelConfig, hf_key: str) -> bool:
    """True for HF keys with no parameter of ours: RoPE buffers, and lm_head.weight when tied
    (tied checkpoints sometimes store it as a copy of the embedding)."""
    if _IGNORED.fullmatch(hf_key):
        return True
    return cfg.tie_word_embeddings and hf_key == "lm_head.weight"


def stacked_slot(cfg: ModelConfig, hf_key: str, shape) -> tuple[str, int] | None:
    """(our stacked path, index) for a per-expert HF key, checked against `shape` without reading
    data; None for keys that are not per-expert. Raises ValueError for slots the model lacks and
    for wrong shapes."""
    for pattern, template, transform in _STACKED:
        m = pattern.fullmatch(hf_key)
        if m is None:
            continue
        layer, expert, which = m.groups()
        path, index = template.format(layer, expert, which), int(expert)
        shapes = _shapes(cfg)
        if path not in shapes or index >= shapes[path][0]:
            raise ValueError(f"HF key {hf_key!r} maps to expert {index} of {path!r}, which this "
                             f"model does not have (num_layers={cfg.num_layers}, "
                             f"num_experts={cfg.num_experts}); wrong config?")
        want = shapes[path][1:]
        shape = tuple(shape)
        got = tuple(transform(cfg, np.empty(shape, np.bool_)).shape) if len(shape) == 2 else None
        if got != want:
            raise ValueError(f"HF key {hf_key!r}: got shape {shape}, which does not give one "
                             f"expert's slice {want} of {path!r}; does the config match the "
                             f"checkpoint?")
        return path, index
    return None


def expected_slots(cfg: ModelConfig) -> set:
    """What a complete checkpoint provides: our path for whole parameters, (path, index) for each
    expert of a stacked parameter."""
    out: set = set()
    for path, shape in _shapes(cfg).items():
        if _STACKED_PATH.fullmatch(path):
            out.update((path, e) for e in range(shape[0]))
        else:
            out.add(path)
    return out


def slot_hf_name(slot) -> str | None:
    """The HF key that feeds a (path, index) slot of a stacked parameter, else None."""
    if isinstance(slot, tuple):
        m = _STACKED_PATH.fullmatch(slot[0])
        if m:
            return f"model.layers.{m.group(1)}.block_sparse_moe.experts.{slot[1]}.w{m.group(2)}.weight"
    return None


def hf_to_slice(cfg: ModelConfig, hf_key: str, tensor: np.ndarray
                ) -> tuple[str, int | None, np.ndarray] | None:
    """One HF tensor -> (our path, index, array): index None for a whole parameter, else the
    position of this slice on the stacked (experts) axis. None for ignored keys."""
    slot = stacked_slot(cfg, hf_key, np.shape(tensor))
    if slot is not None:
        _, transform = next((t, f) for p, t, f in _STACKED if p.fullmatch(hf_key))
        return slot[0], slot[1], np.ascontiguousarray(transform(cfg, np.asarray(tensor)))
    out = hf_to_param(cfg, hf_key, tensor)
    return None if out is None else (out[0], None, out[1])


class ParamAssembler:
    """Turns a stream of HF tensors into whole parameters: ``add`` returns (path, array) for a
    whole parameter, or for a stacked one once all its slices have arrived, else None."""

    def __init__(self, cfg: ModelConfig):
        self.cfg = cfg
        self._partial: dict[str, tuple[np.ndarray, set[int]]] = {}

    def add(self, hf_key: str, tensor: np.ndarray) -> tuple[str, np.ndarray] | None:
        res = hf_to_slice(self.cfg, hf_key, tensor)
        if res is None:
            return None
        path, index, arr = res
        if index is None:
            return path, arr
        shape = _shapes(self.cfg)[path]
        buf, seen = self._partial.setdefault(path, (np.empty(shape, arr.dtype), set()))
        if index in seen:
            raise ValueError(f"HF key {hf_key!r}: expert {index} of {path!r} was given twice")
        buf[index] = arr
        seen.add(index)
        if len(seen) < shape[0]:
            return None
        del self._partial[path]
        return path, buf

    def check_done(self) -> None:
        """Raise ValueError naming the experts still missing from incomplete stacked parameters."""
        if self._partial:
            missing = {p: sorted(set(range(b.shape[0])) - s) for p, (b, s) in self._partial.items()}
            raise ValueError(f"incomplete stacked parameters, missing experts: {missing}")


def match_key(hf_key: str):
    """(our path, layout transform) for an HF key of the key table, or None. No shape checks:
    the checkpoint planner uses this to map keys without reading any tensor data."""
    for pattern, template, transform in _TABLE:
        m = pattern.fullmatch(hf_key)
        if m is not None:
            return template.format(*m.groups()), transform
    return None


def hf_to_param(cfg: ModelConfig, hf_key: str, tensor: np.ndarray) -> tuple[str, np.ndarray] | None:
    """One HF tensor (torch layout) -> (our path, array in our layout); None for ignored keys
    (see is_ignored). Raises ValueError naming the key for unknown keys and wrong shapes.
    Per-expert Mixtral tensors are slices, not parameters: use hf_to_slice / ParamAssembler."""
    if is_ignored(cfg, hf_key):
        return None
    if any(p.fullmatch(hf_key) for p, _, _ in _STACKED):
        raise ValueError(f"HF key {hf_key!r} is one expert's slice of a stacked parameter; convert "
                         f"it with hf_to_slice or ParamAssembler")
    shapes = _shapes(cfg)
    matched = match_key(hf_key)
    if matched is None:
        raise ValueError(f"unknown HF key {hf_key!r}: not a parameter of a {cfg.model_type} model "
                         f"that jax_tokenweave knows")
    path, transform = matched
    if path not in shapes:
        raise ValueError(f"HF key {hf_key!r} maps to {path!r}, which this model does not have "
                         f"(model_type={cfg.model_type}, num_layers={cfg.num_layers}, "
                         f"attention_bias={cfg.attention_bias}, "
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
