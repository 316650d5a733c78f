"""Padded training batches from :class:`~monet.data.stage_layout.StageExample` lists.

Right padding. ``input_ids`` are padded with the tokenizer's pad id, ``labels`` with ``-100``,
``weights``/masks with 0/False. Images are concatenated sample by sample in sequence order. For
stage 2 the per-token ``kind``/``step`` metadata comes from :func:`monet.ops.latent_segments`;
:meth:`StageBatch.stage_attention_mask` turns it into the stage-2 mask with
:func:`monet.ops.latent_attention_mask`.

A sample that fails to load (:class:`~monet.data.stage_layout.SampleLoadError`, or an ``OSError``
from reading its files) never stops training and never disappears silently:
:meth:`StageCollator.load` leaves it out of the batch, records it in ``StageCollator.skipped``
(sample key and reason, in order) and lists its key in ``StageBatch.skipped``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Sequence

import torch

from monet import ops
from monet.data.stage_layout import (
    DEFAULT_CE_EMPHASIZE,
    IGNORE_INDEX,
    LayoutTokens,
    SampleLoadError,
    StageExample,
    check_stage,
)


@dataclass(frozen=True)
class SkippedSample:
    """A sample left out of training because it could not be loaded."""

    key: str
    reason: str


@dataclass
class StageBatch:
    """A padded batch. Shapes: B rows, L padded length."""

    keys: list[str]
    stage: int
    latent_size: int
    input_ids: torch.Tensor  # [B, L] int64
    attention_mask: torch.Tensor  # [B, L] int64, 1 = real token
    labels: torch.Tensor  # [B, L] int64, -100 = no target (aligned with input_ids)
    weights: torch.Tensor  # [B, L] float32, CE weight per target (0 on non-targets)
    answer_start: torch.Tensor  # [B] int64
    latent_mask: torch.Tensor  # [B, L] bool, latent PAD positions
    observation_mask: torch.Tensor  # [B, L] bool, tokens inside observation spans
    pixel_values: torch.Tensor | None = None  # [patches, C*T*P*P]
    image_grid_thw: torch.Tensor | None = None  # [n_images, 3]
    kind: torch.Tensor | None = None  # [B, L] int8 (stage 2): monet.ops.KIND_*
    step: torch.Tensor | None = None  # [B, L] int32 (stage 2)
    skipped: list[str] = field(default_factory=list)  # keys left out of this batch (failed to load)

    def to(self, device: torch.device | str) -> "StageBatch":
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        return StageBatch(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in moved.items()})

    def stage_attention_mask(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The stage-2 ``[B, 1, L, L]`` mask (bool, or additive with a floating ``dtype``)."""
        if self.kind is None or self.step is None:
            raise ValueError(f"stage {self.stage} batch has no kind/step metadata (stage 2 only)")
        return ops.latent_attention_mask(self.kind, self.step, dtype)

    def to_latent_batch(self):
        """The :class:`monet.model.training.LatentBatch` view of this batch."""
        from monet.model.training import LatentBatch

        return LatentBatch(self.input_ids, self.attention_mask, self.latent_mask, self.pixel_values,
                           self.image_grid_thw, "stage2" if self.stage == 2 else "causal", self.answer_start,
                           self.kind, self.step)


def _pad(rows: Sequence[torch.Tensor], length: int, value, dtype: torch.dtype) -> torch.Tensor:
    out = torch.full((len(rows), length), value, dtype=dtype)
    for i, r in enumerate(rows):
        out[i, : r.shape[0]] = r
    return out


