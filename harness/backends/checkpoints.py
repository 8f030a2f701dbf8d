"""Checkpoints of the native trainer: Hugging Face weights and tokenizer plus the optimizer, RNG and history
state that lets ``resume=true`` continue a run exactly."""

from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

STATE_FILE = "trainer_state.pt"


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


def save_checkpoint(path: Path, model, tokenizer, optimizer, step: int, history: list[dict[str, float]]) -> Path:
    """HF-format weights + tokenizer, plus optimizer/RNG/history so training can resume exactly.
    Written to a temporary directory and renamed, so a kill never leaves a half-written checkpoint."""
    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    torch.save({"step": step, "optimizer": optimizer.state_dict(), "rng": rng_state(), "history": history},
               tmp / STATE_FILE)
    tmp.rename(path)
    return path


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    done = sorted(p for p in ckpt_dir.glob("step-*") if (p / STATE_FILE).exists() and not p.name.endswith(".tmp"))
    return done[-1] if done else None
