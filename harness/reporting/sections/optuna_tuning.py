"""Report section (f): the Optuna temperature studies of the experiment, found through the ``study`` tag of its
runs, in the storage given (``harness report --optuna-storage``) or tagged on the tuning run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from harness import keys as K
from harness.config import slug
from harness.reporting.data import ExperimentData
from harness.reporting.figures import png, study_figure
from harness.reporting.render import Figure, Section, Table
from harness.tracking import mask_url


def optuna_section(data: ExperimentData) -> Section:
    """Every Optuna study tagged on the experiment's runs: its trials, best τ, importances and history."""
    sec = Section("(f) Optuna temperature tuning")
    sec.record["optuna"] = {}
    names = sorted({str(s) for s in data.runs[f"tags.{K.TAG_STUDY}"].dropna() if str(s)})
    if not names:
        sec.notes.append("No Optuna study logged to this experiment (no run has a `study` tag).")
        return sec
    storage = _optuna_storage(data)
    if storage is None:
        sec.notes.append(f"Studies {', '.join(names)} are tagged, but their storage is unknown or masked; pass "
                         "--optuna-storage URL.")
        return sec
    import optuna

    for name in names:
        try:
            study = optuna.load_study(study_name=name, storage=storage)
        except Exception as exc:
            sec.notes.append(f"study {name}: cannot load from {mask_url(storage)} ({type(exc).__name__}: {exc})")
            continue
        _study(sec, study)
    return sec


def _optuna_storage(data: ExperimentData) -> str | None:
    """The studies' storage: the one given (``data.optuna_storage``), else the URL tagged on the newest tuning parent
    run (unless masked), else ``./optuna.db`` when it exists."""
    if data.optuna_storage:
        return data.optuna_storage
    col = f"tags.{K.TAG_OPTUNA_STORAGE}"
    parents = data.runs[data.runs[col].notna()] if col in data.runs.columns else pd.DataFrame()
    if not parents.empty:
        url = str(parents.sort_values("start_time", ascending=False).iloc[0][col])
        if "***" not in url:
            return url
    local = Path.cwd() / "optuna.db"
    return f"sqlite:///{local}" if local.exists() else None


def _study(sec: Section, study: Any) -> None:
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    pruned = [t for t in trials if t.state == TrialState.PRUNED]
    states = {s.name: sum(t.state == s for t in trials) for s in TrialState if any(t.state == s for t in trials)}
    objective = study.user_attrs.get(K.STUDY_OBJECTIVE, "objective")
    entry: dict[str, Any] = {"trials": len(trials), "states": states, "objective": objective}
    text = (f"Study **{study.study_name}** ({study.user_attrs.get(K.STUDY_GATE, '?')}, {study.direction.name.lower()} "
            f"{objective}): {len(trials)} trials — " + ", ".join(f"{v} {k}" for k, v in states.items()) + ".")
    if complete:
        best = study.best_trial
        tp = best.user_attrs.get(K.TRIAL_TAU_POS, best.params.get(K.TRIAL_TAU_POS))
        tn = best.user_attrs.get(K.TRIAL_TAU_NEG, best.params.get(K.TRIAL_TAU_NEG))
        text += f" Best: trial {best.number}, τ_pos = {tp:.4g}, τ_neg = {tn:.4g}, {objective} = {best.value:.4f}."
        entry.update(best_trial=best.number, best_value=best.value, best_tau_pos=tp, best_tau_neg=tn,
                     best_params=dict(best.params))
    else:
        sec.notes.append(f"study {study.study_name}: no COMPLETE trial yet.")
    sec.paragraphs.append(text)
    rows = []
    for t in trials:
        dur = t.duration.total_seconds() if t.duration is not None else None
        last = max(t.intermediate_values) if t.intermediate_values else None
        rows.append([str(t.number), t.state.name, "—" if t.value is None or t.state != TrialState.COMPLETE
                     else f"{t.value:.4f}", _g(t.user_attrs.get(K.TRIAL_TAU_POS, t.params.get(K.TRIAL_TAU_POS))),
                     _g(t.user_attrs.get(K.TRIAL_TAU_NEG, t.params.get(K.TRIAL_TAU_NEG))),
                     "—" if last is None else str(last),
                     "—" if dur is None else f"{dur:.0f}", str(t.user_attrs.get(K.TRIAL_FAIL_REASON, ""))[:80]])
    best_row = {i for i, t in enumerate(trials) if complete and t.number == study.best_trial.number}
    sec.tables.append(Table(["trial", "state", objective, "τ_pos", "τ_neg", "last step", "seconds", "note"], rows,
                            best_row, caption=f"Trials of {study.study_name} (best marked)."))
    if len(complete) >= 2:
        try:
            import warnings

            import optuna

            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                imp = optuna.importance.get_param_importances(study)
            entry["importances"] = imp
            sec.tables.append(Table(["parameter", "importance"], [[k, f"{v:.3f}"] for k, v in imp.items()],
                                    caption="Parameter importances (Optuna's default importance evaluator)."))
            for w in caught:  # e.g. too few trials to tell the parameters apart: say so on the page
                if issubclass(w.category, UserWarning):
                    sec.notes.append(f"study {study.study_name}, importances: {w.message}")
            if len(imp) == 1:
                sec.notes.append(f"study {study.study_name}: one tuned parameter (τ tied), so its importance "
                                 "is 1 by construction.")
        except Exception as exc:
            sec.notes.append(f"study {study.study_name}: parameter importances unavailable ({exc}).")
    else:
        sec.notes.append(f"study {study.study_name}: parameter importances need at least 2 COMPLETE trials.")
    sec.figures.append(Figure(f"fig_optuna_{slug(study.study_name)}.png",
                              png(study_figure(study, trials, complete, pruned, objective)),
                              f"{study.study_name}: objective by trial with the best so far (left), against "
                              "τ_pos (middle; pruned trials as ticks on the axis), and the intermediate values "
                              "the pruner saw (right; pruned trials grey, × where they were stopped)."))
    sec.record["optuna"][study.study_name] = entry


def _g(value: Any) -> str:
    return "—" if value is None else f"{float(value):.4g}"
