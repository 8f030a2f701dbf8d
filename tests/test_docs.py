"""The documentation still matches the repository: README.md and docs/*.md.

* Every relative link (and image) points at a file that exists, and a ``#anchor`` at a heading of that file.
* Every ``harness ...`` command in a ```` ```bash ```` block is checked. ``harness run|sweep|tune|eval`` commands are
  composed in-process with Hydra's compose API from the config the CLI would use (``harness.cli``: ``conf/run.yaml``,
  ``sweeps/NAME.yaml``, ``sweeps/tune.yaml``, ``conf/evaluate.yaml``), their overrides included; a comma list (a
  sweep axis) is composed once per value. ``harness gates ...`` and ``harness report ...`` get ``--help`` on their
  (sub)command, and every ``--option`` the doc uses must appear in that help.
* Markers, as a trailing comment of a command in a doc:
  ``# error: TEXT``: the command must fail as a bad config before compute (composition, or ``validate_cell`` for
  ``harness run``), with a one-line message containing TEXT, as ``harness run`` would print it;
  ``# not-tested: REASON``: the command is skipped (for commands that cannot be checked without GPUs or optional
  packages; keep them rare).
* ``python PATH`` and ``bash PATH`` in those blocks name files that exist.
"""

from __future__ import annotations

import itertools
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOC_FILES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]

FENCE = re.compile(r"^(```|~~~)")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
ERROR_MARK = re.compile(r"#\s*error:\s*(.+)$")
SKIP_MARK = re.compile(r"#\s*not-tested:\s*(.+)$")
REPO_PATH = re.compile(r"(?<![\w./-])((?:harness|conf|sweeps|scripts|benchmarks|tests|hydra_plugins|docs)/[\w./*-]*)")
HYDRA_SUBCOMMANDS = {"run", "sweep", "tune", "eval"}
HELP_SUBCOMMANDS = {"gates", "report"}
EXECUTED_SUBCOMMANDS = {"plan"}  # no compute: the documented command itself runs
INSPECT_FLAGS = {"--cfg": 1, "-c": 1, "--help": 0, "-h": 0, "--info": 0, "-m": 0, "--multirun": 0}


# ------------------------------------------------------------------------------------------------- markdown


