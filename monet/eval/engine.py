"""The decoding engines ``monet eval`` drives, behind one small interface.

Both adapters take the same requests (Qwen chat messages) and return the same
:class:`~monet.model.outputs.LatentGeneration` objects; only how the model runs differs:

* :class:`HFEvalEngine` — :func:`monet.generate` on a model loaded with :func:`monet.load_model`
  (any device; also provides the model for the "where the latent looks" heatmaps);
* :class:`VllmEvalEngine` — :class:`monet.vllm.LatentLLM` (one engine for every latent size: K and
  the layout are per request). The sampling seed goes to the engine, not to each request.

:func:`default_engine` picks vLLM when it is importable, else HF.
"""

from __future__ import annotations

import importlib.util
from typing import Any, Sequence

from monet.layout import SpanLayout
from monet.model.latent_hooks import LatentAblation
from monet.model.outputs import LatentGeneration
from monet.model.sampling import SamplingParams

ENGINES = ("vllm", "hf")


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def default_engine() -> str:
    """``"vllm"`` when vLLM is importable, else ``"hf"``."""
    return "vllm" if vllm_available() else "hf"


class HFEvalEngine:
    """:func:`monet.generate` on a model loaded once (``device``: ``"auto"`` = CUDA if present)."""

    name = "hf"

    def __init__(self, model_dir: str, *, dtype: str = "auto", device: str = "auto", model: Any = None,
                 processor: Any = None):
        import torch

        import monet

        if model is None:
            if device == "auto":
                device = "cuda" if torch.cuda.is_available() else "cpu"
            model, processor = monet.load_model(model_dir, dtype=dtype, device=device)
        self.model, self.processor = model, processor

    @property
    def default_layout(self) -> SpanLayout | None:
        cfg = getattr(self.model, "monet_config", None)
        return cfg.span_layout if cfg is not None else None

    def hidden_size(self) -> int:
        return int(self.model.get_input_embeddings().weight.shape[1])

    def generate(self, requests: Sequence[dict], sampling: SamplingParams, *, layout: SpanLayout,
                 return_latents: bool,
                 ablations: Sequence[LatentAblation | None] | None = None) -> list[LatentGeneration]:
        from monet.model.decoding import generate

        return generate(self.model, self.processor, list(requests), sampling, layout=layout,
                        return_latents=return_latents, ablations=ablations)

    def close(self) -> None:
        pass


class VllmEvalEngine:
    """A :class:`~monet.vllm.LatentLLM` sized for evaluation: room for ``max_images`` images per
    prompt and for as many latents per request as there can be new tokens."""

    name = "vllm"

    def __init__(self, model_dir: str, *, dtype: str = "auto", max_images: int = 1, max_new_tokens: int = 512,
                 seed: int | None = None, engine_kwargs: dict | None = None):
        from vllm.platforms import current_platform

        from monet.vllm.llm import LatentLLM
        from monet.vllm.settings import DEFAULT_MAX_LATENTS

        kw: dict[str, Any] = {"dtype": dtype, "limit_mm_per_prompt": {"image": max(1, max_images)}}
        if current_platform.is_cpu():
            kw.update(kv_cache_memory_bytes=1 << 30, enforce_eager=True)
        if seed is not None:
            kw["seed"] = seed
        kw.update(engine_kwargs or {})
        self.llm = LatentLLM(model_dir, max_latents_per_request=max(DEFAULT_MAX_LATENTS, max_new_tokens), **kw)
        self.processor = self.llm.processor

    @property
    def default_layout(self) -> SpanLayout | None:
        return self.llm.layout

    def hidden_size(self) -> int:
        cfg = self.llm.llm.llm_engine.model_config.hf_text_config
        return int(cfg.hidden_size)

    def generate(self, requests: Sequence[dict], sampling: SamplingParams, *, layout: SpanLayout,
                 return_latents: bool,
                 ablations: Sequence[LatentAblation | None] | None = None) -> list[LatentGeneration]:
        import dataclasses

        # per-request seeds are not used with vLLM: the engine seed (set at start-up) drives sampling
        params = dataclasses.replace(sampling, seed=None)
        return self.llm.generate(list(requests), params, latent_size=layout.latent_size, layout=layout.kind,
                                 return_latents=return_latents, ablations=ablations)

    def close(self) -> None:
        self.llm.shutdown()


def make_engine(name: str, model_dir: str, *, dtype: str = "auto", device: str = "auto", max_images: int = 1,
                max_new_tokens: int = 512, seed: int | None = None):
    """The engine ``name`` (``"vllm"``, ``"hf"`` or ``"auto"``) for ``model_dir``."""
    if name == "auto":
        name = default_engine()
    if name not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES} or 'auto', got {name!r}")
    if name == "vllm":
        if not vllm_available():
            raise ValueError("--engine vllm: vllm is not installed in this environment (use --engine hf)")
        return VllmEvalEngine(model_dir, dtype=dtype, max_images=max_images, max_new_tokens=max_new_tokens, seed=seed)
    return HFEvalEngine(model_dir, dtype=dtype, device=device)
