"""Load and validate Monet-SFT JSON files; bad samples are reported, never raised.

:func:`load_sft_dataset` returns the valid samples and a :class:`RejectionReport`. A whole file
that is missing, not JSON, nested too deeply to parse, not a list, or an empty list is a
:class:`DatasetFileError` naming the path (that is a configuration error, not a bad sample).

Rejection reasons (``REASONS``):

* ``bad_structure`` / ``bad_metadata`` / ``bad_turns`` / ``bad_content``: the JSON shape is wrong
  (not an object, missing ``dataset_name``/``sample_id``, roles not ``[system,] user, assistant``,
  content items that are not text/image).
* ``placeholder_mismatch``: helper images and ``<abs_vis_token></abs_vis_token>`` placeholders do
  not pair up (a helper image whose previous item is not a text ending in the placeholder, or a
  placeholder that is not followed by a helper image). Whitespace after the placeholder is allowed.
* ``stray_special_token``: text holds a token that would corrupt the layout: Qwen control/vision
  tokens anywhere, Monet latent/observation tokens outside the assistant turn, latent tokens in
  the assistant turn other than the placeholders.
* ``observation_unbalanced``: ``<observation>``/``</observation>`` unbalanced or nested (checked
  over the whole assistant turn in order).
* ``image_in_observation``: a helper image (or its placeholder) inside an observation span.
* ``image_missing`` / ``image_unreadable``: the file does not exist, or PIL cannot verify *and
  fully decode* it (a PNG whose chunk checksums are valid but whose compressed pixel data is
  corrupt passes ``verify`` and fails only on decoding), or its aspect ratio exceeds 200
  (Qwen2.5-VL's image processor refuses those). Each file is decoded once per process: results
  are cached by (path, size, mtime), so a changed file is checked again.
* ``duplicate_id``: the ``dataset_name/sample_id`` key of an already accepted sample.
"""

from __future__ import annotations

import json
import os
import re
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Sequence

from monet.data.sft_format import (
    PLACEHOLDER,
    ImageItem,
    SampleFormatError,
    SFTSample,
    TextItem,
    Turn,
    parse_sample,
)
from monet.tokens import (
    LATENT_END,
    LATENT_PAD,
    LATENT_START,
    OBSERVATION_END,
    OBSERVATION_START,
)

REASONS: tuple[str, ...] = (
    "bad_structure",
    "bad_metadata",
    "bad_turns",
    "bad_content",
    "placeholder_mismatch",
    "stray_special_token",
    "observation_unbalanced",
    "image_in_observation",
    "image_missing",
    "image_unreadable",
    "duplicate_id",
)

#: Qwen chat/vision control tokens: never allowed inside sample text.
QWEN_CONTROL_TOKENS: tuple[str, ...] = (
    "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
)  # fmt: skip
_LATENT_TOKENS = (LATENT_PAD, LATENT_START, LATENT_END)
_OBS_TAG = re.compile(re.escape(OBSERVATION_START) + "|" + re.escape(OBSERVATION_END))
_MAX_ASPECT = 200.0


class DatasetFileError(ValueError):
    """A dataset JSON file is missing, unreadable, or not a list of samples."""


@dataclass(frozen=True)
class Rejection:
    """One rejected sample. ``index`` is its position in ``source``; ``dataset_name`` and
    ``sample_id`` are ``None`` when the sample had no readable metadata."""

    source: str
    index: int
    dataset_name: str | None
    sample_id: str | int | None
    reason: str
    detail: str

    @property
    def key(self) -> str:
        return f"{self.dataset_name}/{self.sample_id}"


