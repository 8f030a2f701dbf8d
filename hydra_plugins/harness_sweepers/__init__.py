"""Hydra discovers sweepers only inside the ``hydra_plugins`` namespace: these are thin shims over the
harness's own classes (harness.sweep, harness.tuning), plus their config-store entries."""

from hydra.core.config_store import ConfigStore
from hydra.plugins.sweeper import Sweeper

from harness.sweep import GateSweeperConf, GateSweeperImpl
from harness.tuning.settings import TuneSweeperConf
from harness.tuning.sweeper import TuneSweeperImpl


class GateSweeper(GateSweeperImpl, Sweeper):
    """Every gate × τ × seed cell; see :mod:`harness.sweep`."""


class TuneSweeper(TuneSweeperImpl, Sweeper):
    """Optuna ask/tell over τ, one study per gate; see :mod:`harness.tuning`."""


ConfigStore.instance().store(group="hydra/sweeper", name="harness_gates", node=GateSweeperConf, provider="harness")
ConfigStore.instance().store(group="hydra/sweeper", name="harness_tune", node=TuneSweeperConf, provider="harness")
