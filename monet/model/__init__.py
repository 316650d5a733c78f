"""Latent Qwen2.5-VL on transformers: loading, batched latent decoding, the training forward."""

from monet.model.config import MonetConfig
from monet.model.decoding import DecodeStats, generate
from monet.model.loading import MonetQwen2_5_VL, add_monet_tokens, load_model
from monet.model.outputs import LatentGeneration
from monet.model.requests import LatentRequest

__all__ = [
    "DecodeStats",
    "LatentGeneration",
    "LatentRequest",
    "MonetConfig",
    "MonetQwen2_5_VL",
    "add_monet_tokens",
    "generate",
    "load_model",
]
