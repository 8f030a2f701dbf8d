"""Tests of the project's one scorer, ``harness.scoring``.

Real golds come from the staged datasets (``HARNESS_DATA_DIR``, default ``<repo>/../shared/data``);
those tests skip with a reason when the data is absent. Everything runs on CPU; the whole file is
meant to finish well under a minute on 2 cores.
"""

from __future__ import annotations

import functools
import json
import os
import re
import signal
import tempfile
import threading
import time
from dataclasses import FrozenInstanceError
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness import scoring, verify
from harness.scoring import FALLBACKS, Score, extract_answer, has_format, score, score_batch

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("HARNESS_DATA_DIR", REPO.parent / "shared" / "data"))
WORKERS = 2
GSM8K_ROWS = 300  # "a few hundred"; the rest are the same integer format


@functools.cache
def _rows(bench: str) -> tuple[dict, ...]:
    path = DATA_DIR / bench / "test.jsonl"
    if not path.exists():
        pytest.skip(f"dataset file {path} not found (set HARNESS_DATA_DIR to the staged shared/data)")
    with path.open(encoding="utf-8") as f:
        return tuple(json.loads(line) for line in f)


def _golds(bench: str) -> list[dict]:
    rows = list(_rows(bench))
    return rows[:GSM8K_ROWS] if bench == "gsm8k" else rows


def _ans(text: str) -> str:
    return f"<answer>{text}</answer>"


BENCHES = ["gsm8k", "math500", "aime24", "aime25"]


# --------------------------------------------------------------------------------------------------
# API


def test_public_api():
    assert FALLBACKS == ("boxed", "last_number")
    s = Score("5", True, "answer")
    with pytest.raises(FrozenInstanceError):
        s.correct = False  # type: ignore[misc]
    assert score(_ans("5"), "5") == Score("5", True, "answer")
    assert score_batch([_ans("5"), "no answer"], ["5", "5"]) == [Score("5", True, "answer"), Score(None, False, "none")]
    assert extract_answer(_ans(" 5 ")) == ("5", "answer")


# --------------------------------------------------------------------------------------------------
# Real golds: every gold, given back as the answer, scores correct


@pytest.mark.parametrize("bench", BENCHES)
def test_real_golds_score_correct(bench):
    rows = _golds(bench)
    forms = [
        lambda g: _ans(g),
        # A misleading think block: a different number and a different \boxed must be ignored.
        lambda g: f"<think>\nTry 123456789. Maybe \\boxed{{-1}}?\n</think>\n<answer> {g} </answer>",
        lambda g: f"<think>ok</think><answer>So \\boxed{{{g}}}.</answer>",
    ]
    cases = [(row, make(row["answer"])) for make in forms for row in rows]
    # Strict rule (what the trainer's accuracy reward uses): no fallback may be needed. One call, so the
    # pool judges each (answer, gold) pair once for all three forms.
    results = score_batch([c[1] for c in cases], [c[0]["answer"] for c in cases], fallbacks=(), workers=WORKERS)
    failures = [
        (row["id"], row["answer"], response, result)
        for (row, response), result in zip(cases, results, strict=True)
        if result != Score(row["answer"].strip(), True, "answer")
    ]
    # Every real gold scores correct: there are no known exceptions (the documented false positives in the
    # other direction are in test_math500_perturbations_score_wrong and test_known_false_positives).
    assert failures == []


def test_real_golds_through_score_match_score_batch():
    """The in-process path (score on the main thread) agrees with the pool path on real LaTeX golds."""
    rows = _golds("math500")[:60]
    golds = [r["answer"] for r in rows]
    other = golds[1:] + golds[:1]
    responses = [_ans(g) for g in golds] + [_ans(o) for o in other]
    batch = score_batch(responses, golds + golds, workers=WORKERS)
    single = [score(r, g) for r, g in zip(responses, golds + golds, strict=True)]
    assert batch == single


# --------------------------------------------------------------------------------------------------
# Perturbed answers score wrong


@pytest.mark.parametrize("bench", BENCHES)
def test_integer_gold_plus_one_scores_wrong_even_with_gold_in_think(bench):
    rows = [r for r in _golds(bench) if re.fullmatch(r"-?\d+", r["answer"].strip())]
    assert rows, f"no integer golds in {bench}"
    golds = [r["answer"] for r in rows]
    responses = [f"<think>the answer is {g}, \\boxed{{{g}}}</think><answer>{int(g) + 1}</answer>" for g in golds]
    results = score_batch(responses, golds, workers=WORKERS)
    wrong_verdicts = [(r["id"], s) for r, s in zip(rows, results, strict=True) if s.correct]
    assert wrong_verdicts == []
    assert all(s.fallback == "answer" for s in results)


