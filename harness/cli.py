"""The ``harness`` command: ``harness <subcommand> [args]``.

Each subcommand lives in the module of its concept and is imported lazily, so ``harness gates``
does not pay for importing MLflow or transformers.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from harness.config import CONF_DIR, SWEEPS_DIR

# subcommand -> ("module:function", one-line help). The function takes the remaining argv.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "gates": ("harness.cli:gates_main", "inspect gates: list, check admissibility, plot f and w"),
    "run": ("harness.cli:run_main", "train → evaluate → log one cell (Hydra overrides)"),
    "sweep": ("harness.cli:sweep_main", "run a sweep from sweeps/ with Hydra multirun (default: gates)"),
    "tune": ("harness.cli:tune_main", "Optuna temperature tuning"),
    "eval": ("harness.cli:eval_main", "evaluate a checkpoint on benchmarks"),
    "report": ("harness.reporting:main", "write the comparison report of an MLflow experiment"),
}
# Hydra refuses -m next to these; they only inspect the config, so multirun commands run them without it.
_INSPECT_FLAGS = {"--cfg", "-c", "--info", "-i", "--help", "-h", "--hydra-help", "--shell-completion", "-sc"}


def hydra_app(config_dir: Path, config_name: str, task: Callable[[Any], Any], argv: list[str], prog: str) -> int:
    """Run ``task`` as a Hydra app on ``argv`` (so --cfg, --help, -m and overrides all work). Primary configs
    outside conf/ (sweeps/) see conf/ through Hydra's search path."""
    import hydra

    if Path(config_dir) != CONF_DIR:
        argv = [*argv, f"hydra.searchpath=[file://{CONF_DIR}]"]
    wrapped = hydra.main(config_path=str(config_dir), config_name=config_name, version_base="1.3")(task)
    saved = sys.argv
    sys.argv = [prog, *argv]
    try:
        wrapped()
    finally:
        sys.argv = saved
    return 0


def run_main(argv: list[str]) -> int:
    """``harness run [overrides]``: one cell (conf/run.yaml)."""
    from harness.cell import run_task

    return hydra_app(CONF_DIR, "run", run_task, argv, "harness run")


def sweep_main(argv: list[str]) -> int:
    """``harness sweep [NAME] [overrides]``: run ``sweeps/NAME.yaml`` (default: gates) as a Hydra multirun."""
    from harness.sweep import cell_task

    name = "gates"
    if argv and "=" not in argv[0] and not argv[0].startswith("-"):
        name, argv = argv[0], argv[1:]
    available = sorted(p.stem for p in SWEEPS_DIR.glob("*.yaml"))
    if name not in available:
        print(f"harness sweep: unknown sweep {name!r}; available in {SWEEPS_DIR}: {', '.join(available)}")
        return 2
    mode = [] if _INSPECT_FLAGS & set(argv) else ["-m"]
    return hydra_app(SWEEPS_DIR, name, cell_task, [*mode, *argv], f"harness sweep {name}")


def tune_main(argv: list[str]) -> int:
    """``harness tune [overrides]``: tune τ of the gate(s) with Optuna on ``sweeps/tune.yaml``."""
    from harness.tuning.trial import trial_task

    mode = [] if _INSPECT_FLAGS & set(argv) else ["-m"]
    return hydra_app(SWEEPS_DIR, "tune", trial_task, [*mode, *argv], "harness tune")


def eval_main(argv: list[str]) -> int:
    """``harness eval [overrides]``: a Hydra app on ``conf/evaluate.yaml``."""
    from harness.evaluation import eval_task

    return hydra_app(CONF_DIR, "evaluate", eval_task, argv, "harness eval")


def gates_main(argv: list[str]) -> int:
    """``harness gates list | check NAME|PATH ... | plot --tau ... --out FILE``."""
    from harness import gates as G

    parser = argparse.ArgumentParser(prog="harness gates", description="Inspect gate functions.")
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list", help="list the built-in gates with their half-widths")
    p_check = sub.add_parser("check", help="numerically check the four admissibility properties")
    p_check.add_argument("gates", nargs="+", metavar="NAME|PATH", help="gate name or 'pkg.module:F'")
    p_plot = sub.add_parser("plot", help="plot f(r) and w(r) of every gate")
    p_plot.add_argument("--tau", type=float, nargs="+", default=[1.0], help="temperatures to draw")
    p_plot.add_argument("--gates", nargs="+", default=list(G.BUILTIN_GATES), metavar="NAME|PATH")
    p_plot.add_argument("--width", choices=G.WIDTH_MODES, default="raw")
    p_plot.add_argument("--out", type=Path, required=True, help="output image (.png, .pdf, .svg)")
    args = parser.parse_args(argv)

    if args.cmd == "list":
        for name in G.known_gates():
            g = G.get_gate(name)
            hw = "-" if g.hwhm is None else f"{g.hwhm:.5f}"
            print(f"{name:10s} HWHM of w in x = {hw}")
        return 0
    if args.cmd == "check":
        failed = 0
        for spec in args.gates:
            try:
                gate = G.get_gate(spec)
            except ValueError as exc:
                print(f"error: {exc}", file=sys.stderr)
                return 2
            results = G.check_admissible(gate)
            ok = all(r.passed for r in results)
            failed += not ok
            print(f"{spec}: {'admissible' if ok else 'NOT admissible'}")
            for r in results:
                where = "" if r.worst_x is None else f" (worst x = {r.worst_x:.4g})"
                print(f"  {'pass' if r.passed else 'FAIL'}  {r.name}: {r.detail}{where}")
        return 1 if failed else 0
    from harness.reporting.figures import plot_gate_shapes

    for spec in args.gates:
        try:
            G.get_gate(spec)  # fail on a bad name before drawing anything
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    plot_gate_shapes(args.gates, args.tau, args.out, width=args.width)
    print(f"wrote {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        parser = argparse.ArgumentParser(prog="harness", description="Gate-function comparison harness.")
        sub = parser.add_subparsers(title="subcommands", metavar="SUBCOMMAND")
        for name, (_, help_) in SUBCOMMANDS.items():
            sub.add_parser(name, help=help_)
        parser.print_help()
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"harness: unknown subcommand {name!r}; choose one of: {', '.join(SUBCOMMANDS)}", file=sys.stderr)
        return 2
    module, _, func = SUBCOMMANDS[name][0].partition(":")
    result = getattr(importlib.import_module(module), func)(rest)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
