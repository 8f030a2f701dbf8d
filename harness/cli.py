"""The ``harness`` command: ``harness <subcommand> [args]``.

Each subcommand's work lives in the module of its concept and is imported lazily, so ``harness gates``
does not pay for importing MLflow or transformers; ``harness run``'s task (:func:`run_task`) is here, over
:mod:`harness.cell`.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness import keys as K
from harness.config import CONF_DIR, SWEEPS_DIR, ConfigError, RunIncomplete, sigterm_as_exit

if TYPE_CHECKING:
    from omegaconf import DictConfig

# subcommand -> ("module:function", one-line help). The function takes the remaining argv.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "gates": ("harness.cli:gates_main", "inspect gates: list, check admissibility, plot f and w"),
    "run": ("harness.cli:run_main", "train → evaluate → log one cell (Hydra overrides)"),
    "sweep": ("harness.cli:sweep_main", "run a sweep from sweeps/ with Hydra multirun (default: gates)"),
    "tune": ("harness.cli:tune_main", "Optuna temperature tuning"),
    "eval": ("harness.cli:eval_main", "evaluate a checkpoint on benchmarks"),
    "report": ("harness.reporting:main", "write the comparison report of an MLflow experiment"),
    "plan": ("harness.cli:plan_main", "each GPU's peak memory for a cell, term by term, before any compute"),
}
# Hydra refuses -m next to these; they only inspect the config, so multirun commands run them without it.
_INSPECT_FLAGS = {"--cfg", "-c", "--info", "-i", "--help", "-h", "--hydra-help", "--shell-completion", "-sc"}


def one_line(exc: BaseException) -> str:
    """An error message on one line: Hydra's lists ("Available options in 'gate':" then one option per line) become
    comma-separated, its config search path is left out."""
    parts: list[str] = []
    items: list[str] = []
    for raw in str(exc).splitlines():
        line = raw.strip()
        if line.startswith("Config search path"):
            break
        if not line:
            continue
        if raw[:1].isspace() and parts:
            items.append(line)
            continue
        if items:
            parts[-1] += " " + ", ".join(items)
            items = []
        parts.append(line)
    if items:
        parts[-1] += " " + ", ".join(items)
    text = " ".join(parts) or type(exc).__name__
    cause = exc.__cause__
    if cause is not None and type(cause).__module__.startswith("omegaconf") and str(cause) not in str(exc):
        text += f" ({one_line(cause)})"  # Hydra's "Error merging override" says why only in its cause
    return text


def is_config_error(exc: BaseException) -> bool:
    """A bad config: the harness's checks, Hydra's composition errors (unknown group option, bad override) and
    OmegaConf's (unknown or missing key)."""
    from hydra.errors import HydraException, InstantiationException
    from omegaconf.errors import OmegaConfBaseException

    return isinstance(exc, ConfigError | OmegaConfBaseException) or (
        isinstance(exc, HydraException) and not isinstance(exc, InstantiationException))


def _dirs(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_dir()} | {root} if root.is_dir() else set()


def _remove_new_empty_dirs(before: set[Path], root: Path) -> None:
    """Directories under ``root`` (Hydra's multirun folder) that this failed command created and left empty."""
    for path in sorted(_dirs(root) - before, key=lambda p: len(p.parts), reverse=True):
        if not any(path.iterdir()):
            path.rmdir()


def hydra_app(config_dir: Path, config_name: str, task: Callable[[Any], Any], argv: list[str], prog: str) -> int:
    """Run ``task`` as a Hydra app on ``argv`` (so --cfg, --help, -m and overrides all work). Primary configs
    outside conf/ (sweeps/) see conf/ through Hydra's search path.

    Exit codes: 0 done; 2 a bad config (one line naming the key, no traceback unless ``HYDRA_FULL_ERROR=1``; nothing
    left behind in ``multirun/``); 1 a failure (the traceback) or failed sweep cells, 3 results that await upload
    to the tracking store (both after the summary). SIGTERM ends the command as Ctrl-C does, closing its runs."""
    import hydra

    if Path(config_dir) != CONF_DIR:
        argv = [*argv, f"hydra.searchpath=[file://{CONF_DIR}]"]
    caught: list[BaseException] = []
    if "-m" not in argv and "--multirun" not in argv:
        # One job in this process: its own verdicts are taken out of Hydra's hands (which would add a line of its own)
        inner = task

        @functools.wraps(inner)
        def job(cfg: Any) -> Any:
            try:
                return inner(cfg)
            except (ConfigError, RunIncomplete) as exc:
                caught.append(exc)
                return None

        task = job
    wrapped = hydra.main(config_path=str(config_dir), config_name=config_name, version_base="1.3")(task)
    full_error = os.environ.get("HYDRA_FULL_ERROR") == "1"
    saved = sys.argv
    sys.argv = [prog, *argv]
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra re-raises instead of printing: what the user sees is decided here
    multirun = Path("multirun")
    before = _dirs(multirun)
    try:
        with sigterm_as_exit():
            wrapped()
        if caught:
            raise caught[0]
    except RunIncomplete as exc:
        print(f"{prog}: {one_line(exc)}", file=sys.stderr)
        return exc.exit_code
    except Exception as exc:
        if full_error:
            raise
        if is_config_error(exc):
            from harness.schema import explain_unknown_key

            _remove_new_empty_dirs(before, multirun)
            print(f"{prog}: error: {explain_unknown_key(one_line(exc))}", file=sys.stderr)
            return 2
        traceback.print_exc()
        return 1
    finally:
        sys.argv = saved
        if not full_error:
            os.environ.pop("HYDRA_FULL_ERROR", None)
    return 0