def prose_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) of the lines outside fenced code blocks, inline code spans removed."""
    out, fenced = [], False
    for number, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line.strip()):
            fenced = not fenced
            continue
        if not fenced:
            out.append((number, re.sub(r"`[^`]*`", "", line)))
    return out


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: markup dropped, lower case, punctuation removed, spaces to hyphens."""
    text = re.sub(r"`([^`]*)`", r"\1", heading)
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a Markdown file (a repeated heading gets -1, -2, ... as on GitHub)."""
    seen: dict[str, int] = {}
    out: set[str] = set()
    fenced = False
    for line in path.read_text().splitlines():
        if FENCE.match(line.strip()):
            fenced = not fenced
            continue
        match = None if fenced else HEADING.match(line)
        if match:
            base = slug(match.group(2))
            count = seen.get(base, 0)
            seen[base] = count + 1
            out.add(base if count == 0 else f"{base}-{count}")
    return out


def link_problems(path: Path) -> list[str]:
    """Relative links of ``path`` that point nowhere."""
    problems = []
    for number, line in prose_lines(path.read_text()):
        for target in LINK.findall(line):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                continue
            file_part, _, anchor = target.partition("#")
            dest = (path.parent / file_part).resolve() if file_part else path
            where = f"{path.relative_to(REPO)}:{number}: {target}"
            if not dest.exists():
                problems.append(f"{where}: no such file")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                problems.append(f"{where}: no heading with anchor #{anchor} in {dest.relative_to(REPO)}")
    return problems


def code_spans(path: Path) -> list[tuple[int, str]]:
    """(line number, text) of the inline code spans of ``path`` outside fenced blocks."""
    out, fenced = [], False
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if FENCE.match(line.strip()):
            fenced = not fenced
        elif not fenced:
            out += [(number, span) for span in re.findall(r"`([^`]+)`", line)]
    return out


def repository_path_problems(path: Path) -> list[str]:
    """Paths into the repository named in inline code (``harness/cell.py``, ``conf/eval/*.yaml``) that match nothing.
    Placeholders (``<cell>``, ``{train,test}``, ``NAME``) are left alone."""
    problems = []
    for number, span in code_spans(path):
        for token in REPO_PATH.findall(span):
            if re.search(r"[<{]|\b[A-Z]{2,}\b", token):
                continue
            if not list(REPO.glob(token.rstrip("/"))):
                problems.append(f"{path.relative_to(REPO)}:{number}: {token} does not exist")
    return problems


def python_name_problems(path: Path) -> list[str]:
    """Dotted names in inline code (``harness.stats.two_stage_interval``) whose module does not exist or does not
    mention the name."""
    problems = []
    for number, span in code_spans(path):
        for dotted in re.findall(r"(?<![\w./])(harness(?:\.\w+)+)", span):
            parts = dotted.split(".")
            module = None
            for i in range(len(parts), 0, -1):
                base = REPO.joinpath(*parts[:i])
                for candidate in (base.with_suffix(".py"), base / "__init__.py"):
                    if candidate.is_file():
                        module, rest = candidate, parts[i:]
                        break
                if module:
                    break
            if module is None:
                problems.append(f"{path.relative_to(REPO)}:{number}: no module for {dotted}")
            elif rest and not re.search(rf"\b{re.escape(rest[0])}\b", module.read_text()):
                problems.append(f"{path.relative_to(REPO)}:{number}: {rest[0]} is not in {module.relative_to(REPO)}")
    return problems


# ------------------------------------------------------------------------------------------------- commands


@dataclass(frozen=True)
class DocCommand:
    """One shell command of a ```bash block."""

    where: str  # file:line
    text: str  # the command, continuation lines joined, comment removed
    error: str | None  # the text after "# error:"
    skip: str | None  # the reason after "# not-tested:"


def bash_commands(path: Path) -> list[DocCommand]:
    """The commands of every ```bash block of ``path``."""
    out: list[DocCommand] = []
    lines = path.read_text().splitlines()
    in_bash = False
    pending: list[str] = []
    start = 0
    for number, line in enumerate(lines, 1):
        stripped = line.strip()
        if FENCE.match(stripped):
            in_bash = not in_bash and stripped[3:].strip() in ("bash", "sh", "shell")
            pending = []
            continue
        if not in_bash or (not pending and (not stripped or stripped.startswith("#"))):
            continue
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending.append(stripped[:-1])
            continue
        pending.append(stripped)
        text = " ".join(pending)
        pending = []
        error, skip = ERROR_MARK.search(text), SKIP_MARK.search(text)
        command = re.sub(r"(^|\s)#.*$", "", text).strip()
        out.append(DocCommand(f"{path.relative_to(REPO)}:{start}", command,
                              error.group(1).strip() if error else None, skip.group(1).strip() if skip else None))
    return out


def segments(command: str) -> list[list[str]]:
    """The simple commands of a shell line (split at &&, ||, ;, | and a trailing &), as argument lists. A command
    substitution such as $(hostname) stands for a plain word."""
    command = re.sub(r"\$\([^)]*\)", "localhost", command)
    words = shlex.split(command)
    out, current = [], []
    for word in words:
        if word in ("&&", "||", ";", "|", "&"):
            out.append(current)
            current = []
        else:
            current.append(word)
    out.append(current)
    return [argv for argv in out if argv]


def harness_argv(argv: list[str]) -> list[str] | None:
    """The arguments after ``harness`` (or after ``-m harness.cli`` under python or accelerate), else None."""
    while argv and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", argv[0]):  # VAR=value prefixes
        argv = argv[1:]
    if argv and argv[0] == "harness":
        return argv[1:]
    if "-m" in argv:
        i = argv.index("-m")
        if argv[i + 1:i + 2] == ["harness.cli"]:
            return argv[i + 2:]
    return None


ALL_COMMANDS = [c for path in DOC_FILES for c in bash_commands(path)]
HARNESS_COMMANDS = [(c, argv) for c in ALL_COMMANDS for seg in segments(c.text)
                    if (argv := harness_argv(seg)) is not None]
FILE_REFERENCES = [(c, seg[1]) for c in ALL_COMMANDS for seg in segments(c.text)
                   if len(seg) > 1 and seg[0] in ("python", "python3", "bash") and seg[1].endswith((".py", ".sh"))]


def config_source(sub: str, args: list[str]) -> tuple[Path, str, list[str], list[str]]:
    """(config dir, config name, extra overrides, remaining args) the CLI's subcommand composes from
    (:mod:`harness.cli`)."""
    from harness.config import CONF_DIR, SWEEPS_DIR

    if sub == "run":
        return CONF_DIR, "run", [], args
    if sub == "eval":
        return CONF_DIR, "evaluate", [], args
    searchpath = [f"hydra.searchpath=[file://{CONF_DIR}]"]
    if sub == "tune":
        return SWEEPS_DIR, "tune", searchpath, args
    name = "gates"
    if args and "=" not in args[0] and not args[0].startswith("-"):
        name, args = args[0], args[1:]
    return SWEEPS_DIR, name, searchpath, args


def overrides_of(args: list[str]) -> list[list[str]]:
    """The override lists to compose: the inspection flags dropped, each comma list (sweep axis) expanded."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    kept, i = [], 0
    while i < len(args):
        if args[i] in INSPECT_FLAGS:
            i += 1 + INSPECT_FLAGS[args[i]]
            continue
        kept.append(args[i])
        i += 1
    choices = []
    for override in OverridesParser.create().parse_overrides(kept):
        if override.is_sweep_override():
            key = override.get_key_element()
            choices.append([f"{key}={value}" for value in override.sweep_string_iterator()])
        else:
            choices.append([override.input_line])
    return [list(combo) for combo in itertools.product(*choices)]


def compose(sub: str, args: list[str]) -> list:
    """Every config the command composes (one per combination of its comma lists), as the CLI would."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    import hydra_plugins.harness_sweepers  # noqa: F401  (the sweepers' config-store entries)

    config_dir, name, extra, rest = config_source(sub, args)
    configs = []
    for overrides in overrides_of(rest):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
            configs.append(hydra_compose(config_name=name, overrides=[*overrides, *extra],
                                         return_hydra_config=True))
    GlobalHydra.instance().clear()
    return configs


def check_fails_as_documented(sub: str, args: list[str], expected: str) -> None:
    """The command is refused before compute with a one-line config error containing ``expected``."""
    from omegaconf import open_dict

    from harness.cell import validate_cell
    from harness.cli import is_config_error, one_line

    try:
        for cfg in compose(sub, args):
            if sub == "run":
                with open_dict(cfg):
                    del cfg["hydra"]
                validate_cell(cfg)
    except Exception as exc:  # what the CLI turns into "harness run: error: ..." and exit code 2
        assert is_config_error(exc), f"not a config error: {type(exc).__name__}: {exc}"
        assert expected in one_line(exc), f"the error says {one_line(exc)!r}, the doc says {expected!r}"
        return
    pytest.fail(f"the doc says this fails with {expected!r}, but it composed and validated")


def check_help(argv: list[str], capsys) -> None:
    """``--help`` of the (sub)command works, and lists every --option the doc passes."""
    from harness.cli import main

    sub = argv[0]
    words = [a for a in argv[1:2] if not a.startswith("-")] if sub == "gates" else []
    with pytest.raises(SystemExit) as exit_info:
        main([sub, *words, "--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    for option in (a.split("=")[0] for a in argv[1:] if a.startswith("--")):
        assert option in help_text, f"{option} is not an option of harness {' '.join([sub, *words])}"


# ------------------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("path", DOC_FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves(path):
    assert not link_problems(path), "\n".join(link_problems(path))


@pytest.mark.parametrize("path", DOC_FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_named_repository_path_exists(path):
    """The code moves; the map in README.md and the pages must move with it."""
    problems = repository_path_problems(path) + python_name_problems(path)
    assert not problems, "\n".join(problems)


def test_the_docs_have_commands_to_check():
    """A parser that silently found nothing would pass every other test."""
    assert len(HARNESS_COMMANDS) >= 40
    assert {argv[0] for _, argv in HARNESS_COMMANDS} >= HYDRA_SUBCOMMANDS | HELP_SUBCOMMANDS
    assert any(c.error for c, _ in HARNESS_COMMANDS)


@pytest.mark.parametrize(("command", "argv"), HARNESS_COMMANDS, ids=[c.where for c, _ in HARNESS_COMMANDS])
def test_every_documented_harness_command_works(command, argv, capsys):
    if command.skip:
        pytest.skip(command.skip)
    sub, args = argv[0], argv[1:]
    assert sub in HYDRA_SUBCOMMANDS | HELP_SUBCOMMANDS | EXECUTED_SUBCOMMANDS, f"unknown subcommand in {command.text!r}"
    if sub in EXECUTED_SUBCOMMANDS:
        from harness.cli import main

        assert main(argv) == (2 if command.error else 0), command.text
    elif command.error:
        assert sub in HYDRA_SUBCOMMANDS, "only Hydra commands can be marked '# error:'"
        check_fails_as_documented(sub, args, command.error)
    elif sub in HYDRA_SUBCOMMANDS:
        assert compose(sub, args)
    else:
        check_help(argv, capsys)


@pytest.mark.parametrize(("command", "script"), FILE_REFERENCES, ids=[c.where for c, _ in FILE_REFERENCES])
def test_every_documented_script_exists(command, script):
    assert (REPO / script).is_file(), f"{command.where}: {script} does not exist"
