"""RL prompts: Thyme-RL-style parquet rows, validated, and a synthetic split in the same schema.

Schema (one row per prompt; extra columns are ignored):

* ``images``: a list of images, each raw encoded bytes (PNG/JPEG...), a base64 string of them, or
  a ``{"bytes": ...}`` struct (how Hugging Face ``datasets`` stores an ``Image`` feature); a
  single ``image`` column of the same kinds is accepted instead;
* ``question``: the user text (may be empty when an image carries the question, but must be a str);
* ``solution``: the reference; the content of its last ``\\boxed{}`` when it has one, else the
  whole stripped text, is the answer the reward compares with.

Every bad row is rejected with a reason (missing column, undecodable image, empty solution...),
counted in :class:`RLDataReport`; loading never stops on one bad row. Nothing in the file is
executed: parquet via ``pyarrow``, images decoded by PIL.

:func:`synthesize_rl_split` writes the synthetic zoom-in questions of :mod:`monet.data.synth`
(same scenes, questions and answers, without the reasoning trace) in this schema.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from monet.model.requests import LatentRequest
from monet.rl.rollout import RLPrompt
from monet.scoring import extract_boxed


@dataclass(frozen=True)
class RLExample:
    """A validated row: ``index`` (row number over all files), ``images`` (RGB PIL images),
    ``question``, ``answer`` (reference), ``source`` (``file:row``)."""

    index: int
    images: tuple
    question: str
    answer: str
    source: str

    def prompt(self, *, force_latent: bool = False) -> RLPrompt:
        req = LatentRequest(prompt=self.question, images=list(self.images), force_latent=force_latent)
        return RLPrompt(index=self.index, request=req, answer=self.answer, question=self.question)


@dataclass
class RLDataReport:
    """``loaded`` rows kept, ``rejected`` reason -> count, ``examples`` reason -> first few sources."""

    loaded: int = 0
    rejected: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def reject(self, reason: str, source: str) -> None:
        self.rejected[reason] += 1
        self.examples.setdefault(reason, [])
        if len(self.examples[reason]) < 3:
            self.examples[reason].append(source)

    def summary(self) -> str:
        lines = [f"{self.loaded} RL prompts loaded, {sum(self.rejected.values())} rejected"]
        for reason, n in self.rejected.most_common():
            lines.append(f"  {n} x {reason} (e.g. {', '.join(self.examples[reason])})")
        return "\n".join(lines)


def _image_bytes(item: Any) -> bytes:
    if isinstance(item, dict):
        if item.get("bytes") is None:
            raise ValueError("image struct without bytes" + (f" (path {item.get('path')!r} is not read)"
                                                             if item.get("path") else ""))
        item = item["bytes"]
    if isinstance(item, (bytes, bytearray, memoryview)):
        return bytes(item)
    if isinstance(item, str):
        text = item.split(",", 1)[1] if item.startswith("data:") and "," in item else item
        try:
            return base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("image string is not base64") from None
    raise ValueError(f"image of type {type(item).__name__} (expected bytes, base64 str or {{'bytes': ...}})")


def decode_image(item: Any):
    """An RGB PIL image from one ``images`` entry; ``ValueError`` saying why not."""
    from PIL import Image

    data = _image_bytes(item)
    if not data:
        raise ValueError("empty image bytes")
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            img = im.convert("RGB")
    except Exception as e:  # PIL raises several types for undecodable data
        raise ValueError(f"undecodable image ({type(e).__name__})") from None
    if min(img.size) < 1:
        raise ValueError("empty image")
    return img


def reference_answer(solution: str) -> str:
    """The answer a solution states: its last ``\\boxed{}`` content, else the whole stripped text."""
    boxed = extract_boxed(solution)
    return (boxed if boxed is not None else solution).strip()


def _validate_row(row: dict, source: str) -> tuple[tuple, str, str]:
    if "images" in row and row["images"] is not None:
        items = row["images"]
        if isinstance(items, (bytes, str, dict)):
            items = [items]
        items = list(items)
    elif row.get("image") is not None:
        items = [row["image"]]
    else:
        raise ValueError("missing images")
    if not items:
        raise ValueError("no images")
    images = []
    for i, it in enumerate(items):
        try:
            images.append(decode_image(it))
        except ValueError as e:
            raise ValueError(f"images[{i}]: {e}") from None
    q = row.get("question")
    if not isinstance(q, str):
        raise ValueError("missing question" if q is None else f"question is a {type(q).__name__}, not a str")
    sol = row.get("solution")
    if not isinstance(sol, str):
        raise ValueError("missing solution" if sol is None else f"solution is a {type(sol).__name__}, not a str")
    ans = reference_answer(sol)
    if not ans:
        raise ValueError("empty solution")
    return tuple(images), q, ans


def _reason(msg: str) -> str:
    """The category of a rejection message (``images[3]: undecodable image (X)`` -> ``undecodable image``)."""
    msg = msg.split(": ", 1)[1] if msg.startswith("images[") else msg
    return msg.split(" (", 1)[0]


def load_rl_parquet(paths: str | os.PathLike | Sequence[str | os.PathLike], *,
                    limit: int | None = None) -> tuple[list[RLExample], RLDataReport]:
    """Read and validate RL prompts from parquet files (module docstring). Row indices continue
    across files in the order given. A missing or unreadable file is an error naming it."""
    import pyarrow.parquet as pq

    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    report = RLDataReport()
    out: list[RLExample] = []
    index = 0
    for path in map(Path, paths):
        if not path.is_file():
            raise FileNotFoundError(f"RL data file not found: {path}")
        try:
            table = pq.read_table(path)
        except Exception as e:
            raise ValueError(f"{path}: not a readable parquet file ({type(e).__name__}: {e})") from None
        for r, row in enumerate(table.to_pylist()):
            source = f"{path.name}:{r}"
            try:
                images, q, ans = _validate_row(row, source)
            except ValueError as e:
                report.reject(_reason(str(e)), source)
            else:
                out.append(RLExample(index, images, q, ans, source))
                report.loaded += 1
            index += 1
            if limit is not None and len(out) >= limit:
                return out, report
    return out, report


def write_rl_parquet(path: str | os.PathLike, rows: Sequence[dict]) -> Path:
    """Write rows (``images`` as lists of bytes, ``question``, ``solution``, any extra str columns)
    to a parquet file atomically."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from monet.atomic import atomic_write_bytes

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(list(rows)), buf)
    atomic_write_bytes(path, buf.getvalue())
    return path


