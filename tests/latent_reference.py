"""Slow, obviously-correct references for latent decoding and the latent training forward.

Written independently of monet.ops / monet.model.decoding: no KV cache, no batching, no padding,
the span rules spelled out as a queue of forced tokens rather than the counter state machine.
"""

from __future__ import annotations

import torch

from monet.model.requests import as_request, render_prompt


def _embed(model, ids: torch.Tensor, pixel_values, grid) -> torch.Tensor:
    """[1, L] ids -> [1, L, D] embeddings with image features at image pads."""
    emb = model.get_input_embeddings()(ids)
    if pixel_values is not None:
        feats = model.model.get_image_features(pixel_values, grid, return_dict=True).pooler_output
        feats = torch.cat(list(feats), 0)
        where = (ids[0] == model.config.image_token_id).nonzero().flatten()
        emb = emb.clone()
        emb[0, where] = feats.to(emb.dtype)
    return emb


def _positions(model, ids: torch.Tensor, grid) -> torch.Tensor:
    if grid is None:
        return torch.arange(ids.shape[1], device=ids.device).view(1, 1, -1).expand(3, 1, -1)
    types = (ids == model.config.image_token_id).int()
    pos, _ = model.model.get_rope_index(ids, mm_token_type_ids=types, image_grid_thw=grid)
    return pos


def full_hidden(model, ids: list[int], latents: dict[int, torch.Tensor], pixel_values, grid) -> torch.Tensor:
    """Final-norm hidden states [L, D] of the whole sequence, latents written at their positions."""
    t = torch.tensor([ids], device=model.device)
    emb = _embed(model, t, pixel_values, grid)
    for p, v in latents.items():
        emb[0, p] = v
    out = model.model.language_model(inputs_embeds=emb, position_ids=_positions(model, t, grid))
    return out.last_hidden_state[0]


@torch.no_grad()
def naive_latent_decode(model, processor, request, *, latent_size, layout, max_new_tokens, eos_ids,
                        logit_bias=None, first_step_bias=None, ablate=None):
    """Greedy latent decoding of one request by full recomputation each step.

    A prompt ending with START is decoded as the same prompt without START with START emitted as
    the first generated token, through the very code path of a *sampled* START (the principle the
    engines must follow). ``first_step_bias`` adds to the logits of the first step only (to make the
    model itself sample START there). ``ablate(j, h) -> vector`` replaces the j-th latent before it is fed.
    Returns (generated ids, latent positions relative to the generated ids, latent vectors [n, D]).
    """
    tok = processor.tokenizer
    START = tok.convert_tokens_to_ids("<abs_vis_token>")
    PAD = tok.convert_tokens_to_ids("<abs_vis_token_pad>")
    END = tok.convert_tokens_to_ids("</abs_vis_token>")
    text, images, force_start = render_prompt(processor, as_request(request))
    enc = processor(text=[text + ("<abs_vis_token>" if force_start else "")], images=images or None,
                    return_tensors="pt")
    pixel_values, grid = enc.get("pixel_values"), enc.get("image_grid_thw")
    if pixel_values is not None:
        pixel_values, grid = pixel_values.to(model.device), grid.to(model.device)
    ids = enc["input_ids"][0].tolist()
    forced: list[int] = []          # tokens still to be emitted (forced) before sampling resumes
    if ids[-1] == START:            # the prompt's START becomes the first generated token
        ids.pop()
        forced = [START]
    n_prompt = len(ids)
    latents: dict[int, torch.Tensor] = {}
    latent_inputs = 0               # how many of the next emitted tokens take a latent input
    gen: list[int] = []
    for step in range(max_new_tokens):
        h = full_hidden(model, ids, latents, pixel_values, grid)[-1]
        logits = model.lm_head(h).float()
        for bias in (logit_bias, first_step_bias if step == 0 else None):
            for t, b in (bias or {}).items():
                logits[t] += b
        choice = int(logits.argmax())
        in_span = latent_inputs > 0 or (forced and forced[0] != START)
        token = forced.pop(0) if forced else choice
        if token == START and not in_span:
            if layout == "monet-v1":   # START itself takes the latent; K-1 PADs follow
                forced, latent_inputs = [PAD] * (latent_size - 1) + [END], latent_size
            else:                      # START embedded normally; K PADs take latents
                forced, latent_inputs = [PAD] * latent_size + [END], latent_size + 1
        ids.append(token)
        gen.append(token)
        if latent_inputs:
            if not (layout != "monet-v1" and token == START):
                # this position's input = hidden of the previous position (or its ablation)
                latents[len(ids) - 1] = h if ablate is None else ablate(len(latents), h)
            latent_inputs -= 1
        if not forced and token in eos_ids and latent_inputs == 0 and token not in (PAD, END):
            break
    pos = sorted(latents)
    vecs = (torch.stack([latents[p] for p in pos]).cpu() if pos
            else torch.zeros(0, model.config.text_config.hidden_size))
    return gen, [p - n_prompt for p in pos], vecs


def sequential_latent_forward(model, input_ids, attention_mask, latent_mask, mask4d, pixel_values=None,
                              image_grid_thw=None, checkpoint_loss_pass=False):
    """Research-style latent training forward for ONE unpadded sample (batch dim 1).

    Latent pass: a Python loop of KV-cached forward calls with autograd, one per latent position,
    each latent's value fed to the next step detached; ``z~_k`` = that step's last hidden state
    (attached). Loss pass: a full forward with the ``z~`` written into the embeddings (with
    activation checkpointing when ``checkpoint_loss_pass``, as the research trainer does; the loop
    cannot use it because it needs the KV cache).
    Returns (loss-pass final hidden [1, L, D], z~ [N, D]).
    """
    ids = input_ids
    emb = model.get_input_embeddings()(ids)
    if pixel_values is not None:
        feats = torch.cat(list(model.model.get_image_features(pixel_values, image_grid_thw, return_dict=True).pooler_output), 0)
        where = (ids[0] == model.config.image_token_id).nonzero().flatten()
        emb = emb.clone()
        emb[0, where] = feats.to(emb.dtype)
    pos = _positions(model, ids, image_grid_thw)
    from monet.model.forward import run_text_model

    cols = latent_mask[0].nonzero().flatten().tolist()
    z_tilde, cache, start = [], None, 0
    step_in = emb
    for col in cols:
        x = step_in[:, start:col]
        h, cache = run_text_model(model, x, pos[:, :, start:col], mask4d[:, :, start:col, :col],
                                  past_key_values=cache, use_cache=True)
        z = h[:, -1]
        z_tilde.append(z[0])
        step_in = step_in.clone()
        step_in[:, col] = z.detach()
        start = col
    zt = torch.stack(z_tilde) if z_tilde else emb.new_zeros(0, emb.shape[-1])
    loss_in = emb.clone()
    loss_in[0, cols] = zt  # z~ enters the loss pass through this tensor (route gradients via it)
    if checkpoint_loss_pass:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    try:
        hidden, _ = run_text_model(model, loss_in, pos, mask4d)
    finally:
        if checkpoint_loss_pass:
            model.gradient_checkpointing_disable()
    return hidden, zt
