"""Human-readable rendering of generated token ids with latent spans.

Shared by the HF and vLLM decoders: each latent span (START, the PAD run, END) is rendered as
``<abs_vis_token><latent></abs_vis_token>``; everything else is decoded normally.
"""

from __future__ import annotations

from typing import Any, Sequence

from monet.tokens import LATENT_END, LATENT_PLACEHOLDER, LATENT_START, LatentTokenIds

#: What one latent span renders as.
SPAN_PLACEHOLDER = f"{LATENT_START}{LATENT_PLACEHOLDER}{LATENT_END}"


def split_spans(token_ids: Sequence[int], ids: LatentTokenIds) -> list[tuple[str, list[int]]]:
    """Split ids into ``("text", ids)`` and ``("latent", ids)`` pieces, in order.

    A latent piece runs from a START to the next END inclusive (or to the end of the list when the
    span was cut by ``max_new_tokens``). A leading run of PAD/END (continuation of a span opened by
    a prompt that ended with START) also forms a latent piece.
    """
    pieces: list[tuple[str, list[int]]] = []
    text: list[int] = []
    i, n = 0, len(token_ids)
    if n and token_ids[0] in (ids.pad, ids.end):
        j = 0
        while j < n and token_ids[j] == ids.pad:
            j += 1
        if j < n and token_ids[j] == ids.end:
            j += 1
        pieces.append(("latent", list(token_ids[:j])))
        i = j
    while i < n:
        t = token_ids[i]
        if t == ids.start:
            if text:
                pieces.append(("text", text))
                text = []
            j = i + 1
            while j < n and token_ids[j] != ids.end:
                j += 1
            j = min(j + 1, n)
            pieces.append(("latent", list(token_ids[i:j])))
            i = j
        else:
            text.append(t)
            i += 1
    if text:
        pieces.append(("text", text))
    return pieces


def render_latent_text(tokenizer: Any, token_ids: Sequence[int], ids: LatentTokenIds) -> str:
    """Decode ``token_ids`` with each latent span replaced by :data:`SPAN_PLACEHOLDER`."""
    out = []
    for kind, piece in split_spans(list(token_ids), ids):
        if kind == "latent":
            out.append(SPAN_PLACEHOLDER)
        else:
            out.append(tokenizer.decode(piece, skip_special_tokens=True))
    return "".join(out)
