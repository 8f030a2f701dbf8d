"""Tasks and benchmarks, every record normalised to ``{"id": str, "problem": str, "answer": str}``.

Sources
-------
``arith``     built in: seeded, procedurally generated arithmetic word problems (records also carry ``think``)
``gsm8k``     hub ``openai/gsm8k`` (config ``main``) or ``<data_dir>/gsm8k/{train,test}.jsonl``
``deepmath``  hub ``zwhe99/DeepMath-103K`` (columns question/final_answer only) or ``<data_dir>/deepmath/train.jsonl``
``math500``   hub ``HuggingFaceH4/MATH-500`` or ``<data_dir>/math500/test.jsonl``
``aime24``    hub ``HuggingFaceH4/aime_2024`` or ``<data_dir>/aime24/test.jsonl``
``aime25``    hub ``math-ai/aime25`` or ``<data_dir>/aime25/test.jsonl``
``mixture``   seeded weighted mixture of the above (the paper trains on GSM8K + DeepMath, 50/50)

The data directory is the explicit ``data_dir`` argument, else the environment variable ``HARNESS_DATA_DIR``,
else none, in which case the Hugging Face hub is used. Local files use the shared JSONL schema of
``shared/data/README.md`` (``id``, ``problem``, ``answer``, ...); hub-schema rows (``question``/``final_answer``,
GSM8K's ``#### N``) are accepted too, so a JSONL dump of a hub split also works.

A task spec is a name or a Hydra task node: a mapping with ``name`` plus that task's options, e.g.
``{name: arith, levels: [1, 2], n_train: 12000, n_test: 500}`` or
``{name: mixture, components: [{name: gsm8k, weight: 0.5}, {name: deepmath, weight: 0.5}], size: null}``.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from harness.config import to_plain

TASKS: tuple[str, ...] = ("arith", "gsm8k", "deepmath", "math500", "aime24", "aime25", "mixture")

# Splits each task has. The hub benchmarks only have a test set (H4's AIME 2024 calls it "train" on the hub:
# the loader maps it), and DeepMath-103K only a train set.
SPLITS: dict[str, tuple[str, ...]] = {
    "arith": ("train", "test"),
    "gsm8k": ("train", "test"),
    "deepmath": ("train",),
    "math500": ("test",),
    "aime24": ("test",),
    "aime25": ("test",),
}

# (hub id, config, {our split: hub split}) per hub-backed task.
HUB_SOURCES: dict[str, tuple[str, str | None, dict[str, str]]] = {
    "gsm8k": ("openai/gsm8k", "main", {"train": "train", "test": "test"}),
    "deepmath": ("zwhe99/DeepMath-103K", None, {"train": "train"}),
    "math500": ("HuggingFaceH4/MATH-500", None, {"test": "test"}),
    "aime24": ("HuggingFaceH4/aime_2024", None, {"test": "train"}),
    "aime25": ("math-ai/aime25", None, {"test": "test"}),
}

# Options each task node may carry besides ``name`` (Hydra nodes may also carry bookkeeping keys: see
# _IGNORED_KEYS). Unknown options are errors, so a typo such as ``n_trian`` does not silently fall back.
_OPTIONS: dict[str, frozenset[str]] = {
    "arith": frozenset({"levels", "n_train", "n_test", "seed"}),
    "gsm8k": frozenset(),
    "deepmath": frozenset({"streaming"}),
    "math500": frozenset(),
    "aime24": frozenset(),
    "aime25": frozenset(),
    "mixture": frozenset({"components", "size", "seed"}),
}
# eval_benchmarks: what `harness run` evaluates after training on the task (conf/eval/default.yaml reads it)
_IGNORED_KEYS = frozenset({"name", "_target_", "description", "eval_benchmarks"})

ARITH_LEVELS: tuple[int, ...] = (1, 2, 3)
ARITH_DEFAULTS: dict[str, Any] = {"levels": [1, 2, 3], "n_train": 12000, "n_test": 500}


# --------------------------------------------------------------------------------------------------------------
# public API


def resolve_data_dir(data_dir: str | Path | None) -> Path | None:
    """The local data directory: ``data_dir`` if given, else ``$HARNESS_DATA_DIR``, else ``None`` (use the hub).

    Raises ``ValueError`` when the chosen directory does not exist, so a typo fails before any work rather than
    silently falling back to a download.
    """
    origin = "data_dir"
    if data_dir is None or str(data_dir) == "":
        env = os.environ.get("HARNESS_DATA_DIR", "")
        if not env:
            return None
        data_dir, origin = env, "HARNESS_DATA_DIR"
    path = Path(data_dir).expanduser()
    if not path.is_dir():
        raise ValueError(f"{origin}={str(data_dir)!r}: data directory does not exist")
    return path


def load_task(
    spec: str | Mapping[str, Any],
    split: str,
    *,
    data_dir: str | Path | None = None,
    limit: int | None = None,
    seed: int = 0,
) -> list[dict[str, str]]:
    """Load ``split`` of a task as a list of ``{"id", "problem", "answer"}`` records (arith adds ``think``).

    ``spec`` is a task name or a task node (mapping with ``name`` and options). ``limit`` keeps the first
    ``limit`` records (file order; for arith and mixtures, generation order). ``seed`` drives arith generation and
    mixture sampling unless the node pins its own ``seed`` (task configs pin one so the data stay fixed while the
    run seed varies). All validation happens before any loading or generation.
    """
    name, options = _parse_spec(spec)
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0 or None, got {limit}")
    seed = int(options.get("seed", seed))
    if name == "mixture":
        components = _mixture_components(options)
        for comp_name, _, _ in components:
            _check_split(comp_name, split)
        local = resolve_data_dir(data_dir)
        for comp_name, _, _ in components:
            _check_local_file(comp_name, split, local)
        records = _load_mixture(components, split, options.get("size"), local, seed)
    elif name == "arith":
        _check_split(name, split)
        opts = {**ARITH_DEFAULTS, **options}
        levels = _check_levels(opts["levels"])
        n = int(opts["n_train"] if split == "train" else opts["n_test"])
        if limit is not None:
            n = min(n, limit)  # generation is prefix-stable, so generating fewer is the same as truncating
        records = generate_arith(split, n, levels=levels, seed=seed)
    else:
        _check_split(name, split)
        local = resolve_data_dir(data_dir)
        _check_local_file(name, split, local)
        records = _load_source(name, split, local, options, limit)
    return records if limit is None else records[:limit]


# --------------------------------------------------------------------------------------------------------------
# spec parsing and validation


def _parse_spec(spec: str | Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    spec = to_plain(spec)
    if isinstance(spec, str):
        name, options = spec, {}
    elif isinstance(spec, Mapping):
        if "name" not in spec:
            raise ValueError(f"task spec needs a 'name' (one of: {', '.join(TASKS)}), got keys {sorted(spec)}")
        name = spec["name"]
        options = {k: v for k, v in spec.items() if k not in _IGNORED_KEYS}
    else:
        raise ValueError(f"task spec must be a task name or a mapping with 'name', got {type(spec).__name__}")
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
    unknown = set(options) - _OPTIONS[name]
    if unknown:
        allowed = ", ".join(sorted(_OPTIONS[name])) or "none"
        raise ValueError(f"task {name!r}: unknown option(s) {sorted(unknown)}; allowed: {allowed}")
    return name, dict(options)


def _check_split(name: str, split: str) -> None:
    if split not in SPLITS[name]:
        raise ValueError(f"task {name!r} has no split {split!r}; available: {', '.join(SPLITS[name])}")


def _check_levels(levels: Any) -> tuple[int, ...]:
    if isinstance(levels, int):
        levels = [levels]
    levels = tuple(int(v) for v in levels)
    bad = [v for v in levels if v not in ARITH_LEVELS]
    if not levels or bad:
        raise ValueError(f"arith levels must be a non-empty subset of {list(ARITH_LEVELS)}, got {list(levels)}")
    return levels


def _local_file(name: str, split: str, local: Path) -> Path:
    return local / name / f"{split}.jsonl"


def _check_local_file(name: str, split: str, local: Path | None) -> None:
    if local is None or name == "arith":
        return
    path = _local_file(name, split, local)
    if not path.is_file():
        raise ValueError(
            f"task {name!r} split {split!r}: file {path} not found in data directory {local} "
            "(unset HARNESS_DATA_DIR / data_dir to load from the Hugging Face hub)"
        )


# --------------------------------------------------------------------------------------------------------------
# file / hub sources


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{lineno}: invalid JSON ({exc})") from None
    return rows


def _load_hub(name: str, split: str, options: Mapping[str, Any], limit: int | None) -> list[dict[str, Any]]:
    """Rows from the Hugging Face hub (``datasets`` is imported lazily: it is slow to import)."""
    from datasets import load_dataset

    hub_id, config, split_map = HUB_SOURCES[name]
    kwargs: dict[str, Any] = {"split": split_map[split]}
    if name == "deepmath":
        # ~2 GB with the three R1 traces per problem: read only the two columns we use. Streaming makes the
        # parquet reader fetch just those column chunks instead of downloading whole files.
        kwargs["columns"] = ["question", "final_answer"]
        kwargs["streaming"] = bool(options.get("streaming", True))
    ds = load_dataset(hub_id, config, **kwargs) if config else load_dataset(hub_id, **kwargs)
    rows = []
    for row in ds:
        if limit is not None and len(rows) >= limit:
            break
        rows.append(dict(row))
    return rows


_AIME_URL = re.compile(r"(\d{4})_AIME_(I{1,2})_Problems/Problem_(\d+)")


def _strip_int(ans: str) -> str:
    """AIME answers are integers 0-999, sometimes zero-padded ("025"): canonicalise to "25"."""
    return str(int(ans)) if re.fullmatch(r"-?\d+", ans) else ans


def _normalise(name: str, split: str, index: int, row: Mapping[str, Any]) -> dict[str, str]:
    """One source row (shared-schema or hub-schema) to ``{"id", "problem", "answer"}``."""
    problem = row.get("problem", row.get("question"))
    answer = row.get("answer", row.get("final_answer"))
    if problem is None or answer is None:
        raise ValueError(f"task {name!r}: row {index} has no problem/question or answer/final_answer field")
    answer = str(answer).strip()
    rid = row.get("id")
    if name == "gsm8k":
        if "####" in answer:  # hub schema: the full solution ending in "#### N"
            answer = answer.split("####")[-1].strip()
        answer = answer.replace(",", "")
        rid = rid if rid is not None else f"gsm8k-{split}-{index:05d}"  # same ids as the staged copies
    elif name == "math500":
        rid = rid if rid is not None else row.get("unique_id")
    elif name in ("aime24", "aime25"):
        answer = _strip_int(answer)
        url_match = _AIME_URL.search(str(row.get("url", "")))
        if url_match and not (isinstance(rid, str) and rid.count("-") == 2):
            year, contest, number = url_match.groups()
            rid = f"{year}-{contest}-{number}"  # same ids as the staged copies
    if rid is None or rid == "":
        rid = f"{name}-{split}-{index:05d}"
    return {"id": str(rid), "problem": str(problem), "answer": answer}


def _load_source(
    name: str, split: str, local: Path | None, options: Mapping[str, Any], limit: int | None
) -> list[dict[str, str]]:
    rows = _read_jsonl(_local_file(name, split, local)) if local is not None else _load_hub(name, split, options, limit)
    if limit is not None:
        rows = rows[:limit]
    return [_normalise(name, split, i, row) for i, row in enumerate(rows)]


# --------------------------------------------------------------------------------------------------------------
# mixture


def _mixture_components(options: Mapping[str, Any]) -> list[tuple[str, dict[str, Any], float]]:
    comps = options.get("components")
    if not comps:
        raise ValueError("task 'mixture' needs components: [{name: ..., weight: ...}, ...]")
    out = []
    for comp in comps:
        comp = dict(comp) if isinstance(comp, Mapping) else {"name": comp}
        weight = float(comp.pop("weight", 1.0))
        if weight <= 0:
            raise ValueError(f"mixture component {comp.get('name')!r}: weight must be > 0, got {weight}")
        name, comp_opts = _parse_spec(comp)
        if name == "mixture":
            raise ValueError("mixture components cannot themselves be mixtures")
        out.append((name, comp_opts, weight))
    total = sum(w for _, _, w in out)
    return [(n, o, w / total) for n, o, w in out]


def _apportion(size: int, weights: Sequence[float]) -> list[int]:
    """Integer counts summing to ``size`` proportional to ``weights`` (largest remainder method)."""
    raw = [size * w for w in weights]
    counts = [int(x) for x in raw]
    order = sorted(range(len(raw)), key=lambda i: (counts[i] - raw[i], i))
    for i in order[: size - sum(counts)]:
        counts[i] += 1
    return counts


def _load_mixture(
    components: list[tuple[str, dict[str, Any], float]],
    split: str,
    size: int | None,
    local: Path | None,
    seed: int,
) -> list[dict[str, str]]:
    """Sample each component to its weight's share of ``size`` and shuffle them together, all seeded.

    ``size=None`` uses the largest size every component can fill without repeats (GSM8K's 7473 train problems at
    weight 0.5 give 14946). A larger ``size`` repeats a component's problems (each pass reshuffled); repeated
    records get an ``#rK`` id suffix so ids stay unique.
    """
    pools = []
    for name, opts, _ in components:
        if name == "arith":
            pools.append(load_task({"name": name, **opts}, split, seed=seed))
        else:
            pools.append(_load_source(name, split, local, opts, None))
    weights = [w for _, _, w in components]
    if size is None:
        size = min(int(len(pool) / w + 1e-9) for pool, w in zip(pools, weights, strict=True))
    counts = _apportion(int(size), weights)
    rng = random.Random(f"mixture:{seed}")
    mixed: list[dict[str, str]] = []
    for (name, _, _), pool, count in zip(components, pools, counts, strict=True):
        if count and not pool:
            raise ValueError(f"mixture component {name!r} split {split!r} is empty")
        taken = 0
        rep = 0
        while taken < count:
            order = list(range(len(pool)))
            rng.shuffle(order)
            for i in order[: count - taken]:
                rec = dict(pool[i])
                if rep:
                    rec["id"] = f"{rec['id']}#r{rep}"
                mixed.append(rec)
            taken = min(count, taken + len(pool))
            rep += 1
    rng.shuffle(mixed)
    return mixed


# --------------------------------------------------------------------------------------------------------------
# arith: procedurally generated word problems

_NAMES = ("Tom", "Ann", "Sam", "Mia", "Leo", "Ava", "Ben", "Zoe", "Max", "Ivy", "Eli", "Amy")
_ITEMS = ("apples", "pens", "cards", "coins", "books", "eggs", "stamps", "shells", "marbles", "cookies")

# (template, operation). Operands a, b (and c) are substituted; the answer is always a non-negative integer.
_TEMPLATES: dict[int, tuple[tuple[str, str], ...]] = {
    1: (
        ("{n} has {a} {x} and gets {b} more. How many {x} now?", "a+b"),
        ("{n} had {a} {x} and found {b} more. How many in total?", "a+b"),
        ("{n} has {a} {x} and gives away {b}. How many are left?", "a-b"),
        ("{n} had {a} {x} and lost {b} of them. How many are left?", "a-b"),
    ),
    2: (
        ("{n} buys {a} bags with {b} {x} each. How many {x} in all?", "a*b"),
        ("There are {a} boxes of {b} {x}. How many {x} are there?", "a*b"),
    ),
    3: (
        ("{n} has {a} {x}, gets {b} more, then gives away {c}. How many now?", "a+b-c"),
        ("{n} had {a} {x}, lost {b}, then found {c}. How many now?", "a-b+c"),
    ),
}

# Operand ranges per level (level 2: a one-digit factor times this range). Sized for the tiny warm-started model:
# with operands up to 99 a ~1M-parameter model trained for a minute on CPU got ~7% of held-out problems right (it
# had to generalise two-digit arithmetic), far below the 20-60% band RL needs; with these ranges the warm start lands
# mid-band with a spread across levels.
_RANGES: dict[int, tuple[int, int]] = {1: (1, 15), 2: (2, 12), 3: (1, 15)}

# One in ARITH_TEST_MODULUS problem texts goes to the test split (see _arith_split).
ARITH_TEST_MODULUS = 5


def _arith_split(problem: str) -> str:
    """The split a problem belongs to, from a hash of its text.

    A pure function of the text, so train and test never share a problem whatever the seeds or sizes (the generator
    only keeps problems whose hash lands in the requested split). Computations (e.g. ``7*8``) do recur across splits
    under different names, items and wording, as facts do in real data: with these small operand ranges a split by
    computation would ask the model for products it has never seen. sha256 (not ``hash()``): stable across processes.
    """
    bucket = int.from_bytes(hashlib.sha256(problem.encode()).digest()[:8], "big") % ARITH_TEST_MODULUS
    return "test" if bucket == 0 else "train"


def _arith_operands(level: int, op: str, rng: random.Random) -> tuple[int, ...]:
    lo, hi = _RANGES[level]
    if level == 1:
        a, b = rng.randint(lo, hi), rng.randint(lo, hi)
        return (a, b) if op == "a+b" or a >= b else (b, a)  # subtraction never goes negative
    if level == 2:
        return rng.randint(2, 9), rng.randint(lo, hi)
    # Level 3: two add/sub steps, every intermediate result non-negative.
    while True:
        a, b, c = rng.randint(lo, hi), rng.randint(lo, hi), rng.randint(lo, hi)
        if op == "a+b-c" and a + b >= c:
            return a, b, c
        if op == "a-b+c" and a >= b:
            return a, b, c


def _arith_think(op: str, operands: tuple[int, ...]) -> tuple[str, int]:
    """The worked computation (one ``x?y=z`` step per operation, space separated) and the answer."""
    a, b = operands[0], operands[1]
    first = a + b if op[1] == "+" else a - b if op[1] == "-" else a * b
    steps = [f"{a}{op[1]}{b}={first}"]
    if len(operands) == 3:
        c = operands[2]
        second = first + c if op[3] == "+" else first - c
        steps.append(f"{first}{op[3]}{c}={second}")
        first = second
    return " ".join(steps), first


def generate_arith(split: str, n: int, *, levels: Sequence[int] = ARITH_LEVELS, seed: int = 0) -> list[dict[str, str]]:
    """``n`` distinct arith word problems of ``split``, levels interleaved round-robin (equal shares).

    Deterministic for a given (split, levels, seed) and prefix-stable: the first k of n records equal the records
    of n=k. Each record: ``id``, ``problem`` (~45-70 characters), ``answer`` (integer as text) and ``think`` (the
    worked computation, e.g. ``23+45=68``) used as the SFT target of the tiny model's warm start.
    """
    if split not in SPLITS["arith"]:
        raise ValueError(f"task 'arith' has no split {split!r}; available: {', '.join(SPLITS['arith'])}")
    levels = _check_levels(levels)
    # A string seed goes through sha512 in random.seed: stable across runs, unlike hash() of a str.
    rng = random.Random(f"arith:{seed}:{split}")
    seen: set[str] = set()
    records: list[dict[str, str]] = []
    # Each level has a finite number of distinct texts (level 2: ~11k, a fifth of them test), so a large n can
    # exhaust a level. Bound the misses in a row so that fails loudly instead of looping forever.
    misses = 0
    while len(records) < n:
        level = levels[len(records) % len(levels)]
        template, op = rng.choice(_TEMPLATES[level])
        operands = _arith_operands(level, op, rng)
        who, item = rng.choice(_NAMES), rng.choice(_ITEMS)
        fields = dict(zip("abc", operands, strict=False))
        problem = template.format(n=who, x=item, **fields)
        if _arith_split(problem) != split or problem in seen:
            misses += 1
            if misses > 20000:
                raise ValueError(
                    f"arith: only {len(records)} distinct {split} problems found for levels {list(levels)} "
                    f"(asked for {n}); lower n_train/n_test"
                )
            continue
        misses = 0
        seen.add(problem)
        think, answer = _arith_think(op, operands)
        records.append(
            {"id": f"arith-{split}-{len(records):05d}", "problem": problem, "answer": str(answer), "think": think}
        )
    return records
