"""vLLM serving of latent decoding (docs/design.md, section 6): ``LatentLLM`` and the ``serve`` command.

Importing this package does not import vLLM; :class:`LatentLLM` does. Pieces: a general plugin
(:mod:`monet.vllm.plugin`), a worker (:mod:`monet.vllm.worker`, selected with ``worker_cls``) whose
V1 model runner (:mod:`monet.vllm.runner`) keeps the per-request latent state on the device
(:mod:`monet.vllm.state`), settings passed through ``additional_config`` / ``SamplingParams.extra_args``
(:mod:`monet.vllm.settings`).
"""

from __future__ import annotations

_LAZY = {
    "LatentLLM": "monet.vllm.llm",
    "engine_kwargs": "monet.vllm.llm",
    "EngineSettings": "monet.vllm.settings",
    "RequestSettings": "monet.vllm.settings",
    "parse_request_settings": "monet.vllm.settings",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'monet.vllm' has no attribute {name!r}")


__all__ = list(_LAZY)
