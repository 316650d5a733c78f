"""Engine-wide and per-request latent settings, carried only through vLLM's own config objects.

* Engine: ``VllmConfig.additional_config["monet"]`` — the latent token ids (read from the tokenizer
  by :class:`~monet.vllm.LatentLLM` / the ``serve`` command), the default span layout
  (``latent_size``, ``layout``) and ``max_latents_per_request`` (size of the per-request device
  store of latent vectors, used to return them and to re-feed them when a preempted request is
  recomputed).
* Request: ``SamplingParams.extra_args["monet"] = {...}`` or the same keys flat as ``monet_<key>``
  (OpenAI clients pass ``vllm_xargs``, which only carries flat values): ``latent_size``, ``layout``,
  ``force_start``, ``return_latents``, ``tag`` (opaque id the caller uses to fetch the latents).
  :func:`parse_request_settings` is the one parser, used by ``LatentLLM``, ``monet serve`` and the
  runner alike.

This module imports nothing from vLLM so it can be used (and tested) without it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from monet.layout import SpanLayout
from monet.model.latent_hooks import LatentAblation

CONFIG_KEY = "monet"
DEFAULT_MAX_LATENTS = 128
V2_ERROR = ("Monet latent decoding runs in vLLM's V1 model runner; Model Runner V2 is not supported. "
            "Start the engine with VLLM_USE_V2_MODEL_RUNNER=0")
REQUEST_KEYS = ("latent_size", "layout", "force_start", "return_latents", "tag", "ablation")


@dataclass(frozen=True)
class EngineSettings:
    pad_id: int
    start_id: int
    end_id: int
    layout: SpanLayout = SpanLayout()
    max_latents_per_request: int = DEFAULT_MAX_LATENTS

    def __post_init__(self) -> None:
        if not isinstance(self.layout, SpanLayout):
            raise TypeError(f"layout must be a SpanLayout, got {type(self.layout).__name__}")
        if self.max_latents_per_request < 1:
            raise ValueError(f"max_latents_per_request must be >= 1, got {self.max_latents_per_request}")
        if len({self.pad_id, self.start_id, self.end_id}) != 3:
            raise ValueError("latent pad/start/end token ids must be distinct")

    def to_dict(self) -> dict:
        return {
            "token_ids": {"pad": self.pad_id, "start": self.start_id, "end": self.end_id},
            **self.layout.to_dict(),
            "max_latents_per_request": self.max_latents_per_request,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "EngineSettings":
        where = f"additional_config['{CONFIG_KEY}']"
        unknown = sorted(set(d) - {"token_ids", "latent_size", "layout", "max_latents_per_request"})
        if unknown:
            raise ValueError(f"{where}: unknown keys {unknown}")
        ids = d.get("token_ids")
        if not isinstance(ids, Mapping) or not {"pad", "start", "end"} <= set(ids):
            raise ValueError(f"{where}['token_ids'] must give pad, start and end ids")
        try:
            layout = SpanLayout.of(d.get("latent_size"), d.get("layout"))
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}: {e}") from None
        return cls(pad_id=int(ids["pad"]), start_id=int(ids["start"]), end_id=int(ids["end"]), layout=layout,
                   max_latents_per_request=int(d.get("max_latents_per_request", DEFAULT_MAX_LATENTS)))

    @classmethod
    def from_vllm_config(cls, vllm_config: Any) -> "EngineSettings":
        extra = getattr(vllm_config, "additional_config", None) or {}
        if CONFIG_KEY not in extra:
            raise ValueError(
                "the Monet latent worker needs additional_config={'monet': {...}} (token ids, latent_size, "
                "layout); use monet.vllm.LatentLLM or `monet serve`, or monet.vllm.engine_kwargs()"
            )
        return cls.from_dict(extra[CONFIG_KEY])


def check_engine_features(*, speculative: bool = False, pipeline_parallel_size: int = 1,
                          runner_type: str = "generate") -> None:
    """Refuse engine features the latent feedback cannot honour (one place for every front end)."""
    if speculative:
        raise ValueError("Monet latent decoding does not support speculative decoding: a drafted token cannot "
                         "take a latent input; remove speculative_config")
    if int(pipeline_parallel_size or 1) > 1:
        raise ValueError("Monet latent decoding does not support pipeline parallelism (the latent input of a "
                         "step is the last stage's output); use tensor parallelism instead")
    if runner_type != "generate":
        raise ValueError(f"Monet latent decoding needs a generative model, got runner {runner_type!r}")


@dataclass(frozen=True)
class RequestSettings:
    """One request's latent settings. ``force_start``: the prompt ended with START, which the front
    end stripped; the runner forces START as the first generated token (see :mod:`monet.layout`)."""

    layout: SpanLayout
    force_start: bool = False
    return_latents: bool = False
    tag: str | None = None
    ablation: LatentAblation | None = None

    def __eq__(self, other: object) -> bool:  # tensors inside ablations compare by value
        if not isinstance(other, RequestSettings):
            return NotImplemented
        return (self.layout, self.force_start, self.return_latents, self.tag) == \
            (other.layout, other.force_start, other.return_latents, other.tag) and \
            _ablation_dict(self.ablation) == _ablation_dict(other.ablation)

    def extra_args(self) -> dict:
        """The ``SamplingParams.extra_args`` entry carrying these settings to the runner (plain
        JSON-able values, so any transport carries them)."""
        d: dict[str, Any] = {**self.layout.to_dict()}
        if self.force_start:
            d["force_start"] = True
        if self.return_latents:
            d["return_latents"] = True
        if self.tag is not None:
            d["tag"] = self.tag
        if self.ablation is not None:
            d["ablation"] = _ablation_dict(self.ablation)
        return {CONFIG_KEY: d}


def _ablation_dict(ab: LatentAblation | None) -> dict | None:
    if ab is None:
        return None
    d: dict[str, Any] = {"mode": ab.mode, "seed": ab.seed}
    if ab.scale:
        d["scale"] = ab.scale
    if ab.vectors is not None:
        d["vectors"] = ab.vectors.detach().to("cpu").float().tolist()
    return d


def _parse_ablation(value: Any, key: str) -> LatentAblation | None:
    import torch

    if value is None:
        return None
    if isinstance(value, LatentAblation):
        return value
    if not isinstance(value, Mapping) or not set(value) <= {"mode", "seed", "vectors", "scale"}:
        raise ValueError(f"{key} must be an object with 'mode' and optional 'seed' / 'vectors', got {value!r:.80}")
    vec = value.get("vectors")
    if vec is not None:
        try:
            vec = torch.tensor(vec, dtype=torch.float32)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{key}.vectors must be a list of equal-length number lists ({e})") from None
        if vec.ndim == 1 and vec.numel() == 0:
            vec = vec.view(0, 0)
    seed = value.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"{key}.seed must be an int, got {seed!r}")
    try:
        scale = value.get("scale", 0.0)
        if isinstance(scale, bool) or not isinstance(scale, (int, float)):
            raise ValueError(f"{key}.scale must be a number, got {scale!r}")
        return LatentAblation(str(value.get("mode")), vectors=vec, seed=seed, scale=float(scale))
    except ValueError as e:
        raise ValueError(f"{key}: {e}") from None


def _as_bool(value: Any, key: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0"):
        return value.strip().lower() in ("true", "1")
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise ValueError(f"{key} must be a boolean, got {value!r}")


def parse_request_settings(extra_args: Mapping[str, Any] | None, default: SpanLayout) -> RequestSettings:
    """Resolve and validate a request's latent settings against the engine default layout.

    Reads ``extra_args["monet"]`` (a mapping) and flat ``monet_<key>`` entries; unknown Monet keys,
    wrong types and invalid values raise ``ValueError`` naming the key."""
    if extra_args is None:
        return RequestSettings(layout=default)
    if not isinstance(extra_args, Mapping):
        raise ValueError(f"extra_args must be an object, got {type(extra_args).__name__}")
    nested = extra_args.get(CONFIG_KEY) or {}
    if not isinstance(nested, Mapping):
        raise ValueError(f"extra_args['{CONFIG_KEY}'] must be an object, got {type(nested).__name__}")
    d = dict(nested)
    prefix = f"{CONFIG_KEY}_"
    for key, value in extra_args.items():
        if isinstance(key, str) and key.startswith(prefix):
            d.setdefault(key[len(prefix):], value)
    unknown = sorted(set(d) - set(REQUEST_KEYS))
    if unknown:
        raise ValueError(f"unknown Monet request settings {[prefix + k for k in unknown]}; "
                         f"valid: {[prefix + k for k in REQUEST_KEYS]}")
    layout = SpanLayout.of(d.get("latent_size"), d.get("layout"), default=default)
    tag = d.get("tag")
    if tag is not None and not isinstance(tag, str):
        raise ValueError(f"{prefix}tag must be a string, got {tag!r}")
    return RequestSettings(layout=layout, force_start=_as_bool(d.get("force_start", False), prefix + "force_start"),
                           return_latents=_as_bool(d.get("return_latents", False), prefix + "return_latents"), tag=tag,
                           ablation=_parse_ablation(d.get("ablation"), prefix + "ablation"))
