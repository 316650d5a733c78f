"""``monet export``: a training checkpoint (SFT or VLPO) as a plain model directory.

A checkpoint folder of either trainer is already loadable, but it also holds the trainer's state
(optimiser moments, RNG, data cursor, DeepSpeed shards, the run's YAML). :func:`export_checkpoint`
writes only the model to a new folder, for ``monet.load_model``, ``monet.vllm.LatentLLM`` and
``monet serve``:

* weights: ``model.safetensors``, or ``model.safetensors.index.json`` and the shards it lists;
* ``config.json``, ``generation_config.json``, the processor / tokenizer files
  (:data:`MODEL_FILES`);
* ``monet_config.json`` (:class:`monet.model.config.MonetConfig`), with the span layout the weights
  were trained in: SFT trains the standard layout with the run's ``latent_size``
  (``sft_config.yaml``; :func:`monet.data.stage_layout.sft_span_layout`); VLPO rolls out with the
  run's ``latent_size`` / ``layout`` (``vlpo_config.yaml``), each defaulting to the starting model's
  (:func:`monet.rl.actor.load_replica`). The latent token ids and ``extra`` are the checkpoint's.
  The trainers write that layout into each checkpoint's own ``monet_config.json``
  (:func:`monet.train.checkpoint.commit_checkpoint`), so for their checkpoints this is the file as
  saved; checkpoints of earlier monet versions kept the starting model's layout there, and the
  export corrects it from the run's YAML with the same rules (:func:`trained_layout`).

Everything else (trainer state, ``deepspeed/``, YAML, any other file) is left out and reported.

Accepted sources (:func:`find_checkpoint`): a VLPO checkpoint (``vlpo_state.json``), an SFT
checkpoint (``trainer_state.json``, or the pickled ``trainer_state.pt`` of earlier versions, which is
never read), or a run folder of either, whose ``latest`` pointer names the checkpoint (the trainers'
rule: :func:`monet.train.checkpoint.latest_checkpoint`). DeepSpeed checkpoints of both trainers hold
full-shape weights (saved while ZeRO-3 parameters are gathered); a weight file with an empty tensor
(a ZeRO-3 partition placeholder: weights saved without gathering) is refused with the way to
consolidate it.

Guarantees: the weight files are copied byte for byte and then read back from the copy (each tensor
once, so memory stays at one tensor): every tensor must be non-empty and finite, else
:class:`ExportError` names the tensor and its file and nothing is written. ``OUT`` is built in a
temporary sibling folder and renamed into place, so it either does not exist or is complete; an
existing non-empty ``OUT`` is refused. Nothing is unpickled; YAML is read with ``safe_load``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from monet.layout import SpanLayout
from monet.model.config import CONFIG_FILE as MONET_CONFIG, MonetConfig

WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
#: Non-weight files of a model directory that an export keeps (model config, generation defaults,
#: processor and tokenizer files as ``save_pretrained`` writes them).
MODEL_FILES = frozenset({
    "config.json", "generation_config.json",
    "preprocessor_config.json", "processor_config.json", "video_preprocessor_config.json",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "merges.txt", "tokenizer.model", "chat_template.json", "chat_template.jinja",
})
#: Folders of a model directory that an export keeps (extra chat templates of newer transformers).
MODEL_DIRS = frozenset({"additional_chat_templates"})

VLPO_STATE = "vlpo_state.json"
VLPO_CONFIG = "vlpo_config.yaml"
SFT_STATE = "trainer_state.json"
SFT_LEGACY_STATE = "trainer_state.pt"
SFT_CONFIG = "sft_config.yaml"
LATEST = "latest"


class ExportError(ValueError):
    """The source is not an exportable checkpoint, its weights are unusable, or ``OUT`` is taken."""


@dataclass(frozen=True)
class CheckpointSource:
    """A checkpoint folder found by :func:`find_checkpoint`: ``kind`` is ``"sft"`` or ``"vlpo"``."""

    kind: str
    folder: Path


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export_checkpoint` wrote: ``out``, the ``source`` checkpoint, the file names
    written (sorted), the names left out of the checkpoint folder, the ``monet_config`` written and
    the one the checkpoint held (None when it had none)."""

    out: Path
    source: CheckpointSource
    files: tuple[str, ...]
    left_out: tuple[str, ...]
    monet_config: MonetConfig
    checkpoint_monet_config: MonetConfig | None


