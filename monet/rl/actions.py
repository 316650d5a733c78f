"""Which positions of a rollout are actions of the policy, and of which kind.

A rollout is ``prompt + response`` token ids. Position ``p`` holds token ``t_p``; its *input* is
``embed(t_p)``, or a latent vector for the positions :meth:`SpanLayout.latent_input_mask` marks.
Two kinds of action, each scored from the hidden state ``h[p - 1]`` of the previous position:

* **text action** at ``p``: the response token ``t_p`` was *sampled* (from
  ``softmax(lm_head(h[p - 1]) / T)``). Tokens the decoder *forces* — ``PAD`` and ``END`` inside a
  span, and a ``START`` forced because the prompt ended with START — are not actions.
* **latent action** at ``p``: the latent ``z_p`` fed as input at ``p`` (policy ``N(h[p - 1], sigma^2 I)``).

Per span opened by a START at ``s`` (K latents)::

    standard:  s: text(START)              s+1..s+K: latent (PADs)   s+K+1: END (forced, nothing)
    monet-v1:  s: text(START) + latent     s+1..s+K-1: latent (PADs) s+K:   END (forced, nothing)

(a START forced at the start of the response drops its text term, keeps its latents). Forced
tokens are found by replaying the decoder's span state machine (:meth:`SpanLayout.advance`) over the
response, which also checks that the ids are ones the decoder can have produced.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from monet.layout import FORCE_START, SpanLayout
from monet.tokens import LatentTokenIds


@dataclass(frozen=True)
class ActionMasks:
    """``[B, L]`` bool masks: ``text`` and ``latent`` actions, ``forced`` decoder-forced response
    tokens, ``response`` valid response positions (``text | forced == response``)."""

    text: torch.Tensor
    latent: torch.Tensor
    forced: torch.Tensor
    response: torch.Tensor


def _check_ids(input_ids: torch.Tensor, attention_mask: torch.Tensor, response_start: torch.Tensor) -> None:
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [B, L], got shape {tuple(input_ids.shape)}")
    B, L = input_ids.shape
    if attention_mask.shape != (B, L):
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected {(B, L)}")
    if response_start.shape != (B,):
        raise ValueError(f"response_start has shape {tuple(response_start.shape)}, expected {(B,)}")
    am = attention_mask.bool()
    lengths = am.sum(1)
    # right padding only: valid positions are a prefix of each row
    if bool((am != (torch.arange(L, device=am.device)[None] < lengths[:, None])).any()):
        b = int((am != (torch.arange(L, device=am.device)[None] < lengths[:, None])).any(1).nonzero()[0])
        raise ValueError(f"sequence {b}: attention_mask is not right-padded (valid positions must come first)")
    for b in range(B):
        P, n = int(response_start[b]), int(lengths[b])
        if not 1 <= P <= n:
            raise ValueError(f"sequence {b}: response_start {P} must be in [1, {n}] (a non-empty prompt)")


def action_masks(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    response_start: torch.Tensor,
    *,
    layout: SpanLayout,
    token_ids: LatentTokenIds,
    forced_first_start: torch.Tensor | None = None,
) -> ActionMasks:
    """Action masks of a right-padded batch of rollouts.

    ``input_ids`` ``[B, L]`` prompt + response; ``attention_mask`` ``[B, L]`` (right padding);
    ``response_start`` ``[B]`` index of the first response token (= prompt length);
    ``forced_first_start`` ``[B]`` bool: the prompt ended with START, which the engine stripped and
    forced as the first response token (so that START is not an action).

    Raises ``ValueError`` naming the sequence and position when the prompt holds a START (prompt
    spans carry no recorded latents) or a forced position holds a token the decoder would not have
    forced.
    """
    _check_ids(input_ids, attention_mask, response_start)
    B, L = input_ids.shape
    dev = input_ids.device
    if forced_first_start is None:
        forced_first_start = torch.zeros(B, dtype=torch.bool)
    if forced_first_start.shape != (B,):
        raise ValueError(f"forced_first_start has shape {tuple(forced_first_start.shape)}, expected {(B,)}")
    valid = attention_mask.bool()
    pos = torch.arange(L, device=dev)
    response = valid & (pos[None] >= response_start.to(dev)[:, None])
    latent = layout.latent_input_mask(input_ids, start_id=token_ids.start) & valid

    forced = torch.zeros(B, L, dtype=torch.bool)
    ids_cpu, lengths = input_ids.tolist(), valid.sum(1).tolist()
    for b in range(B):
        P, n, row = int(response_start[b]), int(lengths[b]), ids_cpu[b]
        if token_ids.start in row[:P]:
            p = row[:P].index(token_ids.start)
            raise ValueError(f"sequence {b}: the prompt holds START at position {p}; prompts with latent spans "
                             "are not supported (their latents are not recorded). A prompt that ends with START "
                             "must pass it as the first response token with forced_first_start=True")
        r, p = (FORCE_START if bool(forced_first_start[b]) else 0), P
        while p < n:
            if r == 0:  # text mode: advance() keeps the state until a START, so jump to the next one
                try:
                    p = row.index(token_ids.start, p, n)
                except ValueError:
                    break
            emitted, r_next = layout.advance(r, row[p], start_id=token_ids.start, pad_id=token_ids.pad,
                                             end_id=token_ids.end)
            if r != 0:
                if emitted != row[p]:
                    raise ValueError(f"sequence {b}, position {p}: the decoder forces token {emitted} here "
                                     f"(span state {r}), but the rollout has {row[p]}")
                forced[b, p] = True
            r, p = r_next, p + 1
    forced = forced.to(dev)
    return ActionMasks(text=response & ~forced, latent=latent, forced=forced, response=response)
