"""Latent and accuracy diagnostics: pure functions, float64 inside, no model needed.

Latent inputs are one tensor per answer, shape ``[n_i, D]`` (the answer's latent vectors, all spans
concatenated; ``n_i`` may be 0), as returned by decoding with ``return_latents=True``.

* :func:`latent_span_rate` — share of answers with at least one latent span, spans per answer.
* :func:`latent_norms` — L2 norms of all latent vectors (mean / std / min / max).
* :func:`cosine_within_answers` / :func:`cosine_across_answers` — mean pairwise cosine of vectors
  of the same answer (averaged over answers with >= 2 vectors) and of vectors of different
  answers. Computed from sums of unit vectors: for unit rows ``u``, the sum of all pairwise dot
  products within a group of ``n`` is ``(|sum u|^2 - n) / 2``, so both are O(N·D), not O(N²·D).
  Near 1 across answers means the latents carry no sample-specific information.
* :func:`pairwise_cosines` — the individual cosine values (for histograms), optionally sampled.
* :func:`effective_rank` — Roy & Vetterli (2007): ``exp(H(p))`` with ``p_i = s_i / sum s`` over the
  singular values ``s`` of the stacked ``[N, D]`` latents; between 1 (rank one) and ``min(N, D)``.
* :func:`wilson_interval` — Wilson score interval of an accuracy (default 95%).
* :func:`chance_level` — expected accuracy of uniform guessing, mean of ``1/num_options``.
* :func:`answer_changed_share` — share of common sample ids whose prediction differs between runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

Latents = Sequence[torch.Tensor]


def _as_matrix(x: torch.Tensor, i: int) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"answer {i}: latents must be a tensor, got {type(x).__name__}")
    if x.dim() == 1 and x.numel() == 0:
        return x.reshape(0, 0).double()
    if x.dim() != 2:
        raise ValueError(f"answer {i}: latents must have shape [n, D], got {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError(f"answer {i}: latents contain NaN or Inf")
    return x.detach().to("cpu", torch.float64)


def _stack(latents: Latents) -> tuple[torch.Tensor, list[int]]:
    mats = [_as_matrix(x, i) for i, x in enumerate(latents)]
    dims = {m.shape[1] for m in mats if m.shape[0]}
    if len(dims) > 1:
        raise ValueError(f"latent widths differ across answers: {sorted(dims)}")
    d = dims.pop() if dims else 0
    counts = [m.shape[0] for m in mats]
    nonempty = [m for m in mats if m.shape[0]]
    return (torch.cat(nonempty) if nonempty else torch.zeros(0, d, dtype=torch.float64)), counts


def _unit_rows(x: torch.Tensor, counts: list[int]) -> torch.Tensor:
    norms = x.norm(dim=1)
    if (norms == 0).any():
        row = int((norms == 0).nonzero()[0])
        answer = next(i for i, c in enumerate(torch.tensor(counts).cumsum(0).tolist()) if row < c)
        raise ValueError(f"answer {answer}: a latent vector has zero norm (cosine undefined)")
    return x / norms[:, None]


@dataclass(frozen=True)
class SpanRate:
    n_answers: int
    share_with_span: float
    spans_per_answer: float


def latent_span_rate(spans_per_answer: Sequence[int]) -> SpanRate:
    """From the number of latent spans in each answer."""
    if not spans_per_answer:
        raise ValueError("latent_span_rate: no answers")
    if any(int(s) != s or s < 0 for s in spans_per_answer):
        raise ValueError("latent_span_rate: span counts must be non-negative integers")
    n = len(spans_per_answer)
    return SpanRate(n, sum(1 for s in spans_per_answer if s > 0) / n, sum(spans_per_answer) / n)


@dataclass(frozen=True)
class NormStats:
    n_vectors: int
    mean: float
    std: float
    min: float
    max: float


def latent_norms(latents: Latents) -> NormStats | None:
    """L2-norm statistics over all latent vectors of all answers (population std); None if none."""
    x, _ = _stack(latents)
    if x.shape[0] == 0:
        return None
    norms = x.norm(dim=1)
    return NormStats(int(norms.numel()), float(norms.mean()), float(norms.std(unbiased=False)),
                     float(norms.min()), float(norms.max()))


def cosine_within_answers(latents: Latents) -> float | None:
    """Mean over answers with >= 2 vectors of that answer's mean pairwise cosine; None if no such answer."""
    x, counts = _stack(latents)
    if x.shape[0] == 0:
        return None
    u = _unit_rows(x, counts)
    per_answer, start = [], 0
    for n in counts:
        if n >= 2:
            s = u[start:start + n].sum(0)
            per_answer.append(float((s @ s - n) / (n * (n - 1))))
        start += n
    return sum(per_answer) / len(per_answer) if per_answer else None


