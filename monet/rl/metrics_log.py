"""VLPO step metrics: ``metrics.jsonl`` (strict JSON, one row per step), a console table and the
optional TensorBoard / W&B sinks.

Non-finite numbers are written as ``null`` (``json.dumps(allow_nan=False)`` never sees them).
After a resume at step ``s``, :meth:`MetricsLog.resume_at` drops the rows past ``s`` (they are
trained again) so every step appears once; TensorBoard gets ``purge_step=s + 1`` for the same
reason. The sinks are the SFT trainer's (:class:`monet.train.metrics.ScalarSinks`): every finite
number of a row but ``step`` is a TensorBoard scalar at ``global_step=step`` (under
``OUTPUT/tensorboard``), the row minus ``step`` a ``wandb.log(..., step=step)``. Only the trainer
(rank 0 of the actor group) builds a :class:`MetricsLog`.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Callable, Sequence

from monet.atomic import atomic_write_text
from monet.train.metrics import ScalarSinks

#: columns of the console table (the file holds every metric)
CONSOLE = ("step", "reward/mean", "rollout/accuracy", "rollout/format_rate", "rollout/response_len",
           "rollout/latent_span_rate", "groups/kept", "text/kl", "latent/abs_term_mean", "latent/share",
           "grad_norm", "time/step")


def strict_row(row: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in row.items():
        if isinstance(v, float) and not math.isfinite(v):
            v = None
        out[k] = v
    return out


class MetricsLog:
    """``log(row)`` appends ``row`` (which holds ``step``) to ``OUTPUT/metrics.jsonl``, prints the
    :data:`CONSOLE` columns (``printer`` None: silent) and writes it to the sinks.

    ``tensorboard`` / ``wandb_project`` / ``run_config``: as :class:`~monet.train.metrics.ScalarSinks`
    (``summary_writer``: the TensorBoard writer class, for tests). Call :meth:`close` at the end."""

    def __init__(self, output_dir: str | os.PathLike, *, printer: Callable[[str], None] | None = print,
                 columns: Sequence[str] = CONSOLE, tensorboard: bool = False, wandb_project: str | None = None,
                 run_config: dict | None = None, summary_writer: Any = None):
        self.path = Path(output_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.printer, self.columns = printer, list(columns)
        self._header = False
        self.sinks = ScalarSinks(output_dir, tensorboard=tensorboard, wandb_project=wandb_project,
                                 run_config=run_config, summary_writer=summary_writer)

    def resume_at(self, step: int) -> None:
        """Keep only the rows of steps ``<= step`` (a torn last line is dropped); TensorBoard
        hides its events past ``step``."""
        self.sinks.resume_at(step)
        if not self.path.is_file():
            return
        kept = []
        for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= step:
                kept.append(line + "\n")
        atomic_write_text(self.path, "".join(kept))

    def log(self, row: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(strict_row(row), allow_nan=False) + "\n")
        self.sinks.write(row["step"], {k: v for k, v in row.items() if k != "step"})
        if self.printer is None:
            return
        if not self._header:
            self.printer("  ".join(f"{c.split('/')[-1][:12]:>12}" for c in self.columns))
            self._header = True
        self.printer("  ".join(_fmt(row.get(c)).rjust(12) for c in self.columns))

    def rows(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def close(self) -> None:
        self.sinks.close()


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
