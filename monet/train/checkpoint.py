"""Atomic training checkpoints with resume; nothing in a checkpoint is ever unpickled.

Layout: ``OUTPUT/checkpoint-STEP/`` holding the model (``save_pretrained``: safetensors weights and
``monet_config.json``, which states the span layout the run trained in: :func:`commit_checkpoint`), the processor, the trainer state (optimizer, scheduler, RNG states, data
position, step) as ``trainer_state.json`` + ``trainer_state.tensors``, and ``sft_config.yaml``;
``OUTPUT/latest`` names the newest complete checkpoint. The folder is a complete model directory
that ``monet.load_model``, ``monet.vllm.LatentLLM`` and ``monet serve`` open as is: the tensor file
is in the safetensors format but does not end in ``.safetensors``, because vLLM loads every
``*.safetensors`` file of a model directory without a shard index as weights (and fails on the
state's tensor names). Checkpoints of earlier monet versions hold ``trainer_state.safetensors``;
they still resume (the new name is read first, the old one when it is absent), and renaming that
file to ``trainer_state.tensors`` makes them servable too.

Trainer-state format: the state is a tree of dicts, lists, tuples, numbers, strings, tensors and
numpy arrays. Tensors go to the safetensors file under generated names; everything else is JSON,
with tagged objects for what JSON cannot say (``{"$tensor": name}``, ``{"$tuple": [...]}``,
``{"$ndarray": [...], "dtype": ...}``, ``{"$items": [[key, value], ...]}`` for dicts with
non-string keys, ``{"$float": "nan"}``). Reading it runs ``json.loads`` and safetensors only, so a
checkpoint from an untrusted source cannot execute code; a pickled ``trainer_state.pt`` (the
format of earlier versions) is refused, never loaded.

Crash safety: each checkpoint is written into a temporary folder and renamed into place, and
``latest`` is replaced atomically after that, so a crash never leaves a half-written checkpoint
that resume would pick; :func:`remove_stale_temporaries` deletes the folders a killed writer left.
Retention (``keep_last``) never deletes the checkpoint just written.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from monet.atomic import atomic_write_text, disk_full_error, is_disk_full
from monet.layout import SpanLayout

LATEST = "latest"
STATE_FILE = "trainer_state.json"
STATE_TENSORS = "trainer_state.tensors"  # safetensors format; not *.safetensors (module docstring)
LEGACY_STATE_TENSORS = "trainer_state.safetensors"  # the name before; still read on resume
LEGACY_STATE_FILE = "trainer_state.pt"
CONFIG_FILE = "sft_config.yaml"
STATE_FORMAT = "monet-trainer-state"
STATE_VERSION = 1
_CKPT_RE = re.compile(r"^checkpoint-(\d+)$")
_NDARRAY_DTYPES = ("uint8", "uint32", "int32", "int64", "float32", "float64", "bool")


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete, unsafe to load, or cannot be written."""


class NonFiniteWeightsError(RuntimeError):
    """The model holds NaN/inf weights; such a checkpoint is never written."""


# -- RNG ---------------------------------------------------------------------------------------
def rng_state() -> dict:
    """Python, numpy, torch (and CUDA) generator states, as storable containers."""
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# -- trainer-state encoding -------------------------------------------------------------------
def _encode(obj: Any, tensors: dict[str, torch.Tensor], where: str) -> Any:
    if isinstance(obj, torch.Tensor):
        name = f"t{len(tensors)}"
        tensors[name] = obj.detach().cpu().contiguous()
        return {"$tensor": name}
    if isinstance(obj, np.ndarray):
        if obj.dtype.name not in _NDARRAY_DTYPES:
            raise TypeError(f"trainer state {where}: numpy dtype {obj.dtype} is not storable")
        return {"$ndarray": obj.tolist(), "dtype": obj.dtype.name}
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        x = float(obj)
        return x if np.isfinite(x) else {"$float": repr(x)}
    if obj is None or isinstance(obj, str):
        return obj
    if isinstance(obj, tuple):
        return {"$tuple": [_encode(x, tensors, f"{where}[{i}]") for i, x in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(x, tensors, f"{where}[{i}]") for i, x in enumerate(obj)]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("$") for k in obj):
            return {k: _encode(v, tensors, f"{where}.{k}") for k, v in obj.items()}
        return {"$items": [[_encode(k, tensors, f"{where}<key>"), _encode(v, tensors, f"{where}[{k!r}]")]
                           for k, v in obj.items()]}
    raise TypeError(f"trainer state {where}: cannot store a {type(obj).__name__} (only tensors, numpy arrays, "
                    "numbers, strings, None and lists/tuples/dicts of them)")


