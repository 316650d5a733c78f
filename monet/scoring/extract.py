"""Final-answer extraction from free-form model output.

Two sources of a final answer, tried in this order by :func:`extract_final_answer`:

1. ``\\boxed{...}`` — the content of the *last* box with balanced braces (nested braces such as
   ``\\boxed{\\frac{1}{2}}`` are kept whole). A box cut off by the generation limit (unbalanced) is
   ignored and an earlier complete box is used.
2. An answer phrase — the last ``<answer>...</answer>`` block, or the text after the last
   ``answer is`` / ``answer:`` / ``final answer:`` (case-insensitive) up to the end of that line.

If neither is present the whole text is the candidate (``source == "text"``); callers decide
whether a whole-text candidate is trustworthy (the multiple-choice matcher is stricter on it).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_BOX_RE = re.compile(r"\\boxed\s*\{")
_ANSWER_TAG_RE = re.compile(r"<answer>(.*?)</answer>", re.IGNORECASE | re.DOTALL)
# "the answer is X", "Answer: X", "final answer: X", "answer is: X"; group 1 = rest of the line.
_ANSWER_PHRASE_RE = re.compile(r"\banswer\s*(?:is\s*:?|:|=)\s*([^\n]*)", re.IGNORECASE)


def _balanced_content(text: str, open_brace: int) -> str | None:
    """Content between ``text[open_brace] == '{'`` and its matching ``}``; None if unbalanced."""
    depth = 0
    for i in range(open_brace, len(text)):
        ch = text[i]
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[open_brace + 1:i]
    return None


def extract_boxed(text: str) -> str | None:
    """Content of the last complete ``\\boxed{...}`` in ``text`` (balanced braces), else None.

    ``\\boxed {x}`` (space before the brace) is accepted. Leading/trailing whitespace of the
    content is stripped.
    """
    starts = [m.end() - 1 for m in _BOX_RE.finditer(text)]
    for brace in reversed(starts):
        content = _balanced_content(text, brace)
        if content is not None:
            return content.strip()
    return None


@dataclass(frozen=True)
class FinalAnswer:
    """A candidate final answer. ``source`` is ``"boxed"``, ``"tag"`` (``<answer>``),
    ``"phrase"`` (``answer is ...``) or ``"text"`` (no marker: the whole output)."""

    text: str
    source: str

    @property
    def explicit(self) -> bool:
        """True when the model marked this as its answer (anything but the whole text)."""
        return self.source != "text"


def extract_final_answer(text: str) -> FinalAnswer:
    """The model's final answer: last box, else last ``<answer>`` block, else last answer
    phrase, else the whole (stripped) text. Never None; the text may be empty."""
    boxed = extract_boxed(text)
    if boxed is not None:
        return FinalAnswer(boxed, "boxed")
    tags = _ANSWER_TAG_RE.findall(text)
    if tags:
        return FinalAnswer(tags[-1].strip(), "tag")
    phrases = [m.group(1).strip() for m in _ANSWER_PHRASE_RE.finditer(text)]
    phrases = [p for p in phrases if p]
    if phrases:
        return FinalAnswer(phrases[-1].rstrip(". ").strip(), "phrase")
    return FinalAnswer(text.strip(), "text")
