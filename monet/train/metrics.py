"""Training metrics: JSONL file, console table every N steps, optional TensorBoard / W&B.

``metrics.jsonl`` is strict JSON (``json.dumps(allow_nan=False)``): a NaN/inf value is written as
``null``. After a resume, :meth:`MetricsLogger.resume_at` drops the rows past the checkpoint's
step (they are trained again) so each step appears once, and reloads the kept rows so the summary
covers the whole run. The TensorBoard / W&B sinks are :class:`ScalarSinks` (also VLPO's).
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

from monet.atomic import atomic_write_text, disk_full_error, is_disk_full


def _finite_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def strict_json_row(row: dict[str, Any]) -> dict[str, Any]:
    """``row`` with NaN/inf floats replaced by None (JSON ``null``)."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}


class ScalarSinks:
    """The optional external sinks of step metrics, shared by the SFT (:class:`MetricsLogger`) and
    VLPO (:class:`monet.rl.metrics_log.MetricsLog`) loggers.

    ``tensorboard``: every finite number (bools excluded) of a step goes to a TensorBoard
    ``SummaryWriter`` under ``OUTPUT/tensorboard`` as ``add_scalar(name, value, global_step=step)``.
    ``wandb_project``: ``wandb.init(project=..., dir=OUTPUT, config=run_config)``, then
    ``wandb.log(metrics, step=step)`` per step. A missing package is an ``ImportError`` at
    construction naming the setting and the package to install. ``summary_writer``: the writer
    class (``(log_dir, purge_step=...)``); default ``torch.utils.tensorboard.SummaryWriter``.

    Resume: :meth:`resume_at` (before the first :meth:`write`) opens the writer with
    ``purge_step=step + 1``, so TensorBoard hides the events of the steps past the checkpoint that
    an interrupted run had written (they are trained again and written anew). W&B starts a new run
    per launch. Only the process that logs (rank 0 / the trainer) builds one."""

    def __init__(self, output_dir: str | os.PathLike, *, tensorboard: bool = False, wandb_project: str | None = None,
                 run_config: dict | None = None, summary_writer: Any = None):
        self.tb_dir = Path(output_dir) / "tensorboard"
        self._writer_cls = None
        self._tb = None
        self._wandb = None
        if tensorboard:
            if summary_writer is None:
                try:
                    from torch.utils.tensorboard import SummaryWriter as summary_writer
                except ImportError:
                    raise ImportError("tensorboard: true needs the tensorboard package "
                                      "(pip install tensorboard)") from None
            self._writer_cls = summary_writer
        if wandb_project:
            try:
                import wandb
            except ImportError:
                raise ImportError("wandb_project is set but wandb is not installed (pip install wandb)") from None
            self._wandb = wandb.init(project=wandb_project, dir=str(output_dir), config=run_config or {})

    def resume_at(self, step: int) -> None:
        """The run continues after ``step``: TensorBoard purges the events of later steps."""
        if self._writer_cls is not None and self._tb is None:
            self._tb = self._writer_cls(str(self.tb_dir), purge_step=step + 1)

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        if self._writer_cls is not None:
            if self._tb is None:
                self._tb = self._writer_cls(str(self.tb_dir), purge_step=None)
            for k, v in metrics.items():
                if _finite_number(v):
                    self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(dict(metrics), step=step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


class MetricsLogger:
    """``log(step, metrics)`` appends one JSON line per call to ``OUTPUT/metrics.jsonl`` and prints
    a table row every ``every`` steps (rank 0 only). ``summary()`` gives first/last/mean of the
    finite values of each metric."""

    def __init__(self, output_dir: str | os.PathLike, *, every: int = 10, enabled: bool = True,
                 tensorboard: bool = False, wandb_project: str | None = None, run_config: dict | None = None,
                 printer=print):
        self.path = Path(output_dir) / "metrics.jsonl"
        self.every, self.enabled, self.printer = max(1, every), enabled, printer
        self.history: list[dict[str, Any]] = []
        self._header_printed = False
        self._columns: list[str] = []
        self.sinks: ScalarSinks | None = None
        self._t0 = time.perf_counter()
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.sinks = ScalarSinks(output_dir, tensorboard=tensorboard, wandb_project=wandb_project,
                                     run_config=run_config)

    def resume_at(self, step: int) -> int:
        """Continue a run resumed at ``step``: keep the rows of steps ``<= step`` (the file is
        rewritten atomically; a torn last line from a crash is dropped), load them into the
        history and continue ``time_s`` from the last kept row. Returns the rows dropped."""
        kept: list[dict[str, Any]] = []
        dropped = 0
        if self.path.is_file():
            for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines():
                try:
                    row = json.loads(line)
                except ValueError:
                    dropped += 1
                    continue
                if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= step:
                    kept.append(row)
                else:
                    dropped += 1
        self.history = kept
        if self.sinks is not None:
            self.sinks.resume_at(step)
        if kept and _finite_number(kept[-1].get("time_s")):
            self._t0 = time.perf_counter() - kept[-1]["time_s"]
        if self.enabled and (dropped or self.path.is_file()):
            text = "".join(json.dumps(r, allow_nan=False) + "\n" for r in map(strict_json_row, kept))
            try:
                atomic_write_text(self.path, text)
            except OSError as e:
                if is_disk_full(e):
                    raise disk_full_error(e, self.path, "training metrics") from e
                raise
        return dropped

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        row = {"step": step, "time_s": round(time.perf_counter() - self._t0, 3), **metrics}
        self.history.append(row)
        if not self.enabled:
            return
        try:
            with self.path.open("a") as f:
                f.write(json.dumps(strict_json_row(row), allow_nan=False) + "\n")
        except OSError as e:
            if is_disk_full(e):
                raise disk_full_error(e, self.path, "training metrics") from e
            raise
        self.sinks.write(step, metrics)
        if step % self.every == 0 or step == 1:
            self._print_row(row)

    def _print_row(self, row: dict) -> None:
        if not self._header_printed:
            self._columns = list(row)
            self.printer("  ".join(f"{c:>12}" for c in self._columns))
            self._header_printed = True
        self.printer("  ".join(_fmt(row.get(c)).rjust(12) for c in self._columns))

    def summary(self) -> dict[str, dict[str, float]]:
        """``{metric: {first, last, mean}}`` over the finite numeric values of each metric."""
        keys: list[str] = []
        for r in self.history:
            keys += [k for k in r if k not in ("step", "time_s") and k not in keys]
        out = {}
        for k in keys:
            vals = [r[k] for r in self.history if _finite_number(r.get(k))]
            if vals:
                out[k] = {"first": vals[0], "last": vals[-1], "mean": sum(vals) / len(vals)}
        return out

    def close(self) -> None:
        if self.sinks is not None:
            self.sinks.close()


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "-" if v is None else str(v)
