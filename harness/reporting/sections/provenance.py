"""Report section (k): provenance, what a reader needs to rerun the report's numbers (read from the cells' tags,
params and evaluation metrics; :mod:`harness.provenance` writes the tags)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import pandas as pd

from harness import keys as K
from harness.reporting.data import ExperimentData
from harness.reporting.render import Section, Table


def _values(frame: pd.DataFrame, column: str) -> list[str]:
    if column not in frame.columns:
        return []
    return sorted({str(v) for v in frame[column].dropna() if str(v) not in ("", "None")})


def _join(values: Iterable[str]) -> str:
    values = list(values)
    return ", ".join(values) if values else "—"


def provenance_section(data: ExperimentData) -> Section:
    """Code, packages, hardware, seeds, decoding and loss settings of the cells in this report."""
    sec = Section("(k) Provenance")
    cells = data.cells
    prov: dict[str, Any] = {}
    if cells.empty:
        sec.notes.append("No finished cell: nothing to describe.")
        sec.record["provenance"] = prov
        return sec
    versions: dict[str, set[str]] = {}
    for blob in _values(cells, f"tags.{K.TAG_VERSIONS}"):
        for name, v in json.loads(blob).items():
            versions.setdefault(name, set()).add(v)
    for v in _values(cells, f"tags.{K.TAG_VLLM_VERSION}"):
        versions.setdefault("vllm (evaluator)", set()).add(v)
    prov["versions"] = {k: sorted(v) for k, v in sorted(versions.items())}
    prov["git_commit"] = _values(cells, f"tags.{K.TAG_GIT_COMMIT}")
    prov["git_dirty"] = _values(cells, f"tags.{K.TAG_GIT_DIRTY}")
    prov["host"] = _values(cells, f"tags.{K.TAG_HOST}")
    prov["seeds"] = sorted({s for g in data.trained for s in g.seeds}, key=lambda s: (len(s), s))
    params = {"model": K.PARAM_MODEL_NAME, "model path": K.PARAM_MODEL_PATH, "backend": K.PARAM_BACKEND_NAME,
              "rollout temperature": K.PARAM_ROLLOUT_TEMPERATURE, "aggregation": K.PARAM_LOSS_AGG,
              "ratio level": K.PARAM_RATIO_LEVEL, "τ scaling (gate.width)": K.PARAM_GATE_WIDTH,
              "evaluation engine": K.PARAM_EVAL_ENGINE, "evaluation temperature": K.PARAM_EVAL_TEMPERATURE,
              "evaluation top-p": K.PARAM_EVAL_TOP_P}
    for label, param in params.items():
        prov[label] = _values(cells, f"params.{param}")
    decoding = {}
    for b in data.benchmarks:
        k = data.metric_column(cells, K.eval_key(b, K.SAMPLES_PER_PROBLEM))
        m = data.metric_column(cells, K.eval_key(b, K.MAX_NEW_TOKENS))
        decoding[b] = {"k": sorted({int(x) for x in k.dropna()}) if k is not None else [],
                       "max_new_tokens": sorted({int(x) for x in m.dropna()}) if m is not None else []}
    prov["decoding"] = decoding
    sec.record["provenance"] = prov
    rows = [["git commit", _join(c[:12] for c in prov["git_commit"]) + (
                " (uncommitted changes in some cells)" if "true" in prov["git_dirty"] else "")],
            ["hardware", _join(prov["host"])], ["seeds", _join(prov["seeds"])]]
    rows += [[label, _join(prov[label])] for label in params]
    rows += [[f"{b}: samples k / max new tokens", f"{_join(map(str, d['k']))} / {_join(map(str, d['max_new_tokens']))}"]
             for b, d in decoding.items()]
    rows += [[f"version: {name}", _join(v)] for name, v in prov["versions"].items()]
    sec.tables.append(Table(["what", "value"], rows, caption="Distinct values over the report's cells (several "
                                                             "values mean the cells were not all made alike)."))
    return sec
