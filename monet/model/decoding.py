"""Batched, KV-cached latent decoding on the HF model (``monet.generate``).

Per request the decoder keeps the span counter and the previous step's final-norm hidden state
(:mod:`monet.layout`); the native ops feed latents back (``latent_embed_``) and run the span state
machine (``latent_advance_``) for the whole batch per step without host synchronisation. The only
per-step host read is the "all finished?" check.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from monet import ops
from monet.layout import SpanLayout, check_latent_size, check_layout, counter_for_prompt_ending_in_start, is_monet_v1
from monet.model.forward import embed_multimodal, mrope_positions, run_text_model
from monet.model.outputs import LatentGeneration
from monet.model.requests import LatentRequest, as_requests, encode_requests
from monet.model.sampling import SamplingParams, logit_bias_vector, sample_tokens
from monet.render import render_latent_text, split_spans
from monet.tokens import LatentTokenIds


@dataclass
class DecodeStats:
    """Timing of the last :func:`generate` call (filled when ``stats`` is passed)."""

    prefill_s: float = 0.0
    decode_s: float = 0.0
    steps: int = 0
    generated_tokens: int = 0
    latent_steps: int = 0


def _defaults(model: Any, latent_size: int | None, layout: str | None) -> tuple[int, str]:
    cfg = getattr(model, "monet_config", None)
    if latent_size is None:
        latent_size = cfg.latent_size if cfg is not None else None
    if latent_size is None:
        raise ValueError("latent_size is required (the model carries no MonetConfig; load it with monet.load_model)")
    layout = layout or (cfg.layout if cfg is not None else "standard")
    return check_latent_size(latent_size), check_layout(layout)


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
    *,
    max_new_tokens: int = 256,
    latent_size: int | None = None,
    layout: str | None = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int | None = None,
    logit_bias: dict[int, float] | None = None,
    return_latents: bool = False,
    latent_token_ids: LatentTokenIds | None = None,
    stats: DecodeStats | None = None,
) -> list[LatentGeneration]:
    """Generate for a batch of requests with latent reasoning (SPEC section 4).

    Inside a span the emitted tokens are forced (PAD for each latent step, then END); EOS cannot
    end a span; a prompt ending with START enters latent mode at once. ``latent_size``/``layout``
    default to the model's :class:`~monet.model.config.MonetConfig`. ``logit_bias`` adds to the
    logits of the given token ids before sampling (e.g. on START to trigger spans). Returns one
    :class:`LatentGeneration` per request, in order.
    """
    reqs = as_requests(requests)
    if not reqs:
        return []
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    K, layout = _defaults(model, latent_size, layout)
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, logit_bias=logit_bias)
    tokenizer = processor.tokenizer
    ids = latent_token_ids or getattr(getattr(model, "monet_config", None), "token_ids", None) \
        or LatentTokenIds.from_tokenizer(tokenizer)
    device = next(model.parameters()).device
    t0 = time.perf_counter()

    batch = encode_requests(processor, reqs)
    input_ids = batch["input_ids"].to(device)
    attn = batch["attention_mask"].to(device)
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

    remaining = torch.where(input_ids[:, -1] == ids.start, counter_for_prompt_ending_in_start(K), 0).to(torch.int32)
    prev_hidden = torch.zeros(B, D, dtype=dtype, device=device)
    rows = torch.arange(B, device=device)
    eos = torch.tensor(eos_token_ids(model, tokenizer), dtype=torch.int64, device=device)
    pad_token = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else int(eos[0])
    embed_weight = model.get_input_embeddings().weight
    lm_head = model.get_output_embeddings()
    bias = logit_bias_vector(params, lm_head.weight.shape[0], device)
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)

    out_tokens = torch.full((B, max_new_tokens), pad_token, dtype=torch.int64, device=device)
    out_latent = torch.zeros((B, max_new_tokens), dtype=torch.bool, device=device)
    lengths = torch.full((B,), max_new_tokens, dtype=torch.int64, device=device)
    stopped = torch.zeros(B, dtype=torch.bool, device=device)  # ended by EOS
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    latent_rows: list[torch.Tensor] = []
    step_input = torch.empty(B, D, dtype=dtype, device=device)
    monet_v1 = is_monet_v1(layout)
    if stats is not None:
        stats.prefill_s = time.perf_counter() - t0
    t1 = time.perf_counter()

    steps = 0
    for t in range(max_new_tokens):
        steps = t + 1
        logits = lm_head(h).float()
        tokens = sample_tokens(logits, params, generator, bias)
        slots = torch.where(finished, -1, rows)  # finished rows are in text mode: no state to update
        in_text = remaining == 0
        ops.latent_advance_(tokens, h, slots, remaining, prev_hidden, start_id=ids.start, pad_id=ids.pad,
                            end_id=ids.end, layout=SpanLayout(K, "monet-v1" if monet_v1 else "standard"),
                            check_indices=False)
        tokens = torch.where(finished, pad_token, tokens)
        out_tokens[:, t] = tokens
        is_latent = (remaining >= 1) & (remaining <= K) & ~finished
        out_latent[:, t] = is_latent
        if return_latents:
            latent_rows.append(prev_hidden.to(torch.float32, copy=True))  # copy: prev_hidden is reused
        hit_eos = in_text & ~finished & torch.isin(tokens, eos)
        lengths = torch.where(hit_eos, t + 1, lengths)
        stopped |= hit_eos
        finished |= hit_eos
        if t + 1 == max_new_tokens or bool(finished.all()):
            break
        ops.latent_embed_(step_input, tokens, slots, remaining, prev_hidden, embed_weight,
                          SpanLayout(K, "monet-v1" if monet_v1 else "standard"), check_indices=False)
        attn = torch.cat([attn, torch.ones_like(attn[:, :1])], dim=1)
        pos = next_pos.view(1, B, 1).expand(3, B, 1)
        hidden, cache = run_text_model(model, step_input.unsqueeze(1), pos, attn, past_key_values=cache, use_cache=True)
        h = hidden[:, -1]
        next_pos += 1

    if stats is not None:
        stats.decode_s = time.perf_counter() - t1
        stats.steps = steps
    return _collect(tokenizer, ids, input_ids, batch["attention_mask"], out_tokens, out_latent, lengths,
                    stopped, latent_rows, stats)


def _collect(tokenizer, ids, input_ids, prompt_mask, out_tokens, out_latent, lengths, stopped, latent_rows, stats):
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
        if stats is not None:
            stats.generated_tokens += n
            stats.latent_steps += len(latent_pos)
    return results
