"""The Monet-SFT-125K sample format, as typed objects.

One JSON file holds a list of samples::

    {"metadata": {"dataset_name": "Visual_CoT", "sample_id": 17},
     "data": [
        {"role": "system",    "content": [{"type": "text", "text": "You are ..."}]},
        {"role": "user",      "content": [{"type": "image", "image": "images/q.jpg"},
                                          {"type": "text", "text": "What ...?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "... zoom in.<abs_vis_token></abs_vis_token>"},
                                          {"type": "image", "image": "images/crop.jpg"},
                                          {"type": "text", "text": "<observation>A red circle.</observation> ... \\boxed{red}"}]}]}

Images in the user turn are *question images*; images in the assistant turn are *helper images*,
each directly preceded by a text item ending in :data:`PLACEHOLDER`. Image paths are relative to an
image root (absolute paths are used as they are).

This module only represents and (de)serialises samples; :mod:`monet.data.sft_loader` validates
them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

from monet.tokens import LATENT_END, LATENT_START

#: What marks a helper image in the assistant text (the text item right before it ends with it).
PLACEHOLDER = LATENT_START + LATENT_END

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class TextItem:
    text: str

    def to_json(self) -> dict[str, Any]:
        return {"type": "text", "text": self.text}


@dataclass(frozen=True)
class ImageItem:
    """An image reference. ``path`` is as written in the JSON (relative to the image root);
    ``file`` the resolved absolute path; ``size`` (width, height) once the loader has opened it."""

    path: str
    file: Path
    size: tuple[int, int] | None = None

    def to_json(self) -> dict[str, Any]:
        return {"type": "image", "image": self.path}


ContentItem = Union[TextItem, ImageItem]


@dataclass(frozen=True)
class Turn:
    role: str
    content: tuple[ContentItem, ...]

    @property
    def images(self) -> tuple[ImageItem, ...]:
        return tuple(c for c in self.content if isinstance(c, ImageItem))

    def to_json(self) -> dict[str, Any]:
        return {"role": self.role, "content": [c.to_json() for c in self.content]}


@dataclass(frozen=True)
class SFTSample:
    """One chat sample: an optional system turn, a user turn and an assistant turn.

    ``key`` (``"dataset_name/sample_id"``) identifies the sample everywhere (teacher stores,
    caches, rejection reports). ``extra_metadata`` keeps metadata fields beyond the two required
    ones so that :meth:`to_json` round-trips.
    """

    dataset_name: str
    sample_id: str | int
    turns: tuple[Turn, ...]
    extra_metadata: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def key(self) -> str:
        return f"{self.dataset_name}/{self.sample_id}"

    def turn(self, role: str) -> Turn | None:
        for t in self.turns:
            if t.role == role:
                return t
        return None

    @property
    def user(self) -> Turn:
        return self.turns[-2]

    @property
    def assistant(self) -> Turn:
        return self.turns[-1]

    @property
    def question_images(self) -> tuple[ImageItem, ...]:
        """Images of the turns before the assistant turn, in order."""
        return tuple(im for t in self.turns[:-1] for im in t.images)

    @property
    def helper_images(self) -> tuple[ImageItem, ...]:
        return self.assistant.images

    def to_json(self) -> dict[str, Any]:
        meta = {"dataset_name": self.dataset_name, "sample_id": self.sample_id, **self.extra_metadata}
        return {"metadata": meta, "data": [t.to_json() for t in self.turns]}


class SampleFormatError(ValueError):
    """A sample does not have the Monet-SFT structure. ``reason`` is a short machine-readable
    code (see :mod:`monet.data.sft_loader`)."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def resolve_image_path(path: str, image_root: str | os.PathLike) -> Path:
    p = Path(path)
    return p if p.is_absolute() else Path(image_root) / p


def _parse_item(raw: Any, image_root: Path, where: str) -> ContentItem:
    if not isinstance(raw, dict):
        raise SampleFormatError("bad_content", f"{where}: content item is {type(raw).__name__}, not an object")
    kind = raw.get("type")
    if kind is None:  # Qwen's format also allows the type to be implied by the key
        kind = "image" if "image" in raw else "text" if "text" in raw else None
    if kind == "text":
        text = raw.get("text")
        if not isinstance(text, str):
            raise SampleFormatError("bad_content", f"{where}: text item without a string 'text'")
        return TextItem(text)
    if kind == "image":
        path = raw.get("image")
        if not isinstance(path, str) or not path:
            raise SampleFormatError("bad_content", f"{where}: image item without a path in 'image'")
        return ImageItem(path, resolve_image_path(path, image_root))
    raise SampleFormatError("bad_content", f"{where}: unsupported content type {kind!r}")


def _parse_turn(raw: Any, image_root: Path, index: int) -> Turn:
    if not isinstance(raw, dict) or not isinstance(raw.get("role"), str):
        raise SampleFormatError("bad_turns", f"turn {index} is not an object with a 'role'")
    role = raw["role"]
    content = raw.get("content")
    if isinstance(content, str):
        items: tuple[ContentItem, ...] = (TextItem(content),)
    elif isinstance(content, list):
        items = tuple(_parse_item(c, image_root, f"{role} turn item {i}") for i, c in enumerate(content))
    else:
        raise SampleFormatError("bad_turns", f"{role} turn has no content list")
    return Turn(role, items)


def parse_sample(raw: Any, image_root: str | os.PathLike) -> SFTSample:
    """Build an :class:`SFTSample` from one JSON object; raise :class:`SampleFormatError`.

    Checks structure only: metadata, roles in the order ``[system,] user, assistant``, content
    items of type text/image. Content rules (placeholders, observations, files) are checked by
    :func:`monet.data.sft_loader.validate_sample`.
    """
    root = Path(image_root)
    if not isinstance(raw, dict):
        raise SampleFormatError("bad_structure", f"sample is {type(raw).__name__}, not an object")
    meta = raw.get("metadata")
    if not isinstance(meta, dict):
        raise SampleFormatError("bad_metadata", "missing 'metadata' object")
    name, sid = meta.get("dataset_name"), meta.get("sample_id")
    if not isinstance(name, str) or not name:
        raise SampleFormatError("bad_metadata", "metadata.dataset_name must be a non-empty string")
    if isinstance(sid, bool) or not isinstance(sid, (str, int)) or sid == "":
        raise SampleFormatError("bad_metadata", "metadata.sample_id must be a non-empty string or an int")
    data = raw.get("data")
    if not isinstance(data, list):
        raise SampleFormatError("bad_turns", "missing 'data' list of chat turns")
    turns = tuple(_parse_turn(t, root, i) for i, t in enumerate(data))
    roles = [t.role for t in turns]
    if roles not in (["system", "user", "assistant"], ["user", "assistant"]):
        raise SampleFormatError("bad_turns", f"roles are {roles}, expected [system, user, assistant]")
    extra = {k: v for k, v in meta.items() if k not in ("dataset_name", "sample_id")}
    return SFTSample(name, sid, turns, extra)
