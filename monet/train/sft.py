"""SFT trainer for the three Monet stages (docs/design.md, section 4).

Per micro-batch: the latent training forward (:func:`monet.model.training.latent_forward`),
weighted CE (fp32, chunked), and the stage's alignment term:

* stage 1: CE only (helper images are real images; causal mask);
* stage 2: CE + ``alignment_weight`` x alignment(student all-layer states at observation
  positions, teacher reps); by default the alignment gradient reaches the weights only through
  the latents, scaled by ``emphasize_latent_weight``; stage-2 attention mask;
* stage 3: CE + ``alignment_weight`` x alignment(student states at latent positions, teacher
  latents); causal mask.

Gradient accumulation normalises CE by the weight sum of the whole optimizer step (all
micro-batches, all ranks), so the loss does not depend on how a global batch is split.

Failure behaviour: a step whose loss or gradient is NaN/inf is skipped (weights and optimizer
moments unchanged; the step number and the LR schedule advance; a warning counts it) and
``max_nonfinite_steps`` skipped steps in a row stop the run with :class:`NonFiniteLossError`; with
DeepSpeed, which applies the update itself, the first non-finite loss stops the run before its
backward pass. A checkpoint is never written with non-finite weights. Resuming with changed
settings prints which changed and whether they take effect; settings the checkpoint cannot
follow (stage, latent_size, freeze_vision, the DeepSpeed config) are refused.

DeepSpeed (``SFTConfig.deepspeed``, :mod:`monet.train.deepspeed_engine`): each micro-batch's forward
runs through the engine (``engine(fn, ...)``) and its backward through ``engine.backward``. ZeRO-3
partitions every weight: the CE head is called as a module (its hooks gather the weight; logits in
the model's dtype, see :func:`monet.train.losses.weighted_ce_sum`), saving and checks gather all
weights (:meth:`SFTTrainer._full_weights`), and the ranks run in lockstep: every rank makes the
same number of latent decode calls and CE chunks (the most of any rank), and micro-batches whose
ranks disagree on having images or latent positions are refused (:meth:`SFTTrainer._zero3_lockstep`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from tqdm.auto import tqdm

from monet.data.alignment import aligned_counts, aligned_positions, example_key
from monet.data.collate import StageBatch, StageCollator
from monet.data.stage_layout import sft_span_layout
from monet.model.training import latent_forward
from monet.train.checkpoint import (
    CheckpointError,
    check_finite_weights,
    latest_checkpoint,
    load_checkpoint_config,
    load_trainer_state,
    rng_state,
    save_checkpoint,
    set_rng_state,
    staging_dir,
)
from monet.train.config import SFTConfig
from monet.train.deepspeed_engine import engine_settings, full_weights, gather_from_ranks, init_engine, is_zero3
from monet.train.distributed import DistInfo, all_reduce_sum, barrier, init_distributed, shutdown_distributed
from monet.train.losses import alignment_loss, route_through_latents, weighted_ce_sum
from monet.train.metrics import MetricsLogger
from monet.train.run_dir import RunDirectory
from monet.train.teacher_targets import for_stage

#: Settings a checkpoint cannot follow when they change on resume (the run is refused).
RESUME_INCOMPATIBLE = {"stage": "the stage layout of the data and the loss", "latent_size": "the span layout",
                       "freeze_vision": "the set of trained parameters (optimizer state)",
                       "deepspeed": "the checkpoint layout (DeepSpeed optimizer shards vs. trainer state)"}
#: Settings whose new value is ignored on resume, with the reason.
RESUME_IGNORED = {"model": "the weights come from the checkpoint"}
#: Settings that take effect but change the sample order from the checkpoint's data position on.
RESUME_DATA_ORDER = ("data", "image_root", "seed", "micro_batch_size", "max_image_tokens_total",
                     "max_image_tokens_per_image")


class NonFiniteLossError(RuntimeError):
    """Too many consecutive optimizer steps had a NaN/inf loss or gradient."""


def resume_changes(saved: dict, cfg: SFTConfig) -> list[tuple[str, Any, Any]]:
    """``(field, checkpoint value, current value)`` for each setting that differs from the
    checkpoint's ``sft_config.yaml`` (``output_dir`` excluded: a run directory may be moved)."""
    now = dataclasses.asdict(cfg)
    return [(k, saved.get(k), v) for k, v in now.items() if k != "output_dir" and k in saved and saved[k] != v]


