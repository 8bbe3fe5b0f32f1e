"""Model definitions (Llama family, Mixtral). Installed as ``jax_tokenweave.models``.

config.py (configs and presets), params.py / llama.py / mixtral.py (NNX parameter containers:
shapes, logical axes, checkpoint paths), layers.py (the layer math, once), moe.py (Mixtral's
expert FFN math), transformer.py (the scanned decoder), hf_keys.py (Hugging Face key maps)."""
from jax_tokenweave.models.config import ModelConfig, RopeScaling, PRESETS, from_hf_config, get_preset
from jax_tokenweave.models.llama import Llama

__all__ = ["ModelConfig", "RopeScaling", "PRESETS", "from_hf_config", "get_preset", "Llama"]
