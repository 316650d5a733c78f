"""Tiny shared helper for the benchmarks: collect per-case medians, write JSON, print ratio tables.

On the shared 2-core machines only ratios measured side by side in one run mean
anything, so a :class:`Report` stores the median time of every implementation of a case and the
ratios ``other / baseline``. Goals are reported (met / missed), never asserted.

    rep = Report("ops", baseline="native", others=("reference", "composite"))
    rep.record("latent_embed_[B=16,D=1024]", "native", 3.1e-6, op="latent_embed_", params={"B": 16})
    rep.write("benchmarks/results/ops.json"); print(rep.table())
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable


@dataclass
class Goal:
    """``ratio`` (e.g. ``"composite/native"``) must reach ``threshold`` where ``applies(case)``."""

    description: str
    ratio: str
    threshold: float
    applies: Callable[["Case"], bool] = lambda case: True

    def verdict(self, case: "Case", baseline: str) -> bool | None:
        """True / False where the goal applies and the ratio is known, else None."""
        if not self.applies(case):
            return None
        r = case.ratios(baseline).get(self.ratio)
        return None if r is None else r >= self.threshold


@dataclass
class Case:
    name: str
    op: str = ""
    params: dict = field(default_factory=dict)
    median_s: dict[str, float] = field(default_factory=dict)
    min_s: dict[str, float] = field(default_factory=dict)

    def ratios(self, baseline: str) -> dict[str, float]:
        base = self.median_s.get(baseline)
        if not base:
            return {}
        return {f"{impl}/{baseline}": t / base for impl, t in self.median_s.items() if impl != baseline}


def machine_info() -> dict:
    info = {"python": platform.python_version(), "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(), "cpu_count": os.cpu_count()}
    try:
        import torch

        info.update(torch=torch.__version__, torch_threads=torch.get_num_threads(),
                    cuda=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
    except ImportError:  # pragma: no cover
        pass
    return info


class Report:
    """Medians per (case, implementation); ratios against ``baseline``; optional goals."""

    def __init__(self, name: str, baseline: str = "native", others: tuple[str, ...] = (),
                 goals: tuple[Goal, ...] = (), note: str = ""):
        self.name, self.baseline, self.others, self.note = name, baseline, tuple(others), note
        self.goals = list(goals)
        self.cases: dict[str, Case] = {}

    def record(self, case: str, impl: str, median_s: float, *, min_s: float | None = None, op: str = "",
               params: dict | None = None) -> None:
        c = self.cases.setdefault(case, Case(case, op))
        c.params.update(params or {})  # implementations may add their own keys
        c.median_s[impl] = float(median_s)
        if min_s is not None:
            c.min_s[impl] = float(min_s)
        if impl not in (self.baseline, *self.others):
            self.others += (impl,)

    def record_times(self, case: str, times: dict[str, list[float]], *, op: str = "",
                     params: dict | None = None) -> None:
        """Record the median (and min) of each implementation's per-call times."""
        for impl, ts in times.items():
            self.record(case, impl, statistics.median(ts), min_s=min(ts), op=op, params=params)

    def impls(self) -> list[str]:
        return [self.baseline, *self.others]

    def to_dict(self) -> dict:
        cases = []
        for c in self.cases.values():
            entry = {"case": c.name, "op": c.op, "params": c.params, "median_s": c.median_s,
                     "ratios": c.ratios(self.baseline)}
            if c.min_s:
                entry["min_s"] = c.min_s
            verdicts = {g.description: g.verdict(c, self.baseline) for g in self.goals}
            if any(v is not None for v in verdicts.values()):
                entry["goals"] = {k: v for k, v in verdicts.items() if v is not None}
            cases.append(entry)
        return {
            "name": self.name,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "machine": machine_info(),
            "baseline": self.baseline,
            "note": self.note,
            "goals": [{"description": g.description, "ratio": g.ratio, "threshold": g.threshold} for g in self.goals],
            "cases": cases,
        }

    def write(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    def table(self) -> str:
        impls = self.impls()
        ratio_keys = [f"{o}/{self.baseline}" for o in self.others]
        headers = ["case", *[f"{i} us" for i in impls], *ratio_keys, *(["goal"] if self.goals else [])]
        rows = []
        for c in self.cases.values():
            r = c.ratios(self.baseline)
            row = [c.name, *[_us(c.median_s.get(i)) for i in impls], *[_x(r.get(k)) for k in ratio_keys]]
            if self.goals:
                verdicts = [g.verdict(c, self.baseline) for g in self.goals]
                row.append(" ".join("-" if v is None else ("met" if v else "MISSED") for v in verdicts))
            rows.append(row)
        lines = [format_table(headers, rows)]
        for i, g in enumerate(self.goals):
            verdicts = [g.verdict(c, self.baseline) for c in self.cases.values()]
            met = sum(v is True for v in verdicts)
            judged = sum(v is not None for v in verdicts)
            lines.append(f"goal{'' if len(self.goals) == 1 else f' {i + 1}'}: {g.description} "
                         f"({g.ratio} >= {g.threshold:g}): met in {met}/{judged} applicable cases")
        return "\n".join(lines)


def synchronize(device) -> None:
    """Wait for queued GPU work, so host timers measure it (no-op on CPU)."""
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(runs: dict[str, Callable[[], object]], rounds: int = 5) -> dict[str, list[float]]:
    """Warm every run up once, then call them in alternation ``rounds`` times; per-call seconds.

    Alternating makes slow drift of a shared machine hit every implementation alike, which a
    one-after-the-other benchmark cannot (on these VMs it swings whole runs by +-10%)."""
    for fn in runs.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def _us(t: float | None) -> str:
    return "-" if t is None else f"{t * 1e6:.1f}"


def _x(r: float | None) -> str:
    return "-" if r is None else f"{r:.2f}x"


def format_table(headers: list[str], rows: list[list[str]]) -> str:
    """Plain aligned text table (first column left-aligned, the rest right-aligned)."""
    cols = list(zip(headers, *rows)) if rows else [(h,) for h in headers]
    widths = [max(len(str(v)) for v in col) for col in cols]

    def fmt(row):
        return "  ".join(str(v).ljust(w) if i == 0 else str(v).rjust(w) for i, (v, w) in enumerate(zip(row, widths)))

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([fmt(headers), sep, *(fmt(r) for r in rows)])