# MATH500 perturbations that still score correct. Each is either a genuine equivalence or a documented
# known limit of math-verify 0.9.0 (asserted separately below, as strict xfails).
KNOWN_PERTURBATION_MATCHES = {
    # genuine equivalence: "x=5" is the answer 5 (math-verify unwraps the equation)
    ("other", "test/algebra/1837.json"): ("5", "x=5"),
    # math-verify rounds decimals to 6 places before comparing: 0.0000672 == 0.0000673
    ("digit", "test/number_theory/598.json"): (".0000672", ".0000673"),
    # units are stripped before comparison, so the exponent of the unit is never looked at
    ("digit", "test/geometry/473.json"): ("864 \\mbox{ inches}^2", "864 \\mbox{ inches}^3"),
    ("digit", "test/prealgebra/1114.json"): ("15\\mbox{ cm}^2", "15\\mbox{ cm}^3"),
}


def _other_answer(answers: list[str], i: int) -> str:
    """The next row's answer that differs from row i's (ignoring whitespace)."""
    squash = "".join(answers[i].split())
    k = 1
    while "".join(answers[(i + k) % len(answers)].split()) == squash:
        k += 1
    return answers[(i + k) % len(answers)]


def _bump_last_digit(text: str) -> str | None:
    digits = list(re.finditer(r"\d", text))
    if not digits:
        return None
    d = digits[-1]
    return text[: d.start()] + str((int(d.group()) + 1) % 10) + text[d.end() :]


def test_math500_perturbations_score_wrong():
    rows = _golds("math500")
    answers = [r["answer"] for r in rows]
    cases = []  # (kind, id, gold, perturbed)
    for i, row in enumerate(rows):
        cases.append(("other", row["id"], row["answer"], _other_answer(answers, i)))
        bumped = _bump_last_digit(row["answer"])
        if bumped is not None:
            cases.append(("digit", row["id"], row["answer"], bumped))
    results = score_batch([_ans(c[3]) for c in cases], [c[2] for c in cases], workers=WORKERS)
    matched = {(c[0], c[1]): (c[2], c[3]) for c, s in zip(cases, results, strict=True) if s.correct}
    assert matched == KNOWN_PERTURBATION_MATCHES
    assert len(cases) > 900  # both perturbations ran over (nearly) all 500 rows


# Known false positives of math-verify 0.9.0 that the scorer does not fix. strict=True: if a new
# math-verify fixes one, the test turns into an XPASS failure and this list must be updated.
KNOWN_FALSE_POSITIVES = [
    pytest.param(".0000672", ".0000673", id="decimals-rounded-to-6-places"),
    pytest.param("864 \\mbox{ inches}^2", "864 \\mbox{ inches}^3", id="unit-exponent-ignored"),
    pytest.param("\\frac{1}{2004!}", "\\frac{1}{2006!}", id="tiny-factorial-reciprocals"),
    pytest.param("\\frac{1}{2^{99}}", "\\frac{1}{2^{98}}", id="tiny-powers-of-two"),
]


@pytest.mark.xfail(strict=True, reason="math-verify 0.9.0 false positive (documented known limit)")
@pytest.mark.parametrize(("gold", "wrong"), KNOWN_FALSE_POSITIVES)
def test_known_false_positives(gold, wrong):
    assert not score(_ans(wrong), gold).correct


# --------------------------------------------------------------------------------------------------
# The traps listed in shared/NOTES.md


@pytest.mark.parametrize(
    ("response", "gold", "correct"),
    [
        # think-leak: math-verify on the whole text finds the 5 inside <think>
        ("<think>2+3=5</think><answer>6</answer>", "5", False),
        ("<think>2+3=5</think><answer>5</answer>", "5", True),
        # a bare LaTeX gold parses to nothing unless wrapped in $...$
        (_ans("\\frac{9}{7}"), "\\dfrac{9}{7}", True),
        (_ans("\\dfrac{9}{7}"), "\\dfrac{9}{7}", True),
        (_ans("9/7"), "\\dfrac{9}{7}", True),
        (_ans("\\frac{9}{8}"), "\\dfrac{9}{7}", False),
        (_ans("\\left( 3, \\frac{\\pi}{2} \\right)"), "\\left( 3, \\frac{\\pi}{2} \\right)", True),
        (_ans("(3, \\frac{\\pi}{2})"), "\\left( 3, \\frac{\\pi}{2} \\right)", True),
        (_ans("3"), "\\left( 3, \\frac{\\pi}{2} \\right)", False),
        # thousands separators
        (_ans("1,234"), "1234", True),
        (_ans("1234"), "1,234", True),
        (_ans("$1,234.00"), "1234", True),
        (_ans("+1,234"), "1234", True),  # math-verify alone reads "$+1,234$" as the set {1, 234}
        (_ans("1,235"), "1234", False),
        # leading zeros
        (_ans("\\boxed{007}"), "7", True),
        (_ans("007"), "7", True),
        # 0.5 vs \frac12 (a bare \frac12 parses to nothing in math-verify; wrapped it is 1/2)
        (_ans("\\frac12"), "0.5", True),
        (_ans("0.5"), "\\frac12", True),
        (_ans("\\frac13"), "0.5", False),
        # LaTeX thin space as thousands separator: math-verify alone reads 1\,000 as 1*000 = 0
        (_ans("1\\,000"), "1000", True),
        (_ans("1\\,000"), "1", False),
        (_ans("10\\%"), "10\\%", True),
    ],
)
def test_notes_traps(response, gold, correct):
    assert score(response, gold).correct is correct
    assert score_batch([response], [gold], workers=WORKERS)[0].correct is correct


