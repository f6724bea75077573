"""Parallel grading in worker processes with a hard per-item timeout.

Every reward kind (``reward.kind``, :mod:`sftrl_jax.rewards.kinds`) grades here: a pool grades with
one kind, whose scorer each worker looks up by name (and, for ``python``, imports) when it starts.

sympy can take practically forever on some expressions a model may write (``9^{9^{9^{9}}}``,
``(10^8)!``), and math-verify's own SIGALRM guard neither interrupts long C-level work nor works off
the main thread. :class:`RewardPool` therefore grades each item in a worker process and kills the
worker when an item exceeds ``timeout_s``; the item scores 0.0, is reported in
``ScoreResult.timed_out`` and logged (logger ``sftrl_jax.rewards``), and a fresh worker takes the
dead one's place, so the next item and the next batch are unaffected. The pool's own process
only does cheap work per item (it sends the text, waits, kills, and logs a fixed-size excerpt; it
never parses a response), and workers end with it: on Linux through the kernel's parent-death
signal, even mid-item, and elsewhere through a thread that watches the parent.

The pool manages its ``multiprocessing`` processes itself rather than using
``concurrent.futures.ProcessPoolExecutor``: an executor cannot cancel a running task, and it does
not tell when a queued task actually starts, so a per-item deadline could not be enforced. Each
worker holds one item at a time; its deadline starts when the item is handed to it. Workers are
started with "spawn" (or "forkserver"), never "fork": the parent runs JAX, whose threads make
forking unsafe. Like any spawn-based pool, a script that creates one needs an
``if __name__ == "__main__":`` guard.

    with RewardPool(num_workers=8, timeout_s=10, kind="math") as pool:
        result = pool.score_batch(responses, ground_truths, require_think=True)
    result.scores, result.timed_out, result.num_timeouts, result.num_errors
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import dataclasses
import logging
import multiprocessing
import multiprocessing.connection
import os
import queue
import signal
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Sequence

from sftrl_jax.rewards.kinds import REWARD_KINDS, RewardLoadError, applies_require_think, grade, load_scorer
from sftrl_jax.run_folder import pid_alive

logger = logging.getLogger("sftrl_jax.rewards")

__all__ = ["RewardPool", "ScoreResult"]

_READY = "ready"
_LOAD_ERROR = "load-error"  # a worker's first message when its kind's scorer cannot be loaded
# A worker that dies before it is ready this many times in a row means the pool cannot start.
_MAX_START_FAILURES = 3
_START_TIMEOUT_S = 300.0
# How often a worker's watcher thread checks that the pool's process is still alive.
_PARENT_POLL_S = 0.5
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


@dataclasses.dataclass
class ScoreResult:
    """Scores of one batch, in input order."""

    scores: list[float]
    timed_out: list[bool]  # graded 0.0 because grading exceeded the per-item timeout
    num_timeouts: int
    num_crashed: int = 0  # items whose worker died (e.g. out of memory); also graded 0.0
    num_errors: int = 0  # items whose scorer raised or returned no score in [0, 1]; also graded 0.0


def _set_parent_death_signal() -> bool:
    """Linux: have the kernel SIGKILL this process when its parent dies. False if unavailable."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _watch_parent(parent_pid: int, pool_pid: int) -> None:
    while True:
        time.sleep(_PARENT_POLL_S)
        # Reparented (the parent died: the pool's process, or the forkserver, which exits with
        # it), or the pool's process is gone.
        if os.getppid() != parent_pid or not pid_alive(pool_pid):
            os._exit(1)


