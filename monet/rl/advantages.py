"""GRPO outcome advantages: each rollout's reward standardised within its prompt's group.

For a group of n rollouts of one prompt with rewards ``r_1..r_n``::

    A_i = (r_i - mean(r)) / (std(r) + eps)

``std`` is explicit: ``"sample"`` (Bessel-corrected, divides by ``n - 1``, what ``torch.std`` does)
or ``"population"`` (divides by ``n``). A group whose rewards are all equal gets ``A = 0`` (it
carries no learning signal; no critic is used). The advantage of a rollout is the same at every one
of its action positions, text and latent alike (:func:`broadcast_advantages`).
"""

from __future__ import annotations

import torch

from monet.rl.config import StdKind


def _std(counts: torch.Tensor, centered_sq_sum: torch.Tensor, std: StdKind) -> torch.Tensor:
    if std == "sample":
        if bool((counts < 2).any()):
            raise ValueError("sample std needs at least 2 rollouts in every group; "
                             "use std='population' for groups of one")
        return (centered_sq_sum / (counts - 1)).sqrt()
    if std == "population":
        return (centered_sq_sum / counts).sqrt()
    raise ValueError(f"std must be 'sample' or 'population', got {std!r}")


def grpo_advantages(rewards: torch.Tensor, *, std: StdKind = "sample", eps: float = 1e-6) -> torch.Tensor:
    """Advantages of a rectangular batch of groups.

    ``rewards``: ``[G, n]`` (G prompts, n rollouts each). Returns ``[G, n]`` float64 when the input
    is float64, float32 otherwise. Non-finite rewards are an error naming the group.
    """
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [groups, n], got shape {tuple(rewards.shape)}")
    G, n = rewards.shape
    index = torch.arange(G, device=rewards.device).repeat_interleave(n)
    return grpo_advantages_by_group(rewards.reshape(-1), index, std=std, eps=eps).view(G, n)


def grpo_advantages_by_group(
    rewards: torch.Tensor, group_index: torch.Tensor, *, std: StdKind = "sample", eps: float = 1e-6
) -> torch.Tensor:
    """Advantages of rollouts in groups of any sizes.

    ``rewards`` ``[R]``; ``group_index`` ``[R]`` int, the group of each rollout (any non-negative
    ids, need not be contiguous). Returns ``[R]``.
    """
    if rewards.dim() != 1 or group_index.shape != rewards.shape:
        raise ValueError(f"rewards {tuple(rewards.shape)} and group_index {tuple(group_index.shape)} "
                         "must be 1-D of the same length")
    if group_index.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.bool):
        raise ValueError(f"group_index must be an integer tensor, got {group_index.dtype}")
    if eps <= 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    r = rewards.double() if rewards.dtype == torch.float64 else rewards.float()
    bad = ~torch.isfinite(r)
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        raise ValueError(f"reward of rollout {i} (group {int(group_index[i])}) is not finite: {float(r[i])}")
    if r.numel() == 0:
        return r
    if bool((group_index < 0).any()):
        raise ValueError("group_index must be >= 0")
    _, g = torch.unique(group_index, return_inverse=True)
    G = int(g.max()) + 1
    counts = torch.zeros(G, dtype=r.dtype, device=r.device).index_add_(0, g, torch.ones_like(r))
    mean = torch.zeros_like(counts).index_add_(0, g, r) / counts
    centered = r - mean[g]
    sq = torch.zeros_like(counts).index_add_(0, g, centered * centered)
    return centered / (_std(counts, sq, std)[g] + eps)


def broadcast_advantages(advantages: torch.Tensor, action_mask: torch.Tensor) -> torch.Tensor:
    """Per-position advantages ``[B, L]``: rollout ``b``'s advantage at its action positions, 0
    elsewhere. ``advantages`` ``[B]``, ``action_mask`` ``[B, L]`` bool (text or latent actions)."""
    if advantages.dim() != 1 or action_mask.dim() != 2 or action_mask.shape[0] != advantages.shape[0]:
        raise ValueError(f"advantages {tuple(advantages.shape)} must be [B] and action_mask "
                         f"{tuple(action_mask.shape)} [B, L]")
    return torch.where(action_mask, advantages[:, None], torch.zeros((), dtype=advantages.dtype,
                                                                       device=advantages.device))
