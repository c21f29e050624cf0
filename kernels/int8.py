"""The integer core on 8-bit dot products: unsigned 2-bit codes x signed int8 activations.

Same contract as `kernels.bitlinear.ternary_matmul_int` (int8 [M, K] x packed [N/4, K] in
either layout -> int32 [M, N], exact), same packed bytes read in place (the layouts of
`kernels.packing`), different instructions (`kernels.simd`): `vpmaddubsw` on AVX2,
`vpdpbusd` on AVX-VNNI (256 bit) and AVX-512 VNNI (512 bit). One source, one numba
specialization per instruction set.

Per vector of packed bytes b (W consecutive k of one packed row, four output rows each):

    u0 = b & 0x03          = c0          u2 = (b >> 4) & 0x03 = c2
    u1 = b & 0x0C          = c1 << 2     u3 = (b >> 4) & 0x0C = c3 << 2

(AVX2: one 16-bit shift for the pair u2, u3; its bleed from the next byte is masked off). Every
u <= 8, so one `vpmaddubsw` pair sum is within 2 * 8 * 128 = 2048 in magnitude and GROUP = 16
of them stay inside int16 (-128 * 8 * 2 * 16 = -32768, 127 * 8 * 2 * 16 = 32512): no
saturation, no wrap. After each group the int16 sums are widened into int32 (`vpmaddwd`
with ones). VNNI sums in int32 directly, so there the upper codes are masked in place, no
shift: u2 = b & 0x30 = c2 << 4, u3 = b & 0xC0 = c3 << 6 (<= 128). At the end code i's sum is
shifted right by its scale (exact: every term is a multiple of it, `_finish`) and sum_k q_k
subtracted (w = c - 1). The K % W tail runs in scalar code on the first decomposition.

Blocking: M = 1 (and an odd M's last row) takes two packed rows per step, so each
activation vector feeds eight dot products; M >= 2 takes one packed row x two activation
rows (the masked codes are computed once for both), tasks being chunks of ROWS_PER_TASK
packed rows so that the chunk's weights stay in L1 while all M rows stream past them.
"""

from __future__ import annotations

import numpy as np

from kernels import pool
from kernels.bitlinear import _jit, _one_packed_row, _quantize_row, _rescale_row
from kernels.simd import (
    announce,
    atomic_add,
    atomic_load,
    cpu_relax,
    cycle_counter,
    isa_vnni,
    isa_width,
    os_yield,
    vand,
    vdot,
    vflush,
    vhsum,
    vload,
    vsplat,
    vsrl16,
    vzero,
)

GROUP = 16
ROWS_PER_TASK = 8
CHUNKS = 32          # claimable chunks of a one-row product (kernels.pool)
SHARED_BYTES = 1 << 20   # smaller packed weights: the caller alone (2560 -> 640 is 0.4 MB)


@_jit()
def _tail4(p, r, q, m, start):
    """Scalar sums of the four codes of packed row r over k >= start (u0..u3 as above)."""
    t0 = np.int32(0)
    t1 = np.int32(0)
    t2 = np.int32(0)
    t3 = np.int32(0)
    for k in range(start, p.shape[1]):
        u = np.int32(p[r, k])
        h = u >> 4
        x = np.int32(q[m, k])
        t0 = np.int32(t0 + (u & 3) * x)
        t1 = np.int32(t1 + (u & 12) * x)
        t2 = np.int32(t2 + (h & 3) * x)
        t3 = np.int32(t3 + (h & 12) * x)
    return t0, t1, t2, t3


@_jit()
def _finish(vnni, a0, a1, a2, a3, e0, e1, e2, e3):
    """Code sums (c0, c1, c2, c3) from the vector sums a_i and the scalar tail sums e_i: the
    vectors hold c_i scaled by 1, 4 and then 1, 4 (shifted) or 16, 64 (VNNI, masked in place),
    the tails 1, 4, 1, 4. Every shift is exact (each term is a multiple of its scale)."""
    high = 4 if vnni else 0
    return (vhsum(a0) + e0, (vhsum(a1) + e1) >> 2,
            (vhsum(a2) >> high) + e2, (vhsum(a3) >> (high + 2)) + (e3 >> 2))


