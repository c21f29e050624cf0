"""Work-claiming helper threads for short products: the caller never waits for unclaimed work.

numba's parallel loops fork and join: the caller waits at the end for every thread of the
team, also one that other processes' work keeps off its core. On a shared 2-core host that
made a 0.2 ms decode product take 1-16 ms (2560 -> 6912, M = 1, one busy process beside it).
Here the work is cut into chunks that threads claim from a shared counter (an atomic add in
the numba kernel, `kernels.int8.rows_m1_claimed`): the caller starts claiming at once, the
helpers join when they wake, and the caller waits only for chunks a helper has started. A
late helper finds nothing left. Worst case about the one-thread time, best case the
many-thread time.

    run_claimed(kernel, args, chunks)     kernel(*args, ctrl, signal) on the caller and helpers
    ctrl = post(kernel, args)             helpers run kernel(*args, ctrl, own_signal) while the
    caller_kernel(..., ctrl, SIGNAL)      caller's own kernel runs (and waits for their chunks);
    unpost()                              then the helpers are free (only when ctrl is not None)

Every such kernel starts with `simd.announce(signal)`: the caller's copy gets `SIGNAL`, which
the helpers watch; a helper's copy gets its private counter.

Helpers are `numba.get_num_threads() - 1` daemon threads (at most MAX_HELPERS), started on
first use. Only one product uses them at a time; a second thread calling meanwhile runs its
product alone. After a fork the child starts its own helpers.

Waking a sleeping thread is slow where it matters most: on a virtual machine an idle vCPU
halts, and the helper started 57 us into a 0.2 ms decode product (2560 -> 6912, measured on
the 2-vCPU "rocketlake" host), when the caller had done a third of the work. So after each
job a helper keeps watching for the next one for SPIN_S (outside the GIL: `pause` and
`sched_yield`, so any other runnable thread on its core goes first), and only then sleeps.
Back-to-back products (a decode step runs 210 of them) find it awake. TDPU_POOL_SPIN_US
sets the window (0: sleep at once). Only on x86, where the cycle counter is the TSC: elsewhere
LLVM may read a counter register user code may not (SIGILL) or none at all.
"""

from __future__ import annotations

import functools
import os
import threading
import time

import numba
import numpy as np

from kernels.simd import X86, atomic_load, cpu_relax, cycle_counter, os_yield

STALL_S = 5.0   # a helper that has not finished its chunk by then is given up on
MAX_HELPERS = 15    # more would queue for the GIL on every product for a few dozen chunks


def _spin_window() -> float:
    if not X86:         # no cycle counter known to be readable there: helpers sleep between jobs
        return 0.0
    try:
        return max(0.0, float(os.environ.get("TDPU_POOL_SPIN_US", "200"))) * 1e-6
    except ValueError:
        return 200e-6


SPIN_S = _spin_window()


@functools.cache
def _spin_and_counter():
    """The spin wait and the cycle counter, compiled (or loaded from numba's cache) on first use
    by `kernels.bitlinear._jit`, which chose the cache directory."""
    from kernels.bitlinear import _jit

    @_jit()
    def spin(signal, seen, cycles):
        """Wait outside the GIL until signal[0] != seen (True) or `cycles` have passed (False)."""
        start = cycle_counter()
        while atomic_load(signal, 0) == seen:
            if cycle_counter() - start > cycles:
                return False
            cpu_relax()
            os_yield()
        return True

    @_jit()
    def counter():
        return cycle_counter()

    return spin, counter


@functools.cache
def _cycles_per_second() -> float:
    """The cycle counter's rate (the TSC on x86), measured once over 5 ms of wall time."""
    counter = _spin_and_counter()[1]
    counter()
    c0, t0 = counter(), time.perf_counter()
    time.sleep(0.005)
    c1, t1 = counter(), time.perf_counter()
    rate = (c1 - c0) / max(t1 - t0, 1e-9)
    if rate < 1e6:
        raise RuntimeError(f"the cycle counter does not advance ({c1 - c0} in {t1 - t0:.4f} s)")
    return rate


def cycles(seconds: float) -> int:
    """`seconds` in cycle-counter units (deadlines inside kernels: `kernels.simd.cycle_counter`)."""
    return int(seconds * _cycles_per_second())


# Bumped by every claimed kernel as it starts (outside the GIL): the helpers watch it.
SIGNAL = np.zeros(1, np.int64)


