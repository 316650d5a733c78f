"""SFT configuration: one dataclass, loadable from YAML and overridable from the command line.

Values are typed by the dataclass field, not guessed: ``--set lr=2e-5`` is the float 2e-05 (YAML
alone would read ``2e-5`` as a string), ``--set max_steps=none`` is None, ``--set data=a.json,b.json``
is a list. A value that does not fit its field's type is an error naming the field.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from monet.data.stage_layout import DEFAULT_CE_EMPHASIZE


def read_yaml_mapping(path: str | os.PathLike) -> dict[str, Any]:
    """The settings mapping of a YAML config file (``yaml.safe_load``: plain data only); an empty
    file is ``{}``. A missing file or a document that is not a mapping is an error naming ``path``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping of settings, got {type(raw).__name__}")
    return raw


@dataclass
class SFTConfig:
    """Settings of one SFT stage (docs/design.md, section 4). Paths may be relative to the YAML file.

    ``teacher``: ``"store"`` reads precomputed states from ``teacher_store``; ``"online"`` runs
    ``teacher_model`` (stage 2: the stage-1 model on the stage-1 layout; stage 3: the stage-2 model
    on the stage-2 layout) in the same step; ``"none"`` trains with CE only.
    """

    stage: int
    model: str
    data: list[str]
    image_root: str | None = None
    output_dir: str = "runs/sft"
    latent_size: int = 8
    # optimisation
    lr: float = 1e-5
    weight_decay: float = 0.0
    warmup_steps: int = 10
    lr_schedule: str = "constant"  # "constant" after warm-up, or "cosine"
    epochs: float = 1.0
    max_steps: int | None = None
    micro_batch_size: int = 1
    grad_accum: int = 16
    max_grad_norm: float | None = 1.0
    # a step whose loss or gradient is NaN/inf is skipped (weights and optimizer state unchanged);
    # this many skipped steps in a row stop the run with an error
    max_nonfinite_steps: int = 5
    dtype: str = "bfloat16"
    gradient_checkpointing: bool = True
    # latent pass backward (monet.model.training): "nested" (lower peak memory), "joint" (one autograd
    # graph; needed by DeepSpeed ZeRO, which reduces each gradient once), "auto" = joint iff DeepSpeed
    latent_backward: str = "auto"
    freeze_vision: bool = True
    seed: int = 0
    # losses
    ce_emphasize_factor: float | None = None  # None: 2 (stage 1) / 4 (stages 2-3)
    # which tokens are CE targets (monet.data.stage_layout): "decodable" (every token the decoder must
    # emit itself, incl. <observation> after a span) or "research" (the original code's targets)
    labels: str = "decodable"
    ce_chunk_size: int = 1024
    alignment_weight: float = 2.0
    emphasize_latent_weight: float = 2.0
    align_through_latents_only: bool = True  # stage 2: alignment gradient reaches weights via latents
    alignment_axis: str = "hidden"
    alignment_layers: list[int] | None = None  # None: all hidden-state layers (embeddings + every layer)
    teacher: str = "store"
    teacher_store: str | None = None
    teacher_model: str | None = None
    # images (units of 28x28 pixels); None: the stage default
    max_image_tokens_total: int | None = None
    max_image_tokens_per_image: int | None = None
    # bookkeeping
    log_every: int = 10
    save_every: int | None = None  # optimizer steps; None: only at the end
    keep_last: int | None = 2
    cache_dir: str | None = None
    tensorboard: bool = False
    wandb_project: str | None = None  # log to Weights & Biases (needs `pip install wandb`)
    deepspeed: str | None = None
    attn_implementation: str = "sdpa"
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.stage not in (1, 2, 3):
            raise ValueError(f"stage must be 1, 2 or 3, got {self.stage!r}")
        if isinstance(self.data, (str, os.PathLike)):
            self.data = [str(self.data)]
        if self.teacher not in ("store", "online", "none"):
            raise ValueError(f"teacher must be 'store', 'online' or 'none', got {self.teacher!r}")
        if self.stage > 1 and self.teacher == "store" and not self.teacher_store:
            raise ValueError(f"stage {self.stage} with teacher='store' needs teacher_store (a directory written by "
                             f"`monet precompute teacher-{'reps' if self.stage == 2 else 'latents'}`)")
        if self.stage > 1 and self.teacher == "online" and not self.teacher_model:
            raise ValueError(f"stage {self.stage} with teacher='online' needs teacher_model")
        if self.labels not in ("decodable", "research"):
            raise ValueError(f"labels must be 'decodable' or 'research', got {self.labels!r}")
        if self.alignment_axis not in ("hidden", "token"):
            raise ValueError(f"alignment_axis must be 'hidden' or 'token', got {self.alignment_axis!r}")
        if self.latent_backward not in ("auto", "nested", "joint"):
            raise ValueError(f"latent_backward must be 'auto', 'nested' or 'joint', got {self.latent_backward!r}")
        if self.latent_backward == "nested" and self.deepspeed:
            raise ValueError("latent_backward='nested' cannot be used with DeepSpeed (ZeRO reduces each gradient "
                             "once per step); use 'joint' or 'auto'")
        if self.lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got {self.lr_schedule!r}")
        for name in ("micro_batch_size", "grad_accum", "latent_size", "max_nonfinite_steps", "log_every",
                     "ce_chunk_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_steps", "save_every", "keep_last"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1 (or null), got {getattr(self, name)}")
        if not self.epochs > 0:
            raise ValueError(f"epochs must be > 0, got {self.epochs}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")

    @property
    def latent_backward_mode(self) -> str:
        """``latent_backward`` with ``"auto"`` resolved."""
        if self.latent_backward != "auto":
            return self.latent_backward
        return "joint" if self.deepspeed else "nested"

    @property
    def ce_factor(self) -> float:
        return self.ce_emphasize_factor if self.ce_emphasize_factor is not None else DEFAULT_CE_EMPHASIZE[self.stage]

    @classmethod
    def from_yaml(cls, path: str | os.PathLike, overrides: dict[str, Any] | None = None) -> "SFTConfig":
        path = Path(path)
        raw = read_yaml_mapping(path)
        raw.update(overrides or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"{path}: unknown settings {unknown}")
        hints = _field_types()
        raw = {k: coerce_value(k, v, hints[k], source=str(path)) for k, v in raw.items()}
        base = path.parent
        for key in ("model", "image_root", "output_dir", "teacher_store", "teacher_model", "cache_dir", "deepspeed"):
            if raw.get(key):
                raw[key] = _relative_to(base, raw[key])
        if raw.get("data"):
            raw["data"] = [_relative_to(base, p) for p in ([raw["data"]] if isinstance(raw["data"], str) else raw["data"])]
        return cls(**raw)

    def to_yaml(self) -> str:
        return yaml.safe_dump(dataclasses.asdict(self), sort_keys=False)


def _relative_to(base: Path, p: str) -> str:
    q = Path(os.path.expanduser(p))
    return str(q if q.is_absolute() else (base / q))


def _field_types() -> dict[str, Any]:
    return typing.get_type_hints(SFTConfig)


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType)


