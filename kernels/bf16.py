"""A float32 linear layer over bfloat16 weights: the tied lm_head at the checkpoint's precision.

    bf16_bits(w, where)        float32 array -> uint16 bit patterns; raises when a value is not
                               exactly a bfloat16 (nothing is ever rounded silently)
    split_bf16(w)              the same without raising: bits, count and first index of the others
    bf16_to_float32(bits)      uint16 bit patterns -> float32 (exact)
    linear_bf16(x, w_bits)     float32 [..., K] x bf16 [N, K] -> float32 [..., N] = x @ W.T

BitNet b1.58 2B4T stores its embedding table in bf16, and the lm_head is tied to it. Held
as float32 (what ONNX Runtime's MatMul/Gemm need) the table is 1.31 GB; a single-token step
reads all of it, so at two layers the lm_head costs more than every projection together.
Held as bf16 it is half the bytes and loses nothing: every value is the checkpoint's.

The arithmetic is float32 throughout: each weight is widened exactly (bf16 is the top half
of a float32), products and sums are float32. Only the order of the sums differs from ONNX
Runtime's sgemm, so results agree to float32 rounding, not bit for bit.

- one row (decoding, one token): each weight row is read once, widened in the loop (zero-
  extend, shift, bitcast: LLVM vectorizes it with the multiply-adds); memory-bound, about
  twice as fast as ONNX Runtime's float32 Gemm over the same table.
- more rows (prefill): register blocks of 3 rows of x by 8 weight rows, so each weight is
  widened once per three rows (compute-bound; about ONNX Runtime's prepacked float32 sgemm at
  128 tokens, against ~2.4x when widening tiles for NumPy's BLAS).
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import prange, types
from numba.extending import intrinsic

from kernels.bitlinear import _jit, _launch



# Reassociation lets LLVM vectorize the float32 sums; unlike fastmath=True it keeps inf and
# NaN semantics (no nnan / ninf assumptions), so non-finite inputs propagate as in a MatMul.
_REASSOC = {"reassoc", "contract"}


class Bf16Error(ValueError):
    """Weights or activations that the bf16 linear layer cannot take; the message says which."""


@intrinsic
def _u32_as_f32(typingctx, bits):
    """Reinterpret a uint32 as float32 (an LLVM bitcast; numba has no scalar view)."""
    sig = types.float32(types.uint32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return sig, codegen


@_jit(parallel=True, fastmath=_REASSOC)
def _gemv_one(x, w, out):
    """out[0, n] = sum_k x[0, k] * float(w[n, k]): one pass over the weights, widening in-loop."""
    k_dim = x.shape[1]
    n_dim = w.shape[0]
    for t in prange((n_dim + 7) // 8):
        for n in range(8 * t, min(n_dim, 8 * t + 8)):
            acc = np.float32(0.0)
            for k in range(k_dim):
                acc += x[0, k] * _u32_as_f32(np.uint32(w[n, k]) << np.uint32(16))
            out[0, n] = acc


@_jit(fastmath=_REASSOC)
def _rows3(x, w, out, m, n):
    """out[m:m+3, n:n+8] = x[m:m+3] @ W[n:n+8].T: 24 float32 sums in registers."""
    k_dim = x.shape[1]
    a00 = a01 = a02 = a03 = a04 = a05 = a06 = a07 = np.float32(0.0)
    a10 = a11 = a12 = a13 = a14 = a15 = a16 = a17 = np.float32(0.0)
    a20 = a21 = a22 = a23 = a24 = a25 = a26 = a27 = np.float32(0.0)
    for k in range(k_dim):
        x0 = x[m + 0, k]
        x1 = x[m + 1, k]
        x2 = x[m + 2, k]
        v = _u32_as_f32(np.uint32(w[n + 0, k]) << np.uint32(16))
        a00 += x0 * v
        a10 += x1 * v
        a20 += x2 * v
        v = _u32_as_f32(np.uint32(w[n + 1, k]) << np.uint32(16))
        a01 += x0 * v
        a11 += x1 * v
        a21 += x2 * v
        v = _u32_as_f32(np.uint32(w[n + 2, k]) << np.uint32(16))
        a02 += x0 * v
        a12 += x1 * v
        a22 += x2 * v
        v = _u32_as_f32(np.uint32(w[n + 3, k]) << np.uint32(16))
        a03 += x0 * v
        a13 += x1 * v
        a23 += x2 * v
        v = _u32_as_f32(np.uint32(w[n + 4, k]) << np.uint32(16))
        a04 += x0 * v
        a14 += x1 * v
        a24 += x2 * v
        v = _u32_as_f32(np.uint32(w[n + 5, k]) << np.uint32(16))
        a05 += x0 * v
        a15 += x1 * v
        a25 += x2 * v
        v = _u32_as_f32(np.uint32(w[n + 6, k]) << np.uint32(16))
        a06 += x0 * v
        a16 += x1 * v
        a26 += x2 * v
        v = _u32_as_f32(np.uint32(w[n + 7, k]) << np.uint32(16))
        a07 += x0 * v
        a17 += x1 * v
        a27 += x2 * v
    out[m + 0, n], out[m + 0, n + 1], out[m + 0, n + 2], out[m + 0, n + 3] = a00, a01, a02, a03
    out[m + 0, n + 4], out[m + 0, n + 5], out[m + 0, n + 6], out[m + 0, n + 7] = a04, a05, a06, a07
    out[m + 1, n], out[m + 1, n + 1], out[m + 1, n + 2], out[m + 1, n + 3] = a10, a11, a12, a13
    out[m + 1, n + 4], out[m + 1, n + 5], out[m + 1, n + 6], out[m + 1, n + 7] = a14, a15, a16, a17
    out[m + 2, n], out[m + 2, n + 1], out[m + 2, n + 2], out[m + 2, n + 3] = a20, a21, a22, a23
    out[m + 2, n + 4], out[m + 2, n + 5], out[m + 2, n + 6], out[m + 2, n + 7] = a24, a25, a26, a27


@_jit(fastmath=_REASSOC)
def _rows1(x, w, out, m, n):
    """out[m:m+1, n:n+8] = x[m:m+1] @ W[n:n+8].T: 8 float32 sums in registers."""
    k_dim = x.shape[1]
    a00 = a01 = a02 = a03 = a04 = a05 = a06 = a07 = np.float32(0.0)
    for k in range(k_dim):
        x0 = x[m + 0, k]
        v = _u32_as_f32(np.uint32(w[n + 0, k]) << np.uint32(16))
        a00 += x0 * v
        v = _u32_as_f32(np.uint32(w[n + 1, k]) << np.uint32(16))
        a01 += x0 * v
        v = _u32_as_f32(np.uint32(w[n + 2, k]) << np.uint32(16))
        a02 += x0 * v
        v = _u32_as_f32(np.uint32(w[n + 3, k]) << np.uint32(16))
        a03 += x0 * v
        v = _u32_as_f32(np.uint32(w[n + 4, k]) << np.uint32(16))
        a04 += x0 * v
        v = _u32_as_f32(np.uint32(w[n + 5, k]) << np.uint32(16))
        a05 += x0 * v
        v = _u32_as_f32(np.uint32(w[n + 6, k]) << np.uint32(16))
        a06 += x0 * v
        v = _u32_as_f32(np.uint32(w[n + 7, k]) << np.uint32(16))
        a07 += x0 * v
    out[m + 0, n], out[m + 0, n + 1], out[m + 0, n + 2], out[m + 0, n + 3] = a00, a01, a02, a03
    out[m + 0, n + 4], out[m + 0, n + 5], out[m + 0, n + 6], out[m + 0, n + 7] = a04, a05, a06, a07


@_jit(parallel=True, fastmath=_REASSOC)
def _gemm(x, w, out):
    """out = x @ W.T for M >= 2, in register blocks of 3 rows of x by 8 rows of W.

    Each k step widens eight weights once and feeds 24 float32 sums (each vectorized along k
    by LLVM), so a weight is widened once per three rows of x (3 x 8 measured fastest among
    2-6 rows x 4-10 weight rows: 24 sums still fit the vector registers). The sums are written
    out by hand: numba keeps scalars in registers but not small arrays. The last M % 3 rows
    take one row at a time; the N % 8 weight rows left over are the extra last task.
    """
    m_dim, k_dim = x.shape
    n_dim = w.shape[0]
    blocks = n_dim // 8
    for t in prange(blocks + 1):
        if t == blocks:
            for n in range(8 * blocks, n_dim):
                for m in range(m_dim):
                    acc = np.float32(0.0)
                    for k in range(k_dim):
                        acc += x[m, k] * _u32_as_f32(np.uint32(w[n, k]) << np.uint32(16))
                    out[m, n] = acc
            continue
        m = 0
        while m + 3 <= m_dim:
            _rows3(x, w, out, m, 8 * t)
            m += 3
        while m < m_dim:
            _rows1(x, w, out, m, 8 * t)
            m += 1


def bf16_to_float32(bits: np.ndarray) -> np.ndarray:
    """uint16 bfloat16 bit patterns -> float32 of the same shape (exact)."""
    bits = np.asarray(bits, dtype=np.uint16)
    return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32).reshape(bits.shape)


def bf16_bits(w: np.ndarray, where: str = "weights") -> np.ndarray:
    """float32 values that are exactly bfloat16 -> their uint16 bit patterns.

    Raises Bf16Error naming `where`, the count and the first offending value when any value
    has bits below the bfloat16 mantissa (converting would round it).
    """
    given = np.asarray(w)
    with np.errstate(over="ignore"):      # out of float32 range: reported below, not warned
        w = np.ascontiguousarray(given, dtype=np.float32).reshape(given.shape)
    if given.dtype.itemsize > 4 or not np.issubdtype(given.dtype, np.floating):
        # Wider inputs must survive the float32 step too (NaNs compare unequal: skip them).
        lost = ~((w.astype(given.dtype) == given) | np.isnan(w))
        if lost.any():
            first = np.unravel_index(int(np.argmax(lost)), given.shape)
            raise Bf16Error(f"{where}: {int(lost.sum())} of {given.size} values are not bfloat16 "
                            f"values (the first, {float(given[first])!r} at {list(map(int, first))}, is not "
                            "even a float32); storing them as bf16 would round them")
    bits, bad, first = split_bf16(w)
    if bad:
        raise Bf16Error(f"{where}: {bad} of {w.size} values are not bfloat16 values (the first, "
                        f"{float(w[first])!r} at {list(first)}, has mantissa bits below "
                        "bfloat16's); storing them as bf16 would round them")
    return bits.reshape(given.shape)


def split_bf16(w: np.ndarray) -> tuple[np.ndarray, int, tuple[int, ...] | None]:
    """float32 array -> (its top halves as uint16 bit patterns, how many values have bits in the
    bottom half, i.e. are not exactly bfloat16, and the index of the first such value or None)."""
    w = np.asarray(w)
    u = np.ascontiguousarray(w, dtype=np.float32).reshape(w.shape).view(np.uint32)
    low = (u & np.uint32(0xFFFF)) != 0
    bad = int(np.count_nonzero(low))
    first = tuple(int(i) for i in np.unravel_index(int(np.argmax(low)), u.shape)) if bad else None
    return (u >> np.uint32(16)).astype(np.uint16), bad, first


def linear_bf16(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """float32 [..., K] x bf16 bit patterns uint16 [N, K] -> float32 [..., N] = x @ W.T."""
    w = np.asarray(w)
    if w.dtype != np.uint16 or w.ndim != 2:
        raise Bf16Error(f"expected bf16 weights as uint16 [N, K], found {w.dtype} {list(w.shape)}")
    w = np.ascontiguousarray(w)
    x = np.asarray(x)
    if x.ndim == 0 or x.shape[-1] != w.shape[1]:
        raise Bf16Error(f"activations have shape {list(x.shape)}, their last dimension must equal "
                        f"the weights' K = {w.shape[1]}")
    x2 = np.ascontiguousarray(x, dtype=np.float32).reshape(int(np.prod(x.shape[:-1])), w.shape[1])
    n_dim = w.shape[0]
    out = np.empty((x2.shape[0], n_dim), np.float32)
    if out.size == 0:
        pass
    elif w.shape[1] == 0:
        out.fill(0.0)
    elif x2.shape[0] == 1:
        _launch(_gemv_one, x2, w, out)
    else:
        _launch(_gemm, x2, w, out)
    return out.reshape(x.shape[:-1] + (n_dim,))
