"""Latent Qwen2.5-VL on transformers: loading, batched latent decoding, the training forward."""

from monet.model.config import MonetConfig
from monet.model.decoding import generate
from monet.model.latent_hooks import LatentAblation
from monet.model.loading import MonetQwen2_5_VL, add_monet_tokens, load_model
from monet.model.outputs import LatentGeneration
from monet.model.requests import LatentRequest
from monet.model.sampling import SamplingParams

__all__ = [
    "LatentAblation",
    "LatentGeneration",
    "LatentRequest",
    "MonetConfig",
    "MonetQwen2_5_VL",
    "SamplingParams",
    "add_monet_tokens",
    "generate",
    "load_model",
]