def run_task(cfg: DictConfig) -> None:
    """``harness run``: one cell, logged to MLflow unless ``tracking.enabled=false`` (a single run is never
    skipped), its summary printed. With ``backend.num_processes`` = N > 1 it starts the N ranks itself
    (:mod:`harness.launch`); started by someone else's launch (``accelerate launch -m harness.cli run ...``), every
    rank trains and only rank 0 evaluates and logs."""
    from harness.backends import get_backend
    from harness.cell import local_result, run_cell, run_tracked, upload_cell, validate_cell
    from harness.launch import launches, rank, run_launched

    validate_cell(cfg)
    if rank() != 0:
        get_backend(cfg.backend.name)(cfg, None)
        return
    if not cfg.tracking.get("enabled", True):
        summary = run_launched(cfg, None)[1] if launches(cfg) else run_cell(cfg)
    else:
        from harness import tracking

        store = tracking.check_store(cfg.tracking)  # before any compute: fails in seconds, naming tracking.uri
        if cfg.get("resume") and tracking.read_pending(cfg.output_dir) is not None and local_result(cfg.output_dir):
            run_id, uploaded = upload_cell(cfg, store)  # finished while the store was away: upload, no retraining
            summary = json.loads((Path(cfg.output_dir) / K.SUMMARY_FILE).read_text())
            if not uploaded:
                summary["pending_upload"] = store.error
        elif launches(cfg):
            run_id, summary = run_launched(cfg, store, supersede_dead=True)
        else:
            run_id, summary = run_tracked(cfg, store, supersede_dead=True)
        summary["mlflow_run_id"] = run_id
    print(json.dumps({k: v for k, v in summary.items() if k != K.TRAIN}, indent=2, default=str))
    if summary.get("pending_upload"):
        raise RunIncomplete(f"the run awaits upload to tracking.uri ({summary['pending_upload']}); its results are "
                            f"in {cfg.output_dir}: once the store answers, run the same command with resume=true "
                            f"output_dir={cfg.output_dir} to upload them without retraining", exit_code=3)


def run_main(argv: list[str]) -> int:
    """``harness run [overrides]``: one cell (conf/run.yaml)."""
    return hydra_app(CONF_DIR, "run", run_task, argv, "harness run")


def sweep_main(argv: list[str]) -> int:
    """``harness sweep [NAME] [overrides]``: run ``sweeps/NAME.yaml`` (default: gates) as a Hydra multirun."""
    from harness.sweeping.gate_sweeper import cell_task

    name = "gates"
    if argv and "=" not in argv[0] and not argv[0].startswith("-"):
        name, argv = argv[0], argv[1:]
    available = sorted(p.stem for p in SWEEPS_DIR.glob("*.yaml"))
    if name not in available:
        print(f"harness sweep: unknown sweep {name!r}; available in {SWEEPS_DIR}: {', '.join(available)}",
              file=sys.stderr)
        return 2
    mode = [] if _INSPECT_FLAGS & set(argv) else ["-m"]
    return hydra_app(SWEEPS_DIR, name, cell_task, [*mode, *argv], f"harness sweep {name}")


