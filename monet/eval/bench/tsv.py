"""Reader for benchmark files in VLMEvalKit's TSV format (see :mod:`monet.eval.bench.specs`).

Reading is two passes over the parsed rows: the first collects every row's ``index`` and image
cell (an image cell of <= 64 characters is a reference to another row's ``index``, VLMEvalKit's
deduplication), the second validates each row and builds an :class:`EvalSample` holding the
decoded image bytes. Peak memory is about twice the file size (use ``limit`` for quick runs).

Row checks (a failing row is skipped and recorded, never silently dropped): field count equals
the header's; ``index`` non-empty and unique; ``question`` non-empty; at least
``spec.min_options`` options; ``answer`` is one of the option letters; every image decodes from
base64 and has a recognisable image header (PIL, header only), or its path exists; an image
reference points at a row with a real image. Literal lists (options, multi-image cells) are parsed
with :func:`ast.literal_eval`, which evaluates no code.
"""

from __future__ import annotations

import ast
import base64
import binascii
import csv
import io
import logging
import os
import re
import string
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from monet.eval.bench.sample import (BenchmarkFileError, EvalSample, ImageData, LoadedBenchmark, LoadReport,
                                     SkippedRow)
from monet.eval.bench.specs import BenchmarkSpec

log = logging.getLogger(__name__)

_REF_MAX_LEN = 64  # VLMEvalKit: an image cell this short is the index of another row
_PREFIX_RE = re.compile(r"^\s*\(([A-Z])\)\s?(.*)$", re.DOTALL)
_LETTERS = tuple(string.ascii_uppercase)