def _exit_with_parent(pool_pid: int) -> None:
    """Make this worker end when the pool's process dies, even in the middle of grading an item.

    A worker grading a hopeless item (sympy on ``9^{9^{9^{9}}}``) never reads its pipe again, so
    it would not notice the pool's process dying and would run on as an orphan at 100 % CPU. Two
    guards: on Linux the kernel's parent-death signal (``PR_SET_PDEATHSIG``), which kills the
    worker even inside long C-level work; everywhere, a daemon thread that polls ``os.getppid()``
    (needs the GIL, so it cannot stop C code that holds the GIL for long, such as a huge integer
    power). The death signal fires when the *thread* that started the worker exits, so workers are
    started from threads that live as long as the process (see ``_start``).
    """
    parent_pid = os.getppid()
    _set_parent_death_signal()
    if os.getppid() != parent_pid or not pid_alive(pool_pid):
        os._exit(1)  # the pool's process died before the guards were up
    threading.Thread(target=_watch_parent, args=(parent_pid, pool_pid), name="parent-watcher", daemon=True).start()


def _worker_main(conn, memory_limit_mb: int | None, pool_pid: int, kind: str, function: str | None) -> None:
    """Worker loop: load reward kind ``kind``'s scorer, then receive ``(response, ground_truth, require_think)``
    and send back ``(score, error)`` (see :func:`sftrl_jax.rewards.kinds.grade`).

    A scorer that cannot be loaded is reported as ``(_LOAD_ERROR, message)`` instead of ready.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    _exit_with_parent(pool_pid)
    if memory_limit_mb:
        # A blow-up (2^{2^{36}}) then ends in MemoryError (score 0) instead of eating the host's RAM.
        import resource

        limit = int(memory_limit_mb) << 20
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    # Timeouts are this pool's job, so math-verify's are off; silence its "timeout is disabled"
    # and per-expression parse warnings.
    logging.getLogger("math_verify").setLevel(logging.CRITICAL)
    try:
        scorer = load_scorer(kind, function)
        warmup = REWARD_KINDS[kind].warmup
        if warmup is not None:  # e.g. import math-verify before saying ready
            scorer(*warmup)
    except BaseException as err:  # noqa: BLE001 - reported to the pool, which raises it
        conn.send((_LOAD_ERROR, f"{type(err).__name__}: {err}"[:1000]))
        return
    conn.send(_READY)
    while True:
        try:
            task = conn.recv()
        except (EOFError, OSError):
            return
        if task is None:
            return
        response, ground_truth, require_think = task
        conn.send(grade(scorer, response, ground_truth, applies_require_think(kind, require_think)))


_spawner_lock = threading.Lock()
_spawner_requests: queue.SimpleQueue | None = None


def _spawner_loop(requests: queue.SimpleQueue) -> None:
    while True:
        process, done = requests.get()
        try:
            process.start()
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            done.set_exception(e)
        else:
            done.set_result(None)


def _forget_spawner() -> None:
    global _spawner_requests
    _spawner_requests = None  # a forked child has no spawner thread


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_spawner)


def _start(process: multiprocessing.process.BaseProcess) -> None:
    """``process.start()`` from a thread that lives as long as this process.

    A worker's parent-death signal (``_exit_with_parent``) is tied to the thread that forked it;
    the main thread qualifies, any other thread (which may finish while the pool lives on, and
    would take the workers with it) hands the start to one long-lived daemon thread.
    """
    global _spawner_requests
    if threading.current_thread() is threading.main_thread():
        process.start()
        return
    with _spawner_lock:
        if _spawner_requests is None:
            _spawner_requests = queue.SimpleQueue()
            threading.Thread(
                target=_spawner_loop, args=(_spawner_requests,), name="sftrl-jax-reward-spawner", daemon=True
            ).start()
        requests = _spawner_requests
    done: concurrent.futures.Future = concurrent.futures.Future()
    requests.put((process, done))
    done.result()


@dataclasses.dataclass(eq=False)
class _Worker:
    process: multiprocessing.process.BaseProcess
    conn: multiprocessing.connection.Connection
    started: float = dataclasses.field(default_factory=time.monotonic)
    ready: bool = False
    task: int | None = None  # index of the item being graded
    deadline: float = 0.0


def _stop(worker: _Worker, graceful: bool = False) -> None:
    """Stop a worker and reap it (no zombie is left behind)."""
    if graceful and worker.ready and worker.task is None:
        try:
            worker.conn.send(None)
        except (OSError, ValueError):
            pass
        worker.process.join(timeout=2.0)
    if worker.process.is_alive():
        worker.process.kill()
    worker.process.join()
    worker.conn.close()


def _shutdown(workers: list[_Worker]) -> None:
    for worker in workers:
        _stop(worker, graceful=True)
    workers.clear()


def _default_num_workers() -> int:
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(32, cpus))


def _snippet(text, limit: int = 120) -> str:
    """A log excerpt of a response: its start and end, a fixed amount of work whatever the text.

    Never parses the text (runs in the pool's process, where a pathological response must not
    cost anything); the end is where the final answer usually is, so it gets the larger share.
    """
    if not isinstance(text, str):
        return f"<{type(text).__name__}>"
    if len(text) <= limit:
        return repr(text)
    head, tail = limit // 3, limit - limit // 3
    return f"{text[:head]!r} ... [{len(text) - limit} chars] ... {text[-tail:]!r}"


class RewardPool:
    """Worker processes that grade ``(response, ground_truth)`` pairs with a hard per-item timeout.

    Args:
      num_workers: worker processes (default: the available CPUs, at most 32).
      timeout_s: per-item limit in seconds, from when a worker receives the item. An item over
        the limit scores 0.0 and its worker is killed and replaced.
      kind: the reward kind graded (a name in :data:`sftrl_jax.rewards.REWARD_KINDS`).
      function: ``"module:function"``, the scorer of kind ``python``. A scorer that cannot be loaded
        (a module that does not import) raises :class:`~sftrl_jax.rewards.RewardLoadError` from the
        first ``score_batch`` / ``wait_ready``.
      memory_limit_mb: address-space limit of each worker (``RLIMIT_AS``; None: unlimited), so a
        runaway expression fails with MemoryError (score 0) instead of exhausting host memory.
      start_method: "spawn" (default) or "forkserver"; "fork" is refused (JAX threads).

    Use as a context manager or call :meth:`close`. ``score_batch`` calls are serialised.
    """

    def __init__(
        self,
        num_workers: int | None = None,
        timeout_s: float = 10.0,
        *,
        memory_limit_mb: int | None = 4096,
        start_method: str = "spawn",
        kind: str = "math",
        function: str | None = None,
    ):
        if kind not in REWARD_KINDS:
            raise ValueError(f"unknown reward kind {kind!r}; choices: {', '.join(sorted(REWARD_KINDS))}")
        if start_method not in ("spawn", "forkserver"):
            raise ValueError(f"start_method must be 'spawn' or 'forkserver', got {start_method!r}")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
        self.num_workers = int(num_workers) if num_workers else _default_num_workers()
        if self.num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        self.timeout_s = float(timeout_s)
        self.memory_limit_mb = memory_limit_mb
        self.kind, self.function = kind, function
        self._ctx = multiprocessing.get_context(start_method)
        self._lock = threading.Lock()
        self._start_failures = 0
        self._workers: list[_Worker] = []
        # Kill the workers if the pool is garbage-collected or the interpreter exits unclosed.
        self._finalizer = weakref.finalize(self, _shutdown, self._workers)
        for _ in range(self.num_workers):
            self._workers.append(self._spawn())

    # -- lifecycle -------------------------------------------------------------------------------

    def _spawn(self) -> _Worker:
        parent_conn, child_conn = self._ctx.Pipe()
        process = self._ctx.Process(
            target=_worker_main,
            args=(child_conn, self.memory_limit_mb, os.getpid(), self.kind, self.function),
            name="sftrl-jax-reward-worker",
            daemon=True,
        )
        _start(process)
        child_conn.close()
        return _Worker(process, parent_conn)

    def _replace(self, i: int) -> None:
        _stop(self._workers[i])
        self._workers[i] = self._spawn()

    def close(self) -> None:
        """Stop all workers. Idempotent."""
        with self._lock:
            self._finalizer()

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def __enter__(self) -> RewardPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def wait_ready(self, timeout: float = _START_TIMEOUT_S) -> None:
        """Block until every worker has started (loaded its scorer); optional before a batch."""
        with self._lock:
            if self.closed:
                raise RuntimeError("RewardPool is closed")
            deadline = time.monotonic() + timeout
            while not all(w.ready for w in self._workers):
                starting = [w.conn for w in self._workers if not w.ready]
                wait_s = deadline - time.monotonic()
                if wait_s <= 0:
                    raise TimeoutError(f"reward workers not ready after {timeout:.0f} s")
                for conn in multiprocessing.connection.wait(starting, timeout=wait_s):
                    i = next(i for i, w in enumerate(self._workers) if w.conn is conn)
                    try:
                        message = conn.recv()
                    except (EOFError, OSError):
                        self._workers[i].process.join(timeout=5.0)
                        self._start_failed(self._workers[i])
                        self._replace(i)
                        continue
                    self._started(self._workers[i], message)

    def _started(self, worker: _Worker, message) -> None:
        """Take a starting worker's first message: ready, or its scorer's load error (raised)."""
        if isinstance(message, tuple) and message[:1] == (_LOAD_ERROR,):
            worker.process.join(timeout=5.0)
            raise RewardLoadError(f"reward.kind={self.kind!r}: the scorer cannot be loaded: {message[1]}")
        worker.ready = message == _READY
        self._start_failures = 0

    # -- grading ---------------------------------------------------------------------------------

    def score_batch(
        self, responses: Sequence[str], ground_truths: Sequence[str], *, require_think: bool = False
    ) -> ScoreResult:
        """Grade ``responses[i]`` against ``ground_truths[i]`` with the pool's reward kind, in parallel.

        ``require_think``: grade only the text after the last ``</think>``; a response without one scores 0
        (not applied by kinds with their own ``</think>`` rule, such as ``luffy_eval``).
        """
        responses, ground_truths = list(responses), list(ground_truths)
        if len(responses) != len(ground_truths):
            raise ValueError(f"{len(responses)} responses but {len(ground_truths)} ground truths")
        with self._lock:
            if self.closed:
                raise RuntimeError("RewardPool is closed")
            try:
                return self._run(responses, ground_truths, bool(require_think))
            except BaseException:
                # Interrupted mid-batch (e.g. KeyboardInterrupt): busy workers would send stale
                # scores into the next batch, so replace them.
                for i, worker in enumerate(self._workers):
                    if worker.task is not None:
                        self._replace(i)
                raise

    def _run(self, responses: list, ground_truths: list, require_think: bool) -> ScoreResult:
        """Grade the batch: hand items to idle workers, collect their scores, and score 0 (replacing the
        worker) an item whose worker dies or runs over time, until every item is settled."""
        n = len(responses)
        scores, timed_out = [0.0] * n, [False] * n
        errors: dict[int, str] = {}
        num_crashed = 0
        todo = deque(range(n))
        remaining = n
        while remaining:
            if not self._workers:  # shut down under us (interpreter exit)
                raise RuntimeError("RewardPool was closed during score_batch")
            self._dispatch(todo, responses, ground_truths, require_think)
            ready = self._wait_for_workers()
            scored, crashed = self._collect(ready, scores, errors, responses)
            num_crashed += crashed
            remaining -= scored + crashed
            remaining -= self._kill_overdue(timed_out, responses, ground_truths)

        if errors:  # one line per batch: a scorer that fails on every item must not flood the log
            first = min(errors)
            logger.warning("reward.kind=%s: the scorer failed on %d of %d items (scored 0); first, item %d: %s",
                           self.kind, len(errors), n, first, errors[first])
        return ScoreResult(scores, timed_out, sum(timed_out), num_crashed, len(errors))

    def _dispatch(self, todo: deque, responses: list, ground_truths: list, require_think: bool) -> None:
        """Hand one item from ``todo`` to each idle, ready worker (an item whose send fails goes back)."""
        for i, worker in enumerate(self._workers):
            if not todo:
                break
            if worker.ready and worker.task is None:
                idx = todo.popleft()
                try:
                    worker.conn.send((responses[idx], ground_truths[idx], require_think))
                except (OSError, ValueError):  # died while idle: retry the item elsewhere
                    todo.appendleft(idx)
                    self._replace(i)
                    continue
                worker.task, worker.deadline = idx, time.monotonic() + self.timeout_s

    def _wait_for_workers(self) -> set:
        """Wait for a result, a worker becoming ready or dying, or the nearest deadline; the ready connections."""
        waiting = [w for w in self._workers if not w.ready or w.task is not None]
        deadlines = [w.deadline for w in waiting if w.task is not None]
        if deadlines:
            wait_s = max(0.0, min(deadlines) - time.monotonic())
        else:  # only starting workers
            first_start = min(w.started for w in waiting)
            wait_s = max(0.0, first_start + _START_TIMEOUT_S - time.monotonic())
            if wait_s == 0.0:
                raise RuntimeError(f"no reward worker became ready within {_START_TIMEOUT_S:.0f} s")
        return set(multiprocessing.connection.wait([w.conn for w in waiting], timeout=wait_s))

    def _collect(self, ready: set, scores: list, errors: dict, responses: list) -> tuple[int, int]:
        """Read the ``ready`` workers' messages into ``scores`` (a scorer's failure into ``errors``) or their
        ready flags, replacing workers that died; ``(items scored, items lost to a crash)``."""
        scored = crashed = 0
        for i, worker in enumerate(self._workers):
            if worker.conn not in ready:
                continue
            try:
                message = worker.conn.recv()
            except (EOFError, OSError):  # the worker died
                worker.process.join(timeout=5.0)  # for its exit code
                if worker.task is None:
                    self._start_failed(worker)
                else:
                    crashed += 1
                    logger.error(  # the worker is dead already; the snippet is bounded work
                        "reward worker died (exit code %s) grading item %d; scored 0 (answer %s)",
                        worker.process.exitcode, worker.task, _snippet(responses[worker.task]),
                    )
                self._replace(i)
                continue
            if not worker.ready:
                self._started(worker, message)
            else:
                score, error = message
                scores[worker.task] = float(score)
                if error is not None:
                    errors[worker.task] = error
                worker.task = None
                scored += 1
        return scored, crashed

    def _kill_overdue(self, timed_out: list, responses: list, ground_truths: list) -> int:
        """Replace the workers whose item is over time, marking the item in ``timed_out``; how many."""
        count = 0
        now = time.monotonic()
        for i, worker in enumerate(self._workers):
            if worker.task is not None and now >= worker.deadline:
                idx = worker.task
                timed_out[idx] = True
                count += 1
                self._replace(i)  # kill the worker first; the log line below is bounded work
                logger.warning(
                    "reward grading of item %d timed out after %.1f s; scored 0, worker replaced "
                    "(ground truth %s, answer %s)",
                    idx, self.timeout_s, _snippet(ground_truths[idx], 60), _snippet(responses[idx]),
                )
        return count

    def _start_failed(self, worker: _Worker) -> None:
        self._start_failures += 1
        logger.error("reward worker exited during start-up (exit code %s)", worker.process.exitcode)
        if self._start_failures >= _MAX_START_FAILURES:
            raise RuntimeError(
                f"reward workers keep failing to start (exit code {worker.process.exitcode}); "
                "see the worker's stderr"
            )