def _kind_of(folder: Path) -> str | None:
    if (folder / VLPO_STATE).is_file():
        return "vlpo"
    if (folder / SFT_STATE).is_file() or (folder / SFT_LEGACY_STATE).is_file():
        return "sft"
    return None


def find_checkpoint(path: str | os.PathLike) -> CheckpointSource:
    """The checkpoint ``path`` names: itself when it is a VLPO or SFT checkpoint folder, else the
    checkpoint its ``latest`` pointer names (a run folder). Anything else raises
    :class:`ExportError` saying what was expected."""
    p = Path(path)
    if not p.exists():
        raise ExportError(f"{p} does not exist")
    if not p.is_dir():
        raise ExportError(f"{p} is not a folder; give a checkpoint folder (checkpoint-STEP) or a run folder")
    kind = _kind_of(p)
    if kind is not None:
        return CheckpointSource(kind, p)
    pointer = p / LATEST
    if pointer.is_file():
        name = pointer.read_text(encoding="utf-8", errors="replace").strip()
        target = p / name
        kind = _kind_of(target) if name and target.is_dir() else None
        if kind is None:
            raise ExportError(f"{pointer} names {target}, which is not a complete SFT or VLPO checkpoint "
                              f"(no {VLPO_STATE} or {SFT_STATE}); give a checkpoint-STEP folder instead")
        return CheckpointSource(kind, target)
    found = sorted(c.name for c in p.glob("checkpoint-*") if c.is_dir())
    hint = (f"; it holds {', '.join(found[:5])}{' ...' if len(found) > 5 else ''} but no '{LATEST}' pointer: "
            "give one of them" if found else
            ("; it looks like a plain model directory, which monet.load_model and LatentLLM open as is"
             if (p / "config.json").is_file() else ""))
    raise ExportError(f"{p} is neither an SFT or VLPO checkpoint (no {SFT_STATE} or {VLPO_STATE}) nor a run folder "
                      f"(no '{LATEST}' file){hint}")


def _read_yaml(path: Path) -> dict:
    import yaml

    if not path.is_file():
        return {}
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ExportError(f"{path}: not valid YAML ({e})") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ExportError(f"{path}: expected a mapping of settings, got {type(raw).__name__}")
    return raw


def trained_layout(source: CheckpointSource, saved: MonetConfig | None) -> SpanLayout:
    """The span layout the checkpoint's weights were trained in (module docstring); ``saved`` is the
    checkpoint's own ``monet_config.json`` (already that layout for checkpoints of this version; the
    starting model's defaults for earlier ones). The rules are the trainers': SFT
    :func:`monet.data.stage_layout.sft_span_layout`, VLPO ``SpanLayout.of`` over the run's settings."""
    from monet.data.stage_layout import sft_span_layout

    default = saved.span_layout if saved is not None else SpanLayout()
    if source.kind == "vlpo":
        path = source.folder / VLPO_CONFIG
        cfg = _read_yaml(path)
        try:  # the rollout layout, as the actor builds it
            return SpanLayout.of(cfg.get("latent_size"), cfg.get("layout"), default=default)
        except (TypeError, ValueError) as e:
            raise ExportError(f"{path}: {e}") from None
    path = source.folder / SFT_CONFIG
    cfg = _read_yaml(path)
    if cfg.get("latent_size") is None:
        return default
    try:
        return sft_span_layout(cfg["latent_size"])
    except (TypeError, ValueError) as e:
        raise ExportError(f"{path}: {e}") from None


