"""Shared fixtures: the staged data directory, a per-session model cache, Hydra composition."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DATA_DIR = Path(os.environ.get("HARNESS_DATA_DIR", REPO.parent / "shared" / "data"))
# One cache for the whole test session (and across sessions on one machine): the tiny model is built
# once (~1 min) and every test that trains starts from the same weights, as sweep cells do.
CACHE_DIR = Path(os.environ.get("HARNESS_TEST_CACHE_DIR", REPO / ".cache" / "test"))
# verl pins other transformers releases, so it lives in its own virtualenv (scripts/install_verl.sh); tests that need
# it run code there as subprocesses.
VERL_PYTHON = Path(os.environ.get("HARNESS_VERL_PYTHON", REPO / ".venv-verl" / "bin" / "python"))
needs_verl = pytest.mark.skipif(not VERL_PYTHON.exists(),
                                reason=f"no verl environment at {VERL_PYTHON} (scripts/install_verl.sh)")


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not (DATA_DIR / "gsm8k" / "test.jsonl").exists():
        pytest.skip(f"staged data not found at {DATA_DIR} (set HARNESS_DATA_DIR)")
    return DATA_DIR


@pytest.fixture(scope="session")
def cache_dir() -> Path:
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    return CACHE_DIR


def compose(overrides: list[str], config_name: str = "run"):
    """Compose a config from conf/ exactly as the CLI would (Hydra compose API)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from harness.config import CONF_DIR

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=overrides)


def compose_at(output_dir, overrides: list[str]):
    """:func:`compose` with ``output_dir`` set (a run config the backends can train directly)."""
    from omegaconf import open_dict

    cfg = compose(overrides)
    with open_dict(cfg):
        cfg.output_dir = str(output_dir)
    return cfg


def run_verl(code: str, *args: str, env: dict | None = None, timeout: int = 240,
             cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run ``code`` in the verl interpreter; by default from a directory with no package metadata in it (``-c``
    puts the working directory on sys.path, and a ``harness.egg-info`` there would count as installed metadata)."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    for key in ("VERL_USE_EXTERNAL_MODULES", "VERL_USE_EXTERNAL_PLUGINS"):
        if env is None or key not in env:
            full_env.pop(key, None)
    return subprocess.run([str(VERL_PYTHON), "-c", code, *args], capture_output=True, text=True, env=full_env,
                          timeout=timeout, cwd=str(cwd or Path(__file__).parent))