def _decode(obj: Any, tensors: dict[str, torch.Tensor], where: str) -> Any:
    if isinstance(obj, list):
        return [_decode(x, tensors, where) for x in obj]
    if not isinstance(obj, dict):
        return obj
    if "$tensor" in obj:
        name = obj["$tensor"]
        if name not in tensors:
            raise CheckpointError(f"{where}: names tensor {name!r}, which the tensor file does not hold")
        return tensors[name]
    if "$tuple" in obj:
        return tuple(_decode(x, tensors, where) for x in obj["$tuple"])
    if "$ndarray" in obj:
        if obj.get("dtype") not in _NDARRAY_DTYPES:
            raise CheckpointError(f"{where}: numpy dtype {obj.get('dtype')!r} is not allowed")
        return np.asarray(obj["$ndarray"], dtype=obj["dtype"])
    if "$float" in obj:
        if obj["$float"] not in ("nan", "inf", "-inf"):
            raise CheckpointError(f"{where}: bad float {obj['$float']!r}")
        return float(obj["$float"])
    if "$items" in obj:
        return {_decode(k, tensors, where): _decode(v, tensors, where) for k, v in obj["$items"]}
    return {k: _decode(v, tensors, where) for k, v in obj.items()}


def write_trainer_state(folder: str | os.PathLike, state: dict) -> None:
    """Write ``state`` as ``trainer_state.json`` + ``trainer_state.tensors`` (safetensors format) into
    ``folder``."""
    from safetensors.torch import save_file

    folder = Path(folder)
    tensors: dict[str, torch.Tensor] = {}
    tree = _encode(state, tensors, "state")
    save_file(tensors, str(folder / STATE_TENSORS))
    # the JSON is written last: its presence marks a complete state
    (folder / STATE_FILE).write_text(json.dumps({"format": STATE_FORMAT, "version": STATE_VERSION, "state": tree}))


def load_trainer_state(checkpoint: str | os.PathLike) -> dict:
    """Read the trainer state of ``checkpoint`` (JSON + safetensors; no unpickling, ever). The tensors
    come from ``trainer_state.tensors``, or from ``trainer_state.safetensors`` (earlier versions)
    when the checkpoint has no ``trainer_state.tensors``."""
    ckpt = Path(checkpoint)
    path = ckpt / STATE_FILE
    if not path.is_file():
        if (ckpt / LEGACY_STATE_FILE).exists():
            raise CheckpointError(
                f"{ckpt} holds {LEGACY_STATE_FILE}, a pickle (the trainer-state format of earlier monet versions, or "
                "a planted file); unpickling can execute arbitrary code, so it is refused. Start a new run from its "
                f"weights instead (--set model={ckpt}) or resume from a checkpoint written by this version")
        raise CheckpointError(f"{checkpoint} is not a training checkpoint (no {STATE_FILE})")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); the checkpoint is corrupt") from None
    if not isinstance(doc, dict) or doc.get("format") != STATE_FORMAT or "state" not in doc:
        fmt = doc.get("format") if isinstance(doc, dict) else None
        raise CheckpointError(f"{path} is not a monet trainer state (format {fmt!r})")
    if int(doc.get("version", 0)) > STATE_VERSION:
        raise CheckpointError(f"{path} has trainer-state version {doc['version']}; this monet reads up to "
                              f"{STATE_VERSION} (upgrade monet)")
    from safetensors.torch import load_file

    tpath = ckpt / STATE_TENSORS
    if not tpath.is_file() and (ckpt / LEGACY_STATE_TENSORS).is_file():
        tpath = ckpt / LEGACY_STATE_TENSORS
    try:
        tensors = load_file(str(tpath)) if tpath.is_file() else {}
    except Exception as e:
        raise CheckpointError(f"{tpath} is unreadable ({type(e).__name__}: {e}); the checkpoint is corrupt") from None
    return _decode(doc["state"], tensors, f"{path} (tensors: {tpath.name})")


