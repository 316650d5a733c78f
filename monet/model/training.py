"""The latent training forward: gradient-equivalent to a sequential latent loop, in three passes.

A training sequence holds latent positions (mask ``latent_mask[b, p]``): the input there is the
final-norm hidden state of position ``p - 1`` (docs/design.md, sections 2 and 5). Computing those sequentially
with autograd (what the research code does: one KV-cached forward per latent step) is slow and
memory-hungry. Here:

1. **Decode** (no grad): the latent values ``z`` are computed batched and KV-cached, one call per
   latent index (every row advances to its next latent; ragged chunks padded with masked dummies);
   every chunk uses the stage mask.
2. **Latent pass** (grad): one teacher-forced forward over the prefix that ends at the last latent,
   inputs ``z`` (detached) at latent positions, stage mask; ``z~ = h[p - 1]`` is attached to the graph
   and numerically equal to ``z``.
3. **Loss pass** (grad): one forward with ``z~`` inserted at the latent positions (``latent_scatter``),
   stage mask, gradient checkpointing allowed.

Each latent receives its gradient through the computation of ``h[p - 1]`` given the earlier inputs;
the earlier latents inside that computation are treated as constants (the feedback is detached),
exactly like the sequential reference ``tests/latent_reference.py:sequential_latent_forward``.

Backward memory: the latent pass and the loss pass use the same weights. In one autograd graph the
engine buffers each weight's loss-pass gradient until the latent pass's contribution arrives, i.e.
a full extra copy of the language model's gradients lives through the loss pass's backward. By
default (``latent_backward="nested"``) the latent pass therefore runs in its own graph, backpropagated
by a nested backward call when the loss pass's backward reaches it (the mechanism of reentrant
checkpointing), so each pass accumulates straight into ``.grad``. Consequences: weights receive two
gradient accumulations per step (``.backward()`` only — ``torch.autograd.grad`` does not see the
latent pass's weight gradients — and no hooks that expect one gradient per step, e.g. DeepSpeed
ZeRO's reduction hooks: use ``latent_backward="joint"`` there). Under bf16 autocast the two modes agree
to bf16 rounding (joint sums both passes' gradients of autocast's cached bf16 weight copies in bf16,
nested per pass).

Shapes: B batch, L length, D hidden, N latent positions, P captured positions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

from monet import ops
from monet.model.forward import HiddenCapture, embed_multimodal, mrope_positions, run_text_model

AttentionKind = Literal["causal", "stage2"]
LatentBackward = Literal["nested", "joint"]


@dataclass
class LatentBatch:
    """A padded training batch (right padding).

    ``latent_mask`` [B, L] bool marks positions whose input is a latent. ``attention="stage2"``
    uses the helper-image mask of docs/design.md section 4 (needs ``answer_start`` [B] to tell question
    images from helper images, or the ``kind``/``step`` metadata of :func:`monet.ops.latent_segments`
    when the collator already computed it); ``"causal"`` is plain causal with padding.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    latent_mask: torch.Tensor
    pixel_values: torch.Tensor | None = None
    image_grid_thw: torch.Tensor | None = None
    attention: AttentionKind = "causal"
    answer_start: torch.Tensor | None = None
    kind: torch.Tensor | None = None  # [B, L] int8, stage 2
    step: torch.Tensor | None = None  # [B, L] int32, stage 2

    def to(self, device: torch.device | str) -> "LatentBatch":
        move = lambda t: t.to(device) if isinstance(t, torch.Tensor) else t  # noqa: E731
        return LatentBatch(**{k: move(v) for k, v in self.__dict__.items()})


@dataclass
class LatentForwardOutput:
    """``hidden`` [B, L, D] final-norm states of the loss pass. ``latents`` [N, D] the inserted
    ``z~`` (row-major order of ``latent_mask``), attached to the graph. ``latent_source`` [B, Lp, D]
    the latent-pass hidden states ``z~`` were taken from (route extra gradients into it with
    ``torch.autograd.grad``). ``captured`` [layers, P, D] all-layer states at the requested
    positions (or None)."""

    hidden: torch.Tensor
    latents: torch.Tensor
    latent_source: torch.Tensor | None
    captured: torch.Tensor | None


def ids_for_model(model: Any):
    """Token ids the stage mask needs, from the model config."""
    cfg = model.config
    ids = model.monet_config.token_ids
    return dict(vision_start_id=cfg.vision_start_token_id, vision_end_id=cfg.vision_end_token_id,
                latent_start_id=ids.start, latent_pad_id=ids.pad)


