"""Latent span layouts and the decode state they imply — the one definition every path shares.

Per request ("slot") the decoder keeps one int32 counter ``remaining``:

* ``0``: text mode. Sampling ``START`` opens a span.
* ``1 <= remaining <= K``: inside a span *and* the next input is a latent (the final-norm hidden
  state of the step just decoded). The next emitted token is forced: ``PAD`` while ``remaining > 1``,
  ``END`` when ``remaining == 1``.
* ``remaining == K + 1`` (standard layout only): ``START`` was just emitted; its own position is
  embedded normally, then K latents follow.

Standard layout (what SFT trains)::

    emitted:  START  PAD  ...  PAD  END        (K + 2 tokens)
    input:    e(START) h1 ...  hK   e(END)

``monet-v1`` layout (how the released Monet-7B is served): START's own position already takes the
hidden state that predicted START, then K - 1 PADs, then END (K + 1 tokens, K latents).

A prompt that ends with ``START`` enters latent mode at once in both layouts: ``START`` is a prompt
token (embedded normally) and K latents follow, i.e. the counter starts at ``K + 1``.
"""

from __future__ import annotations

from typing import Literal

Layout = Literal["standard", "monet-v1"]
LAYOUTS: tuple[str, ...] = ("standard", "monet-v1")


def check_latent_size(latent_size: int) -> int:
    """Return ``latent_size`` as int, or raise a clear error when it is not >= 1."""
    if isinstance(latent_size, bool) or not isinstance(latent_size, int):
        raise TypeError(f"latent_size must be an int >= 1, got {latent_size!r}")
    if latent_size < 1:
        raise ValueError(f"latent_size must be >= 1 (number of latent steps per span), got {latent_size}")
    return latent_size


def check_layout(layout: str) -> str:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    return layout


def is_monet_v1(layout: str) -> bool:
    return check_layout(layout) == "monet-v1"


def counter_on_start(latent_size: int, layout: str) -> int:
    """Counter value right after START is sampled."""
    return latent_size if is_monet_v1(layout) else latent_size + 1


def counter_for_prompt_ending_in_start(latent_size: int) -> int:
    """Counter value before the first sample of a request whose prompt ends with START."""
    return latent_size + 1


def span_length(latent_size: int, layout: str) -> int:
    """Number of emitted tokens of one span, START and END included."""
    return latent_size + 1 if is_monet_v1(layout) else latent_size + 2
