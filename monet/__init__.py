"""Monet: latent visual reasoning for Qwen2.5-VL (training and fast serving)."""

from __future__ import annotations

__version__ = "0.1.0"

from monet.tokens import LATENT_END, LATENT_PAD, LATENT_START, MONET_TOKENS, LatentTokenIds


def build_info() -> dict:
    """What this installation has: version, torch version, whether monet._C is built with CUDA.

    Returns a plain dict so it prints well: ``python -c "import monet; print(monet.build_info())"``.
    """
    from monet.ops import native

    return native.build_info()


__all__ = [
    "__version__",
    "build_info",
    "LatentTokenIds",
    "MONET_TOKENS",
    "LATENT_START",
    "LATENT_END",
    "LATENT_PAD",
]
