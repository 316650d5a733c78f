"""Sampling settings shared by both engines, and token sampling for the HF latent decoder.

:class:`SamplingParams` is the one definition of the sampling settings: :func:`monet.generate`
and :meth:`monet.vllm.LatentLLM.generate` take one (``sampling=``) and/or its fields as keyword
arguments (:func:`resolve_sampling`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping

import torch


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclass(frozen=True)
class SamplingParams:
    """``temperature=0`` is greedy. ``top_k=0`` and ``top_p=1`` disable those filters.

    ``max_new_tokens`` is an upper bound: both engines stop earlier at the model's context length
    (prompt + generated tokens <= the model's maximum positions) and say so. ``logit_bias`` adds to
    the logits of the given token ids before sampling (e.g. on START to trigger spans)."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    logit_bias: Mapping[int, float] | None = None

    def __post_init__(self) -> None:
        if not _is_int(self.max_new_tokens):
            raise TypeError(f"max_new_tokens must be an int >= 1, got {self.max_new_tokens!r}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        for name in ("temperature", "top_p"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"{name} must be a finite number, got {v!r}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise ValueError(f"top_k must be an int >= 0, got {self.top_k!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.seed is not None and not _is_int(self.seed):
            raise TypeError(f"seed must be an int or None, got {self.seed!r}")
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, Mapping):
                raise TypeError(f"logit_bias must be a dict {{token_id: bias}}, got {type(self.logit_bias).__name__}")
            for t, v in self.logit_bias.items():
                if not _is_int(t) or isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                    raise ValueError(f"logit_bias entries must be int token id -> finite number, got {t!r}: {v!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


SAMPLING_FIELDS = tuple(f.name for f in dataclasses.fields(SamplingParams))


def resolve_sampling(sampling: SamplingParams | None = None, **overrides: Any) -> SamplingParams:
    """``sampling`` (or the defaults) with keyword overrides applied; unknown keywords are an error."""
    if sampling is not None and not isinstance(sampling, SamplingParams):
        raise TypeError(f"sampling must be a monet SamplingParams, got {type(sampling).__name__}")
    unknown = sorted(set(overrides) - set(SAMPLING_FIELDS))
    if unknown:
        raise TypeError(f"unknown sampling arguments {unknown}; valid: {list(SAMPLING_FIELDS)}")
    return dataclasses.replace(sampling or SamplingParams(), **overrides)


def logit_bias_vector(params: SamplingParams, vocab_size: int, device: torch.device) -> torch.Tensor | None:
    """The logit bias as a dense [V] float32 vector (built once per generate call), or None."""
    if not params.logit_bias:
        return None
    bad = [t for t in params.logit_bias if not 0 <= int(t) < vocab_size]
    if bad:
        raise ValueError(f"logit_bias token ids must lie in [0, {vocab_size}), got {bad}")
    bias = torch.zeros(vocab_size, dtype=torch.float32)
    for t, v in params.logit_bias.items():
        bias[int(t)] += float(v)
    return bias.to(device)


def sample_tokens(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
    """logits [B, V] (float32) -> token ids [B] int64; ``bias`` from :func:`logit_bias_vector`."""
    if bias is not None:
        logits = logits + bias
    if params.greedy:
        return logits.argmax(dim=-1)
    logits = logits.float() / params.temperature
    if params.top_k:
        k = min(params.top_k, logits.shape[-1])
        kth = logits.topk(k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > params.top_p  # keep the smallest prefix reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