@_jit()
def _two_rows_one_m(isa, p, r, q, m, width):
    """Code sums (c0, c1, c2, c3) of packed rows r and r + 1 against activation row m."""
    k_dim = p.shape[1]
    blocks = k_dim // width
    vnni = isa_vnni(isa)
    m3 = vsplat(isa, 3)
    m12 = vsplat(isa, 12)
    m48 = vsplat(isa, 48)
    m192 = vsplat(isa, 192)
    a0 = vzero(isa)
    a1 = vzero(isa)
    a2 = vzero(isa)
    a3 = vzero(isa)
    b0 = vzero(isa)
    b1 = vzero(isa)
    b2 = vzero(isa)
    b3 = vzero(isa)
    pr = r * k_dim
    ps = pr + k_dim
    qm = m * k_dim
    kb = 0
    while kb < blocks:
        end = min(kb + GROUP, blocks)
        s0 = vzero(isa)
        s1 = vzero(isa)
        s2 = vzero(isa)
        s3 = vzero(isa)
        t0 = vzero(isa)
        t1 = vzero(isa)
        t2 = vzero(isa)
        t3 = vzero(isa)
        for j in range(kb, end):
            off = j * width
            x = vload(isa, q, qm + off)
            u = vload(isa, p, pr + off)
            v = vload(isa, p, ps + off)
            if vnni:        # int32 sums: the upper codes masked in place (16 c2, 64 c3)
                u2 = vand(u, m48)
                u3 = vand(u, m192)
                v2 = vand(v, m48)
                v3 = vand(v, m192)
            else:
                uh = vsrl16(u, 4)
                vh = vsrl16(v, 4)
                u2 = vand(uh, m3)
                u3 = vand(uh, m12)
                v2 = vand(vh, m3)
                v3 = vand(vh, m12)
            s0 = vdot(isa, s0, vand(u, m3), x)
            s1 = vdot(isa, s1, vand(u, m12), x)
            s2 = vdot(isa, s2, u2, x)
            s3 = vdot(isa, s3, u3, x)
            t0 = vdot(isa, t0, vand(v, m3), x)
            t1 = vdot(isa, t1, vand(v, m12), x)
            t2 = vdot(isa, t2, v2, x)
            t3 = vdot(isa, t3, v3, x)
        a0 = vflush(isa, a0, s0)
        a1 = vflush(isa, a1, s1)
        a2 = vflush(isa, a2, s2)
        a3 = vflush(isa, a3, s3)
        b0 = vflush(isa, b0, t0)
        b1 = vflush(isa, b1, t1)
        b2 = vflush(isa, b2, t2)
        b3 = vflush(isa, b3, t3)
        kb = end
    start = blocks * width
    e0, e1, e2, e3 = _tail4(p, r, q, m, start)
    f0, f1, f2, f3 = _tail4(p, r + 1, q, m, start)
    return _finish(vnni, a0, a1, a2, a3, e0, e1, e2, e3), _finish(vnni, b0, b1, b2, b3, f0, f1, f2, f3)


