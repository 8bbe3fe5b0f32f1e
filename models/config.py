"""Model configuration for the Llama family (Llama 3, Qwen2, SmolLM2) and Mixtral: one frozen
dataclass, a loader for Hugging Face ``config.json`` files and a few presets."""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "mixtral")
SUPPORTED_ROPE_TYPES = ("default", "llama3")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama-3 frequency-dependent RoPE scaling (HF ``rope_type: "llama3"``)."""
    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int
    rope_type: str = "llama3"


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    max_position_embeddings: int = 4096
    model_type: str = "llama"
    # Mixture of experts (Mixtral): experts per layer and experts each token is routed to; 0 for
    # dense models. intermediate_size is then each expert's FFN width.
    num_experts: int = 0
    num_experts_per_tok: int = 0

    def __post_init__(self):
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"model_type {self.model_type!r} is not supported; supported: "
                             f"{SUPPORTED_MODEL_TYPES}")
        if self.model_type == "mixtral":
            if not 1 <= self.num_experts_per_tok <= self.num_experts:
                raise ValueError(f"a mixtral config needs 1 <= num_experts_per_tok "
                                 f"({self.num_experts_per_tok}) <= num_experts ({self.num_experts})")
        elif self.num_experts or self.num_experts_per_tok:
            raise ValueError(f"num_experts / num_experts_per_tok are for model_type 'mixtral'; "
                             f"a {self.model_type} model is dense (set both to 0)")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"ModelConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                             f"({self.num_kv_heads}) for grouped-query attention")
        if self.head_dim % 2:
            raise ValueError(f"head_dim ({self.head_dim}) must be even for rotary embeddings")

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)

    def check_tp(self, tp: int) -> None:
        """Raise a ValueError naming the numbers and the fix when this model cannot be split `tp` ways."""
        def bad(what, n):
            ok = [d for d in range(1, n + 1) if n % d == 0]
            return ValueError(f"{what} ({n}) is not divisible by tp={tp}; pick tp from "
                              f"{[d for d in ok if d <= 64]} or change the mesh")
        if tp < 1:
            raise ValueError(f"tp must be >= 1, got {tp}")
        if self.num_heads % tp:
            raise bad("num_heads", self.num_heads)
        if tp <= self.num_kv_heads:
            if self.num_kv_heads % tp:
                raise bad("num_kv_heads", self.num_kv_heads)
        elif tp % self.num_kv_heads:
            # Each rank must map to exactly one KV head when KV heads are replicated.
            raise ValueError(f"tp={tp} exceeds num_kv_heads ({self.num_kv_heads}), so KV heads are "
                             f"replicated, which needs tp to be a multiple of num_kv_heads; pick tp "
                             f"from the divisors or multiples of {self.num_kv_heads}")
        if self.intermediate_size % tp:
            raise bad("intermediate_size", self.intermediate_size)
        if self.vocab_size % tp:
            raise ValueError(f"vocab_size ({self.vocab_size}) is not divisible by tp={tp}; the "
                             f"vocab-parallel embedding needs equal shards: pad the vocabulary to a "
                             f"multiple of {tp} or pick another tp")


def _rope_from_hf(d: dict[str, Any]) -> tuple[float, RopeScaling | None]:
    # transformers 5 writes `rope_parameters` (with rope_theta inside); 4.x wrote `rope_scaling`.
    params = d.get("rope_parameters") or d.get("rope_scaling") or {}
    theta = float(params.get("rope_theta", d.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"rope type {rope_type!r} is not supported; supported: {SUPPORTED_ROPE_TYPES}")
    if rope_type == "default":
        return theta, None
    try:
        return theta, RopeScaling(
            factor=float(params["factor"]), low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]),
            original_max_position_embeddings=int(params["original_max_position_embeddings"]))
    except KeyError as e:
        raise ValueError(f"llama3 rope scaling is missing {e.args[0]!r}: {params}") from None


def from_hf_config(path_or_dict: str | os.PathLike | dict) -> ModelConfig:
    """A ModelConfig from a Hugging Face ``config.json`` (a path to the file or its folder, or the dict)."""
    if isinstance(path_or_dict, dict):
        d = path_or_dict
    else:
        path = os.fspath(path_or_dict)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        with open(path) as f:
            d = json.load(f)
    model_type = d.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"config.json has model_type {model_type!r}; jax_tokenweave supports "
                         f"{SUPPORTED_MODEL_TYPES} (Llama 3, Qwen2, SmolLM2, Mixtral)")
    if d.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act {d['hidden_act']!r} is not supported; only 'silu' (SwiGLU)")
    if d.get("use_sliding_window", False):
        raise ValueError("use_sliding_window=true is not supported; only full attention")
    if d.get("mlp_bias", False):
        raise ValueError("mlp_bias=true is not supported")
    moe = {}
    if model_type == "mixtral":
        if d.get("sliding_window") is not None:
            raise ValueError(f"sliding_window={d['sliding_window']} is not supported; only full "
                             f"attention (Mixtral-8x22B and 8x7B-v0.1 have sliding_window null)")
        moe = dict(num_experts=int(d.get("num_local_experts", 8)),
                   num_experts_per_tok=int(d.get("num_experts_per_tok", 2)))
    theta, scaling = _rope_from_hf(d)
    heads = int(d["num_attention_heads"])
    head_dim = d.get("head_dim") or d["hidden_size"] // heads
    return ModelConfig(
        vocab_size=int(d["vocab_size"]), hidden_size=int(d["hidden_size"]),
        intermediate_size=int(d["intermediate_size"]), num_layers=int(d["num_hidden_layers"]),
        num_heads=heads, num_kv_heads=int(d.get("num_key_value_heads") or heads),
        head_dim=int(head_dim), rope_theta=theta, rope_scaling=scaling,
        rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        # Qwen2 always has q/k/v bias and its config has no attention_bias key.
        attention_bias=bool(d.get("attention_bias", model_type == "qwen2")),
        max_position_embeddings=int(d.get("max_position_embeddings", 4096)), model_type=model_type,
        **moe)


_LLAMA3_ROPE = RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                           original_max_position_embeddings=8192)

PRESETS: dict[str, ModelConfig] = {
    # meta-llama/Llama-3.1-8B-Instruct config.json
    "llama-3.1-8b": ModelConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
        num_kv_heads=8, head_dim=128, rope_theta=500000.0, rope_scaling=_LLAMA3_ROPE,
        rms_norm_eps=1e-5, tie_word_embeddings=False, attention_bias=False,
        max_position_embeddings=131072, model_type="llama"),
    # meta-llama/Llama-3.3-70B-Instruct config.json
    "llama-3.3-70b": ModelConfig(
        vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_layers=80, num_heads=64,
        num_kv_heads=8, head_dim=128, rope_theta=500000.0, rope_scaling=_LLAMA3_ROPE,
        rms_norm_eps=1e-5, tie_word_embeddings=False, attention_bias=False,
        max_position_embeddings=131072, model_type="llama"),
    # Qwen/Qwen2.5-72B-Instruct config.json
    "qwen2.5-72b": ModelConfig(
        vocab_size=152064, hidden_size=8192, intermediate_size=29568, num_layers=80, num_heads=64,
        num_kv_heads=8, head_dim=128, rope_theta=1000000.0, rms_norm_eps=1e-6,
        tie_word_embeddings=False, attention_bias=True, max_position_embeddings=32768,
        model_type="qwen2"),
    # HuggingFaceTB/SmolLM2-135M config.json (9 heads / 3 KV heads: runs at tp 1, 3 or 9)
    "smollm2-135m": ModelConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
        num_kv_heads=3, head_dim=64, rope_theta=100000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=True, attention_bias=False, max_position_embeddings=8192,
        model_type="llama"),
    # Test shapes: 8 heads so tp=8 works, 2 KV heads so tp 4 and 8 replicate them.
    "tiny-llama": ModelConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=8,
        num_kv_heads=2, head_dim=16, rope_theta=500000.0,
        rope_scaling=RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                 original_max_position_embeddings=32),
        rms_norm_eps=1e-5, tie_word_embeddings=False, attention_bias=False,
        max_position_embeddings=256, model_type="llama"),
    "tiny-qwen2": ModelConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=8,
        num_kv_heads=2, head_dim=16, rope_theta=1000000.0, rms_norm_eps=1e-6,
        tie_word_embeddings=True, attention_bias=True, max_position_embeddings=256,
        model_type="qwen2"),
    # mistralai/Mixtral-8x22B-Instruct-v0.1 config.json (the base v0.1 has vocab_size 32000)
    "mixtral-8x22b": ModelConfig(
        vocab_size=32768, hidden_size=6144, intermediate_size=16384, num_layers=56, num_heads=48,
        num_kv_heads=8, head_dim=128, rope_theta=1000000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=False, attention_bias=False, max_position_embeddings=65536,
        model_type="mixtral", num_experts=8, num_experts_per_tok=2),
    # Test shapes: 8 experts, top-2; expert width 64 splits 8 ways.
    "tiny-mixtral": ModelConfig(
        vocab_size=256, hidden_size=64, intermediate_size=64, num_layers=2, num_heads=8,
        num_kv_heads=2, head_dim=16, rope_theta=1000000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=False, attention_bias=False, max_position_embeddings=256,
        model_type="mixtral", num_experts=8, num_experts_per_tok=2),
}


def get_preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; available: {sorted(PRESETS)}") from None


def to_hf_dict(cfg: ModelConfig) -> dict[str, Any]:
    """The HF config.json fields for `cfg` (used to build matching transformers models in tests)."""
    d: dict[str, Any] = dict(
        model_type=cfg.model_type, vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim, rms_norm_eps=cfg.rms_norm_eps,
        tie_word_embeddings=cfg.tie_word_embeddings,
        max_position_embeddings=cfg.max_position_embeddings, hidden_act="silu")
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling is not None:
        rope.update(dataclasses.asdict(cfg.rope_scaling))
    d["rope_parameters"] = rope
    if cfg.model_type == "llama":
        d["attention_bias"] = cfg.attention_bias
    if cfg.model_type == "mixtral":
        d.update(num_local_experts=cfg.num_experts, num_experts_per_tok=cfg.num_experts_per_tok,
                 sliding_window=None)
    return d
