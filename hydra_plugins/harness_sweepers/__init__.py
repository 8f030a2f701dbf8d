"""Hydra discovers sweepers only inside the ``hydra_plugins`` namespace: these are thin shims over the
harness's own classes (:mod:`harness.sweeping`), plus their config-store entries. Hydra imports this package before
it composes any config, so the run config's typed schemas (:mod:`harness.schema`) are registered here too."""

from hydra.core.config_store import ConfigStore
from hydra.plugins.sweeper import Sweeper

from harness.schema import register_schemas
from harness.sweeping.gate_sweeper import GateSweeperConf, GateSweeperImpl
from harness.sweeping.tune_settings import TuneSweeperConf
from harness.sweeping.tune_sweeper import TuneSweeperImpl


class GateSweeper(GateSweeperImpl, Sweeper):
    """Every gate × τ × seed cell; see :mod:`harness.sweeping.gate_sweeper`."""


class TuneSweeper(TuneSweeperImpl, Sweeper):
    """Optuna ask/tell over τ, one study per gate; see :mod:`harness.sweeping.tune_sweeper`."""


ConfigStore.instance().store(group="hydra/sweeper", name="harness_gates", node=GateSweeperConf, provider="harness")
ConfigStore.instance().store(group="hydra/sweeper", name="harness_tune", node=TuneSweeperConf, provider="harness")
register_schemas()
