"""Checkpoints you can trust: the native trainer's (Hugging Face weights and tokenizer plus the optimizer, RNG and
history state that lets ``resume=true`` continue a run exactly), and the verification both the native and the TRL
backend resume through.

Every checkpoint gets a manifest (:data:`MANIFEST_FILE`: each file's size and SHA-256), written last: a checkpoint
whose files do not match it (truncated, emptied, rewritten) or that has none and whose files do not even parse is
invalid. :func:`resume_checkpoint` takes the newest valid checkpoint, says which ones it skipped and why (naming the
path) and renames them ``<name>.invalid`` (kept for a post-mortem, out of the way of the checkpoint that replaces
them), and starts over only when none is valid, saying so.

A disk must hold them: :func:`preflight` finds, before the first step, what would stop a checkpoint from being written
(a model that refuses ``save_pretrained``, an output directory that is not writable or too small for the expected
checkpoints); :func:`prune_checkpoints` keeps the newest ``train.keep_checkpoints`` that verify, and only the newest
keeps the optimizer state that resuming needs (the others are weights only: a model to evaluate, not to resume).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
import zipfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

STATE_FILE = "trainer_state.pt"
MANIFEST_FILE = "manifest.json"
NATIVE_PATTERN = r"step-\d+"  # checkpoint directory names of the native trainer
NATIVE_REQUIRED = ("model.safetensors", STATE_FILE)


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(path: Path) -> Path:
    """Record every file of the checkpoint ``path`` (size, SHA-256) in its manifest; written last, through a rename,
    so a manifest exists only for a checkpoint whose files were all complete."""
    files = {str(f.relative_to(path)): {"size": f.stat().st_size, "sha256": _sha256(f)}
             for f in sorted(path.rglob("*")) if f.is_file() and not f.name.startswith(MANIFEST_FILE)}
    tmp = path / f"{MANIFEST_FILE}.tmp"
    tmp.write_text(json.dumps({"files": files}, indent=1))
    os.replace(tmp, path / MANIFEST_FILE)
    return path / MANIFEST_FILE


def verify_checkpoint(path: Path, required: Sequence[str] = ()) -> str | None:
    """Why the checkpoint ``path`` cannot be resumed from (naming the offending file), or None when it is valid.

    With a manifest: every listed file exists with its size and hash, and ``required`` files are listed. Without one
    (a checkpoint written before manifests): the ``required`` files exist and every file parses (safetensors header
    and size, torch zip archives by CRC, JSON)."""
    path = Path(path)
    if not path.is_dir():
        return f"{path} is not a directory"
    manifest = path / MANIFEST_FILE
    if manifest.exists():
        try:
            files = json.loads(manifest.read_text())["files"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            return f"{manifest} is unreadable ({exc})"
        for name in required:
            if name not in files:
                return f"{path / name} is not in {manifest}"
        for name, meta in files.items():
            f = path / name
            if not f.is_file():
                return f"{f} is missing"
            size = f.stat().st_size
            if size != meta.get("size"):
                return f"{f} has {size} bytes, its manifest says {meta.get('size')}"
            if _sha256(f) != meta.get("sha256"):
                return f"{f} does not match its SHA-256 in {manifest}"
        return None
    for name in required:
        if not (path / name).is_file():
            return f"{path / name} is missing"
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        reason = _parse_check(f)
        if reason is not None:
            return f"{f} {reason} (and the checkpoint has no {MANIFEST_FILE})"
    return None


def _parse_check(f: Path) -> str | None:
    """Why a checkpoint file without a manifest looks broken, or None."""
    if f.stat().st_size == 0 and f.suffix in (".safetensors", ".pt", ".pth", ".bin", ".json"):
        return "is empty"
    try:
        if f.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(f), "pt") as st:
                st.keys()
        elif f.suffix in (".pt", ".pth", ".bin") and zipfile.is_zipfile(f):
            with zipfile.ZipFile(f) as z:
                bad = z.testzip()
            if bad is not None:
                return f"has a corrupt member {bad}"
        elif f.suffix in (".pt", ".pth", ".bin"):
            return "is not a complete torch archive"
        elif f.suffix == ".json":
            json.loads(f.read_text())
    except Exception as exc:  # any parse error means the file is unusable
        return f"does not parse ({type(exc).__name__}: {' '.join(str(exc).split())[:200]})"
    return None


def list_checkpoints(ckpt_dir: Path, pattern: str = NATIVE_PATTERN) -> list[Path]:
    """Checkpoint directories named ``pattern`` (``step-000015``, ``checkpoint-60``), oldest first by the number in
    the name; ``.tmp``/``.invalid`` leftovers are not checkpoints."""
    found = [p for p in Path(ckpt_dir).glob("*") if p.is_dir() and re.fullmatch(pattern, p.name)]
    return sorted(found, key=lambda p: int(re.findall(r"\d+", p.name)[-1]))


def _set_aside(path: Path, suffix: str) -> Path:
    target = path.with_name(path.name + suffix)
    n = 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}{suffix}{n}")
    path.rename(target)
    return target


def resume_checkpoint(ckpt_dir: Path, pattern: str = NATIVE_PATTERN,
                      required: Sequence[str] = NATIVE_REQUIRED) -> Path | None:
    """The newest valid checkpoint under ``ckpt_dir`` to resume from; each newer invalid one is logged with its
    reason and renamed ``<name>.invalid``; weights-only checkpoints (:func:`prune_checkpoints`) are passed over.
    None (logged when there were checkpoints) means: start over."""
    found = list_checkpoints(ckpt_dir, pattern)
    for path in reversed(found):
        if STATE_FILE in required and is_weights_only(path):
            log.warning("resume: %s holds weights only (no optimizer state), passing over it", path)
            continue
        reason = verify_checkpoint(path, required)
        if reason is None:
            if path != found[-1]:
                log.warning("resume: continuing from the older checkpoint %s", path)
            return path
        moved = _set_aside(path, ".invalid")
        log.warning("resume: skipping checkpoint %s: %s (moved to %s)", path, reason, moved.name)
    if found:
        log.warning("resume: no valid checkpoint in %s: starting over from the initial model", ckpt_dir)
    return None


def load_state(path: Path) -> dict[str, Any]:
    """The trainer state of a verified native checkpoint (``ValueError`` naming the file if it still fails)."""
    try:
        return torch.load(path / STATE_FILE, weights_only=False)
    except Exception as exc:
        raise ValueError(f"cannot load {path / STATE_FILE}: {type(exc).__name__}: {exc}") from exc


def save_checkpoint(path: Path, model, tokenizer, optimizer, step: int, history: list[dict[str, float]],
                    save_dtype: torch.dtype | None = None, extra: dict[str, Any] | None = None) -> Path:
    """HF-format weights + tokenizer, plus optimizer/RNG/history so training can resume exactly, plus the manifest.
    Written to a temporary directory and renamed, so a kill never leaves a half-written checkpoint under its name.
    ``save_dtype`` (e.g. bfloat16) casts the saved weights and their config; the optimizer state stays as trained.
    A run resumed from such a checkpoint continues from the rounded weights, not bit for bit. ``extra`` adds keys to
    the trainer state (the native trainer's queue of rollouts drawn ahead, ``rollout_queue``)."""
    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    if save_dtype is None or all(p.dtype == save_dtype for p in model.parameters()):
        model.save_pretrained(tmp)
    else:
        model.save_pretrained(tmp, state_dict={k: v.to(save_dtype) if v.is_floating_point() else v
                                               for k, v in model.state_dict().items()})
        # config.json says the dtype of the model in memory; the evaluator loads a checkpoint in the dtype it states
        config = json.loads((tmp / "config.json").read_text())
        config["dtype"] = str(save_dtype).removeprefix("torch.")
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tokenizer.save_pretrained(tmp)
    torch.save({"step": step, "optimizer": optimizer.state_dict(), "rng": rng_state(), "history": history,
                **(extra or {})}, tmp / STATE_FILE)
    write_manifest(tmp)
    old = _set_aside(path, ".old") if path.exists() else None  # one replaced after an invalid one was skipped
    tmp.rename(path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return path


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    """The newest native checkpoint (by step), or None."""
    found = list_checkpoints(ckpt_dir)
    return found[-1] if found else None


def is_weights_only(path: Path) -> bool:
    """A native checkpoint that :func:`prune_checkpoints` stripped to its weights (no trainer state to resume)."""
    return (Path(path) / "model.safetensors").is_file() and not (Path(path) / STATE_FILE).exists()


def prune_checkpoints(ckpt_dir: Path, keep: int | None, pattern: str = NATIVE_PATTERN) -> list[Path]:
    """After a checkpoint is saved: keep the newest ``keep`` that verify (None: all, each with its full state) and
    delete the rest; with a limit, every kept one but the newest is stripped to its weights (resuming needs only the
    newest; the history is in ``train_history.json``). Returns the checkpoints left, oldest first."""
    found = list_checkpoints(ckpt_dir, pattern)
    kept: list[Path] = []
    for path in reversed(found):
        if keep is not None and len(kept) >= keep:
            shutil.rmtree(path)
            continue
        required = ("model.safetensors",) if is_weights_only(path) else NATIVE_REQUIRED
        reason = verify_checkpoint(path, required)
        if reason is not None:
            log.warning("checkpoints: deleting %s: %s", path, reason)
            shutil.rmtree(path)
            continue
        kept.append(path)
    for path in kept[1:] if keep is not None else []:  # keep=None: every checkpoint stays resumable
        if (path / STATE_FILE).exists():
            (path / STATE_FILE).unlink()
            write_manifest(path)
    return kept[::-1]


def checkpoint_bytes(parameters: Iterable[torch.nn.Parameter],
                     save_dtype: torch.dtype | None = None) -> tuple[int, int]:
    """(weights, trainer state) bytes of one native checkpoint: the weights in ``save_dtype`` (else as they are)
    and AdamW's two float32 moments per trained parameter. Tied parameters count once."""
    weights = state = 0
    for p in {id(p): p for p in parameters}.values():
        weights += p.numel() * (save_dtype.itemsize if save_dtype is not None else p.element_size())
        if p.requires_grad:
            state += 2 * p.numel() * 4
    return weights, state


def preflight(model: torch.nn.Module, ckpt_dir: Path, *, n_saves: int, keep: int | None,
              save_dtype: torch.dtype | None = None, full_state_kept: bool = False) -> None:
    """Raise ``RuntimeError`` (the reason and the fix in one line) when a checkpoint of ``model`` could not be written
    under ``ckpt_dir``: the model refuses ``save_pretrained`` (a quantised model whose method cannot be saved), the
    directory is not writable, or its disk has less free space than the checkpoints the run will hold at once: the
    newest two with their trainer state (the one being written and the one it replaces) and the other kept ones as
    weights only (with their state too when ``full_state_kept``: transformers' checkpoints)."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and not quantizer.is_serializable():
        method = getattr(getattr(quantizer, "quantization_config", None), "quant_method", "?")
        raise RuntimeError(f"the model is quantised with {method}, which transformers cannot save, so no checkpoint "
                           "could be written: load a de-quantised copy (for a GGUF file: the smollm2-135m preset's "
                           "conversion, harness.models.convert_gguf_model)")
    ckpt_dir = Path(ckpt_dir)
    try:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        probe = ckpt_dir / f".write-test-{os.getpid()}"
        probe.write_bytes(b"x")
        probe.unlink()
    except OSError as exc:
        raise RuntimeError(f"cannot write checkpoints to {ckpt_dir} ({exc.strerror or exc}): set output_dir to a "
                           "writable directory") from exc
    weights, state = checkpoint_bytes(model.parameters(), save_dtype)
    held = min(n_saves, keep or n_saves)
    need = 2 * (weights + state) + max(0, held - 1) * (weights + (state if full_state_kept else 0))
    existing = sum(f.stat().st_size for f in ckpt_dir.rglob("*") if f.is_file())
    free = shutil.disk_usage(ckpt_dir).free + existing
    if need > free:
        gib = 1024 ** 3
        raise RuntimeError(f"the checkpoints of this run need about {need / gib:.1f} GiB in {ckpt_dir} "
                           f"({weights / gib:.2f} GiB of weights + {state / gib:.2f} GiB of optimizer state each, "
                           f"{held} kept), but only {free / gib:.1f} GiB is free: set train.keep_checkpoints (e.g. 1), "
                           "train.save_dtype=bfloat16, a larger train.save_every, or output_dir on a larger disk")
