"""The scorer shared by evaluation and RL rewards: rules first, an optional LLM judge for the rest.

Per item (:class:`ScoreItem`), in order:

1. **Degenerate** (:func:`~monet.scoring.degenerate.check_degenerate`): empty or looping output ->
   ``degenerate`` by rule. Never correct, whatever an earlier box says.
2. **Multiple choice** (``options`` given): the reference is turned into an option letter
   (:func:`~monet.scoring.choice.gold_letter`); the output is matched
   (:func:`~monet.scoring.choice.match_choice`). A single matched letter decides by rule; none or
   ambiguous -> undecided.
3. **Open answer**: the final answer (box / tag / phrase; the whole text only if it is short,
   ``<= short_answer_chars``) is compared with the reference: equal after normalisation ->
   correct; :func:`~monet.scoring.math_equiv.math_equivalent` True -> correct, False (both numeric
   and different) -> incorrect; otherwise undecided.
4. **Judge** (only if configured): every undecided item is sent to the judge; ``correct`` /
   ``incorrect`` replies decide (``decided_by="judge"``); unparseable replies and transport errors
   stay undecided.
5. Undecided items get verdict ``incorrect`` with ``decided_by="undecided"``.

Scoring a batch (:meth:`Scorer.score_many`) sends all undecided items to the judge at once so its
concurrency limit is used.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Mapping, Sequence

from monet.scoring.choice import gold_letter, match_choice
from monet.scoring.degenerate import DegenerateConfig, check_degenerate
from monet.scoring.extract import extract_final_answer
from monet.scoring.judge import JudgeConfig, JudgeItem, LLMJudge
from monet.scoring.math_equiv import math_equivalent
from monet.scoring.verdict import ScoreResult, Verdict


@dataclass(frozen=True)
class ScoreItem:
    """What is scored: the model ``output`` (full text) against the reference ``answer``.
    ``options`` (``{"A": ..., ...}``) makes it a multiple-choice item; ``question`` is only needed
    by the judge."""

    output: str
    answer: str
    options: Mapping[str, str] | None = None
    question: str = ""


@dataclass(frozen=True)
class ScorerConfig:
    degenerate: DegenerateConfig = field(default_factory=DegenerateConfig)
    judge: JudgeConfig | None = None
    use_math_verify: bool = True
    short_answer_chars: int = 64


def normalize_free_answer(s: str) -> str:
    """Case-folded, ``\\text{}`` unwrapped, surrounding ``$ . `` and spacing removed."""
    a = re.sub(r"\\text\{([^{}]*)\}", r"\1", s.strip())
    a = a.strip().strip("$").strip().rstrip(".").strip()
    return re.sub(r"\s+", " ", a).lower()


class Scorer:
    """``score(item) -> ScoreResult``; ``score_many(items) -> list[ScoreResult]`` (see module doc).

    The judge (if configured) is built here, so a missing API key fails before any scoring; it
    makes no request until an item is undecided.
    """

    def __init__(self, config: ScorerConfig = ScorerConfig(), judge: LLMJudge | None = None):
        self.config = config
        self._judge = judge if judge is not None else (LLMJudge(config.judge) if config.judge else None)

    @property
    def judge(self) -> LLMJudge | None:
        return self._judge

    def rule(self, item: ScoreItem) -> ScoreResult:
        """Rules only: a decided result, or one with ``decided_by == "undecided"``."""
        deg = check_degenerate(item.output, self.config.degenerate)
        if deg.degenerate:
            return ScoreResult(Verdict.DEGENERATE, "rule", None, deg.reason or "degenerate")
        if item.options:
            gold = gold_letter(item.answer, item.options)
            if gold is None:
                raise ValueError(f"reference answer {item.answer!r} is neither an option key nor an option "
                                 f"text of {sorted(item.options)}")
            m = match_choice(item.output, item.options)
            if m.status == "matched":
                verdict = Verdict.CORRECT if m.letter == gold else Verdict.INCORRECT
                return ScoreResult(verdict, "rule", m.letter, f"{m.via}_match")
            return ScoreResult(Verdict.INCORRECT, "undecided", None,
                               "ambiguous" if m.status == "ambiguous" else "no_option_found",
                               extra={"candidates": list(m.candidates)})
        final = extract_final_answer(item.output)
        if not final.explicit and len(final.text) > self.config.short_answer_chars:
            return ScoreResult(Verdict.INCORRECT, "undecided", None, "no_final_answer")
        pred = final.text
        if normalize_free_answer(pred) == normalize_free_answer(item.answer) and pred.strip():
            return ScoreResult(Verdict.CORRECT, "rule", pred, "exact_match")
        if self.config.use_math_verify:
            eq = math_equivalent(pred, item.answer)
            if eq is True:
                return ScoreResult(Verdict.CORRECT, "rule", pred, "math_equal")
            if eq is False:
                return ScoreResult(Verdict.INCORRECT, "rule", pred, "math_unequal")
        return ScoreResult(Verdict.INCORRECT, "undecided", pred, "no_rule_decision")

    def score(self, item: ScoreItem) -> ScoreResult:
        return self.score_many([item])[0]

    def score_many(self, items: Sequence[ScoreItem]) -> list[ScoreResult]:
        results = [self.rule(it) for it in items]
        pending = [i for i, r in enumerate(results) if r.decided_by == "undecided"]
        judge = self.judge if pending else None
        if judge is None:
            return results
        outcomes = judge.judge_many([JudgeItem(items[i].question, items[i].answer, items[i].output,
                                               items[i].options) for i in pending])
        for i, out in zip(pending, outcomes):
            prev = results[i]
            if out.verdict in ("correct", "incorrect"):
                results[i] = ScoreResult(Verdict(out.verdict), "judge", prev.extracted,
                                         "judge_cached" if out.cached else "judge", out.reply)
            else:
                results[i] = ScoreResult(Verdict.INCORRECT, "undecided", prev.extracted,
                                         f"judge:{out.verdict}", out.reply,
                                         extra={**prev.extra, "judge_error": out.error} if out.error else prev.extra)
        return results

    def close(self) -> None:
        if self._judge is not None:
            self._judge.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
