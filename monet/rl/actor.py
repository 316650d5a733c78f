"""The VLPO actor update: old / reference log-probabilities, the VLPO loss over micro-batches, the
optimiser steps — in one process, data parallel under torchrun, or with a DeepSpeed ZeRO engine.

One :meth:`Actor.update` on a training batch given as micro-batches (:class:`ActorMicroBatch`:
collated rollouts, their action masks and per-rollout advantages):

1. The batch is split into ``mini_batches`` optimiser steps: consecutive micro-batches, ``ceil(n /
   mini_batches)`` each (the last may be shorter). With ``W`` ranks, rank ``r`` takes micro-batches
   ``r, r + W, ...`` of every mini-batch; every mini-batch must then hold a multiple of ``W``.
2. Old log-probabilities under the current policy (no grad) and, when ``vlpo.kl_coef > 0``,
   reference log-probabilities under the frozen reference, for this rank's micro-batches.
3. ``ppo_epochs`` passes; per mini-batch: the text / latent action counts of the whole mini-batch
   (summed over ranks: one ``all_reduce``), so each micro-batch's
   :func:`~monet.rl.objective.vlpo_loss` is its share of the global token-mean loss; backward per
   micro-batch; then
   * plain (one process or data parallel): gradients summed over ranks (``all_reduce``), clipped
     to ``max_grad_norm``; a non-finite gradient norm skips the step (weights and AdamW state
     untouched, counted); AdamW step;
   * DeepSpeed (``VLPORunConfig.deepspeed``, ZeRO-2/3 from the same JSON files as SFT): every
     forward runs through the engine (``engine(fn, ...)``, see
     :class:`monet.train.deepspeed_engine.ForwardRunner`), ``engine.backward`` on the loss times
     ``micro-batches per rank x W`` (DeepSpeed divides by its accumulation steps and averages
     over ranks; we sum), DeepSpeed clips and steps at the mini-batch boundary. It cannot skip a
     step: a non-finite loss on any rank stops the update on every rank before its backward.
4. Metrics per mini-batch: :func:`~monet.rl.objective.merge_metrics` on each rank, then summed /
   max'ed / min'ed over ranks by the same rules; averaged over the mini-batch steps of the update.

So in one process the update is exactly the former single-process trainer's, and ``W`` ranks
compute the same gradients up to the order of floating-point sums.

DeepSpeed specifics: the engine's accumulation count is the micro-batches per rank per mini-batch,
fixed when the engine is built, so every mini-batch must have the same number of micro-batches
(``ceil(groups_per_batch * n / micro_batch_size)`` divisible by ``mini_batches x W``). Under
ZeRO-3 every module call gathers parameters with a collective, so the ranks' micro-batches must run
the same module calls: all with images or all without, and all with or all without
policy-generated vision tokens (an extra embedding call) — checked per micro-batch, a clear error
otherwise. The reference model is not partitioned (each rank holds a full frozen copy); with
``offload_reference`` that copy lives on the CPU and visits the rank's device only for step 2
(:func:`reference_on`). With
``dtype: bfloat16`` DeepSpeed keeps fp32 master weights for AdamW, while the plain path updates the
bf16 weights directly.

The Ray controller runs this actor as a group of ``train_workers`` Ray actors
(:mod:`monet.rl.group`); ``monet vlpo --controller local`` in one process. Entry point for a
saved batch (data parallel under torchrun)::

    torchrun --nproc_per_node 2 -m monet.rl.actor --config vlpo.yaml --batch BATCH_DIR --out OUT_DIR

loads the policy (``model`` of the config), runs ``--updates`` updates on the batch written by
:func:`save_actor_batch` and writes the updated policy with its processor (a model directory for
``monet.load_model``; full weights also under ZeRO-3) and ``metrics.json`` to ``OUT_DIR`` (rank 0).
``OUT_DIR`` must not be ``BATCH_DIR``: a model directory holding ``actor_batch.safetensors`` would
not load in vLLM, which takes every ``*.safetensors`` file of a model directory as weights.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from monet.layout import SpanLayout
from monet.rl.actions import ActionMasks, action_masks
from monet.rl.batch import collate_rollouts, to_device
from monet.rl.logprob import PolicyLogProbs, RolloutBatch, policy_logprobs
from monet.rl.objective import ActionTerms, merge_metrics, vlpo_loss
from monet.rl.run_config import VLPORunConfig
from monet.tokens import LatentTokenIds
from monet.train.deepspeed_engine import EngineSettings, full_weights, gather_from_ranks, init_engine, is_zero3
from monet.train.distributed import DistInfo, all_reduce, all_reduce_sum

BATCH_JSON = "actor_batch.json"
BATCH_TENSORS = "actor_batch.safetensors"
BATCH_FORMAT = "monet-vlpo-actor-batch"
_BATCH_FIELDS = ("input_ids", "attention_mask", "response_start", "forced_first_start", "advantages")


#: where an offloaded reference (``VLPORunConfig.offload_reference``) waits between reference passes
OFFLOAD_DEVICE = torch.device("cpu")


@contextlib.contextmanager
def reference_on(module: torch.nn.Module, device: torch.device | str, home: torch.device | str):
    """Move ``module`` (parameters and buffers, in place) to ``device`` for the block and back to
    ``home`` after it, also when the block raises. Both moves are no-ops when ``device == home``.
    Yields the module. The values are copied exactly, so what the block computes does not depend on
    where the module waited. Memory / time: the module occupies ``device`` only inside the block,
    for two host<->device copies of its weights per use."""
    module.to(device)
    try:
        yield module
    finally:
        module.to(home)


class NonFiniteUpdateError(RuntimeError):
    """A non-finite loss under DeepSpeed, which applies updates itself (the step cannot be skipped)."""


@dataclass
class ActorMicroBatch:
    """One micro-batch, collated once and scored three times (old, ref, new): the rollouts, their
    action masks, advantages ``[B]`` and, once scored, old / reference log-probabilities ``[B, L]``."""

    batch: RolloutBatch
    masks: ActionMasks
    advantages: torch.Tensor
    old_text: torch.Tensor | None = None
    old_latent: torch.Tensor | None = None
    ref_text: torch.Tensor | None = None
    ref_latent: torch.Tensor | None = None


def make_micro_batch(batch: RolloutBatch, advantages: torch.Tensor, *, layout: SpanLayout,
                     token_ids: LatentTokenIds, device: Any, dtype: torch.dtype) -> ActorMicroBatch:
    """Move ``batch`` to ``device`` (pixel values in ``dtype``) and derive its action masks."""
    b = to_device(batch, device, dtype)
    masks = action_masks(b.input_ids, b.attention_mask, b.response_start, layout=layout, token_ids=token_ids,
                         forced_first_start=b.forced_first_start)
    return ActorMicroBatch(b, masks, advantages.to(device))


def collate_micro_batches(rollouts: Sequence[Any], advantages: torch.Tensor, encoded: dict, *, micro_batch_size: int,
                          pad_id: int, hidden_size: int) -> list[tuple[RolloutBatch, torch.Tensor]]:
    """The training batch (``rollouts`` in order, one advantage each) as ``(RolloutBatch, advantages
    [B])`` per micro-batch of ``micro_batch_size`` rollouts, on the CPU
    (:func:`monet.rl.batch.collate_rollouts`): what every rank of an actor group receives and turns
    into :class:`ActorMicroBatch` es on its own device with :func:`make_micro_batch`."""
    adv = advantages.detach().cpu()
    return [(collate_rollouts(rollouts[i:i + micro_batch_size], encoded, pad_id=pad_id, hidden_size=hidden_size),
             adv[i:i + micro_batch_size]) for i in range(0, len(rollouts), micro_batch_size)]


def micro_batches(rollouts: Sequence[Any], advantages: torch.Tensor, encoded: dict, *, micro_batch_size: int,
                  pad_id: int, hidden_size: int, layout: SpanLayout, token_ids: LatentTokenIds, device: Any,
                  dtype: torch.dtype) -> list[ActorMicroBatch]:
    """:func:`collate_micro_batches`, each made an :class:`ActorMicroBatch` on ``device``."""
    return [make_micro_batch(b, adv, layout=layout, token_ids=token_ids, device=device, dtype=dtype)
            for b, adv in collate_micro_batches(rollouts, advantages, encoded, micro_batch_size=micro_batch_size,
                                                pad_id=pad_id, hidden_size=hidden_size)]


def split_mini_batches(n_micro: int, mini_batches: int) -> list[range]:
    """Micro-batch indices of each mini-batch: consecutive, ``ceil(n_micro / mini_batches)`` each."""
    per = math.ceil(n_micro / mini_batches)
    return [range(i, min(i + per, n_micro)) for i in range(0, n_micro, per)]


def rank_share(n_micro: int, mini_batches: int, dist: DistInfo) -> list[list[int]]:
    """This rank's micro-batch indices of each mini-batch (round-robin within the mini-batch)."""
    out = []
    for k, mini in enumerate(split_mini_batches(n_micro, mini_batches)):
        if len(mini) % dist.world_size:
            raise ValueError(f"mini-batch {k + 1} of the training batch has {len(mini)} micro-batches, which "
                             f"{dist.world_size} ranks cannot share equally; choose micro_batch_size, "
                             "vlpo.groups_per_batch x vlpo.n and mini_batches so that every mini-batch holds a "
                             "multiple of the world size")
        out.append(list(mini)[dist.rank::dist.world_size])
    return out


