"""Offline test fixtures: tiny random Qwen2.5-VL checkpoints, their tokenizer, synthetic images.

Nothing here downloads anything: config, tokenizer (byte-level BPE trained in code), processor and
random weights are all built locally, deterministically from a seed.
"""

from __future__ import annotations

from monet.testing.tiny_model import (
    FACTORY_VERSION,
    MARKER_FILE,
    PRESETS,
    TinyPreset,
    build_config,
    build_processor,
    build_tiny_checkpoint,
    count_parameters,
    default_cache_dir,
    get_preset,
    init_weights_,
    synthetic_image,
)
from monet.testing.tokenizer import (
    CHAT_TEMPLATE,
    QWEN_ADDED_TOKENS,
    build_tokenizer,
    training_corpus,
)

__all__ = [
    "CHAT_TEMPLATE",
    "FACTORY_VERSION",
    "MARKER_FILE",
    "PRESETS",
    "QWEN_ADDED_TOKENS",
    "TinyPreset",
    "build_config",
    "build_processor",
    "build_tiny_checkpoint",
    "build_tokenizer",
    "count_parameters",
    "default_cache_dir",
    "get_preset",
    "init_weights_",
    "synthetic_image",
    "training_corpus",
]
