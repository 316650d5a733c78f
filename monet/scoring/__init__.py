"""Answer scoring shared by evaluation and RL rewards.

Rules first (degenerate detection, ``\\boxed{}`` / answer-phrase extraction, multiple-choice
matching, math equivalence via ``math-verify``), an optional LLM judge for what the rules cannot
decide. Every result is a tri-state :class:`Verdict` plus ``decided_by``
(``rule`` / ``judge`` / ``undecided``).

For RL rewards, ``Scorer().rule(ScoreItem(output, answer, options))`` scores with the rules only
(no network, deterministic); ``result.correct`` is the binary reward and ``degenerate`` outputs can
be penalised separately.
"""

from monet.scoring.choice import ChoiceMatch, gold_letter, match_choice
from monet.scoring.degenerate import DegenerateCheck, DegenerateConfig, check_degenerate
from monet.scoring.extract import FinalAnswer, extract_boxed, extract_final_answer
from monet.scoring.judge import JudgeConfig, JudgeItem, JudgeOutcome, LLMJudge, parse_judge_reply
from monet.scoring.math_equiv import math_equivalent
from monet.scoring.scorer import ScoreItem, Scorer, ScorerConfig
from monet.scoring.verdict import ScoreResult, Verdict

__all__ = [
    "ChoiceMatch", "DegenerateCheck", "DegenerateConfig", "FinalAnswer", "JudgeConfig", "JudgeItem",
    "JudgeOutcome", "LLMJudge", "ScoreItem", "ScoreResult", "Scorer", "ScorerConfig", "Verdict",
    "check_degenerate", "extract_boxed", "extract_final_answer", "gold_letter", "match_choice",
    "math_equivalent", "parse_judge_reply",
]
