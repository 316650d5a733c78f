"""Multiple-choice matching: which option letter does a model output choose?

:func:`match_choice` looks only at the final answer (:func:`~monet.scoring.extract.extract_final_answer`)
when the model marked one (box, ``<answer>`` tag, ``answer is``); otherwise at the whole text.
Within that candidate, in order:

1. **Explicit letters** — ``(B)``, ``[B]``, ``**B**``, ``B.`` / ``B)`` / ``B:`` at the start,
   ``option B`` / ``choice B`` / ``answer is B``, or a candidate that *is* one letter (any case).
2. **Bare letters** — a capital letter standing alone as a word (punctuation around it ignored).
   A capital ``A`` followed by a lower-case word (``A cat sits ...``) is read as the article, not
   as option A.
3. **Option text** — an option's text (case, spacing and punctuation normalised) occurring as
   whole words in the candidate. When one matched option text lies inside another matched one
   (``red`` inside ``dark red``) only the longer counts. Empty option texts (options shown only
   in the image) never match by text.

When the model marked no final answer (whole-text candidate), steps 1 and 2 are pooled, so a
restated option list (``A. cat ... B. dog ... I pick B``) is ambiguous rather than read as ``A``.
The first step that finds any valid option letter decides: exactly one distinct letter is a
match; two or more distinct letters are *ambiguous* (``"A or B"``), never a guess. Only letters
that are keys of ``options`` count. Results carry ``status`` ``"matched"`` / ``"ambiguous"`` /
``"none"`` and ``via`` (which step decided) so that callers can route undecided outputs to a judge.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass
from typing import Mapping

from monet.scoring.extract import extract_final_answer

_EXPLICIT_PATTERNS = (
    re.compile(r"\(\s*([A-Za-z])\s*\)"),                      # (B)
    re.compile(r"\[\s*([A-Za-z])\s*\]"),                      # [B]
    re.compile(r"\*\*\s*([A-Za-z])\s*\*\*"),                  # **B**
    re.compile(r"^\s*([A-Z])\s*[.):](?:\s|$)"),               # B. text / B) text / B: text
    re.compile(r"\b(?:option|choice)\s*:?\s*([A-Z])\b", re.IGNORECASE),   # option B
    re.compile(r"\banswer\s*(?:is\s*:?|:)\s*\(?([A-Z])\)?(?![A-Za-z])", re.IGNORECASE),  # answer is B
)
# Words that follow the letter A but never the article "A" ("A is correct").
_NOT_AFTER_ARTICLE = frozenset({"is", "was", "seems", "appears", "would", "should", "could", "must",
                                "matches", "fits", "and", "or"})
_PUNCT_TABLE = str.maketrans({c: " " for c in string.punctuation})


@dataclass(frozen=True)
class ChoiceMatch:
    """Outcome of matching one output against the options.

    ``letter``: the chosen option key when ``status == "matched"``, else None. ``candidates``:
    the distinct letters found by the deciding step (several when ambiguous). ``via``:
    ``"explicit"``, ``"letter"``, ``"text"`` or ``None`` (nothing found). ``answer_source``: where the
    candidate text came from (``boxed``/``tag``/``phrase``/``text``).
    """

    letter: str | None
    status: str
    via: str | None
    candidates: tuple[str, ...]
    answer_source: str


def normalize_text(s: str) -> str:
    """Lower-case, punctuation to spaces, collapsed whitespace."""
    return " ".join(s.lower().translate(_PUNCT_TABLE).split())


def _distinct(seq) -> tuple[str, ...]:
    return tuple(dict.fromkeys(seq))


def _explicit_letters(cand: str, keys: set[str]) -> tuple[str, ...]:
    stripped = cand.strip().strip(".:;,!*$ ").strip()
    if len(stripped) == 1 and stripped.upper() in keys:
        return (stripped.upper(),)
    found = []
    for pat in _EXPLICIT_PATTERNS:
        for m in pat.finditer(cand):
            letter = m.group(1)
            # a lower-case letter counts only inside brackets/markers, never in "answer is a ..."
            if letter.islower() and pat.pattern.startswith(r"\b"):
                continue
            if letter.upper() in keys:
                found.append((m.start(1), letter.upper()))
    found.sort()
    return _distinct(letter for _, letter in found)


def _bare_letters(cand: str, keys: set[str]) -> tuple[str, ...]:
    tokens = cand.translate(_PUNCT_TABLE).split()
    out = []
    for i, tok in enumerate(tokens):
        if len(tok) != 1 or not tok.isupper() or tok not in keys:
            continue
        nxt = tokens[i + 1] if i + 1 < len(tokens) else ""
        if tok == "A" and nxt[:1].islower() and nxt not in _NOT_AFTER_ARTICLE:
            continue  # the article "A", as in "A dog is ..."
        out.append(tok)
    return _distinct(out)


def _text_matches(cand: str, options: Mapping[str, str]) -> tuple[str, ...]:
    hay = f" {normalize_text(cand)} "
    spans = []
    for key, text in options.items():
        needle = normalize_text(str(text))
        if not needle:
            continue
        start = hay.find(f" {needle} ")
        while start != -1:
            spans.append((start + 1, start + 1 + len(needle), key))
            start = hay.find(f" {needle} ", start + 1)
    kept = [s for s in spans
            if not any(o is not s and o[0] <= s[0] and s[1] <= o[1] and (o[1] - o[0]) > (s[1] - s[0])
                       for o in spans)]
    return _distinct(key for _, _, key in sorted(kept))


def match_choice(output: str, options: Mapping[str, str]) -> ChoiceMatch:
    """Match ``output`` against ``options`` (``{"A": "red", "B": "blue", ...}``); see the module doc."""
    keys = {k.upper() for k in options}
    final = extract_final_answer(output)
    cand = final.text
    explicit, bare = _explicit_letters(cand, keys), _bare_letters(cand, keys)
    if not final.explicit:
        # Unmarked output: a model restating the options ("A. cat\nB. dog\nI pick B") shows an
        # explicit-looking "A." first; only letters that agree across both steps may decide.
        explicit = bare = _distinct(explicit + bare)
    for via, found in (("explicit", explicit), ("letter", bare),
                       ("text", _text_matches(cand, {k.upper(): v for k, v in options.items()}))):
        if len(found) == 1:
            return ChoiceMatch(found[0], "matched", via, found, final.source)
        if len(found) > 1:
            return ChoiceMatch(None, "ambiguous", via, found, final.source)
    return ChoiceMatch(None, "none", None, (), final.source)


def gold_letter(answer: str, options: Mapping[str, str]) -> str | None:
    """The option key a reference answer denotes: the key itself (any case, ``"(B)"``), or the
    key of the single option whose text equals it (normalised). None when neither."""
    keys = {k.upper(): k for k in options}
    a = answer.strip().strip("().[] ").strip()
    if a.upper() in keys and len(a) == 1:
        return a.upper()
    norm = normalize_text(answer)
    hits = [k.upper() for k, v in options.items() if normalize_text(str(v)) == norm and norm]
    return hits[0] if len(hits) == 1 else None