def _text_to(name: str, text: str, tp: Any, source: str) -> Any:
    """Parse the command-line text ``text`` as field type ``tp``."""
    def bad(what: str) -> ValueError:
        return ValueError(f"{source}: {name}={text!r} is not {what}")

    if _is_union(tp):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if type(None) in typing.get_args(tp) and text.strip().lower() in ("none", "null", "~", ""):
            return None
        return _text_to(name, text, args[0], source)
    origin = typing.get_origin(tp)
    if tp is bool:
        low = text.strip().lower()
        if low in ("true", "yes", "on", "1"):
            return True
        if low in ("false", "no", "off", "0"):
            return False
        raise bad("a boolean (true/false)")
    if tp is int:
        try:
            return int(text.strip())
        except ValueError:
            raise bad("an integer") from None
    if tp is float:
        try:
            x = float(text.strip())
        except ValueError:
            raise bad("a number") from None
        if not math.isfinite(x):
            raise bad("a finite number")
        return x
    if tp is str:
        return text
    if origin is list:
        (item,) = typing.get_args(tp) or (str,)
        stripped = text.strip()
        if stripped.startswith("["):
            parsed = yaml.safe_load(stripped)
            if not isinstance(parsed, list):
                raise bad("a list")
            return [coerce_value(name, v, item, source=source) for v in parsed]
        return [_text_to(name, part.strip(), item, source) for part in stripped.split(",") if part.strip()]
    if origin is dict or tp is dict or dataclasses.is_dataclass(tp):
        parsed = yaml.safe_load(text)  # a nested settings object is checked by its own constructor
        if not isinstance(parsed, dict):
            raise bad("a mapping")
        return parsed
    if origin is typing.Literal:
        choices = typing.get_args(tp)
        if text.strip() not in choices:
            raise bad(f"one of {list(choices)}")
        return text.strip()
    raise bad(f"of a settable type ({tp})")


def coerce_value(name: str, value: Any, tp: Any, *, source: str = "config") -> Any:
    """``value`` as field type ``tp``: text (``--set``, or YAML scalars such as ``1e-5`` that YAML
    reads as strings) is parsed by the type; other values are checked against it."""
    base = [a for a in typing.get_args(tp) if a is not type(None)][0] if _is_union(tp) else tp
    origin = typing.get_origin(base) or base
    if origin is list and isinstance(value, str):
        return [value]  # one YAML path, not a comma-separated --set text
    if isinstance(value, str) and tp is not str and not (_is_union(tp) and str in typing.get_args(tp)):
        return _text_to(name, value, tp, source)
    if value is None:
        if _is_union(tp) and type(None) in typing.get_args(tp):
            return None
        raise ValueError(f"{source}: {name} cannot be null")
    if origin is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if origin in (int, bool) and (type(value) is not origin):
        raise ValueError(f"{source}: {name}={value!r} is not {'an integer' if origin is int else 'a boolean'}")
    if origin in (list, dict, str) and not isinstance(value, origin):
        raise ValueError(f"{source}: {name}={value!r} is not a {origin.__name__}")
    if origin is list:
        (item,) = typing.get_args(base) or (Any,)
        if item is not Any:
            return [coerce_value(name, v, item, source=source) for v in value]
    return value


def parse_overrides(items: list[str], config_cls: type | None = None, *,
                    sections: Mapping[str, type] | None = None) -> dict[str, Any]:
    """``["lr=2e-5", "max_steps=10"]`` -> ``{"lr": 2e-05, "max_steps": 10}``: each value parsed by
    the type of its field in ``config_cls`` (default :class:`SFTConfig`); ``section.key`` names a
    field of the dataclass ``sections[section]`` (e.g. ``vlpo.sigma``). Unknown keys and ill-typed
    values are errors."""
    config_cls = config_cls or SFTConfig
    hints = typing.get_type_hints(config_cls)
    out = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--set {item!r} must look like key=value")
        k, v = item.split("=", 1)
        k = k.strip()
        head, _, sub = k.partition(".")
        if sub and sections and head in sections:
            tp = typing.get_type_hints(sections[head]).get(sub)
            owner = sections[head]
        else:
            tp, owner = hints.get(k), config_cls
        if tp is None:
            raise ValueError(f"--set {item!r}: unknown setting {k!r} (see {owner.__module__}.{owner.__name__})")
        out[k] = _text_to(k, v, tp, "--set")
    return out