@dataclass
class StepLosses:
    loss: float
    ce: float
    alignment: float | None
    grad_norm: float | None
    lr: float
    tokens: int
    skipped: bool = False


def autocast_context(device: torch.device, dtype: str):
    if dtype in ("bfloat16", "bf16"):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    if dtype in ("float32", "fp32"):
        return nullcontext()
    raise ValueError(f"dtype must be 'bfloat16' (mixed precision, fp32 master weights) or 'float32', got {dtype!r}")


class TeacherSource:
    """Teacher states per micro-batch: from a store, or computed online by a frozen model."""

    def __init__(self, cfg: SFTConfig, layers: list[int] | None, device: torch.device,
                 online_examples: Any = None, processor: Any = None):
        self.cfg, self.layers, self.device = cfg, layers, device
        self.target = for_stage(cfg.stage)
        if self.target is None:
            raise ValueError(f"stage {cfg.stage} has no teacher")
        self.which = self.target.positions
        self.store = self.model = None
        if cfg.teacher == "store":
            from monet.train.teacher_store import TeacherStore

            self.store = TeacherStore(cfg.teacher_store, kind=self.target.store_kind)
        elif cfg.teacher == "online":
            from monet.model.loading import load_model

            self.model, _ = load_model(cfg.teacher_model, dtype="float32", device=device,
                                       attn_implementation=cfg.attn_implementation, latent_size=cfg.latent_size)
            self.model.requires_grad_(False)
            if online_examples is None:
                raise ValueError("teacher='online' needs the teacher-layout examples")
            self.examples = online_examples
            self.index = {example_key(online_examples, i): i for i in range(len(online_examples))}
            self.collate = StageCollator(processor)

    @torch.no_grad()
    def states(self, batch: StageBatch) -> torch.Tensor:
        """[layers, P, D] in the row-major order of the batch's aligned positions."""
        counts = aligned_counts(batch, self.which)
        if self.store is not None:
            parts = [self.store.get(k, layers=self.layers, expected_positions=n, dtype=torch.float32)
                     for k, n in zip(batch.keys, counts)]
            return torch.cat(parts, dim=1).to(self.device)
        tstage = self.target.teacher_stage
        missing = [k for k in batch.keys if k not in self.index]
        if missing:
            raise KeyError(f"online teacher has no stage-{tstage} layout for samples {missing}")
        tb = self.collate([self.examples[self.index[k]] for k in batch.keys]).to(self.device)
        tcounts = aligned_counts(tb, self.which)
        if tcounts != counts:
            raise ValueError(f"teacher layout has {tcounts} {self.which} positions per sample, student {counts} "
                             f"(samples {batch.keys})")
        out = latent_forward(self.model, tb.to_latent_batch(), capture=aligned_positions(tb, self.which),
                             capture_layers=self.layers)
        return out.captured.float()


def micro_batch_losses(model: Any, batch: StageBatch, cfg: SFTConfig, teacher: TeacherSource | None,
                       ce_weight_total: torch.Tensor, n_micro: int, world_size: int = 1, *,
                       call_head: bool = False, min_decode_steps: int = 0,
                       min_ce_chunks: int = 0) -> tuple[torch.Tensor, dict]:
    """Loss to backpropagate for one micro-batch, and its logged parts.

    Gradients are summed over micro-batches and ranks, so CE is divided by the CE weight sum of
    the whole optimizer step (``ce_weight_total``, all ranks) and the alignment mean by the number
    of micro-batches times ranks.

    ``call_head``: compute the CE logits by calling the output-projection module instead of
    reading its weight (DeepSpeed ZeRO-3, whose partitioned weight exists only inside the module's
    forward; see :func:`monet.train.losses.weighted_ce_sum` for what differs in bf16).
    ``min_decode_steps`` / ``min_ce_chunks``: ZeRO-3 lockstep (:meth:`SFTTrainer._zero3_lockstep`).
    """
    target = for_stage(cfg.stage)
    which = target.positions if target is not None else None
    use_align = which is not None and teacher is not None and cfg.alignment_weight > 0
    capture = aligned_positions(batch, which) if use_align else None
    out = latent_forward(model, batch.to_latent_batch(), capture=capture, capture_layers=cfg.alignment_layers,
                         latent_backward=cfg.latent_backward_mode, min_decode_steps=min_decode_steps)
    head = model.get_output_embeddings() if call_head else model.get_output_embeddings().weight
    ce_sum, _ = weighted_ce_sum(out.hidden, head, batch.labels, batch.weights, chunk_size=cfg.ce_chunk_size,
                                min_chunks=min_ce_chunks)
    loss = ce_sum / ce_weight_total
    parts = {"ce_sum": float(ce_sum.detach())}
    if use_align:
        align = alignment_loss(out.captured, teacher.states(batch), cfg.alignment_axis)
        weighted = cfg.alignment_weight * align / (n_micro * world_size)
        if cfg.stage == 2 and cfg.align_through_latents_only:
            if out.latent_source is None:
                raise ValueError(f"stage 2 batch {batch.keys} has no latent positions to route the alignment through")
            loss = loss + route_through_latents(weighted, out.latent_source, cfg.emphasize_latent_weight)
        else:
            loss = loss + weighted
        parts["alignment"] = float(align.detach())
    return loss, parts


