"""SIGTERM and SIGINT as a clean stop of a training run, an evaluation or a pipeline.

``with stop_requests():`` installs handlers (main thread only; nested blocks share the outermost's) that
record the first signal instead of dying: the training loop finishes the step under way, writes a checkpoint
of it when the last one is older, and raises :class:`Stopped`; an evaluation stops after the chunk under way
(its completions already appended). The ``with`` blocks on the way out release the run-folder lock, and the
command line prints the exception's one line and exits 128 + the signal's number (130 for SIGINT, 143 for
SIGTERM). A second signal abandons the step at once (no checkpoint: the run resumes from the last one).

With several processes the loop agrees on the stop at each step boundary, and an evaluation at each chunk
boundary (:func:`agreed`, one small collective): any process signalled, all stop after the same step or
chunk, so the collective checkpoint save is made by all of them. A second signal is not agreed: it ends the
process signalled, and the others wait in their next collective until the launcher ends them.
"""

from __future__ import annotations

import contextlib
import signal
import threading

HANDLED = (signal.SIGTERM, signal.SIGINT)

_requested: list[int] = []  # the signals received since the outermost block began
_depth = 0


class Stopped(Exception):
    """A run stopped on a signal; ``exit_code`` is 128 + the signal's number."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


def requested() -> int | None:
    """The first signal received in the current block, or None."""
    return _requested[0] if _requested else None


def _handle(signum, _frame) -> None:
    _requested.append(signum)
    if len(_requested) > 1:  # a second signal: do not wait for the step
        raise Stopped(signum, f"stopped by a second signal ({signal_name(signum)}) in the middle of a step; the run "
                              "resumes from its last checkpoint: rerun the same command with --resume")


@contextlib.contextmanager
def stop_requests():
    """Record SIGTERM/SIGINT for the block instead of the default (death, KeyboardInterrupt)."""
    global _depth
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {} if _depth else {s: signal.signal(s, _handle) for s in HANDLED}
    if not _depth:
        _requested.clear()
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def agreed(flag: int | None) -> int | None:
    """The signal any process received (the same answer on every process; a collective with several)."""
    import jax

    if jax.process_count() == 1:
        return flag
    import numpy as np
    from jax.experimental import multihost_utils

    every = np.asarray(multihost_utils.process_allgather(np.int32(flag or 0))).ravel()
    return next((int(s) for s in every if s), None)
