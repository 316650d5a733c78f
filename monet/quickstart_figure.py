"""The quickstart's figure: training curves of every stage and the held-out accuracy of every row.

One PNG, two panels (matplotlib Agg canvas, no pyplot global state):

* left: training loss against the optimizer step for each run of the report's ``curves``
  (stage 1, 2, 3 and the controls), on a log scale when every value is positive;
* middle: one bar per evaluated row (accuracy in %), the 95% Wilson interval as an error bar and
  the row's chance level as a short black line across its bar;
* right (when the report has a VLPO phase): mean reward, rollout accuracy and latent-span rate of
  the rollouts per VLPO step.
"""

from __future__ import annotations

import os
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def write_figure(report: dict, path: str | os.PathLike) -> Path:
    """Draw ``report["curves"]`` and ``report["rows"]`` (see :mod:`monet.quickstart`) into ``path``."""
    rows = report["rows"]
    if not rows:
        raise ValueError("write_figure: the report has no rows")
    vlpo = (report.get("vlpo") or {}).get("per_step") or []
    panels = 3 if vlpo else 2
    fig = Figure(figsize=(6.5 * panels, 4.8))
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.add_subplot(1, panels, 1), fig.add_subplot(1, panels, 2)
    positive = True
    for name, pts in report.get("curves", {}).items():
        if pts:
            ax1.plot([p[0] for p in pts], [p[1] for p in pts], label=name, linewidth=1.2)
            positive = positive and all(p[1] > 0 for p in pts)
    if positive and any(report.get("curves", {}).values()):
        ax1.set_yscale("log")
    ax1.set_xlabel("optimizer step")
    ax1.set_ylabel("training loss")
    ax1.set_title("training curves")
    ax1.grid(alpha=0.3)
    if any(report.get("curves", {}).values()):
        ax1.legend(fontsize=8)

    xs = list(range(len(rows)))
    acc = [100 * (r["accuracy"] or 0.0) for r in rows]
    lo = [a - 100 * r["ci95"][0] for a, r in zip(acc, rows)]
    hi = [100 * r["ci95"][1] - a for a, r in zip(acc, rows)]
    if any(v < -1e-9 for v in lo + hi):
        raise ValueError("write_figure: a row's accuracy lies outside its interval")
    ax2.bar(xs, acc, yerr=[[max(v, 0) for v in lo], [max(v, 0) for v in hi]], capsize=4, color="#6a8fc7")
    for x, r in zip(xs, rows):
        if r.get("chance") is not None:
            ax2.hlines(100 * r["chance"], x - 0.4, x + 0.4, colors="black", linewidth=1.5)
    ax2.set_xticks(xs)
    ax2.set_xticklabels([r["title"] for r in rows], rotation=25, ha="right", fontsize=8)
    split = "validation" if report.get("data", {}).get("evaluated_split") == "val" else "held-out"
    ax2.set_ylabel(f"{split} accuracy (%)")
    ax2.set_ylim(0, 100)
    n = rows[0]["n"]
    ax2.set_title(f"{split} accuracy, {n} samples (95% Wilson; black line: chance)")
    ax2.grid(axis="y", alpha=0.3)
    if vlpo:
        ax3 = fig.add_subplot(1, panels, 3)
        for key, label in (("reward/mean", "mean reward"), ("rollout/accuracy", "rollout accuracy"),
                           ("rollout/latent_span_rate", "rollouts with a latent span")):
            pts = [(r["step"], r[key]) for r in vlpo if isinstance(r.get(key), (int, float))]
            if pts:
                ax3.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label, linewidth=1.2)
        ax3.set_xlabel("VLPO step")
        ax3.set_ylim(-0.05, 1.05)
        ax3.set_title("VLPO rollouts (training questions)")
        ax3.grid(alpha=0.3)
        ax3.legend(fontsize=8)
    fig.tight_layout()
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(p, format="png", dpi=110)
    return p
