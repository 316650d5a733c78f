"""VLPO checkpoints: atomic, resumable exactly, never unpickled; a run lock; policy export
(:func:`export_policy`, a VLPO-only front of :mod:`monet.export`).

Layout of ``OUTPUT/checkpoint-STEP/``: the policy (``save_pretrained``: safetensors weights,
``monet_config.json`` with the run's ``latent_size`` / ``layout``, not the starting model's) and processor — a complete model directory that ``monet.load_model`` and
``monet.vllm.LatentLLM`` open as is — plus the trainer state as ``vlpo_state.json`` (JSON: step,
data cursor, sampler, RNG, optimiser hyper-parameters...) and ``vlpo_state.tensors`` (its
tensors, in the safetensors format: optimiser moments, RNG state, latents of buffered rollouts),
and ``vlpo_config.yaml``. ``OUTPUT/latest`` names the newest complete checkpoint. The tensor file
does not end in ``.safetensors`` because vLLM loads every ``*.safetensors`` file of a model
directory as weights (a checkpoint of an earlier monet, with ``vlpo_state.safetensors``, still
resumes; only its engine start fails).

Optimiser state by actor kind (:func:`actor_optimizer_state` / :func:`restore_actor_optimizer`):
the plain actor (one process or data parallel, where every rank holds the same AdamW state) stores
rank 0's AdamW state in ``vlpo_state.tensors``, and every rank loads it on resume. A DeepSpeed
actor partitions the optimiser state (ZeRO-2/3) and, under ZeRO-3, the fp32 master weights across
the ranks: every rank writes its own shard with ``engine.save_checkpoint`` into the checkpoint's
staging folder (``deepspeed/state/``, :func:`save_engine_shards`) before rank 0 completes and
renames the folder, so the shards are part of the same atomic checkpoint; resume needs the same
number of ranks and restores each shard exactly. DeepSpeed unpickles its own files, so they are
first checked with torch's weights-only unpickler
(:func:`monet.train.deepspeed_engine.check_deepspeed_checkpoint`).

Crash safety, retention and the refusal of non-finite weights are the SFT trainer's
(:func:`monet.train.checkpoint.commit_checkpoint`): a checkpoint is written into a temporary folder,
renamed into place, and ``latest`` is replaced atomically afterwards, so a crash never leaves a
checkpoint that resume would pick half-written. Loading runs ``json.loads`` and safetensors only.

:class:`RunLock` keeps two processes from writing one output directory: an advisory ``flock``
that the kernel drops when its holder dies in any way, so a lock left by a killed run is never
stale.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from monet.layout import SpanLayout


LATEST = "latest"
STATE_JSON = "vlpo_state.json"
STATE_TENSORS = "vlpo_state.tensors"  # safetensors format; not *.safetensors (module docstring)
LEGACY_STATE_TENSORS = "vlpo_state.safetensors"
CONFIG_FILE = "vlpo_config.yaml"
STATE_FORMAT = "monet-vlpo-state"
STATE_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete or not a VLPO checkpoint."""


class RunBusy(RuntimeError):
    """Another live process holds the output directory's run lock."""


class RunLock:
    """Exclusive ownership of an output directory (``OUTPUT/.vlpo.lock``; non-blocking), the same
    ``flock`` as SFT runs (:class:`monet.train.dir_lock.DirectoryLock`)."""

    def __init__(self, output_dir: str | os.PathLike):
        from monet.train.dir_lock import DirectoryBusy, DirectoryLock

        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        try:
            self._lock = DirectoryLock(out, ".vlpo.lock")
        except DirectoryBusy as e:
            raise RunBusy(f"{out} is used by another VLPO run ({e.holder or 'unknown holder'}); "
                          "wait for it or choose another output_dir") from None
        self.path = self._lock.path

    def release(self) -> None:
        self._lock.release()

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


# -- state pieces --------------------------------------------------------------------------------
def rng_state(tensors: dict[str, torch.Tensor]) -> dict:
    """Python, numpy and torch generator states; tensors go to ``tensors``, the rest is JSON."""
    py = random.getstate()
    np_state = np.random.get_state()
    tensors["rng.torch"] = torch.get_rng_state()
    tensors["rng.numpy"] = torch.from_numpy(np.asarray(np_state[1], dtype=np.int64))
    return {"python": [py[0], list(py[1]), py[2]], "numpy": [np_state[0], int(np_state[2]), int(np_state[3]),
                                                             float(np_state[4])]}


