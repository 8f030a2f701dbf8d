"""The one answer scorer of the project, shared by the trainer's rewards and the evaluator.

A verdict has two steps:

1. **Extraction** (:func:`extract_answer`): the judged text comes ONLY from the last complete
   ``<answer>...</answer>`` span found after the reasoning, never from inside ``<think>``. If the span
   holds a ``\\boxed{...}``, the boxed content is judged. Without a complete span, optional fallbacks
   apply in order: ``"boxed"`` (last balanced ``\\boxed{...}``) and ``"last_number"``.
   ``fallbacks=()`` is the strict rule the trainer's accuracy reward uses.
2. **Comparison**: when both sides are plain numbers (``-1,234.5``) or simple fractions (``\\frac{9}{7}``,
   ``9/7``) an exact fast path decides (digit strings / ``fractions.Fraction``, no sympy); a differential
   test checks it agrees with math-verify wherever it answers. Everything else goes to math-verify 0.9:
   ``parse`` with ``[LatexExtractionConfig(), ExprExtractionConfig()]`` on text wrapped in ``$...$``
   (a bare ``\\dfrac{9}{7}`` parses to nothing), then ``verify(gold, pred)``, gold first (asymmetric).

math-verify runs under a deadline in a process pool (:mod:`harness.verify` says why and how).

Deliberate departures from raw math-verify (each tested):

- ``1\\,000`` (LaTeX thin space as thousands separator) and a leading ``+`` are normalised before
  parsing: math-verify reads them as ``1*000 = 0`` and (for ``+1,234``) the set ``{1, 234}``.
- Base-subscripted numerals on both sides (``52_8`` vs ``52_9``) are compared here: math-verify drops
  the subscript and calls them equal. ``52`` for ``52_8`` is still accepted (left to math-verify).
- A prediction longer than ``_MAX_JUDGED_CHARS`` (1000; real golds are at most ~50) scores incorrect
  without parsing: math-verify needs seconds for such text, and a degenerate batch would otherwise
  cost a full timeout per sample.

Known limits (math-verify 0.9.0 behaviour kept; asserted in ``tests/test_scoring.py``):

- False positives: decimals are compared after rounding to 6 places (``0.0000672`` == ``0.0000673``);
  units are stripped, including their exponents (``864 \\mbox{ inches}^2`` == ``... inches}^3``);
  ``1/2004!`` == ``1/2006!`` and ``1/2^{99}`` == ``1/2^{98}``.
- Percent is compared by its face value: ``10\\%`` matches ``10`` but not ``0.1``.
- A prediction that mixes a number with plain words ("18 dollars") is read as a product of symbols
  once wrapped in ``$...$`` and scores incorrect; ``18 \\text{ dollars}`` is fine. The project's
  prompt asks for the final answer only, so we do not guess at units.
- Deeply nested brackets make math-verify's parser exponentially slow (``{{{{{{{{{1}}}}}}}}}`` takes
  seconds): such answers hit the timeout and score incorrect.
"""

from __future__ import annotations

import math
import os
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

from harness.verify import judge_in_pool, judge_with_deadline

__all__ = ["FALLBACKS", "FORMAT_REWARDS", "Score", "extract_answer", "format_reward", "format_score", "has_format",
           "score", "score_batch"]

FALLBACKS: tuple[str, ...] = ("boxed", "last_number")
"""Allowed fallback rules, in the default order of application."""

_THINK_OPEN, _THINK_CLOSE = "<think>", "</think>"
_ANSWER_OPEN, _ANSWER_CLOSE = "<answer>", "</answer>"
_TAGS = (_THINK_OPEN, _THINK_CLOSE, _ANSWER_OPEN, _ANSWER_CLOSE)


@dataclass(frozen=True)
class Score:
    """One verdict.

    Attributes:
        extracted: the answer text that was judged (``None`` if nothing was found).
        correct: whether it matches the gold answer.
        fallback: which extraction rule fired: ``"answer"`` (last ``<answer>`` span), ``"boxed"``
            (``\\boxed{}`` fallback), ``"last_number"``, or ``"none"``.
    """

    extracted: str | None
    correct: bool
    fallback: str


# --------------------------------------------------------------------------------------------------
# Argument checks


def _check_fallbacks(fallbacks: Sequence[str]) -> tuple[str, ...]:
    if isinstance(fallbacks, str):
        # A bare string would iterate as characters and fail with a confusing message.
        raise ValueError(f"fallbacks must be a sequence of rule names, not the string {fallbacks!r}")
    out = tuple(fallbacks)
    for name in out:
        if name not in FALLBACKS:
            raise ValueError(f"unknown fallback {name!r}; allowed: {', '.join(FALLBACKS)} (or () for strict)")
    return out