def plan_main(argv: list[str]) -> int:
    """``harness plan [--gpu-gib G] [--sharding S] [--processes N] [overrides]``: the memory plan of a cell
    (:mod:`harness.memory_plan`) for the run config the overrides compose."""
    from harness.memory_plan import SHARDINGS, describe, plan_of_config

    parser = argparse.ArgumentParser(prog="harness plan", description=plan_main.__doc__)
    parser.add_argument("--gpu-gib", type=float, default=None, help="GPU memory to check the plan against, GiB")
    parser.add_argument("--sharding", choices=SHARDINGS, default=None,
                        help="how the model states are split (default: the cell's backend.accelerate_config when "
                             "backend.num_processes > 1, else none)")
    parser.add_argument("--processes", type=int, default=None,
                        help="GPUs (processes) per cell (default: backend.num_processes)")
    args, overrides = parser.parse_known_args(argv)

    def task(cfg: Any) -> None:
        gpu = None if args.gpu_gib is None else args.gpu_gib * 2**30
        from harness.backends.common import num_processes

        processes = args.processes or num_processes(cfg)
        sharding = args.sharding
        if sharding is None and num_processes(cfg) > 1:
            from harness.backends.trl_config import accelerate_sharding

            sharding = accelerate_sharding(cfg)
        try:
            plan = plan_of_config(cfg, gpu_bytes=gpu, sharding=sharding or "none", processes=processes)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        print(describe(plan, gpu))

    return hydra_app(CONF_DIR, "run", task, overrides, "harness plan")


def tune_main(argv: list[str]) -> int:
    """``harness tune [overrides]``: tune τ of the gate(s) with Optuna on ``sweeps/tune.yaml``."""
    from harness.sweeping.trial import trial_task

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
    p_list = sub.add_parser("list", help="list the built-in gates with their half-widths")
    p_check = sub.add_parser("check", help="numerically check the four admissibility properties")
    p_check.add_argument("gates", nargs="+", metavar="NAME|PATH", help="gate name or 'pkg.module:F'")
    nu_help = f"tail indices of the {G.STUDENT} gate family (one gate per value)"
    for p in (p_list, p_check):
        p.add_argument("--nu", type=float, nargs="+", default=[1.0, 2.0, 4.0, 1000.0], help=nu_help)
    p_plot = sub.add_parser("plot", help="plot f(r) and w(r) of every gate")
    p_plot.add_argument("--tau", type=float, nargs="+", default=[1.0], help="temperatures to draw")
    p_plot.add_argument("--gates", nargs="+", default=list(G.BUILTIN_GATES), metavar="NAME|PATH")
    p_plot.add_argument("--width", choices=G.WIDTH_MODES, default="raw")
    p_plot.add_argument("--out", type=Path, required=True, help="output image (.png, .pdf, .svg)")
    p_plot.add_argument("--nu", type=float, nargs="+", default=[1.0, 2.0, 4.0, 1000.0], help=nu_help)
    args = parser.parse_args(argv)

    def expand(specs: list[str]) -> list[tuple[str, Any]]:
        """(label, gate) per spec; the student family once per --nu."""
        out: list[tuple[str, Any]] = []
        for spec in specs:
            if spec == G.STUDENT:
                out += [(f"{spec} nu={nu:g}", G.student_gate(nu)) for nu in args.nu]
            else:  # a ratio-control method at its own defaults (those its conf/gate option sets)
                out.append((spec, G.get_gate(spec)))
        return out

    try:
        named = expand(list(G.known_gates()) if args.cmd == "list" else args.gates)
        methods = [label for label, g in named if not isinstance(g, G.SmoothGate | G.ClipGate)]
        if args.cmd == "plot" and methods:
            raise ValueError(f"{', '.join(methods)}: ratio-control methods have no f(r) to draw (docs/methods.md); "
                             "harness gates plot draws the smooth gates, clip and dual_clip")
    except ValueError as exc:  # a bad name or ν, before anything is computed or drawn
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.cmd == "list":
        for label, g in named:
            hw = "-" if g.hwhm is None else f"{g.hwhm:.5f}"
            print(f"{label:16s} HWHM of w in x = {hw}")
        return 0
    if args.cmd == "check":
        failed = 0
        for spec, gate in named:
            if getattr(gate, "weight_x", None) is None:
                print(f"{spec}: not checked: {gate.not_elementwise}, so properties (i)-(iv) of f'(r) do not apply")
                continue
            results = G.check_admissible(gate)
            ok = all(r.passed for r in results)
            failed += not ok
            print(f"{spec}: {'admissible' if ok else 'NOT admissible'}")
            for r in results:
                where = "" if r.worst_x is None else f" (worst x = {r.worst_x:.4g})"
                print(f"  {'pass' if r.passed else 'FAIL'}  {r.name}: {r.detail}{where}")
        return 1 if failed else 0
    from harness.reporting.figures import plot_gate_shapes

    plot_gate_shapes([g for _, g in named], args.tau, args.out, width=args.width)
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
