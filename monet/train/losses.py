"""SFT losses (docs/design.md, section 4): weighted CE without full-vocabulary logits, alignment, and the
latent-only routing of the stage-2 alignment gradient.

Shapes: B batch, L length, D hidden, V vocabulary, M target positions, P aligned positions.
"""

from __future__ import annotations

import math
from typing import Literal, Union

import torch
from torch.utils.checkpoint import checkpoint

AlignmentAxis = Literal["hidden", "token"]


#: The output projection: the weight [V, D] itself, or the module that applies it ([c, D] -> [c, V]).
Head = Union[torch.Tensor, torch.nn.Module]


def _ce_chunk(hidden: torch.Tensor, head: Head, targets: torch.Tensor) -> torch.Tensor:
    if isinstance(head, torch.Tensor):
        logits = hidden.float() @ head.float().t()  # [c, V] fp32
    else:  # a module call, so its forward hooks run here (and again in the checkpoint's recomputation)
        logits = head(hidden).float()  # [c, V] in the head's dtype, then fp32
    return torch.nn.functional.cross_entropy(logits, targets, reduction="none")


def _head_requires_grad(head: Head) -> bool:
    if isinstance(head, torch.Tensor):
        return head.requires_grad
    return any(p.requires_grad for p in head.parameters())


def target_rows(labels: torch.Tensor, weights: torch.Tensor | None = None):
    """Positions that predict a target: ``(batch_index, position_of_predictor, target, weight)``.

    ``labels`` [B, L] are aligned with the input ids (``labels[b, p]`` is the token at ``p``,
    -100 = no target); the prediction of ``labels[b, p]`` comes from position ``p - 1``.
    """
    valid = labels[:, 1:] != -100
    b, p = valid.nonzero(as_tuple=True)
    targets = labels[:, 1:][b, p]
    w = weights[:, 1:][b, p].float() if weights is not None else torch.ones_like(targets, dtype=torch.float32)
    return b, p, targets, w


def weighted_ce_sum(
    hidden: torch.Tensor,
    head: Head,
    labels: torch.Tensor,
    weights: torch.Tensor | None = None,
    *,
    chunk_size: int = 1024,
    min_chunks: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sum(w * ce), sum(w))`` over the valid targets, in fp32.

    Logits are computed ``chunk_size`` rows at a time and recomputed in backward (activation
    checkpointing per chunk), so at most ``chunk_size x V`` logits exist at once. Divide the first
    value by the (global, accumulated) weight sum for the loss.

    ``head``: the output projection weight [V, D] (logits from fp32 copies of hidden and weight:
    fp32 logits whatever the model's dtype), or the output-projection module itself
    (``model.get_output_embeddings()``), which is then *called* on each chunk, in forward and in
    the backward recomputation. The module form is for wrappers that act through module hooks:
    DeepSpeed ZeRO-3 gathers a partitioned weight only inside its module's forward (and before its
    backward), so the weight tensor read outside a forward has no elements. Its logits are in the
    module's dtype (bf16 for a bf16 model) before the fp32 log-softmax; in fp32 the two forms agree.

    ``min_chunks``: compute at least this many chunks (the extra ones are empty: the head is called
    on 0 rows). Under ZeRO-3 every call of the head gathers its weight collectively, so all ranks
    must call it equally often whatever their number of targets.
    """
    b, p, targets, w = target_rows(labels, weights)
    n_chunks = max(math.ceil(targets.numel() / chunk_size), min_chunks)
    if n_chunks == 0:
        return hidden.sum() * 0.0, w.sum()
    rows = hidden[b, p]  # [M, D]
    total = hidden.new_zeros((), dtype=torch.float32)
    for s in range(0, n_chunks * chunk_size, chunk_size):
        h, t = rows[s:s + chunk_size], targets[s:s + chunk_size]
        if torch.is_grad_enabled() and (h.requires_grad or _head_requires_grad(head)):
            ce = checkpoint(_ce_chunk, h, head, t, use_reentrant=False)
        else:
            ce = _ce_chunk(h, head, t)
        total = total + (ce * w[s:s + chunk_size]).sum()
    return total, w.sum()


def alignment_loss(student: torch.Tensor, teacher: torch.Tensor, axis: AlignmentAxis = "hidden") -> torch.Tensor:
    """Mean of ``1 - cos(teacher, student)`` over layers and positions, fp32.

    ``student``/``teacher``: [layers, P, D]. ``axis="hidden"`` (default) takes the cosine over
    the hidden dimension per (layer, position); ``axis="token"`` reproduces the research code, which
    took it over the token axis per (layer, hidden unit).
    """
    if student.shape != teacher.shape:
        raise ValueError(f"student states {tuple(student.shape)} and teacher states {tuple(teacher.shape)} differ "
                         "(layers, positions, hidden)")
    if student.shape[1] == 0:
        return student.sum() * 0.0
    dim = {"hidden": -1, "token": 1}.get(axis)
    if dim is None:
        raise ValueError(f"alignment_axis must be 'hidden' or 'token', got {axis!r}")
    cos = torch.nn.functional.cosine_similarity(student.float(), teacher.float().to(student.device), dim=dim)
    return (1.0 - cos).mean()


def route_through_latents(loss: torch.Tensor, latent_source: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """A surrogate whose gradient w.r.t. the weights equals ``scale x`` the gradient of ``loss``
    that flows through the latents only.

    ``latent_source`` is the tensor the latents were taken from (``LatentForwardOutput.latent_source``).
    The gradient of ``loss`` w.r.t. it is computed now (the loss pass is traversed once), then
    re-injected: ``sum(latent_source * g)``. The loss's direct paths to the weights (through the
    loss pass) contribute nothing. The returned value is ``0 x loss`` plus the surrogate's value;
    log ``loss`` itself.
    """
    if not loss.requires_grad:
        return loss * 0.0
    (g,) = torch.autograd.grad(loss, latent_source, retain_graph=True, allow_unused=True)
    if g is None:
        return loss * 0.0
    return (latent_source * (g.detach() * scale)).sum()