def test_base_subscripts_are_compared():
    # math-verify drops "_8"; when both sides carry a base the scorer checks it.
    assert score(_ans("52_8"), "52_8").correct
    assert score(_ans("52_{8}"), "52_8").correct
    assert not score(_ans("52_9"), "52_8").correct
    assert not score(_ans("53_8"), "52_8").correct
    # documented leniency (left to math-verify): the digits without the base count as correct
    assert score(_ans("52"), "52_8").correct


# --------------------------------------------------------------------------------------------------
# Extraction rules


@pytest.mark.parametrize(
    ("response", "fallbacks", "expected"),
    [
        # the strict rule
        ("<think>a</think><answer>5</answer>", (), ("5", "answer")),
        ("<answer>\n 5 \n</answer>", (), ("5", "answer")),
        # multiple spans: the last one wins
        ("<answer>4</answer> then <answer>5</answer>", (), ("5", "answer")),
        ("<think>x</think><answer>4</answer><answer>5</answer>", (), ("5", "answer")),
        # nested: the innermost, last-opened span
        ("<answer>1<answer>5</answer></answer>", (), ("5", "answer")),
        # a closed span followed by an unclosed one: the closed one
        ("<answer>5</answer> <answer>6", (), ("5", "answer")),
        # stray closing tag
        ("<answer>5</answer>6</answer>", (), ("5", "answer")),
        # \boxed inside the span is what is judged; unbalanced \boxed leaves the span text
        ("<answer>so \\boxed{\\frac{1}{2}} done</answer>", (), ("\\frac{1}{2}", "answer")),
        ("<answer>\\boxed{1} or \\boxed{2}</answer>", (), ("2", "answer")),
        ("<answer>\\boxed{\\boxed{3}}</answer>", (), ("3", "answer")),
        ("<answer>\\boxed{5</answer>", (), ("\\boxed{5", "answer")),
        ("<answer>\\boxed{}</answer>", (), ("\\boxed{}", "answer")),
        # answers only from outside <think>
        ("<think><answer>5</answer></think>", (), (None, "none")),
        ("<think><answer>5</answer></think>", FALLBACKS, (None, "none")),
        ("<think>\\boxed{5} 7</think>", FALLBACKS, (None, "none")),
        ("<think><answer>5</answer></think><answer>6</answer>", (), ("6", "answer")),
        # an unclosed <think> is still reasoning: nothing after it counts (truncated completion)
        ("<think>the answer is <answer>5</answer>", FALLBACKS, (None, "none")),
        ("prefix 3 <think>the answer is <answer>5</answer>", FALLBACKS, ("3", "last_number")),
        ("<think>a</think><answer>4</answer><think>b <answer>5</answer>", (), ("4", "answer")),
        # missing / unclosed answer tags: strict finds nothing, fallbacks report which rule fired
        ("<think>a</think>The answer is 5.", (), (None, "none")),
        ("<think>a</think>The answer is 5.", FALLBACKS, ("5", "last_number")),
        ("<think>a</think>The answer is \\boxed{5}.", FALLBACKS, ("5", "boxed")),
        ("<think>a</think>The answer is \\boxed{5}.", ("last_number",), ("5", "last_number")),
        ("<think>a</think>\\boxed{\\frac{1}{2}} 7", ("last_number", "boxed"), ("7", "last_number")),
        ("<think>a</think>\\boxed{\\frac{1}{2}} 7", ("boxed", "last_number"), ("\\frac{1}{2}", "boxed")),
        ("<think>a</think><answer>\\boxed{5}", (), (None, "none")),
        ("<think>a</think><answer>\\boxed{5}", ("boxed",), ("5", "boxed")),
        ("<think>a</think><answer> 5", ("boxed",), (None, "none")),
        ("<think>a</think><answer> 5", FALLBACKS, ("5", "last_number")),
        # boxed fallback: inside an unclosed answer part if there is one
        ("\\boxed{3} <answer> \\boxed{5}", ("boxed",), ("5", "boxed")),
        ("\\boxed{3} <answer> 5", ("boxed",), (None, "none")),
        ("\\boxed{3} <answer> 5", FALLBACKS, ("5", "last_number")),
        # boxed fallback: unbalanced braces are skipped, nested ones are fine
        ("\\boxed{5", ("boxed",), (None, "none")),
        ("\\boxed{4} \\boxed{5", ("boxed",), ("4", "boxed")),
        ("\\boxed{\\frac{1}{\\sqrt{2}}}", ("boxed",), ("\\frac{1}{\\sqrt{2}}", "boxed")),
        ("\\boxed {x^{2}}", ("boxed",), ("x^{2}", "boxed")),
        ("\\boxed{\\{1, 2\\}}", ("boxed",), ("\\{1, 2\\}", "boxed")),
        # an empty answer span is no answer; fallbacks may still apply
        ("<answer>  </answer>", (), (None, "none")),
        ("<answer></answer> 5", FALLBACKS, ("5", "last_number")),
        # last_number details
        ("no digits here", FALLBACKS, (None, "none")),
        ("it is -3", FALLBACKS, ("-3", "last_number")),
        ("5-3", FALLBACKS, ("3", "last_number")),
        ("total 1,234 apples", FALLBACKS, ("1,234", "last_number")),
        ("pi is 3.14.", FALLBACKS, ("3.14", "last_number")),
        ("x2 and abc123", FALLBACKS, (None, "none")),
        ("", FALLBACKS, (None, "none")),
    ],
)
def test_extract_answer(response, fallbacks, expected):
    assert extract_answer(response, fallbacks) == expected


