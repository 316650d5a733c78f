"""Latent vectors of an evaluation run, stored next to its JSONL records.

Records stay small text; the vectors (``[n_i, D]`` float32 per answer) go to safetensors files
``<run>/latents/part-NNNNN.safetensors``, one per generated batch, keyed by sample id. A record
names its part (``extra["latents_part"]``), so a batch that was generated but whose records were
not all written before an interruption leaves an orphan part that nothing refers to; the resumed
run writes the redone samples into a new part. Parts are written atomically (temporary file, then
rename) and read with safetensors, which never executes code.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Iterable, Mapping

import torch

from monet.atomic import atomic_write_bytes

_PART_RE = re.compile(r"^part-(\d{5,})\.safetensors$")


class LatentStore:
    """``write_part({sample_id: [n, D] tensor}) -> part name``; ``load(refs)`` reads them back."""

    def __init__(self, directory: str | os.PathLike):
        self.dir = Path(directory)

    def _next_index(self) -> int:
        if not self.dir.is_dir():
            return 0
        nums = [int(m.group(1)) for p in self.dir.iterdir() if (m := _PART_RE.match(p.name))]
        return max(nums) + 1 if nums else 0

    def write_part(self, latents: Mapping[str, torch.Tensor]) -> str | None:
        """Store one batch's latents (answers without any latent are left out); the part's file
        name, or None when there was nothing to store."""
        from safetensors.torch import save

        tensors = {sid: t.detach().to("cpu", torch.float32).contiguous() for sid, t in latents.items()
                   if t is not None and t.numel()}
        if not tensors:
            return None
        self.dir.mkdir(parents=True, exist_ok=True)
        name = f"part-{self._next_index():05d}.safetensors"
        atomic_write_bytes(self.dir / name, save(tensors))
        return name

    def load(self, refs: Iterable[tuple[str, str | None]]) -> dict[str, torch.Tensor]:
        """``{sample_id: [n, D] float32}`` for ``(sample_id, part)`` pairs; a ``None`` part is an
        answer without latents (an empty ``[0]`` tensor). A missing part or id is an error naming it."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        refs = list(refs)
        out: dict[str, torch.Tensor] = {}
        cache: dict[str, dict[str, torch.Tensor]] = {}
        for sid, part in refs:
            if part is None:
                out[sid] = torch.zeros(0)
                continue
            if not _PART_RE.match(part):
                raise ValueError(f"{self.dir}: record {sid} names an invalid latents part {part!r}")
            if part not in cache:
                path = self.dir / part
                if not path.is_file():
                    raise FileNotFoundError(f"{path}: latents part of record {sid} is missing")
                try:
                    cache[part] = load_file(path)
                except (SafetensorError, OSError) as e:
                    raise ValueError(f"{path}: unreadable latents part ({e})") from None
            if sid not in cache[part]:
                raise ValueError(f"{self.dir / part}: holds no latents for record {sid}")
            out[sid] = cache[part][sid]
        return out
