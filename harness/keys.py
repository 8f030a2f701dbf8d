"""The metric contract: every metric, tag and artifact name that crosses a module boundary, in one place.

How a number travels from training into the report::

    backend (native / trl / verl)            one dict per rollout batch, history keys: "reward", "it2/gate_weight"
        │  on_step(step, metrics)            (pass_key builds the per-pass names; trl/verl map theirs onto these)
        ▼
    harness.cell.run_tracked                 the cell's own files first: train_history.json, cell_summary.json
        │  harness.tracking.RunLogger        prefixes: train_key("reward") = "train/reward",
        ▼                                    eval_key("arith", "acc") = "eval/arith/acc"
    MLflow run (one per cell)                metrics + tags (TAG_*) + artifacts (samples_artifact(bench))
        │  harness.reporting.data            reads them back through an explicit MlflowClient, by the same
        ▼                                    functions, and records every key it asked for
    report sections (harness.reporting)      tables, figures, report.json

A producer and a consumer never spell a name twice: both call the functions here, and
``tests/test_keys.py`` runs a real cell and checks that every key the report reads was produced.
"""

from __future__ import annotations

import re

# ----------------------------------------------------------------------------------------------------- history

STEP = "step"  # the 1-based rollout-batch index in every history entry (the MLflow step, never a metric)

# Step-level metrics every backend reports (as far as it can: TRL and verl map their own names onto these).
REWARD = "reward"
REWARD_STD = "reward_std"
REWARD_FORMAT = "reward_format"
REWARD_ACCURACY = "reward_accuracy"
RESPONSE_LENGTH = "response_length"
TRUNCATION_RATE = "truncation_rate"
ENTROPY = "entropy"
TRAINED_FRAC = "trained_frac"
ZERO_VAR_GROUPS = "zero_var_groups"
ZERO_VAR_FRAC = "zero_var_frac"
NO_SIGNAL = "no_signal"  # 1 when every group's rewards were equal: every advantage 0, nothing to learn from the step
REWARD_ZERO_FRAC = "reward_zero_frac"  # fraction of the step's rollouts whose total reward is 0
LR = "lr"
TAU_POS = "tau_pos"  # the temperatures a step ran at (they move with gate.tau_schedule)
TAU_NEG = "tau_neg"
LOSS = "loss"
GRAD_NORM = "grad_norm"
STEP_TIME_S = "step_time_s"
TOKENS = "tokens"
POLICY_LAG = "policy_lag"  # steps between the weights that drew a step's rollouts and the weights that train on them

# Per-pass diagnostics of harness.objective.policy_loss, over unmasked tokens; each also with the suffixes
# SIGN_SUFFIXES (tokens with A > 0 / A <= 0).
RATIO_STD = "ratio_std"
ABS_RATIO_DEV = "abs_ratio_dev"  # mean |r - 1|
ABS_RATIO_DEV_P95 = "abs_ratio_dev_p95"  # 95th percentile of |r - 1|
GATE_WEIGHT = "gate_weight"  # mean gradient weight w(r)
FRAC_W_LT_HALF = "frac_w_lt_0.5"
RATIO_MAX = "ratio_max"
# Kish's effective sample size of the ratios as importance weights, as a fraction of the tokens: (Σr)² / (n·Σr²);
# 1 when every r is equal, small when a few tokens carry most of the weight.
RATIO_ESS = "ratio_ess"
RATIO_STATS = ("ratio_mean", RATIO_STD, "ratio_min", RATIO_MAX, "ratio_p05", "ratio_p95", ABS_RATIO_DEV,
               ABS_RATIO_DEV_P95, GATE_WEIGHT, FRAC_W_LT_HALF, "frac_w_lt_0.1", RATIO_ESS)
# Off-policy corrections (train.loss.off_policy, harness.objective.importance_weights): the behaviour weights
# w = π_prox / π_behaviour as applied (mean), their effective sample size before the cap, and the share of tokens the
# cap changed (truncated by tis, zeroed by mis / decoupled).
IS_WEIGHT = "is_weight"
IS_ESS = "is_ess"
IS_CAPPED_FRAC = "is_capped_frac"
DIAG_TOKENS = "tokens"
CLIP_FRAC = "clip_frac"  # clip only: fraction of tokens whose gradient the clip removes
EUR = "eur"  # Effective Update Ratio (arXiv 2602.19345 eq. 12): per-prompt-group token mean of w, mean over groups
KL = "kl"
SIGN_SUFFIXES = ("", "_pos", "_neg")
PASS_LOSS = "loss"
PASS_GRAD_NORM = "grad_norm"

_PASS_KEY = re.compile(r"it(\d+)/(.+)")


def pass_key(pass_index: int, stat: str) -> str:
    """History key of a diagnostic of the ``pass_index``-th (1-based) pass over a rollout batch: ``it2/gate_weight``."""
    if pass_index < 1:
        raise ValueError(f"pass_index must be >= 1, got {pass_index}")
    return f"it{pass_index}/{stat}"


