"""Evaluation plots (matplotlib, Agg canvas; no pyplot global state, safe off the main thread).

* :func:`plot_accuracy_vs_k` — accuracy against the latent size K, one line per benchmark, with
  interval error bars (e.g. Wilson 95%).
* :func:`plot_ablation_deltas` — horizontal bars of accuracy change vs. a baseline per ablation,
  optional error bars.
* :func:`plot_cosine_histogram` — histogram(s) of latent cosine similarities (e.g. within vs.
  across answers) on [-1, 1].

Each writes a PNG to ``path`` (parent folders created) and returns the path.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def _save(fig: Figure, path: str | os.PathLike) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.tight_layout()
    fig.savefig(p, format="png", dpi=120)
    return p


def plot_accuracy_vs_k(series: Mapping[str, Sequence[tuple[float, float, float, float]]],
                       path: str | os.PathLike, *, title: str = "accuracy vs latent size K") -> Path:
    """``series``: benchmark -> [(K, accuracy, ci_low, ci_high), ...] (accuracies in [0, 1])."""
    if not series:
        raise ValueError("plot_accuracy_vs_k: no series")
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    for name, pts in series.items():
        if not pts:
            raise ValueError(f"plot_accuracy_vs_k: series {name!r} is empty")
        pts = sorted(pts)
        ks = [p[0] for p in pts]
        acc = [100 * p[1] for p in pts]
        lo = [100 * (p[1] - p[2]) for p in pts]
        hi = [100 * (p[3] - p[1]) for p in pts]
        if any(v < 0 for v in lo + hi):
            raise ValueError(f"plot_accuracy_vs_k: series {name!r} has an accuracy outside its interval")
        ax.errorbar(ks, acc, yerr=[lo, hi], marker="o", capsize=3, label=name)
    ax.set_xlabel("K (latent vectors per span)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def plot_ablation_deltas(deltas: Mapping[str, float], path: str | os.PathLike, *,
                         errors: Mapping[str, float] | None = None,
                         title: str = "accuracy change vs baseline") -> Path:
    """``deltas``: ablation -> accuracy difference to the baseline (fractions; shown in points)."""
    if not deltas:
        raise ValueError("plot_ablation_deltas: no ablations")
    names = list(deltas)
    vals = [100 * deltas[n] for n in names]
    err = [100 * errors.get(n, 0.0) for n in names] if errors else None
    fig = Figure(figsize=(6, 0.5 * len(names) + 1.5))
    ax = fig.add_subplot()
    colors = ["tab:red" if v < 0 else "tab:blue" for v in vals]
    ax.barh(names, vals, xerr=err, color=colors, capsize=3)
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_xlabel("accuracy change (points)")
    ax.set_title(title)
    ax.invert_yaxis()
    return _save(fig, path)


def plot_cosine_histogram(values: Mapping[str, Sequence[float]], path: str | os.PathLike, *,
                          bins: int = 50, title: str = "latent cosine similarity") -> Path:
    """``values``: label -> cosine values (e.g. ``{"within": ..., "across": ...}``)."""
    if not values or all(len(v) == 0 for v in values.values()):
        raise ValueError("plot_cosine_histogram: no values")
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    for label, v in values.items():
        v = [float(x) for x in v]
        if v:
            ax.hist(v, bins=bins, range=(-1.0, 1.0), alpha=0.6, label=f"{label} (n={len(v)})")
    ax.set_xlabel("cosine similarity")
    ax.set_ylabel("pairs")
    ax.set_title(title)
    ax.legend()
    return _save(fig, path)
