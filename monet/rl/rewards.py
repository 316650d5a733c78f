"""Scalar reward of one rollout from its graded parts.

``reward = accuracy_weight * accuracy + format_weight * format + length_penalty(length)``

``accuracy`` in [0, 1] (rule-based check or judge), ``format`` in {0, 1} (the answer is present in
the required form: exactly one ``\\boxed{}``), and the optional soft over-length penalty of
:class:`~monet.rl.config.LengthPenalty` (0 when not configured). :func:`grade_rollouts` grades
texts with :mod:`monet.scoring` (rules first, optional judge; degenerate outputs never correct).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

import torch

from monet.rl.config import LengthPenalty, VLPOConfig
from monet.scoring import ScoreItem, Scorer, Verdict, extract_boxed


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


# -- grading rollouts ------------------------------------------------------------------------------
_BOXED = re.compile(r"\\boxed\s*\{")


def format_ok(text: str) -> bool:
    """The format reward: the answer holds exactly one ``\\boxed{...}``, with balanced braces and
    non-empty content."""
    if len(_BOXED.findall(text)) != 1:
        return False
    content = extract_boxed(text)
    return content is not None and bool(content.strip())


@dataclass
class GradedRollouts:
    """Per rollout (``[R]`` each): ``accuracy`` (0/1 float64), ``format`` (bool), ``reward``
    (float64, :func:`combine_rewards`), ``degenerate`` (bool) and ``decided_by`` (``rule`` /
    ``judge`` / ``undecided``)."""

    accuracy: torch.Tensor
    format: torch.Tensor
    reward: torch.Tensor
    degenerate: torch.Tensor
    decided_by: list[str]


def grade_rollouts(texts: Sequence[str], answers: Sequence[str], config: VLPOConfig, *, scorer: Scorer | None = None,
                   lengths: Sequence[int] | None = None, questions: Sequence[str] | None = None) -> GradedRollouts:
    """Grade answers against references and combine the rewards.

    Accuracy comes from :class:`monet.scoring.Scorer` (rules first; its judge, when configured,
    decides what the rules cannot); a degenerate output (empty, looping) is never correct and an
    undecided one counts as wrong. ``lengths`` (response tokens) feed the optional length penalty.
    """
    if len(texts) != len(answers):
        raise ValueError(f"{len(texts)} answers to grade but {len(answers)} references")
    if questions is not None and len(questions) != len(texts):
        raise ValueError(f"{len(questions)} questions for {len(texts)} answers")
    scorer = scorer if scorer is not None else Scorer()
    items = [ScoreItem(output=t, answer=a, question=questions[i] if questions is not None else "")
             for i, (t, a) in enumerate(zip(texts, answers))]
    results = scorer.score_many(items)
    acc = torch.tensor([1.0 if r.verdict == Verdict.CORRECT else 0.0 for r in results], dtype=torch.float64)
    deg = torch.tensor([r.verdict == Verdict.DEGENERATE for r in results], dtype=torch.bool)
    acc = torch.where(deg, torch.zeros_like(acc), acc)  # never correct, whatever a box says
    fmt = torch.tensor([format_ok(t) for t in texts], dtype=torch.bool)
    lens = torch.tensor(list(lengths), dtype=torch.float64) if lengths is not None else None
    reward = combine_rewards(acc, fmt, config, lens if config.length_penalty is not None else None)
    return GradedRollouts(acc, fmt, reward, deg, [r.decided_by for r in results])
