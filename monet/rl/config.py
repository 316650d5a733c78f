"""Typed VLPO settings (one dataclass, validated on construction)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal, Mapping

StdKind = Literal["sample", "population"]


def _require(cond: bool, name: str, msg: str, value: Any) -> None:
    if not cond:
        raise ValueError(f"VLPOConfig.{name} {msg}, got {value!r}")


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TypeError(f"VLPOConfig.{name} must be a finite number, got {value!r}")
    return float(value)


def _integer(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"VLPOConfig.{name} must be an int, got {value!r}")
    return value


@dataclass(frozen=True)
class LengthPenalty:
    """Soft over-length penalty added to the reward of one rollout with ``length`` response tokens:

    ``-weight * clamp((length - (max_tokens - buffer)) / buffer, 0, 1)``

    i.e. zero up to ``max_tokens - buffer`` tokens, then linear down to ``-weight`` at ``max_tokens``
    (and beyond)."""

    max_tokens: int
    buffer: int
    weight: float = 1.0

    def __post_init__(self) -> None:
        for name in ("max_tokens", "buffer"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"LengthPenalty.{name} must be an int, got {v!r}")
        if not 1 <= self.buffer <= self.max_tokens:
            raise ValueError(f"LengthPenalty needs 1 <= buffer <= max_tokens, got buffer={self.buffer}, "
                             f"max_tokens={self.max_tokens}")
        if isinstance(self.weight, bool) or not isinstance(self.weight, (int, float)) or not (
                math.isfinite(self.weight) and self.weight >= 0):
            raise ValueError(f"LengthPenalty.weight must be a finite number >= 0, got {self.weight!r}")


@dataclass(frozen=True)
class VLPOConfig:
    """Hyper-parameters of VLPO (latent-aware GRPO); see :mod:`monet.rl` for the algorithm.

    Rollouts and advantages
      ``n``: rollouts per prompt (one GRPO group). ``temperature``: rollout sampling temperature;
      text log-probabilities are ``log_softmax(logits / temperature)``. ``latent_noise``: exploration
      scale ``s`` of fed latents ``z = mu + s * eps`` (0 = feed ``mu`` exactly).
      ``adv_std``: ``"sample"`` (divide by ``n - 1``, like ``torch.std``) or ``"population"``
      (divide by ``n``); ``adv_eps`` is added to that std.
    Rewards
      ``reward = accuracy_weight * accuracy + format_weight * format (+ length penalty)``.
    Objective
      PPO ratio clipped to ``[1 - clip_low, 1 + clip_high]``; for negative advantages the loss is
      additionally capped at ``-A * dual_clip``; ``kl_coef`` weights the k3 estimator of
      KL(policy || reference). ``sigma``: std of the latent Gaussian policy ``N(mu, sigma^2 I)``;
      ``latent_logp_constant`` adds its normalising constant ``-D/2 log(2 pi sigma^2)`` (it cancels
      in ratios and KL; only reported log-probs change). ``latent_weight`` scales the latent term.
    Online difficulty sampling
      groups with accuracy in ``(0, select_acc_threshold]`` are kept; ``groups_per_batch`` kept
      groups make one training batch; at most ``buffer_groups`` wait in the buffer.
    """

    n: int = 8
    temperature: float = 1.0
    latent_noise: float = 0.0
    adv_std: StdKind = "sample"
    adv_eps: float = 1e-6
    accuracy_weight: float = 0.9
    format_weight: float = 0.1
    length_penalty: LengthPenalty | None = None
    clip_low: float = 0.2
    clip_high: float = 0.3
    dual_clip: float = 3.0
    kl_coef: float = 0.01
    sigma: float = 10.0
    latent_logp_constant: bool = False
    latent_weight: float = 1.0
    select_acc_threshold: float = 0.6
    groups_per_batch: int = 16
    buffer_groups: int = 64

    def __post_init__(self) -> None:
        n = _integer("n", self.n)
        _require(n >= 2, "n", "must be >= 2 (GRPO needs a group to compare rollouts within)", n)
        t = _number("temperature", self.temperature)
        _require(t > 0, "temperature", "must be > 0", t)
        _require(_number("latent_noise", self.latent_noise) >= 0, "latent_noise", "must be >= 0", self.latent_noise)
        _require(self.adv_std in ("sample", "population"), "adv_std", "must be 'sample' or 'population'",
                 self.adv_std)
        _require(_number("adv_eps", self.adv_eps) > 0, "adv_eps", "must be > 0", self.adv_eps)
        for name in ("accuracy_weight", "format_weight", "kl_coef", "latent_weight"):
            _require(_number(name, getattr(self, name)) >= 0, name, "must be >= 0", getattr(self, name))
        if isinstance(self.length_penalty, Mapping):
            object.__setattr__(self, "length_penalty", LengthPenalty(**self.length_penalty))
        if self.length_penalty is not None and not isinstance(self.length_penalty, LengthPenalty):
            raise TypeError(f"VLPOConfig.length_penalty must be a LengthPenalty, a mapping or None, "
                            f"got {self.length_penalty!r}")
        _require(0 <= _number("clip_low", self.clip_low) < 1, "clip_low", "must be in [0, 1)", self.clip_low)
        _require(_number("clip_high", self.clip_high) >= 0, "clip_high", "must be >= 0", self.clip_high)
        _require(_number("dual_clip", self.dual_clip) > 1, "dual_clip", "must be > 1", self.dual_clip)
        _require(_number("sigma", self.sigma) > 0, "sigma", "must be > 0", self.sigma)
        if not isinstance(self.latent_logp_constant, bool):
            raise TypeError(f"VLPOConfig.latent_logp_constant must be a bool, got {self.latent_logp_constant!r}")
        thr = _number("select_acc_threshold", self.select_acc_threshold)
        _require(0 < thr <= 1, "select_acc_threshold", "must be in (0, 1]", thr)
        g = _integer("groups_per_batch", self.groups_per_batch)
        _require(g >= 1, "groups_per_batch", "must be >= 1", g)
        b = _integer("buffer_groups", self.buffer_groups)
        _require(b >= g, "buffer_groups", f"must be >= groups_per_batch ({g})", b)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, where: str = "VLPO config") -> "VLPOConfig":
        """Build from a mapping (YAML / JSON); unknown keys are an error naming them."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{where}: unknown fields {unknown} (known: {sorted(known)})")
        try:
            return cls(**dict(data))
        except (TypeError, ValueError) as e:
            raise type(e)(f"{where}: {e}") from None