def micro_batches_per_step(cfg: VLPORunConfig, world_size: int) -> int:
    """Micro-batches each rank accumulates per optimiser step, when that is the same for every
    mini-batch (what a DeepSpeed engine needs); a clear error otherwise."""
    n_micro = math.ceil(cfg.vlpo.groups_per_batch * cfg.vlpo.n / cfg.micro_batch_size)
    if n_micro % (cfg.mini_batches * world_size):
        raise ValueError(
            f"DeepSpeed needs every optimiser step to accumulate the same number of micro-batches per rank, but a "
            f"batch of {cfg.vlpo.groups_per_batch} x {cfg.vlpo.n} rollouts in micro-batches of {cfg.micro_batch_size} "
            f"is {n_micro} micro-batches, not divisible by mini_batches ({cfg.mini_batches}) x ranks ({world_size})")
    return n_micro // (cfg.mini_batches * world_size)


def _reduce_metrics(merged: dict[str, torch.Tensor], dist: DistInfo) -> dict[str, torch.Tensor]:
    """Combine per-rank merged metrics over ranks by :func:`merge_metrics`' rules."""
    if not dist.enabled:
        return merged
    keys = sorted(merged)
    groups = {op: [k for k in keys if pick(k)] for op, pick in (
        (torch.distributed.ReduceOp.MAX, lambda k: k.endswith("_max")),
        (torch.distributed.ReduceOp.MIN, lambda k: k.endswith("_min")),
        (torch.distributed.ReduceOp.SUM, lambda k: not k.endswith(("_max", "_min"))))}
    out = {}
    for op, names in groups.items():
        if names:
            t = all_reduce(torch.stack([merged[k].detach().double().cpu() for k in names]), dist, op)
            out.update({k: t[i] for i, k in enumerate(names)})
    return merge_metrics([out])  # recomputes latent/share from the summed parts


