"""Sweeps: the machinery that turns one run config into many cells and runs them as Hydra multirun jobs.

- :mod:`~harness.sweeping.base`: what every harness sweeper does around its cells (compose and check them, open the
  store and the parent run, launch, read the results back, write the report);
- :mod:`~harness.sweeping.grid`: the override list of every job (gate × τ × seed cells, adaptive-τ cells, baselines);
- :mod:`~harness.sweeping.gate_sweeper`: ``harness sweep``, every cell of the grid;
- ``harness tune``, Optuna temperature tuning: :mod:`~harness.sweeping.tune_settings` (the ``tune`` node and its
  objective), :mod:`~harness.sweeping.study` (Optuna objects and resume bookkeeping),
  :mod:`~harness.sweeping.tune_sweeper` (the Hydra sweeper that drives the studies) and
  :mod:`~harness.sweeping.trial` (one trial job).

Hydra discovers sweepers only inside the ``hydra_plugins`` namespace: ``hydra_plugins.harness_sweepers`` registers
thin shims over the sweepers here. What a single cell is and how it runs is :mod:`harness.cell`.
"""