class _RowError(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def _literal_list(cell: str, what: str) -> list[str]:
    try:
        value = ast.literal_eval(cell)
    except (ValueError, SyntaxError, MemoryError, RecursionError) as e:
        raise _RowError(f"bad_{what}", f"{what} cell is not a literal list: {type(e).__name__}") from None
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise _RowError(f"bad_{what}", f"{what} cell is not a list of strings")
    return list(value)


def _decode_image(cell: str) -> bytes:
    try:
        data = base64.b64decode("".join(cell.split()), validate=True)
    except (binascii.Error, ValueError):
        raise _RowError("bad_image", "image cell is not valid base64") from None
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.format is None:
                raise _RowError("bad_image", "image data has no known format")
    except (UnidentifiedImageError, OSError):
        raise _RowError("bad_image", f"decoded image data ({len(data)} bytes) is not an image") from None
    except Image.DecompressionBombError as e:  # not an OSError; PIL's pixel limit, kept as is
        raise _RowError("bad_image", f"image exceeds PIL's pixel limit: {e}") from None
    return data


def _image_cells(cell: str) -> list[str]:
    cell = cell.strip()
    if cell.startswith("["):
        return _literal_list(cell, "image")
    return [cell]


class _Reader:
    def __init__(self, path: Path, spec: BenchmarkSpec, limit: int | None):
        self.path, self.spec, self.limit = path, spec, limit
        self.report = LoadReport(str(path), spec.name)

    def read_rows(self) -> tuple[list[str], list[tuple[int, int, list[str]]]]:
        csv.field_size_limit(2**31 - 1)  # base64 images are far larger than csv's 128 KiB default
        rows = []
        try:
            with open(self.path, newline="", encoding="utf-8") as f:
                reader = csv.reader(f, delimiter="\t")
                try:
                    header = next(reader)
                except StopIteration:
                    raise BenchmarkFileError(f"{self.path}: empty file (no header row)") from None
                line = reader.line_num + 1
                for n, row in enumerate(reader, start=1):
                    rows.append((n, line, row))
                    line = reader.line_num + 1
        except UnicodeDecodeError as e:
            raise BenchmarkFileError(f"{self.path}: not UTF-8 text ({e})") from None
        except csv.Error as e:
            raise BenchmarkFileError(f"{self.path}: unreadable TSV near line {reader.line_num}: {e}") from None
        return [h.strip() for h in header], rows

    def check_header(self, header: list[str]) -> None:
        missing = [c for c in ("index", "question", "answer") if c not in header]
        if "image" not in header and "image_path" not in header:
            missing.append("image (or image_path)")
        has_letters = any(c in header for c in _LETTERS[:2])
        if not has_letters and (self.spec.options_column is None or self.spec.options_column not in header):
            missing.append("option columns A, B, ..." +
                           (f" (or {self.spec.options_column!r})" if self.spec.options_column else ""))
        if missing:
            raise BenchmarkFileError(f"{self.path}: not a {self.spec.name} TSV: missing column(s) "
                                     f"{', '.join(missing)}; header has {header}")

    def options(self, rec: dict[str, str]) -> tuple[dict[str, str], dict[str, Any]]:
        opts = {c: rec[c].strip() for c in _LETTERS if rec.get(c, "").strip() != ""}
        extra: dict[str, Any] = {}
        col = self.spec.options_column
        if not opts and col is not None and col in rec:
            cell = rec[col].strip()
            if cell and cell.lower() != "nan":
                items = _literal_list(cell, "options")
                extra["options_raw"] = items
                for i, item in enumerate(items):
                    if self.spec.options_prefixed:
                        m = _PREFIX_RE.match(item)
                        if not m:
                            raise _RowError("bad_options", f"option {i} {item[:40]!r} lacks a '(X) ' prefix")
                        key, text = m.group(1), m.group(2).strip()
                    else:
                        if i >= len(_LETTERS):
                            raise _RowError("bad_options", "more than 26 options")
                        key, text = _LETTERS[i], item.strip()
                    if key in opts:
                        raise _RowError("bad_options", f"option {key} given twice")
                    opts[key] = text
            elif self.spec.options_in_image_letters:
                opts = {k: "" for k in self.spec.options_in_image_letters}
                extra["options_in_image"] = True
        return opts, extra

    def images(self, rec: dict[str, str], image_by_index: dict[str, str]) -> tuple[ImageData, ...]:
        cell = rec.get("image", "").strip()
        if cell:
            if len(cell) <= _REF_MAX_LEN and not cell.startswith("["):
                target = image_by_index.get(cell)
                if target is None or len(target) <= _REF_MAX_LEN:
                    raise _RowError("bad_image", f"image cell {cell!r} refers to no row with an image")
                cell = target
            return tuple(_decode_image(c) for c in _image_cells(cell))
        pcell = rec.get("image_path", "").strip()
        if not pcell:
            raise _RowError("missing_image", "no image and no image_path")
        paths = []
        for p in _image_cells(pcell):
            full = Path(p) if os.path.isabs(p) else self.path.parent / p
            if not full.is_file():
                raise _RowError("missing_image", f"image file not found: {full}")
            paths.append(full)
        return tuple(paths)

    def build(self, rec: dict[str, str], image_by_index: dict[str, str], seen: set[str]) -> EvalSample:
        spec = self.spec
        index = rec["index"].strip()
        if not index:
            raise _RowError("missing_index", "empty index")
        if index in seen:
            raise _RowError("duplicate_index", f"index {index} appears more than once")
        question = rec["question"].strip()
        if not question:
            raise _RowError("missing_question", "empty question")
        opts, extra = self.options(rec)
        if len(opts) < spec.min_options:
            raise _RowError("bad_options", f"{len(opts)} option(s), need at least {spec.min_options}")
        answer = rec["answer"].strip()
        if answer not in opts:
            raise _RowError("bad_answer", f"answer {answer!r} is not one of the options {sorted(opts)}")
        images = self.images(rec, image_by_index)

        def col(name):
            v = rec.get(name, "").strip() if name else ""
            return v if v and v.lower() != "nan" else None

        for c in spec.extra_columns:
            if col(c) is not None:
                extra[c] = col(c)
        return EvalSample(sample_id=f"{spec.name}/{index}", benchmark=spec.name, images=images,
                          question=question, options=opts, answer=answer,
                          category=col(spec.category_column), subcategory=col(spec.subcategory_column),
                          hint=col("hint"), extra=extra)

    def load(self) -> LoadedBenchmark:
        header, rows = self.read_rows()
        self.check_header(header)
        recs, image_by_index = [], {}
        for n, line, row in rows:
            self.report.rows += 1
            if len(row) != len(header):
                recs.append((n, line, None, f"{len(row)} fields, header has {len(header)}"))
                continue
            rec = dict(zip(header, row))
            recs.append((n, line, rec, None))
            if rec.get("image", "").strip():
                image_by_index.setdefault(rec["index"].strip(), rec["image"].strip())
        samples, seen = [], set()
        for n, line, rec, problem in recs:
            if self.limit is not None and len(samples) >= self.limit:
                break
            try:
                if problem is not None:
                    raise _RowError("bad_field_count", problem)
                sample = self.build(rec, image_by_index, seen)
            except _RowError as e:
                idx = (rec.get("index", "").strip() or None) if rec else None
                skip = SkippedRow(n, line, idx, e.reason, e.detail)
                self.report.skipped.append(skip)
                log.warning("skipping %s", skip.describe(self.path))
                continue
            seen.add(rec["index"].strip())
            samples.append(sample)
        self.report.loaded = len(samples)
        if not samples:
            reasons = ", ".join(f"{k}={v}" for k, v in sorted(self.report.counts_by_reason().items()))
            first = self.report.skipped[0].describe(self.path) if self.report.skipped else "no data rows"
            raise BenchmarkFileError(f"{self.path}: no valid {self.spec.name} rows out of {self.report.rows} "
                                     f"(skipped: {reasons or 'none'}); first problem: {first}")
        return LoadedBenchmark(samples, self.report)


def load_vlmeval_tsv(path: str | os.PathLike, spec: BenchmarkSpec, *, limit: int | None = None) -> LoadedBenchmark:
    """Read a VLMEvalKit-format TSV as described by ``spec``; skip and report malformed rows.

    ``limit`` stops after that many valid samples. Raises :class:`BenchmarkFileError` for a
    missing file, a header without the required columns, or a file without a valid row.
    """
    p = Path(path)
    if not p.is_file():
        raise BenchmarkFileError(f"{spec.name} file not found: {p}")
    return _Reader(p, spec, limit).load()


__all__ = ["load_vlmeval_tsv"]
