"""Entry points shared by the CLI and the quickstart: data for a stage, an SFT run, a teacher
precompute run. Each reads an :class:`SFTConfig` (or the same fields) and prints a summary."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

import torch

from monet.data.image_budget import ImageBudget, stage_budget
from monet.data.preprocess_cache import PreprocessedDataset, preprocess_dataset
from monet.data.sft_loader import load_sft_dataset
from monet.train.config import SFTConfig
from monet.train.distributed import barrier, init_distributed


def stage_image_budget(stage: int, total: int | None, per_image: int | None) -> ImageBudget:
    base = stage_budget(stage)
    return ImageBudget(total=total or base.total, per_image=per_image or base.per_image)


def load_stage_dataset(cfg: SFTConfig, processor: Any, stage: int, *, printer: Callable[[str], None] = print,
                       samples_and_report=None) -> PreprocessedDataset:
    """Validate the config's data files and tokenise them for ``stage`` (cached)."""
    samples, report = samples_and_report or load_sft_dataset(cfg.data, cfg.image_root)
    if report.rejections:
        printer(report.summary())
    if not samples:
        raise ValueError(f"no usable samples in {cfg.data} (all {report.total} rejected)")
    cache = cfg.cache_dir or str(Path(cfg.output_dir) / "cache")
    budget = stage_image_budget(stage, cfg.max_image_tokens_total, cfg.max_image_tokens_per_image)
    return preprocess_dataset(samples, processor, stage, cfg.latent_size, cache, budget=budget, labels=cfg.labels)


def _device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def run_sft(cfg: SFTConfig, *, resume: bool = False, device: str | torch.device | None = None,
            progress: bool = True, printer: Callable[[str], None] = print) -> dict:
    """Train one stage from ``cfg``; writes checkpoints and ``summary.json`` under ``output_dir``."""
    from monet.model.loading import load_model
    from monet.train.sft import TEACHER_LAYOUT, SFTTrainer

    dev = _device(device)
    dist_info = init_distributed(dev)
    model, processor = load_model(cfg.model, dtype="float32", device=dev, attn_implementation=cfg.attn_implementation,
                                  latent_size=cfg.latent_size)

    def data():
        loaded = load_sft_dataset(cfg.data, cfg.image_root)
        quiet = printer if dist_info.is_main else (lambda _: None)
        ex = load_stage_dataset(cfg, processor, cfg.stage, printer=quiet, samples_and_report=loaded)
        tex = None
        if cfg.stage > 1 and cfg.teacher == "online":
            tex = load_stage_dataset(cfg, processor, TEACHER_LAYOUT[cfg.stage], printer=lambda _: None,
                                     samples_and_report=loaded)
        return ex, tex

    # Rank 0 tokenises into the shared cache first; the other ranks then reuse it.
    if dist_info.is_main:
        examples, teacher_examples = data()
    barrier(dist_info)
    if not dist_info.is_main:
        examples, teacher_examples = data()
    trainer = SFTTrainer(cfg, model, processor, examples, teacher_examples=teacher_examples, device=dev,
                         progress=progress, printer=printer)
    try:
        if resume:
            trainer.resume()
        summary = trainer.train()
        if trainer.dist.is_main:
            Path(cfg.output_dir, "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    finally:
        trainer.close()
    return summary


def run_precompute(cfg: SFTConfig, what: str, store: str | os.PathLike, *, layers: list[int] | None = None,
                   dtype: str = "bfloat16", batch_size: int = 4, device: str | torch.device | None = None,
                   progress: bool = True, printer: Callable[[str], None] = print) -> dict:
    """Run the frozen teacher ``cfg.model`` over ``cfg.data`` in the teacher's layout (stage 1
    for ``teacher-reps``, stage 2 for ``teacher-latents``) and fill ``store``."""
    from monet.model.loading import load_model
    from monet.train.precompute import KINDS, precompute_teacher_states

    if what not in KINDS:
        raise ValueError(f"unknown precompute target {what!r}; expected one of {sorted(KINDS)}")
    dev = _device(device)
    model, processor = load_model(cfg.model, dtype="float32", device=dev, attn_implementation=cfg.attn_implementation,
                                  latent_size=cfg.latent_size)
    stage = KINDS[what][2]
    examples = load_stage_dataset(cfg, processor, stage, printer=printer)
    torch_dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}.get(dtype)
    if torch_dtype is None:
        raise ValueError(f"store dtype must be bfloat16, float16 or float32, got {dtype!r}")
    return precompute_teacher_states(model, processor, examples, store, what=what, layers=layers, dtype=torch_dtype,
                                     batch_size=batch_size, progress=progress, printer=printer)