def load_checkpoint_config(checkpoint: str | os.PathLike) -> dict | None:
    """The settings the checkpoint was trained with (``sft_config.yaml``, safe YAML), or None."""
    import yaml

    path = Path(checkpoint) / CONFIG_FILE
    if not path.is_file():
        return None
    raw = yaml.safe_load(path.read_text())
    return raw if isinstance(raw, dict) else None


# -- weights check -----------------------------------------------------------------------------
def check_finite_weights(model: Any) -> None:
    """Raise :class:`NonFiniteWeightsError` naming the first parameter holding NaN/inf."""
    for name, p in model.named_parameters():
        if p.numel() and not bool(torch.isfinite(p.detach()).all()):
            raise NonFiniteWeightsError(f"parameter {name} holds NaN/inf values; refusing to write a checkpoint "
                                        "with non-finite weights")


# -- folders -----------------------------------------------------------------------------------
def checkpoint_step(path: Path) -> int | None:
    m = _CKPT_RE.match(path.name)
    return int(m.group(1)) if m and path.is_dir() else None


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """``checkpoint-STEP`` folders of ``output_dir``, by step."""
    out = Path(output_dir)
    if not out.is_dir():
        return []
    found = [(s, p) for p in out.iterdir() if (s := checkpoint_step(p)) is not None]
    return [p for _, p in sorted(found)]


def staging_dir(output_dir: str | os.PathLike, step: int) -> Path:
    """A fixed temporary folder for ``checkpoint-STEP`` that every rank can name (for collective
    writers such as DeepSpeed's) before rank 0 renames it into place."""
    return Path(output_dir) / f".checkpoint-{step}.staging"


def remove_stale_temporaries(output_dir: str | os.PathLike) -> list[str]:
    """Delete the ``.checkpoint-*.tmp-*`` / ``.checkpoint-*.staging`` folders a killed writer left
    (call only while holding the run lock). Returns their names."""
    out = Path(output_dir)
    gone = []
    for p in sorted(out.glob(".checkpoint-*")):
        if p.is_dir() and (".tmp-" in p.name or p.name.endswith(".staging")):
            shutil.rmtree(p, ignore_errors=True)
            gone.append(p.name)
    return gone


def write_monet_config(folder: Path, model: Any, span_layout: SpanLayout) -> None:
    """Write ``folder/monet_config.json``: the model's :class:`~monet.model.config.MonetConfig` (a
    default one when it carries none) with ``span_layout`` instead of its own; the model's live
    config is left untouched."""
    from monet.model.config import MonetConfig

    if not isinstance(span_layout, SpanLayout):
        raise TypeError(f"span_layout must be a SpanLayout, got {type(span_layout).__name__}")
    base = getattr(model, "monet_config", None) or MonetConfig()
    MonetConfig(span_layout=span_layout, token_ids=base.token_ids, format_version=base.format_version,
                extra=dict(base.extra)).save(folder)