def lr_lambda(cfg: SFTConfig, total_steps: int) -> Callable[[int], float]:
    def f(step: int) -> float:
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.lr_schedule == "cosine":
            span = max(1, total_steps - cfg.warmup_steps)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - cfg.warmup_steps) / span)))
        return 1.0
    return f


def epoch_order(n: int, epoch: int, seed: int, dist_info: DistInfo, micro_batch_size: int) -> list[list[int]]:
    """Micro-batches (lists of example indices) of this rank for ``epoch``: a seeded permutation,
    dealt round-robin to ranks, truncated so every rank gets the same number of micro-batches."""
    g = torch.Generator().manual_seed(seed * 1000003 + epoch)
    perm = torch.randperm(n, generator=g).tolist()
    per_rank = n // dist_info.world_size
    mine = perm[dist_info.rank::dist_info.world_size][:per_rank]
    return [mine[i:i + micro_batch_size] for i in range(0, len(mine), micro_batch_size)]


class SFTTrainer:
    """Runs one SFT stage. ``examples``: a map-style dataset of
    :class:`monet.data.stage_layout.StageExample` (e.g. :class:`monet.data.preprocess_cache.PreprocessedDataset`)
    in the stage layout; ``teacher_examples`` (online teacher) the same samples in the teacher's
    layout, with a ``keys`` list.

    ``run_dir``: the :class:`RunDirectory` the caller already holds for ``cfg.output_dir``; when
    None, rank 0 takes it here with ``resume`` / ``overwrite`` (see :mod:`monet.train.run_dir`).
    """

    def __init__(self, cfg: SFTConfig, model: Any, processor: Any, examples: Sequence[Any], *,
                 teacher_examples: Any = None, device: torch.device | str = "cpu",
                 progress: bool = True, printer: Callable[[str], None] = print,
                 run_dir: RunDirectory | None = None, resume: bool = False, overwrite: bool = False):
        self.cfg, self.model, self.processor = cfg, model, processor
        self.examples = examples
        if len(examples) == 0:
            raise ValueError("no training examples (all samples rejected, or an empty dataset)")
        self.device = torch.device(device)
        self.dist = init_distributed(self.device, group_of_one=bool(cfg.deepspeed))
        self.progress, self.printer = progress and self.dist.is_main, printer
        self._own_run_dir = None
        if run_dir is None and self.dist.is_main:
            run_dir = self._own_run_dir = RunDirectory(cfg.output_dir, resume=resume, overwrite=overwrite)
        try:
            self._setup(teacher_examples)
        except BaseException:
            if self._own_run_dir is not None:
                self._own_run_dir.release()
            raise

    def _setup(self, teacher_examples: Any) -> None:
        cfg, model, processor, examples = self.cfg, self.model, self.processor, self.examples
        if cfg.freeze_vision:
            model.model.visual.requires_grad_(False)
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.to(self.device).train()
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.micro_per_epoch = len(epoch_order(len(self.examples), 0, cfg.seed, self.dist, cfg.micro_batch_size))
        steps_per_epoch = max(1, self.micro_per_epoch // cfg.grad_accum)
        self.total_steps = cfg.max_steps or max(1, int(cfg.epochs * steps_per_epoch))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg, self.total_steps))
        self.engine = None
        if cfg.deepspeed:
            self.engine = init_engine(engine_settings(cfg), model, self.optimizer, self.scheduler)
        elif self.dist.enabled:  # same initial weights on every rank
            for p in model.parameters():
                torch.distributed.broadcast(p.data, src=0)
        #: ZeRO-3 partitions the weights: they are whole only inside a module's forward/backward
        #: (DeepSpeed's hooks) or inside :meth:`_full_weights`
        self.zero3 = is_zero3(self.engine)
        self.teacher = None
        if cfg.stage > 1 and cfg.teacher != "none":
            self.teacher = TeacherSource(cfg, cfg.alignment_layers, self.device, teacher_examples, processor)
            if self.teacher.store is not None:  # fail before training, not at the first sample without states
                missing = self.teacher.store.missing([example_key(examples, i) for i in range(len(examples))])
                if missing:
                    raise ValueError(f"teacher store {cfg.teacher_store} lacks {len(missing)} of {len(examples)} "
                                     f"training samples (e.g. {missing[:3]}); run `monet precompute` on the same data")
        self.collate = StageCollator(processor, ce_emphasize_factor=cfg.ce_factor)
        self.step, self.epoch, self.micro_index = 0, 0, 0
        self.nonfinite_streak = self.nonfinite_total = 0
        self.resumed_from: Path | None = None
        self._skips_reported = 0
        self.metrics = MetricsLogger(cfg.output_dir, every=cfg.log_every, enabled=self.dist.is_main,
                                     tensorboard=cfg.tensorboard, wandb_project=cfg.wandb_project,
                                     run_config=dataclasses.asdict(cfg), printer=self.printer)

    # -- checkpoints ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The trainer state a checkpoint stores. With DeepSpeed the optimizer and scheduler are
        not in it: the engine saves them itself (per rank, in its own layout), and under ZeRO-3
        the torch optimizer no longer holds the parameters it was built with."""
        state = {"step": self.step, "epoch": self.epoch, "micro_index": self.micro_index,
                 "rng": rng_state(), "world_size": self.dist.world_size,
                 "nonfinite_streak": self.nonfinite_streak, "nonfinite_total": self.nonfinite_total}
        if self.engine is None:
            state["optimizer"], state["scheduler"] = self.optimizer.state_dict(), self.scheduler.state_dict()
        return state

    def save(self) -> Path | None:
        """Write ``checkpoint-STEP`` (collective). Refuses non-finite weights on every rank
        before anything is written."""
        with self._full_weights():
            check_finite_weights(self.model)
        path, staged, state = None, None, self.state_dict()
        if self.engine is not None:  # collective: every rank writes its optimizer shard
            staged = staging_dir(self.cfg.output_dir, self.step)
            self.engine.save_checkpoint(str(staged / "deepspeed"), tag="state")
        with self._full_weights():
            if self.dist.is_main:
                path = save_checkpoint(self.cfg.output_dir, self.step, model=self.model, processor=self.processor,
                                       trainer_state=state, config_yaml=self.cfg.to_yaml(),
                                       keep_last=self.cfg.keep_last, staged=staged,
                                       span_layout=sft_span_layout(self.cfg.latent_size))
        barrier(self.dist)
        return path

    def _full_weights(self):
        """Gather ZeRO-3 partitioned parameters (read-only: saving, checks, checksums; collective);
        a no-op otherwise."""
        return full_weights(self.engine, self.model)

    def _check_resume_settings(self, ckpt: Path) -> None:
        """Compare the settings with the checkpoint's; refuse incompatible changes, print the rest."""
        saved = load_checkpoint_config(ckpt)
        if saved is None:
            return
        changes = resume_changes(saved, self.cfg)
        bad = [(k, a, b) for k, a, b in changes if k in RESUME_INCOMPATIBLE]
        if bad:
            raise ValueError(f"cannot resume {ckpt} with changed " + "; ".join(
                f"{k} ({a!r} -> {b!r}: {RESUME_INCOMPATIBLE[k]})" for k, a, b in bad)
                + "; start a new run (--overwrite or another output_dir) with --set model=" + str(ckpt))
        if not changes or not self.dist.is_main:
            return
        lines = [f"warning: resuming {ckpt} with {len(changes)} changed setting(s):"]
        for k, a, b in changes:
            if k in RESUME_IGNORED:
                effect = f"ignored ({RESUME_IGNORED[k]})"
            elif k in RESUME_DATA_ORDER:
                effect = "takes effect (the sample order differs from an uninterrupted run from here on)"
            else:
                effect = "takes effect"
            lines.append(f"  {k}: {a!r} -> {b!r}: {effect}")
        self.printer("\n".join(lines))

    def _apply_optimizer_settings(self) -> None:
        """After loading optimizer/scheduler state: the current config's lr (also the schedule's
        base) and weight decay take effect; the LR is recomputed for the restored step."""
        for g in self.optimizer.param_groups:
            g["initial_lr"] = self.cfg.lr
            g["weight_decay"] = self.cfg.weight_decay
        self.scheduler.base_lrs = [self.cfg.lr] * len(self.optimizer.param_groups)
        factor = lr_lambda(self.cfg, self.total_steps)(self.scheduler.last_epoch)
        for g in self.optimizer.param_groups:
            g["lr"] = self.cfg.lr * factor
        self.scheduler._last_lr = [g["lr"] for g in self.optimizer.param_groups]

    def resume(self, checkpoint: str | Path | None = None) -> bool:
        """Restore weights, optimizer, scheduler, RNG and data position from ``checkpoint`` (default:
        the latest in ``output_dir``). Returns False when there is nothing to resume (then the
        run starts over and ``metrics.jsonl`` is cleared). ``metrics.jsonl`` keeps the rows up to
        the checkpoint's step."""
        ckpt = Path(checkpoint) if checkpoint else latest_checkpoint(self.cfg.output_dir)
        if ckpt is None:
            self.metrics.resume_at(0)
            return False
        state = load_trainer_state(ckpt)  # JSON + safetensors only; a pickle is refused
        if state.get("world_size", 1) != self.dist.world_size:
            raise ValueError(f"{ckpt} was written with world size {state['world_size']}, now {self.dist.world_size}; "
                             "the data order would differ")
        self._check_resume_settings(ckpt)
        if self.engine is not None:
            from monet.train.deepspeed_engine import check_deepspeed_checkpoint

            check_deepspeed_checkpoint(ckpt / "deepspeed" / "state")  # DeepSpeed unpickles them in full
            try:
                self.engine.load_checkpoint(str(ckpt / "deepspeed"), tag="state")
            except RuntimeError as e:
                if "model." not in str(e):
                    raise
                raise CheckpointError(
                    f"{ckpt}: its DeepSpeed state names the weights without the 'model.' prefix the engine uses now "
                    "(written by an earlier monet version); start a new run from its weights instead "
                    f"(--set model={ckpt})") from None
        else:
            # safetensors only: a planted pytorch_model.bin (a pickle) is never read
            if not any((ckpt / n).is_file() for n in ("model.safetensors", "model.safetensors.index.json")):
                raise CheckpointError(f"{ckpt} has no safetensors weights (model.safetensors); pickled weights "
                                      "are never loaded")
            fresh = type(self.model).from_pretrained(ckpt, dtype=next(self.model.parameters()).dtype,
                                                     use_safetensors=True)
            self.model.load_state_dict(fresh.state_dict())
            del fresh
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self._apply_optimizer_settings()
        set_rng_state(state["rng"])
        self.step, self.epoch, self.micro_index = state["step"], state["epoch"], state["micro_index"]
        self.nonfinite_streak = int(state.get("nonfinite_streak", 0))
        self.nonfinite_total = int(state.get("nonfinite_total", 0))
        self.resumed_from = ckpt
        dropped = self.metrics.resume_at(self.step)
        if self.dist.is_main:
            self.printer(f"resumed from {ckpt} at step {self.step} (epoch {self.epoch}, micro-batch {self.micro_index})"
                         + (f"; dropped {dropped} metrics rows past step {self.step}" if dropped else ""))
        return True

    # -- training ------------------------------------------------------------------------------
    def _batch(self, idx: list[int]) -> StageBatch:
        # Samples that fail to load are skipped and recorded in self.collate.skipped (logged in train()).
        batch, tries = self.collate.load(self.examples, idx), 1
        while batch is None:  # no sample of this micro-batch loaded: take the next one
            if tries > self.micro_per_epoch:
                raise RuntimeError(f"no training sample loads (a whole epoch failed); last: {self.collate.skipped[-3:]}")
            batch, tries = self.collate.load(self.examples, self._next_indices()), tries + 1
        if batch.stage != self.cfg.stage:
            raise ValueError(f"examples are stage {batch.stage} layouts but the config trains stage {self.cfg.stage}")
        return batch.to(self.device)

    def _next_indices(self) -> list[int]:
        """Example indices of the next micro-batch; advances (epoch, micro_index)."""
        if self.micro_index >= self.micro_per_epoch:
            self.epoch, self.micro_index = self.epoch + 1, 0
        if getattr(self, "_order_epoch", None) != self.epoch:
            self._order = epoch_order(len(self.examples), self.epoch, self.cfg.seed, self.dist, self.cfg.micro_batch_size)
            self._order_epoch = self.epoch
        idx = self._order[self.micro_index]
        self.micro_index += 1
        return idx

    def train_step(self, micro: list[StageBatch]) -> StepLosses:
        """One optimizer step over ``micro`` (the accumulation window), plain or DeepSpeed.

        ``StepLosses.skipped`` is True when the loss or the gradient was NaN/inf: the plain path
        then leaves weights and optimizer state untouched (the scheduler still advances); the
        DeepSpeed path raises :class:`NonFiniteLossError` before the backward pass instead."""
        cfg, engine = self.cfg, self.engine
        local_w = sum(float(b.weights[:, 1:][b.labels[:, 1:] != -100].sum()) for b in micro)
        w_total = all_reduce_sum(torch.tensor(local_w, dtype=torch.float64), self.dist).float().clamp_min(1e-12)
        lr = self.scheduler.get_last_lr()[0]
        ce_total, align_vals, tokens, local_bad = 0.0, [], 0, False
        if engine is None:
            self.optimizer.zero_grad(set_to_none=True)
        lockstep = self._zero3_lockstep(micro) if self.zero3 else [{}] * len(micro)
        for batch, same_calls in zip(micro, lockstep):
            args = (self.model, batch, cfg, self.teacher, w_total.to(self.device), len(micro), self.dist.world_size)
            if engine is None:
                with autocast_context(self.device, cfg.dtype):
                    loss, parts = micro_batch_losses(*args)
            else:  # through the engine's forward (its micro-step bookkeeping); it converts the model for bf16
                loss, parts = engine(micro_batch_losses, *args, call_head=self.zero3, **same_calls)
            finite = bool(torch.isfinite(loss.detach()))
            local_bad |= not finite
            if engine is None:
                loss.backward()
            else:  # DeepSpeed divides by the accumulation steps and averages over ranks: undo both
                # agreed by all ranks, so that all stop together (a rank leaving alone hangs the others)
                bad = int(all_reduce_sum(torch.tensor([int(not finite)]), self.dist))
                if bad:
                    raise NonFiniteLossError(
                        f"step {self.step + 1}: non-finite loss on {bad} rank(s) (this rank: {float(loss):.4g} on "
                        f"samples {batch.keys}); DeepSpeed applies updates itself, so the step cannot be skipped: "
                        "stopping before its backward pass (the weights are untouched; resume from the last "
                        "checkpoint after fixing lr or the data)")
                engine.backward(loss * (len(micro) * self.dist.world_size))
                engine.step()
            ce_total += parts["ce_sum"]
            if "alignment" in parts:
                align_vals.append(parts["alignment"])
            tokens += int(batch.attention_mask.sum())
        # one collective for the CE sum and the "some rank saw a non-finite loss" flag
        sums = all_reduce_sum(torch.tensor([ce_total, float(local_bad)], dtype=torch.float64), self.dist)
        ce = float(sums[0]) / float(w_total)
        skipped = bool(sums[1] > 0) or not math.isfinite(ce)
        if engine is None:
            grad_norm, skipped = self._optimizer_step(skip=skipped)
        else:
            norm = engine.get_global_grad_norm()
            grad_norm = None if norm is None else float(norm)
            if grad_norm is not None and not math.isfinite(grad_norm):
                raise NonFiniteLossError(f"step {self.step + 1}: non-finite gradient norm ({grad_norm}) after "
                                         "DeepSpeed's update; stopping (resume from the last checkpoint)")
        align = sum(align_vals) / len(align_vals) if align_vals else None
        total = ce + (cfg.alignment_weight * align if align is not None else 0.0)
        return StepLosses(total, ce, align, grad_norm, lr, tokens, skipped)

    def _zero3_lockstep(self, micro: list[StageBatch]) -> list[dict]:
        """Per micro-batch, the module-call counts every rank runs under ZeRO-3 (one collective).

        ZeRO-3 gathers a module's parameters with a collective at every call, so the ranks must
        call the same modules equally often. Ranks' micro-batches differ in their number of latent
        decode steps (the most latents in a row) and of CE chunks: every rank runs the largest
        (the extra calls are dummies that change nothing). Whether a micro-batch has images and
        latent positions decides which code path runs; ranks that disagree there are refused."""
        cols = ("images", "latent positions", "decode steps", "CE chunks")
        local = torch.tensor([[int(b.pixel_values is not None), int(bool(b.latent_mask.any())),
                               int(b.latent_mask.sum(1).max()) if b.latent_mask.numel() else 0,
                               math.ceil(int((b.labels[:, 1:] != -100).sum()) / self.cfg.ce_chunk_size)]
                              for b in micro], dtype=torch.int64)
        every = gather_from_ranks(local, self.dist.world_size)  # [world, micro, 4]
        plan = []
        for i, b in enumerate(micro):
            for c in (0, 1):
                if int(every[:, i, c].min()) != int(every[:, i, c].max()):
                    has = [r for r in range(self.dist.world_size) if int(every[r, i, c])]
                    raise ValueError(
                        f"step {self.step + 1}, micro-batch {i + 1}: DeepSpeed ZeRO-3 needs every rank to run the same "
                        f"code path, but only ranks {has} have {cols[c]} (this rank {self.dist.rank}: samples "
                        f"{b.keys}); keep the data uniform in this respect or use ZeRO-2 / plain data parallel")
            plan.append({"min_decode_steps": int(every[:, i, 2].max()), "min_ce_chunks": int(every[:, i, 3].max())})
        return plan

    def _optimizer_step(self, skip: bool = False) -> tuple[float | None, bool]:
        """Sum gradients over ranks (losses are globally normalised), check them, clip, step.

        Returns ``(gradient norm, skipped)``: with ``skip`` or a NaN/inf gradient norm the
        gradients are dropped and the optimizer does not step (the scheduler does, so the LR
        stays a function of the step number)."""
        if self.dist.enabled:
            for p in self.params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                torch.distributed.all_reduce(p.grad)
        grads = [p.grad for p in self.params if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
        grad_norm = float(norm)
        skip = skip or not math.isfinite(grad_norm)
        if skip:
            self.optimizer.zero_grad(set_to_none=True)
        else:
            if self.cfg.max_grad_norm:
                torch.nn.utils.clip_grads_with_norm_(self.params, self.cfg.max_grad_norm, norm)
            self.optimizer.step()
        with warnings.catch_warnings():
            # a skipped first step calls the scheduler before any optimizer step, on purpose
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")
            self.scheduler.step()
        return grad_norm, skip

    def close(self) -> None:
        """Release DeepSpeed, the process group (torchrun runs) and the run directory this
        trainer took."""
        try:
            if self.engine is not None and hasattr(self.engine, "destroy"):
                self.engine.destroy()
            shutdown_distributed()
        finally:
            if self._own_run_dir is not None:
                self._own_run_dir.release()

    def replica_checksums(self) -> list[str]:
        """SHA-256 of this rank's trainable weights, gathered from every rank (rank order)."""
        h = hashlib.sha256()
        with self._full_weights():
            for p in self.params:
                h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        mine = h.hexdigest()[:16]
        if not self.dist.enabled:
            return [mine]
        out: list[str] = [""] * self.dist.world_size
        torch.distributed.all_gather_object(out, mine)
        return out

    def _count_nonfinite(self, out: StepLosses) -> None:
        """Count a skipped step, warn, and stop after ``max_nonfinite_steps`` in a row."""
        if not out.skipped:
            self.nonfinite_streak = 0
            return
        self.nonfinite_streak += 1
        self.nonfinite_total += 1
        limit = self.cfg.max_nonfinite_steps
        if self.dist.is_main:
            self.printer(f"warning: step {self.step}: non-finite loss or gradient (loss {out.loss:.4g}, grad norm "
                         f"{out.grad_norm if out.grad_norm is None else f'{out.grad_norm:.4g}'}); step skipped, weights "
                         f"unchanged ({self.nonfinite_streak} in a row, {self.nonfinite_total} in total; the run stops "
                         f"at {limit} in a row)")
        if self.nonfinite_streak >= limit:
            last = latest_checkpoint(self.cfg.output_dir) if self.dist.is_main else None
            raise NonFiniteLossError(
                f"{self.nonfinite_streak} consecutive steps (up to step {self.step}) had a non-finite loss or gradient "
                f"(max_nonfinite_steps={limit}); stopping without writing a checkpoint. Last checkpoint: "
                f"{last or 'none'}. Check the data and the learning rate (lr={self.cfg.lr})")

    def train(self) -> dict:
        cfg = self.cfg
        t0 = time.perf_counter()
        bar = tqdm(total=self.total_steps, initial=self.step, desc=f"sft stage {cfg.stage}", disable=not self.progress)
        while self.step < self.total_steps:
            micro = [self._batch(self._next_indices()) for _ in range(cfg.grad_accum)]
            out = self.train_step(micro)
            self.step += 1
            row = {"loss": out.loss, "ce": out.ce, "lr": out.lr, "tokens": out.tokens}
            if out.alignment is not None:
                row["alignment"] = out.alignment
            if out.grad_norm is not None:
                row["grad_norm"] = out.grad_norm
            if out.skipped:
                row["skipped"] = True
            row["skipped_samples"] = len(self.collate.skipped)  # cumulative; ids printed as they occur
            for sk in self.collate.skipped[self._skips_reported:]:
                self.printer(f"skipped sample {sk.key}: {sk.reason}")
            self._skips_reported = len(self.collate.skipped)
            self.metrics.log(self.step, row)
            self._count_nonfinite(out)
            bar.update(1)
            bar.set_postfix(loss=f"{out.loss:.4f}")
            if cfg.save_every and self.step % cfg.save_every == 0 and self.step < self.total_steps:
                self.save()
        bar.close()
        final = self.save()
        self.metrics.close()
        summary = {"stage": cfg.stage, "steps": self.step, "seconds": time.perf_counter() - t0,
                   "checkpoint": str(final) if final else None,
                   "resumed_from": str(self.resumed_from) if self.resumed_from else None,
                   "skipped_steps": self.nonfinite_total,
                   "skipped_samples": [dataclasses.asdict(sk) for sk in self.collate.skipped],
                   "metrics": self.metrics.summary(),
                   "replica_checksums": self.replica_checksums()}
        if len(set(summary["replica_checksums"])) > 1:
            raise RuntimeError(f"data-parallel replicas diverged: weight checksums {summary['replica_checksums']}")
        if self.dist.is_main:
            self.printer(format_summary(summary))
        return summary


def format_summary(summary: dict) -> str:
    lines = [f"stage {summary['stage']}: {summary['steps']} steps in {summary['seconds']:.1f} s"
             + (f" (resumed from {summary['resumed_from']})" if summary.get("resumed_from") else "")
             + (f" -> {summary['checkpoint']}" if summary.get("checkpoint") else "")]
    if summary.get("skipped_steps"):
        lines.append(f"  {summary['skipped_steps']} steps skipped (non-finite loss or gradient)")
    for k, v in summary["metrics"].items():
        if k in ("loss", "ce", "alignment", "grad_norm"):
            lines.append(f"  {k:<10} first {v['first']:.4f}  last {v['last']:.4f}  mean {v['mean']:.4f}")
    if summary.get("skipped_samples"):
        keys = [s["key"] for s in summary["skipped_samples"]]
        lines.append(f"  skipped {len(keys)} sample loads (could not be loaded): {', '.join(keys[:10])}"
                     + (" ..." if len(keys) > 10 else ""))
    return "\n".join(lines)
