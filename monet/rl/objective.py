"""The VLPO loss: PPO-clipped surrogate + k3 KL, text and latent actions normalised separately.

For every action (text token or latent) with new / old / reference log-probabilities ``logp``,
``old``, ``ref`` and advantage ``A``::

    ratio = exp(logp - old)
    pg    = max(-A * ratio, -A * clip(ratio, 1 - clip_low, 1 + clip_high))
    pg    = min(pg, -A * dual_clip)                 if A < 0   (dual clip)
    k3    = exp(ref - logp) - (ref - logp) - 1      (>= 0, unbiased estimate of KL(pi || ref))
    term  = pg + kl_coef * k3

    loss  = sum_text(term) / N_text + latent_weight * sum_latent(term) / N_latent

``N_text`` / ``N_latent`` are the numbers of text / latent actions in the whole mini-batch that
one optimiser step sees (token-mean over the mini-batch, *not* per micro-batch): pass them as
arguments, so the micro-batch losses add up to exactly the full-batch loss and gradient
accumulation is exact. With ``R`` data-parallel ranks that *average* gradients, pass the counts
over all ranks divided by ``R`` (equivalently, multiply the loss by ``R``). A kind with no actions
in the mini-batch contributes 0. Log-ratios are clamped to ``[-20, 20]`` before ``exp`` so that a
far-off-policy action cannot produce ``inf * 0 = nan`` gradients (its term is clipped anyway).

Metrics (detached 0-dim tensors): keys ending in ``_max`` / ``_min`` combine over micro-batches by
max / min, ``latent/share`` is recomputed by :func:`merge_metrics`, every other key is normalised
by the global counts and combines by sum.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from monet.rl.config import VLPOConfig

LOG_RATIO_CLAMP = 20.0


@dataclass
class ActionTerms:
    """One kind of action (text or latent), ``[B, L]`` each: ``logp`` (current policy, with grad),
    ``old_logp`` (rollout policy), ``ref_logp`` (frozen reference; None = no KL term), ``mask``
    (bool, the actions)."""

    logp: torch.Tensor
    old_logp: torch.Tensor
    ref_logp: torch.Tensor | None
    mask: torch.Tensor


@dataclass
class ObjectiveOutput:
    """``loss`` (scalar, this micro-batch's share of the mini-batch loss) and ``metrics``."""

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor]


