"""Engine-wide and per-request latent settings, carried only through vLLM's own config objects.

* Engine: ``VllmConfig.additional_config["monet"]`` — the latent token ids (read from the tokenizer
  by :class:`~monet.vllm.LatentLLM` / the ``serve`` command), the default ``latent_size`` and
  ``layout``, and ``max_latents_per_request`` (size of the per-request device store of latent
  vectors, used to return them and to re-feed them when a preempted request is recomputed).
* Request: ``SamplingParams.extra_args["monet"]`` — optional ``latent_size``/``layout`` overrides,
  ``return_latents`` and a ``tag`` (opaque id the caller uses to fetch the latents).

This module imports nothing from vLLM so it can be used (and tested) without it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from monet.layout import check_latent_size, check_layout, is_monet_v1

CONFIG_KEY = "monet"
DEFAULT_MAX_LATENTS = 128
V2_ERROR = ("Monet latent decoding runs in vLLM's V1 model runner; Model Runner V2 is not supported. "
            "Start the engine with VLLM_USE_V2_MODEL_RUNNER=0")


@dataclass(frozen=True)
class EngineSettings:
    pad_id: int
    start_id: int
    end_id: int
    latent_size: int = 8
    layout: str = "standard"
    max_latents_per_request: int = DEFAULT_MAX_LATENTS

    def __post_init__(self) -> None:
        check_latent_size(self.latent_size)
        check_layout(self.layout)
        if self.max_latents_per_request < 1:
            raise ValueError(f"max_latents_per_request must be >= 1, got {self.max_latents_per_request}")
        if len({self.pad_id, self.start_id, self.end_id}) != 3:
            raise ValueError("latent pad/start/end token ids must be distinct")

    def to_dict(self) -> dict:
        return {
            "token_ids": {"pad": self.pad_id, "start": self.start_id, "end": self.end_id},
            "latent_size": self.latent_size,
            "layout": self.layout,
            "max_latents_per_request": self.max_latents_per_request,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "EngineSettings":
        unknown = sorted(set(d) - {"token_ids", "latent_size", "layout", "max_latents_per_request"})
        if unknown:
            raise ValueError(f"additional_config['{CONFIG_KEY}']: unknown keys {unknown}")
        ids = d.get("token_ids")
        if not isinstance(ids, Mapping) or not {"pad", "start", "end"} <= set(ids):
            raise ValueError(f"additional_config['{CONFIG_KEY}']['token_ids'] must give pad, start and end ids")
        return cls(
            pad_id=int(ids["pad"]),
            start_id=int(ids["start"]),
            end_id=int(ids["end"]),
            latent_size=int(d.get("latent_size", 8)),
            layout=str(d.get("layout", "standard")),
            max_latents_per_request=int(d.get("max_latents_per_request", DEFAULT_MAX_LATENTS)),
        )

    @classmethod
    def from_vllm_config(cls, vllm_config: Any) -> "EngineSettings":
        extra = getattr(vllm_config, "additional_config", None) or {}
        if CONFIG_KEY not in extra:
            raise ValueError(
                "the Monet latent worker needs additional_config={'monet': {...}} (token ids, latent_size, "
                "layout); use monet.vllm.LatentLLM or `monet serve`, or monet.vllm.engine_kwargs()"
            )
        return cls.from_dict(extra[CONFIG_KEY])


@dataclass(frozen=True)
class RequestSettings:
    latent_size: int
    monet_v1: bool
    return_latents: bool = False
    tag: str | None = None


def request_extra_args(*, latent_size: int | None = None, layout: str | None = None,
                       return_latents: bool = False, tag: str | None = None) -> dict:
    """The ``SamplingParams.extra_args`` entry for one request (validated here, on the caller side)."""
    d: dict[str, Any] = {}
    if latent_size is not None:
        d["latent_size"] = check_latent_size(latent_size)
    if layout is not None:
        d["layout"] = check_layout(layout)
    if return_latents:
        d["return_latents"] = True
    if tag is not None:
        d["tag"] = str(tag)
    return {CONFIG_KEY: d}


def request_settings(engine: EngineSettings, extra_args: Mapping[str, Any] | None) -> RequestSettings:
    """Resolve a request's settings from its ``extra_args`` and the engine defaults.

    Besides ``extra_args["monet"] = {...}`` the flat keys ``monet_latent_size`` / ``monet_layout`` are
    read, so OpenAI-API clients can pass them as ``vllm_xargs`` (which only carries flat values).
    """
    extra_args = extra_args or {}
    d = dict(extra_args.get(CONFIG_KEY) or {})
    for key in ("latent_size", "layout"):
        if f"{CONFIG_KEY}_{key}" in extra_args:
            d.setdefault(key, extra_args[f"{CONFIG_KEY}_{key}"])
    K = d.get("latent_size", engine.latent_size)
    if isinstance(K, str) and K.strip().lstrip("-").isdigit():
        K = int(K)
    K = check_latent_size(K)
    layout = check_layout(str(d.get("layout", engine.layout)))
    return RequestSettings(latent_size=K, monet_v1=is_monet_v1(layout),
                           return_latents=bool(d.get("return_latents", False)), tag=d.get("tag"))


def replay_latent_positions(token_ids, *, prompt_ends_in_start: bool, latent_size: int, monet_v1: bool,
                            start_id: int) -> list[int]:
    """Indices of generated tokens whose input is a latent, by replaying the span counter of
    :mod:`monet.layout` over the emitted ids (inside spans tokens are forced, so only START matters)."""
    K = latent_size
    r = K + 1 if prompt_ends_in_start else 0
    on_start = K if monet_v1 else K + 1
    out = []
    for j, t in enumerate(token_ids):
        if r == 0:
            if t == start_id:
                r = on_start
        elif r > 1:
            r -= 1
        else:
            r = 0
        if 1 <= r <= K:
            out.append(j)
    return out
