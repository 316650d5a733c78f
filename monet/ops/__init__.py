"""Latent ops: validated Python wrappers over the native kernels (``torch.ops.monet.*``).

Each op has a pure-PyTorch reference in :mod:`monet.ops.reference` that defines its semantics and
is used (with a one-time warning) when the extension is not built. Shapes: N rows, S slots
(requests), D hidden, B batch, L sequence length. Validation here checks dtype, device and shape
(free) and, when ``check_indices=True``, index ranges (one host read; pass False on hot GPU paths).

The decode ops take the span layout as a :class:`~monet.layout.SpanLayout`; the native ops receive
its integers (``latent_size`` and, for ``latent_advance_``, ``counter_on_start``: K in monet-v1,
K + 1 in standard), so no span arithmetic is repeated here. ``latent_scatter`` is differentiable as
an op: its backward (itself differentiable) is registered with ``torch.library.register_autograd``
when the extension loads (:mod:`monet.ops.native`).
"""

from __future__ import annotations

import torch

from monet.layout import FORCE_START, SpanLayout
from monet.ops import native, reference
from monet.ops.reference import (
    KIND_HELPER_IMAGE,
    KIND_LATENT,
    KIND_PAD,
    KIND_QUESTION_IMAGE,
    KIND_TEXT,
)

__all__ = [
    "latent_embed_",
    "latent_advance_",
    "latent_scatter",
    "latent_segments",
    "latent_attention_mask",
    "native_available",
    "KIND_TEXT",
    "KIND_QUESTION_IMAGE",
    "KIND_HELPER_IMAGE",
    "KIND_LATENT",
    "KIND_PAD",
]

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def native_available() -> bool:
    return native.available()


def _use_native(force_reference: bool) -> bool:
    if force_reference:
        return False
    if native.available():
        return True
    native.warn_fallback()
    return False


