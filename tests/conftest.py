"""Shared fixtures: the staged data directory, a per-session model cache, Hydra composition."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DATA_DIR = Path(os.environ.get("HARNESS_DATA_DIR", REPO.parent / "shared" / "data"))
# One cache for the whole test session (and across sessions on one machine): the tiny model is built
# once (~1 min) and every test that trains starts from the same weights, as sweep cells do.
CACHE_DIR = Path(os.environ.get("HARNESS_TEST_CACHE_DIR", REPO / ".cache" / "test"))


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
