"""Latent ablations: does the model use its latents?

The same samples are decoded again with every latent input replaced
(:class:`~monet.model.latent_hooks.LatentAblation`, applied by both engines at the moment a latent
becomes the next input, so the replaced vector is also what the run records):

==========  =====================================================================================
``zeros``   the zero vector
``start``   the START token's input embedding
``other``   the latents of another sample at the same index (``mode="replace"``); partners are a
            fixed derangement of the benchmark's samples (:func:`derangement`, no sample is its
            own partner) and the vectors are the partner's *baseline* latents (zeros once the
            partner has no latent at that index)
``noise``   Gaussian noise rescaled to the norm of the latent it replaces (seeded per sample)
==========  =====================================================================================

Per ablation and benchmark (:func:`compare_runs`): baseline and ablated accuracy on the common
samples, their difference with a 95% interval for *paired* proportions (:func:`paired_difference_interval`,
Newcombe's method 10), and the share of answers whose final answer (``prediction``) or full text
changed. If no ablation changes any answer text, the model does not use its latents
(:func:`latent_usage_verdict`).
"""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import asdict, dataclass
from typing import Mapping, Sequence

import torch

from monet.eval.diagnostics import wilson_interval
from monet.eval.report import ALL, SampleRecord
from monet.model.latent_hooks import LatentAblation

#: CLI name -> LatentAblation mode.
ABLATIONS = {"zeros": "zeros", "start": "start", "other": "replace", "noise": "noise"}


def parse_ablations(spec: str | Sequence[str] | None) -> tuple[str, ...]:
    """``"zeros,start"`` (or a list) -> validated names in the given order, no duplicates."""
    if spec is None:
        return ()
    names = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    bad = [n for n in names if n not in ABLATIONS]
    if bad:
        raise ValueError(f"unknown ablation(s) {bad}; choose from {', '.join(ABLATIONS)}")
    if len(set(names)) != len(names):
        raise ValueError(f"ablation given twice in {names}")
    return tuple(names)


def derangement(n: int, seed: int) -> list[int]:
    """A random cyclic permutation of ``range(n)`` (Sattolo's algorithm, fixed ``seed``): ``p[i] != i``
    for every ``i`` when ``n >= 2``. ``n == 1`` has no derangement (ValueError)."""
    if n == 1:
        raise ValueError("a derangement needs at least two samples")
    p = list(range(n))
    rng = random.Random(f"monet-eval-derangement/{seed}")
    for i in range(n - 1, 0, -1):
        j = rng.randrange(i)  # j < i: Sattolo (a single cycle), never a fixed point
        p[i], p[j] = p[j], p[i]
    return p


