"""Final-answer helpers kept for existing callers.

``extract_boxed`` is :func:`monet.scoring.extract_boxed` (content of the last complete
``\\boxed{...}``, balanced braces, stripped), the one extractor shared with scoring and RL
rewards; ``normalize_answer`` is the exact-match normalisation of the quick held-out check.
"""

from __future__ import annotations

import re

from monet.scoring.extract import extract_boxed


def normalize_answer(ans: str | None) -> str | None:
    """Lower-case, strip spaces, surrounding ``$``/``.`` and ``\\text{}``; None stays None."""
    if ans is None:
        return None
    a = ans.strip().rstrip(".").strip().strip("$").strip()
    a = re.sub(r"\\text\{([^}]*)\}", r"\1", a)
    return re.sub(r"\s+", " ", a).strip(" .").lower()


__all__ = ["extract_boxed", "normalize_answer"]
