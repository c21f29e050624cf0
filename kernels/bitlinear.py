"""Numba kernels for the BitLinear operator (docs/spec.md §4), NumPy in and out.

    quantize_activations(x)                      float32 [..., K] -> int8 [..., K], float32 [..., 1]
    ternary_matmul_int(q, p, layout, path=None)  int8 [M, K] x packed [N/4, K] -> int32 [M, N], exact
    bitlinear(x, p, weight_scale, layout, path=None)   float32 [..., K] -> float32 [..., N]

`path` names the integer core (`kernels.select`): None runs the one chosen for this machine
(8-bit dot products, `kernels.int8`, where the CPU has them); "numba-int16" is this module's
own kernel below, the reference every other path is tested bit-identical against.

The kernels read both packings of `kernels.packing` in place, without unpacking: both keep
K contiguous and hold four output rows per byte, so one pass over packed row r produces
the four rows `row_of(r, i)`; only where those rows land differs between layouts.

How the integer core stays exact and fast:
- A byte b of P[r, k] holds codes c_i = w_i + 1. Instead of shifting each code down, the
  kernel multiplies the masked byte (b & 3 << 2i) = c_i << 2i by q[k], accumulates in
  int32 and shifts the sum right by 2i at the end (exact: every term is a multiple of
  4^i). Then sum_k w_i q_k = sum_k c_i q_k - sum_k q_k; sum_k q_k is computed once per row.
- numba types int8/int32 scalar arithmetic as int64; wrapping every update in np.int32()
  lets LLVM narrow the loop to 16-bit products with 32-bit sums (AVX-512 VNNI vpdpwssd /
  AVX2 vpmaddwd), four masks per byte and no shifts inside the loop.
- |sum| <= 192 * 128 * K must stay below 2^31, so K is limited to MAX_K.
- Each parallel task takes two packed rows (eight outputs) and, for M >= 2, two
  activation rows, so every byte and every activation loaded feeds four or eight sums.

The rescale follows the ONNX reference graph step by step in float32:
`y = float32(acc) / s * weight_scale` (Div, then Mul), without fastmath, so the result is
bit-identical to ONNX Runtime running that graph.

Packed weights are validated (reserved code 3) once per array object; a later in-place
change of the same array is not re-checked, so treat packed weights as read-only.

The numba cache goes to $NUMBA_CACHE_DIR when set, else ~/.cache/tdpu/numba/<digest of the
kernel sources>, else a per-user directory under the system temp dir; when nothing is
writable the kernels compile without a cache.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import threading
import weakref
from pathlib import Path

import numpy as np

from kernels import packing, select

MAX_K = (2**31 - 1) // (192 * 128)
_EPS = np.float32(1e-5)


def _writable_dir(path: Path) -> bool:
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
        return True
    except OSError:
        return False


def _sources_digest() -> str:
    """A digest of every kernel source file. numba checks only the file that defines a cached
    function, and the kernels call across files (int8 -> bitlinear, amx/pool -> simd): an edit
    in one would leave another's cached machine code stale. So each version of the sources
    gets its own cache directory."""
    h = hashlib.blake2b(digest_size=6)
    for path in sorted(Path(__file__).resolve().parent.glob("*.py")):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def _choose_cache_dir() -> str | None:
    user = os.getuid() if hasattr(os, "getuid") else "user"
    digest = _sources_digest()
    candidates = [Path.home() / ".cache" / "tdpu" / "numba" / digest,
                  Path(tempfile.gettempdir()) / f"tdpu-numba-{user}" / digest]
    for path in candidates:
        if _writable_dir(path):
            return str(path)
    return None


if not os.environ.get("NUMBA_CACHE_DIR"):
    _cache_dir = _choose_cache_dir()
    if _cache_dir:
        os.environ["NUMBA_CACHE_DIR"] = _cache_dir

# numba's OpenMP workers spin-wait after each parallel call by default. Inside an ONNX Runtime
# graph on a 2-core host they then compete with the operators that follow: BitLinear nodes took
# ~17 ms instead of ~0.15 ms each in a whole-model step (ORT profiler). Passive waiting has to
# be chosen before the OpenMP runtime starts (first parallel call); an explicit setting wins.
# A short spin before sleeping keeps back-to-back BitLinear calls (the seven projections of a
# layer) from paying a futex wake-up each: 7 nodes 1.06 -> 0.54 ms, whole graph unchanged.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("GOMP_SPINCOUNT", "10000")

import numba  # noqa: E402  (the cache directory must be chosen before numba reads its config)
from numba import njit, prange  # noqa: E402

from kernels import pool  # noqa: E402
from kernels.simd import announce, atomic_add  # noqa: E402

if not numba.config.CACHE_DIR and os.environ.get("NUMBA_CACHE_DIR"):
    # numba was imported before us: its config did not see the variable.
    numba.config.CACHE_DIR = os.environ["NUMBA_CACHE_DIR"]


def _jit(**options):
    def decorate(fn):
        try:
            return njit(cache=True, nogil=True, **options)(fn)
        except RuntimeError:
            # No writable cache location anywhere (read-only home, tree and temp dir).
            return njit(cache=False, nogil=True, **options)(fn)
    return decorate


# ----------------------------------------------------------------------------- kernels

@_jit()
def _quantize_row(x, m, q, s, sumq):
    k_dim = x.shape[1]
    amax = np.float32(0.0)
    for k in range(k_dim):
        a = abs(x[m, k])
        if a > amax:
            amax = a
    if amax < _EPS:
        amax = _EPS
    scale = np.float32(127.0) / amax
    total = 0
    for k in range(k_dim):
        v = np.rint(x[m, k] * scale)          # float32 product, round half to even
        if v > 127.0:
            v = np.float32(127.0)
        elif v < -128.0:
            v = np.float32(-128.0)
        qv = np.int8(v)
        q[m, k] = qv
        total += qv
    s[m, 0] = scale
    sumq[m] = total


@_jit()
def _quantize_claimed(x, q, s, sumq, chunk, ctrl, signal):
    announce(signal)
    # Rows in chunks claimed by the caller and kernels.pool's helpers (no fork-join).
    rows = x.shape[0]
    while True:
        c = atomic_add(ctrl, 0, 1)
        if c * chunk >= rows:
            break
        for m in range(c * chunk, min(c * chunk + chunk, rows)):
            _quantize_row(x, m, q, s, sumq)
        atomic_add(ctrl, 1, 1)


@_jit()
def _quantize_serial(x, q, s, sumq):
    for m in range(x.shape[0]):
        _quantize_row(x, m, q, s, sumq)


@_jit()
def _one_packed_row(q, sumq, p, r, out, row_stride, code_stride):
    """Outputs of packed row r for every activation row (the odd-row tail)."""
    k_dim = q.shape[1]
    n = r * row_stride
    for m in range(q.shape[0]):
        a0 = np.int32(0)
        a1 = np.int32(0)
        a2 = np.int32(0)
        a3 = np.int32(0)
        for k in range(k_dim):
            u = np.int32(p[r, k])
            x = np.int32(q[m, k])
            a0 = np.int32(a0 + (u & 3) * x)
            a1 = np.int32(a1 + (u & 12) * x)
            a2 = np.int32(a2 + (u & 48) * x)
            a3 = np.int32(a3 + (u & 192) * x)
        s = sumq[m]
        out[m, n] = a0 - s
        out[m, n + code_stride] = (a1 >> 2) - s
        out[m, n + 2 * code_stride] = (a2 >> 4) - s
        out[m, n + 3 * code_stride] = (a3 >> 6) - s


@_jit(parallel=True)
def _ternary_rows1(q, sumq, p, out, row_stride, code_stride):
    """Two packed rows x one activation row per inner loop (any M; used for M = 1)."""
    k_dim = q.shape[1]
    rows = p.shape[0]
    for rr in prange(rows // 2):
        r = 2 * rr
        n = r * row_stride
        o = n + row_stride
        for m in range(q.shape[0]):
            a0 = np.int32(0)
            a1 = np.int32(0)
            a2 = np.int32(0)
            a3 = np.int32(0)
            b0 = np.int32(0)
            b1 = np.int32(0)
            b2 = np.int32(0)
            b3 = np.int32(0)
            for k in range(k_dim):
                u = np.int32(p[r, k])
                v = np.int32(p[r + 1, k])
                x = np.int32(q[m, k])
                a0 = np.int32(a0 + (u & 3) * x)
                a1 = np.int32(a1 + (u & 12) * x)
                a2 = np.int32(a2 + (u & 48) * x)
                a3 = np.int32(a3 + (u & 192) * x)
                b0 = np.int32(b0 + (v & 3) * x)
                b1 = np.int32(b1 + (v & 12) * x)
                b2 = np.int32(b2 + (v & 48) * x)
                b3 = np.int32(b3 + (v & 192) * x)
            s = sumq[m]
            out[m, n] = a0 - s
            out[m, n + code_stride] = (a1 >> 2) - s
            out[m, n + 2 * code_stride] = (a2 >> 4) - s
            out[m, n + 3 * code_stride] = (a3 >> 6) - s
            out[m, o] = b0 - s
            out[m, o + code_stride] = (b1 >> 2) - s
            out[m, o + 2 * code_stride] = (b2 >> 4) - s
            out[m, o + 3 * code_stride] = (b3 >> 6) - s
    if rows % 2:
        _one_packed_row(q, sumq, p, rows - 1, out, row_stride, code_stride)


@_jit(parallel=True)
def _ternary_rows2(q, sumq, p, out, row_stride, code_stride):
    """Two packed rows x two activation rows per inner loop; M must be even."""
    k_dim = q.shape[1]
    rows = p.shape[0]
    for rr in prange(rows // 2):
        r = 2 * rr
        n = r * row_stride
        o = n + row_stride
        for mm in range(q.shape[0] // 2):
            m = 2 * mm
            a0 = np.int32(0)
            a1 = np.int32(0)
            a2 = np.int32(0)
            a3 = np.int32(0)
            b0 = np.int32(0)
            b1 = np.int32(0)
            b2 = np.int32(0)
            b3 = np.int32(0)
            c0 = np.int32(0)
            c1 = np.int32(0)
            c2 = np.int32(0)
            c3 = np.int32(0)
            d0 = np.int32(0)
            d1 = np.int32(0)
            d2 = np.int32(0)
            d3 = np.int32(0)
            for k in range(k_dim):
                u = np.int32(p[r, k])
                v = np.int32(p[r + 1, k])
                x = np.int32(q[m, k])
                y = np.int32(q[m + 1, k])
                u0 = u & 3
                u1 = u & 12
                u2 = u & 48
                u3 = u & 192
                v0 = v & 3
                v1 = v & 12
                v2 = v & 48
                v3 = v & 192
                a0 = np.int32(a0 + u0 * x)
                a1 = np.int32(a1 + u1 * x)
                a2 = np.int32(a2 + u2 * x)
                a3 = np.int32(a3 + u3 * x)
                b0 = np.int32(b0 + v0 * x)
                b1 = np.int32(b1 + v1 * x)
                b2 = np.int32(b2 + v2 * x)
                b3 = np.int32(b3 + v3 * x)
                c0 = np.int32(c0 + u0 * y)
                c1 = np.int32(c1 + u1 * y)
                c2 = np.int32(c2 + u2 * y)
                c3 = np.int32(c3 + u3 * y)
                d0 = np.int32(d0 + v0 * y)
                d1 = np.int32(d1 + v1 * y)
                d2 = np.int32(d2 + v2 * y)
                d3 = np.int32(d3 + v3 * y)
            s = sumq[m]
            t = sumq[m + 1]
            out[m, n] = a0 - s
            out[m, n + code_stride] = (a1 >> 2) - s
            out[m, n + 2 * code_stride] = (a2 >> 4) - s
            out[m, n + 3 * code_stride] = (a3 >> 6) - s
            out[m, o] = b0 - s
            out[m, o + code_stride] = (b1 >> 2) - s
            out[m, o + 2 * code_stride] = (b2 >> 4) - s
            out[m, o + 3 * code_stride] = (b3 >> 6) - s
            out[m + 1, n] = c0 - t
            out[m + 1, n + code_stride] = (c1 >> 2) - t
            out[m + 1, n + 2 * code_stride] = (c2 >> 4) - t
            out[m + 1, n + 3 * code_stride] = (c3 >> 6) - t
            out[m + 1, o] = d0 - t
            out[m + 1, o + code_stride] = (d1 >> 2) - t
            out[m + 1, o + 2 * code_stride] = (d2 >> 4) - t
            out[m + 1, o + 3 * code_stride] = (d3 >> 6) - t
    if rows % 2:
        _one_packed_row(q, sumq, p, rows - 1, out, row_stride, code_stride)


@_jit()
def _rescale_row(acc, s, weight_scale, out, m):
    # Div then Mul in float32, as the ONNX reference graph does (no fastmath: keep the division).
    sm = s[m, 0]
    for n in range(acc.shape[1]):
        out[m, n] = np.float32(acc[m, n]) / sm * weight_scale


@_jit()
def _rescale_claimed(acc, s, weight_scale, out, chunk, ctrl, signal):
    announce(signal)
    rows = acc.shape[0]
    while True:
        c = atomic_add(ctrl, 0, 1)
        if c * chunk >= rows:
            break
        for m in range(c * chunk, min(c * chunk + chunk, rows)):
            _rescale_row(acc, s, weight_scale, out, m)
        atomic_add(ctrl, 1, 1)


@_jit()
def _rescale_serial(acc, s, weight_scale, out):
    # Few rows: a fork-join would cost more than the rescale (and much more on a loaded host).
    for m in range(acc.shape[0]):
        _rescale_row(acc, s, weight_scale, out, m)


@_jit(parallel=True)
def _reserved_bits(p):
    """OR over the packed rows of (b & b >> 1): bit 2i set iff some code i is 3."""
    rows, k_dim = p.shape
    flags = np.zeros(rows, np.uint8)
    for r in prange(rows):
        acc = np.uint8(0)
        for k in range(k_dim):
            b = p[r, k]
            acc = np.uint8(acc | (b & (b >> 1)))
        flags[r] = acc
    return flags


# ----------------------------------------------------------------------------- threading

# The workqueue threading layer aborts the process when two threads launch parallel
# kernels at once; OpenMP and TBB do not. Serialise launches unless a thread-safe layer
# is known to be active (the layer is only known after the first parallel launch).
_launch_lock = threading.Lock()
_layer_safe = False


def _launch(kernel, *args):
    global _layer_safe
    if _layer_safe:
        return kernel(*args)
    with _launch_lock:
        result = kernel(*args)
        try:
            _layer_safe = numba.threading_layer() in ("omp", "tbb")
        except ValueError:
            pass
        return result


# ----------------------------------------------------------------------------- validation

_checked: dict[int, weakref.ref] = {}


def _forget(key: int) -> None:
    _checked.pop(key, None)


def check_packed(p: np.ndarray, layout: str, where: str = "packed weight") -> None:
    """Raise PackingError if `p` holds a reserved code 3 (names the byte and the W row)."""
    bits = _launch(_reserved_bits, p)
    if (np.bitwise_or.reduce(bits) if bits.size else 0) & 0x55:
        packing.check_reserved(p, layout, where)


def _ensure_checked(p: np.ndarray, layout: str) -> None:
    key = id(p)
    ref = _checked.get(key)
    if ref is not None and ref() is p:
        return
    check_packed(p, layout)
    _checked[key] = weakref.ref(p, lambda _, key=key: _forget(key))


# ----------------------------------------------------------------------------- public API

def _as_packed(p: np.ndarray, layout: str) -> np.ndarray:
    packing.check_layout(layout)
    if not isinstance(p, np.ndarray) or p.dtype != np.uint8 or p.ndim != 2:
        desc = f"{p.dtype} {p.shape}" if isinstance(p, np.ndarray) else type(p).__name__
        raise packing.PackingError(f"expected packed weights uint8 [N/4, K], found {desc}")
    if p.shape[1] > MAX_K:
        raise ValueError(f"K = {p.shape[1]} exceeds the int32-exact limit {MAX_K}")
    if not p.flags.c_contiguous:
        p = np.ascontiguousarray(p)
    _ensure_checked(p, layout)
    return p


def _strides(layout: str, rows: int) -> tuple[int, int]:
    # Output row of code i of packed row r is r * row_stride + i * code_stride.
    return (1, rows) if layout == "hf" else (4, 1)


_core_cache: dict[str, tuple] = {}
_SMALL_BYTES = 1 << 20      # = kernels.int8.SHARED_BYTES: one-row products the caller runs alone


def _int8():
    from kernels import int8

    return int8


def _cores(path: str):
    """(leading kernel arguments (the isa tag), kernel for one activation row at a time, kernel
    for pairs of rows); the same kernel twice takes any number of rows in one call."""
    cores = _core_cache.get(path)
    if cores is None:
        if path == select.REFERENCE:
            cores = (), _ternary_rows1, _ternary_rows2
        elif path == select.AMX:
            from kernels import amx

            cores = (), amx.rows_shared, amx.rows_shared     # any M in one call
        else:
            from kernels import int8, simd

            cores = (simd.ISAS[path.removeprefix("numba-")],), int8.rows_m1_shared, int8.rows_m2_shared
        _core_cache[path] = cores
    return cores


def _matmul_into(q: np.ndarray, sumq: np.ndarray, p: np.ndarray, layout: str,
                 path: str | None = None) -> np.ndarray:
    m_rows = q.shape[0]
    row_stride, code_stride = _strides(layout, p.shape[0])
    out = np.empty((m_rows, 4 * p.shape[0]), np.int32)
    if m_rows == 0 or out.shape[1] == 0:
        return out
    if path is None:
        path = select.chosen_path(m_rows, p.shape[1], out.shape[1])
    elif path not in _known_paths:
        select.check_path(path)
        _known_paths.add(path)
    lead, rows1, rows2 = _cores(path)
    if rows1 is rows2:
        _launch(rows1, *lead, q, sumq, p, out, row_stride, code_stride)
        return out
    even = m_rows - m_rows % 2
    if even:
        _launch(rows2, *lead, q[:even], sumq[:even], p, out[:even], row_stride, code_stride)
    if m_rows % 2:
        _launch(rows1, *lead, q[even:], sumq[even:], p, out[even:], row_stride, code_stride)
    return out


_known_paths: set[str] = set()


def _quantize_2d(x2: np.ndarray):
    m_rows = x2.shape[0]
    q = np.empty(x2.shape, np.int8)
    s = np.empty((m_rows, 1), np.float32)
    sumq = np.empty(m_rows, np.int32)
    if m_rows >= 8:
        pool.run_claimed(_quantize_claimed, (x2, q, s, sumq, 4), -(-m_rows // 4))
    elif m_rows:
        _quantize_serial(x2, q, s, sumq)
    return q, s, sumq


def _as_float32(x) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim == 0:
        raise ValueError("expected activations [..., K], found a scalar")
    return np.ascontiguousarray(x, dtype=np.float32)


def quantize_activations(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float32 [..., K] -> (int8 [..., K], float32 scales [..., 1]).

    s = 127 / max(|x|, 1e-5) per row, a float32 division as in the exported ONNX graph
    (torch evaluates transformers' `127 / t` as `127 * (1 / t)`, which can differ by one
    ulp); q = clamp(round_half_even(x * s), -128, 127) with the product in float32, i.e.
    torch's `(x * s).round().clamp(-128, 127)`.
    """
    x = _as_float32(x)
    q, s, _ = _quantize_2d(x.reshape(-1, x.shape[-1]))
    return q.reshape(x.shape), s.reshape(x.shape[:-1] + (1,))


