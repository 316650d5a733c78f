"""Numeric / symbolic answer equivalence, delegated to ``math-verify``.

:func:`math_equivalent` returns a *tri-state*: True (equivalent), False (both sides are
numeric-valued expressions with no free symbols and they differ — a decisive mismatch), or None
(no decision: one side does not parse, or symbols are involved, e.g. ``red`` parses as the
product ``r*e*d``). Symbolic equivalence itself (``x+1`` vs ``1+x``, ``\\frac{1}{2}`` vs ``0.5``,
``10\\%`` vs ``0.1``) is entirely math-verify's; nothing here re-implements it.

math-verify guards parsing and verification with ``signal.alarm``, which only works in the main
thread. Off the main thread we call it without its timeout and instead bound the input length
(``max_chars``), which is what keeps sympy from pathological inputs there.
"""

from __future__ import annotations

import threading

from math_verify import parse, verify


def _wrap(s: str) -> str:
    s = s.strip()
    if s.startswith("$") or s.startswith("\\(") or s.startswith("\\["):
        return s
    return f"${s}$"


def _numeric(parsed: list) -> bool:
    for item in parsed:
        free = getattr(item, "free_symbols", None)
        if free is not None and not free and getattr(item, "is_number", False):
            return True
    return False


def math_equivalent(prediction: str, reference: str, *, timeout_s: int = 5,
                    max_chars: int = 300) -> bool | None:
    """Tri-state equivalence of two short answers (see the module docstring).

    Inputs longer than ``max_chars`` are not parsed (None): a final answer is short, and a long
    string is not a math answer.
    """
    if not prediction.strip() or not reference.strip():
        return None
    if len(prediction) > max_chars or len(reference) > max_chars:
        return None
    main = threading.current_thread() is threading.main_thread()
    ptimeout = timeout_s if main else None
    gold = parse(_wrap(reference), parsing_timeout=ptimeout)
    pred = parse(_wrap(prediction), parsing_timeout=ptimeout)
    if not gold or not pred:
        return None
    if verify(gold, pred, timeout_seconds=ptimeout):
        return True
    if _numeric(gold) and _numeric(pred):
        return False
    return None