def set_rng_state(state: dict, tensors: dict[str, torch.Tensor]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    name, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, tensors["rng.numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["rng.torch"])


def optimizer_state(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> dict:
    """``optimizer.state_dict()`` split into JSON (param groups, scalar state) and tensors."""
    sd = optimizer.state_dict()
    state = {}
    for pid, entry in sd["state"].items():
        js = {}
        for k, v in entry.items():
            if isinstance(v, torch.Tensor):
                tensors[f"opt.{pid}.{k}"] = v.detach().cpu().contiguous()
                js[k] = {"$tensor": f"opt.{pid}.{k}"}
            else:
                js[k] = v
        state[str(pid)] = js
    return {"state": state, "param_groups": sd["param_groups"]}


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict, tensors: dict[str, torch.Tensor]) -> None:
    # JSON has no tuples: hyper-parameters such as ``betas`` come back as lists
    groups = [{k: (tuple(v) if isinstance(v, list) and k != "params" else v) for k, v in g.items()}
              for g in state["param_groups"]]
    sd = {"state": {}, "param_groups": groups}
    for pid, entry in state["state"].items():
        sd["state"][int(pid)] = {k: (tensors[v["$tensor"]] if isinstance(v, dict) and "$tensor" in v else v)
                                 for k, v in entry.items()}
    optimizer.load_state_dict(sd)


# -- folders ---------------------------------------------------------------------------------------
def save_checkpoint(output_dir: str | os.PathLike, step: int, *, model: Any, processor: Any | None, state: dict,
                    tensors: dict[str, torch.Tensor], config_yaml: str | None = None,
                    keep_last: int | None = None, staged: Path | None = None,
                    span_layout: SpanLayout | None = None) -> Path:
    """Write ``checkpoint-STEP`` atomically and point ``latest`` at it; returns its path
    (:func:`monet.train.checkpoint.commit_checkpoint`: the SFT trainer's rules for atomicity,
    retention, full disks and non-finite weights, which are refused with
    :class:`~monet.train.checkpoint.NonFiniteWeightsError` naming the parameter). ``staged``: the
    staging folder that already holds the DeepSpeed shards (:func:`save_engine_shards`).
    ``span_layout``: the run's rollout layout (``latent_size`` / ``layout`` of the run, each
    defaulting to the starting model's, as :func:`monet.rl.actor.load_replica` builds it); the
    checkpoint's ``monet_config.json`` records it, so the folder loads (``monet.load_model``,
    ``LatentLLM``, resume) with the run's settings, not the starting model's."""
    from safetensors.torch import save_file

    from monet.train.checkpoint import commit_checkpoint

    json.dumps(state, allow_nan=False)  # fail before writing anything

    def write_state(folder: Path) -> None:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(folder / STATE_TENSORS))
        (folder / STATE_JSON).write_text(json.dumps({"format": STATE_FORMAT, "version": STATE_VERSION, "step": step,
                                                     "state": state}, allow_nan=False))

    return commit_checkpoint(output_dir, step, model=model, processor=processor, write_state=write_state,
                             config_file=CONFIG_FILE, config_yaml=config_yaml, keep_last=keep_last, staged=staged,
                             span_layout=span_layout)


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The checkpoint ``latest`` names; None when there is none. A dangling pointer is an error."""
    from monet.train.checkpoint import latest_checkpoint as latest

    try:
        return latest(output_dir, state_file=STATE_JSON)
    except FileNotFoundError as e:
        raise CheckpointError(f"{e} (not a complete VLPO checkpoint)") from None


def load_state(checkpoint: str | os.PathLike) -> tuple[int, dict, dict[str, torch.Tensor]]:
    """``(step, state, tensors)`` of a checkpoint (JSON + safetensors only)."""
    from safetensors.torch import load_file

    ckpt = Path(checkpoint)
    path = ckpt / STATE_JSON
    if not path.is_file():
        raise CheckpointError(f"{ckpt} is not a VLPO checkpoint (no {STATE_JSON})")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != STATE_FORMAT:
        raise CheckpointError(f"{path} is not a VLPO trainer state")
    if int(doc.get("version", 0)) > STATE_VERSION:
        raise CheckpointError(f"{path} has state version {doc['version']}; this monet reads up to {STATE_VERSION}")
    tpath = ckpt / STATE_TENSORS
    if not tpath.is_file() and (ckpt / LEGACY_STATE_TENSORS).is_file():
        tpath = ckpt / LEGACY_STATE_TENSORS
    try:
        tensors = load_file(str(tpath))
    except Exception as e:
        raise CheckpointError(f"{tpath} is unreadable ({type(e).__name__}: {e})") from None
    return int(doc["step"]), doc["state"], tensors


# -- the actor's optimiser state (plain or DeepSpeed) --------------------------------------------------
ENGINE_DIR = "deepspeed"
ENGINE_TAG = "state"


def actor_optimizer_state(actor: Any, world_size: int, tensors: dict[str, torch.Tensor]) -> dict:
    """The JSON part of the actor's optimiser state for ``vlpo_state.json`` (module docstring): the
    plain AdamW state (tensors into ``tensors``), or, with DeepSpeed, a record that the shards are in
    ``deepspeed/`` and how many ranks wrote them."""
    if actor.engine is None:
        return {"optimizer": optimizer_state(actor.optimizer, tensors), "deepspeed": None}
    return {"optimizer": None, "deepspeed": {"world_size": int(world_size), "zero_stage":
                                             int(actor.engine.zero_optimization_stage())}}


def save_engine_shards(engine: Any, output_dir: str | os.PathLike, step: int) -> Path:
    """Every rank of a DeepSpeed actor (collective): write this rank's shard of the optimiser (and
    ZeRO-3 master weights) into the staging folder of ``checkpoint-STEP``; returns the folder, which
    rank 0 then completes and renames (:func:`save_checkpoint` with ``staged``). Ends with a barrier,
    so every shard is on disk before rank 0 commits."""
    from monet.train.checkpoint import staging_dir

    staged = staging_dir(output_dir, step)
    engine.save_checkpoint(str(staged / ENGINE_DIR), tag=ENGINE_TAG)
    torch.distributed.barrier()
    return staged


def restore_actor_optimizer(actor: Any, checkpoint: str | os.PathLike, state: dict, tensors: dict[str, torch.Tensor],
                            world_size: int) -> None:
    """Restore the actor's optimiser state from ``checkpoint`` (every rank; collective with DeepSpeed).
    A checkpoint written by the other kind of actor, or by a DeepSpeed group of another size, is
    refused with a :class:`CheckpointError` that says so."""
    ckpt = Path(checkpoint)
    ds = state.get("deepspeed")
    if actor.engine is None:
        if state.get("optimizer") is None:
            raise CheckpointError(f"{ckpt} was written by a DeepSpeed actor group (its optimiser state is in "
                                  f"{ENGINE_DIR}/); resume with the same deepspeed setting, or start a new run from "
                                  f"its weights with --set model={ckpt}")
        load_optimizer_state(actor.optimizer, state["optimizer"], tensors)
        return
    if not ds:
        raise CheckpointError(f"{ckpt} holds a plain AdamW state, which a DeepSpeed engine cannot load; resume "
                              f"without deepspeed, or start a new run from its weights with --set model={ckpt}")
    if int(ds["world_size"]) != world_size:
        raise CheckpointError(f"{ckpt} holds DeepSpeed optimiser shards of {ds['world_size']} ranks, but this group "
                              f"has {world_size} (train_workers); resume with train_workers={ds['world_size']}")
    from monet.train.deepspeed_engine import check_deepspeed_checkpoint

    check_deepspeed_checkpoint(ckpt / ENGINE_DIR / ENGINE_TAG)  # DeepSpeed unpickles its files in full
    actor.engine.load_checkpoint(str(ckpt / ENGINE_DIR), tag=ENGINE_TAG)


def export_policy(checkpoint: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Export the policy of the VLPO checkpoint folder ``checkpoint`` to ``out_dir`` (``monet
    vlpo --export``): :func:`monet.export.export_checkpoint`, restricted to VLPO checkpoints (weights,
    configs, processor files and ``monet_config.json`` with the run's span layout; no trainer state;
    atomic; non-finite weights and a non-empty ``out_dir`` refused). Returns ``out_dir``."""
    from monet.export import export_checkpoint

    src = Path(checkpoint)
    if not (src / STATE_JSON).is_file():
        raise CheckpointError(f"{src} is not a VLPO checkpoint (no {STATE_JSON}); `monet export` also takes SFT "
                              "checkpoints and run folders")
    return export_checkpoint(src, out_dir).out