def attention_mask_4d(model: Any, batch: LatentBatch, dtype: torch.dtype) -> torch.Tensor:
    """Additive ``[B, 1, L, L]`` mask of the batch's attention kind (native op)."""
    ids, am = batch.input_ids, batch.attention_mask
    if batch.attention == "stage2":
        if batch.kind is not None and batch.step is not None:
            kind, step = batch.kind, batch.step
        elif batch.answer_start is None:
            raise ValueError("attention='stage2' needs answer_start (first position of the assistant turn per row)")
        else:
            kind, step = ops.latent_segments(ids, am, batch.answer_start, **ids_for_model(model))
    elif batch.attention == "causal":
        kind = torch.where(am.bool(), ops.KIND_TEXT, ops.KIND_PAD).to(torch.int8)
        step = torch.full_like(ids, -1, dtype=torch.int32)
    else:
        raise ValueError(f"attention must be 'causal' or 'stage2', got {batch.attention!r}")
    return ops.latent_attention_mask(kind, step, dtype)


def _check_batch(batch: LatentBatch) -> None:
    B, L = batch.input_ids.shape
    for name in ("attention_mask", "latent_mask"):
        t = getattr(batch, name)
        if t.shape != (B, L):
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {(B, L)} like input_ids")
    if batch.latent_mask.dtype != torch.bool:
        raise ValueError(f"latent_mask must be bool, got {batch.latent_mask.dtype}")
    if L and bool(batch.latent_mask[:, 0].any()):
        raise ValueError("latent_mask is set at position 0: a latent needs a previous position")
    if bool((batch.latent_mask & ~batch.attention_mask.bool()).any()):
        raise ValueError("latent_mask is set on padding positions")


