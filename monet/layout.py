"""Latent span layouts and the decode state they imply — the one definition every path shares.

A :class:`SpanLayout` (``latent_size`` K and ``kind``) is built once at each boundary
(:class:`~monet.model.config.MonetConfig`, the vLLM engine and per-request settings, training
batches) and passed along as a value; every rule about spans lives here. See ``docs/design.md``.

Per request ("slot") the decoder keeps one int32 counter ``remaining``:

* ``0``: text mode. Sampling ``START`` opens a span.
* ``FORCE_START`` (-1): the prompt ended with START (which was stripped from it): the next emitted
  token is forced to ``START`` and the counter becomes :attr:`SpanLayout.counter_on_start`, exactly
  as if the model had sampled START. Its input is the ordinary last prompt token.
* ``1 <= remaining <= K``: inside a span *and* the next input is a latent (the final-norm hidden
  state of the step just decoded). The next emitted token is forced: ``PAD`` while
  ``remaining > 1``, ``END`` when ``remaining == 1``.
* ``remaining == K + 1`` (standard layout only): ``START`` was just emitted; its own position is
  embedded normally, then K latents follow.

Standard layout (what SFT trains)::

    emitted:  START  PAD  ...  PAD  END        (K + 2 tokens)
    input:    e(START) h1 ...  hK   e(END)

``monet-v1`` layout (how the released Monet-7B is served): START's own position already takes the
hidden state that predicted START, then K - 1 PADs, then END (K + 1 tokens, K latents)::

    emitted:  START  PAD ... PAD  END          (K + 1 tokens)
    input:    h0     h1  ... hK-1 e(END)

A prompt that ends with START behaves exactly like START sampled as the first generated token: both
engines strip the trailing START from the prompt and start the counter at ``FORCE_START``; the
reported ``token_ids`` then begin with START.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal, Mapping, Sequence, overload

import torch

Layout = Literal["standard", "monet-v1"]
LAYOUTS: tuple[str, ...] = ("standard", "monet-v1")
DEFAULT_LATENT_SIZE = 8
DEFAULT_KIND = "standard"
#: Counter value of a request whose next emitted token is forced to START.
FORCE_START = -1


def _parse_latent_size(value: Any) -> int:
    if isinstance(value, str) and re.fullmatch(r"[+-]?\d+", value.strip()):
        value = int(value.strip())  # CLI flags and HTTP values arrive as strings
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"latent_size must be an int >= 1, got {value!r}")
    if value < 1:
        raise ValueError(f"latent_size must be >= 1 (number of latent steps per span), got {value}")
    return value


def _parse_kind(value: Any) -> str:
    if value not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {value!r}")
    return value


@dataclass(frozen=True)
class SpanLayout:
    """How one latent span looks: ``latent_size`` (K) latent steps in the ``kind`` layout.

    Immutable and validated on construction (``TypeError``/``ValueError`` naming the field).
    ``SpanLayout()`` is the project default (K = 8, standard).
    """

    latent_size: int = DEFAULT_LATENT_SIZE
    kind: str = DEFAULT_KIND

    def __post_init__(self) -> None:
        object.__setattr__(self, "latent_size", _parse_latent_size(self.latent_size))
        object.__setattr__(self, "kind", _parse_kind(self.kind))

    # ------------------------------------------------------------------ construction
    @classmethod
    def of(cls, latent_size: Any = None, kind: Any = None, *, default: "SpanLayout | None" = None) -> "SpanLayout":
        """A layout from optional overrides; ``None`` fields come from ``default`` (or the project
        default). Accepts ``latent_size`` as an int or a string of digits (CLI / HTTP values)."""
        base = default if default is not None else cls()
        return cls(base.latent_size if latent_size is None else latent_size,
                   base.kind if kind is None else kind)

    def to_dict(self) -> dict:
        return {"latent_size": self.latent_size, "layout": self.kind}

    # ------------------------------------------------------------------ the counter
    @property
    def monet_v1(self) -> bool:
        return self.kind == "monet-v1"

    @property
    def counter_on_start(self) -> int:
        """Counter value right after START was emitted (sampled or forced)."""
        return self.latent_size if self.monet_v1 else self.latent_size + 1

    @property
    def counter_on_prompt_start(self) -> int:
        """Counter value for a prompt that still ends with START when it reaches the decoder (only
        a raw vLLM engine prompt can; the front ends strip it): START was embedded as a prompt token,
        so K latents follow — the standard layout's rule, whatever the kind."""
        return self.latent_size + 1

    @property
    def span_length(self) -> int:
        """Number of emitted tokens of one span, START and END included."""
        return self.latent_size + 1 if self.monet_v1 else self.latent_size + 2

    @property
    def num_pads(self) -> int:
        """PAD tokens in one span (standard: K; monet-v1: K - 1)."""
        return self.span_length - 2

    @property
    def first_latent_offset(self) -> int:
        """Offset from START's position to the first position that takes a latent input."""
        return 0 if self.monet_v1 else 1

    @overload
    def is_latent_input(self, remaining: int) -> bool: ...
    @overload
    def is_latent_input(self, remaining: torch.Tensor) -> torch.Tensor: ...

    def is_latent_input(self, remaining):
        """Whether the next input of a request with this counter is a latent (ints or tensors)."""
        return (remaining >= 1) & (remaining <= self.latent_size)

    @staticmethod
    def is_latent_input_per_slot(remaining: torch.Tensor, latent_size: torch.Tensor) -> torch.Tensor:
        """:meth:`is_latent_input` for a batch whose rows have different latent sizes."""
        return (remaining >= 1) & (remaining <= latent_size)

    def advance(self, remaining: int, sampled: int, *, start_id: int, pad_id: int, end_id: int) -> tuple[int, int]:
        """One post-sample step of the span state machine: ``(emitted token, new counter)``.

        Scalar definition; the native op ``latent_advance_`` runs the same machine for a batch."""
        if remaining == FORCE_START:
            return start_id, self.counter_on_start
        if remaining == 0:
            return sampled, (self.counter_on_start if sampled == start_id else 0)
        if remaining > 1:
            return pad_id, remaining - 1
        return end_id, 0

    def replay_latent_positions(self, token_ids: Sequence[int], *, start_id: int, initial: int = 0) -> list[int]:
        """Indices of generated tokens whose *input* was a latent, by replaying the counter over the
        emitted ids (inside spans tokens are forced, so only START matters). ``initial`` is the
        counter before the first token (0, ``FORCE_START`` or :attr:`counter_on_prompt_start`)."""
        out, r = [], initial
        for j, t in enumerate(token_ids):
            _, r = self.advance(r, int(t), start_id=start_id, pad_id=-1, end_id=-1)
            if self.is_latent_input(r):
                out.append(j)
        return out

    # ------------------------------------------------------------------ teacher forcing
    def latent_input_mask(self, input_ids: torch.Tensor, *, start_id: int) -> torch.Tensor:
        """``[..., L]`` bool: positions of a token sequence that take a latent input.

        Each START opens a span whose latent inputs are the K positions starting at
        ``START + first_latent_offset`` (standard: the K PADs; monet-v1: START itself and the K - 1
        PADs); positions past the end of the sequence are dropped. Vectorised (no loop over L)."""
        starts = (input_ids == start_id).to(torch.int32)
        L = input_ids.shape[-1]
        K, off = self.latent_size, self.first_latent_offset
        # opened[p] = number of STARTs in (p - off - K, p - off]: p lies inside some span's latent range
        c = torch.nn.functional.pad(starts.cumsum(-1), (1, 0))  # c[p] = STARTs before position p
        pos = torch.arange(L, device=input_ids.device)
        hi = (pos - off + 1).clamp(min=0, max=L)
        lo = (pos - off - K + 1).clamp(min=0, max=L)
        opened = c.index_select(-1, hi) - c.index_select(-1, lo)
        return opened > 0


def layout_from_mapping(d: Mapping[str, Any], *, default: SpanLayout | None = None, where: str = "") -> SpanLayout:
    """A layout from a mapping with optional ``latent_size`` and ``layout`` keys (config files)."""
    try:
        return SpanLayout.of(d.get("latent_size"), d.get("layout"), default=default)
    except (TypeError, ValueError) as e:
        raise type(e)(f"{where}: {e}" if where else str(e)) from None