def commit_checkpoint(output_dir: str | os.PathLike, step: int, *, model: Any, processor: Any | None,
                      write_state: Callable[[Path], None], config_file: str, config_yaml: str | None = None,
                      keep_last: int | None = None, staged: Path | None = None,
                      span_layout: SpanLayout | None = None) -> Path:
    """The one way a trainer (SFT or VLPO) writes ``checkpoint-STEP``: refuse non-finite weights,
    write the model, processor, ``config_file`` and the trainer's own state (``write_state(folder)``)
    into a temporary folder (or ``staged``, see :func:`staging_dir`), rename it into place, point
    ``latest`` at it, then apply ``keep_last``. Returns its path.

    ``span_layout``: the span layout (K and kind) the run trained in. The checkpoint's
    ``monet_config.json`` states it (token ids and ``extra`` stay the model's), so loading the folder
    (``monet.load_model``, ``LatentLLM``, resume) decodes the way the weights were trained, whatever
    layout the starting model's ``monet_config.json`` named. None keeps the model's own.

    ``keep_last``: afterwards keep this checkpoint and the ``keep_last - 1`` newest ones before it;
    checkpoints with a higher step (left by a run that was resumed from an earlier checkpoint) are
    deleted too; the checkpoint just written never is. A full disk raises
    :class:`monet.atomic.DiskFullError` naming the folder; the previous checkpoint stays intact.
    """
    check_finite_weights(model)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    final = out / f"checkpoint-{step}"
    tmp = staged
    try:
        if tmp is None:
            tmp = Path(tempfile.mkdtemp(prefix=f".checkpoint-{step}.tmp-", dir=out))
        model.save_pretrained(tmp)
        if span_layout is not None:
            write_monet_config(tmp, model, span_layout)
        if processor is not None:
            processor.save_pretrained(tmp)
        if config_yaml is not None:
            (tmp / config_file).write_text(config_yaml)
        write_state(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        atomic_write_text(out / LATEST, final.name + "\n")
    except BaseException as e:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, Exception) and is_disk_full(e):
            raise disk_full_error(e, final, f"checkpoint step {step}") from e
        raise
    if keep_last:
        others = [p for p in list_checkpoints(out) if p != final]
        older = [p for p in others if checkpoint_step(p) < step]
        doomed = [p for p in others if checkpoint_step(p) > step] + older[:max(0, len(older) - (keep_last - 1))]
        for old in doomed:
            shutil.rmtree(old, ignore_errors=True)
    return final


def save_checkpoint(output_dir: str | os.PathLike, step: int, *, model: Any, processor: Any | None,
                    trainer_state: dict, config_yaml: str | None = None, keep_last: int | None = None,
                    staged: Path | None = None, span_layout: SpanLayout | None = None) -> Path:
    """Write an SFT ``checkpoint-STEP`` (:func:`commit_checkpoint` with the trainer state of
    :func:`write_trainer_state` and ``sft_config.yaml``). Returns its path. ``span_layout``: the
    layout the run trained in (:func:`monet.data.stage_layout.sft_span_layout`), which the
    checkpoint's ``monet_config.json`` records.

    Refuses (:class:`NonFiniteWeightsError`) when a weight is NaN/inf. ``staged``: a folder (see
    :func:`staging_dir`) that already holds parts written by other writers (DeepSpeed's shards); it
    is completed and renamed instead of a fresh temporary folder.
    """
    return commit_checkpoint(output_dir, step, model=model, processor=processor,
                             write_state=lambda folder: write_trainer_state(folder, trainer_state),
                             config_file=CONFIG_FILE, config_yaml=config_yaml, keep_last=keep_last, staged=staged,
                             span_layout=span_layout)


def latest_checkpoint(output_dir: str | os.PathLike, state_file: str = STATE_FILE) -> Path | None:
    """The checkpoint ``latest`` names, or None when there is none. A dangling pointer (or one
    naming a folder without ``state_file``) is an error."""
    pointer = Path(output_dir) / LATEST
    if not pointer.is_file():
        return None
    ckpt = Path(output_dir) / pointer.read_text().strip()
    if not (ckpt / state_file).is_file() and not (state_file == STATE_FILE and (ckpt / LEGACY_STATE_FILE).exists()):
        raise FileNotFoundError(f"{pointer} names {ckpt}, which is not a complete checkpoint (no {state_file})")
    return ckpt  # a pickled legacy state is refused, with its own message, by load_trainer_state
