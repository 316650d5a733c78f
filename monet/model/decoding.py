"""Batched, KV-cached latent decoding on the HF model (``monet.generate``).

Per request the decoder keeps the span counter and the previous step's final-norm hidden state
(:mod:`monet.layout`); the native ops feed latents back (``latent_embed_``) and run the span state
machine (``latent_advance_``) for the whole batch per step without host synchronisation. The only
per-step host read is the "all finished?" check.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import torch

from monet import ops
from monet.layout import FORCE_START, SpanLayout
from monet.model.latent_hooks import LatentAblation, LatentOverride
from monet.model.forward import embed_multimodal, mrope_positions, run_text_model
from monet.model.outputs import LatentGeneration
from monet.model.requests import LatentRequest, as_requests, encode_requests
from monet.model.sampling import SamplingParams, logit_bias_vector, resolve_sampling, sample_tokens
from monet.render import render_latent_text, split_spans
from monet.tokens import LatentTokenIds

logger = logging.getLogger("monet")


def resolve_layout(model: Any, latent_size: int | None, layout: "str | SpanLayout | None") -> SpanLayout:
    """The call's span layout: explicit arguments over the model's :class:`MonetConfig` defaults."""
    if isinstance(layout, SpanLayout):
        if latent_size is not None and latent_size != layout.latent_size:
            raise ValueError(f"latent_size={latent_size} contradicts layout={layout}")
        return layout
    cfg = getattr(model, "monet_config", None)
    if cfg is None and latent_size is None:
        raise ValueError("latent_size is required (the model carries no MonetConfig; load it with monet.load_model)")
    return SpanLayout.of(latent_size, layout, default=cfg.span_layout if cfg is not None else None)


def context_length(model: Any) -> int:
    """Maximum positions of the model's language model (prompt + generated tokens)."""
    cfg = getattr(model.config, "text_config", model.config)
    return int(cfg.max_position_embeddings)


def token_budgets(prompt_lengths: Sequence[int], max_new_tokens: int, context: int) -> list[int]:
    """New tokens each request may generate: ``max_new_tokens`` clamped so that prompt + generated
    tokens fit the context. A prompt that does not leave room for one token is an error naming it."""
    budgets = []
    for i, n in enumerate(prompt_lengths):
        if n >= context:
            raise ValueError(f"request {i}: the prompt has {n} tokens but the model's context is {context} "
                             f"positions (prompt + generated tokens); shorten the prompt or use fewer/smaller images")
        budgets.append(min(max_new_tokens, context - n))
    clamped = [i for i, b in enumerate(budgets) if b < max_new_tokens]
    if clamped:
        logger.warning("max_new_tokens=%d does not fit the model's context of %d positions: request(s) %s "
                       "generate at most %s new tokens", max_new_tokens, context, clamped,
                       [budgets[i] for i in clamped])
    return budgets


def eos_token_ids(model: Any, tokenizer: Any) -> list[int]:
    ids: set[int] = set()
    gen = getattr(model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None) if gen is not None else None
    if isinstance(eos, int):
        ids.add(eos)
    elif eos:
        ids.update(int(e) for e in eos)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return sorted(ids)


