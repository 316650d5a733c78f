"""Result type of latent generation — the same for the HF path and the vLLM runner."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LatentGeneration:
    """What one request produced.

    ``token_ids`` are the generated ids (prompt excluded, EOS included when it ended the request).
    ``latent_positions`` index into ``token_ids``: the tokens whose *input* embedding was a latent
    vector (standard layout: the PAD tokens; monet-v1: START and the PADs). ``latents`` (when
    requested) holds those vectors in the same order, ``[len(latent_positions), D]`` float32 on CPU.
    ``text`` is the answer with latent spans dropped; ``rendered`` shows each span as
    ``<abs_vis_token><latent></abs_vis_token>``.
    """

    text: str
    rendered: str
    token_ids: list[int]
    latent_positions: list[int]
    latents: torch.Tensor | None
    num_prompt_tokens: int
    finish_reason: str  # "stop" (EOS) or "length" (max_new_tokens)

    @property
    def num_latent_spans(self) -> int:
        pos = self.latent_positions
        return sum(1 for i, p in enumerate(pos) if i == 0 or p != pos[i - 1] + 1)
