"""Rollouts -> a right-padded :class:`~monet.rl.logprob.RolloutBatch` for teacher-forced scoring.

Row ``b`` is ``prompt_ids + response_ids`` of rollout ``b`` (right-padded with ``pad_id``, masked
out), ``response_start[b] = len(prompt_ids)``; pixel values are the prompts' (from
:func:`~monet.rl.rollout.encode_prompt`, cached per prompt) concatenated in row order; latents are
the recorded vectors. The latent positions the trainer derives from these ids
(:func:`~monet.rl.actions.action_masks`) are then ``response_start + rollout.latent_positions``.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from monet.rl.logprob import RolloutBatch
from monet.rl.rollout import EncodedPrompt, Rollout


def collate_rollouts(rollouts: Sequence[Rollout], prompts: Mapping[int, EncodedPrompt], *, pad_id: int,
                     hidden_size: int) -> RolloutBatch:
    """A :class:`RolloutBatch` of ``rollouts`` (in order). ``prompts`` maps prompt index to its
    encoding; a rollout whose prompt ids differ from that encoding is an error naming it."""
    if not rollouts:
        raise ValueError("collate_rollouts needs at least one rollout")
    rows, starts, latents, pixels, grids, forced = [], [], [], [], [], []
    for b, r in enumerate(rollouts):
        enc = prompts.get(r.prompt_index)
        if enc is None:
            raise KeyError(f"rollout {b} ({r.group_id}/{r.sample_index}): prompt {r.prompt_index} is not encoded")
        if enc.input_ids != r.prompt_ids:
            raise ValueError(f"rollout {b} ({r.group_id}/{r.sample_index}): its prompt ids differ from the trainer's "
                             f"encoding of prompt {r.prompt_index}")
        if not r.response_ids:
            raise ValueError(f"rollout {b} ({r.group_id}/{r.sample_index}) has an empty response")
        rows.append(r.prompt_ids + r.response_ids)
        starts.append(len(r.prompt_ids))
        z = r.latents
        if z.numel() == 0:
            z = torch.zeros(0, hidden_size)
        latents.append(z.float())
        forced.append(r.forced_first_start)
        if enc.pixel_values is not None:
            pixels.append(enc.pixel_values)
            grids.append(enc.image_grid_thw)
    L = max(len(x) for x in rows)
    ids = torch.full((len(rows), L), pad_id, dtype=torch.long)
    am = torch.zeros(len(rows), L, dtype=torch.long)
    for b, row in enumerate(rows):
        ids[b, : len(row)] = torch.tensor(row, dtype=torch.long)
        am[b, : len(row)] = 1
    return RolloutBatch(
        input_ids=ids, attention_mask=am, response_start=torch.tensor(starts, dtype=torch.long), latents=latents,
        pixel_values=torch.cat(pixels) if pixels else None, image_grid_thw=torch.cat(grids) if grids else None,
        forced_first_start=torch.tensor(forced, dtype=torch.bool),
    )


def to_device(batch: RolloutBatch, device: Any, dtype: torch.dtype | None = None) -> RolloutBatch:
    """The batch on ``device`` (pixel values cast to ``dtype`` when given)."""
    pv = batch.pixel_values
    if pv is not None:
        pv = pv.to(device, dtype) if dtype is not None else pv.to(device)
    return RolloutBatch(batch.input_ids.to(device), batch.attention_mask.to(device), batch.response_start.to(device),
                        [z.to(device) for z in batch.latents], pv,
                        batch.image_grid_thw.to(device) if batch.image_grid_thw is not None else None,
                        batch.forced_first_start.to(device) if batch.forced_first_start is not None else None)
