"""Final-answer extraction from ``\\boxed{...}`` (nested braces allowed)."""

from __future__ import annotations

import re

_BOXED = "\\boxed{"


def extract_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` in ``text`` (balanced braces), or None."""
    start = text.rfind(_BOXED)
    while start != -1:
        i, depth = start + len(_BOXED), 1
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            return text[start + len(_BOXED): i - 1]
        start = text.rfind(_BOXED, 0, start)  # unbalanced (cut off): try an earlier one
    return None


def normalize_answer(ans: str | None) -> str | None:
    """Lower-case, strip spaces, surrounding ``$``/``.`` and ``\\text{}``."""
    if ans is None:
        return None
    a = ans.strip().rstrip(".").strip().strip("$").strip()
    a = re.sub(r"\\text\{([^}]*)\}", r"\1", a)
    return re.sub(r"\s+", " ", a).strip(" .").lower()
