"""Every config the repository ships composes and passes the checks before compute: each option of each ``conf/``
group inside ``conf/run.yaml``, and each ``sweeps/*.yaml`` with its Hydra sweeper node.

A renamed key, a yaml that drifts from the code that reads it, or a sweep whose sweeper node no longer matches its
schema fails here instead of at the start of someone's sweep."""

from __future__ import annotations

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import open_dict

from harness.cell import validate_cell
from harness.config import CONF_DIR, SWEEPS_DIR, ConfigError
from tests.conftest import DATA_DIR

# Options that need a value the group cannot default: the smallest addition that makes them a runnable cell.
REQUIRED = {
    "gate/custom": ["gate.name=tests.custom_gate_module:F"],
    "gate/dro": ["gate.dro_beta=0.1"],
    "model/hf": ["model.path=Qwen/Qwen2.5-0.5B-Instruct"],
    "backend/trl_fsdp8": ["train.micro_batch_size=8"],  # a mini-batch of 64 over 8 processes
}
GROUPS = ("gate", "train", "backend", "model", "task", "eval", "tracking")
# The shared data directory has no DeepMath train split: tasks using it are checked without reading data (as a hub
# run would be before its download).


def options() -> list[str]:
    return [f"{group}/{path.stem}" for group in GROUPS for path in sorted((CONF_DIR / group).glob("*.yaml"))]


def with_data_dir(cfg):
    """``cfg`` reading the shared data directory where it holds the task's files, else the hub's (nothing is
    downloaded by a check: the shared data has no DeepMath)."""
    parts = [c.name for c in cfg.task.components] if cfg.task.get("components") else [cfg.task.name]
    cfg.data_dir = str(DATA_DIR) if all((DATA_DIR / p).is_dir() for p in parts if p != "arith") else None
    return cfg


def compose_from(config_dir, name: str, overrides: list[str], hydra_config: bool = False):
    import hydra_plugins.harness_sweepers  # noqa: F401  (the sweepers' config-store entries)

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
        return compose(config_name=name, overrides=overrides, return_hydra_config=hydra_config)


@pytest.mark.parametrize("option", options())
def test_every_conf_group_option_composes_into_a_valid_cell(option, monkeypatch):
    group, name = option.split("/")
    cfg = compose_from(CONF_DIR, "run", [f"{group}={name}", *REQUIRED.get(option, [])])
    validate_multi_process(cfg, monkeypatch)
    validate_cell(with_data_dir(cfg))
    assert cfg[group].get("name", name) is not None


def test_the_option_list_covers_every_group():
    # conf/accelerate holds accelerate's own config files (backend.accelerate_config), not a Hydra group
    found = {path.parent.name for path in CONF_DIR.glob("*/*.yaml")} - {"launcher", "accelerate"}
    assert found == set(GROUPS), "a new conf/ group needs an entry in GROUPS"


@pytest.mark.parametrize("sweep", sorted(p.stem for p in SWEEPS_DIR.glob("*.yaml")))
def test_every_sweep_composes_with_its_sweeper_and_its_base_cell_validates(sweep, monkeypatch):
    cfg = compose_from(SWEEPS_DIR, sweep, [f"hydra.searchpath=[file://{CONF_DIR}]"], hydra_config=True)
    assert str(cfg.hydra.sweeper._target_).startswith("hydra_plugins.harness_sweepers.")
    for launcher in sorted((CONF_DIR / "hydra" / "launcher").glob("*.yaml")):
        compose_from(SWEEPS_DIR, sweep, [f"hydra.searchpath=[file://{CONF_DIR}]", f"hydra/launcher={launcher.stem}"],
                     hydra_config=True)
    with open_dict(cfg):
        del cfg["hydra"]
    validate_multi_process(cfg, monkeypatch)
    validate_cell(with_data_dir(cfg))


def validate_multi_process(cfg, monkeypatch) -> None:
    """A cell of several GPUs (the paper's FSDP cells): a driver that submits it to other machines (SLURM) accepts
    it; this CPU, as the machine that would train it, refuses naming why; what is left to check is what each of its
    ranks checks (``WORLD_SIZE`` set, as in a launch)."""
    processes = int(cfg.backend.get("num_processes", 1))
    if processes > 1:
        validate_cell(with_data_dir(cfg), machine=False)
        if not torch.cuda.is_available():
            with pytest.raises(ConfigError, match="shards over GPUs; on a CPU"):
                validate_cell(with_data_dir(cfg))
        monkeypatch.setenv("WORLD_SIZE", str(processes))
