"""Per-position log-probabilities of recorded rollouts under a policy, in one teacher-forced pass.

The input of every position is the token embedding (image features at the *prompt's* image pads;
a vision token the policy generated is an ordinary token to the decoders, so it is embedded and
positioned as text here too), except at the
latent positions (:class:`~monet.rl.actions.ActionMasks`), which take the rollout's *recorded*
latents ``z`` — constants here, exactly what the rollout fed. One forward of the text model gives
final-norm hidden states ``h`` ``[B, L, D]``; then, for an action at position ``p``:

* text: ``log_softmax(lm_head(h[p - 1]) / T)[t_p]`` (T = rollout temperature; the head's
  logits are upcast to fp32 before the division and the softmax, as a sampler does);
* latent: ``log N(z_p; mu_p, sigma^2 I) = -||z_p - mu_p||^2 / (2 sigma^2) [- D/2 log(2 pi sigma^2)]``
  with ``mu_p = h[p - 1]`` — the state that produced ``z_p`` at rollout time. ``mu`` is upcast to
  fp32 and all Gaussian arithmetic is fp32 whatever the model dtype (the difference of two bf16
  numbers is exact in fp32; in bf16 it would lose the small ``z - mu`` of exploration noise).

Gradients reach the parameters through ``h`` (text: the logits; latent: ``mu``), never through
``z``. At ``theta_old`` without exploration noise ``z == mu`` and the latent term's gradient is 0;
with noise it is ``(z - mu) / sigma^2 * d mu / d theta``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from monet.layout import SpanLayout
from monet.model.forward import embed_multimodal, mrope_positions, run_text_model
from monet.rl.actions import ActionMasks, action_masks
from monet.tokens import LatentTokenIds


@dataclass
class RolloutBatch:
    """Right-padded rollouts to score.

    ``input_ids`` ``[B, L]`` prompt + response; ``attention_mask`` ``[B, L]``; ``response_start``
    ``[B]`` (prompt lengths); ``latents[b]`` ``[n_b, D]``: rollout ``b``'s fed latents in position
    order (``n_b`` = its number of latent positions); ``pixel_values`` / ``image_grid_thw`` as the
    processor returns them for all rows' images in row order; ``forced_first_start`` ``[B]`` bool
    (see :func:`~monet.rl.actions.action_masks`).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_start: torch.Tensor
    latents: Sequence[torch.Tensor]
    pixel_values: torch.Tensor | None = None
    image_grid_thw: torch.Tensor | None = None
    forced_first_start: torch.Tensor | None = None


@dataclass
class PolicyLogProbs:
    """Scores of a :class:`RolloutBatch`, all fp32.

    ``text_logp`` / ``latent_logp`` / ``entropy`` ``[B, L]``: the action's log-probability (and the
    text distribution's entropy, detached) at its position, 0 elsewhere. ``mu`` / ``z`` ``[N, D]``:
    latent means (attached to the graph) and recorded latents, rows in row-major order of
    ``masks.latent``. ``masks``: the :class:`~monet.rl.actions.ActionMasks` used."""

    text_logp: torch.Tensor
    latent_logp: torch.Tensor
    entropy: torch.Tensor
    mu: torch.Tensor
    z: torch.Tensor
    masks: ActionMasks = field(repr=False)


def gaussian_logp(z: torch.Tensor, mu: torch.Tensor, sigma: float, *, constant: bool = False) -> torch.Tensor:
    """``log N(z; mu, sigma^2 I)`` per row, fp32: ``z``, ``mu`` ``[N, D]`` -> ``[N]``."""
    if z.shape != mu.shape:
        raise ValueError(f"z {tuple(z.shape)} and mu {tuple(mu.shape)} must have the same shape")
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    diff = z.float() - mu.float()
    out = -(diff * diff).sum(-1) / (2.0 * sigma * sigma)
    if constant:
        out = out - 0.5 * z.shape[-1] * math.log(2.0 * math.pi * sigma * sigma)
    return out


