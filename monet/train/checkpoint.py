"""Atomic training checkpoints with resume.

Layout: ``OUTPUT/checkpoint-STEP/`` holding the model (``save_pretrained``, with
``monet_config.json``), the processor, ``trainer_state.pt`` (optimizer, scheduler, RNG states, data
position, step) and ``sft_config.yaml``; ``OUTPUT/latest`` names the newest complete checkpoint.
Each checkpoint is written into a temporary folder and renamed into place, and ``latest`` is
replaced atomically, so a crash never leaves a half-written checkpoint that resume would pick.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from monet.atomic import atomic_write_text

LATEST = "latest"
STATE_FILE = "trainer_state.pt"


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])




def staging_dir(output_dir: str | os.PathLike, step: int) -> Path:
    """A fixed temporary folder for ``checkpoint-STEP`` that every rank can name (for collective
    writers such as DeepSpeed's) before rank 0 renames it into place."""
    return Path(output_dir) / f".checkpoint-{step}.staging"


def save_checkpoint(output_dir: str | os.PathLike, step: int, *, model: Any, processor: Any | None,
                    trainer_state: dict, config_yaml: str | None = None, keep_last: int | None = None,
                    staged: Path | None = None) -> Path:
    """Write ``checkpoint-STEP`` atomically and point ``latest`` at it. Returns its path.

    ``staged``: a folder (see :func:`staging_dir`) that already holds parts written by other
    writers; it is completed and renamed instead of a fresh temporary folder."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    final = out / f"checkpoint-{step}"
    tmp = staged if staged is not None else Path(tempfile.mkdtemp(prefix=f".checkpoint-{step}.tmp-", dir=out))
    try:
        model.save_pretrained(tmp)
        if processor is not None:
            processor.save_pretrained(tmp)
        torch.save(trainer_state, tmp / STATE_FILE)
        if config_yaml is not None:
            (tmp / "sft_config.yaml").write_text(config_yaml)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write_text(out / LATEST, final.name + "\n")
    if keep_last:
        ckpts = sorted((p for p in out.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()),
                       key=lambda p: int(p.name.split("-")[-1]))
        for old in ckpts[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The checkpoint ``latest`` names, or None when there is none. A dangling pointer is an error."""
    pointer = Path(output_dir) / LATEST
    if not pointer.is_file():
        return None
    ckpt = Path(output_dir) / pointer.read_text().strip()
    if not (ckpt / STATE_FILE).is_file():
        raise FileNotFoundError(f"{pointer} names {ckpt}, which is not a complete checkpoint (no {STATE_FILE})")
    return ckpt


def load_trainer_state(checkpoint: str | os.PathLike) -> dict:
    path = Path(checkpoint) / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{checkpoint} is not a training checkpoint (no {STATE_FILE})")
    return torch.load(path, map_location="cpu", weights_only=False)