class Actor:
    """The policy's optimiser and update (module docstring).

    ``policy``: the model to train (in the dtype and on the device it will train in; its vision
    tower already frozen if wanted); ``reference``: the frozen reference (needed when
    ``cfg.vlpo.kl_coef > 0``); ``dist``: this process's place in the torchrun world
    (:func:`monet.train.distributed.init_distributed`; default a world of one). With
    ``cfg.deepspeed`` the policy is handed to a DeepSpeed engine (ZeRO-3 partitions it: read its
    weights inside :meth:`full_weights`)."""

    def __init__(self, policy: Any, cfg: VLPORunConfig, *, layout: SpanLayout, token_ids: LatentTokenIds,
                 reference: Any = None, dist: DistInfo | None = None):
        self.policy, self.cfg, self.layout, self.token_ids = policy, cfg, layout, token_ids
        self.reference, self.dist = reference, dist or DistInfo()
        if cfg.vlpo.kl_coef > 0 and reference is None:
            raise ValueError(f"vlpo.kl_coef={cfg.vlpo.kl_coef} needs the reference model")
        self.params = [p for p in policy.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, betas=tuple(cfg.betas),
                                           weight_decay=cfg.weight_decay)
        self.engine = None
        if cfg.deepspeed:
            settings = EngineSettings(path=cfg.deepspeed, micro_batch_size=cfg.micro_batch_size,
                                      grad_accum=micro_batches_per_step(cfg, self.dist.world_size),
                                      max_grad_norm=cfg.max_grad_norm, dtype=cfg.dtype, owner="VLPO run config")
            self.engine = init_engine(settings, policy, self.optimizer)
        elif self.dist.enabled:  # the same starting weights on every rank
            for p in policy.parameters():
                torch.distributed.broadcast(p.data, src=0)
        self.zero3 = is_zero3(self.engine)

    def full_weights(self):
        """A context in which the policy's parameters are whole (ZeRO-3: gathered, read-only,
        entered by every rank; otherwise a no-op)."""
        return full_weights(self.engine, self.policy)

    def check_replicas(self) -> None:
        """Plain data parallel: every rank must hold the same weights and AdamW state (the same start,
        the same summed gradients, the same steps). Compares a checksum per tensor (float64 sum and
        sum of squares of each parameter and of its AdamW moments, and the step count) with every
        other rank's — collective, one ``all_gather`` — and raises on every rank, naming the first
        tensor and rank that differ. A no-op in one process and under DeepSpeed (partitioned state)."""
        if self.engine is not None or not self.dist.enabled:
            return
        names, vals = [], []
        zero = torch.zeros((), dtype=torch.float64)

        def add(name: str, t: torch.Tensor | None) -> None:
            t = t.detach().double() if t is not None else zero
            names.append(name)
            vals.append(torch.stack([t.sum(), (t * t).sum()]).cpu())

        trained = {id(p) for p in self.params}
        for name, p in self.policy.named_parameters():
            add(name, p)
            if id(p) in trained:
                st = self.optimizer.state.get(p, {})
                for k in ("exp_avg", "exp_avg_sq", "step"):
                    v = st.get(k)
                    add(f"{name} (AdamW {k})", v if isinstance(v, torch.Tensor) else
                        (torch.tensor(float(v)) if v is not None else None))
        every = gather_from_ranks(torch.stack(vals), self.dist.world_size)  # [W, tensors, 2]
        for r in range(1, self.dist.world_size):
            bad = (every[r] != every[0]).any(dim=1).nonzero().flatten()
            if len(bad):
                raise RuntimeError(f"the data-parallel replicas diverged: rank {r}'s {names[int(bad[0])]} differs "
                                   f"from rank 0's ({len(bad)} tensors differ); refusing to continue")

    # -- scoring ----------------------------------------------------------------------------------
    def _score(self, model: Any, m: ActorMicroBatch) -> PolicyLogProbs:
        v = self.cfg.vlpo
        return policy_logprobs(model, m.batch, layout=self.layout, token_ids=self.token_ids, temperature=v.temperature,
                               sigma=v.sigma, latent_logp_constant=v.latent_logp_constant, masks=m.masks)

    def _policy_call(self, fn: Callable, *args: Any) -> Any:
        """``fn(*args)`` — through the engine's forward when there is one (DeepSpeed's bookkeeping)."""
        return self.engine(fn, *args) if self.engine is not None else fn(*args)

    def _action_logps(self, model: Any, m: ActorMicroBatch) -> tuple[torch.Tensor, torch.Tensor]:
        s = self._score(model, m)
        return s.text_logp, s.latent_logp

    def _loss(self, m: ActorMicroBatch, n_text: int, n_latent: int) -> tuple[torch.Tensor, dict]:
        s = self._score(self.policy, m)
        out = vlpo_loss(ActionTerms(s.text_logp, m.old_text, m.ref_text, m.masks.text),
                        ActionTerms(s.latent_logp, m.old_latent, m.ref_latent, m.masks.latent),
                        m.advantages, config=self.cfg.vlpo, n_text=n_text, n_latent=n_latent, entropy=s.entropy)
        return out.loss, out.metrics

    def _check_lockstep(self, micros: list[ActorMicroBatch]) -> None:
        """ZeRO-3: the ranks' micro-batches must make the same module calls (module docstring)."""
        cfg = self.policy.config
        vision = [getattr(cfg, k, None) for k in ("image_token_id", "video_token_id", "vision_start_token_id",
                                                  "vision_end_token_id")]
        vision = torch.tensor([int(t) for t in vision if t is not None])
        local = torch.tensor([[int(m.batch.pixel_values is not None),
                               int(bool((m.masks.response & torch.isin(m.batch.input_ids, vision.to(
                                   m.batch.input_ids.device))).any()))] for m in micros], dtype=torch.int64)
        every = gather_from_ranks(local, self.dist.world_size)
        for i in range(len(micros)):
            for c, what in enumerate(("images", "policy-generated vision tokens")):
                col = every[:, i, c]
                if int(col.min()) != int(col.max()):
                    has = [r for r in range(self.dist.world_size) if int(col[r])]
                    raise ValueError(f"micro-batch {i + 1} of this update: DeepSpeed ZeRO-3 needs every rank to run "
                                     f"the same module calls, but only ranks {has} have {what}; use ZeRO-2 or plain "
                                     "data parallel for such batches")

    # -- the update -------------------------------------------------------------------------------
    def update(self, micros: Sequence[ActorMicroBatch]) -> tuple[dict[str, float], list[float]]:
        """Run the update on the training batch ``micros`` (all of it, in order, on every rank:
        each rank scores and trains on its share only). Returns the metrics (averaged over the
        mini-batch steps; ``time/*`` phase times; ``batch/n_text`` / ``batch/n_latent`` global
        counts) and the gradient norm of each mini-batch step (NaN/inf for a skipped step)."""
        share = rank_share(len(micros), self.cfg.mini_batches, self.dist)
        mine = [micros[i] for idx in share for i in idx]
        if self.zero3:
            self._check_lockstep(mine)
        timings = {}
        t0 = time.perf_counter()
        with torch.no_grad():
            for m in mine:
                m.old_text, m.old_latent = self._policy_call(self._action_logps, self.policy, m)
        timings["time/old_logp"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        if self.cfg.vlpo.kl_coef > 0:
            if self.cfg.offload_reference:  # on the device for this pass only (reference_on)
                with reference_on(self.reference, self.cfg.device, OFFLOAD_DEVICE) as ref, torch.no_grad():
                    t_in = time.perf_counter() - t0
                    for m in mine:
                        m.ref_text, m.ref_latent = self._action_logps(ref, m)
                    t1 = time.perf_counter()
                timings["time/ref_offload"] = t_in + time.perf_counter() - t1
            else:
                with torch.no_grad():
                    for m in mine:
                        m.ref_text, m.ref_latent = self._action_logps(self.reference, m)
        timings["time/ref_logp"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        minis = [[micros[i] for i in idx] for idx in share]
        parts_all: list[dict[str, float]] = []
        norms: list[float] = []
        for _ in range(self.cfg.ppo_epochs):
            for mini in minis:
                counts = torch.tensor([sum(int(m.masks.text.sum()) for m in mini),
                                       sum(int(m.masks.latent.sum()) for m in mini)], dtype=torch.int64)
                n_text, n_latent = (int(x) for x in all_reduce_sum(counts, self.dist))
                parts = self._accumulate(mini, n_text, n_latent)
                norms.append(self._step())
                merged = _reduce_metrics(merge_metrics(parts), self.dist)
                parts_all.append({k: float(t) for k, t in merged.items()})
                parts_all[-1]["batch/n_text"] = float(n_text)
                parts_all[-1]["batch/n_latent"] = float(n_latent)
        if self.engine is None:
            self.optimizer.zero_grad(set_to_none=True)
        timings["time/train"] = time.perf_counter() - t0
        out = {}
        for k in parts_all[0]:
            vals = [p[k] for p in parts_all]
            out[k] = max(vals) if k.endswith("_max") else min(vals) if k.endswith("_min") else sum(vals) / len(vals)
        out.update(timings)
        return out, norms

    def update_batch(self, batch: Sequence[tuple[RolloutBatch, torch.Tensor]]) -> tuple[dict[str, float], list[float]]:
        """:meth:`update` on a batch collated on the CPU (:func:`collate_micro_batches`, what the Ray
        actor group ships): made :class:`ActorMicroBatch` es on ``cfg.device`` first (that time is
        counted in ``time/old_logp``, the pass that prepares them)."""
        t0 = time.perf_counter()
        dtype = next(self.policy.parameters()).dtype
        micros = [make_micro_batch(b, adv, layout=self.layout, token_ids=self.token_ids, device=self.cfg.device,
                                   dtype=dtype) for b, adv in batch]
        t_make = time.perf_counter() - t0
        out, norms = self.update(micros)
        out["time/old_logp"] += t_make
        return out, norms

    def _accumulate(self, mini: list[ActorMicroBatch], n_text: int, n_latent: int) -> list[dict]:
        """Forward and backward of this rank's micro-batches of one mini-batch; their metrics."""
        parts = []
        if self.engine is None:
            self.optimizer.zero_grad(set_to_none=True)
            for m in mini:
                loss, metrics = self._loss(m, n_text, n_latent)
                loss.backward()
                parts.append(metrics)
            return parts
        if len(mini) != self.engine.gradient_accumulation_steps():
            raise ValueError(f"this rank's share of a mini-batch is {len(mini)} micro-batches, but the DeepSpeed engine "
                             f"was built for {self.engine.gradient_accumulation_steps()} (from the config's batch size)")
        for m in mini:
            loss, metrics = self.engine(self._loss, m, n_text, n_latent)
            bad = all_reduce_sum(torch.tensor([float(not bool(torch.isfinite(loss.detach())))]), self.dist)
            if float(bad) > 0:  # on every rank at once: a lone rank leaving would hang the others
                raise NonFiniteUpdateError(
                    f"non-finite VLPO loss on {int(bad)} rank(s) (this rank: {float(loss):.4g}); DeepSpeed applies "
                    "updates itself, so the step cannot be skipped: stopping before its backward pass")
            # DeepSpeed divides by its accumulation steps and averages over ranks; the loss is already
            # normalised by the global counts, so undo both
            self.engine.backward(loss * (len(mini) * self.dist.world_size))
            self.engine.step()
            parts.append(metrics)
        return parts

    def _step(self) -> float:
        """The optimiser step at the end of a mini-batch; returns the gradient norm."""
        if self.engine is not None:
            norm = self.engine.get_global_grad_norm()
            return float("nan") if norm is None else float(norm)
        if self.dist.enabled:  # losses are globally normalised: sum the ranks' gradients
            for p in self.params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                torch.distributed.all_reduce(p.grad)
        limit = self.cfg.max_grad_norm if self.cfg.max_grad_norm is not None else float("inf")
        norm = float(torch.nn.utils.clip_grad_norm_(self.params, limit))
        if not math.isfinite(norm):
            self.optimizer.zero_grad(set_to_none=True)
        else:
            self.optimizer.step()
        return norm


# -- one rank's policy replica -------------------------------------------------------------------------
@dataclass
class PolicyReplica:
    """What one rank of the actor trains with: the policy (train mode), its processor, the frozen
    reference (None when ``vlpo.kl_coef == 0``; on the CPU with ``offload_reference``), the span
    layout, the latent token ids and the
    :class:`Actor` (optimiser; DeepSpeed engine when configured)."""

    policy: Any
    processor: Any
    reference: Any
    layout: SpanLayout
    token_ids: LatentTokenIds
    actor: Actor


def load_replica(cfg: VLPORunConfig, policy_dir: str, *, fresh: bool, dist: DistInfo | None = None) -> PolicyReplica:
    """Load the policy from ``policy_dir`` (``cfg.dtype`` on ``cfg.device``; vision tower frozen when
    ``cfg.freeze_vision``), the reference when ``cfg.vlpo.kl_coef > 0`` (a copy of the policy when
    ``fresh``, i.e. ``policy_dir`` is the starting model ``cfg.model``; otherwise loaded from
    ``cfg.model``) and build the :class:`Actor` — collective under ``dist`` (every rank calls this
    at the same point: plain data parallel broadcasts rank 0's weights, DeepSpeed builds its engine).
    The optimiser starts empty: resuming restores it afterwards (:mod:`monet.rl.checkpoint`)."""
    import copy

    import monet

    policy, processor = monet.load_model(policy_dir, dtype=cfg.dtype, device=cfg.device)
    policy.train()
    token_ids = policy.monet_config.token_ids
    layout = SpanLayout.of(cfg.latent_size, cfg.layout, default=policy.monet_config.span_layout)
    if cfg.freeze_vision:
        policy.model.visual.requires_grad_(False)
    reference = None
    if cfg.vlpo.kl_coef > 0:
        ref_device = OFFLOAD_DEVICE if cfg.offload_reference else cfg.device
        reference = copy.deepcopy(policy).to(ref_device) if fresh else monet.load_model(
            cfg.model, dtype=cfg.dtype, device=ref_device)[0]
        reference.eval().requires_grad_(False)
    actor = Actor(policy, cfg, layout=layout, token_ids=token_ids, reference=reference, dist=dist)
    return PolicyReplica(policy, processor, reference, layout, token_ids, actor)


# -- a training batch on disk (safetensors + JSON; nothing is unpickled) -----------------------------
def save_actor_batch(folder: str | Path, micros: Sequence[ActorMicroBatch]) -> Path:
    """Write the micro-batches' rollouts and advantages to ``folder`` (``actor_batch.json`` +
    ``actor_batch.safetensors``) for :func:`load_actor_batch` / the entry point."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors, index = {}, []
    for i, m in enumerate(micros):
        b = m.batch
        vals = {"input_ids": b.input_ids, "attention_mask": b.attention_mask, "response_start": b.response_start,
                "forced_first_start": b.forced_first_start if b.forced_first_start is not None
                else torch.zeros(b.input_ids.shape[0], dtype=torch.bool), "advantages": m.advantages.float(),
                "latents": torch.cat([z.float() for z in b.latents]) if len(b.latents) else torch.zeros(0, 0)}
        if b.pixel_values is not None:
            vals["pixel_values"], vals["image_grid_thw"] = b.pixel_values, b.image_grid_thw
        tensors.update({f"m{i}.{k}": v.detach().cpu().contiguous() for k, v in vals.items()})
        index.append({"rows": int(b.input_ids.shape[0]), "latent_counts": [int(z.shape[0]) for z in b.latents],
                      "images": b.pixel_values is not None})
    save_file(tensors, str(folder / BATCH_TENSORS))
    (folder / BATCH_JSON).write_text(json.dumps({"format": BATCH_FORMAT, "version": 1, "micro_batches": index}))
    return folder


def load_actor_batch(folder: str | Path) -> list[tuple[RolloutBatch, torch.Tensor]]:
    """``(RolloutBatch, advantages [B])`` per micro-batch from ``folder`` (see :func:`save_actor_batch`);
    a missing file or field is an error naming it."""
    from safetensors.torch import load_file

    folder = Path(folder)
    meta_path, tensor_path = folder / BATCH_JSON, folder / BATCH_TENSORS
    for p in (meta_path, tensor_path):
        if not p.is_file():
            raise FileNotFoundError(f"{p} not found: {folder} is not an actor batch (written by save_actor_batch)")
    try:
        meta = json.loads(meta_path.read_text())
    except ValueError as e:
        raise ValueError(f"{meta_path}: invalid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != BATCH_FORMAT:
        raise ValueError(f"{meta_path}: not a {BATCH_FORMAT} file")
    t = load_file(str(tensor_path))
    out = []
    for i, info in enumerate(meta["micro_batches"]):
        names = [*_BATCH_FIELDS, "latents"] + (["pixel_values", "image_grid_thw"] if info["images"] else [])
        missing = [n for n in names if f"m{i}.{n}" not in t]
        if missing:
            raise ValueError(f"{tensor_path}: micro-batch {i} lacks {missing}")
        get = {n: t[f"m{i}.{n}"] for n in names}
        rows, counts = info["rows"], info["latent_counts"]
        if get["input_ids"].shape[0] != rows or len(counts) != rows or get["advantages"].shape != (rows,):
            raise ValueError(f"{tensor_path}: micro-batch {i}: input_ids / advantages / latent_counts disagree on the "
                             f"number of rollouts ({rows})")
        if get["latents"].shape[0] != sum(counts):
            raise ValueError(f"{tensor_path}: micro-batch {i}: {get['latents'].shape[0]} latents stored, "
                             f"latent_counts say {sum(counts)}")
        latents = list(torch.split(get["latents"], counts))  # [n_b, D] per rollout (n_b may be 0)
        batch = RolloutBatch(get["input_ids"], get["attention_mask"], get["response_start"], latents,
                             get.get("pixel_values"), get.get("image_grid_thw"), get["forced_first_start"])
        out.append((batch, get["advantages"]))
    return out


# -- entry point ---------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    """``python -m monet.rl.actor`` (under torchrun for data parallel): module docstring."""
    from monet.train.distributed import init_distributed, shutdown_distributed

    ap = argparse.ArgumentParser(prog="python -m monet.rl.actor",
                                 description="Run VLPO actor updates on a saved training batch (data parallel "
                                             "under torchrun; DeepSpeed when the config names a JSON).")
    ap.add_argument("--config", required=True, help="VLPO run config (YAML); model, optimiser, vlpo and deepspeed")
    ap.add_argument("--batch", required=True, help="folder written by monet.rl.actor.save_actor_batch")
    ap.add_argument("--out", required=True, help="folder for the updated policy and metrics.json (rank 0)")
    ap.add_argument("--updates", type=int, default=1, help="updates on the same batch (default 1)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    args = ap.parse_args(argv)
    if args.updates < 1:
        ap.error(f"--updates must be >= 1, got {args.updates}")
    if Path(args.out).resolve() == Path(args.batch).resolve():
        # the policy folder would also hold actor_batch.safetensors, which vLLM loads as weights
        ap.error(f"--out {args.out} is the --batch folder; write the policy to another folder (a model directory "
                 f"must not hold {BATCH_TENSORS})")
    import yaml

    overrides = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            ap.error(f"--set expects KEY=VALUE, got {item!r}")
        overrides[key] = yaml.safe_load(value)
    cfg = VLPORunConfig.from_yaml(args.config, overrides)
    device = torch.device(cfg.device)
    dist = init_distributed(device, group_of_one=bool(cfg.deepspeed))  # DeepSpeed needs a group even alone
    try:
        batch = load_actor_batch(args.batch)
        rep = load_replica(cfg, cfg.model, fresh=True, dist=dist)
        policy, processor, actor = rep.policy, rep.processor, rep.actor
        dtype = next(policy.parameters()).dtype
        micros = [make_micro_batch(b, adv, layout=rep.layout, token_ids=rep.token_ids, device=device, dtype=dtype)
                  for b, adv in batch]
        rows = []
        for _ in range(args.updates):
            metrics, norms = actor.update(micros)
            rows.append({**metrics, "grad_norms": norms})
        with actor.full_weights():
            if dist.is_main:
                out = Path(args.out)
                out.mkdir(parents=True, exist_ok=True)
                policy.save_pretrained(out)
                processor.save_pretrained(out)
                (out / "metrics.json").write_text(json.dumps({"world_size": dist.world_size, "updates": rows},
                                                             indent=1))
        if actor.engine is not None and hasattr(actor.engine, "destroy"):
            actor.engine.destroy()
    finally:
        shutdown_distributed()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
