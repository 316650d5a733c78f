"""Generation requests (images + prompt or chat messages) and how they become model inputs.

Shared by the HF decoder (:func:`monet.generate`) and the vLLM runner so both see the same
prompt text and images for a request.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Sequence, Union

from monet.tokens import LATENT_START

IMAGE_PAD = "<|image_pad|>"

ImageLike = Union[str, os.PathLike, Any]  # a path, a PIL image or an HxW[xC] uint8 array


@dataclass
class LatentRequest:
    """One generation request.

    Give either ``prompt`` (a user message; ``images`` are placed before it) or ``messages``
    (Qwen chat format; ``{"type": "image", "image": ...}`` items carry the images). With
    ``raw_prompt=True`` the prompt is used verbatim (it must already hold the chat template and
    one ``<|vision_start|><|image_pad|><|vision_end|>`` per image). ``force_latent=True`` makes
    decoding open with a latent span: START is forced as the first generated token (a prompt that
    ends with START behaves the same way).
    """

    prompt: str | None = None
    images: list[ImageLike] = field(default_factory=list)
    messages: list[dict] | None = None
    raw_prompt: bool = False
    force_latent: bool = False


def as_request(x: "LatentRequest | str | dict", index: int = 0) -> LatentRequest:
    """Accept a :class:`LatentRequest`, a prompt string or a dict of its fields; validate its shape.

    Errors are ``TypeError``/``ValueError`` naming the request index and the field."""
    where = f"request {index}"
    if isinstance(x, LatentRequest):
        req = x
    elif isinstance(x, str):
        req = LatentRequest(prompt=x)
    elif isinstance(x, dict):
        unknown = sorted(set(x) - set(LatentRequest.__dataclass_fields__))
        if unknown:
            raise ValueError(f"{where}: unknown fields {unknown}")
        req = LatentRequest(**x)
    else:
        raise TypeError(f"{where}: expected LatentRequest, str or dict, got {type(x).__name__}")
    if (req.prompt is None) == (req.messages is None):
        raise ValueError(f"{where}: give exactly one of prompt or messages")
    if req.prompt is not None and not isinstance(req.prompt, str):
        raise TypeError(f"{where}: prompt must be a str, got {type(req.prompt).__name__}")
    if isinstance(req.images, (str, os.PathLike)) or not isinstance(req.images, (list, tuple)):
        hint = " (wrap a single image in a list: images=[...])" if req.images is not None else " (use [] for none)"
        raise TypeError(f"{where}: images must be a list of images (paths, PIL images or HxW[xC] uint8 arrays), "
                        f"got {type(req.images).__name__}{hint}")
    if req.messages is not None:
        _check_messages(req.messages, where)
        if req.images:
            raise ValueError(f"{where}: with messages, put images inside the messages")
    for name in ("raw_prompt", "force_latent"):
        if not isinstance(getattr(req, name), bool):
            raise TypeError(f"{where}: {name} must be a bool, got {type(getattr(req, name)).__name__}")
    return req


def _check_messages(messages: Any, where: str) -> None:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise TypeError(f"{where}: messages must be a non-empty list of {{'role': ..., 'content': ...}} dicts, "
                        f"got {type(messages).__name__}")
    for m, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise TypeError(f"{where}: messages[{m}] must be a dict with 'role' and 'content', got {type(msg).__name__}")
        if msg.get("role") not in ("system", "user", "assistant"):
            raise ValueError(f"{where}: messages[{m}].role must be 'system', 'user' or 'assistant', "
                             f"got {msg.get('role')!r}")
        content = msg.get("content")
        if not isinstance(content, (str, list)):
            raise TypeError(f"{where}: messages[{m}].content must be a str or a list of items, "
                            f"got {type(content).__name__}")
        if isinstance(content, list):
            for c, item in enumerate(content):
                if not isinstance(item, dict) or item.get("type") not in ("text", "image"):
                    raise ValueError(f"{where}: messages[{m}].content[{c}] must be a dict with type 'text' or 'image'")


def as_requests(requests: "Sequence[LatentRequest | str | dict] | LatentRequest | str | dict") -> list[LatentRequest]:
    """One request or a sequence of them, normalised to a list of :class:`LatentRequest`."""
    if isinstance(requests, (str, LatentRequest, dict)):
        requests = [requests]
    if not isinstance(requests, Sequence):
        raise TypeError(f"requests must be a request or a list of them, got {type(requests).__name__}")
    return [as_request(r, i) for i, r in enumerate(requests)]


def load_image(image: ImageLike, where: str):
    """Return an RGB PIL image from a path, PIL image or array; clear errors otherwise."""
    from PIL import Image

    if isinstance(image, Image.Image):
        if min(image.size) < 1:
            raise ValueError(f"{where}: image is empty ({image.size[0]}x{image.size[1]})")
        return image.convert("RGB")
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if path.is_dir():
            raise IsADirectoryError(f"{where}: {path} is a directory, not an image file")
        if not path.is_file():
            raise FileNotFoundError(f"{where}: image file not found: {path}")
        try:
            with Image.open(path) as im:
                return im.convert("RGB")
        except Exception as e:  # PIL raises several types for undecodable files
            raise ValueError(f"{where}: cannot decode image {path}: {e}") from None
    try:
        import numpy as np

        arr = np.asarray(image)
    except Exception:
        arr = None
    if arr is None or arr.dtype != "uint8" or arr.ndim not in (2, 3):
        raise TypeError(f"{where}: image must be a path, PIL image or uint8 HxW[xC] array, got {type(image).__name__}"
                        + (f" with dtype {arr.dtype} and shape {tuple(arr.shape)}" if arr is not None else ""))
    if arr.ndim == 3 and arr.shape[2] not in (1, 3, 4):
        hint = " (channel-first? transpose to HxWxC)" if arr.shape[0] in (1, 3, 4) else ""
        raise ValueError(f"{where}: image array must be HxW or HxWxC with C in (1, 3, 4), got shape "
                         f"{tuple(arr.shape)}{hint}")
    if arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ValueError(f"{where}: image array is empty (shape {tuple(arr.shape)})")
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    return Image.fromarray(arr).convert("RGB")


def _message_images(messages: list[dict], where: str) -> list:
    images = []
    for m, msg in enumerate(messages):
        content = msg.get("content")
        if isinstance(content, list):
            for c, item in enumerate(content):
                if isinstance(item, dict) and item.get("type") == "image":
                    src = item.get("image", item.get("url", item.get("path")))
                    if src is None:
                        raise ValueError(f"{where}: messages[{m}].content[{c}] is an image item without 'image'")
                    images.append(load_image(src, f"{where} messages[{m}].content[{c}]"))
    return images


class RenderedPrompt(NamedTuple):
    """A request's prompt as both engines feed it.

    ``text`` never ends with START: a trailing START (from ``force_latent=True`` or written into a
    raw prompt) is stripped and reported as ``force_start``; the engines then force START as the
    first generated token, which is exactly what the model would have produced had it sampled
    START there (see :mod:`monet.layout`)."""

    text: str
    images: list
    force_start: bool


def render_prompt(processor: Any, req: LatentRequest, index: int = 0) -> RenderedPrompt:
    """Prompt text (chat template applied, generation prompt added), PIL images and force_start."""
    where = f"request {index}"
    if req.messages is not None:
        images = _message_images(req.messages, where)
        text = processor.apply_chat_template(req.messages, add_generation_prompt=True, tokenize=False)
    else:
        images = [load_image(im, f"{where} images[{i}]") for i, im in enumerate(req.images)]
        if req.raw_prompt:
            text = req.prompt
        else:
            content = [{"type": "image"} for _ in images] + [{"type": "text", "text": req.prompt}]
            messages = [{"role": "user", "content": content}]
            text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    n_slots = text.count(IMAGE_PAD)
    if n_slots != len(images):
        raise ValueError(f"{where}: prompt has {n_slots} image placeholders ({IMAGE_PAD}) but {len(images)} images were given")
    text, ends = strip_trailing_start(text)
    return RenderedPrompt(text, images, ends or req.force_latent)


def strip_trailing_start(text: str) -> tuple[str, bool]:
    """``(text without a trailing START, whether there was one)``."""
    if text.endswith(LATENT_START):
        return text[: -len(LATENT_START)], True
    return text, False


def encode_requests(processor: Any, requests: Sequence[LatentRequest]):
    """Tokenise a batch with left padding.

    Returns the processor's BatchFeature (``input_ids``, ``attention_mask``, and
    ``pixel_values``/``image_grid_thw`` when any image) and the per-request ``force_start`` flags."""
    texts, images, force = [], [], []
    for i, req in enumerate(requests):
        r = render_prompt(processor, req, i)
        texts.append(r.text)
        images.extend(r.images)
        force.append(r.force_start)
    kwargs = {"images": images} if images else {}
    batch = processor(text=texts, return_tensors="pt", padding=True, padding_side="left", **kwargs)
    return batch, force