def _need(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def _same_device(device: torch.device, **tensors: torch.Tensor | None) -> None:
    for name, t in tensors.items():
        if t is not None and t.device != device:
            raise ValueError(f"{name} is on {t.device}, expected {device}")


def _index_tensor(t: torch.Tensor, name: str, n: int, dtype: torch.dtype) -> None:
    _need(t.dim() == 1 and t.shape[0] == n, f"{name} must be 1-D of length {n}, got shape {tuple(t.shape)}")
    _need(t.dtype == dtype, f"{name} must be {dtype}, got {t.dtype}")


def _rows(t: torch.Tensor, name: str, d: int | None = None) -> None:
    _need(t.dim() == 2, f"{name} must be 2-D [rows, hidden], got shape {tuple(t.shape)}")
    _need(t.dtype in _FLOAT_DTYPES, f"{name} must be a floating dtype, got {t.dtype}")
    if d is not None:
        _need(t.shape[1] == d, f"{name} has hidden size {t.shape[1]}, expected {d}")
    _need(t.shape[1] <= 1 or t.stride(1) == 1, f"{name} rows must be contiguous (stride(1) == 1)")


def _check_slots(slots: torch.Tensor, num_slots: int) -> None:
    if slots.numel():
        lo, hi = int(slots.min()), int(slots.max())
        _need(lo >= -1 and hi < num_slots, f"slots must lie in [-1, {num_slots}), got range [{lo}, {hi}]")


def _check_counters(remaining: torch.Tensor) -> None:
    # Only the lower bound: one counter tensor may serve requests of different latent sizes.
    if remaining.numel():
        lo = int(remaining.min())
        _need(lo >= FORCE_START, f"remaining must be >= {FORCE_START} (FORCE_START), got minimum {lo}")


def _check_layout(layout: object) -> SpanLayout:
    if not isinstance(layout, SpanLayout):
        raise TypeError(f"layout must be a monet.layout.SpanLayout, got {type(layout).__name__} {layout!r}")
    return layout


def latent_embed_(
    out: torch.Tensor,
    token_ids: torch.Tensor,
    slots: torch.Tensor,
    remaining: torch.Tensor,
    prev_hidden: torch.Tensor,
    embed_weight: torch.Tensor | None,
    layout: SpanLayout,
    *,
    check_indices: bool = True,
    force_reference: bool = False,
) -> torch.Tensor:
    """Decode pre-forward: fill the input-embedding rows of a step in place.

    ``out[n] = prev_hidden[slots[n]]`` where that slot's next input is a latent
    (``layout.is_latent_input(remaining[slot])``, i.e. ``1 <= remaining <= K``), else
    ``embed_weight[token_ids[n]]`` (text mode 0, FORCE_START -1 and just-emitted START K + 1 all embed
    the token); with ``embed_weight=None`` non-latent rows are left as they are (e.g. already merged
    with image features). ``slots[n] = -1`` marks a row that belongs to no latent-tracked request.

    Args: out [N, D]; token_ids [N] int64; slots [N] int64; remaining [S] int32;
    prev_hidden [S, D]; embed_weight [V, D] or None; layout (only its ``latent_size`` matters here).
    Returns ``out``.

    ``check_indices=False`` is the hot path: the Python checks are skipped and the kernel's own
    shape/dtype checks (``RuntimeError: monet: ...``) remain.
    """
    K = _check_layout(layout).latent_size
    if not check_indices and not force_reference and native.available():
        torch.ops.monet.latent_embed_(out, token_ids, slots, remaining, prev_hidden, embed_weight, K)
        return out
    _rows(out, "out")
    d = out.shape[1]
    _rows(prev_hidden, "prev_hidden", d)
    _need(prev_hidden.dtype == out.dtype, f"prev_hidden dtype {prev_hidden.dtype} differs from out dtype {out.dtype}")
    _index_tensor(token_ids, "token_ids", out.shape[0], torch.int64)
    _index_tensor(slots, "slots", out.shape[0], torch.int64)
    _index_tensor(remaining, "remaining", prev_hidden.shape[0], torch.int32)
    if embed_weight is not None:
        _rows(embed_weight, "embed_weight", d)
        _need(embed_weight.dtype == out.dtype, f"embed_weight dtype {embed_weight.dtype} differs from out dtype {out.dtype}")
    _same_device(out.device, token_ids=token_ids, slots=slots, remaining=remaining,
                 prev_hidden=prev_hidden, embed_weight=embed_weight)
    if check_indices:
        _check_slots(slots, prev_hidden.shape[0])
        _check_counters(remaining)
        if embed_weight is not None and token_ids.numel():
            lo, hi = int(token_ids.min()), int(token_ids.max())
            _need(lo >= 0 and hi < embed_weight.shape[0],
                  f"token_ids must lie in [0, {embed_weight.shape[0]}), got range [{lo}, {hi}]")
    if _use_native(force_reference):
        torch.ops.monet.latent_embed_(out, token_ids.contiguous(), slots.contiguous(), remaining,
                                      prev_hidden, embed_weight, K)
    else:
        reference.latent_embed_(out, token_ids, slots, remaining, prev_hidden, embed_weight, layout)
    return out


def latent_advance_(
    tokens: torch.Tensor,
    hidden: torch.Tensor,
    slots: torch.Tensor,
    remaining: torch.Tensor,
    prev_hidden: torch.Tensor,
    *,
    start_id: int,
    pad_id: int,
    end_id: int,
    layout: SpanLayout,
    check_indices: bool = True,
    force_reference: bool = False,
) -> torch.Tensor:
    """Decode post-sample: run the span state machine (:meth:`SpanLayout.advance`) for one step.

    Per row with ``slots[b] >= 0``: a slot at FORCE_START (-1) emits START and its counter becomes
    ``layout.counter_on_start``; inside spans ``tokens`` is forced to PAD/END; a sampled START opens
    a span. Updates ``remaining`` and stores this step's hidden row into ``prev_hidden[slot]`` when
    the slot's next input is a latent. One call, no host synchronisation (with
    ``check_indices=False``). Rows must name distinct slots; ``slots[b] = -1`` skips a row.

    Args: tokens [B] int64 (in place); hidden [B, D]; slots [B] int64; remaining [S] int32
    (in place); prev_hidden [S, D] contiguous (in place). Returns ``tokens``.
    ``check_indices=False``: hot path as in :func:`latent_embed_`.
    """
    _check_layout(layout)
    K, on_start = layout.latent_size, layout.counter_on_start
    if not check_indices and not force_reference and native.available():
        torch.ops.monet.latent_advance_(tokens, hidden, slots, remaining, prev_hidden,
                                        start_id, pad_id, end_id, K, on_start)
        return tokens
    _need(tokens.dim() == 1 and tokens.dtype == torch.int64, f"tokens must be int64 [B], got {tokens.dtype} {tuple(tokens.shape)}")
    _rows(prev_hidden, "prev_hidden")
    _need(prev_hidden.is_contiguous(), "prev_hidden must be contiguous")
    _rows(hidden, "hidden", prev_hidden.shape[1])
    _need(hidden.shape[0] == tokens.shape[0], f"hidden has {hidden.shape[0]} rows but tokens has {tokens.shape[0]}")
    _need(hidden.dtype == prev_hidden.dtype, f"hidden dtype {hidden.dtype} differs from prev_hidden dtype {prev_hidden.dtype}")
    _index_tensor(slots, "slots", tokens.shape[0], torch.int64)
    _index_tensor(remaining, "remaining", prev_hidden.shape[0], torch.int32)
    _same_device(tokens.device, hidden=hidden, slots=slots, remaining=remaining, prev_hidden=prev_hidden)
    if check_indices:
        _check_slots(slots, prev_hidden.shape[0])
        _check_counters(remaining)
    if _use_native(force_reference):
        torch.ops.monet.latent_advance_(tokens, hidden, slots.contiguous(), remaining, prev_hidden,
                                        start_id, pad_id, end_id, K, on_start)
    else:
        reference.latent_advance_(tokens, hidden, slots, remaining, prev_hidden, start_id, pad_id,
                                  end_id, layout)
    return tokens


def _check_scatter(emb: torch.Tensor, hidden: torch.Tensor, mask: torch.Tensor) -> None:
    _need(emb.dim() == 3, f"emb must be [B, L, D], got shape {tuple(emb.shape)}")
    _need(hidden.shape == emb.shape, f"hidden shape {tuple(hidden.shape)} differs from emb shape {tuple(emb.shape)}")
    _need(hidden.dtype == emb.dtype, f"hidden dtype {hidden.dtype} differs from emb dtype {emb.dtype}")
    _need(mask.shape == emb.shape[:2], f"mask must be [B, L] = {tuple(emb.shape[:2])}, got {tuple(mask.shape)}")
    _need(mask.dtype == torch.bool, f"mask must be bool, got {mask.dtype}")
    _same_device(emb.device, hidden=hidden, mask=mask)


def latent_scatter(
    emb: torch.Tensor,
    hidden: torch.Tensor,
    mask: torch.Tensor,
    *,
    check_indices: bool = True,
    force_reference: bool = False,
) -> torch.Tensor:
    """Training: insert fed-back hidden states at latent positions, differentiably.

    ``out[b, p] = hidden[b, p - 1] if mask[b, p] else emb[b, p]``. Gradients flow to both ``emb``
    (non-latent rows) and ``hidden`` (the rows just before latent positions): natively through the
    autograd formula registered for ``torch.ops.monet.latent_scatter``, in the fallback through the
    reference's differentiable torch ops.

    Args: emb [B, L, D]; hidden [B, L, D]; mask [B, L] bool. Returns [B, L, D].
    """
    _check_scatter(emb, hidden, mask)
    if check_indices and mask.shape[1] and bool(mask[:, 0].any()):
        rows = mask[:, 0].nonzero().flatten().tolist()
        raise ValueError(f"mask is set at position 0 of batch rows {rows}: a latent needs a previous position")
    if _use_native(force_reference):
        return torch.ops.monet.latent_scatter(emb.contiguous(), hidden.contiguous(), mask.contiguous())
    return reference.latent_scatter(emb, hidden, mask)


def latent_segments(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    answer_start: torch.Tensor | int,
    *,
    vision_start_id: int,
    vision_end_id: int,
    latent_start_id: int,
    latent_pad_id: int,
    force_reference: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token kind and step of a padded batch (see :func:`monet.ops.reference.latent_segments`).

    Args: input_ids [B, L] int64; attention_mask [B, L] (nonzero = real token) or None;
    answer_start [B] int64 or an int for every row (first position of the assistant turn).
    Returns ``kind`` [B, L] int8 (``KIND_*``) and ``step`` [B, L] int32 (-1 where not helper/latent).
    Image pad tokens need no id: they are recognised by the enclosing vision_start/vision_end.
    """
    _need(input_ids.dim() == 2, f"input_ids must be [B, L], got shape {tuple(input_ids.shape)}")
    _need(input_ids.dtype == torch.int64, f"input_ids must be int64, got {input_ids.dtype}")
    B = input_ids.shape[0]
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    _need(attention_mask.shape == input_ids.shape,
          f"attention_mask shape {tuple(attention_mask.shape)} differs from input_ids shape {tuple(input_ids.shape)}")
    if isinstance(answer_start, int):
        answer_start = torch.full((B,), answer_start, dtype=torch.int64, device=input_ids.device)
    _index_tensor(answer_start, "answer_start", B, torch.int64)
    _same_device(input_ids.device, attention_mask=attention_mask, answer_start=answer_start)
    args = (vision_start_id, vision_end_id, latent_start_id, latent_pad_id)
    if _use_native(force_reference):
        return torch.ops.monet.latent_segments(input_ids.contiguous(), attention_mask.long().contiguous(),
                                               answer_start.contiguous(), *args)
    return reference.latent_segments(input_ids, attention_mask, answer_start, *args)


def latent_attention_mask(
    kind: torch.Tensor,
    step: torch.Tensor,
    dtype: torch.dtype | None = None,
    *,
    out: torch.Tensor | None = None,
    force_reference: bool = False,
) -> torch.Tensor:
    """Stage-2 attention mask ``[B, 1, L, L]`` from :func:`latent_segments` output.

    ``dtype=None`` gives bool (True = may attend); a floating dtype gives an additive mask
    (0 / ``finfo(dtype).min``) ready for SDPA / eager attention. ``out`` reuses a buffer.
    """
    _need(kind.dim() == 2 and kind.dtype == torch.int8, f"kind must be int8 [B, L], got {kind.dtype} {tuple(kind.shape)}")
    _need(step.shape == kind.shape and step.dtype == torch.int32, "step must be int32 with kind's shape")
    _same_device(kind.device, step=step)
    if dtype is not None:
        _need(dtype.is_floating_point, f"dtype must be None (bool) or floating, got {dtype}")
    if out is not None:
        B, L = kind.shape
        _need(tuple(out.shape) == (B, 1, L, L), f"out must be [B, 1, L, L] = {(B, 1, L, L)}, got {tuple(out.shape)}")
        _need(out.dtype == (dtype or torch.bool), f"out dtype {out.dtype} differs from {dtype or torch.bool}")
        _need(out.is_contiguous(), "out must be contiguous")
    if _use_native(force_reference):
        if out is None:
            return torch.ops.monet.latent_attention_mask(kind.contiguous(), step.contiguous(), dtype)
        torch.ops.monet.latent_attention_mask.out(kind.contiguous(), step.contiguous(), out=out)
        return out
    result = reference.latent_attention_mask(kind, step, dtype)
    if out is None:
        return result
    return out.copy_(result)