class StageCollator:
    """``collate_fn`` for a DataLoader over :class:`StageExample` (with pixels loaded).

    Args:
        processor: the Qwen2.5-VL processor (token ids are read from its tokenizer), or pass
            ``tokens`` (a :class:`LayoutTokens`) instead.
        ce_emphasize_factor: weight of targets inside observations; default per stage
            (:data:`DEFAULT_CE_EMPHASIZE`).
        pad_to_multiple_of: round the padded length up.
    """

    def __init__(self, processor: Any = None, *, tokens: LayoutTokens | None = None,
                 ce_emphasize_factor: float | None = None, pad_to_multiple_of: int | None = None):
        if tokens is None:
            if processor is None:
                raise ValueError("StageCollator needs a processor or tokens")
            tokens = LayoutTokens.from_processor(processor)
        self.tokens = tokens
        self.ce_emphasize_factor = ce_emphasize_factor
        self.pad_to_multiple_of = pad_to_multiple_of
        self.skipped: list[SkippedSample] = []

    def load(self, dataset: Any, indices: Sequence[int]) -> StageBatch | None:
        """Read ``dataset[i]`` for each index and collate the ones that load.

        A sample whose loading raises :class:`SampleLoadError` or ``OSError`` is appended to
        :attr:`skipped` (key from the error, else from ``dataset.example(i, with_pixels=False)``
        or the index) and named in the batch's ``skipped``; other exceptions propagate (they are
        bugs, not bad data). Returns ``None`` when no sample of ``indices`` loads."""
        examples, skipped = [], []
        for i in indices:
            try:
                examples.append(dataset[i])
            except (SampleLoadError, OSError) as e:
                key = e.key if isinstance(e, SampleLoadError) else _key_of(dataset, i)
                reason = e.reason if isinstance(e, SampleLoadError) else f"{type(e).__name__}: {e}"
                skipped.append(SkippedSample(key, reason))
        self.skipped.extend(skipped)
        if not examples:
            return None
        batch = self(examples)
        batch.skipped = [s.key for s in skipped]
        return batch

    def __call__(self, examples: Sequence[StageExample]) -> StageBatch:
        if not examples:
            raise ValueError("cannot collate an empty batch")
        stage, k = examples[0].stage, examples[0].latent_size
        check_stage(stage)
        for ex in examples:
            if (ex.stage, ex.latent_size) != (stage, k):
                raise ValueError(f"mixed batch: {ex.key} is stage {ex.stage} K={ex.latent_size}, "
                                 f"expected stage {stage} K={k}")
            if ex.images and ex.pixel_values is None:
                raise ValueError(f"{ex.key} has images but no pixel_values; load them first "
                                 "(monet.data.stage_layout.load_pixels)")
        factor = self.ce_emphasize_factor if self.ce_emphasize_factor is not None else DEFAULT_CE_EMPHASIZE[stage]
        L = max(len(ex) for ex in examples)
        if self.pad_to_multiple_of:
            L = -(-L // self.pad_to_multiple_of) * self.pad_to_multiple_of
        ids = _pad([ex.input_ids for ex in examples], L, self.tokens.pad, torch.long)
        am = _pad([torch.ones(len(ex), dtype=torch.long) for ex in examples], L, 0, torch.long)
        labels = _pad([ex.labels for ex in examples], L, IGNORE_INDEX, torch.long)
        weights = _pad([ex.weights(factor) for ex in examples], L, 0.0, torch.float32)
        latent = _pad([ex.latent_mask for ex in examples], L, False, torch.bool)
        obs = _pad([ex.observation_mask for ex in examples], L, False, torch.bool)
        answer_start = torch.tensor([ex.answer_start for ex in examples], dtype=torch.long)
        with_images = [ex for ex in examples if ex.images]
        pixel_values = torch.cat([ex.pixel_values for ex in with_images]) if with_images else None
        grid = torch.cat([ex.image_grid_thw for ex in with_images]).long() if with_images else None
        kind = step = None
        if stage == 2:
            kind, step = ops.latent_segments(ids, am, answer_start, **self.tokens.segment_ids())
        return StageBatch([ex.key for ex in examples], stage, k, ids, am, labels, weights, answer_start,
                          latent, obs, pixel_values, grid, kind, step)


def _key_of(dataset: Any, i: int) -> str:
    """Best-effort key of sample ``i`` for a report (never raises)."""
    try:
        if hasattr(dataset, "example"):
            return dataset.example(i, with_pixels=False).key
    except Exception:  # the report must not fail where loading already did
        pass
    return f"#{i}"
