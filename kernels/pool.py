"""Work-claiming helper threads for short products: the caller never waits for unclaimed work.

numba's parallel loops fork and join: the caller waits at the end for every thread of the
team, also one that other processes' work keeps off its core. On a shared 2-core host that
made a 0.2 ms decode product take 1-16 ms (2560 -> 6912, M = 1, one busy process beside it).
Here the work is cut into chunks that threads claim from a shared counter (an atomic add in
the numba kernel, `kernels.int8.rows_m1_claimed`): the caller starts claiming at once, the
helpers join when they wake, and the caller waits only for chunks a helper has started. A
late helper finds nothing left and goes back to sleep. Worst case about the one-thread time,
best case the many-thread time.

    run_claimed(kernel, args, chunks)     kernel(*args, ctrl) on the caller and helpers

Helpers are `numba.get_num_threads() - 1` daemon threads, started on first use. Only one
product uses them at a time; a second thread calling meanwhile runs its product alone. After
a fork the child starts its own helpers.
"""

from __future__ import annotations

import os
import threading
import time

import numba
import numpy as np

STALL_S = 5.0   # a helper that has not finished its chunk by then is given up on


class _Helper(threading.Thread):
    def __init__(self):
        super().__init__(name="tdpu-kernel-helper", daemon=True)
        self.wake = threading.Event()
        self.job = None

    def run(self) -> None:
        while True:
            self.wake.wait()
            self.wake.clear()
            job, self.job = self.job, None
            if job is not None:
                kernel, args = job
                kernel(*args)


_lock = threading.Lock()
_helpers: list[_Helper] = []


def _reset_after_fork() -> None:
    global _lock, _helpers
    _lock = threading.Lock()
    _helpers = []


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)


def _started(count: int) -> list[_Helper]:
    _helpers[:] = [h for h in _helpers if h.is_alive()]
    while len(_helpers) < count:
        helper = _Helper()
        helper.start()
        _helpers.append(helper)
    return _helpers[:count]


def run_claimed(kernel, args: tuple, chunks: int) -> None:
    """Run `kernel(*args, ctrl)` until all `chunks` chunks are done (ctrl: int64 [claimed, done])."""
    ctrl = np.zeros(2, np.int64)
    if chunks < 2:
        kernel(*args, ctrl)
        return
    threads = numba.get_num_threads()
    if threads < 2 or not _lock.acquire(blocking=False):
        kernel(*args, ctrl)
        return
    try:
        for helper in _started(threads - 1):
            helper.job = (kernel, args + (ctrl,))
            helper.wake.set()
        kernel(*args, ctrl)
        deadline = None
        while ctrl[1] < chunks:         # only chunks a helper claimed and is still working on
            time.sleep(0)
            if deadline is None:
                deadline = time.monotonic() + STALL_S
            elif time.monotonic() > deadline:
                # A helper stuck inside its chunk: redo the whole product alone (idempotent).
                kernel(*args, np.zeros(2, np.int64))
                return
    finally:
        _lock.release()