@_jit()
def _one_row_two_m(isa, p, r, q, m, width):
    """Code sums (c0, c1, c2, c3) of packed row r against activation rows m and m + 1."""
    k_dim = p.shape[1]
    blocks = k_dim // width
    vnni = isa_vnni(isa)
    m3 = vsplat(isa, 3)
    m12 = vsplat(isa, 12)
    m48 = vsplat(isa, 48)
    m192 = vsplat(isa, 192)
    a0 = vzero(isa)
    a1 = vzero(isa)
    a2 = vzero(isa)
    a3 = vzero(isa)
    b0 = vzero(isa)
    b1 = vzero(isa)
    b2 = vzero(isa)
    b3 = vzero(isa)
    pr = r * k_dim
    qm = m * k_dim
    qn = qm + k_dim
    kb = 0
    while kb < blocks:
        end = min(kb + GROUP, blocks)
        s0 = vzero(isa)
        s1 = vzero(isa)
        s2 = vzero(isa)
        s3 = vzero(isa)
        t0 = vzero(isa)
        t1 = vzero(isa)
        t2 = vzero(isa)
        t3 = vzero(isa)
        for j in range(kb, end):
            off = j * width
            u = vload(isa, p, pr + off)
            c0 = vand(u, m3)
            c1 = vand(u, m12)
            if vnni:        # int32 sums: the upper codes masked in place (16 c2, 64 c3)
                c2 = vand(u, m48)
                c3 = vand(u, m192)
            else:
                uh = vsrl16(u, 4)
                c2 = vand(uh, m3)
                c3 = vand(uh, m12)
            x = vload(isa, q, qm + off)
            s0 = vdot(isa, s0, c0, x)
            s1 = vdot(isa, s1, c1, x)
            s2 = vdot(isa, s2, c2, x)
            s3 = vdot(isa, s3, c3, x)
            y = vload(isa, q, qn + off)
            t0 = vdot(isa, t0, c0, y)
            t1 = vdot(isa, t1, c1, y)
            t2 = vdot(isa, t2, c2, y)
            t3 = vdot(isa, t3, c3, y)
        a0 = vflush(isa, a0, s0)
        a1 = vflush(isa, a1, s1)
        a2 = vflush(isa, a2, s2)
        a3 = vflush(isa, a3, s3)
        b0 = vflush(isa, b0, t0)
        b1 = vflush(isa, b1, t1)
        b2 = vflush(isa, b2, t2)
        b3 = vflush(isa, b3, t3)
        kb = end
    start = blocks * width
    e0, e1, e2, e3 = _tail4(p, r, q, m, start)
    f0, f1, f2, f3 = _tail4(p, r, q, m + 1, start)
    return _finish(vnni, a0, a1, a2, a3, e0, e1, e2, e3), _finish(vnni, b0, b1, b2, b3, f0, f1, f2, f3)


@_jit()
def _store4(out, m, n, code_stride, sums, s):
    out[m, n] = sums[0] - s
    out[m, n + code_stride] = sums[1] - s
    out[m, n + 2 * code_stride] = sums[2] - s
    out[m, n + 3 * code_stride] = sums[3] - s


@_jit()
def _claim_m1(isa, q, sumq, p, out, row_stride, code_stride, chunk, ctrl):
    """Claim chunks of `chunk` packed-row pairs from ctrl[0] until none is left, count each done
    in ctrl[1]; two packed rows x one activation row per inner loop."""
    width = isa_width(isa)
    pairs = p.shape[0] // 2
    chunks = (pairs + chunk - 1) // chunk
    while True:
        c = atomic_add(ctrl, 0, 1)
        if c >= chunks:
            break
        for rr in range(c * chunk, min(c * chunk + chunk, pairs)):
            r = 2 * rr
            for m in range(q.shape[0]):
                first, second = _two_rows_one_m(isa, p, r, q, m, width)
                _store4(out, m, r * row_stride, code_stride, first, sumq[m])
                _store4(out, m, (r + 1) * row_stride, code_stride, second, sumq[m])
        atomic_add(ctrl, 1, 1)


@_jit()
def rows_m1_claimed(isa, q, sumq, p, out, row_stride, code_stride, chunk, ctrl, signal):
    """Two packed rows x one activation row per inner loop (any M; used for M = 1), in chunks of
    `chunk` row pairs claimed from ctrl[0] by whichever thread gets there first; ctrl[1]
    counts the finished ones (`kernels.pool`). Leaves an odd last packed row to the caller."""
    announce(signal)
    _claim_m1(isa, q, sumq, p, out, row_stride, code_stride, chunk, ctrl)


@_jit()
def rows_m1_gated(isa, q, sumq, p, out, row_stride, code_stride, chunk, patience, ctrl, signal):
    """A helper's part of `bitlinear_one_row_shared`: wait until the caller has quantized the row
    (ctrl[2] set; up to `patience` cycles, then take nothing), then claim chunks. (`signal`:
    the helper's private counter, unused: the caller announces the job.)"""
    start = cycle_counter()
    while atomic_load(ctrl, 2) == 0:
        if cycle_counter() - start > patience:
            return
        cpu_relax()
        os_yield()
    _claim_m1(isa, q, sumq, p, out, row_stride, code_stride, chunk, ctrl)


