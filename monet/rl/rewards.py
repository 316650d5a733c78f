"""Scalar reward of one rollout from its graded parts.

``reward = accuracy_weight * accuracy + format_weight * format + length_penalty(length)``

``accuracy`` in [0, 1] (rule-based check or judge), ``format`` in {0, 1} (the answer is present in
the required form, e.g. ``\\boxed{}``), and the optional soft over-length penalty of
:class:`~monet.rl.config.LengthPenalty` (0 when not configured). Grading itself lives elsewhere.
"""

from __future__ import annotations

import torch

from monet.rl.config import LengthPenalty, VLPOConfig


def length_penalty(lengths: torch.Tensor, penalty: LengthPenalty | None) -> torch.Tensor:
    """``[R]`` penalties (<= 0) for response lengths ``[R]`` (tokens); zeros when ``penalty`` is None."""
    lengths = lengths.double()
    if penalty is None:
        return torch.zeros_like(lengths)
    start = penalty.max_tokens - penalty.buffer
    return -penalty.weight * ((lengths - start) / penalty.buffer).clamp(0.0, 1.0)


def combine_rewards(
    accuracy: torch.Tensor, format_ok: torch.Tensor, config: VLPOConfig, lengths: torch.Tensor | None = None
) -> torch.Tensor:
    """``[R]`` float64 rewards. ``accuracy`` ``[R]`` in [0, 1], ``format_ok`` ``[R]`` bool or 0/1,
    ``lengths`` ``[R]`` response token counts (required when ``config.length_penalty`` is set)."""
    acc = accuracy.double()
    fmt = format_ok.double()
    if acc.shape != fmt.shape or acc.dim() != 1:
        raise ValueError(f"accuracy {tuple(acc.shape)} and format_ok {tuple(fmt.shape)} must be 1-D, same length")
    if bool(((acc < 0) | (acc > 1) | acc.isnan()).any()):
        i = int(((acc < 0) | (acc > 1) | acc.isnan()).nonzero()[0])
        raise ValueError(f"accuracy of rollout {i} is {float(acc[i])}, expected a value in [0, 1]")
    if bool(((fmt != 0) & (fmt != 1)).any()):
        i = int(((fmt != 0) & (fmt != 1)).nonzero()[0])
        raise ValueError(f"format_ok of rollout {i} is {float(fmt[i])}, expected 0 or 1")
    reward = config.accuracy_weight * acc + config.format_weight * fmt
    if config.length_penalty is not None:
        if lengths is None:
            raise ValueError("config.length_penalty is set: pass the response lengths")
        if lengths.shape != acc.shape:
            raise ValueError(f"lengths {tuple(lengths.shape)} must match accuracy {tuple(acc.shape)}")
        reward = reward + length_penalty(lengths, config.length_penalty)
    return reward
