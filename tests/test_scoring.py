"""Rule-based scoring: extraction, multiple-choice matching, math equivalence, degenerate
outputs, and the rule-first Scorer (the judge itself is tested in test_scoring_judge.py)."""

import random
import threading

import pytest

from monet.scoring import (DegenerateConfig, ScoreItem, Scorer, Verdict, check_degenerate, extract_boxed,
                           extract_final_answer, gold_letter, match_choice, math_equivalent)
from monet.scoring.degenerate import unique_ngram_ratio
from monet.scoring.verdict import ScoreResult

OPTS = {"A": "red", "B": "blue", "C": "dark red", "D": "green"}


@pytest.mark.parametrize("text,expected", [
    ("\\boxed{B}", "B"),
    ("x \\boxed{\\frac{1}{2}} y", "\\frac{1}{2}"),
    ("\\boxed{A} then \\boxed{C}", "C"),
    ("\\boxed{ {a}{b} }", "{a}{b}"),
    ("\\boxed{A} and a cut-off \\boxed{\\frac{1}{", "A"),   # unbalanced last box: earlier one
    ("\\boxed {7}", "7"),
    ("no box", None),
    ("\\boxed{", None),
])
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


@pytest.mark.parametrize("text,answer,source", [
    ("Reasoning... The answer is B.", "B", "phrase"),
    ("Answer: (C) dark red", "(C) dark red", "phrase"),
    ("answer: 4\nmore text\nFinal answer: 5", "5", "phrase"),
    ("<answer> 42 </answer> trailing", "42", "tag"),
    ("answer is \\boxed{9}; the answer is 3", "9", "boxed"),
    ("  just text  ", "just text", "text"),
])
def test_extract_final_answer(text, answer, source):
    fa = extract_final_answer(text)
    assert (fa.text, fa.source) == (answer, source)
    assert fa.explicit == (source != "text")


# output, expected letter (None = undecided), expected status
MC_TABLE = [
    ("B", "B", "matched"),
    ("b", "B", "matched"),
    ("(B)", "B", "matched"),
    ("(b)", "B", "matched"),
    ("B.", "B", "matched"),
    ("B. blue", "B", "matched"),
    ("The answer is B.", "B", "matched"),
    ("Answer: D", "D", "matched"),
    ("answer is (A)", "A", "matched"),
    ("**C**", "C", "matched"),
    ("\\boxed{D}", "D", "matched"),
    ("\\boxed{(A) red}", "A", "matched"),
    ("I compared A and B. The answer is C.", "C", "matched"),       # final phrase wins over reasoning
    ("Option B is right", "B", "matched"),
    ("A is correct", "A", "matched"),
    ("blue", "B", "matched"),                                         # option text
    ("BLUE!", "B", "matched"),
    ("It is dark red.", "C", "matched"),                              # longer option text wins over 'red'
    ("\\boxed{green}", "D", "matched"),
    ("A or B", None, "ambiguous"),
    ("A. red\nB. blue\nI pick B", None, "ambiguous"),              # restated options, no marked answer
    ("A. red\nB. blue\nThe answer is B", "B", "matched"),
    ("(A) or (C)", None, "ambiguous"),
    ("It could be red or blue", None, "ambiguous"),
    ("A dog sits there", None, "none"),                               # article, no option text
    ("purple", None, "none"),
    ("The answer is E", None, "none"),                                # not an option
    ("", None, "none"),
]


@pytest.mark.parametrize("text,letter,status", MC_TABLE)
def test_match_choice_table(text, letter, status):
    m = match_choice(text, OPTS)
    assert (m.letter, m.status) == (letter, status), m


def test_match_choice_options_in_image_never_text_match():
    opts = {"A": "", "B": "", "C": "", "D": ""}
    assert match_choice("I think it is C", opts).letter == "C"
    assert match_choice("nothing here", opts).status == "none"


@pytest.mark.parametrize("answer,letter", [("B", "B"), ("b", "B"), ("(C)", "C"), ("blue", "B"), ("Dark Red", "C"),
                                           ("purple", None), ("E", None)])
def test_gold_letter(answer, letter):
    assert gold_letter(answer, OPTS) == letter


MATH_TABLE = [
    ("0.5", "\\frac{1}{2}", True),
    ("1/2", "0.5", True),
    ("x+1", "1+x", True),
    ("3.0", "3", True),
    ("10\\%", "0.1", True),
    ("2\\sqrt{2}", "\\sqrt{8}", True),
    ("3", "4", False),
    ("\\frac{1}{3}", "0.5", False),
    ("red", "blue", None),          # symbols: no decision
    ("", "3", None),
    ("1" * 400, "1", None),         # too long to be a final answer
]


