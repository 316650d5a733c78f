"""Entry points shared by the CLI and the quickstart: data for a stage, an SFT run, a teacher
precompute run. Each reads an :class:`SFTConfig` (or the same fields) and prints a summary."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

import torch

from monet.atomic import atomic_write_text
from monet.data.image_budget import ImageBudget, stage_budget
from monet.data.preprocess_cache import PreprocessedDataset, preprocess_dataset
from monet.data.sft_loader import load_sft_dataset
from monet.train.config import SFTConfig
from monet.train.distributed import barrier, init_distributed
from monet.train.teacher_targets import for_precompute, for_stage


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


def adopt_sft_layout(model: Any, cfg: SFTConfig, printer: Callable[[str], None] = print) -> None:
    """Make the starting model's span layout the one this SFT run trains in
    (:func:`monet.data.stage_layout.sft_span_layout`: standard, K = ``cfg.latent_size``); its
    checkpoints record that layout in ``monet_config.json``.

    SFT data exists only in the standard layout, so a starting model whose ``monet_config.json``
    names another kind (``monet-v1``, e.g. the released Monet-7B) is switched to it, and the run log
    says so in a ``WARNING`` line: its checkpoints decode in the standard layout, while the starting
    model decoded in its own."""
    from monet.data.stage_layout import sft_span_layout

    trained = sft_span_layout(cfg.latent_size)
    before = model.monet_config.span_layout
    if before.kind != trained.kind:
        printer(f"WARNING: the starting model {cfg.model} decodes in the {before.kind!r} span layout (its "
                f"monet_config.json), but SFT data is built in the {trained.kind!r} layout only (START embedded, "
                f"then K latents, then END). This run trains the {trained.kind!r} layout with latent_size "
                f"{trained.latent_size}, and its checkpoints record layout={trained.kind!r} in monet_config.json, "
                f"so they decode in that layout, not in {before.kind!r} as the starting model did.")
    model.monet_config.span_layout = trained


def run_sft(cfg: SFTConfig, *, resume: bool = False, overwrite: bool = False,
            device: str | torch.device | None = None, progress: bool = True,
            printer: Callable[[str], None] = print) -> dict:
    """Train one stage from ``cfg``; writes checkpoints and ``summary.json`` under ``output_dir``.

    The run owns ``output_dir`` (:class:`monet.train.run_dir.RunDirectory`): a directory holding an
    earlier run needs ``resume`` (continue it) or ``overwrite`` (delete it first); a second run on
    the same directory is refused while this one lives."""
    from monet.train.run_dir import RunDirectory

    dev = _device(device)
    dist_info = init_distributed(dev, group_of_one=bool(cfg.deepspeed))
    # rank 0 takes the directory before anything is written into it (the cache included)
    run_dir = RunDirectory(cfg.output_dir, resume=resume, overwrite=overwrite) if dist_info.is_main else None
    try:
        if run_dir is not None and run_dir.removed_temporaries:
            printer("removed unfinished checkpoint folders of an interrupted run: "
                    + ", ".join(run_dir.removed_temporaries))
        return _train(cfg, run_dir, resume, dev, dist_info, progress, printer)
    finally:
        if run_dir is not None:
            run_dir.release()


def _train(cfg: SFTConfig, run_dir: Any, resume: bool, dev: torch.device, dist_info: Any, progress: bool,
           printer: Callable[[str], None]) -> dict:
    from monet.model.loading import load_model
    from monet.train.sft import SFTTrainer

    model, processor = load_model(cfg.model, dtype="float32", device=dev, attn_implementation=cfg.attn_implementation,
                                  latent_size=cfg.latent_size)
    adopt_sft_layout(model, cfg, printer if dist_info.is_main else (lambda _: None))

    def data():
        loaded = load_sft_dataset(cfg.data, cfg.image_root)
        quiet = printer if dist_info.is_main else (lambda _: None)
        ex = load_stage_dataset(cfg, processor, cfg.stage, printer=quiet, samples_and_report=loaded)
        tex = None
        if cfg.stage > 1 and cfg.teacher == "online":
            tex = load_stage_dataset(cfg, processor, for_stage(cfg.stage).teacher_stage, printer=lambda _: None,
                                     samples_and_report=loaded)
        return ex, tex

    # Rank 0 tokenises into the shared cache first; the other ranks then reuse it.
    if dist_info.is_main:
        examples, teacher_examples = data()
    barrier(dist_info)
    if not dist_info.is_main:
        examples, teacher_examples = data()
    trainer = SFTTrainer(cfg, model, processor, examples, teacher_examples=teacher_examples, device=dev,
                         progress=progress, printer=printer, run_dir=run_dir)
    try:
        if resume:
            trainer.resume()
        summary = trainer.train()
        if trainer.dist.is_main:
            atomic_write_text(Path(cfg.output_dir, "summary.json"),
                              json.dumps(summary, indent=2, default=str, allow_nan=False) + "\n")
    finally:
        trainer.close()
    return summary


def run_precompute(cfg: SFTConfig, what: str, store: str | os.PathLike, *, layers: list[int] | None = None,
                   dtype: str = "bfloat16", batch_size: int = 4, device: str | torch.device | None = None,
                   progress: bool = True, printer: Callable[[str], None] = print) -> dict:
    """Run the frozen teacher ``cfg.model`` over ``cfg.data`` in the teacher's layout (stage 1
    for ``teacher-reps``, stage 2 for ``teacher-latents``) and fill ``store``."""
    from monet.model.loading import load_model
    from monet.train.precompute import precompute_teacher_states

    target = for_precompute(what)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"--batch-size must be a positive integer, got {batch_size!r}")
    torch_dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}.get(dtype)
    if torch_dtype is None:
        raise ValueError(f"store dtype must be bfloat16, float16 or float32, got {dtype!r}")
    dev = _device(device)
    model, processor = load_model(cfg.model, dtype="float32", device=dev, attn_implementation=cfg.attn_implementation,
                                  latent_size=cfg.latent_size)
    examples = load_stage_dataset(cfg, processor, target.teacher_stage, printer=printer)
    return precompute_teacher_states(model, processor, examples, store, what=what, layers=layers, dtype=torch_dtype,
                                     batch_size=batch_size, progress=progress, printer=printer)
