"""Packings of a ternary weight matrix W[N, K] (values in {-1, 0, +1}) into P[N/4, K] uint8.

Each weight is stored as the 2-bit code c = w + 1 (0 -> -1, 1 -> 0, 2 -> +1; 3 is reserved).
Byte P[r, k] holds four codes, bits 2i..2i+1 for i = 0..3:

    bit:    7 6 | 5 4 | 3 2 | 1 0
    code:    i=3 | i=2 | i=1 | i=0

The layouts differ in which rows of W the four codes of a byte come from:

    hf   (Hugging Face checkpoint, transformers' pack_weights/unpack_weights):
         code i of P[r, k] is W[r + i*N/4, k]      -- four contiguous row blocks
    tdpu (the board's BitLinear plugin):
         code i of P[r, k] is W[4*r + i, k]        -- four adjacent rows

Reading bytes of one layout with code for the other silently permutes output rows.
Both layouts keep K contiguous, so the kernels in `kernels.bitlinear` read either one
directly: only the output row of code i changes (`row_of(r, i, n, layout)`).
"""

from __future__ import annotations

import numpy as np

LAYOUTS = ("tdpu", "hf")


class PackingError(ValueError):
    pass


def check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise PackingError(f"unknown layout {layout!r}: expected one of {LAYOUTS}")


def row_of(r: int, i: int, n: int, layout: str) -> int:
    """Row of W held by code i of packed row r (W has n rows)."""
    check_layout(layout)
    return r + i * (n // 4) if layout == "hf" else 4 * r + i


def pack(w: np.ndarray, layout: str) -> np.ndarray:
    """int8 [N, K] in {-1, 0, 1} -> uint8 [N/4, K]."""
    check_layout(layout)
    w = np.asarray(w)
    if w.ndim != 2:
        raise PackingError(f"expected a 2-D weight [N, K], found shape {w.shape}")
    n, k = w.shape
    if n % 4:
        raise PackingError(f"N = {n} is not a multiple of 4 (weight shape {w.shape})")
    if not (np.issubdtype(w.dtype, np.integer) or np.issubdtype(w.dtype, np.floating)
            or w.dtype == np.bool_):
        raise PackingError(f"expected an integer weight, found dtype {w.dtype}")
    bad = (w != -1) & (w != 0) & (w != 1)
    if bad.any():
        r, c = np.argwhere(bad)[0]
        raise PackingError(
            f"weight is not ternary: {int(bad.sum())} values outside {{-1, 0, 1}}, "
            f"first W[{r}, {c}] = {w[r, c]}")
    codes = (w.astype(np.int8) + 1).view(np.uint8)
    if layout == "hf":
        blocks = codes.reshape(4, n // 4, k)           # block i = rows i*N/4 .. (i+1)*N/4
    else:
        blocks = codes.reshape(n // 4, 4, k).transpose(1, 0, 2)  # block i = rows 4r + i
    out = blocks[0] | (blocks[1] << 2) | (blocks[2] << 4) | (blocks[3] << 6)
    return np.ascontiguousarray(out, dtype=np.uint8)


def _check_packed(p: np.ndarray) -> np.ndarray:
    p = np.asarray(p)
    if p.dtype != np.uint8 or p.ndim != 2:
        raise PackingError(f"expected packed uint8 [N/4, K], found {p.dtype} {p.shape}")
    return p


def codes_of(p: np.ndarray) -> np.ndarray:
    """uint8 [R, K] -> codes [4, R, K] (code i of every byte)."""
    p = _check_packed(p)
    return np.stack([(p >> (2 * i)) & 3 for i in range(4)])


def _reserved_mask(p: np.ndarray) -> np.ndarray:
    # A code is 3 exactly when both of its bits are set.
    return (p & (p >> 1) & 0x55) != 0


def find_reserved(p: np.ndarray) -> tuple[int, int, int] | None:
    """(row, column, i) of the first reserved code 3, or None."""
    p = _check_packed(p)
    mask = _reserved_mask(p)
    if not mask.any():
        return None
    r, c = (int(v) for v in np.argwhere(mask)[0])
    byte = int(p[r, c])
    i = next(i for i in range(4) if (byte >> (2 * i)) & 3 == 3)
    return r, c, i


def count_reserved(p: np.ndarray) -> int:
    p = _check_packed(p)
    return int(sum(int(np.count_nonzero(((p >> (2 * i)) & 3) == 3)) for i in range(4)))


def check_reserved(p: np.ndarray, layout: str, where: str = "packed weight") -> None:
    """Raise PackingError naming the first reserved code 3 (byte, bits and W position)."""
    check_layout(layout)
    hit = find_reserved(p)
    if hit is None:
        return
    r, c, i = hit
    row = row_of(r, i, 4 * p.shape[0], layout)
    raise PackingError(
        f"{where}: reserved code 3 in {count_reserved(p)} places, first at byte [{r}, {c}] "
        f"bits {2 * i}..{2 * i + 1} (W[{row}, {c}] in the {layout} layout)")


def unpack(p: np.ndarray, layout: str) -> np.ndarray:
    """uint8 [N/4, K] -> int8 [N, K] in {-1, 0, 1}; raises on a reserved code 3."""
    check_layout(layout)
    p = _check_packed(p)
    check_reserved(p, layout)
    w = codes_of(p).astype(np.int8) - 1                 # [4, R, K]
    r, k = p.shape
    if layout == "hf":
        return w.reshape(4 * r, k)
    return np.ascontiguousarray(w.transpose(1, 0, 2).reshape(4 * r, k))


def repack(p: np.ndarray, src: str, dst: str) -> np.ndarray:
    """Re-order packed bytes from layout `src` to layout `dst`."""
    check_layout(src)
    check_layout(dst)
    p = _check_packed(p)
    if src == dst:
        check_reserved(p, src)
        return np.ascontiguousarray(p)
    return pack(unpack(p, src), dst)
