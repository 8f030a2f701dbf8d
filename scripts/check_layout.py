"""Check the package layout of ``harness/``: no import cycle (imports inside functions count too), no private name
(``_x``) imported from another module, no module over the line limit.

    python scripts/check_layout.py [--max-lines 600]

Prints every violation and exits 1 if there is one. The import graph is read from the source (``ast``), so it sees
what ``import`` statements say, including the lazy ones inside functions; a package's ``__init__`` counts as the
module named after the package.
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "harness"
MAX_LINES = 600  # a module past this holds more than one concept: split it along a concept boundary


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted((ROOT / PACKAGE).rglob("*.py"))}


def imports(path: Path, name: str, known: set[str]) -> list[tuple[str, list[str], int]]:
    """``(imported module, names taken from it, line)`` for every import of a harness module in ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    is_pkg = path.name == "__init__.py"
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == PACKAGE:
                    out.append((alias.name, [], node.lineno))
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import: resolve against this module's package
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join([*base, node.module] if node.module else base)
            else:
                mod = node.module or ""
            if mod.split(".")[0] != PACKAGE:
                continue
            names = [a.name for a in node.names]
            # `from harness import tracking` imports the module harness.tracking
            submodules = [f"{mod}.{n}" for n in names if f"{mod}.{n}" in known]
            if submodules:
                out += [(m, [], node.lineno) for m in submodules]
                names = [n for n in names if f"{mod}.{n}" not in known]
            if names:
                out.append((mod, names, node.lineno))
    return out


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (or a self-loop), by Tarjan's algorithm."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in graph.get(v, ()):
                cycles.append(sorted(comp))

    sys.setrecursionlimit(10_000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def check(max_lines: int) -> list[str]:
    mods = modules()
    known = set(mods)
    problems = []
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        n_lines = len(path.read_text(encoding="utf-8").splitlines())
        if n_lines > max_lines:
            problems.append(f"{path.relative_to(ROOT)}: {n_lines} lines (limit {max_lines})")
        for target, names, line in imports(path, name, known):
            if target not in known:
                problems.append(f"{path.relative_to(ROOT)}:{line}: imports unknown module {target}")
                continue
            # A package importing its own submodules (to re-export them) is the package's public face.
            if target != name:
                graph[name].add(target)
            for n in names:
                if n.startswith("_") and not n.startswith("__"):
                    problems.append(f"{path.relative_to(ROOT)}:{line}: imports private name {n} from {target}")
    for comp in find_cycles(graph):
        problems.append("import cycle among: " + ", ".join(comp))
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-lines", type=int, default=MAX_LINES)
    args = parser.parse_args(argv)
    problems = check(args.max_lines)
    for p in problems:
        print(p)
    n = len(modules())
    verdict = f"OK (no cycle, no private import, none over {args.max_lines} lines)" if not problems else \
        f"{len(problems)} problem(s)"
    print(f"{n} modules in {PACKAGE}/: {verdict}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
