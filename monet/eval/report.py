"""Evaluation records and reports.

**Per-sample records** (:class:`SampleRecord`) are appended as JSON lines, one per scored answer,
flushed (and fsync'ed) as they are written, so an interrupted run loses at most the line being
written. Resuming: :func:`read_records` reads a file back (a torn last line — no newline or not
JSON — is ignored and counted), :meth:`RecordWriter.done_ids` gives the ids already scored, and
:class:`RecordWriter` cuts a torn tail before appending so the file stays valid JSONL. Record
fields: ``sample_id, benchmark, category, answer, prediction`` (the answer read from the output),
``text`` (the rendered output), ``verdict, decided_by, detail, num_options`` and free ``extra``
(latent-span counts, timings, ...).

**Reports** (:func:`summarize`): one row per benchmark (``category == "ALL"``) and per category,
with n, correct, accuracy, its Wilson 95% interval, the chance level (mean ``1/num_options``;
None for open-ended rows), degenerate outputs, and how many verdicts were decided by rule / judge /
left undecided. :func:`write_report` writes ``report.json`` (rows + run settings + load reports)
and ``report.csv``; :func:`print_report` renders a rich table. Settings are scrubbed of any
``api_key``-like entry before writing (names of environment variables, ``*_env``, are kept).
"""

from __future__ import annotations

import csv
import json
import os
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable, Sequence

from monet.eval.diagnostics import chance_level, wilson_interval

ALL = "ALL"


@dataclass(frozen=True)
class SampleRecord:
    sample_id: str
    benchmark: str
    category: str | None
    answer: str
    prediction: str | None
    text: str
    verdict: str
    decided_by: str
    detail: str = ""
    num_options: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.verdict not in ("correct", "incorrect", "degenerate"):
            raise ValueError(f"record {self.sample_id}: verdict {self.verdict!r} is not correct/incorrect/degenerate")
        if self.decided_by not in ("rule", "judge", "undecided"):
            raise ValueError(f"record {self.sample_id}: decided_by {self.decided_by!r} is not rule/judge/undecided")

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False)

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "") -> "SampleRecord":
        names = {f.name for f in fields(cls)}
        missing = [n for n in ("sample_id", "benchmark", "answer", "text", "verdict", "decided_by") if n not in d]
        if missing:
            raise ValueError(f"{where}: record lacks field(s) {missing}")
        return cls(**{k: v for k, v in d.items() if k in names})


def read_records(path: str | os.PathLike) -> tuple[list[SampleRecord], int]:
    """``(records, torn)``: the records of a JSONL file and 1 if its last line was torn (ignored),
    else 0. A bad line anywhere but the end is corruption, not an interruption: ValueError naming
    the line. A missing file reads as no records."""
    p = Path(path)
    if not p.exists():
        return [], 0
    raw = p.read_bytes()
    lines = raw.split(b"\n")
    torn = 0
    if lines and lines[-1] == b"":
        lines.pop()
    elif lines:  # no final newline: the last line was being written
        lines.pop()
        torn = 1
    records = []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{p}: line {n} is not JSON ({e.msg}); the file is corrupt") from None
        records.append(SampleRecord.from_dict(d, f"{p}: line {n}"))
    return records, torn


class RecordWriter:
    """Append-only JSONL writer for one run's records; safe to reopen on an interrupted file.

    ``done_ids()``: sample ids already in the file (resume by skipping them). Writing an id
    that is already present raises (a resumed run must skip it, not score it twice).
    """

    def __init__(self, path: str | os.PathLike, *, fsync: bool = True):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fsync = fsync
        records, torn = read_records(self.path)
        self.torn_lines_dropped = torn
        if torn:  # cut the torn tail so the next line starts on a line boundary
            data = self.path.read_bytes()
            with open(self.path, "r+b") as f:
                f.truncate(data.rfind(b"\n") + 1)
        self._done = {r.sample_id for r in records}
        self._f = open(self.path, "a", encoding="utf-8")

    def done_ids(self) -> set[str]:
        return set(self._done)

    def write(self, record: SampleRecord) -> None:
        if record.sample_id in self._done:
            raise ValueError(f"{self.path}: record for {record.sample_id} already written")
        self._f.write(record.to_json() + "\n")
        self._f.flush()
        if self.fsync:
            os.fsync(self._f.fileno())
        self._done.add(record.sample_id)

    def close(self) -> None:
        self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