def ternary_matmul_int(q: np.ndarray, p: np.ndarray, layout: str, path: str | None = None) -> np.ndarray:
    """int8 [M, K] x packed uint8 [N/4, K] (`layout`) -> int32 [M, N] = q @ W.T, exact.

    `path`: the integer core (`kernels.select.PATHS`); None = the one chosen for this machine.
    """
    p = _as_packed(p, layout)
    q = np.asarray(q)
    if q.dtype != np.int8 or q.ndim != 2:
        raise ValueError(f"expected int8 activations [M, K], found {q.dtype} {q.shape}")
    if q.shape[1] != p.shape[1]:
        raise ValueError(f"activations have K = {q.shape[1]}, packed weights have K = {p.shape[1]}")
    q = np.ascontiguousarray(q)
    sumq = q.sum(axis=1, dtype=np.int32)
    return _matmul_into(q, sumq, p, layout, path)


PATIENCE_S = 0.05    # a helper waits this long for the caller's quantized row, then takes nothing


class _OneRow:
    """The one-row product of a packed weight on a vector path, its fixed choices (the core,
    strides, chunking, the helpers' deadlines) made once per weight and path."""

    __slots__ = ("path", "run")

    def __init__(self, p: np.ndarray, layout: str, path: str):
        int8 = _int8()
        if path not in _known_paths:
            select.check_path(path)
            _known_paths.add(path)
        lead, _, _ = _cores(path)
        rows, k_dim = p.shape
        row_stride, code_stride = _strides(layout, rows)
        self.path = path
        if p.nbytes < _SMALL_BYTES:          # waking a helper costs more than it brings
            one_row = int8.bitlinear_one_row

            def run(x2: np.ndarray, ws: np.float32) -> np.ndarray:
                y = np.empty((1, 4 * rows), np.float32)
                one_row(*lead, x2, p, ws, y, row_stride, code_stride)
                return y
        else:
            shared, gated = int8.bitlinear_one_row_shared, int8.rows_m1_gated
            (isa,) = lead
            chunk = max(1, -(-(rows // 2) // int8.CHUNKS))
            stall, patience = pool.cycles(pool.STALL_S), pool.cycles(PATIENCE_S)

            def run(x2: np.ndarray, ws: np.float32) -> np.ndarray:
                """The core shared with the pool's helpers (`kernels.int8.bitlinear_one_row_shared`)."""
                q = np.empty((1, k_dim), np.int8)
                s = np.empty((1, 1), np.float32)
                sumq = np.empty(1, np.int32)
                acc = np.empty((1, 4 * rows), np.int32)
                y = np.empty((1, 4 * rows), np.float32)
                args = (isa, q, sumq, p, acc, row_stride, code_stride, chunk)
                ctrl = pool.post(gated, args + (patience,))
                if ctrl is None:
                    shared(isa, x2, p, ws, y, row_stride, code_stride, chunk, q, s, sumq, acc,
                           np.zeros(3, np.int64), np.zeros(1, np.int64), stall)
                    return y
                try:
                    shared(isa, x2, p, ws, y, row_stride, code_stride, chunk, q, s, sumq, acc,
                           ctrl, pool.SIGNAL, stall)
                finally:
                    pool.unpost()
                return y
        self.run = run


class Prepared:
    """`bitlinear(x, p, weight_scale, layout)` for a weight checked once: a call checks only the
    activations, and one activation row goes straight to its plan (`_OneRow`). The ONNX
    Runtime operator's bound nodes call this: a decode step's projections cross the bridge
    about 200 times a token, and the Python they run comes in cold after each weight stream.
    Bit-identical to `bitlinear`."""

    __slots__ = ("p", "ws", "layout", "k", "n", "_plan")

    def __init__(self, p: np.ndarray, weight_scale, layout: str):
        self.p = _as_packed(p, layout)
        self.ws = _as_scale(weight_scale)
        self.layout = layout
        self.k, self.n = self.p.shape[1], 4 * self.p.shape[0]
        self._plan: _OneRow | None = None

    def __call__(self, x: np.ndarray) -> np.ndarray:
        # one row of float32 activations, C-contiguous, K and N not 0: the plan; else bitlinear
        if (type(x) is np.ndarray and x.dtype == np.float32 and x.ndim and self.n
                and x.size == x.shape[-1] == self.k != 0 and x.flags.c_contiguous):
            path = select.chosen_path(1)
            plan = self._plan
            if plan is None or plan.path != path:
                if path not in select.VECTOR_PATHS:
                    return bitlinear(x, self.p, self.ws, self.layout)
                plan = self._plan = _OneRow(self.p, self.layout, path)
            return plan.run(x.reshape(1, self.k), self.ws).reshape(x.shape[:-1] + (self.n,))
        return bitlinear(x, self.p, self.ws, self.layout)


def _as_scale(weight_scale) -> np.float32:
    """The one value of `weight_scale` (a float or a one-element array) as a float32 scalar."""
    ws = np.asarray(weight_scale, dtype=np.float32)
    if ws.size != 1:
        raise ValueError(f"weight_scale must hold one value, found shape {ws.shape}")
    return np.float32(ws.reshape(()))


def bitlinear(x: np.ndarray, p: np.ndarray, weight_scale, layout: str, path: str | None = None
              ) -> np.ndarray:
    """float32 [..., K] -> float32 [..., N]: y = (q @ W.T) / s * weight_scale (docs/spec.md §4).

    `weight_scale` uses the multiply convention (a float or a one-element array); `path` as
    in `ternary_matmul_int`.
    """
    p = _as_packed(p, layout)
    x = _as_float32(x)
    k_dim = p.shape[1]
    if x.shape[-1] != k_dim:
        raise ValueError(f"activations have K = {x.shape[-1]}, packed weights have K = {k_dim}")
    ws = _as_scale(weight_scale)
    x2 = x.reshape(-1, k_dim)
    if x2.shape[0] == 1 and p.shape[0]:
        path = path or select.chosen_path(1, k_dim, 4 * p.shape[0])
        if path in select.VECTOR_PATHS:
            y = _OneRow(p, layout, path).run(x2, ws)
            return y.reshape(x.shape[:-1] + (y.shape[1],))
    q, s, sumq = _quantize_2d(x2)
    acc = _matmul_into(q, sumq, p, layout, path)
    y = np.empty(acc.shape, np.float32)
    if acc.shape[0] >= 8:
        pool.run_claimed(_rescale_claimed, (acc, s, ws, y, 4),
                         -(-acc.shape[0] // 4))
    elif acc.size:
        _rescale_serial(acc, s, ws, y)
    return y.reshape(x.shape[:-1] + (acc.shape[1],))
