"""Degenerate-output detection: empty answers and repetition loops.

A decoder stuck in a loop produces a periodic tail (``"the the the"``, ``"Step 3. Step 3. ..."``)
until it hits the token limit, usually cut mid-period. Such outputs are never scored as correct,
even when an earlier ``\\boxed{}`` happens to hold the right letter.

Test used (both on the *tail* of the output, so a loop after a good start is caught):

* **word level** — the last ``window_words`` whitespace-separated words; if the share of distinct
  ``ngram``-grams among that window's n-grams is at most ``max_unique_ratio``, it loops. A
  sequence with period ``p`` has at most ``p`` distinct n-grams, so with the defaults (64 words,
  4-grams, 0.25) every period up to 15 words is caught, and ordinary prose (distinct share ~1) is
  not. A truncated last period does not matter.
* **character level** — the same on the last ``window_chars`` characters with ``char_ngram``-grams
  (catches loops without spaces, e.g. ``"!!!!!!"`` or CJK text).

Windows shorter than their size are not tested (short answers are never called loops).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DegenerateConfig:
    window_words: int = 64
    ngram: int = 4
    max_unique_ratio: float = 0.25
    window_chars: int = 256
    char_ngram: int = 10
    max_char_unique_ratio: float = 0.1

    def __post_init__(self):
        if self.ngram < 1 or self.char_ngram < 1:
            raise ValueError("DegenerateConfig: n-gram sizes must be >= 1")
        if self.window_words <= self.ngram or self.window_chars <= self.char_ngram:
            raise ValueError("DegenerateConfig: windows must be longer than their n-gram size")


@dataclass(frozen=True)
class DegenerateCheck:
    """``degenerate``: True when the output is empty or loops; ``reason``: ``"empty"``,
    ``"word_loop"``, ``"char_loop"`` or None; ``unique_ratio``: the ratio that triggered (or the
    word-level ratio when not degenerate; None when no window was long enough)."""

    degenerate: bool
    reason: str | None
    unique_ratio: float | None = None


def unique_ngram_ratio(seq, n: int) -> float:
    """Distinct n-grams / total n-grams of a sequence (1.0 for sequences shorter than n)."""
    grams = [tuple(seq[i:i + n]) for i in range(len(seq) - n + 1)]
    if not grams:
        return 1.0
    return len(set(grams)) / len(grams)


def check_degenerate(text: str, config: DegenerateConfig = DegenerateConfig()) -> DegenerateCheck:
    """Classify ``text`` (see the module docstring)."""
    if not text or not text.strip():
        return DegenerateCheck(True, "empty")
    words = text.split()
    word_ratio = None
    if len(words) >= config.window_words:
        word_ratio = unique_ngram_ratio(words[-config.window_words:], config.ngram)
        if word_ratio <= config.max_unique_ratio:
            return DegenerateCheck(True, "word_loop", word_ratio)
    stripped = text.rstrip()
    if len(stripped) >= config.window_chars:
        char_ratio = unique_ngram_ratio(stripped[-config.window_chars:], config.char_ngram)
        if char_ratio <= config.max_char_unique_ratio:
            return DegenerateCheck(True, "char_loop", char_ratio)
    return DegenerateCheck(False, None, word_ratio)
