"""math-verify 0.9 verdicts under a deadline, in a reusable process pool: the slow path of :mod:`harness.scoring`.

Why the math-verify calls are wrapped the way they are:

- math-verify's own timeouts use ``signal.alarm(seconds)``: main thread only, whole seconds only (a
  float such as ``5.0`` raises ``TypeError`` inside ``parse``/``verify``, which they swallow: ``parse``
  silently returns ``[]`` and ``verify`` returns ``False``), and every call re-arms the one
  process-wide ``ITIMER_REAL``. So math-verify's timeouts are off and ONE deadline of ours
  (``signal.setitimer``, sub-second) covers the whole verdict (parse gold, parse prediction, verify).
  Our timeout exception is a ``BaseException`` so math-verify's ``except Exception`` cannot swallow it,
  and the alarm re-fires every 50 ms after the deadline because Python drops exceptions raised inside
  gc callbacks or ``__del__`` (observed).
- A signal only stops Python code; a C extension that never checks for signals could still outrun
  it. :func:`harness.scoring.score_batch` therefore runs math-verify in a reusable process pool (forkserver; like any
  spawn/forkserver pool it needs the calling script's entry point under ``if __name__ == "__main__":``)
  and keeps a watchdog in the parent that kills and rebuilds the pool when a worker stays silent past
  its deadline. A timed-out item scores incorrect and keeps its extracted text.
- Model text is never evaluated as code here. The only parser that sees it is math-verify's (ANTLR
  LaTeX grammar, and sympy ``parse_expr`` only on strings its regex restricts to digits and arithmetic
  operators). Workers run with an address-space cap.
- Parses, verdicts and timeouts are cached per process (bounded LRU): in training a gold is judged
  once per sample and samples repeat answers.
"""

from __future__ import annotations

import functools
import logging
import multiprocessing
import multiprocessing.util
import os
import re
import signal
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, CancelledError, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool

from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

logger = logging.getLogger(__name__)

_EXTRACTION_CONFIG = (LatexExtractionConfig(), ExprExtractionConfig())

# A worker that overruns its item's deadline by this much is stuck in C code where our SIGALRM cannot
# reach it; only then is it killed (killing costs a pool rebuild, so it must not fire on slow-but-live
# items that are about to be interrupted by their own timer).
KILL_GRACE_S = 2.0
# An item that breaks the pool this many times (worker crash, OOM kill) scores incorrect instead of
# being retried forever.
_MAX_ATTEMPTS = 2
# Address-space cap per worker: sympy can try to materialise astronomically large numbers from model
# text (``10^{10^{10}}``); with a cap that becomes a MemoryError (scored incorrect) instead of the
# trainer's host swapping or being OOM-killed.
_WORKER_MEMORY_LIMIT_BYTES = 4 << 30


# LaTeX thin space used as a thousands separator ("1\,000"): math-verify reads it as 1*000 = 0.
_THIN_SPACE_THOUSANDS_RE = re.compile(r"(?<=\d)\\,(?=\d{3}(?!\d))")
# An unescaped "$" (or \( \[) means the text already delimits its own math.
_HAS_MATH_DELIMITER_RE = re.compile(r"(?<!\\)\$|\\\(|\\\[")


def _as_latex(text: str) -> str:
    """Text ready for ``parse``: LaTeX without math delimiters is wrapped in ``$...$``; ``1\\,000`` and
    a leading ``+`` are normalised first (math-verify misreads both).

    math-verify only finds LaTeX inside math delimiters: a bare ``\\dfrac{9}{7}`` parses to nothing and
    a bare ``\\left( 3, \\frac{\\pi}{2} \\right)`` parses to just ``3``. Newlines are flattened because
    the inline ``$...$`` pattern does not cross lines.
    """
    text = _THIN_SPACE_THOUSANDS_RE.sub("", text.strip())
    if text.startswith("+") and text[1:2].isdigit():
        # A unary plus is a no-op, but math-verify reads "$+1,234$" as the set {1, 234} ("$1,234$" is 1234).
        text = text[1:]
    if _HAS_MATH_DELIMITER_RE.search(text):
        return text
    return "$" + " ".join(text.split()) + "$"


class _JudgeTimeout(BaseException):
    """Raised by our SIGALRM handler. ``BaseException`` so math-verify's ``except Exception`` lets it through."""


def _raise_timeout(signum: int, frame: object) -> None:
    raise _JudgeTimeout


