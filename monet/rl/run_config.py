"""Settings of a VLPO run (``monet vlpo``): one dataclass, YAML + ``--set key=value`` overrides.

The algorithm's hyper-parameters are the nested :class:`~monet.rl.config.VLPOConfig` (YAML section
``vlpo:``; override one with ``--set vlpo.sigma=10``). Everything else — model, data, rollout
engine, optimiser, schedule, checkpoints — is a field of :class:`VLPORunConfig`. Paths in the YAML
are relative to the YAML file.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from monet.rl.config import VLPOConfig

ENGINES = ("vllm", "hf")


@dataclass
class VLPORunConfig:
    """One VLPO run.

    Data and rollouts
      ``model``: the policy's starting checkpoint (an SFT stage-3 model); ``data``: RL parquet files
      (:mod:`monet.rl.data`); ``prompts_per_rollout``: prompts per rollout round (each sampled
      ``vlpo.n`` times); ``max_rounds_per_step``: rollout rounds tried before a step gives up
      waiting for ``vlpo.groups_per_batch`` kept groups (the step is then skipped, counted);
      ``difficulty_filter``: False keeps every group (no online difficulty sampling);
      ``top_p``, ``max_prompt_tokens`` (longer prompts are skipped, counted),
      ``max_response_tokens``; ``latent_size`` / ``layout`` (default: the model's);
      ``force_latent``: prompts end with START (every answer opens with a latent span);
      ``logit_bias``: ``{token: bias}`` added at sampling (token text or id; a diagnostic knob).
    Engine
      ``engine``: ``"vllm"`` (``LatentLLM``; weights synced in memory after each step) or ``"hf"``
      (``monet.generate`` on the trainer's model); ``engine_kwargs``: extra ``vllm.LLM`` arguments
      (``tensor_parallel_size``, ``gpu_memory_utilization``, ``max_model_len``...); ``probe_every``:
      check engine/trainer agreement after every N-th sync (0 = never), on every rollout engine.
      ``rollout_engines``: data-parallel rollout engines (Ray controller only; the single-process
      trainer has one), each a Ray actor with its own engine on ``tensor_parallel_size`` GPUs (on
      CPU: ``cpus_per_actor``). Each rollout round's prompts are cut into that many contiguous
      shards decoded at the same time and put back in prompt order; seeded rollouts are the same
      whatever the number of engines (:mod:`monet.rl.rollout`). At most ``prompts_per_rollout``
      (an engine without a shard would hold its devices for nothing).
    Optimisation
      ``steps`` optimiser steps in all; each training batch is split into ``mini_batches``
      optimiser steps, ``ppo_epochs`` passes over it; ``micro_batch_size`` rollouts per forward;
      AdamW (``lr``, ``weight_decay``, ``betas``), ``max_grad_norm`` clipping; a step whose gradient
      is not finite is skipped (weights and optimiser untouched, counted).
      ``train_workers``: processes of the training actor group (:mod:`monet.rl.group`): 1 trains in
      the trainer process; N > 1 (Ray controller only) runs the update data parallel over N Ray
      actors, one device each, that form one ``torch.distributed`` group (gloo on CPU, nccl on CUDA).
      ``deepspeed``: a DeepSpeed ZeRO JSON (``scripts/deepspeed/zero2.json`` / ``zero3.json``) for the
      actor update (:mod:`monet.rl.actor`): in the Ray controller's actor group (any
      ``train_workers``) or under ``torchrun ... -m monet.rl.actor``; the single-process trainer
      (``--controller local``) refuses it.
      ``offload_reference``: keep the frozen reference (``vlpo.kl_coef > 0``) on the CPU and move it
      to ``device`` only for the reference log-probability pass of each update, then back: frees
      the reference's weights from the accelerator between those passes, at the cost of two
      host<->device copies of them per update (``time/ref_offload``). The log-probabilities are the
      same as without offloading. A no-op on ``device: cpu``.
    Bookkeeping
      ``output_dir``, ``save_every`` (steps; None: only at the end), ``keep_last``, ``log_every``.
      ``tensorboard``: also write every step's numeric metrics to TensorBoard under
      ``output_dir/tensorboard`` (needs ``pip install tensorboard``); ``wandb_project``: also log
      them to that Weights & Biases project (needs ``pip install wandb``) — the SFT settings of the
      same names (:class:`monet.train.metrics.ScalarSinks`).
    """

    model: str
    data: list[str]
    output_dir: str = "runs/vlpo"
    vlpo: VLPOConfig = field(default_factory=VLPOConfig)
    engine: str = "vllm"
    engine_kwargs: dict[str, Any] = field(default_factory=dict)
    probe_every: int = 0
    rollout_engines: int = 1
    steps: int = 100
    prompts_per_rollout: int = 64
    max_rounds_per_step: int = 8
    difficulty_filter: bool = True
    top_p: float = 0.99
    max_prompt_tokens: int = 4096
    max_response_tokens: int = 4096
    latent_size: int | None = None
    layout: str | None = None
    force_latent: bool = False
    logit_bias: dict[str, float] = field(default_factory=dict)
    mini_batches: int = 1
    ppo_epochs: int = 1
    micro_batch_size: int = 4
    lr: float = 1e-6
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    max_grad_norm: float | None = 1.0
    dtype: str = "bfloat16"
    device: str = "cpu"
    freeze_vision: bool = True
    seed: int = 0
    data_limit: int | None = None
    judge: dict[str, Any] | None = None
    save_every: int | None = None
    keep_last: int | None = 2
    log_every: int = 1
    deepspeed: str | None = None
    train_workers: int = 1
    offload_reference: bool = False
    tensorboard: bool = False
    wandb_project: str | None = None  # log to Weights & Biases (needs `pip install wandb`)

    def __post_init__(self) -> None:
        if isinstance(self.vlpo, Mapping):
            self.vlpo = VLPOConfig.from_dict(self.vlpo, where="vlpo")
        if not isinstance(self.vlpo, VLPOConfig):
            raise TypeError(f"vlpo must be a mapping of VLPOConfig fields, got {type(self.vlpo).__name__}")
        if isinstance(self.data, (str, os.PathLike)):
            self.data = [str(self.data)]
        if not self.data:
            raise ValueError("data: give at least one RL parquet file")
        if self.engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, got {self.engine!r}")
        for name in ("steps", "prompts_per_rollout", "max_rounds_per_step", "mini_batches", "ppo_epochs",
                     "micro_batch_size", "max_prompt_tokens", "max_response_tokens", "log_every", "train_workers",
                     "rollout_engines"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        for name in ("offload_reference", "tensorboard"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.wandb_project is not None and not (isinstance(self.wandb_project, str) and self.wandb_project):
            raise ValueError(f"wandb_project must be a W&B project name or null, got {self.wandb_project!r}")
        if self.rollout_engines > self.prompts_per_rollout:
            raise ValueError(f"rollout_engines={self.rollout_engines} is more than prompts_per_rollout="
                             f"{self.prompts_per_rollout}: each rollout engine decodes a share of a round's prompts, "
                             "so some engines would never get one; lower rollout_engines or raise prompts_per_rollout")
        for name in ("probe_every",):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be an int >= 0, got {v!r}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0 or null, got {self.max_grad_norm!r}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas!r}")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
        if self.save_every is not None and self.save_every < 1:
            raise ValueError(f"save_every must be >= 1 or null, got {self.save_every!r}")
        if not isinstance(self.logit_bias, Mapping):
            raise TypeError(f"logit_bias must be a mapping {{token: bias}}, got {type(self.logit_bias).__name__}")
        if self.deepspeed is not None:
            if not isinstance(self.deepspeed, (str, os.PathLike)) or not str(self.deepspeed):
                raise ValueError(f"deepspeed must be the path of a DeepSpeed JSON config or null, got {self.deepspeed!r}")
            self.deepspeed = str(self.deepspeed)
            if self.dtype == "float16":
                raise ValueError("deepspeed with dtype float16 needs DeepSpeed's loss scaling, which the actor does not "
                                 "set up; use bfloat16 or float32")
        if self.vlpo.groups_per_batch < self.mini_batches:
            raise ValueError(f"vlpo.groups_per_batch ({self.vlpo.groups_per_batch}) must be >= mini_batches "
                             f"({self.mini_batches})")
        if self.train_workers > 1:
            from monet.rl.actor import split_mini_batches

            n_micro = math.ceil(self.vlpo.groups_per_batch * self.vlpo.n / self.micro_batch_size)
            sizes = [len(m) for m in split_mini_batches(n_micro, self.mini_batches)]
            if any(k % self.train_workers for k in sizes):
                raise ValueError(
                    f"train_workers={self.train_workers}: a training batch of {self.vlpo.groups_per_batch} x "
                    f"{self.vlpo.n} rollouts in micro-batches of {self.micro_batch_size} is {n_micro} micro-batches, "
                    f"split into mini-batches of {sizes}; every mini-batch must hold a multiple of train_workers "
                    "micro-batches (each worker takes an equal share); change micro_batch_size, mini_batches or "
                    "vlpo.groups_per_batch")

    # -- YAML ------------------------------------------------------------------------------------
    @classmethod
    def from_yaml(cls, path: str | os.PathLike, overrides: Mapping[str, Any] | None = None) -> "VLPORunConfig":
        """Load ``path`` and apply ``overrides`` (``{"lr": 2e-6, "vlpo.sigma": 5}``)."""
        from monet.train.config import read_yaml_mapping

        path = Path(path)
        raw = read_yaml_mapping(path)
        return cls.from_dict(raw, overrides, base=path.parent, where=str(path))

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], overrides: Mapping[str, Any] | None = None, *,
                  base: Path | None = None, where: str = "VLPO run config") -> "VLPORunConfig":
        raw = dict(raw)
        raw["vlpo"] = dict(raw.get("vlpo") or {})
        for key, value in (overrides or {}).items():
            if key.startswith("vlpo."):
                raw["vlpo"][key[len("vlpo."):]] = value
            else:
                raw[key] = value
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"{where}: unknown settings {unknown} (known: {sorted(known)})")
        if base is not None:
            for key in ("model", "output_dir", "deepspeed"):
                if raw.get(key):
                    raw[key] = _relative_to(base, raw[key])
            if raw.get("data"):
                data = [raw["data"]] if isinstance(raw["data"], str) else list(raw["data"])
                raw["data"] = [_relative_to(base, p) for p in data]
        for key in ("model", "data"):
            if key not in raw:
                raise ValueError(f"{where}: missing required setting {key!r}")
        try:
            return cls(**raw)
        except TypeError as e:
            raise TypeError(f"{where}: {e}") from None

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["vlpo"] = self.vlpo.to_dict()
        return d

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _relative_to(base: Path, p: str) -> str:
    q = Path(os.path.expanduser(str(p)))
    return str(q if q.is_absolute() else (base / q))
