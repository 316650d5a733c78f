"""Training metrics: JSONL file, console table every N steps, optional TensorBoard / W&B."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any


class MetricsLogger:
    """``log(step, metrics)`` appends one JSON line per call to ``OUTPUT/metrics.jsonl`` and prints
    a table row every ``every`` steps (rank 0 only). ``summary()`` gives first/last/mean values."""

    def __init__(self, output_dir: str | os.PathLike, *, every: int = 10, enabled: bool = True,
                 tensorboard: bool = False, wandb_project: str | None = None, run_config: dict | None = None,
                 printer=print):
        self.path = Path(output_dir) / "metrics.jsonl"
        self.every, self.enabled, self.printer = max(1, every), enabled, printer
        self.history: list[dict[str, Any]] = []
        self._header_printed = False
        self._columns: list[str] = []
        self._tb = None
        self._wandb = None
        self._t0 = time.perf_counter()
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if tensorboard:
                try:
                    from torch.utils.tensorboard import SummaryWriter
                except ImportError:
                    raise ImportError("tensorboard: true needs the tensorboard package (pip install tensorboard)") from None
                self._tb = SummaryWriter(str(Path(output_dir) / "tensorboard"))
            if wandb_project:
                try:
                    import wandb
                except ImportError:
                    raise ImportError("wandb_project is set but wandb is not installed (pip install wandb)") from None
                self._wandb = wandb.init(project=wandb_project, dir=str(output_dir), config=run_config or {})

    def log(self, step: int, metrics: dict[str, float]) -> None:
        row = {"step": step, "time_s": round(time.perf_counter() - self._t0, 3), **metrics}
        self.history.append(row)
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for k, v in metrics.items():
                self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(dict(metrics), step=step)
        if step % self.every == 0 or step == 1:
            self._print_row(row)

    def _print_row(self, row: dict) -> None:
        if not self._header_printed:
            self._columns = list(row)
            self.printer("  ".join(f"{c:>12}" for c in self._columns))
            self._header_printed = True
        self.printer("  ".join(_fmt(row.get(c)).rjust(12) for c in self._columns))

    def summary(self) -> dict[str, dict[str, float]]:
        keys = [k for k in (self.history[0] if self.history else {}) if k not in ("step", "time_s")]
        out = {}
        for k in keys:
            vals = [r[k] for r in self.history if isinstance(r.get(k), (int, float))]
            if vals:
                out[k] = {"first": vals[0], "last": vals[-1], "mean": sum(vals) / len(vals)}
        return out

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "-" if v is None else str(v)