# After the deadline the alarm keeps firing at this interval until we disarm it. One exception is not
# enough: Python ignores exceptions raised inside gc callbacks, ``__del__`` and weakref callbacks, and
# a bare ``except:`` deep in sympy/ANTLR would swallow it too (seen: a hypothesis gc callback ate the
# first one and the parse ran on for seconds).
_REARM_S = 0.05
# Items that ran out of time, with the budget they had: a repeat with no larger budget is answered at
# once (a degenerate answer repeated by many samples or steps costs one timeout per worker, not one
# per sample). Bounded, least recently used first out.
_TIMED_OUT_MAX = 4096
_timed_out: OrderedDict[tuple[str, str], float] = OrderedDict()


def _disarm_timer() -> None:
    """Stop our alarm; a last alarm may already be pending when we get here, so absorb it and retry."""
    while True:
        try:
            signal.setitimer(signal.ITIMER_REAL, 0)
            return
        except _JudgeTimeout:
            continue


@functools.lru_cache(maxsize=4096)
def _parse(text: str) -> tuple:
    """math-verify ``parse`` of ``text`` (wrapped if needed), cached.

    Golds repeat once per sampled completion and many completions share an answer, so the cache saves
    most parses in training. If the wrapped form yields nothing, the raw text is tried as well.
    math-verify's own timeout is off (``parsing_timeout=None``): the caller's deadline covers it.
    """
    wrapped = _as_latex(text)
    parsed = parse(wrapped, extraction_config=_EXTRACTION_CONFIG, parsing_timeout=None)
    if not parsed and wrapped != text:
        parsed = parse(text, extraction_config=_EXTRACTION_CONFIG, parsing_timeout=None)
    return tuple(parsed)


@functools.lru_cache(maxsize=8192)
def _judge(pred: str, gold: str) -> bool:
    """math-verify verdict without any deadline (callers add one); cached like :func:`_parse` (a timed-out
    call raises, so it is never cached)."""
    gold_parsed = _parse(gold)
    if not gold_parsed:
        return False
    pred_parsed = _parse(pred)
    if not pred_parsed:
        return False
    return bool(verify(list(gold_parsed), list(pred_parsed), timeout_seconds=None))


def judge_with_deadline(pred: str, gold: str, timeout_s: float) -> bool | None:
    """:func:`_judge` under a ``setitimer`` deadline; ``None`` if it ran out. Main thread only.

    An outer ``ITIMER_REAL`` the caller may have armed is restored afterwards with its remaining time.
    """
    key = (pred, gold)
    if _timed_out.get(key, 0.0) >= timeout_s:
        _timed_out.move_to_end(key)
        return None
    started = time.monotonic()
    old_handler = signal.signal(signal.SIGALRM, _raise_timeout)
    old_delay, old_interval = 0.0, 0.0
    verdict: bool | None = None
    try:
        try:
            old_delay, old_interval = signal.setitimer(signal.ITIMER_REAL, timeout_s, _REARM_S)
            verdict = _judge(pred, gold)
        finally:
            # Inside the try: an alarm that lands before the timer is off is caught just below.
            _disarm_timer()
    except _JudgeTimeout:
        verdict = None
        _timed_out[key] = max(timeout_s, _timed_out.get(key, 0.0))
        _timed_out.move_to_end(key)
        if len(_timed_out) > _TIMED_OUT_MAX:
            _timed_out.popitem(last=False)
    finally:
        signal.signal(signal.SIGALRM, old_handler)
        if old_delay > 0:
            remaining = max(old_delay - (time.monotonic() - started), 1e-3)
            signal.setitimer(signal.ITIMER_REAL, remaining, old_interval)
    return verdict