def _reference_last_boxed(text: str) -> str | None:
    """Obvious-but-slow spec of the boxed rule: try each "\\boxed{" from the last, scan for its match."""
    for m in reversed(list(re.finditer(r"\\boxed\s*\{", text))):
        depth, i = 0, m.end() - 1
        while i < len(text):
            if text[i] == "\\":
                i += 2
                continue
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth == 0:
                return text[m.end() : i]
            i += 1
    return None


def _reference_last_number(text: str) -> str | None:
    found = list(scoring._LAST_NUMBER_RE.finditer(text))
    return found[-1].group(0) if found else None


_EXTRACTION_ALPHABET = st.sampled_from([*"{}\\0123456789,.-x ", "\\boxed{", "\\boxed {", "\\{", "\\}"])


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.lists(_EXTRACTION_ALPHABET, max_size=40).map("".join))
def test_fast_extraction_helpers_match_reference(text):
    assert scoring._last_boxed(text) == _reference_last_boxed(text)
    assert scoring._last_number(text) == _reference_last_number(text)


def test_fallbacks_are_reported_and_strict_mode_disables_them():
    response = "<think>2+2</think>So the answer is \\boxed{4}"
    assert score(response, "4") == Score("4", True, "boxed")
    assert score(response, "4", fallbacks=()) == Score(None, False, "none")
    assert score("<think>2+2</think>the result: 4", "4") == Score("4", True, "last_number")
    assert score("<think>2+2</think>the result: 4", "4", fallbacks=("boxed",)) == Score(None, False, "none")
    batch = score_batch([response, response], ["4", "4"], fallbacks=())
    assert batch == [Score(None, False, "none")] * 2


def test_wrong_answer_span_is_not_rescued_by_fallbacks():
    # A complete answer span decides, even when a correct \boxed sits elsewhere.
    assert score("<think>a</think>\\boxed{5} <answer>6</answer>", "5") == Score("6", False, "answer")


# --------------------------------------------------------------------------------------------------
# has_format


@pytest.mark.parametrize(
    ("response", "ok"),
    [
        ("<think>r</think><answer>5</answer>", True),
        ("  \n<think> r </think>\n\n<answer> 5 </answer>\n ", True),
        ("<think>\nmulti\nline\n</think> <answer>\\frac{1}{2}</answer>", True),
        ("<think></think><answer></answer>", True),  # structural check only
        ("<answer>5</answer>", False),
        ("<think>r</think>", False),
        ("<think>r</think>5", False),
        ("<answer>5</answer><think>r</think>", False),
        ("text <think>r</think><answer>5</answer>", False),
        ("<think>r</think><answer>5</answer> text", False),
        ("<think>r</think> text <answer>5</answer>", False),
        ("<think>r</think><answer>5</answer><answer>6</answer>", False),
        ("<think>r</think><think>s</think><answer>5</answer>", False),
        ("<think>r<think>s</think></think><answer>5</answer>", False),
        ("<think>r</think><answer>5<answer>6</answer></answer>", False),
        ("<think>r <answer>5</answer></think><answer>5</answer>", False),
        ("<think>r</think><answer>5</think></answer>", False),
        ("<think>r</think><answer>5", False),
        ("<think>r<answer>5</answer>", False),
        ("<THINK>r</THINK><ANSWER>5</ANSWER>", False),
        ("", False),
    ],
)
def test_has_format(response, ok):
    assert has_format(response) is ok


def test_has_format_is_linear_on_adversarial_input():
    start = time.perf_counter()
    assert not has_format("<think>" + "</think><answer>" * 50_000)
    assert not has_format("<think>x</think><answer>" + "</answer>" * 50_000)
    assert time.perf_counter() - start < 1.0


