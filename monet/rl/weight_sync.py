"""Trainer -> engine weight sync in memory, and a probe that the two agree afterwards.

After each optimiser step every rollout engine must decode with the updated policy. The trainer's
parameters (Hugging Face names, e.g. ``model.language_model.layers.0.mlp.up_proj.weight``) go to
every vLLM worker through ``collective_rpc("monet_load_weights", ...)``
(:meth:`monet.vllm.worker.LatentWorker.monet_load_weights`), which calls the served model's own
``load_weights`` (name mapping, fused/sharded layouts); then the engine's prefix cache is reset
(its KV was computed with the old weights). Nothing is written to disk.

Every parameter is sent, frozen ones included: vLLM's in-place reload re-processes each layer
from the weights it is given, and a layer given none would be left unprocessed.

:func:`probe_agreement` checks the result: the engine and the trainer's model decode the same probe
requests greedily (engine vs ``monet.generate``); tokens must match exactly and the latents to a
tolerance. Run it with fp32 models for a bitwise-meaningful check (bf16 kernels differ). With
several rollout engines (the Ray controller's ``rollout_engines``) each engine is compared with the
trainer (:func:`compare_engine_probes`), so a stale engine is named.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Sequence

import torch


def named_weights(model: Any, *, trainable_only: bool = True) -> list[tuple[str, torch.Tensor]]:
    """``[(name, tensor)]``: detached, contiguous CPU copies of the model's parameters (HF names)."""
    out = []
    for name, p in model.named_parameters():
        if trainable_only and not p.requires_grad:
            continue
        out.append((name, p.detach().to("cpu", copy=True).contiguous()))
    if not out:
        raise ValueError("the model has no trainable parameters to sync")
    return out


def pack_weights(weights: Sequence[tuple[str, torch.Tensor]]) -> list[tuple[str, str, list[int], bytes]]:
    """``[(name, dtype name, shape, raw bytes)]``: plain types every RPC transport carries (vLLM's
    msgpack turns tensors nested in argument lists into lists)."""
    out = []
    for name, t in weights:
        t = t.detach().to("cpu").contiguous()
        out.append((name, str(t.dtype).removeprefix("torch."), list(t.shape),
                    t.reshape(-1).view(torch.uint8).numpy().tobytes()))
    return out


def unpack_weights(packed: Sequence[Any]) -> list[tuple[str, torch.Tensor]]:
    """Inverse of :func:`pack_weights` (``(name, tensor)`` pairs pass through); clear errors on
    malformed entries."""
    out = []
    for i, item in enumerate(packed):
        if len(item) == 2 and isinstance(item[1], torch.Tensor):
            out.append((item[0], item[1]))
            continue
        if len(item) != 4:
            raise ValueError(f"weight {i}: expected (name, dtype, shape, bytes), got {len(item)} fields")
        name, dtype, shape, buf = item
        dt = getattr(torch, str(dtype), None)
        if not isinstance(dt, torch.dtype):
            raise ValueError(f"weight {i} ({name}): unknown dtype {dtype!r}")
        raw = torch.frombuffer(bytearray(buf), dtype=torch.uint8) if len(buf) else torch.zeros(0, dtype=torch.uint8)
        n = 1
        for d in shape:
            n *= int(d)
        if raw.numel() != n * torch.empty(0, dtype=dt).element_size():
            raise ValueError(f"weight {i} ({name}): {raw.numel()} bytes do not hold a {dtype} tensor "
                             f"of shape {list(shape)}")
        out.append((name, raw.view(dt).reshape([int(d) for d in shape])))
    return out


def weights_nbytes(weights: Sequence[tuple[str, torch.Tensor]]) -> int:
    return sum(t.numel() * t.element_size() for _, t in weights)


@dataclass
class SyncReport:
    """``tensors`` sent, ``bytes`` sent, ``loaded`` (parameters the first worker wrote), ``seconds``."""

    tensors: int
    bytes: int
    loaded: int
    seconds: float


def load_into_engine(engine: Any, weights: Sequence[tuple[str, torch.Tensor]]) -> SyncReport:
    """Load ``weights`` into a :class:`monet.vllm.LatentLLM` (all workers) and reset its prefix cache.

    A :class:`~monet.rl.rollout.HFRolloutEngine` shares the trainer's model: nothing to do."""
    from monet.rl.rollout import HFRolloutEngine

    t0 = time.perf_counter()
    if isinstance(engine, HFRolloutEngine):
        return SyncReport(0, 0, 0, 0.0)
    llm = engine.llm
    got = llm.collective_rpc("monet_load_weights", args=(pack_weights(weights),))
    # everything derived from the old weights goes: cached KV blocks and cached vision-encoder
    # outputs; the reload also cleared the workers' multimodal input cache, so the front end's
    # record of it must go too (else it would send references to inputs the workers dropped)
    if not llm.reset_prefix_cache():
        raise RuntimeError("the engine refused to reset its prefix cache after a weight sync (requests still "
                           "running?); sync only between rollout rounds")
    llm.llm_engine.reset_encoder_cache()
    llm.reset_mm_cache()
    loaded = int(got[0]) if got else 0
    if loaded == 0:
        raise RuntimeError(f"the engine loaded none of the {len(weights)} tensors sent (names not recognised?)")
    return SyncReport(len(weights), weights_nbytes(weights), loaded, time.perf_counter() - t0)