def synthesize_rl_split(path: str | os.PathLike, n: int, seed: int = 0) -> Path:
    """Write ``n`` synthetic RL prompts (scenes, questions and answers of :mod:`monet.data.synth`;
    the image as PNG bytes, ``solution = "\\boxed{answer}"``) to ``path``. Deterministic in
    ``(n, seed)``; its scenes come from a stream separate from the SFT splits'."""
    from monet.data import synth

    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an int >= 1, got {n!r}")
    rows = []
    for i in range(n):
        scene = synth._random_scene(random.Random(f"monet-synth/{seed}/rl/{i}"))
        sample = synth._sample_json(scene, f"rl-{i:06d}", "scene.png", "zoom.png")
        user = next(m for m in sample["data"] if m["role"] == "user")
        question = next(c["text"] for c in user["content"] if c["type"] == "text")
        assistant = next(m for m in sample["data"] if m["role"] == "assistant")
        answer = extract_boxed(assistant["content"][-1]["text"])
        rows.append({"id": f"rl-{i:06d}", "images": [synth._png_bytes(synth._draw(scene))], "question": question,
                     "solution": f"\\boxed{{{answer}}}"})
    return write_rl_parquet(path, rows)


def rl_split_from_sft(json_paths: str | os.PathLike | Sequence[str | os.PathLike], path: str | os.PathLike, *,
                      image_root: str | os.PathLike | None = None, limit: int | None = None) -> Path:
    """Write the questions of Monet-SFT samples as RL prompts (this module's parquet schema) to
    ``path``: the user turn's text and images (PNG bytes as stored), ``solution`` = the reference
    assistant turn's last ``\\boxed{}``. The reasoning trace and helper images are dropped.

    The quickstart's VLPO phase runs on its own SFT *training* split this way, so RL never sees a
    validation or held-out scene. A sample without a boxed answer is an error naming it (an RL
    prompt without a reference could never be rewarded); ``limit`` keeps the first samples."""
    from monet.data.sft_format import ImageItem, TextItem
    from monet.data.sft_loader import load_sft_dataset

    samples, report = load_sft_dataset(json_paths, image_root)
    if report.rejected:
        raise ValueError(f"{json_paths}: {report.rejected} sample(s) rejected; fix the data first:\n{report.summary()}")
    if limit is not None:
        samples = samples[:limit]
    if not samples:
        raise ValueError(f"{json_paths}: no samples to convert")
    rows = []
    for s in samples:
        question = " ".join(c.text for c in s.user.content if isinstance(c, TextItem)).strip()
        images = [Path(c.file).read_bytes() for c in s.user.content if isinstance(c, ImageItem)]
        last = next((c.text for c in reversed(s.assistant.content) if isinstance(c, TextItem)), "")
        answer = extract_boxed(last)
        if not answer:
            raise ValueError(f"{s.key}: the reference assistant turn has no \\boxed{{}} answer; an RL prompt needs one")
        rows.append({"id": str(s.key), "images": images, "question": question, "solution": f"\\boxed{{{answer}}}"})
    return write_rl_parquet(path, rows)