# --------------------------------------------------------------------------------------------------
# Argument checks


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"unknown fallback 'boxd'.*boxed, last_number"):
        score(_ans("5"), "5", fallbacks=("boxd",))
    with pytest.raises(ValueError, match=r"unknown fallback.*boxed, last_number"):
        score_batch([_ans("5")], ["5"], fallbacks=("last",))
    with pytest.raises(ValueError, match=r"unknown fallback"):
        extract_answer(_ans("5"), ("answer",))
    with pytest.raises(ValueError, match="sequence of rule names"):
        score(_ans("5"), "5", fallbacks="boxed")
    for bad in (0, -1, 0.0, float("nan"), float("inf"), "5", None, True):
        with pytest.raises(ValueError, match="timeout_s"):
            score(_ans("5"), "5", timeout_s=bad)
        with pytest.raises(ValueError, match="timeout_s"):
            score_batch([_ans("5")], ["5"], timeout_s=bad)
    with pytest.raises(ValueError, match="differ in length"):
        score_batch([_ans("5")], ["5", "6"])
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match="workers"):
            score_batch([_ans("5")], ["5"], workers=bad)
    with pytest.raises(ValueError, match="gold answer is empty"):
        score(_ans("5"), "  ")
    with pytest.raises(TypeError, match="gold must be a str"):
        score(_ans("5"), 5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="response must be a str"):
        score_batch([None], ["5"])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="response must be a str"):
        has_format(b"<think></think>")  # type: ignore[arg-type]
    assert score_batch([], []) == []


# --------------------------------------------------------------------------------------------------
# Fast path


@pytest.mark.parametrize(
    ("pred", "gold", "verdict"),
    [
        ("1,234", "1234", True),
        ("-0", "0", True),
        ("+5", "5", True),
        ("007", "7", True),
        (".5", "0.5", True),
        ("0.50", "\\frac12", True),
        ("-\\frac{3}{4}", "-0.75", True),
        ("\\dfrac{18}{14}", "\\frac{9}{7}", True),
        ("4/2", "2", True),
        ("5.0", "5", True),
        ("1,235", "1234", False),
        ("\\frac{1}{3}", "\\frac{1}{2}", False),
        ("0.33", "\\frac13", False),
        ("1" + "0" * 9000, "1" + "0" * 9000, True),  # beyond int()'s 4300-digit limit
        ("1" + "0" * 9000, "1" + "0" * 8999, False),
        # left to math-verify: near-equal decimals, percent, LaTeX, division by zero
        ("\\frac{1}{3}", "0.333333", None),
        ("0.0000672", "0.0000673", None),
        ("10\\%", "10", None),
        ("\\sqrt{4}", "2", None),
        ("1/0", "1", None),
        ("1.23456789012345678", "1.23456789012345679", None),
    ],
)
def test_fast_path_cases(pred, gold, verdict):
    assert scoring._fast_verdict(pred, gold) is verdict


def _literal() -> st.SearchStrategy[str]:
    sign = st.sampled_from(["", "", "-", "+"])
    integer = st.integers(0, 10**20).map(str)
    commas = st.integers(1000, 10**10).map(lambda n: f"{n:,}")
    decimal = st.builds(lambda a, b: f"{a}.{b}", st.integers(0, 10**6), st.integers(0, 10**9))
    leading = st.builds(lambda z, n: "0" * z + str(n), st.integers(1, 3), st.integers(0, 99))
    frac = st.builds(
        lambda cmd, n, d: f"{cmd}{{{n}}}{{{d}}}",
        st.sampled_from(["\\frac", "\\dfrac", "\\tfrac"]),
        st.integers(-30, 30),
        st.integers(1, 30),
    )
    slash = st.builds(lambda n, d: f"{n}/{d}", st.integers(0, 40), st.integers(1, 40))
    body = st.one_of(integer, commas, decimal, leading, frac, slash, st.integers(0, 9).map(lambda d: f"\\frac{d}7"))
    return st.builds(lambda s, b: s + b, sign, body)


def _near(text: str, delta: float, digits: int) -> str:
    value = scoring._exact_value(text)
    return text if value is None else f"{float(value[0]) + delta:.{digits}f}"


@settings(max_examples=150, deadline=None, derandomize=True)
@given(
    a=_literal(),
    b=_literal(),
    delta=st.sampled_from([0.0, 1e-7, 5e-7, 1e-6, 3e-5, 2e-4, 1.0]),
    digits=st.sampled_from([3, 6, 9]),
    near=st.booleans(),
)
def test_fast_path_agrees_with_math_verify(a, b, delta, digits, near):
    """Wherever the fast path answers, math-verify (as the scorer calls it) gives the same verdict."""
    if near:
        b = _near(a, delta, digits)
    for pred, gold in ((a, b), (b, a)):
        fast = scoring._fast_verdict(pred, gold)
        if fast is not None:
            assert verify.judge_with_deadline(pred, gold, 10.0) is fast, (pred, gold)