@dataclass(frozen=True)
class AccuracyRow:
    benchmark: str
    category: str
    n: int
    correct: int
    accuracy: float
    ci_low: float
    ci_high: float
    chance: float | None
    degenerate: int
    by_rule: int
    by_judge: int
    undecided: int


def _row(benchmark: str, category: str, recs: Sequence[SampleRecord]) -> AccuracyRow:
    n = len(recs)
    correct = sum(r.verdict == "correct" for r in recs)
    lo, hi = wilson_interval(correct, n)
    chance = chance_level([r.num_options for r in recs]) if all(r.num_options > 0 for r in recs) else None
    return AccuracyRow(benchmark, category, n, correct, correct / n, lo, hi, chance,
                       sum(r.verdict == "degenerate" for r in recs),
                       sum(r.decided_by == "rule" for r in recs), sum(r.decided_by == "judge" for r in recs),
                       sum(r.decided_by == "undecided" for r in recs))


def summarize(records: Iterable[SampleRecord]) -> list[AccuracyRow]:
    """Per benchmark: an ``ALL`` row, then one row per category (sorted; ``None`` category omitted)."""
    by_bench: dict[str, list[SampleRecord]] = defaultdict(list)
    for r in records:
        by_bench[r.benchmark].append(r)
    rows = []
    for bench in sorted(by_bench):
        recs = by_bench[bench]
        rows.append(_row(bench, ALL, recs))
        by_cat: dict[str, list[SampleRecord]] = defaultdict(list)
        for r in recs:
            if r.category is not None:
                by_cat[str(r.category)].append(r)
        rows.extend(_row(bench, cat, by_cat[cat]) for cat in sorted(by_cat))
    return rows


def scrub_secrets(obj: Any) -> Any:
    """A copy of ``obj`` (nested dicts/lists) without entries whose key looks like a secret
    (``api_key``, ``token``, ``secret``, ``password``); ``*_env`` names and ``*_tokens`` counts are kept."""
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            lk = str(k).lower()
            # "*_tokens" are counts (max_new_tokens), not credentials
            secret = any(s in lk for s in ("api_key", "apikey", "token", "secret", "password"))
            if secret and not lk.endswith(("_env", "tokens")):
                continue
            out[k] = scrub_secrets(v)
        return out
    if isinstance(obj, (list, tuple)):
        return [scrub_secrets(v) for v in obj]
    return obj


def write_report(rows: Sequence[AccuracyRow], out_dir: str | os.PathLike, *,
                 settings: dict[str, Any] | None = None, extra: dict[str, Any] | None = None) -> dict[str, Path]:
    """Write ``report.json`` (``rows``, scrubbed ``settings``, ``extra`` such as load reports and
    latent diagnostics, a timestamp) and ``report.csv``; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               "settings": scrub_secrets(settings or {}), "rows": [asdict(r) for r in rows],
               **scrub_secrets(extra or {})}
    jpath, cpath = out / "report.json", out / "report.csv"
    tmp = jpath.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2, ensure_ascii=False, default=str), encoding="utf-8")
    os.replace(tmp, jpath)
    names = [f.name for f in fields(AccuracyRow)]
    with open(cpath, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=names)
        w.writeheader()
        for r in rows:
            w.writerow(asdict(r))
    return {"json": jpath, "csv": cpath}


def print_report(rows: Sequence[AccuracyRow], console=None, title: str = "monet eval") -> None:
    """Render the accuracy table with rich (to ``console`` or a new stdout console)."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    t = Table(title=title)
    for col in ("benchmark", "category", "n", "acc", "95% CI", "chance", "degen", "rule", "judge", "undecided"):
        t.add_column(col, justify="left" if col in ("benchmark", "category") else "right")
    for r in rows:
        t.add_row(r.benchmark if r.category == ALL else "", r.category, str(r.n), f"{100 * r.accuracy:.1f}",
                  f"{100 * r.ci_low:.1f}-{100 * r.ci_high:.1f}",
                  "-" if r.chance is None else f"{100 * r.chance:.1f}", str(r.degenerate),
                  str(r.by_rule), str(r.by_judge), str(r.undecided))
    console.print(t)
