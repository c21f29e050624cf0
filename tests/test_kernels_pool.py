"""Work-claiming helper threads (kernels/pool.py): every chunk done once, by whoever claims it."""

import threading

import numba
import numpy as np

from kernels import pool
from kernels.bitlinear import _jit
from kernels.simd import announce, atomic_add


@_jit()
def _mark(hits, ctrl, signal):
    announce(signal)
    while True:
        c = atomic_add(ctrl, 0, 1)
        if c >= hits.shape[0]:
            break
        hits[c] += 1
        atomic_add(ctrl, 1, 1)


def test_every_chunk_is_done_exactly_once_with_or_without_helpers():
    for threads in (1, numba.config.NUMBA_NUM_THREADS):
        numba.set_num_threads(threads)
        try:
            for chunks in (0, 1, 2, 7, 64, 1000):
                hits = np.zeros(chunks, np.int64)
                pool.run_claimed(_mark, (hits,), chunks)
                assert (hits == 1).all(), (threads, chunks, hits.tolist()[:20])
        finally:
            numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)


def test_a_second_caller_while_the_helpers_are_busy_runs_alone_and_completes():
    results = []

    def call():
        hits = np.zeros(500, np.int64)
        pool.run_claimed(_mark, (hits,), 500)
        results.append(bool((hits == 1).all()))

    threads = [threading.Thread(target=call) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == [True] * 4