class _DropTimeoutDisabledWarning(logging.Filter):
    """math-verify warns once that its timeout is off; ours is on, so the warning is noise."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Timeout is disabled")


for _name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_name).addFilter(_DropTimeoutDisabledWarning())


# --------------------------------------------------------------------------------------------------
# Process pool


# Representative answers parsed once per worker at start-up. math-verify's LaTeX parser (ANTLR, pure
# Python) builds its prediction caches lazily: a cold worker parses about 2x slower than a warm one.
_WARMUP_ANSWERS = (
    r"\frac{1}{2}",
    r"\sqrt{2}",
    r"\left( 3, \frac{\pi}{2} \right)",
    r"[-2, 7)",
    r"\{1, 2\}",
    r"x^2 + 2x + 1",
    r"2\pi",
    r"\text{(C)}",
    r"10\%",
    r"x = 3",
    r"(-\infty, 0] \cup (1, \infty)",
    r"\begin{pmatrix} 1 \\ 2 \end{pmatrix}",
    r"3 + 4i",
    r"30^\circ",
    r"\$18.90",
    r"5\sqrt{3} - 2",
    r"\log_2 8",
    r"\frac{\sqrt{3}}{2}",
)


def _worker_init() -> None:
    """Runs once in each pool worker, before its first item (and before any item deadline starts)."""
    # Ctrl-C goes to the whole process group; the parent handles it, workers should not print tracebacks.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        cap = _WORKER_MEMORY_LIMIT_BYTES if hard == resource.RLIM_INFINITY else min(hard, _WORKER_MEMORY_LIMIT_BYTES)
        if soft == resource.RLIM_INFINITY or soft > cap:
            resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    except (ImportError, ValueError, OSError):  # pragma: no cover - non-POSIX or locked-down limits
        pass
    for answer in _WARMUP_ANSWERS:
        judge_with_deadline(answer, r"\frac{1}{3}", 10.0)
    # Keep the warm parser, not the warm-up answers.
    _parse.cache_clear()
    _judge.cache_clear()
    _timed_out.clear()


def _worker_ready() -> int:
    """A task that proves its worker finished :func:`_worker_init`; the short sleep spreads a round of
    these over all workers instead of letting the first ready worker take them all."""
    time.sleep(0.02)
    return os.getpid()


def _judge_in_worker(pred: str, gold: str, timeout_s: float) -> bool | None:
    return judge_with_deadline(pred, gold, timeout_s)


_pool_lock = threading.Lock()
_pool: ProcessPoolExecutor | None = None
_pool_workers = 0
_pool_pid = 0


def _mp_context() -> multiprocessing.context.BaseContext:
    """forkserver where available: workers fork from a clean single-threaded server that has already
    imported sympy and math-verify (cheap rebuilds after a kill, and no fork of a multi-threaded trainer);
    spawn elsewhere."""
    current = multiprocessing.get_start_method(allow_none=True)
    if current is not None and current not in multiprocessing.get_all_start_methods():
        # A worker of another process library (joblib/loky runs parallel sweep cells) set its own start method.
        # Our workers replay the parent's start method at start-up and cannot set one they never imported, so the
        # pool would die at birth: give this process a standard default first.
        multiprocessing.set_start_method("spawn", force=True)
    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        # Only takes effect if the forkserver is not running yet; otherwise workers import on demand.
        ctx.set_forkserver_preload([__name__])
        return ctx
    return multiprocessing.get_context("spawn")


def _get_pool(workers: int | None) -> tuple[ProcessPoolExecutor, int]:
    """The shared pool and its size: ``workers`` processes (``None``: the current pool, else
    ``os.cpu_count()``), created and warmed up if needed."""
    global _pool, _pool_workers, _pool_pid
    with _pool_lock:
        # A pool inherited through fork belongs to the parent process: never use it from the child.
        if _pool is not None and _pool_pid != os.getpid():
            _pool = None
        if workers is None:
            workers = _pool_workers if _pool is not None else (os.cpu_count() or 1)
        if _pool is not None and _pool_workers != workers:
            _pool.shutdown(wait=False, cancel_futures=True)
            _pool = None
        if _pool is None:
            pool = ProcessPoolExecutor(max_workers=workers, mp_context=_mp_context(), initializer=_worker_init)
            _wait_until_ready(pool, workers)
            _pool, _pool_workers, _pool_pid = pool, workers, os.getpid()
            # A process started by multiprocessing (a joblib/loky sweep worker) joins its children when it exits,
            # before the interpreter's own shutdown would stop this pool: stop it first, or the exit waits forever.
            multiprocessing.util.Finalize(None, pool.shutdown, kwargs={"wait": True, "cancel_futures": True},
                                          exitpriority=10)
        return _pool, _pool_workers


def _wait_until_ready(pool: ProcessPoolExecutor, workers: int, limit_s: float = 120.0) -> None:
    """Block until every worker has started and run :func:`_worker_init`.

    Item deadlines are measured from submission, so a worker still importing (with forkserver/spawn it
    also re-imports the caller's ``__main__``) must not receive a timed item: it would be killed as hung.
    """
    seen: set[int] = set()
    give_up = time.monotonic() + limit_s
    try:
        while len(seen) < workers and time.monotonic() < give_up:
            probes = [pool.submit(_worker_ready) for _ in range(workers)]
            for probe in probes:
                seen.add(probe.result(timeout=max(0.0, give_up - time.monotonic())))
    except BrokenProcessPool as exc:
        pool.shutdown(wait=False, cancel_futures=True)
        raise RuntimeError(
            "the scoring worker pool failed to start (does the calling script guard its entry point with "
            "`if __name__ == '__main__':`?)"
        ) from exc
    except TimeoutError:
        logger.warning("scoring: only %d of %d pool workers started within %.0fs", len(seen), workers, limit_s)


def _discard_pool(pool: ProcessPoolExecutor, kill: bool) -> None:
    """Drop ``pool`` (if it is still the shared one); ``kill`` SIGKILLs its workers first (stuck in C)."""
    global _pool
    with _pool_lock:
        if _pool is pool:
            _pool = None
    if kill:
        # No public API to kill a worker before Python 3.14 (``terminate_workers``); ``_processes`` has
        # been the pid -> Process map since 3.2.
        for proc in list((getattr(pool, "_processes", None) or {}).values()):
            try:
                proc.kill()
            except (OSError, AttributeError, ValueError):
                pass
    pool.shutdown(wait=False, cancel_futures=True)


def shutdown_pool() -> None:
    """Stop the shared pool (tests and benchmarks use this to start from cold caches)."""
    global _pool
    with _pool_lock:
        pool, _pool = _pool, None
    if pool is not None:
        pool.shutdown(wait=True, cancel_futures=True)


def judge_in_pool(tasks: Sequence[tuple[str, str]], timeout_s: float, workers: int | None) -> list[bool | None]:
    """math-verify verdicts for ``(pred, gold)`` tasks in the process pool; ``None`` = timed out / failed.

    Each worker's own timer interrupts its item at ``timeout_s``. The parent only watches for workers
    that cannot be interrupted: up to two items per worker are in flight (so a worker never idles while
    the parent hands it the next item), hence an item has started within one item-time of submission
    and is overdue ``2 * timeout_s + KILL_GRACE_S`` after it. Then the pool is killed and rebuilt; the
    pool's queue is FIFO, so the oldest overdue items (one per worker at most) are the ones that were
    running: they score as timed out, everything else in flight is simply run again.
    """
    results: list[bool | None] = [None] * len(tasks)
    attempts = [0] * len(tasks)
    pending = deque(range(len(tasks)))
    inflight: dict[Future, tuple[int, float]] = {}  # insertion order = submission order
    pool, workers = _get_pool(workers)  # resolves None

    def requeue_after_break(index: int) -> None:
        attempts[index] += 1
        if attempts[index] < _MAX_ATTEMPTS:
            pending.append(index)
        else:
            logger.warning("scoring: item %d broke the worker pool %d times; scored incorrect", index, _MAX_ATTEMPTS)

    def requeue_inflight() -> None:
        for i, _ in reversed(list(inflight.values())):
            pending.appendleft(i)
        inflight.clear()

    while pending or inflight:
        while pending and len(inflight) < 2 * workers:
            index = pending.popleft()
            try:
                future = pool.submit(_judge_in_worker, *tasks[index], timeout_s)
            except (BrokenProcessPool, RuntimeError):
                # Broken (a worker died) or shut down by another thread: rebuild and resubmit everything.
                pending.appendleft(index)
                requeue_inflight()
                _discard_pool(pool, kill=True)
                pool, workers = _get_pool(workers)
                continue
            inflight[future] = (index, time.monotonic() + 2 * timeout_s + KILL_GRACE_S)

        next_deadline = min(deadline for _, deadline in inflight.values())
        done, _ = wait(inflight, timeout=max(0.0, next_deadline - time.monotonic()), return_when=FIRST_COMPLETED)
        for future in done:
            index, _ = inflight.pop(future)
            try:
                results[index] = future.result()
            except (BrokenProcessPool, CancelledError):
                # The pool died under the item (a worker crashed, or another thread replaced the pool).
                requeue_after_break(index)
            except Exception:  # an unexpected error inside math-verify's machinery: score, don't crash
                logger.warning("scoring: item %d failed in the worker; scored incorrect", index, exc_info=True)
                results[index] = None
        if done:
            continue

        now = time.monotonic()
        overdue = [f for f, (_, deadline) in inflight.items() if deadline <= now and not f.done()]
        if not overdue:
            continue
        for future in overdue[:workers]:
            index, _ = inflight.pop(future)
            results[index] = None
            logger.warning(
                "scoring: item %d overran its %.1fs timeout; workers killed, scored incorrect", index, timeout_s
            )
        requeue_inflight()
        _discard_pool(pool, kill=True)
        pool, workers = _get_pool(workers)
    return results