def _check_timeout(timeout_s: float) -> float:
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, int | float):
        raise ValueError(f"timeout_s must be a positive number of seconds, got {timeout_s!r}")
    if not math.isfinite(timeout_s) or timeout_s <= 0:
        raise ValueError(f"timeout_s must be a positive, finite number of seconds, got {timeout_s!r}")
    return float(timeout_s)


def _check_text(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a str, got {type(value).__name__}")
    return value


def _check_gold(gold: object) -> str:
    gold = _check_text(gold, "gold")
    if not gold.strip():
        # An empty gold is a data bug; scoring it "incorrect" would hide it inside a reward curve.
        raise ValueError("gold answer is empty")
    return gold


# --------------------------------------------------------------------------------------------------
# Format and extraction


def has_format(response: str) -> bool:
    """Whether ``response`` is exactly ``<think> ... </think> <answer> ... </answer>``.

    Whitespace is allowed around and between the blocks; there must be exactly one think block followed
    by exactly one answer block, nothing but whitespace outside them, and no tag inside another block
    (so no nesting). Block contents may be empty: this is a structural check only, the accuracy reward
    judges the content.

    Implemented with counts and index checks rather than one regex so that adversarial inputs with
    thousands of tags stay linear-time.
    """
    _check_text(response, "response")
    s = response.strip()
    if not (s.startswith(_THINK_OPEN) and s.endswith(_ANSWER_CLOSE)):
        return False
    if any(s.count(tag) != 1 for tag in _TAGS):
        return False
    # With one of each tag, "<think>" first and "</answer>" last, the only remaining requirement is
    # "</think>" before "<answer>" with only whitespace in between.
    think_end = s.index(_THINK_CLOSE) + len(_THINK_CLOSE)
    answer_start = s.index(_ANSWER_OPEN)
    return think_end <= answer_start and not s[think_end:answer_start].strip()


FORMAT_REWARDS: tuple[str, ...] = ("graded", "binary")
"""``train.rewards.format``: the paper's graded reward (eq. 10) or 0/1 for the exact template."""


def format_reward(response: str) -> float:
    """The format reward of arXiv 2602.19345 v2, eq. (10):

    * 1 when the whole template ``<think> … </think> <answer> … </answer>`` is satisfied (:func:`has_format`);
    * 0.5 when the text begins with ``<think>`` AND ends with ``</answer>`` (leading/trailing whitespace aside);
    * 0.25 when it begins with ``<think>`` OR ends with ``</answer>``;
    * 0 otherwise.
    """
    if has_format(response):
        return 1.0
    s = response.strip()
    begins, ends = s.startswith(_THINK_OPEN), s.endswith(_ANSWER_CLOSE)
    return 0.5 if begins and ends else 0.25 if begins or ends else 0.0


def format_score(response: str, mode: str = "graded") -> float:
    """The format reward of ``response`` in ``mode`` (:data:`FORMAT_REWARDS`): :func:`format_reward` or
    ``float(has_format(response))``."""
    if mode == "graded":
        return format_reward(response)
    if mode == "binary":
        return float(has_format(response))
    raise ValueError(f"train.rewards.format must be one of {', '.join(FORMAT_REWARDS)}, got {mode!r}")


def _after_thinking(response: str) -> str:
    """The part of ``response`` that is not reasoning.

    That is the text after the last ``</think>`` (the whole response if there is none), cut at any
    ``<think>`` left open there: an unclosed think block (a completion truncated mid-thought) is still
    reasoning and must never provide the answer.
    """
    close = response.rfind(_THINK_CLOSE)
    region = response[close + len(_THINK_CLOSE) :] if close >= 0 else response
    still_open = region.find(_THINK_OPEN)
    return region[:still_open] if still_open >= 0 else region


def _last_answer_span(region: str) -> str | None:
    """Content of the last complete ``<answer>...</answer>`` span, or ``None``.

    "Last" means the last opening tag that has a closing tag after it; its content ends at the first
    closing tag after it, so stray or nested tags never end up inside the judged text.
    """
    close = region.rfind(_ANSWER_CLOSE)
    if close < 0:
        return None
    start = region.rfind(_ANSWER_OPEN, 0, close)
    if start < 0:
        return None
    start += len(_ANSWER_OPEN)
    return region[start : region.find(_ANSWER_CLOSE, start)]


_BOXED_RE = re.compile(r"\\boxed\s*\{")
_BRACE_OR_ESCAPE_RE = re.compile(r"\\.|[{}]", re.DOTALL)


def _last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` whose braces balance, or ``None``.

    Braces are matched with a stack in one pass over the braces only (escaped ``\\{``/``\\}`` do not
    count), starting at the first candidate: nothing before it can close a later brace. Deeply nested or
    unclosed inputs therefore cost O(n), not one rescan per candidate.
    """
    starts = [m.end() - 1 for m in _BOXED_RE.finditer(text)]  # index of each "{"
    if not starts:
        return None
    match: dict[int, int] = {}
    stack: list[int] = []
    for token in _BRACE_OR_ESCAPE_RE.finditer(text, starts[0]):
        c = token.group()
        if c == "{":
            stack.append(token.start())
        elif c == "}" and stack:
            match[stack.pop()] = token.start()
    for open_at in reversed(starts):
        if open_at in match:
            return text[open_at + 1 : match[open_at]]
    return None


# A number that stands on its own: a minus sign counts only when it is not a binary operator (nothing
# word-like right before it), and digits glued to letters ("x2", "abc123") are not a number.
_LAST_NUMBER_RE = re.compile(r"(?:(?<![\w)\]}.])-)?(?<![\w.])(?:\d{1,3}(?:,\d{3})+(?![\d,])|\d+)(?:\.\d+)?")
_NUMBER_CHARS_RUN_RE = re.compile(r"[0-9,.\-]*")
_DIGIT_RE = re.compile(r"\d")


def _last_number(text: str) -> str | None:
    """The last number in ``text`` (as written, e.g. ``1,234``), or ``None``.

    The answer is almost always in the last run of number characters (digits, ``,.-``), so the last few
    runs are scanned alone, last first (a 35 kB adversarial completion then costs a few C-level passes);
    if they only hold digits glued to letters ("x2"), one regex pass over the rest decides.
    """
    rev = text[::-1]
    pos = 0
    for _ in range(4):
        digit = _DIGIT_RE.search(rev, pos)
        if digit is None:
            return None
        run_end = _NUMBER_CHARS_RUN_RE.match(rev, digit.start()).end()  # the run, read backwards
        start, stop = len(text) - run_end, len(text) - digit.start()  # the run in text: [start, stop)
        found = _last_match(text, start, min(len(text), stop + 1))
        if found is not None:
            return found
        pos = run_end
    return _last_match(text, 0, len(text) - pos)


def _last_match(text: str, start: int, stop: int) -> str | None:
    last = None
    for last in _LAST_NUMBER_RE.finditer(text, start, stop):  # noqa: B007 - we want the final match
        pass
    return last.group(0) if last is not None else None


def extract_answer(response: str, fallbacks: Sequence[str] = FALLBACKS) -> tuple[str | None, str]:
    """The text to judge and the rule that produced it: ``(text, rule)``.

    Rules, in order:

    - ``"answer"``: the last complete, non-empty ``<answer>...</answer>`` span after the reasoning
      (text after the last ``</think>``; an unclosed ``<think>`` hides everything after it). If the span
      holds a balanced ``\\boxed{...}``, its content is the answer. This is the strict rule and always on.
    - ``"boxed"`` (fallback): the last balanced ``\\boxed{...}`` after the reasoning; if an (unclosed)
      ``<answer>`` tag is present, only the text after it is searched.
    - ``"last_number"`` (fallback): the last number after the reasoning.

    Returns ``(None, "none")`` when no enabled rule finds anything. ``fallbacks=()`` means strict.
    """
    _check_text(response, "response")
    enabled = _check_fallbacks(fallbacks)
    region = _after_thinking(response)

    span = _last_answer_span(region)
    if span is not None and span.strip():
        boxed = _last_boxed(span)
        text = boxed if boxed is not None and boxed.strip() else span
        return text.strip(), "answer"

    for rule in enabled:
        if rule == "boxed":
            opened = region.rfind(_ANSWER_OPEN)
            where = region[opened + len(_ANSWER_OPEN) :] if opened >= 0 else region
            boxed = _last_boxed(where)
            if boxed is not None and boxed.strip():
                return boxed.strip(), "boxed"
        elif rule == "last_number":
            number = _last_number(region)
            if number is not None:
                return number, "last_number"
    return None, "none"


# --------------------------------------------------------------------------------------------------
# Fast path: plain numbers and simple fractions

_PLAIN_NUMBER_RE = re.compile(r"([+-]?)(\d{1,3}(?:,\d{3})+|\d+)?(?:\.(\d+))?")
# \frac{a}{b}, \dfrac{a}{b}, \tfrac{a}{b}, \frac12, a/b (integers only), with an optional sign.
_FRACTION_RE = re.compile(
    r"([+-]?)\s*(?:\\[dt]?frac\s*(?:\{\s*([+-]?\d+)\s*\}\s*\{\s*([+-]?\d+)\s*\}|(\d)\s*(\d))|(\d+)\s*/\s*(\d+))"
)
# Above this many significant digits a decimal is not held exactly by math-verify's sympy Float
# (15 significant digits by default), so it may call two different decimals equal: leave those to it.
_FAST_MAX_DECIMAL_DIGITS = 15
# Integers inside fractions are converted with int(); Python refuses strings over 4300 digits.
_FAST_MAX_INT_DIGITS = 1000
# math-verify compares numbers that involve a decimal after rounding to 6 places (``float_rounding``),
# with quirks (1 vs 1.0000001 is False, 0.5 vs 0.5000004 is True). Differences this small are left to
# math-verify so the fast path never disagrees with it; larger ones are unequal under any rounding.
_FAST_NEAR = Fraction(1, 10**4)


def _plain_number(text: str) -> tuple[str, str, str | None] | None:
    """``(sign, integer digits, fraction digits or None)`` if ``text`` is a plain number, else ``None``.

    Plain: optional sign, digits with optional thousands commas (``1,234``), optional ``.digits``
    (``.5`` allowed). Nothing else, so units, percent signs and LaTeX always go to math-verify.
    """
    m = _PLAIN_NUMBER_RE.fullmatch(text.strip())
    if m is None or (m.group(2) is None and m.group(3) is None):
        return None
    return m.group(1), (m.group(2) or "0").replace(",", ""), m.group(3)


def _exact_value(text: str) -> tuple[Fraction, bool] | None:
    """``(value, involves a decimal)`` for a plain number or simple fraction we can hold exactly, else ``None``."""
    plain = _plain_number(text)
    if plain is not None:
        sign, digits, decimals = plain
        if decimals is not None:
            if len((digits + decimals).lstrip("0")) > _FAST_MAX_DECIMAL_DIGITS:
                return None
            return Fraction(f"{sign}{digits}.{decimals}"), True
        if len(digits) > _FAST_MAX_INT_DIGITS:
            return None
        return Fraction(int(sign + digits)), False
    m = _FRACTION_RE.fullmatch(text.strip())
    if m is None:
        return None
    num, den = next((m.group(i), m.group(i + 1)) for i in (2, 4, 6) if m.group(i) is not None)
    if max(len(num), len(den)) > _FAST_MAX_INT_DIGITS or int(den) == 0:
        return None  # x/0 is math-verify's business (zoo)
    value = Fraction(int(num), int(den))
    return (-value if m.group(1) == "-" else value), False


def _fast_verdict(pred: str, gold: str) -> bool | None:
    """Exact verdict when both sides are plain numbers or simple fractions, or ``None`` when math-verify
    must decide. Agrees with math-verify wherever it answers (checked by a differential test).

    Two integers are compared as normalised digit strings (no ``int()``, so a 10,000-digit answer is
    fine); everything else as ``Fraction``. Two exact rationals are equal or not, as in math-verify;
    when a decimal is involved only clearly different values are called unequal (see ``_FAST_NEAR``).
    """
    p, g = _plain_number(pred), _plain_number(gold)
    if p is not None and g is not None and p[2] is None and g[2] is None:
        p_digits, g_digits = p[1].lstrip("0"), g[1].lstrip("0")
        if not p_digits and not g_digits:
            return True  # 0 == -0 == +000
        return p_digits == g_digits and (p[0] == "-") == (g[0] == "-")
    pv, gv = _exact_value(pred), _exact_value(gold)
    if pv is None or gv is None:
        return None
    if pv[0] == gv[0]:
        return True
    if not (pv[1] or gv[1]) or abs(pv[0] - gv[0]) > _FAST_NEAR:
        return False
    return None


# A numeral with an explicit base, "52_8" or "4210_{5}". math-verify drops the subscript, so it calls
# 52_8 and 52_9 equal; when BOTH sides carry a base we decide ourselves.
_BASE_NUMERAL_RE = re.compile(r"([0-9A-Za-z]+)_(?:\{\s*(\d+)\s*\}|(\d+))")


def _base_verdict(pred: str, gold: str) -> bool | None:
    """Verdict when gold and prediction are both base-subscripted numerals, else ``None``.

    Only tightens math-verify: a prediction without a base ("52" for 52_8) is still left to it.
    """
    p, g = _BASE_NUMERAL_RE.fullmatch(pred.strip()), _BASE_NUMERAL_RE.fullmatch(gold.strip())
    if p is None or g is None:
        return None
    p_digits, g_digits = p.group(1).upper().lstrip("0"), g.group(1).upper().lstrip("0")
    return p_digits == g_digits and int(p.group(2) or p.group(3)) == int(g.group(2) or g.group(3))


# Longest prediction handed to math-verify (or twice the gold's length, if more). Real golds are at most
# ~50 characters; math-verify's LaTeX parser needs about 1 s for 1000 characters of flat text and more
# beyond, so a degenerate generation would cost a full timeout per sample. Longer predictions score
# incorrect at once. (Plain integers of any length still take the exact fast path.)
_MAX_JUDGED_CHARS = 1000


def _quick_verdict(pred: str, gold: str) -> bool | None:
    """Verdict decided without math-verify (plain numbers, fractions, base numerals, over-long
    predictions), or ``None``."""
    verdict = _fast_verdict(pred, gold)
    if verdict is None and _plain_number(gold) is not None and not any(ch.isdigit() for ch in pred):
        # A plain-number gold cannot equal text without a single digit (words, bare symbols, tags):
        # saves a math-verify round trip for every malformed sample of a weak policy.
        verdict = False
    if verdict is None:
        verdict = _base_verdict(pred, gold)
    if verdict is None and len(pred) > max(_MAX_JUDGED_CHARS, 2 * len(gold)):
        verdict = False
    return verdict


# --------------------------------------------------------------------------------------------------
# Public entry points


def score(
    response: str,
    gold: str,
    *,
    fallbacks: Sequence[str] = FALLBACKS,
    timeout_s: float = 5.0,
) -> Score:
    """Judge one response against one gold answer.

    Plain numbers are compared exactly in-process. Otherwise, on the main thread, math-verify runs
    in-process under a ``timeout_s`` deadline (cheap, no pool); from any other thread (where signals
    cannot be used) the item goes to the shared process pool.
    """
    enabled = _check_fallbacks(fallbacks)
    timeout_s = _check_timeout(timeout_s)
    gold = _check_gold(gold)
    extracted, rule = extract_answer(response, enabled)
    if extracted is None:
        return Score(None, False, "none")
    verdict = _quick_verdict(extracted, gold)
    if verdict is None:
        if threading.current_thread() is threading.main_thread():
            verdict = judge_with_deadline(extracted, gold, timeout_s)
        else:
            verdict = judge_in_pool([(extracted, gold)], timeout_s, None)[0]
    return Score(extracted, bool(verdict), rule)


def score_batch(
    responses: Sequence[str],
    golds: Sequence[str],
    *,
    fallbacks: Sequence[str] = FALLBACKS,
    timeout_s: float = 5.0,
    workers: int | None = None,
) -> list[Score]:
    """Judge ``responses[i]`` against ``golds[i]`` for every ``i``; safe from any thread.

    Extraction and the plain-number fast path run here; the remaining items are de-duplicated (groups
    of samples often share an answer) and judged by math-verify in a reused process pool of ``workers``
    processes (default ``os.cpu_count()``), each item under its own ``timeout_s`` deadline. A timed-out
    item scores incorrect with its extracted text kept, and can never hang the batch.
    """
    enabled = _check_fallbacks(fallbacks)
    timeout_s = _check_timeout(timeout_s)
    if len(responses) != len(golds):
        raise ValueError(f"responses and golds differ in length: {len(responses)} vs {len(golds)}")
    if workers is None:
        workers = os.cpu_count() or 1
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a positive integer or None, got {workers!r}")

    scores: list[Score | None] = [None] * len(responses)
    rules = [""] * len(responses)
    slow: dict[tuple[str, str], list[int]] = {}
    for i, (response, gold) in enumerate(zip(responses, golds, strict=True)):
        gold = _check_gold(gold)
        extracted, rule = extract_answer(response, enabled)
        rules[i] = rule
        if extracted is None:
            scores[i] = Score(None, False, "none")
            continue
        verdict = _quick_verdict(extracted, gold)
        if verdict is None:
            slow.setdefault((extracted, gold), []).append(i)
        else:
            scores[i] = Score(extracted, verdict, rule)

    if slow:
        tasks = list(slow)
        verdicts = judge_in_pool(tasks, timeout_s, workers)
        for (extracted, _), verdict, indices in zip(tasks, verdicts, slow.values(), strict=True):
            for i in indices:
                scores[i] = Score(extracted, bool(verdict), rules[i])
    return scores  # type: ignore[return-value]  # every slot is filled above