@_jit()
def bitlinear_one_row_shared(isa, x, p, weight_scale, out, row_stride, code_stride, chunk,
                             q, s, sumq, acc, ctrl, signal, stall):
    """quantize -> core -> rescale of one activation row in one call, the core shared with the
    helpers that `rows_m1_gated` runs on (posted by the caller): no Python between the steps.
    A helper still inside a chunk after `stall` cycles is given up on: the caller then redoes
    the whole core alone (idempotent)."""
    _quantize_row(x, 0, q, s, sumq)
    atomic_add(ctrl, 2, 1)     # the row is ready for the helpers
    announce(signal)
    _claim_m1(isa, q, sumq, p, acc, row_stride, code_stride, chunk, ctrl)
    pairs = p.shape[0] // 2
    chunks = (pairs + chunk - 1) // chunk
    start = cycle_counter()
    while atomic_load(ctrl, 1) < chunks:
        if cycle_counter() - start > stall:
            _claim_m1(isa, q, sumq, p, acc, row_stride, code_stride, chunk, np.zeros(3, np.int64))
            break
        cpu_relax()
        os_yield()          # a preempted helper's core may be this one
    rows = p.shape[0]
    if rows % 2:
        _one_packed_row(q, sumq, p, rows - 1, acc, row_stride, code_stride)
    _rescale_row(acc, s, weight_scale, out, 0)


def rows_m1_shared(isa, q, sumq, p, out, row_stride, code_stride):
    """The one-row product on the caller and `kernels.pool`'s helpers (claimed chunks, no join)."""
    rows = p.shape[0]
    pairs = rows // 2
    chunk = max(1, -(-pairs // CHUNKS))
    if p.nbytes < SHARED_BYTES:         # waking a helper costs more than it brings
        chunk = max(pairs, 1)
    pool.run_claimed(rows_m1_claimed, (isa, q, sumq, p, out, row_stride, code_stride, chunk),
                     -(-pairs // chunk))
    if rows % 2:
        _one_packed_row(q, sumq, p, rows - 1, out, row_stride, code_stride)


@_jit()
def rows_m2_claimed(isa, q, sumq, p, out, row_stride, code_stride, ctrl, signal):
    """One packed row x two activation rows per inner loop, M even; tasks of ROWS_PER_TASK packed
    rows claimed from ctrl[0], counted done in ctrl[1] (`kernels.pool`)."""
    announce(signal)
    width = isa_width(isa)
    rows = p.shape[0]
    tasks = (rows + ROWS_PER_TASK - 1) // ROWS_PER_TASK
    while True:
        task = atomic_add(ctrl, 0, 1)
        if task >= tasks:
            break
        lo = task * ROWS_PER_TASK
        hi = min(lo + ROWS_PER_TASK, rows)
        for mm in range(q.shape[0] // 2):
            m = 2 * mm
            for r in range(lo, hi):
                first, second = _one_row_two_m(isa, p, r, q, m, width)
                _store4(out, m, r * row_stride, code_stride, first, sumq[m])
                _store4(out, m + 1, r * row_stride, code_stride, second, sumq[m + 1])
        atomic_add(ctrl, 1, 1)


def rows_m2_shared(isa, q, sumq, p, out, row_stride, code_stride):
    """The two-row product on the caller and `kernels.pool`'s helpers (claimed tasks, no join)."""
    tasks = -(-p.shape[0] // ROWS_PER_TASK)
    pool.run_claimed(rows_m2_claimed, (isa, q, sumq, p, out, row_stride, code_stride), tasks)


@_jit()
def bitlinear_one_row(isa, x, p, weight_scale, out, row_stride, code_stride):
    """quantize -> core -> rescale of one activation row in one call, on the caller alone (for
    weights under SHARED_BYTES, where the fixed cost of separate calls is a large share)."""
    k_dim = x.shape[1]
    q = np.empty((1, k_dim), np.int8)
    s = np.empty((1, 1), np.float32)
    sumq = np.empty(1, np.int32)
    _quantize_row(x, 0, q, s, sumq)
    acc = np.empty((1, out.shape[1]), np.int32)
    rows = p.shape[0]
    rows_m1_claimed(isa, q, sumq, p, acc, row_stride, code_stride, max(rows // 2, 1),
                    np.zeros(2, np.int64), np.zeros(1, np.int64))
    if rows % 2:
        _one_packed_row(q, sumq, p, rows - 1, acc, row_stride, code_stride)
    _rescale_row(acc, s, weight_scale, out, 0)
