"""The tri-state verdict every scorer returns, and who decided it.

``Verdict``: ``correct`` / ``incorrect`` / ``degenerate`` (empty or looping output; never counted
correct). ``decided_by``: ``"rule"`` (extraction + matching), ``"judge"`` (an LLM judge) or
``"undecided"`` (neither could decide; the verdict is then ``incorrect`` so that accuracy stays a
lower bound, and reports count these separately).
"""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass, field
from typing import Any


class Verdict(str, enum.Enum):
    CORRECT = "correct"
    INCORRECT = "incorrect"
    DEGENERATE = "degenerate"


DECIDERS = ("rule", "judge", "undecided")


@dataclass(frozen=True)
class ScoreResult:
    """One scored output.

    ``extracted``: the answer the rules read from the output (option letter for multiple choice,
    the final-answer text otherwise; None if nothing was found). ``detail``: a short
    machine-readable reason (``"letter_match"``, ``"ambiguous"``, ``"math_equal"``, ``"word_loop"``,
    ``"judge:transport_error"``, ...).
    """

    verdict: Verdict
    decided_by: str
    extracted: str | None = None
    detail: str = ""
    judge_reply: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.decided_by not in DECIDERS:
            raise ValueError(f"decided_by must be one of {DECIDERS}, got {self.decided_by!r}")

    @property
    def correct(self) -> bool:
        return self.verdict is Verdict.CORRECT

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["verdict"] = self.verdict.value
        return d
