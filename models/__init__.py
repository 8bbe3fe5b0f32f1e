"""Flax model definitions (Llama family). Installed as ``jax_tokenweave.models``."""
from jax_tokenweave.models.config import ModelConfig, RopeScaling, PRESETS, from_hf_config, get_preset
from jax_tokenweave.models.llama import Llama, TPContext

__all__ = ["ModelConfig", "RopeScaling", "PRESETS", "from_hf_config", "get_preset", "Llama", "TPContext"]
