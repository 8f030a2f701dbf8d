"""Atomic cached builds of locally made models (the tiny model, converted GGUFs): each lives under
``<cache_dir>/<name>-<hash>`` (``cache_dir``: argument, else ``$HARNESS_CACHE_DIR``, else ``~/.cache/harness``), is
built once across processes (file lock + build in a temporary directory + rename) and is finished when its
``build_info.json`` exists.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


def resolve_cache_dir(cache_dir: str | Path | None = None) -> Path:
    """``cache_dir`` if given, else ``$HARNESS_CACHE_DIR``, else ``~/.cache/harness``."""
    chosen = cache_dir or os.environ.get("HARNESS_CACHE_DIR") or "~/.cache/harness"
    return Path(chosen).expanduser()


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    """A cross-process file lock (``filelock`` ships with huggingface_hub); a no-op if it is missing, in which case
    the rename in :func:`build_cached` still keeps concurrent builds from corrupting each other."""
    try:
        from filelock import FileLock
    except ImportError:  # pragma: no cover - filelock is a transformers dependency
        yield
        return
    with FileLock(str(path)):
        yield


def _complete(out: Path) -> bool:
    # build_info.json is written last, inside the temporary directory, so it only exists in finished builds.
    return (out / "build_info.json").is_file()


def build_cached(out: Path, build: Callable[[Path], Any]) -> Path:
    """Build into a temporary sibling of ``out`` and rename it into place, once across processes.

    The lock makes concurrent sweep cells wait for one build instead of each repeating it; the rename makes the
    finished directory appear atomically, so a reader never sees a half-written model even where file locks do not
    work (some network filesystems): the loser of a rename race discards its copy.
    """
    if _complete(out):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with _lock(out.with_name(out.name + ".lock")):
        if _complete(out):
            return out
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        try:
            build(tmp)
            if not _complete(tmp):
                raise RuntimeError(f"build of {out.name} finished without writing build_info.json")
            if out.exists() and not _complete(out):
                shutil.rmtree(out, ignore_errors=True)  # debris of an interrupted build by an older version
            try:
                os.rename(tmp, out)
            except OSError:
                if not _complete(out):
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def read_build_info(model_dir: str | Path) -> dict[str, Any]:
    """The ``build_info.json`` a cached build wrote (recipe, parameter count, build time, warm-start accuracy)."""
    return json.loads((Path(model_dir) / "build_info.json").read_text())