def test_fast_path_items_never_reach_the_pool(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a plain-number item was sent to math-verify")

    monkeypatch.setattr(scoring, "judge_in_pool", refuse)
    monkeypatch.setattr(scoring, "judge_with_deadline", refuse)
    responses = [_ans("1,234"), _ans("\\frac{1}{2}"), "<think>1</think> 42", _ans("9" * 20_000)]
    golds = ["1234", "0.5", "42", "9" * 20_000]
    assert [s.correct for s in score_batch(responses, golds)] == [True, True, True, True]
    assert score(_ans("-7"), "-7").correct


def test_overlong_prediction_is_wrong_without_math_verify(monkeypatch):
    monkeypatch.setattr(scoring, "judge_with_deadline", lambda *a: pytest.fail("math-verify was called"))
    long_answer = "x+" * 1000 + "1"
    assert score(_ans(long_answer), "x") == Score(long_answer, False, "answer")


# --------------------------------------------------------------------------------------------------
# The format reward (arXiv 2602.19345 v2, eq. 10)


@pytest.mark.parametrize(("text", "grade"), [
    ("<think> 2+3=5 </think> <answer> 5 </answer>", 1.0),  # the full template
    ("  <think>a</think>\n<answer>5</answer>\n", 1.0),  # whitespace around the blocks is allowed
    ("<think> 2+3=5 </think> so 5 <answer> 5 </answer>", 0.5),  # begins with <think>, ends with </answer>
    ("<think> a </think> <answer> 5 </answer> <answer> 6 </answer>", 0.5),  # two answers: not the template
    ("<think> 2+3 is 5, the answer is 5", 0.25),  # begins with <think> only
    ("<think> a </think> <answer> 5 </answer> trailing words", 0.25),  # text after </answer>
    ("Let me think. <think> a </think> <answer> 5 </answer>", 0.25),  # text before <think>: ends only
    ("the answer is <answer> 5 </answer>", 0.25),
    ("Let me think. <think> a </think> <answer> 5 </answer> done", 0.0),  # text before and after
    ("5", 0.0),
    ("", 0.0),
])
def test_graded_format_reward_eq_10(text, grade):
    assert scoring.format_reward(text) == grade
    assert scoring.format_score(text, "graded") == grade
    assert scoring.format_score(text, "binary") == float(grade == 1.0) == float(has_format(text))


def test_format_score_refuses_unknown_mode():
    with pytest.raises(ValueError, match=r"train\.rewards\.format must be one of graded, binary"):
        scoring.format_score("<think></think><answer>1</answer>", "soft")


# --------------------------------------------------------------------------------------------------
# Timeouts, the pool watchdog, threads

SLOW_ANSWER = "9^{9^{9}}"  # sympy tries to evaluate a 370-million-digit integer


def test_timeout_in_process():
    start = time.perf_counter()
    result = score(_ans(SLOW_ANSWER), "1", timeout_s=0.3)
    assert result == Score(SLOW_ANSWER, False, "answer")
    assert time.perf_counter() - start < 2.0
    # The process-wide timer is left disarmed.
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


def test_timeout_in_pool_keeps_extracted_and_spares_the_rest():
    score_batch([_ans("\\sqrt{2}")], ["\\sqrt{2}"], workers=WORKERS)  # pool up and warm
    pool = verify._pool
    responses = [_ans(SLOW_ANSWER), _ans("\\frac{\\pi}{2}"), _ans(SLOW_ANSWER + " "), _ans("\\sqrt{8}")]
    golds = ["1", "\\frac{\\pi}{2}", "2", "2\\sqrt{2}"]
    start = time.perf_counter()
    results = score_batch(responses, golds, timeout_s=0.5, workers=WORKERS)
    elapsed = time.perf_counter() - start
    assert results == [
        Score(SLOW_ANSWER, False, "answer"),
        Score("\\frac{\\pi}{2}", True, "answer"),
        Score(SLOW_ANSWER, False, "answer"),
        Score("\\sqrt{8}", True, "answer"),
    ]
    # Each slow item was interrupted at 0.5 s by its worker's own timer: no watchdog kill, same pool.
    assert verify._pool is pool
    assert elapsed < 2 * 0.5 + verify.KILL_GRACE_S


def test_watchdog_kills_stuck_workers_and_recovers():
    """A worker that cannot be interrupted (simulated with SIGSTOP) is killed; the batch still finishes."""
    score_batch([_ans("\\sqrt{3}")], ["\\sqrt{3}"], workers=WORKERS)
    pool = verify._pool
    pids = list(pool._processes)
    assert len(pids) == WORKERS
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    responses = [_ans("\\sqrt{5}"), _ans("\\sqrt{6}"), _ans("\\sqrt{7}"), _ans("\\sqrt{10}")]
    golds = ["\\sqrt{5}", "\\sqrt{6}", "\\sqrt{7}", "\\sqrt{10}"]
    start = time.perf_counter()
    try:
        results = score_batch(responses, golds, timeout_s=0.5, workers=WORKERS)
    finally:
        for pid in pids:  # never leave a stopped process behind, whatever happened
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    elapsed = time.perf_counter() - start
    # The two items on the stuck workers time out (text kept); the other two are judged by the new pool.
    assert [s.correct for s in results] == [False, False, True, True]
    assert [s.extracted for s in results] == ["\\sqrt{5}", "\\sqrt{6}", "\\sqrt{7}", "\\sqrt{10}"]
    assert verify._pool is not pool
    assert elapsed < 2 * 0.5 + verify.KILL_GRACE_S + 30  # + a fresh pool's start-up on a loaded machine
    assert score_batch([_ans("\\sqrt{5}")], ["\\sqrt{5}"], workers=WORKERS)[0].correct


def test_score_from_a_worker_thread_uses_the_pool():
    out: list[Score] = []
    errors: list[BaseException] = []

    def run():
        try:
            out.append(score(_ans("\\frac{\\sqrt{3}}{2}"), "\\frac{\\sqrt{3}}{2}"))
            out.append(score(_ans("\\frac{\\sqrt{3}}{3}"), "\\frac{\\sqrt{3}}{2}"))
            out.extend(score_batch([_ans("\\pi")], ["\\pi"]))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(60)
    assert not errors
    assert [s.correct for s in out] == [True, False, True]


def test_duplicates_are_judged_once_and_fanned_out():
    responses = [_ans("\\frac{\\pi}{3}")] * 5 + ["<think>a</think>\\boxed{\\frac{\\pi}{3}}"] * 3
    results = score_batch(responses, ["\\frac{\\pi}{3}"] * 8, workers=WORKERS)
    assert results == [Score("\\frac{\\pi}{3}", True, "answer")] * 5 + [Score("\\frac{\\pi}{3}", True, "boxed")] * 3


# --------------------------------------------------------------------------------------------------
# Fuzzing: 10,000 random and adversarial strings through score_batch

SENTINEL = Path(tempfile.gettempdir()) / f"harness_scoring_pwned_{os.getpid()}"
INJECTIONS = [
    f"__import__('os').system('touch {SENTINEL}')",
    f'__import__("os").system("touch {SENTINEL}")',
    f"eval(\"__import__('os').system('touch {SENTINEL}')\")",
    f'exec(\'open("{SENTINEL}", "w").close()\')',
    f"open('{SENTINEL}', 'w').write('x')",
    f"$(touch {SENTINEL})",
    f"`touch {SENTINEL}`",
    "().__class__.__bases__[0].__subclasses__()",
    "lambda: __import__('os').system('id')",
    "Symbol('x').__class__.__init__.__globals__",
]
FRAGMENTS = [
    "<think>", "</think>", "<answer>", "</answer>", "<answer", "</answer", "\\boxed{", "\\boxed", "{", "}",
    "\\frac{", "\\frac12", "\\sqrt{", "$", "$$", "\\(", "\\)", "\\[", "\\]", "\\left(", "\\right)", "^", "_", "\\,",
    "\\\\", "%", "\\%", "-", "+", ",", ".", " ", "\n", "x", "=", "(", ")", "[", "]", "\\text{", "\\infty", "\\pi",
    "0", "1", "7", "1,234", "-3", "0.5", "1e308", "NaN", "\\cup", "\\in", "i", "\x00", "é", "∞", "\u202e",
]  # fmt: skip
FUZZ_GOLDS = ["5", "1234", "\\frac{9}{7}", "\\left( 3, \\frac{\\pi}{2} \\right)", "x^2+1", "10\\%", "52_8", "-3"]
FUZZ_TIMEOUT_S = 0.5
FUZZ_STRINGS_PER_EXAMPLE = 25
FUZZ_EXAMPLES = 400  # 400 x 25 = 10,000 strings


# Big adversarial pieces are built once, so drawing one is a single cheap choice for hypothesis (this
# keeps generating 10,000 strings fast): up to 5,000 copies of "{", "\\boxed{", "(" ... (huge nested or
# unclosed braces), numbers up to 20,000 digits.
_REPEATED_UNITS = ["{", "}", "\\boxed{", "(", "<answer>", "</think>", "\\frac{", "{{}}", "^{", "\\sqrt{"]
BIG_PIECES = [unit * n for unit in _REPEATED_UNITS for n in (12, 300, 5000)] + [
    sign + "9" * n for sign in ("", "-") for n in (25, 400, 5000, 20_000)
]


def _fuzz_response() -> st.SearchStrategy[str]:
    piece = st.one_of(st.sampled_from(FRAGMENTS + INJECTIONS), st.sampled_from(BIG_PIECES), st.text(max_size=8))
    raw = st.lists(piece, max_size=6).map("".join)
    wrapped = st.builds(lambda t, a: f"<think>{t}</think><answer>{a}</answer>", raw, raw)
    boxed = st.builds(lambda t, a: f"<think>{t}</think>\\boxed{{{a}}}", raw, raw)
    return st.one_of(raw, wrapped, boxed, st.sampled_from(INJECTIONS).map(_ans))


_fuzz_stats = {"strings": 0, "pool_items": 0, "worst_batch_s": 0.0}


@settings(
    max_examples=FUZZ_EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)
@given(
    responses=st.lists(_fuzz_response(), min_size=FUZZ_STRINGS_PER_EXAMPLE, max_size=FUZZ_STRINGS_PER_EXAMPLE),
    gold_offset=st.integers(0, len(FUZZ_GOLDS) - 1),
    fallbacks=st.sampled_from([FALLBACKS, (), ("last_number", "boxed")]),
)
def _fuzz_batch(responses, gold_offset, fallbacks):
    golds = [FUZZ_GOLDS[(gold_offset + i) % len(FUZZ_GOLDS)] for i in range(len(responses))]
    pool_items = {
        (extracted, gold)
        for extracted, gold in ((extract_answer(r, fallbacks)[0], g) for r, g in zip(responses, golds, strict=True))
        if extracted is not None and scoring._quick_verdict(extracted, gold) is None
    }
    start = time.perf_counter()
    results = score_batch(responses, golds, fallbacks=fallbacks, timeout_s=FUZZ_TIMEOUT_S, workers=WORKERS)
    elapsed = time.perf_counter() - start
    # Never hangs: no math-verify item outlives the watchdog's deadline (2 x timeout + grace), and the
    # workers run them side by side; 10 s covers a pool rebuild on a busy machine.
    bound = 10.0 + len(pool_items) * (2 * FUZZ_TIMEOUT_S + verify.KILL_GRACE_S) / WORKERS
    assert elapsed < bound, (elapsed, bound, sorted(pool_items)[:5])
    assert len(results) == len(responses)
    for response, result in zip(responses, results, strict=True):
        assert isinstance(result, Score)
        assert result.fallback in ("answer", "boxed", "last_number", "none")
        assert (result.extracted is None) == (result.fallback == "none")
        assert result.fallback == "none" or result.fallback == "answer" or result.fallback in fallbacks
        assert not (result.correct and result.extracted is None)
        assert has_format(response) in (True, False)
    assert not SENTINEL.exists(), "model text was executed"
    _fuzz_stats["strings"] += len(responses)
    _fuzz_stats["pool_items"] += len(pool_items)
    _fuzz_stats["worst_batch_s"] = max(_fuzz_stats["worst_batch_s"], elapsed)


@pytest.mark.slow
def test_fuzz_10k_strings_never_crash_hang_or_execute():
    SENTINEL.unlink(missing_ok=True)
    score_batch([_ans("\\sqrt{2}")], ["\\sqrt{2}"], workers=WORKERS)  # pool start-up is not part of the bound
    _fuzz_batch()
    assert _fuzz_stats["strings"] >= FUZZ_EXAMPLES * FUZZ_STRINGS_PER_EXAMPLE
    assert not SENTINEL.exists(), "model text was executed"


def _judge_latex_in_worker() -> list[bool]:
    from harness.scoring import score_batch

    preds = ["<think>half</think> <answer>\\frac{1}{2}</answer>", "<answer>$0.5$</answer>"]
    return [s.correct for s in score_batch(preds, ["0.5", "\\frac12"], fallbacks=(), workers=1)]


def test_math_verify_pool_starts_inside_a_loky_worker():
    """Parallel sweep cells run in joblib/loky workers, whose multiprocessing start method is 'loky'. The scorer's
    own workers must not inherit it (a forkserver child that has not imported loky cannot set it): answers that
    need math-verify made such cells fail before."""
    from joblib import Parallel, delayed

    results = Parallel(n_jobs=2, backend="loky")(delayed(_judge_latex_in_worker)() for _ in range(2))
    assert results == [[True, True], [True, True]]


def test_a_loky_worker_that_scored_with_math_verify_exits(tmp_path):
    """The scorer's pool is stopped when a multiprocessing child (a loky sweep worker) exits; before, the
    worker's exit joined the pool's idle processes forever and `harness sweep` hung after its report."""
    import subprocess
    import sys

    script = tmp_path / "sweep_like.py"
    script.write_text(
        "from joblib import Parallel, delayed\n"
        "from joblib.externals.loky import get_reusable_executor\n"
        "from tests.test_scoring import _judge_latex_in_worker\n"
        "if __name__ == '__main__':\n"
        "    print(Parallel(n_jobs=2, backend='loky')(delayed(_judge_latex_in_worker)() for _ in range(2)))\n"
        "    get_reusable_executor().shutdown(wait=True)\n"
    )
    repo = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, str(script)], cwd=repo, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(repo)})
    assert out.returncode == 0, out.stderr[-2000:]
    assert "[[True, True], [True, True]]" in out.stdout