def cosine_across_answers(latents: Latents) -> float | None:
    """Mean cosine over all pairs of vectors from different answers; None with < 2 non-empty answers."""
    x, counts = _stack(latents)
    if sum(1 for c in counts if c) < 2:
        return None
    u = _unit_rows(x, counts)
    total = u.sum(0)
    all_pairs_sum = float(total @ total)  # includes self pairs and both orders
    within_sum, start = 0.0, 0
    for n in counts:
        if n:
            s = u[start:start + n].sum(0)
            within_sum += float(s @ s)
        start += n
    n_total = sum(counts)
    n_pairs = n_total * n_total - sum(c * c for c in counts)
    return (all_pairs_sum - within_sum) / n_pairs


def pairwise_cosines(latents: Latents, mode: str = "across", *, max_pairs: int | None = 200_000,
                     seed: int = 0) -> torch.Tensor:
    """Cosine of every unordered pair of vectors ``within`` one answer or ``across`` answers
    (float64, 1-D). With more than ``max_pairs`` pairs a uniform random subset (fixed ``seed``)
    of that size is returned."""
    if mode not in ("within", "across"):
        raise ValueError(f"mode must be 'within' or 'across', got {mode!r}")
    x, counts = _stack(latents)
    if x.shape[0] < 2:
        return torch.zeros(0, dtype=torch.float64)
    u = _unit_rows(x, counts)
    owner = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    i, j = torch.triu_indices(len(u), len(u), offset=1)
    same = owner[i] == owner[j]
    keep = same if mode == "within" else ~same
    i, j = i[keep], j[keep]
    if max_pairs is not None and i.numel() > max_pairs:
        g = torch.Generator().manual_seed(seed)
        pick = torch.randperm(i.numel(), generator=g)[:max_pairs]
        i, j = i[pick], j[pick]
    return (u[i] * u[j]).sum(1)


def effective_rank(latents: Latents | torch.Tensor, *, center: bool = False) -> float | None:
    """Roy & Vetterli effective rank of the stacked latents (optionally mean-centred first).
    None with no vectors; 0.0 for an all-zero matrix."""
    x = _as_matrix(latents, 0) if isinstance(latents, torch.Tensor) else _stack(latents)[0]
    if x.shape[0] == 0:
        return None
    if center:
        x = x - x.mean(0, keepdim=True)
    s = torch.linalg.svdvals(x)
    total = s.sum()
    if total <= 0:
        return 0.0
    p = s / total
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def wilson_interval(correct: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """Wilson score interval for ``correct`` successes out of ``n`` (default z: 95% two-sided)."""
    if n <= 0:
        raise ValueError("wilson_interval: n must be positive")
    if not 0 <= correct <= n:
        raise ValueError(f"wilson_interval: correct={correct} outside [0, {n}]")
    p = correct / n
    z2 = z * z
    denom = 1 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def chance_level(num_options: Sequence[int]) -> float:
    """Mean of ``1/k`` over the questions' option counts (all must be >= 1)."""
    if not num_options:
        raise ValueError("chance_level: no questions")
    if any(k < 1 for k in num_options):
        raise ValueError("chance_level: every question needs at least one option")
    return sum(1.0 / k for k in num_options) / len(num_options)


def answer_changed_share(run_a: Mapping[str, str | None], run_b: Mapping[str, str | None]) -> tuple[float, int]:
    """``(share, n_common)``: among sample ids present in both runs, the share whose predictions
    differ (None counts as a prediction). Raises when the runs share no id."""
    common = run_a.keys() & run_b.keys()
    if not common:
        raise ValueError("answer_changed_share: the two runs have no sample id in common")
    changed = sum(1 for k in common if run_a[k] != run_b[k])
    return changed / len(common), len(common)