def parse_pass_key(key: str) -> tuple[int, str] | None:
    """``"it2/gate_weight"`` -> ``(2, "gate_weight")``; None for any other key (also a ``train/`` prefixed one)."""
    m = _PASS_KEY.fullmatch(key)
    return (int(m.group(1)), m.group(2)) if m else None


# ------------------------------------------------------------------------------------------------------ MLflow

TRAIN = "train"
EVAL = "eval"
EVAL_INITIAL = "eval_initial"  # the starting checkpoint, evaluated by the same settings
MEAN_ACCURACY = "mean_accuracy"
# The mean over benchmarks of the strict accuracy on each benchmark's selection half (harness.stats.split_problems):
# what anything that selects (harness tune, a best τ) optimises, so the test half stays unseen.
MEAN_SELECTION_ACCURACY = "mean_selection_accuracy"
TRAIN_TIME_S = "train_time_s"
LEARNING_SIGNAL = "learning_signal"  # a cell summary's counts of steps without signal (harness.stability)
EVAL_TIME_S = "eval_time_s"
TUNE_OBJECTIVE = "tune/objective"


def train_key(stat: str, pass_index: int | None = None) -> str:
    """MLflow name of a training metric: ``train/reward``, or ``train/it2/gate_weight`` with ``pass_index``."""
    return f"{TRAIN}/{stat if pass_index is None else pass_key(pass_index, stat)}"


def eval_key(bench: str, metric: str, prefix: str = EVAL) -> str:
    """MLflow name of an evaluation metric: ``eval/<benchmark>/<metric>`` (``eval_initial/...`` for the start)."""
    return f"{prefix}/{bench}/{metric}"


def mean_accuracy_key(prefix: str = EVAL) -> str:
    """``eval/mean_accuracy``: the mean over benchmarks of their accuracy."""
    return f"{prefix}/{MEAN_ACCURACY}"


def parse_eval_key(key: str, prefix: str = EVAL) -> tuple[str, str] | None:
    """``"eval/arith/acc"`` -> ``("arith", "acc")``; None for anything else (``eval/mean_accuracy`` included)."""
    parts = key.split("/")
    return (parts[1], parts[2]) if len(parts) == 3 and parts[0] == prefix else None


def sweep_key(stat: str) -> str:
    """Parent-run metric of a sweep: ``sweep/finished``, ``sweep/failed``, ..."""
    return f"sweep/{stat}"


def tune_key(gate: str, stat: str) -> str:
    """Parent-run metric of a tuning driver: ``tune/<gate>/best_value``."""
    return f"tune/{gate}/{stat}"


# Evaluation metrics per benchmark that consumers read by name (the evaluator writes more: pass_at_k, ...).
ACC = "acc"
ACC_CI_LOW = "acc_ci_low"
ACC_CI_HIGH = "acc_ci_high"
STRICT_ACC = "strict_acc"  # the <answer> span only, as the paper extracts (acc: with the boxed / last-number fallbacks)
STRICT_ACC_CI_LOW = "strict_acc_ci_low"
STRICT_ACC_CI_HIGH = "strict_acc_ci_high"
SELECTION_STRICT_ACC = "selection_strict_acc"  # strict accuracy on the benchmark's selection half
# Fields of a per-sample evaluation record (eval/samples/<benchmark>.jsonl) that the report scores by.
RECORD_CORRECT, RECORD_STRICT_CORRECT = "correct", "strict_correct"
N_PROBLEMS = "n_problems"
N_TOTAL = "n_total"  # problems in the benchmark; above n_problems when eval.limit cut it

# The experiment tag MLflow 3's UI reads to pick an experiment's landing page (a training experiment opens on runs)
# where the UI has no GenAI / Model training switch; where it has one (3.17), the URL's workflowType picks it.
TAG_EXPERIMENT_KIND = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
UI_WORKFLOW_TYPE = "machine_learning"

