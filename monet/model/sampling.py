"""Token sampling for the HF latent decoder (greedy, temperature, top-k, top-p)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    """``temperature=0`` is greedy. ``top_k=0`` and ``top_p=1`` disable those filters."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    logit_bias: dict[int, float] | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


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
