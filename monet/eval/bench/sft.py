"""Monet-SFT-format JSON (:mod:`monet.data.sft_format`) as an evaluation source.

Each sample becomes an :class:`EvalSample` with:

* ``question``: the user turn's text items joined with newlines (used verbatim as the prompt,
  ``prompt_style="verbatim"``); the system turn's text, if any, in ``extra["system"]``;
* ``images``: the user-turn images as file paths (resolved against ``image_root``, default the
  JSON's folder), checked to exist;
* ``answer``: the ``\\boxed{}`` content of the assistant turn;
* ``options``: parsed from the question when it lists at least two consecutive options from A
  (lines ``A. text`` / ``A) text`` / ``(A) text``) and the answer is one of their letters;
  otherwise empty (an open-ended question);
* ``category``: the sample's ``dataset_name``; ``sample_id``: ``"<benchmark>/<dataset_name>/<sample_id>"``.

Samples that do not parse, lack a boxed answer or miss an image file are skipped and reported.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

from monet.data.sft_format import ImageItem, SampleFormatError, TextItem, parse_sample
from monet.eval.bench.sample import BenchmarkFileError, EvalSample, LoadedBenchmark, LoadReport, SkippedRow
from monet.scoring.extract import extract_boxed

log = logging.getLogger(__name__)

_OPTION_LINE_RE = re.compile(r"^\s*\(?([A-Z])[.):]\)?\s+(.+?)\s*$")


def parse_inline_options(question: str) -> dict[str, str]:
    """Options listed one per line in a question (``A. red`` / ``(B) blue`` / ``C) green``):
    the run of consecutive letters starting at A; {} when fewer than two."""
    found: dict[str, str] = {}
    for line in question.splitlines():
        m = _OPTION_LINE_RE.match(line)
        if not m:
            continue
        letter, text = m.group(1), m.group(2)
        if letter == chr(ord("A") + len(found)):
            found[letter] = text
        elif letter == "A":  # a new list restarts
            found = {"A": text}
    return found if len(found) >= 2 else {}


def load_sft_eval(path: str | os.PathLike, *, image_root: str | os.PathLike | None = None,
                  benchmark: str | None = None, limit: int | None = None) -> LoadedBenchmark:
    """Load a Monet-SFT JSON file (a list of samples) as evaluation samples (see module doc)."""
    p = Path(path)
    name = benchmark or p.stem
    if not p.is_file():
        raise BenchmarkFileError(f"SFT eval file not found: {p}")
    try:
        raws = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BenchmarkFileError(f"{p}: not valid JSON: {e}") from None
    if not isinstance(raws, list):
        raise BenchmarkFileError(f"{p}: expected a JSON list of samples, got {type(raws).__name__}")
    root = Path(image_root) if image_root is not None else p.parent
    report = LoadReport(str(p), name)
    samples, seen = [], set()
    for n, raw in enumerate(raws, start=1):
        if limit is not None and len(samples) >= limit:
            break
        report.rows += 1
        try:
            s = parse_sample(raw, root)
        except SampleFormatError as e:
            report.skipped.append(SkippedRow(n, None, None, e.reason, e.detail))
            continue
        sid = f"{name}/{s.key}"
        problem = None
        answer_text = "".join(c.text for c in s.assistant.content if isinstance(c, TextItem))
        answer = extract_boxed(answer_text)
        user_items = [c for t in s.turns[:-1] if t.role != "system" for c in t.content]
        question = "\n".join(c.text for c in user_items if isinstance(c, TextItem)).strip()
        images = [c for c in user_items if isinstance(c, ImageItem)]
        if sid in seen:
            problem = ("duplicate_index", f"sample key {s.key} appears more than once")
        elif not answer:
            problem = ("missing_answer", "assistant turn has no \\boxed{} answer")
        elif not question:
            problem = ("missing_question", "user turn has no text")
        else:
            missing = [str(im.file) for im in images if not im.file.is_file()]
            if missing:
                problem = ("missing_image", f"image file not found: {missing[0]}")
        if problem:
            report.skipped.append(SkippedRow(n, None, s.key, *problem))
            continue
        options = parse_inline_options(question)
        if answer.strip().strip("()").upper() not in options:
            options = {}
        system = s.turn("system")
        extra = {"prompt_style": "verbatim", **({"system": "\n".join(c.text for c in system.content
                                                                     if isinstance(c, TextItem))} if system else {})}
        samples.append(EvalSample(sample_id=sid, benchmark=name, images=tuple(im.file for im in images),
                                  question=question, options=options,
                                  answer=answer.strip().strip("()").upper() if options else answer,
                                  category=s.dataset_name, extra=extra))
        seen.add(sid)
    for skip in report.skipped:
        log.warning("skipping %s", skip.describe(p))
    report.loaded = len(samples)
    if not samples:
        raise BenchmarkFileError(f"{p}: no valid samples out of {report.rows} "
                                 f"(skipped: {report.counts_by_reason()})")
    return LoadedBenchmark(samples, report)