def _latent_columns(latent_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, its latent positions in order: ``cols`` [B, J] (padded with L) and ``counts`` [B]."""
    B, L = latent_mask.shape
    counts = latent_mask.sum(1)
    J = int(counts.max()) if B else 0
    cols = torch.full((B, J), L, dtype=torch.long, device=latent_mask.device)
    b, p = latent_mask.nonzero(as_tuple=True)
    rank = latent_mask.long().cumsum(1)[b, p] - 1
    cols[b, rank] = p
    return cols, counts


@torch.no_grad()
def decode_latents(
    model: Any, embeds: torch.Tensor, positions: torch.Tensor, mask4d: torch.Tensor, latent_mask: torch.Tensor,
    min_steps: int = 0,
) -> torch.Tensor:
    """Pass 1: sequential latent values, batched and KV-cached. Returns embeds with ``z`` written
    at the latent positions ([B, L, D], no graph).

    Step ``j`` runs, for every row at once, that row's tokens from its previous latent up to (not
    including) its ``j``-th latent, so a batch needs ``max_b(#latents_b)`` forward calls wherever its
    rows' latents sit. Rows' chunks have different lengths: they are right-padded with dummy tokens
    that no query may attend to (and that attend only to themselves); the KV cache therefore holds,
    per row, real positions interleaved with dummies, tracked in ``slot_pos`` (-1 = dummy), and each
    step's mask is gathered from the stage mask at the real positions.

    ``min_steps``: run at least this many steps; the extra ones feed one dummy token per row and
    change nothing. For DeepSpeed ZeRO-3, where every model call gathers parameters collectively,
    so all ranks must make the same number of calls.
    """
    embeds = embeds.detach().clone()
    cols, counts = _latent_columns(latent_mask)
    n_steps = max(cols.shape[1], min_steps)
    if n_steps == 0:
        return embeds
    allowed = mask4d[:, 0] if mask4d.dtype == torch.bool else mask4d[:, 0] == 0  # [B, L, L]
    B, dev = embeds.shape[0], embeds.device
    rows = torch.arange(B, device=dev)
    prev_end = torch.zeros(B, dtype=torch.long, device=dev)
    slot_pos = torch.empty(B, 0, dtype=torch.long, device=dev)
    cache = None
    lm = model.model.language_model
    was_training = lm.training
    lm.eval()  # gradient-checkpointed layers drop the KV cache in training mode; this pass has no grad
    try:
        for j in range(n_steps):
            active = j < counts
            end = torch.where(active, cols[:, min(j, cols.shape[1] - 1)], prev_end) if cols.shape[1] else prev_end
            lens = end - prev_end  # 0 for rows that are done
            T = max(int(lens.max()), 1)  # a step past every row's last latent feeds one dummy per row
            t = torch.arange(T, device=dev)
            real = t[None, :] < lens[:, None]  # [B, T]
            qpos = torch.where(real, prev_end[:, None] + t[None, :], -1)
            q = qpos.clamp(min=0)
            x = embeds[rows[:, None], q] * real[..., None].to(embeds.dtype)
            pos = positions[:, rows[:, None], q]
            slot_pos = torch.cat([slot_pos, qpos], dim=1)
            S = slot_pos.shape[1]
            m = allowed[rows[:, None, None], q[:, :, None], slot_pos.clamp(min=0)[:, None, :]]
            m &= (slot_pos >= 0)[:, None, :] & real[:, :, None]
            own = torch.arange(S, device=dev)[None, None, :] == (S - T + t)[None, :, None]
            m |= ~real[:, :, None] & own  # dummy queries see only themselves (no empty softmax row)
            hidden, cache = run_text_model(model, x, pos, m[:, None], past_key_values=cache, use_cache=True)
            last = hidden[rows, (lens - 1).clamp(min=0)]
            embeds[rows[active], end[active]] = last[active]
            prev_end = end
    finally:
        lm.train(was_training)
    return embeds


class _NestedBackward(torch.autograd.Function):
    """``run(x)`` in a graph of its own; its backward is a nested ``torch.autograd.backward``.

    Forward: ``x`` [B, T, D] -> ``run(x)`` detached; backward: backpropagate the stored graph
    (parameter gradients accumulate into ``.grad`` there) and return ``x``'s gradient. ``anchor``
    is a scalar that requires grad: it makes the output require grad (so backward reaches this node)
    even when ``x`` does not, e.g. with frozen embeddings and vision tower but trainable layers."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, anchor: torch.Tensor, run) -> torch.Tensor:
        inner = x.detach().requires_grad_(x.requires_grad)
        with torch.enable_grad():
            out = run(inner)
        ctx.graph = (inner, out)
        return out.detach()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        if ctx.graph is None:
            raise RuntimeError("latent_forward(latent_backward='nested') cannot be backpropagated twice; "
                               "use latent_backward='joint' for retain_graph / repeated backward")
        inner, out = ctx.graph
        ctx.graph = None  # frees the latent pass's graph with this call
        if out.requires_grad:
            with torch.enable_grad():
                torch.autograd.backward(out, grad)
        return (inner.grad if inner.requires_grad else None), None, None


def latent_forward(
    model: Any,
    batch: LatentBatch,
    *,
    capture: tuple[torch.Tensor, torch.Tensor] | None = None,
    capture_layers: list[int] | None = None,
    latent_backward: LatentBackward = "nested",
    min_decode_steps: int = 0,
) -> LatentForwardOutput:
    """Training forward with latents (the three passes of the module docstring).

    ``capture=(batch_index [P], position [P])`` also returns all-layer hidden states at those
    positions (layer 0 = embeddings ... last = final norm; ``capture_layers`` selects a subset).
    ``latent_backward``: ``"nested"`` (default; lower backward peak memory, ``.backward()`` only)
    or ``"joint"`` (one graph; for ``torch.autograd.grad`` and DeepSpeed ZeRO) — module docstring.
    ``min_decode_steps``: see :func:`decode_latents` (DeepSpeed ZeRO-3 lockstep).
    """
    if latent_backward not in ("nested", "joint"):
        raise ValueError(f"latent_backward must be 'nested' or 'joint', got {latent_backward!r}")
    _check_batch(batch)
    ids, am = batch.input_ids, batch.attention_mask
    embeds = embed_multimodal(model, ids, batch.pixel_values, batch.image_grid_thw)
    positions = mrope_positions(model, ids, am, batch.image_grid_thw)
    mask4d = attention_mask_4d(model, batch, embeds.dtype)
    lmask = batch.latent_mask
    cap = HiddenCapture(capture[0], capture[1], capture_layers) if capture is not None else None

    if not bool(lmask.any()):
        hidden, _ = run_text_model(model, embeds, positions, mask4d, capture=cap)
        return LatentForwardOutput(hidden, embeds.new_zeros(0, embeds.shape[-1]), None,
                                   cap.stacked() if cap else None)

    last = int(lmask.any(0).nonzero().max())  # latent pass needs h up to position last - 1
    z = decode_latents(model, embeds, positions, mask4d, lmask, min_decode_steps)  # detached values
    latent_in = torch.where(lmask.unsqueeze(-1), z, embeds)  # non-latent rows keep their graph

    def latent_pass(x: torch.Tensor) -> torch.Tensor:  # [B, last, D] -> [B, last, D]
        return run_text_model(model, x, positions[:, :, :last], mask4d[:, :, :last, :last])[0]

    if latent_backward == "nested" and torch.is_grad_enabled():
        anchor = torch.zeros((), requires_grad=True)
        src = _NestedBackward.apply(latent_in[:, :last], anchor, latent_pass)
    else:
        src = latent_pass(latent_in[:, :last])
    src_full = torch.nn.functional.pad(src, (0, 0, 0, ids.shape[1] - last))
    loss_inputs = ops.latent_scatter(embeds, src_full, lmask)
    hidden, _ = run_text_model(model, loss_inputs, positions, mask4d, capture=cap)
    b, p = lmask.nonzero(as_tuple=True)
    latents = src[b, p - 1]
    return LatentForwardOutput(hidden, latents, src, cap.stacked() if cap else None)