class _Helper(threading.Thread):
    def __init__(self):
        super().__init__(name="tdpu-kernel-helper", daemon=True)
        self.wake = threading.Event()
        self._job = None
        self._job_lock = threading.Lock()
        self.own_signal = np.zeros(1, np.int64)   # what the helper's own kernel calls bump

    def give(self, job) -> None:
        with self._job_lock:
            self._job = job
        self.wake.set()

    def _take(self):
        with self._job_lock:
            job, self._job = self._job, None
        return job

    def run(self) -> None:
        window = 0          # cycles a helper keeps watching after a job
        if SPIN_S > 0:
            try:
                spin = _spin_and_counter()[0]
                spin(self.own_signal, 1, 0)
                window = int(SPIN_S * _cycles_per_second())
            except Exception:  # noqa: BLE001  (no usable cycle counter or compiler: sleep between jobs)
                window = 0
        worked = False
        while True:
            seen = int(SIGNAL[0])
            job = self._take()
            if job is not None:
                self.wake.clear()
                kernel, args = job
                kernel(*args)
                worked = True
                continue
            # Only right after a job: a helper the caller did not use (fewer threads asked for
            # than helpers started) goes to sleep instead of waking on every product. The caller
            # sets the job under the GIL, then its kernel bumps `SIGNAL` once it has let go of
            # the GIL: the helper takes the GIL uncontended and starts at once.
            if worked and window and spin(SIGNAL, seen, window):
                continue
            worked = False
            self.wake.wait()
            self.wake.clear()


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


def _done(ctrl) -> int:
    """ctrl[1] read with acquire ordering (after it, the helpers' writes to the output are seen,
    also where the hardware does not order plain loads: ARM)."""
    return _loaders()(ctrl, 1)


@functools.cache
def _loaders():
    from kernels.bitlinear import _jit

    @_jit()
    def load(ctrl, i):
        return atomic_load(ctrl, i)
    return load


def _thread_count() -> int:
    """What `numba.get_num_threads()` returns, without the two locks it takes on every call
    (1.4 us before every decode product)."""
    return _thread_getter()()


@functools.cache
def _thread_getter():
    """The threading layer's own getter, once started (numba's public function otherwise)."""
    numba.get_num_threads()         # numba's threading layer started
    from numba.np.ufunc import parallel

    getter = getattr(parallel, "_get_num_threads", None)
    return getter if callable(getter) and getter() == numba.get_num_threads() else numba.get_num_threads


def post(kernel, args: tuple):
    """Hand `kernel(*args, ctrl, signal)` to the helpers (ctrl: int64 [claimed, done, ready],
    returned) until `unpost()`; None when they are busy with another product or there are
    none, and the caller then does all the work. The caller's own kernel must bump
    `pool.SIGNAL` once it has let go of the GIL and wait for every chunk before it returns."""
    threads = _thread_count()
    if threads < 2 or not _lock.acquire(blocking=False):
        return None
    try:
        ctrl = np.zeros(3, np.int64)
        for helper in _started(min(threads, MAX_HELPERS + 1) - 1):
            helper.give((kernel, args + (ctrl, helper.own_signal)))
    except BaseException:
        _lock.release()
        raise
    return ctrl


def unpost() -> None:
    """The end of what `post` returned a ctrl for."""
    _lock.release()


def run_claimed(kernel, args: tuple, chunks: int) -> None:
    """Run `kernel(*args, ctrl, signal)` until all `chunks` chunks are done (ctrl: int64
    [claimed, done]; signal: int64 [1], which the kernel bumps as it starts)."""
    ctrl = np.zeros(2, np.int64)
    if chunks < 2:
        kernel(*args, ctrl, np.zeros(1, np.int64))
        return
    threads = _thread_count()
    if threads < 2 or not _lock.acquire(blocking=False):
        kernel(*args, ctrl, np.zeros(1, np.int64))
        return
    try:
        for helper in _started(min(threads, MAX_HELPERS + 1) - 1):
            helper.give((kernel, args + (ctrl, helper.own_signal)))
        kernel(*args, ctrl, SIGNAL)
        deadline = None
        while _done(ctrl) < chunks:     # only chunks a helper claimed and is still working on
            time.sleep(0)
            if deadline is None:
                deadline = time.monotonic() + STALL_S
            elif time.monotonic() > deadline:
                # A helper stuck inside its chunk: redo the whole product alone (idempotent).
                kernel(*args, np.zeros(2, np.int64), np.zeros(1, np.int64))
                return
    finally:
        _lock.release()