# Tags of a cell run.
TAG_GATE = "gate"
TAG_TAU_POS = "tau_pos"
TAG_TAU_NEG = "tau_neg"
TAG_EPS_LOW = "eps_low"
TAG_EPS_HIGH = "eps_high"
TAG_GATE_PARAMS = "gate_params"  # a ratio-control method's own keys, "clip_c=3 ..." (empty for the others)
TAG_WIDTH = "width"
TAG_NU = "nu"  # tail index of the student gate family
TAG_TAU_SCHEDULE = "tau_schedule"  # constant | linear | cosine | eur_target
TAG_EUR_TARGET = "eur_target"
TAG_SEED = "seed"
TAG_STALENESS = "staleness"  # train.staleness: the policy lag of the cell's rollouts (0: synchronous)
TAG_BACKEND = "backend"
TAG_MODEL = "model"
TAG_MODEL_PROVENANCE = "model_provenance"  # where the starting weights come from, when the build says (build_info)
TAG_TASK = "task"
TAG_GIT_COMMIT = "git_commit"
TAG_GIT_DIRTY = "git_dirty"  # true: the run's code had uncommitted changes to tracked files
TAG_VERSIONS = "versions"  # JSON {distribution: version} of the packages that change results
TAG_HOST = "host"  # CPU model and cores, GPU model(s)
TAG_VLLM_VERSION = "vllm_version"  # the evaluator's vLLM (its own environment), when the vllm engine ran
TAG_CONFIG_HASH = "config_hash"  # cells with one hash compute the same thing; a FINISHED one is never rerun
TAG_FAILURE_REASON = "failure_reason"
TAG_WARNING = "harness.warning"  # a finished run's warning (e.g. most steps had no learning signal)
TAG_SUPERSEDED_BY = "superseded_by"  # a RUNNING run a kill left behind, continued by this run id
TAG_PROCESS = "harness.process"  # host:pid:start of the process that logs the run (tells a killed run from a live one)
TAG_INADMISSIBLE = "inadmissible"  # gate.allow_inadmissible=true: the admissibility properties the gate fails
TAG_RUN_NAME = "mlflow.runName"
# Tags of tuning trials and parent runs.
TAG_STUDY = "study"
TAG_TRIAL = "trial"
TAG_OPTUNA_STATE = "optuna_state"
TAG_PRUNED_AT_STEP = "pruned_at_step"
TAG_OPTUNA_STORAGE = "optuna_storage"
TAG_SWEEP = "sweep"  # set on every parent run (sweep or tuning driver): its sweep name
TAG_CELLS = "cells"
TAG_REPORT = "harness.report"  # the run that holds a report when the experiment has no parent run

# Artifacts of a cell run.
CONFIG_ARTIFACT = "config.yaml"
HISTORY_FILE = "train_history.json"
SUMMARY_FILE = "cell_summary.json"
PENDING_UPLOAD_FILE = "pending_upload.json"  # in a cell's output dir: its MLflow run lacks what its files hold
REPORT_ARTIFACT_DIR = "report"


def samples_artifact(bench: str, prefix: str = EVAL) -> str:
    """Per-sample records of one benchmark in a cell run's artifacts: ``eval/samples/<benchmark>.jsonl``."""
    return f"{prefix}/samples/{bench}.jsonl"


# ---------------------------------------------------------------------------------------------------- config

# Config keys that say where things are or how they are shown, not what is computed: left out of the config hash
# (so moving a store or a cache reruns nothing) and out of the parameters that tell two configurations apart.
HASH_IGNORED = ("output_dir", "cells_dir", "resume", "cache_dir", "data_dir", "tracking", "backend.progress",
                "backend.threads", "sweep_name", "sweep", "tune", "gate.allow_inadmissible", "train.keep_checkpoints")
# Flattened config parameters (MLflow params) a group of seeds pools over: HASH_IGNORED plus the seed.
GROUP_IGNORED_PREFIXES = ("output_dir", "resume", "cache_dir", "data_dir", "tracking.", "backend.progress",
                          "backend.threads", "sweep", "sweep_name", "tune.", "cells_dir", "seed",
                          "gate.allow_inadmissible", "train.keep_checkpoints", "backend.launcher",
                          "backend.collective_timeout_s")

# ----------------------------------------------------------------------------------------------------- tuning

# The temperatures of a ``harness tune`` trial: the names of its Optuna parameters (tau_neg only when
# tune.tau_mode=separate) and of its user attributes (both always: the pair the trial's cell trained with).
TRIAL_TAU_POS = "tau_pos"
TRIAL_TAU_NEG = "tau_neg"

# ------------------------------------------------------------------------------------------------ report reads

# MLflow params (flattened config keys) the report reads: a moving τ's ends (gate.tau_schedule linear / cosine),
# the settings the provenance section lists, and the batch size and reward weights of the scorecard's volatility.
PARAM_TAU_START = "gate.tau_start"
PARAM_TAU_END = "gate.tau_end"
PARAM_MODEL_NAME = "model.name"
PARAM_MODEL_PATH = "model.path"
PARAM_BACKEND_NAME = "backend.name"
PARAM_ROLLOUT_TEMPERATURE = "train.rollout_temperature"
PARAM_LOSS_AGG = "train.loss.agg"
PARAM_RATIO_LEVEL = "train.loss.ratio_level"
PARAM_GATE_WIDTH = "gate.width"
PARAM_EVAL_ENGINE = "eval.engine"
PARAM_EVAL_TEMPERATURE = "eval.temperature"
PARAM_EVAL_TOP_P = "eval.top_p"
PARAM_ROLLOUT_BATCH_SIZE = "train.rollout_batch_size"
PARAM_FORMAT_WEIGHT = "train.rewards.format_weight"
PARAM_ACCURACY_WEIGHT = "train.rewards.accuracy_weight"
# Evaluation metrics per benchmark: the decoding it ran with (samples per problem, the token limit of a sample).
SAMPLES_PER_PROBLEM = "k"
MAX_NEW_TOKENS = "max_new_tokens"
# User attributes of a ``harness tune`` study (its objective and gate) and of a failed trial (why it failed).
STUDY_OBJECTIVE = "objective"
STUDY_GATE = "gate"
TRIAL_FAIL_REASON = "fail_reason"