def clipped_surrogate(
    log_ratio: torch.Tensor, advantages: torch.Tensor, *, clip_low: float, clip_high: float, dual_clip: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Elementwise PPO surrogate loss (to minimise) with asymmetric and dual clipping.

    Returns ``(pg, flags)``; ``flags`` are bool tensors of the same shape: ``clip_low`` (A < 0 and
    ratio < 1 - clip_low: the clipped branch is active, no gradient), ``clip_high`` (A > 0 and
    ratio > 1 + clip_high), ``dual_clip`` (A < 0 and ratio > dual_clip: loss capped at -A*dual_clip).
    """
    ratio = log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP).exp()
    pg1 = -advantages * ratio
    pg2 = -advantages * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    pg = torch.maximum(pg1, pg2)
    pg3 = -advantages * dual_clip
    pg = torch.where(advantages < 0, torch.minimum(pg, pg3), pg)
    flags = {
        "clip_low": (advantages < 0) & (ratio < 1.0 - clip_low),
        "clip_high": (advantages > 0) & (ratio > 1.0 + clip_high),
        "dual_clip": (advantages < 0) & (ratio > dual_clip),
    }
    return pg, flags


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Elementwise ``exp(ref - logp) - (ref - logp) - 1`` (log-ratio clamped to +-20)."""
    d = (ref_logp - logp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return d.exp() - d - 1.0


def _kind_loss(
    kind: str, terms: ActionTerms, advantages: torch.Tensor, count: int, config: VLPOConfig, use_kl: bool
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    mask = terms.mask
    for name in ("logp", "old_logp", "ref_logp"):
        t = getattr(terms, name)
        if t is not None and t.shape != mask.shape:
            raise ValueError(f"{kind}.{name} has shape {tuple(t.shape)}, expected {tuple(mask.shape)} like its mask")
    if advantages.shape != mask.shape:
        raise ValueError(f"advantages {tuple(advantages.shape)} do not match {kind} mask {tuple(mask.shape)}")
    n_local = int(mask.sum())
    if n_local > count:
        raise ValueError(f"{kind}: this micro-batch has {n_local} actions but the global count is {count}")
    dtype = torch.float64 if terms.logp.dtype == torch.float64 else torch.float32  # at least fp32
    zero = torch.zeros((), dtype=dtype, device=mask.device)
    # masked-out entries may hold anything (even nan): select, never multiply
    logp = torch.where(mask, terms.logp.to(dtype), zero)
    old = torch.where(mask, terms.old_logp.detach().to(dtype), zero)  # constants of the step
    adv = torch.where(mask, advantages.detach().to(dtype), zero)
    pg, flags = clipped_surrogate(logp - old, adv, clip_low=config.clip_low, clip_high=config.clip_high,
                                  dual_clip=config.dual_clip)
    term = pg
    kl = None
    if use_kl:
        ref = torch.where(mask, terms.ref_logp.detach().to(dtype), zero)
        kl = torch.where(mask, k3_kl(logp, ref), zero)
        term = pg + config.kl_coef * kl
    term = torch.where(mask, term, zero)
    denom = float(max(count, 1))
    loss = term.sum() / denom
    with torch.no_grad():
        ratio = (logp - old).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP).exp()
        m = {
            f"{kind}/loss": loss.detach(),
            f"{kind}/pg_loss": torch.where(mask, pg, zero).sum() / denom,
            f"{kind}/abs_term_mean": term.abs().sum() / denom,
            f"{kind}/count": torch.tensor(float(n_local), dtype=dtype, device=mask.device),
            f"{kind}/ratio_mean": torch.where(mask, ratio, zero).sum() / denom,
            f"{kind}/ratio_max": torch.where(mask, ratio, -torch.inf).max() if n_local else zero - torch.inf,
            f"{kind}/ratio_min": torch.where(mask, ratio, torch.inf).min() if n_local else zero + torch.inf,
            f"{kind}/logp_mean": logp.sum() / denom,
        }
        for name, f in flags.items():
            m[f"{kind}/{name}_frac"] = (f & mask).sum().to(dtype) / denom
        if kl is not None:
            m[f"{kind}/kl"] = kl.sum() / denom
    return loss, m


def vlpo_loss(
    text: ActionTerms,
    latent: ActionTerms,
    advantages: torch.Tensor,
    *,
    config: VLPOConfig,
    n_text: int,
    n_latent: int,
    entropy: torch.Tensor | None = None,
) -> ObjectiveOutput:
    """The VLPO loss of one micro-batch (module docstring).

    ``advantages``: ``[B]`` (one per rollout, broadcast to all its actions) or ``[B, L]``.
    ``n_text`` / ``n_latent``: action counts of the whole mini-batch. ``entropy`` ``[B, L]``
    (text distribution entropy at text actions) is only logged. The KL term is used when
    ``config.kl_coef > 0``; it then needs both ``ref_logp``.
    """
    if advantages.dim() == 1:
        advantages = advantages[:, None].expand_as(text.mask)
    for name, n in (("n_text", n_text), ("n_latent", n_latent)):
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"{name} must be an int >= 0 (actions in the whole mini-batch), got {n!r}")
    use_kl = config.kl_coef > 0
    if use_kl and (text.ref_logp is None or latent.ref_logp is None):
        raise ValueError("kl_coef > 0 needs ref_logp for both text and latent actions")
    text_loss, metrics = _kind_loss("text", text, advantages, n_text, config, use_kl)
    latent_loss, lm = _kind_loss("latent", latent, advantages, n_latent, config, use_kl)
    metrics.update(lm)
    loss = text_loss + config.latent_weight * latent_loss
    with torch.no_grad():
        metrics["latent/weighted_loss"] = (config.latent_weight * latent_loss).detach()
        metrics["loss"] = loss.detach()
        if entropy is not None:
            if entropy.shape != text.mask.shape:
                raise ValueError(f"entropy {tuple(entropy.shape)} must match the text mask {tuple(text.mask.shape)}")
            metrics["text/entropy"] = torch.where(text.mask, entropy.to(loss.dtype), 0.0).sum() / float(max(n_text, 1))
        metrics["latent/share"] = _share(metrics["text/loss"], metrics["latent/weighted_loss"])
    return ObjectiveOutput(loss, metrics)


def _share(text_loss: torch.Tensor, weighted_latent_loss: torch.Tensor) -> torch.Tensor:
    """``|w L_latent| / (|L_text| + |w L_latent|)`` (0 when both are 0)."""
    a, b = text_loss.abs(), weighted_latent_loss.abs()
    total = a + b
    return torch.where(total > 0, b / total.clamp_min(torch.finfo(total.dtype).tiny), torch.zeros_like(total))


def merge_metrics(parts: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Combine the metrics of a mini-batch's micro-batches (module docstring rules)."""
    if not parts:
        raise ValueError("merge_metrics needs at least one micro-batch's metrics")
    keys = set(parts[0])
    for i, p in enumerate(parts[1:], 1):
        if set(p) != keys:
            raise ValueError(f"micro-batch {i} has metrics {sorted(set(p) ^ keys)} that micro-batch 0 does not share")
    out: dict[str, torch.Tensor] = {}
    for k in sorted(keys):
        vals = torch.stack([p[k].detach() for p in parts])
        if k.endswith("_max"):
            out[k] = vals.max()
        elif k.endswith("_min"):
            out[k] = vals.min()
        else:
            out[k] = vals.sum()
    out["latent/share"] = _share(out["text/loss"], out["latent/weighted_loss"])
    return out