def _stack_latents(latents: Sequence[torch.Tensor], mask: torch.Tensor, hidden_size: int) -> torch.Tensor:
    if len(latents) != mask.shape[0]:
        raise ValueError(f"latents has {len(latents)} entries for {mask.shape[0]} sequences")
    counts = mask.sum(1).tolist()
    for b, (z, n) in enumerate(zip(latents, counts)):
        if not isinstance(z, torch.Tensor) or z.dim() != 2 or z.shape != (n, hidden_size):
            shape = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
            raise ValueError(f"sequence {b}: latents must be [{n}, {hidden_size}] ({n} latent positions), got {shape}")
        if not bool(torch.isfinite(z).all()):
            raise ValueError(f"sequence {b}: latents hold non-finite values")
    if not latents:
        return torch.zeros(0, hidden_size)
    return torch.cat([z.detach().to(mask.device) for z in latents], dim=0)


def _text_only_response(model: Any, ids: torch.Tensor, response: torch.Tensor):
    """``ids`` with generated vision tokens (image/video pads, vision start/end in the response)
    replaced by an ordinary token, so image features and vision positions go to prompt tokens only;
    plus the replaced (rows, cols) or None."""
    cfg = model.config
    special = [getattr(cfg, k, None) for k in ("image_token_id", "video_token_id", "vision_start_token_id",
                                                "vision_end_token_id")]
    special = torch.tensor([int(t) for t in special if t is not None], device=ids.device)
    hit = response & torch.isin(ids, special)
    if not bool(hit.any()):
        return ids, None
    plain = int(ids[~torch.isin(ids, special)].flatten()[0])  # any non-vision token of the batch
    return ids.masked_fill(hit, plain), hit.nonzero(as_tuple=True)


def policy_logprobs(
    model: Any,
    batch: RolloutBatch,
    *,
    layout: SpanLayout,
    token_ids: LatentTokenIds,
    temperature: float,
    sigma: float,
    latent_logp_constant: bool = False,
    masks: ActionMasks | None = None,
) -> PolicyLogProbs:
    """Score ``batch`` under ``model`` (a Qwen2.5-VL model) with one forward of its text model.

    Differentiable w.r.t. the model's parameters (run under ``torch.no_grad()`` for old-policy and
    reference scores). ``masks`` may be passed when already computed for this batch. Memory: the
    text logits are materialised only at text actions, ``[N_text, V]`` fp32.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    ids, am = batch.input_ids, batch.attention_mask
    if masks is None:
        masks = action_masks(ids, am, batch.response_start.to(ids.device), layout=layout, token_ids=token_ids,
                             forced_first_start=batch.forced_first_start)
    # a vision token the policy *generated* is plain text to the decoder (embedded as a token, one
    # position further); only prompt vision tokens take image features and vision positions
    mm_ids, generated_vision = _text_only_response(model, ids, masks.response)
    embeds = embed_multimodal(model, mm_ids, batch.pixel_values, batch.image_grid_thw)
    if generated_vision is not None:
        vb, vp = generated_vision
        embeds = embeds.index_put((vb, vp), model.get_input_embeddings()(ids[vb, vp]).to(embeds.dtype))
    D = embeds.shape[-1]
    z = _stack_latents(batch.latents, masks.latent, D).to(embeds.device)
    lb, lp = masks.latent.nonzero(as_tuple=True)  # row-major, the order of z
    if lb.numel():
        embeds = embeds.index_put((lb, lp), z.to(embeds.dtype))
    positions = mrope_positions(model, mm_ids, am, batch.image_grid_thw)
    hidden, _ = run_text_model(model, embeds, positions, am)

    B, L = ids.shape
    zeros = torch.zeros(B, L, dtype=torch.float32, device=hidden.device)
    tb, tp = masks.text.nonzero(as_tuple=True)
    logits = model.get_output_embeddings()(hidden[tb, tp - 1]).float() / temperature  # [N_text, V]
    logsm = torch.log_softmax(logits, dim=-1)
    text = logsm.gather(-1, ids[tb, tp].unsqueeze(-1)).squeeze(-1)
    with torch.no_grad():  # logged only; entr(0) = 0 where a probability underflows
        ent = torch.special.entr(logsm.exp()).sum(-1)
    mu = hidden[lb, lp - 1].float()
    lat = gaussian_logp(z.float(), mu, sigma, constant=latent_logp_constant)
    return PolicyLogProbs(
        text_logp=zeros.index_put((tb, tp), text),
        latent_logp=zeros.index_put((lb, lp), lat),
        entropy=zeros.index_put((tb, tp), ent),
        mu=mu,
        z=z.float(),
        masks=masks,
    )