def _weight_files(folder: Path) -> list[str]:
    """Names of the weight files of ``folder`` (the index first when sharded)."""
    index = folder / WEIGHTS_INDEX
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (ValueError, KeyError, AttributeError, TypeError, UnicodeDecodeError) as e:
            raise ExportError(f"{index}: not a valid safetensors index ({e})") from None
        for s in shards:
            if not isinstance(s, str) or Path(s).name != s:
                raise ExportError(f"{index}: shard name {s!r} is not a file name in the checkpoint folder")
            if not (folder / s).is_file():
                raise ExportError(f"{index} lists the shard {s}, which is missing from {folder}")
        return [WEIGHTS_INDEX, *shards]
    if (folder / WEIGHTS).is_file():
        return [WEIGHTS]
    pickled = sorted(f.name for f in folder.glob("*.bin")) + sorted(f.name for f in folder.glob("*.pt"))
    if (folder / "deepspeed").is_dir():
        raise ExportError(f"{folder} has DeepSpeed shards (deepspeed/) but no {WEIGHTS}: its weights exist only as "
                          "ZeRO partitions. Consolidate them first (DeepSpeed's zero_to_fp32.py, or resume the run "
                          "and let monet write a checkpoint, which gathers the weights), then export that")
    raise ExportError(f"{folder} has no model weights ({WEIGHTS} or {WEIGHTS_INDEX})"
                      + (f"; {pickled} are pickles, which monet never loads" if pickled else ""))


def check_weights(folder: Path, names: list[str]) -> int:
    """Read every tensor of the weight files ``names`` in ``folder`` once; raise
    :class:`ExportError` naming the first empty (ZeRO-3 partition placeholder) or non-finite
    tensor and its file. Returns the number of tensors checked."""
    import torch
    from safetensors import safe_open

    from monet.model.loading import check_safetensors_file

    n = 0
    for name in names:
        if not name.endswith(".safetensors"):
            continue
        path = folder / name
        try:
            check_safetensors_file(path)
        except (FileNotFoundError, ValueError) as e:
            raise ExportError(str(e)) from None
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                t = f.get_tensor(key)
                if t.numel() == 0:
                    raise ExportError(
                        f"weight {key} in {name} is empty (shape {tuple(t.shape)}): the checkpoint holds ZeRO-3 "
                        "partitions saved without gathering, not full weights. Consolidate them first (DeepSpeed's "
                        "zero_to_fp32.py on the checkpoint's deepspeed/ folder, or save under "
                        "deepspeed.zero.GatheredParameters), then export that")
                if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                    bad = int((~torch.isfinite(t)).sum())
                    raise ExportError(f"weight {key} in {name} holds {bad} NaN/inf value(s); refusing to export "
                                      "non-finite weights (export an earlier checkpoint)")
                n += 1
    return n


def _check_out(src: Path, out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"{out} exists and is not empty; refusing to overwrite (choose a new folder)")
    s, o = src.resolve(), out.resolve()
    if o == s or s in o.parents:
        raise ExportError(f"{out} is inside the checkpoint {src}; choose a folder outside it")


def export_checkpoint(checkpoint: str | os.PathLike, out_dir: str | os.PathLike) -> ExportResult:
    """Export ``checkpoint`` (module docstring for what is accepted, written and checked) to
    ``out_dir``, which must not exist or be empty. Errors are :class:`ExportError` (a
    ``ValueError``) naming the path, file or tensor; on any error ``out_dir`` is left as it was."""
    source = find_checkpoint(checkpoint)
    src, out = source.folder, Path(out_dir)
    _check_out(src, out)
    if not (src / "config.json").is_file():
        raise ExportError(f"{src} has no config.json; it is not a complete model checkpoint")
    weights = _weight_files(src)
    try:
        saved = MonetConfig.load(src)
    except ValueError as e:
        raise ExportError(str(e)) from None
    layout = trained_layout(source, saved)
    monet_cfg = MonetConfig(span_layout=layout, token_ids=saved.token_ids if saved else None,
                            format_version=saved.format_version if saved else 1,
                            extra=dict(saved.extra) if saved else {})

    keep = set(weights) | (MODEL_FILES & {f.name for f in src.iterdir() if f.is_file()})
    keep_dirs = {d.name for d in src.iterdir() if d.is_dir() and d.name in MODEL_DIRS}
    left_out = sorted(f.name for f in src.iterdir() if f.name not in keep | keep_dirs | {MONET_CONFIG})

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        for name in sorted(keep):
            shutil.copy2(src / name, tmp / name)
        for name in sorted(keep_dirs):
            shutil.copytree(src / name, tmp / name)
        check_weights(tmp, weights)  # the copy itself is what gets served
        monet_cfg.save(tmp)
        files = tuple(sorted(f.name for f in tmp.iterdir()))
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ExportResult(out, source, files, tuple(left_out), monet_cfg, saved)
