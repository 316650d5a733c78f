"""Latent substitution for ablations: replace each latent input before it is fed.

An ablation asks whether a model *uses* its latents: re-run the same requests with every latent
vector replaced and see whether the answers move. :class:`LatentAblation` is one request's
replacement rule; both engines apply it at the moment a latent becomes the next input (the HF
decoder through :class:`LatentOverride`, the vLLM runner through the per-request settings), so the
replaced vector is what the model sees *and* what is reported as the request's latent.

Modes (``z`` is the latent the model produced, ``j`` its index within the request):

* ``"zeros"``: ``0``;
* ``"start"``: the START token's input embedding;
* ``"noise"``: Gaussian noise rescaled to ``||z||`` (seeded per request: ``seed``);
* ``"replace"``: ``vectors[j]`` (e.g. another sample's latent at the same index); ``0`` once
  ``j >= len(vectors)``;
* ``"perturb"``: ``z + scale * eps`` with ``eps ~ N(0, I)`` (seeded per request: ``seed``) — the
  exploration noise of VLPO rollouts; the perturbed vector is the recorded action.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

MODES = ("zeros", "start", "noise", "replace", "perturb")


@dataclass(frozen=True)
class LatentAblation:
    mode: str
    vectors: torch.Tensor | None = None  # [n, D] for mode "replace"
    seed: int = 0
    scale: float = 0.0  # for mode "perturb"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"latent ablation mode must be one of {MODES}, got {self.mode!r}")
        if not (self.scale >= 0 and self.scale < float("inf")):
            raise ValueError(f"latent ablation scale must be a finite number >= 0, got {self.scale!r}")
        if (self.scale > 0) != (self.mode == "perturb" and self.scale > 0):
            raise ValueError("latent ablation: scale is only used by mode 'perturb'")
        if (self.mode == "replace") != (self.vectors is not None):
            raise ValueError("latent ablation: vectors are required for mode 'replace' and only for it")
        if self.vectors is not None and (self.vectors.ndim != 2):
            raise ValueError(f"latent ablation vectors must be [n, D], got shape {tuple(self.vectors.shape)}")


def ablated_latent(ab: LatentAblation, z: torch.Tensor, index: int, start_embedding: torch.Tensor,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """The vector fed instead of latent ``z`` ([D]) at latent index ``index`` of one request."""
    if ab.mode == "zeros":
        return torch.zeros_like(z)
    if ab.mode == "start":
        return start_embedding.to(z.dtype)
    if ab.mode in ("noise", "perturb"):
        if generator is None:  # never the global RNG: results must not depend on unrelated draws
            raise ValueError(f"latent ablation {ab.mode!r} needs its seeded generator")
        g = torch.randn(z.shape, generator=generator, dtype=torch.float32, device="cpu").to(z.device)
        if ab.mode == "perturb":
            return (z.float() + ab.scale * g).to(z.dtype)
        return (g * (z.float().norm() / g.norm().clamp_min(1e-12))).to(z.dtype)
    vec = ab.vectors
    if index >= vec.shape[0]:
        return torch.zeros_like(z)
    if vec.shape[1] != z.shape[0]:
        raise ValueError(f"latent ablation vectors have size {vec.shape[1]}, the model's hidden size is {z.shape[0]}")
    return vec[index].to(z.device, z.dtype)


class LatentOverride:
    """Per-batch-row ablations for :func:`monet.generate` (``None`` rows keep their latents)."""

    def __init__(self, ablations: Sequence[LatentAblation | None]):
        self.ablations = list(ablations)
        self._gens = [torch.Generator().manual_seed(a.seed) if a is not None and a.mode in ("noise", "perturb")
                      else None for a in self.ablations]

    def apply_(self, prev_hidden: torch.Tensor, is_latent: torch.Tensor, n_latents: torch.Tensor,
               embed_weight: torch.Tensor, ids) -> None:
        """Replace ``prev_hidden[b]`` ([B, D], in place) for rows whose next input is a latent.

        One host read of the latent flags per step: ablation runs are diagnostics, not serving."""
        if len(self.ablations) != prev_hidden.shape[0]:
            raise ValueError(f"{len(self.ablations)} latent ablations for a batch of {prev_hidden.shape[0]} requests")
        rows = is_latent.nonzero().flatten().tolist()
        idx = n_latents.tolist() if rows else []
        for b in rows:
            ab = self.ablations[b]
            if ab is not None:
                prev_hidden[b] = ablated_latent(ab, prev_hidden[b], idx[b], embed_weight[ids.start], self._gens[b])
