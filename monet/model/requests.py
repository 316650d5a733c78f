"""Generation requests (images + prompt or chat messages) and how they become model inputs.

Shared by the HF decoder (:func:`monet.generate`) and the vLLM runner so both see the same
prompt text and images for a request.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence, Union

from monet.tokens import LATENT_START

IMAGE_PAD = "<|image_pad|>"

ImageLike = Union[str, os.PathLike, Any]  # a path, a PIL image or an HxW[xC] uint8 array


@dataclass
class LatentRequest:
    """One generation request.

    Give either ``prompt`` (a user message; ``images`` are placed before it) or ``messages``
    (Qwen chat format; ``{"type": "image", "image": ...}`` items carry the images). With
    ``raw_prompt=True`` the prompt is used verbatim (it must already hold the chat template and
    one ``<|vision_start|><|image_pad|><|vision_end|>`` per image). ``force_latent=True`` appends
    START to the prompt so decoding opens with a latent span.
    """

    prompt: str | None = None
    images: list[ImageLike] = field(default_factory=list)
    messages: list[dict] | None = None
    raw_prompt: bool = False
    force_latent: bool = False


def as_request(x: "LatentRequest | str | dict", index: int = 0) -> LatentRequest:
    """Accept a :class:`LatentRequest`, a prompt string or a dict of its fields."""
    if isinstance(x, LatentRequest):
        req = x
    elif isinstance(x, str):
        req = LatentRequest(prompt=x)
    elif isinstance(x, dict):
        unknown = sorted(set(x) - set(LatentRequest.__dataclass_fields__))
        if unknown:
            raise ValueError(f"request {index}: unknown fields {unknown}")
        req = LatentRequest(**x)
    else:
        raise TypeError(f"request {index}: expected LatentRequest, str or dict, got {type(x).__name__}")
    if (req.prompt is None) == (req.messages is None):
        raise ValueError(f"request {index}: give exactly one of prompt or messages")
    if req.messages is not None and req.images:
        raise ValueError(f"request {index}: with messages, put images inside the messages")
    return req


def as_requests(requests: "Sequence[LatentRequest | str | dict] | LatentRequest | str | dict") -> list[LatentRequest]:
    """One request or a sequence of them, normalised to a list of :class:`LatentRequest`."""
    if isinstance(requests, (str, LatentRequest, dict)):
        requests = [requests]
    return [as_request(r, i) for i, r in enumerate(requests)]


def load_image(image: ImageLike, where: str):
    """Return an RGB PIL image from a path, PIL image or array; clear errors otherwise."""
    from PIL import Image

    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
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
    if arr is None or arr.ndim not in (2, 3) or arr.dtype != "uint8":
        raise TypeError(f"{where}: image must be a path, PIL image or uint8 HxW[xC] array, got {type(image).__name__}")
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


def render_prompt(processor: Any, req: LatentRequest, index: int = 0) -> tuple[str, list]:
    """Prompt text (chat template applied, generation prompt added) and the PIL images."""
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
    if req.force_latent and not text.endswith(LATENT_START):
        text = text + LATENT_START
    return text, images


def encode_requests(processor: Any, requests: Sequence[LatentRequest]):
    """Tokenise a batch with left padding. Returns the processor's BatchFeature
    (``input_ids``, ``attention_mask``, and ``pixel_values``/``image_grid_thw`` when any image)."""
    texts, images = [], []
    for i, req in enumerate(requests):
        text, ims = render_prompt(processor, req, i)
        texts.append(text)
        images.extend(ims)
    kwargs = {"images": images} if images else {}
    return processor(text=texts, return_tensors="pt", padding=True, padding_side="left", **kwargs)
