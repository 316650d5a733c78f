"""The uniform evaluation sample and the load report every benchmark loader returns.

Loaders skip malformed rows instead of crashing, and account for every one of them: each skip is
a :class:`SkippedRow` (file, row, index, reason) in the :class:`LoadReport`. A file with no valid
row is an error (:class:`BenchmarkFileError`), as is a file whose header lacks a required column.
"""

from __future__ import annotations

import io
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

from PIL import Image

#: An image as a loader hands it over: encoded file bytes (PNG/JPEG/... as in the TSV), a file
#: path, or an already opened PIL image.
ImageData = Union[bytes, Path, Image.Image]


class BenchmarkFileError(ValueError):
    """A benchmark file cannot be used at all (missing, wrong header, no valid row)."""


@dataclass(frozen=True)
class EvalSample:
    """One evaluation question, whatever file it came from.

    ``sample_id`` is ``"<benchmark>/<index>"`` and unique within a load. ``options`` maps option
    letters to their texts (empty for open-ended questions; texts may be empty when the options are
    drawn in the image). ``answer`` is the reference (an option letter for multiple choice).
    ``category`` / ``subcategory`` are the benchmark's task columns (None when it has none).
    ``hint`` is VLMEvalKit's optional ``hint`` column. ``extra`` keeps other columns a benchmark
    reports on (``cycle_category``, ``difficulty``, ...) and loader notes.
    """

    sample_id: str
    benchmark: str
    images: tuple[ImageData, ...]
    question: str
    options: dict[str, str]
    answer: str
    category: str | None = None
    subcategory: str | None = None
    hint: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_options(self) -> int:
        return len(self.options)

    @property
    def is_multiple_choice(self) -> bool:
        return bool(self.options)

    def load_images(self) -> list[Image.Image]:
        """The images as RGB PIL images (decoded now; a corrupt image raises naming the sample)."""
        out = []
        for i, img in enumerate(self.images):
            try:
                if isinstance(img, Image.Image):
                    pil = img
                elif isinstance(img, (bytes, bytearray)):
                    pil = Image.open(io.BytesIO(img))
                else:
                    pil = Image.open(img)
                pil.load()
                out.append(pil.convert("RGB"))
            except (OSError, ValueError, Image.DecompressionBombError) as e:
                raise ValueError(f"sample {self.sample_id}: image {i} cannot be decoded: {e}") from e
        return out


@dataclass(frozen=True)
class SkippedRow:
    """A malformed row: ``row`` is the 1-based data row (header excluded), ``line`` the physical
    line it started on (None for JSON sources), ``index`` its id if it had one."""

    row: int
    line: int | None
    index: str | None
    reason: str
    detail: str

    def describe(self, path: str | os.PathLike) -> str:
        where = f"row {self.row}" + (f" (line {self.line})" if self.line is not None else "")
        idx = f", index {self.index}" if self.index is not None else ""
        return f"{path}: {where}{idx}: {self.reason}: {self.detail}"


@dataclass
class LoadReport:
    """What a loader read: ``rows`` seen, ``loaded`` samples, and every skipped row."""

    path: str
    benchmark: str
    rows: int = 0
    loaded: int = 0
    skipped: list[SkippedRow] = field(default_factory=list)

    def counts_by_reason(self) -> dict[str, int]:
        return dict(Counter(s.reason for s in self.skipped))

    def summary(self) -> str:
        s = f"{self.benchmark}: loaded {self.loaded} of {self.rows} rows from {self.path}"
        if self.skipped:
            reasons = ", ".join(f"{k}={v}" for k, v in sorted(self.counts_by_reason().items()))
            s += f"; skipped {len(self.skipped)} ({reasons})"
        return s

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "benchmark": self.benchmark, "rows": self.rows, "loaded": self.loaded,
                "skipped": len(self.skipped), "skipped_by_reason": self.counts_by_reason(),
                "skipped_rows": [s.describe(self.path) for s in self.skipped]}


@dataclass
class LoadedBenchmark:
    """``samples`` plus the ``report`` of how they were read."""

    samples: list[EvalSample]
    report: LoadReport

    def __len__(self) -> int:
        return len(self.samples)

    def __iter__(self):
        return iter(self.samples)