def sample_seed(seed: int, sample_id: str) -> int:
    """A per-sample seed that does not depend on batching (resumed runs draw the same noise)."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{sample_id}".encode()).digest()[:7], "little")


def build_ablation(name: str, sample_id: str, seed: int, partner_latents: torch.Tensor | None = None,
                   hidden_size: int | None = None) -> LatentAblation:
    """The :class:`LatentAblation` of one sample for ablation ``name`` (see module doc).
    ``partner_latents`` ([n, D], may be empty) is required for ``other``."""
    mode = ABLATIONS[name]
    if mode == "replace":
        if partner_latents is None:
            raise ValueError(f"sample {sample_id}: ablation 'other' needs the partner's latents")
        vec = partner_latents.float()
        if vec.numel() == 0:
            if hidden_size is None:
                raise ValueError(f"sample {sample_id}: the partner has no latents and the hidden size is unknown")
            vec = torch.zeros(0, hidden_size)
        return LatentAblation("replace", vectors=vec)
    if mode == "noise":
        return LatentAblation("noise", seed=sample_seed(seed, sample_id))
    return LatentAblation(mode)


def paired_difference_interval(both: int, only_a: int, only_b: int, neither: int,
                               z: float = 1.959963984540054) -> tuple[float, float, float]:
    """``(delta, low, high)`` for ``delta = p_b - p_a`` of two paired binary outcomes.

    Cells: ``both`` correct in a and b, ``only_a``, ``only_b``, ``neither``. Newcombe (1998),
    method 10: Wilson score limits ``l_i, u_i`` of each proportion combined with the phi
    correlation of the 2x2 table (phi := 0 when a margin is empty)::

        low  = delta - sqrt((p_b - l_b)^2 - 2 phi (p_b - l_b)(u_a - p_a) + (u_a - p_a)^2)
        high = delta + sqrt((u_b - p_b)^2 - 2 phi (u_b - p_b)(p_a - l_a) + (p_a - l_a)^2)
    """
    cells = (both, only_a, only_b, neither)
    if any(c < 0 for c in cells):
        raise ValueError(f"paired_difference_interval: negative cell in {cells}")
    n = sum(cells)
    if n == 0:
        raise ValueError("paired_difference_interval: no pairs")
    pa, pb = (both + only_a) / n, (both + only_b) / n
    la, ua = wilson_interval(both + only_a, n, z)
    lb, ub = wilson_interval(both + only_b, n, z)
    denom = (both + only_a) * (only_b + neither) * (both + only_b) * (only_a + neither)
    phi = (both * neither - only_a * only_b) / math.sqrt(denom) if denom > 0 else 0.0
    delta = pb - pa
    dl = math.sqrt(max(0.0, (pb - lb) ** 2 - 2 * phi * (pb - lb) * (ua - pa) + (ua - pa) ** 2))
    du = math.sqrt(max(0.0, (ub - pb) ** 2 - 2 * phi * (ub - pb) * (pa - la) + (pa - la) ** 2))
    return delta, max(-1.0, delta - dl), min(1.0, delta + du)


@dataclass(frozen=True)
class AblationRow:
    """One ablation on one benchmark (``benchmark == "ALL"``: every benchmark pooled)."""

    ablation: str
    benchmark: str
    n: int
    baseline_accuracy: float
    ablated_accuracy: float
    delta: float
    delta_low: float
    delta_high: float
    prediction_changed: float  # share of samples whose final answer changed
    text_changed: float  # share whose output text (latent spans rendered) changed

    def to_dict(self) -> dict:
        return asdict(self)


def _row(name: str, bench: str, pairs: list[tuple[SampleRecord, SampleRecord]]) -> AblationRow:
    ca = [a.verdict == "correct" for a, _ in pairs]
    cb = [b.verdict == "correct" for _, b in pairs]
    both = sum(x and y for x, y in zip(ca, cb))
    only_a = sum(x and not y for x, y in zip(ca, cb))
    only_b = sum(y and not x for x, y in zip(ca, cb))
    n = len(pairs)
    delta, lo, hi = paired_difference_interval(both, only_a, only_b, n - both - only_a - only_b)
    return AblationRow(name, bench, n, sum(ca) / n, sum(cb) / n, delta, lo, hi,
                       sum(a.prediction != b.prediction for a, b in pairs) / n,
                       sum(a.text != b.text for a, b in pairs) / n)


def compare_runs(name: str, baseline: Sequence[SampleRecord], ablated: Sequence[SampleRecord]) -> list[AblationRow]:
    """Rows per benchmark (sorted) and, with several benchmarks, a pooled ``ALL`` row; on the
    sample ids present in both runs. Raises when they share none."""
    base = {r.sample_id: r for r in baseline}
    pairs = [(base[r.sample_id], r) for r in ablated if r.sample_id in base]
    if not pairs:
        raise ValueError(f"ablation {name}: no sample in common with the baseline run")
    by_bench: dict[str, list] = {}
    for p in pairs:
        by_bench.setdefault(p[0].benchmark, []).append(p)
    rows = [_row(name, b, by_bench[b]) for b in sorted(by_bench)]
    if len(by_bench) > 1:
        rows.append(_row(name, ALL, pairs))
    return rows


def pooled(rows: Sequence[AblationRow]) -> dict[str, AblationRow]:
    """Ablation -> its pooled row (the ``ALL`` row, or the only benchmark's row)."""
    out: dict[str, AblationRow] = {}
    for r in rows:
        if r.benchmark == ALL or r.ablation not in out:
            out[r.ablation] = r
    return out


def latent_usage_verdict(rows: Sequence[AblationRow]) -> dict:
    """``{"uses_latents": bool | None, "message": str}`` from the pooled ablation rows.

    Not used: no ablation changed any output text (the latents have no effect at all). Wording
    only: texts changed but no final answer did. None without ablation rows."""
    pool = pooled(rows)
    if not pool:
        return {"uses_latents": None, "message": "no ablations were run"}
    text = max(r.text_changed for r in pool.values())
    pred = max(r.prediction_changed for r in pool.values())
    if text == 0:
        return {"uses_latents": False,
                "message": "the model does not use its latents: no answer changed under any ablation "
                           f"({', '.join(pool)})"}
    if pred == 0:
        return {"uses_latents": True,
                "message": "the latents change the wording of answers but no final answer changed under any "
                           f"ablation ({', '.join(pool)})"}
    worst = max(pool.values(), key=lambda r: r.prediction_changed)
    return {"uses_latents": True,
            "message": f"the model uses its latents: up to {100 * pred:.1f}% of final answers change "
                       f"(ablation {worst.ablation})"}


def partner_latents(sample_ids: Sequence[str], latents: Mapping[str, torch.Tensor],
                    seed: int) -> dict[str, tuple[str, torch.Tensor]]:
    """For ablation ``other``: sample id -> (partner id, the partner's baseline latents)."""
    perm = derangement(len(sample_ids), seed)
    return {sid: (sample_ids[perm[i]], latents.get(sample_ids[perm[i]], torch.zeros(0)))
            for i, sid in enumerate(sample_ids)}
