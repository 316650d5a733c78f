"""Image token budgets: how large each image of a sample may be, in LM image tokens.

One LM image token covers ``(patch_size * merge_size)**2`` pixels (28x28 for Qwen2.5-VL). A
:class:`ImageBudget` caps the tokens of every single image (``per_image``) and the sum over all
images of one sample's sequence (``total``).

Split rule (:func:`plan_image_tokens`): every image first gets what it would take at its own
resolution, capped at ``per_image`` (small images are never upscaled beyond what the image
processor's minimum asks). If those sum to more than ``total``, every image's cap is scaled by the
same factor ``total / sum`` (at least the processor minimum), so images keep their relative
resolution and the question image is not starved by many helper crops. The resize itself is the
image processor's ``smart_resize`` with ``max_pixels = cap * pixels_per_token``, so the resulting
grid is exactly what the processor produces.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize


@dataclass(frozen=True)
class ImageBudget:
    total: int
    per_image: int

    def __post_init__(self):
        if self.total < 1 or self.per_image < 1:
            raise ValueError(f"image token budgets must be >= 1, got {self}")


#: The paper's per-stage defaults (tokens of 28x28 pixels).
STAGE_BUDGETS: dict[int, ImageBudget] = {
    1: ImageBudget(total=2000, per_image=1280),
    2: ImageBudget(total=1500, per_image=1280),
    3: ImageBudget(total=2000, per_image=2000),
}


def stage_budget(stage: int) -> ImageBudget:
    try:
        return STAGE_BUDGETS[stage]
    except KeyError:
        raise ValueError(f"stage must be 1, 2 or 3, got {stage!r}") from None


@dataclass(frozen=True)
class ProcessorGeometry:
    """What sizing needs from a Qwen2-VL image processor."""

    patch_size: int
    merge_size: int
    min_pixels: int

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    @property
    def pixels_per_token(self) -> int:
        return self.factor * self.factor

    @classmethod
    def from_image_processor(cls, ip: Any) -> "ProcessorGeometry":
        size = ip.size
        min_pixels = size["shortest_edge"] if "shortest_edge" in size else size["min_pixels"]
        return cls(int(ip.patch_size), int(ip.merge_size), int(min_pixels))

    def grid(self, width: int, height: int, max_tokens: int) -> tuple[int, int, int]:
        """``(t, h, w)`` patch grid of an image resized under ``max_tokens`` LM tokens."""
        h, w = smart_resize(height, width, factor=self.factor, min_pixels=self.min_pixels,
                            max_pixels=max_tokens * self.pixels_per_token)
        return 1, h // self.patch_size, w // self.patch_size

    def tokens(self, grid: Sequence[int]) -> int:
        t, h, w = grid
        return t * h * w // (self.merge_size**2)


def plan_image_tokens(
    sizes: Sequence[tuple[int, int]], budget: ImageBudget, geometry: ProcessorGeometry
) -> list[int]:
    """Per-image token caps (``max_tokens`` for :meth:`ProcessorGeometry.grid`) for images of the
    given (width, height), following the split rule of the module docstring."""
    min_tokens = max(1, math.ceil(geometry.min_pixels / geometry.pixels_per_token))
    big = 1 << 40
    native = [geometry.tokens(geometry.grid(w, h, big)) for w, h in sizes]
    caps = [max(min_tokens, min(n, budget.per_image)) for n in native]
    total = sum(caps)
    if total <= budget.total:
        return caps
    scale = budget.total / total
    return [max(min_tokens, int(c * scale)) for c in caps]
