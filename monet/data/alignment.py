"""How a collated batch lines up with teacher states.

A teacher store (or an online teacher) holds, per sample key, ``[layers, N, D]`` states for the
sample's aligned positions in sequence order. A batch is matched to them by its keys and by the
aligned positions of its rows: ``"observation"`` positions (stage 2 / teacher reps) or
``"latent"`` positions (stage 3 / teacher latents), taken row-major over ``(batch, position)``,
so concatenating the per-sample states along N gives the order of :func:`aligned_positions`.
"""

from __future__ import annotations

from typing import Any

import torch

POSITION_KINDS = ("observation", "latent")


def _mask(batch: Any, which: str) -> torch.Tensor:
    if which == "observation":
        return batch.observation_mask
    if which == "latent":
        return batch.latent_mask
    raise ValueError(f"aligned positions are 'observation' or 'latent', got {which!r}")


def aligned_positions(batch: Any, which: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(batch_index, position)`` of the batch's observation or latent positions, row-major."""
    return _mask(batch, which).nonzero(as_tuple=True)


def aligned_counts(batch: Any, which: str) -> list[int]:
    """Number of aligned positions of each row (the N of each sample's teacher states)."""
    return _mask(batch, which).sum(1).tolist()


def example_key(examples: Any, i: int) -> str:
    """The key (``dataset/sample_id``) of example ``i``, without loading its pixels when the
    dataset can avoid it (``examples.example(i, with_pixels=False)``)."""
    if hasattr(examples, "example"):
        return examples.example(i, with_pixels=False).key
    return examples[i].key