@pytest.mark.parametrize("pred,ref,expected", MATH_TABLE)
def test_math_equivalent_table(pred, ref, expected):
    assert math_equivalent(pred, ref) is expected


def test_math_equivalent_off_main_thread():
    out = {}
    t = threading.Thread(target=lambda: out.update(r=math_equivalent("\\frac{2}{4}", "0.5")))
    t.start(); t.join()
    assert out["r"] is True


# ---------------------------------------------------------------- degenerate outputs

def naive_unique_ratio(seq, n):
    grams = set()
    total = 0
    for i in range(len(seq) - n + 1):
        grams.add(tuple(seq[i:i + n])); total += 1
    return len(grams) / total if total else 1.0


def test_unique_ngram_ratio_random():
    rng = random.Random(0)
    for _ in range(50):
        seq = [rng.choice("abc") for _ in range(rng.randint(0, 40))]
        n = rng.randint(1, 5)
        assert unique_ngram_ratio(seq, n) == pytest.approx(naive_unique_ratio(seq, n))


PROSE = ("The image shows a busy street with several cars parked along the curb while pedestrians cross "
         "at the light and a cyclist waits near the corner beside a bakery whose sign reads fresh bread "
         "daily and a man in a grey coat checks his phone under the awning as a bus approaches from the "
         "north carrying commuters toward the station so the answer is \\boxed{B}")


@pytest.mark.parametrize("text,reason", [
    ("", "empty"),
    ("   \n\t", "empty"),
    ("Let me think. " + "the the the " * 40, "word_loop"),
    ("Step 1: look. " + "I need to zoom in again. " * 30 + "I need to zo", "word_loop"),   # cut mid-period
    ("\\boxed{B} " + "!" * 400, "char_loop"),
    ("答案是" + "对对对对" * 100, "char_loop"),
    (PROSE, None),
    ("B", None),
    ("A " * 20, None),   # short: windows too small to judge
])
def test_check_degenerate(text, reason):
    d = check_degenerate(text)
    assert d.degenerate == (reason is not None) and d.reason == reason


def test_degenerate_config_validation():
    with pytest.raises(ValueError):
        DegenerateConfig(window_words=4, ngram=4)


# ---------------------------------------------------------------- Scorer (rules only)

def test_scorer_mcq_and_open():
    s = Scorer()
    r = s.score(ScoreItem("The answer is B", "B", OPTS))
    assert (r.verdict, r.decided_by, r.extracted) == (Verdict.CORRECT, "rule", "B")
    r = s.score(ScoreItem("\\boxed{A}", "blue", OPTS))       # reference given as option text
    assert (r.verdict, r.decided_by) == (Verdict.INCORRECT, "rule")
    r = s.score(ScoreItem("A or B", "B", OPTS))
    assert (r.verdict, r.decided_by, r.detail) == (Verdict.INCORRECT, "undecided", "ambiguous")
    r = s.score(ScoreItem("so the value is \\boxed{0.50}", "\\frac{1}{2}"))
    assert (r.verdict, r.decided_by, r.detail) == (Verdict.CORRECT, "rule", "math_equal")
    r = s.score(ScoreItem("\\boxed{\\text{Red}}.", "red"))
    assert (r.verdict, r.detail) == (Verdict.CORRECT, "exact_match")
    r = s.score(ScoreItem("\\boxed{7}", "8"))
    assert (r.verdict, r.decided_by) == (Verdict.INCORRECT, "rule")
    r = s.score(ScoreItem("\\boxed{a cat}", "a dog"))
    assert r.decided_by == "undecided"
    r = s.score(ScoreItem("long reasoning without any marked answer " * 5, "8"))
    assert (r.decided_by, r.detail) == ("undecided", "no_final_answer")


def test_degenerate_is_never_correct():
    s = Scorer()
    loop = "\\boxed{B} " + "and then " * 60
    r = s.score(ScoreItem(loop, "B", OPTS))
    assert (r.verdict, r.decided_by, r.detail) == (Verdict.DEGENERATE, "rule", "word_loop")
    assert not r.correct
    assert s.score(ScoreItem("", "B", OPTS)).verdict is Verdict.DEGENERATE


def test_scorer_bad_reference_names_it():
    with pytest.raises(ValueError, match="'purple'"):
        Scorer().score(ScoreItem("B", "purple", OPTS))


def test_score_result_validates():
    with pytest.raises(ValueError):
        ScoreResult(Verdict.CORRECT, "oracle")
    assert ScoreResult(Verdict.CORRECT, "rule").to_dict()["verdict"] == "correct"