@dataclass
class ProbeReport:
    """``tokens_match``: every probe decoded to the same tokens; ``first_mismatch``: (request,
    token index) of the first difference or None; ``max_latent_diff``: max abs difference of the
    recorded latents where the tokens agree."""

    tokens_match: bool
    first_mismatch: tuple[int, int] | None
    max_latent_diff: float

    def ok(self, tol: float = 1e-3) -> bool:
        return self.tokens_match and self.max_latent_diff <= tol


def probe_generations(generate: Any, requests: Sequence[Any], *, max_new_tokens: int = 8,
                      latent_size: int | None = None, layout: str | None = None,
                      logit_bias: dict[int, float] | None = None) -> list:
    """Greedy generations of the probe requests with ``generate`` (``LatentLLM.generate`` or
    ``functools.partial(monet.generate, model, processor)``), latents returned."""
    return generate(list(requests), max_new_tokens=max_new_tokens, temperature=0.0, latent_size=latent_size,
                    layout=layout, return_latents=True, logit_bias=logit_bias)


def compare_generations(ours: Sequence[Any], ref: Sequence[Any]) -> ProbeReport:
    """Tokens must match exactly; latents are compared where the tokens agree."""
    if len(ours) != len(ref):
        raise ValueError(f"{len(ours)} probe generations to compare with {len(ref)}")
    first = None
    diff = 0.0
    for i, (a, b) in enumerate(zip(ours, ref)):
        if a.token_ids != b.token_ids:
            if first is None:
                k = next((j for j, (x, y) in enumerate(zip(a.token_ids, b.token_ids)) if x != y),
                         min(len(a.token_ids), len(b.token_ids)))
                first = (i, k)
        elif a.latents is not None and b.latents is not None and a.latents.numel():
            diff = max(diff, float((a.latents.float() - b.latents.float()).abs().max()))
    return ProbeReport(first is None, first, diff)


def compare_engine_probes(engines: Sequence[Sequence[Any]], ref: Sequence[Any]) -> tuple[dict[str, float], list[str]]:
    """Compare every rollout engine's probe generations (``engines[e]``) with the trainer's (``ref``).

    Returns the metrics and one message per engine whose tokens differ (naming the engine, the
    probe request and the token). Metrics: ``sync/probe_tokens_match`` (1 only when every engine
    matches) and ``sync/probe_latent_diff`` (the largest over the engines); with several engines
    also ``sync/engine{e}/probe_tokens_match`` and ``sync/engine{e}/probe_latent_diff`` per engine."""
    if not engines:
        raise ValueError("no rollout engine probes to compare")
    reports = [compare_generations(g, ref) for g in engines]
    out = {"sync/probe_tokens_match": float(all(r.tokens_match for r in reports)),
           "sync/probe_latent_diff": max(r.max_latent_diff for r in reports)}
    if len(reports) > 1:
        for e, r in enumerate(reports):
            out[f"sync/engine{e}/probe_tokens_match"] = float(r.tokens_match)
            out[f"sync/engine{e}/probe_latent_diff"] = r.max_latent_diff
    failures = [f"rollout engine {e} of {len(reports)} decodes other tokens than the trainer (probe request "
                f"{r.first_mismatch[0]}, token {r.first_mismatch[1]}): its weights are not the trainer's"
                for e, r in enumerate(reports) if not r.tokens_match]
    return out, failures


def hf_generate(model: Any, processor: Any):
    """``generate(requests, **kw)`` with ``monet.generate`` on ``model`` (eval mode, no grad)."""
    import monet

    def generate(requests, **kw):
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                return monet.generate(model, processor, list(requests), **kw)
        finally:
            model.train(was_training)

    return generate


def probe_agreement(engine: Any, model: Any, processor: Any, requests: Sequence[Any], **kw: Any) -> ProbeReport:
    """Greedy decode ``requests`` with the engine and with ``monet.generate`` on ``model``; compare.
    Keywords: those of :func:`probe_generations`."""
    return compare_generations(probe_generations(engine.generate, requests, **kw),
                               probe_generations(hf_generate(model, processor), requests, **kw))
