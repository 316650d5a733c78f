"""The pieces of a Qwen2.5-VL forward that latent decoding and training recombine.

All go through transformers' public methods (``get_input_embeddings``, ``get_image_features``,
``get_rope_index``, the text model's ``forward``); nothing is patched. Shapes: B batch, L sequence
length, D hidden size, P selected positions.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch


def text_model(model: Any):
    """The decoder stack (``Qwen2_5_VLTextModel``: embeddings, layers, final norm)."""
    return model.model.language_model


def image_token_id(model: Any) -> int:
    return int(model.config.image_token_id)


def embed_multimodal(
    model: Any,
    input_ids: torch.Tensor,
    pixel_values: torch.Tensor | None = None,
    image_grid_thw: torch.Tensor | None = None,
) -> torch.Tensor:
    """Token embeddings with image features written at the image-pad positions. [B, L, D]."""
    embeds = model.get_input_embeddings()(input_ids)
    if pixel_values is None:
        return embeds
    if image_grid_thw is None:
        raise ValueError("pixel_values given without image_grid_thw")
    feats = model.model.get_image_features(pixel_values, image_grid_thw, return_dict=True).pooler_output
    feats = torch.cat(list(feats), dim=0).to(embeds.dtype)
    mask = input_ids == image_token_id(model)
    n = int(mask.sum())
    if n != feats.shape[0]:
        raise ValueError(f"the batch has {n} image-pad tokens but the images give {feats.shape[0]} features; "
                         "image_grid_thw does not match input_ids")
    return embeds.masked_scatter(mask.unsqueeze(-1), feats)


def mrope_positions(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    image_grid_thw: torch.Tensor | None,
) -> torch.Tensor:
    """M-RoPE position ids ``[3, B, L]`` (text and latent tokens advance all axes by 1).

    Padding positions get arbitrary values (they are masked out).
    """
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if image_grid_thw is None:
        pos = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        return pos.unsqueeze(0).expand(3, -1, -1).contiguous()
    mm_types = (input_ids == image_token_id(model)).int()
    pos, _ = model.model.get_rope_index(
        input_ids, mm_token_type_ids=mm_types, image_grid_thw=image_grid_thw, attention_mask=attention_mask
    )
    return pos


def _mask_mapping(model: Any, mask4d: torch.Tensor, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A prepared ``[B, 1, Q, K]`` mask for every attention type of the text model."""
    if mask4d.dtype == torch.bool:
        additive = torch.zeros(mask4d.shape, dtype=dtype, device=mask4d.device)
        mask4d = additive.masked_fill_(~mask4d, torch.finfo(dtype).min)
    else:
        mask4d = mask4d.to(dtype)
    types = set(getattr(text_model(model).config, "layer_types", None) or ["full_attention"])
    return {t: mask4d for t in types}


class _GatherRows(torch.autograd.Function):
    """``hidden[b, p]`` that saves nothing through autograd's saved-tensor machinery, so it can run
    inside an activation-checkpointed layer (from a hook) without changing what the recomputation
    must save."""

    @staticmethod
    def forward(ctx, hidden, batch_index, position):
        ctx.shape, ctx.index = hidden.shape, (batch_index, position)
        return hidden[batch_index, position]

    @staticmethod
    def backward(ctx, grad):
        out = grad.new_zeros(ctx.shape)
        out.index_put_(ctx.index, grad, accumulate=True)
        return out, None, None


class HiddenCapture:
    """Collects all-layer hidden states at selected positions during one forward.

    Layer ``0`` is the embedding output, layer ``i`` the input of decoder layer ``i``, and the last
    one the final-norm output (transformers' ``output_hidden_states`` convention, N + 1 entries for
    N layers) — but only the rows at ``(batch_index, position)`` are kept, never ``[N+1, B, L, D]``.
    Each entry stays attached to the autograd graph.
    """

    def __init__(self, batch_index: torch.Tensor, position: torch.Tensor, layers: list[int] | None = None):
        self.batch_index = batch_index
        self.position = position
        self.layers = layers
        self.rows: dict[int, torch.Tensor] = {}

    def wants(self, layer: int) -> bool:
        return self.layers is None or layer in self.layers

    def take(self, layer: int, hidden: torch.Tensor) -> None:
        if self.wants(layer) and layer not in self.rows:
            self.rows[layer] = _GatherRows.apply(hidden, self.batch_index, self.position)

    def stacked(self) -> torch.Tensor:
        """[num_layers_kept, P, D] in layer order."""
        return torch.stack([self.rows[k] for k in sorted(self.rows)], dim=0)


@contextmanager
def _capturing(model: Any, capture: HiddenCapture | None) -> Iterator[None]:
    if capture is None:
        yield
        return
    handles = []
    for i, layer in enumerate(text_model(model).layers):
        def hook(module, args, kwargs, i=i):
            hidden = args[0] if args else kwargs["hidden_states"]
            capture.take(i, hidden)
        handles.append(layer.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def run_text_model(
    model: Any,
    inputs_embeds: torch.Tensor,
    position_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    *,
    past_key_values: Any = None,
    use_cache: bool = False,
    capture: HiddenCapture | None = None,
) -> tuple[torch.Tensor, Any]:
    """Run the decoder stack on embeddings. Returns (final-norm hidden [B, L, D], cache).

    ``attention_mask`` is either a 2-D padding mask ``[B, K]`` (causal masking added by
    transformers) or a prepared 4-D mask ``[B, 1, L, K]`` (bool = may attend, or additive).
    """
    lm = text_model(model)
    if attention_mask is not None and attention_mask.dim() == 4:
        attention_mask = _mask_mapping(model, attention_mask, inputs_embeds.dtype)
    with _capturing(model, capture):
        out = lm(
            inputs_embeds=inputs_embeds,
            position_ids=position_ids,
            attention_mask=attention_mask,
            past_key_values=past_key_values,
            use_cache=use_cache,
        )
    hidden = out.last_hidden_state
    if capture is not None:
        capture.take(len(lm.layers), hidden)
    return hidden, out.past_key_values
