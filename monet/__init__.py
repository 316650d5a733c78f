"""Monet: latent visual reasoning for Qwen2.5-VL (training and fast serving)."""

from __future__ import annotations

__version__ = "0.1.0"

from monet.layout import SpanLayout
from monet.tokens import LATENT_END, LATENT_PAD, LATENT_START, MONET_TOKENS, LatentTokenIds


def build_info() -> dict:
    """What this installation has: version, torch version, whether monet._C is built with CUDA.

    Returns a plain dict so it prints well: ``python -c "import monet; print(monet.build_info())"``.
    """
    from monet.ops import native

    return native.build_info()


_LAZY = {  # heavy (transformers) imports happen on first use, so `import monet` stays fast
    "load_model": "monet.model",
    "generate": "monet.model",
    "LatentRequest": "monet.model",
    "LatentGeneration": "monet.model",
    "MonetConfig": "monet.model",
    "SamplingParams": "monet.model",
    "LatentAblation": "monet.model",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'monet' has no attribute {name!r}")


__all__ = [
    "__version__",
    "build_info",
    "load_model",
    "generate",
    "LatentRequest",
    "LatentGeneration",
    "MonetConfig",
    "SamplingParams",
    "LatentAblation",
    "SpanLayout",
    "LatentTokenIds",
    "MONET_TOKENS",
    "LATENT_START",
    "LATENT_END",
    "LATENT_PAD",
]
