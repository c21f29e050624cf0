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
"""

from __future__ import annotations

import numpy as np

LAYOUTS = ("tdpu", "hf")


class PackingError(ValueError):
    pass


def _check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise PackingError(f"unknown layout {layout!r}: expected one of {LAYOUTS}")


def pack(w: np.ndarray, layout: str) -> np.ndarray:
    """int8 [N, K] in {-1, 0, 1} -> uint8 [N/4, K]."""
    _check_layout(layout)
    w = np.asarray(w)
    if w.ndim != 2:
        raise PackingError(f"expected a 2-D weight [N, K], found shape {w.shape}")
    n, k = w.shape
    if n % 4:
        raise PackingError(f"N = {n} is not a multiple of 4 (weight shape {w.shape})")
    bad = (w < -1) | (w > 1)
    if bad.any():
        r, c = np.argwhere(bad)[0]
        raise PackingError(
            f"weight is not ternary: {int(bad.sum())} values outside {{-1, 0, 1}}, "
            f"first W[{r}, {c}] = {w[r, c]}")
    codes = (w.astype(np.int16) + 1).astype(np.uint8)
    if layout == "hf":
        blocks = codes.reshape(4, n // 4, k)           # block i = rows i*N/4 .. (i+1)*N/4
    else:
        blocks = codes.reshape(n // 4, 4, k).transpose(1, 0, 2)  # block i = rows 4r + i
    out = blocks[0] | (blocks[1] << 2) | (blocks[2] << 4) | (blocks[3] << 6)
    return np.ascontiguousarray(out, dtype=np.uint8)


def codes_of(p: np.ndarray) -> np.ndarray:
    """uint8 [R, K] -> codes [4, R, K] (code i of every byte)."""
    p = np.asarray(p)
    if p.dtype != np.uint8 or p.ndim != 2:
        raise PackingError(f"expected packed uint8 [N/4, K], found {p.dtype} {p.shape}")
    return np.stack([(p >> (2 * i)) & 3 for i in range(4)])


def find_reserved(p: np.ndarray) -> tuple[int, int, int] | None:
    """(row, column, i) of the first reserved code 3, or None."""
    codes = codes_of(p)
    hits = np.argwhere(codes == 3)
    if len(hits) == 0:
        return None
    i, r, c = (int(v) for v in hits[0])
    return r, c, i


def unpack(p: np.ndarray, layout: str) -> np.ndarray:
    """uint8 [N/4, K] -> int8 [N, K] in {-1, 0, 1}; raises on a reserved code 3."""
    _check_layout(layout)
    codes = codes_of(p)
    if (codes == 3).any():
        r, c, i = find_reserved(p)
        raise PackingError(
            f"reserved code 3 in {int((codes == 3).sum())} places, first at byte [{r}, {c}] bits {2*i}..{2*i+1}")
    w = codes.astype(np.int8) - 1                       # [4, R, K]
    r, k = p.shape
    if layout == "hf":
        return w.reshape(4 * r, k)
    return np.ascontiguousarray(w.transpose(1, 0, 2).reshape(4 * r, k))


def repack(p: np.ndarray, src: str, dst: str) -> np.ndarray:
    """Re-order packed bytes from layout `src` to layout `dst`."""
    _check_layout(src)
    _check_layout(dst)
    if src == dst:
        return np.ascontiguousarray(p)
    return pack(unpack(p, src), dst)