@torch.no_grad()
def generate(
    model: Any,
    processor: Any,
    requests: Sequence[LatentRequest | str | dict] | LatentRequest | str,
    sampling: SamplingParams | None = None,
    *,
    latent_size: int | None = None,
    layout: "str | SpanLayout | None" = None,
    return_latents: bool = False,
    latent_token_ids: LatentTokenIds | None = None,
    ablations: Sequence[LatentAblation | None] | None = None,
    **sampling_kw: Any,
) -> list[LatentGeneration]:
    """Generate for a batch of requests with latent reasoning (``docs/design.md``).

    Sampling settings come from ``sampling`` (a :class:`~monet.model.sampling.SamplingParams`)
    and/or its fields as keywords (``max_new_tokens``, ``temperature``, ``top_p``, ``top_k``,
    ``seed``, ``logit_bias``). Inside a span the emitted tokens are forced (PAD for each latent
    step, then END); EOS cannot end a span. A request with ``force_latent=True`` or whose prompt
    ends with START gets START forced as its first generated token (reported in ``token_ids``).
    ``latent_size``/``layout`` default to the model's :class:`~monet.model.config.MonetConfig`.
    ``ablations`` (one :class:`~monet.model.latent_hooks.LatentAblation` or None per request)
    replace each latent input before it is fed. Returns one :class:`LatentGeneration` per request, in order.
    """
    reqs = as_requests(requests)
    params = resolve_sampling(sampling, **sampling_kw)
    span = resolve_layout(model, latent_size, layout)
    if not reqs:
        return []
    override = LatentOverride(ablations) if ablations is not None else None
    if override is not None and len(override.ablations) != len(reqs):
        raise ValueError(f"{len(override.ablations)} ablations given for {len(reqs)} requests")
    tokenizer = processor.tokenizer
    ids = latent_token_ids or getattr(getattr(model, "monet_config", None), "token_ids", None) \
        or LatentTokenIds.from_tokenizer(tokenizer)
    device = next(model.parameters()).device

    batch, force_start = encode_requests(processor, reqs)
    input_ids = batch["input_ids"].to(device)
    attn = batch["attention_mask"].to(device)
    budgets = token_budgets(batch["attention_mask"].sum(1).tolist(), params.max_new_tokens, context_length(model))
    pixel_values = batch.get("pixel_values")
    grid = batch.get("image_grid_thw")
    if pixel_values is not None:
        pixel_values, grid = pixel_values.to(device), grid.to(device)
    B = input_ids.shape[0]

    embeds = embed_multimodal(model, input_ids, pixel_values, grid)
    positions = mrope_positions(model, input_ids, attn, grid)
    next_pos = positions.amax(dim=(0, 2)) + 1  # [B] next text position
    hidden, cache = run_text_model(model, embeds, positions, attn, use_cache=True)
    h = hidden[:, -1]  # left padding: the last column is real for every row
    D, dtype = h.shape[-1], h.dtype

    remaining = torch.tensor([FORCE_START if f else 0 for f in force_start], dtype=torch.int32, device=device)
    prev_hidden = torch.zeros(B, D, dtype=dtype, device=device)
    rows = torch.arange(B, device=device)
    eos = torch.tensor(eos_token_ids(model, tokenizer), dtype=torch.int64, device=device)
    pad_token = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else int(eos[0])
    embed_weight = model.get_input_embeddings().weight
    lm_head = model.get_output_embeddings()
    bias = logit_bias_vector(params, lm_head.weight.shape[0], device)
    generator = None
    if params.seed is not None:
        generator = torch.Generator(device=device).manual_seed(params.seed)

    # Output buffers grow with what is generated (one [B] column per step), never with the request.
    out_tokens: list[torch.Tensor] = []
    out_latent: list[torch.Tensor] = []
    limit = torch.tensor(budgets, dtype=torch.int64, device=device)
    lengths = limit.clone()
    stopped = torch.zeros(B, dtype=torch.bool, device=device)  # ended by EOS
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    latent_rows: list[torch.Tensor] = []
    step_input = torch.empty(B, D, dtype=dtype, device=device)
    n_latents = torch.zeros(B, dtype=torch.int64, device=device)
    token_ids = dict(start_id=ids.start, pad_id=ids.pad, end_id=ids.end)

    for t in range(max(budgets)):
        logits = lm_head(h).float()
        tokens = sample_tokens(logits, params, generator, bias)
        slots = torch.where(finished, -1, rows)  # finished rows are in text mode: no state to update
        in_text = remaining == 0
        ops.latent_advance_(tokens, h, slots, remaining, prev_hidden, layout=span, check_indices=False, **token_ids)
        tokens = torch.where(finished, pad_token, tokens)
        is_latent = span.is_latent_input(remaining) & ~finished
        if override is not None:
            override.apply_(prev_hidden, is_latent, n_latents, embed_weight, ids)
            n_latents += is_latent
        out_tokens.append(tokens)
        out_latent.append(is_latent)
        if return_latents:
            latent_rows.append(prev_hidden.to(torch.float32, copy=True))  # copy: prev_hidden is reused
        hit_eos = in_text & ~finished & torch.isin(tokens, eos)
        lengths = torch.where(hit_eos, t + 1, lengths)
        stopped |= hit_eos
        finished |= hit_eos | (limit == t + 1)
        if bool(finished.all()):
            break
        ops.latent_embed_(step_input, tokens, slots, remaining, prev_hidden, embed_weight, span, check_indices=False)
        attn = torch.cat([attn, torch.ones_like(attn[:, :1])], dim=1)
        pos = next_pos.view(1, B, 1).expand(3, B, 1)
        hidden, cache = run_text_model(model, step_input.unsqueeze(1), pos, attn, past_key_values=cache, use_cache=True)
        h = hidden[:, -1]
        next_pos += 1

    return _collect(tokenizer, ids, batch["attention_mask"], torch.stack(out_tokens, 1), torch.stack(out_latent, 1),
                    lengths, stopped, latent_rows)


def _collect(tokenizer, ids, prompt_mask, out_tokens, out_latent, lengths, stopped, latent_rows):
    out_tokens, out_latent = out_tokens.cpu(), out_latent.cpu()
    lengths, stopped = lengths.cpu().tolist(), stopped.cpu().tolist()
    lat = torch.stack([r.cpu() for r in latent_rows], dim=1) if latent_rows else None  # [B, T, D]
    results = []
    for b, n in enumerate(lengths):
        toks = out_tokens[b, :n].tolist()
        latent_pos = out_latent[b, :n].nonzero().flatten()
        latents = lat[b, latent_pos].contiguous() if lat is not None else None
        text = "".join(tokenizer.decode(p, skip_special_tokens=True) for k, p in split_spans(toks, ids) if k == "text")
        results.append(LatentGeneration(
            text=text,
            rendered=render_latent_text(tokenizer, toks, ids),
            token_ids=toks,
            latent_positions=latent_pos.tolist(),
            latents=latents,
            num_prompt_tokens=int(prompt_mask[b].sum()),
            finish_reason="stop" if stopped[b] else "length",
        ))
    return results