@dataclass
class RejectionReport:
    """What :func:`load_sft_dataset` kept and dropped."""

    total: int = 0
    accepted: int = 0
    rejections: list[Rejection] = field(default_factory=list)

    @property
    def rejected(self) -> int:
        return len(self.rejections)

    @property
    def counts(self) -> dict[str, int]:
        """Rejections per reason, most frequent first."""
        return dict(Counter(r.reason for r in self.rejections).most_common())

    def by_dataset(self) -> dict[str, dict[str, int]]:
        out: dict[str, Counter] = {}
        for r in self.rejections:
            out.setdefault(str(r.dataset_name), Counter())[r.reason] += 1
        return {k: dict(v.most_common()) for k, v in out.items()}

    def summary(self, examples: int = 3) -> str:
        lines = [f"SFT data: {self.accepted} of {self.total} samples accepted, {self.rejected} rejected"]
        for reason, n in self.counts.items():
            lines.append(f"  {reason}: {n}")
            for r in [r for r in self.rejections if r.reason == reason][:examples]:
                lines.append(f"    - {r.key} ({Path(r.source).name}#{r.index}): {r.detail}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


def _texts(turn: Turn) -> Iterable[str]:
    return (c.text for c in turn.content if isinstance(c, TextItem))


def _check_tokens(sample: SFTSample) -> None:
    for turn in sample.turns:
        for text in _texts(turn):
            for tok in QWEN_CONTROL_TOKENS:
                if tok in text:
                    raise SampleFormatError("stray_special_token", f"{turn.role} text contains {tok}")
            if turn.role != "assistant":
                for tok in (*_LATENT_TOKENS, OBSERVATION_START, OBSERVATION_END):
                    if tok in text:
                        raise SampleFormatError("stray_special_token", f"{turn.role} text contains {tok}")


def _check_placeholders(assistant: Turn) -> None:
    content = assistant.content
    n_images = sum(isinstance(c, ImageItem) for c in content)
    n_placeholders = sum(t.count(PLACEHOLDER) for t in _texts(assistant))
    if n_images != n_placeholders:
        raise SampleFormatError(
            "placeholder_mismatch", f"{n_placeholders} placeholders but {n_images} helper images")
    for i, c in enumerate(content):
        if isinstance(c, ImageItem):
            prev = content[i - 1] if i else None
            if not isinstance(prev, TextItem) or not prev.text.rstrip().endswith(PLACEHOLDER):
                raise SampleFormatError(
                    "placeholder_mismatch",
                    f"helper image {c.path!r} is not directly preceded by a text ending in {PLACEHOLDER}")
    for text in _texts(assistant):
        rest = text.replace(PLACEHOLDER, "")
        for tok in _LATENT_TOKENS:
            if tok in rest:
                raise SampleFormatError("stray_special_token", f"assistant text contains {tok} outside a placeholder")


def _check_observations(assistant: Turn) -> None:
    open_ = False
    for c in assistant.content:
        if isinstance(c, ImageItem):
            if open_:
                raise SampleFormatError("image_in_observation", f"helper image {c.path!r} inside an observation")
            continue
        for piece in re.split(f"({_OBS_TAG.pattern})", c.text):
            if piece == OBSERVATION_START:
                if open_:
                    raise SampleFormatError("observation_unbalanced", "nested <observation>")
                open_ = True
            elif piece == OBSERVATION_END:
                if not open_:
                    raise SampleFormatError("observation_unbalanced", "</observation> without <observation>")
                open_ = False
            elif open_ and PLACEHOLDER in piece:
                raise SampleFormatError("image_in_observation", "placeholder inside an observation")
    if open_:
        raise SampleFormatError("observation_unbalanced", "<observation> never closed")


def validate_structure(sample: SFTSample) -> None:
    """Text-level checks (no file access); raise :class:`SampleFormatError`."""
    _check_tokens(sample)
    _check_placeholders(sample.assistant)
    _check_observations(sample.assistant)


ImageCheck = tuple[tuple[int, int] | None, str | None, str | None]
_IMAGE_CHECKS: dict[tuple[str, int, int], ImageCheck] = {}
_IMAGE_CHECKS_LOCK = threading.Lock()


def _decode_image_file(file: Path) -> ImageCheck:
    from PIL import Image

    try:
        with Image.open(file) as im:
            size = im.size
            im.verify()  # structure and chunk checksums
        with Image.open(file) as im:  # verify() leaves the image unusable: reopen to decode
            im.load()  # the pixel data itself (corrupt compressed data only fails here)
    except Exception as e:  # PIL raises many types for corrupt files
        return None, "image_unreadable", f"{file}: {type(e).__name__}: {e}"
    w, h = size
    if min(w, h) < 1 or max(w, h) / min(w, h) > _MAX_ASPECT:
        return None, "image_unreadable", f"{file}: size {w}x{h} (aspect ratio over {_MAX_ASPECT:g})"
    return size, None, None


def check_image_file(file: Path) -> ImageCheck:
    """``(size, reason, detail)``: the (width, height) of a readable image, else why not.

    The image is verified and fully decoded; the result is cached per process by (path, file
    size, mtime), so repeated loads of a data set decode each image once."""
    try:
        st = os.stat(file)
    except OSError:
        st = None
    if st is None or not Path(file).is_file():
        return None, "image_missing", f"{file} does not exist"
    key = (str(file), st.st_size, st.st_mtime_ns)
    with _IMAGE_CHECKS_LOCK:
        hit = _IMAGE_CHECKS.get(key)
    if hit is not None:
        return hit
    result = _decode_image_file(Path(file))
    with _IMAGE_CHECKS_LOCK:
        _IMAGE_CHECKS[key] = result
    return result


def _read_json_list(path: Path) -> list[Any]:
    if not path.is_file():
        raise DatasetFileError(f"SFT data file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except RecursionError:
        raise DatasetFileError(f"SFT data file {path} is nested too deeply to parse (a sample is a few "
                               "levels deep; the file is not in the Monet-SFT format)") from None
    except (OSError, ValueError) as e:
        raise DatasetFileError(f"SFT data file {path} is not readable JSON: {e}") from e
    if not isinstance(data, list):
        raise DatasetFileError(f"SFT data file {path} must hold a JSON list of samples, got {type(data).__name__}")
    if not data:
        raise DatasetFileError(f"SFT data file {path} holds no samples (an empty list)")
    return data


def _meta_of(raw: Any) -> tuple[str | None, Any]:
    meta = raw.get("metadata") if isinstance(raw, dict) else None
    if not isinstance(meta, dict):
        return None, None
    return meta.get("dataset_name"), meta.get("sample_id")


def load_sft_dataset(
    json_paths: str | os.PathLike | Sequence[str | os.PathLike],
    image_root: str | os.PathLike | None = None,
    *,
    check_images: bool = True,
    workers: int = 8,
) -> tuple[list[SFTSample], RejectionReport]:
    """Read Monet-SFT JSON files, validate every sample, return ``(samples, report)``.

    Args:
        json_paths: one file or a list of files (each a JSON list of samples).
        image_root: folder the relative image paths are relative to; ``None`` = the folder of each
            JSON file.
        check_images: verify and fully decode every referenced image once (threads: ``workers``;
            cached per process by path, size and mtime); accepted samples then carry each
            image's ``size``.

    Samples keep file order. A sample with a problem is left out and recorded in the report (see
    the module docstring for reasons); a missing file, invalid or too deeply nested JSON, a
    non-list top level or an empty list raises :class:`DatasetFileError`.
    """
    paths = [json_paths] if isinstance(json_paths, (str, os.PathLike)) else list(json_paths)
    if not paths:
        raise DatasetFileError("no SFT data files given")
    report = RejectionReport()
    parsed: list[tuple[str, int, SFTSample]] = []
    for p in paths:
        path = Path(p)
        root = Path(image_root) if image_root is not None else path.parent
        for index, raw in enumerate(_read_json_list(path)):
            report.total += 1
            try:
                sample = parse_sample(raw, root)
                validate_structure(sample)
            except SampleFormatError as e:
                name, sid = _meta_of(raw)
                report.rejections.append(Rejection(str(path), index, name, sid, e.reason, e.detail))
                continue
            parsed.append((str(path), index, sample))

    image_info: dict[Path, tuple] = {}
    if check_images:
        files = list(dict.fromkeys(im.file for _, _, s in parsed for t in s.turns for im in t.images))
        with ThreadPoolExecutor(max(1, workers)) as pool:
            image_info = dict(zip(files, pool.map(check_image_file, files)))

    samples: list[SFTSample] = []
    seen: set[str] = set()
    for source, index, sample in parsed:
        problem = None
        if check_images:
            for t in sample.turns:
                for im in t.images:
                    _, reason, detail = image_info[im.file]
                    if reason is not None:
                        problem = (reason, detail)
                        break
                if problem:
                    break
        if problem is None and sample.key in seen:
            problem = ("duplicate_id", f"{sample.key} already seen")
        if problem is not None:
            report.rejections.append(
                Rejection(source, index, sample.dataset_name, sample.sample_id, *problem))
            continue
        seen.add(sample.key)
        if check_images:
            sample = _with_sizes(sample, image_info)
        samples.append(sample)
    report.accepted = len(samples)
    return samples, report


def _with_sizes(sample: SFTSample, info: dict[Path, tuple]) -> SFTSample:
    def fix(c):
        return replace(c, size=info[c.file][0]) if isinstance(c, ImageItem) else c

    turns = tuple(Turn(t.role, tuple(fix(c) for c in t.content)) for t in sample.turns)
    return replace(sample, turns=turns)
