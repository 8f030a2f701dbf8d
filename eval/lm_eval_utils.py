"""lm-eval hooks of the harness's tasks (``eval/*.yaml``): prompt, keep-all filter and the harness's scorer.

lm-eval imports this file by path (``!function lm_eval_utils.<name>``), in the harness's own environment, so it can
use ``harness.scoring``: the numbers lm-eval reports for these tasks come from the same verdicts as the harness.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from harness.prompts import DEFAULT_TEMPLATE
from harness.scoring import has_format, score
from harness.stats import pass_at_k


def doc_to_text(doc: dict[str, Any]) -> str:
    """The harness-rendered prompt when the doc carries one (``write_lm_eval_task`` adds it), else the default
    instruction around the problem, for runs that let lm-eval apply the chat template itself."""
    prompt = doc.get("prompt")
    return prompt if prompt else DEFAULT_TEMPLATE.replace("{problem}", doc["problem"])


def keep_all(resps: Iterable[Sequence[str]], docs: Sequence[dict[str, Any]]) -> list[list[str]]:
    """Keep every one of the k repeats of each doc (lm-eval's default ``take_first`` keeps only the first)."""
    del docs
    return [list(r) for r in resps]


def process_results(doc: dict[str, Any], results: Sequence[Any]) -> dict[str, float]:
    """Score the k responses of one doc with ``harness.scoring.score`` (default fallbacks).

    ``results[0]`` is the list of k responses left by :func:`keep_all` (a bare string when another filter ran).
    """
    responses = results[0] if isinstance(results[0], list | tuple) else list(results)
    gold = str(doc["answer"])
    verdicts = [score(r, gold) for r in responses]
    n, c = len(verdicts), sum(v.correct for v in verdicts)
    return {
        "acc": c / n,
        "strict_acc": sum(v.correct and v.fallback == "answer" for v in verdicts) / n,
        "format_rate": sum(has_format(r) for r in responses) / n,
        "pass_at_k": pass_at_k(n, c, n),
    }
