"""Pure-PyTorch reference implementations of the native latent ops.

These define the semantics; ``monet._C`` must match them exactly. They are also the fallback when
the extension is not built. Shapes: N rows (scheduled tokens), S slots (requests), D hidden size,
B batch, L sequence length. The decode ops take the span layout as a
:class:`~monet.layout.SpanLayout` and use its methods, so the counter rules are stated once there.
"""

from __future__ import annotations

import torch

from monet.layout import SpanLayout

# Per-token kinds produced by latent_segments.
KIND_TEXT = 0
KIND_QUESTION_IMAGE = 1
KIND_HELPER_IMAGE = 2
KIND_LATENT = 3
KIND_PAD = 4


def latent_embed_(
    out: torch.Tensor,  # [N, D], written in place
    token_ids: torch.Tensor,  # [N] int64
    slots: torch.Tensor,  # [N] int64, -1 = row belongs to no latent-tracked request
    remaining: torch.Tensor,  # [S] int32
    prev_hidden: torch.Tensor,  # [S, D]
    embed_weight: torch.Tensor | None,  # [V, D] or None (leave non-latent rows untouched)
    layout: SpanLayout,
) -> None:
    """``out[n] = prev_hidden[slot] if layout.is_latent_input(remaining[slot]) else
    embed_weight[token_ids[n]]``: counters 0, FORCE_START (-1) and K + 1 embed the token."""
    valid = slots >= 0
    s = slots.clamp(min=0)
    latent = valid & layout.is_latent_input(remaining[s]) if s.numel() else valid
    if embed_weight is not None:
        out.copy_(embed_weight[token_ids])
    if latent.any():
        out[latent] = prev_hidden[s[latent]]


def latent_advance_(
    tokens: torch.Tensor,  # [B] int64 sampled ids, forced in place
    hidden: torch.Tensor,  # [B, D] final-norm hidden rows of this step
    slots: torch.Tensor,  # [B] int64, -1 = skip row
    remaining: torch.Tensor,  # [S] int32, updated in place
    prev_hidden: torch.Tensor,  # [S, D], updated in place
    start_id: int,
    pad_id: int,
    end_id: int,
    layout: SpanLayout,
) -> None:
    """Post-sample state machine, row by row with :meth:`SpanLayout.advance`: force START after
    FORCE_START, PAD/END inside spans, open a span on a sampled START; store ``hidden[b]`` in
    ``prev_hidden[slot]`` when the slot's next input is a latent."""
    for b in range(tokens.shape[0]):
        s = int(slots[b])
        if s < 0:
            continue
        tok, r = layout.advance(int(remaining[s]), int(tokens[b]), start_id=start_id, pad_id=pad_id, end_id=end_id)
        tokens[b] = tok
        remaining[s] = r
        if layout.is_latent_input(r):
            prev_hidden[s] = hidden[b]


def latent_scatter(emb: torch.Tensor, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``out[b, p] = hidden[b, p - 1] if mask[b, p] else emb[b, p]`` for [B, L, D] inputs."""
    shifted = torch.cat([torch.zeros_like(hidden[:, :1]), hidden[:, :-1]], dim=1)
    return torch.where(mask.unsqueeze(-1), shifted, emb)


def latent_scatter_backward(grad: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of :func:`latent_scatter` w.r.t. ``emb`` and ``hidden``."""
    m = mask.unsqueeze(-1)
    grad_emb = torch.where(m, torch.zeros_like(grad), grad)
    moved = torch.where(m, grad, torch.zeros_like(grad))
    grad_hidden = torch.cat([moved[:, 1:], torch.zeros_like(moved[:, :1])], dim=1)
    return grad_emb, grad_hidden


def latent_segments(
    input_ids: torch.Tensor,  # [B, L]
    attention_mask: torch.Tensor,  # [B, L], nonzero = real token
    answer_start: torch.Tensor,  # [B] int64, first position of the assistant turn
    vision_start_id: int,
    vision_end_id: int,
    latent_start_id: int,
    latent_pad_id: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token kind ([B, L] int8) and step ([B, L] int32, -1 where not helper/latent).

    Image tokens span ``<|vision_start|> ... <|vision_end|>`` inclusive; those at or after
    ``answer_start`` are helper images (step = index of the helper image in the answer), the rest
    question images. Latent (PAD) tokens in the answer get the index of their span (counting START
    tokens in the answer). Padding (attention_mask == 0) wins over everything. Image pad tokens need
    no id of their own: they are recognised by the enclosing vision_start/vision_end.
    """
    B, L = input_ids.shape
    vs = input_ids == vision_start_id
    ve = input_ids == vision_end_id
    depth = vs.long().cumsum(1) - ve.long().cumsum(1) + ve.long()
    in_image = depth > 0
    pos = torch.arange(L, device=input_ids.device).unsqueeze(0)
    in_answer = pos >= answer_start.to(input_ids.device).unsqueeze(1)
    helper = in_image & in_answer
    question = in_image & ~in_answer
    latent = (input_ids == latent_pad_id) & in_answer & ~in_image
    helper_step = (vs & in_answer).long().cumsum(1) - 1
    latent_step = ((input_ids == latent_start_id) & in_answer).long().cumsum(1) - 1
    pad = attention_mask == 0

    kind = torch.full((B, L), KIND_TEXT, dtype=torch.int8, device=input_ids.device)
    kind[question] = KIND_QUESTION_IMAGE
    kind[helper] = KIND_HELPER_IMAGE
    kind[latent] = KIND_LATENT
    kind[pad] = KIND_PAD
    step = torch.full((B, L), -1, dtype=torch.int32, device=input_ids.device)
    step[helper] = helper_step[helper].int()
    step[latent] = latent_step[latent].int()
    step[pad] = -1
    return kind, step


def latent_attention_mask(
    kind: torch.Tensor, step: torch.Tensor, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Stage-2 attention mask ``[B, 1, L, L]`` (query i, key j).

    Causal, padding keys hidden; a helper-image key of step s is visible only to latent queries of
    step s and helper-image queries of the same image. Padding query rows see only themselves (so
    no softmax row is empty). ``dtype=None`` gives bool (True = attend), else additive (0 / min).
    """
    B, L = kind.shape
    idx = torch.arange(L, device=kind.device)
    causal = idx.view(1, L, 1) >= idx.view(1, 1, L)
    ki, kj = kind.unsqueeze(2), kind.unsqueeze(1)
    si, sj = step.unsqueeze(2), step.unsqueeze(1)
    helper_key = kj == KIND_HELPER_IMAGE
    sees_helper = ((ki == KIND_LATENT) | (ki == KIND_HELPER_IMAGE)) & (si == sj)
    allowed = causal & (kj != KIND_PAD) & (~helper_key | sees_helper)
    pad_row = ki == KIND_PAD
    eye = (idx.view(1, L, 1) == idx.view(1, 1, L))
    allowed = torch.where(pad_row, eye, allowed).unsqueeze(1)
    if dtype is None:
        return allowed
    out = torch.zeros(allowed.shape, dtype=dtype, device=kind.device)
    return out.masked_fill_(~allowed, torch.finfo(dtype).min)
