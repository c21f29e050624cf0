"""Checks of single nodes of the replaced graph against the kernel and the float graph."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kernels.packing import unpack
from tdpu_tui.engine.core.config import LAYOUTS


# A node whose output is this far off (relative RMS) is wrong, whatever the elementwise bound says.
MAX_NODE_REL_RMS = 0.25



@dataclass
class NodeCheck:
    name: str
    k: int
    n: int
    layout: str
    int_exact: bool
    max_err: float
    bound: float          # the elementwise bound where err / bound is worst
    rel_rms: float
    result: str           # "ok" | "FAILED"
    diagnosis: str = ""



def _int_product(q: np.ndarray, w: np.ndarray) -> np.ndarray:
    """q · Wᵀ as int64, exactly: every partial sum is an integer below 2⁵³, so float64 BLAS
    computes it without rounding (and in a fraction of NumPy's integer matmul time)."""
    return (q.astype(np.float64) @ w.astype(np.float64).T).astype(np.int64)



def _check_against(acc: np.ndarray, s: np.ndarray, w: np.ndarray, ws: float, y: np.ndarray
                   ) -> tuple[bool, float, float, float]:
    """(within bound, max err, bound at the worst element, relative RMS) of acc/s·ws vs y."""
    got = (acc.astype(np.float32) / s * np.float32(ws)).astype(np.float32)
    err = np.abs(got.astype(np.float64) - y)
    nnz = np.abs(w).sum(axis=1).astype(np.float64)
    bound = ws * (0.5 / s.astype(np.float64)) * nnz[None, :] + 1e-5 * (1.0 + np.abs(y).max())
    ratio = err / bound
    worst = np.unravel_index(int(np.argmax(ratio)), ratio.shape)
    rel = float(np.sqrt((err ** 2).mean() / max((y ** 2).mean(), 1e-30)))
    ok = bool((ratio <= 1.0).all()) and rel <= MAX_NODE_REL_RMS
    return ok, float(err.max()), float(bound[worst]), rel



def check_node(name: str, x: np.ndarray, y: np.ndarray, p: np.ndarray, ws: float, layout: str
               ) -> NodeCheck:
    """The integer core exactly, and the float output within the activation-quantization bound."""
    from kernels.bitlinear import quantize_activations, ternary_matmul_int

    k = x.shape[-1]
    x2 = np.ascontiguousarray(x.reshape(-1, k), dtype=np.float32)
    y2 = np.asarray(y, dtype=np.float64).reshape(x2.shape[0], -1)
    q, s = quantize_activations(x2)
    w = unpack(p, layout)
    want = _int_product(q, w)
    exact = bool(np.array_equal(ternary_matmul_int(q, p, layout), want))
    ok, max_err, bound, rel = _check_against(want, s, w, ws, y2)
    diagnosis = ""
    if not ok:
        other = next(lay for lay in LAYOUTS if lay != layout)
        w_other = unpack(p, other)
        ok_other, err_other, _, rel_other = _check_against(_int_product(q, w_other), s, w_other, ws, y2)
        if ok_other:
            diagnosis = (f"weights are in {other} order but the node declares {layout} "
                         f"(decoded as {other}: max |Δ| {err_other:.3g}, relative RMS {rel_other:.2g}; "
                         f"as {layout}: {max_err:.3g}, {rel:.2g})")
        else:
            diagnosis = (f"output differs beyond the activation-quantization bound in either layout "
                         f"(relative RMS {rel:.2g} as {layout}, {rel_other:.2g} as {other})")
    return NodeCheck(name, k, w.shape[0], layout, exact, max_err, bound, rel,
                     "ok" if ok and exact else "FAILED", diagnosis)



def check_bf16_node(name: str, x: np.ndarray, y: np.ndarray, bits: np.ndarray, w_float: np.ndarray,
                    weight_nk: bool) -> NodeCheck:
    """An lm_head held in bf16 (`[replace].lm_head = "bf16"`): its weights must widen to exactly
    the float graph's, and LinearBF16's output may differ from the float MatMul's only by the
    order of float32 sums: |Δy| ≤ 2·K·2⁻²⁴·(|x|·|W|ᵀ) (plus a tiny absolute floor)."""
    from kernels.bf16 import bf16_to_float32, linear_bf16

    n, k = bits.shape
    exact = True
    step = 4096 if weight_nk else max(1, 4096 * k // max(n, 1))
    for r in range(0, w_float.shape[0], step):     # the float table may be 1.3 GB: in blocks
        block = np.asarray(w_float[r:r + step], dtype=np.float32)
        widened = bf16_to_float32(bits[r:r + step] if weight_nk else bits[:, r:r + step].T)
        if not np.array_equal(block.view(np.uint32), widened.view(np.uint32)):
            exact = False
            break
    x2 = np.ascontiguousarray(x.reshape(-1, k), dtype=np.float32)
    y2 = np.asarray(y, dtype=np.float64).reshape(x2.shape[0], -1)
    got = linear_bf16(x2, bits).astype(np.float64)
    err = np.abs(got - y2)
    magnitude = linear_bf16(np.abs(x2), bits & np.uint16(0x7FFF))   # |x|·|W|ᵀ, no float copy of W
    bound = 2.0 * k * 2.0 ** -24 * magnitude.astype(np.float64) + 1e-30
    ratio = err / bound
    worst = np.unravel_index(int(np.argmax(ratio)), ratio.shape)
    rel = float(np.sqrt((err ** 2).mean() / max((y2 ** 2).mean(), 1e-30)))
    ok = exact and bool((ratio <= 1.0).all())
    diagnosis = "" if exact else "the bf16 weights do not widen to the float graph's weights"
    return NodeCheck(name, k, n, "bf16", exact, float(err.max()), float(bound[worst]), rel,
                     "ok" if ok else "FAILED", diagnosis)



def explain_disagreement(got: np.ndarray, want: np.ndarray, max_abs: float) -> str | None:
    """Why argmax differs where it does: near-ties in the target are rounding, others are not."""
    a, b = got.reshape(-1, got.shape[-1]), want.reshape(-1, want.shape[-1])
    where = np.flatnonzero(a.argmax(-1) != b.argmax(-1))
    if where.size == 0:
        return None
    top2 = np.sort(b[where], axis=-1)[:, -2:]
    margins = top2[:, 1] - top2[:, 0]
    ties = int((margins <= 2 * max_abs).sum())
    text = (f"{where.size} of {a.shape[0]} positions pick a different token; at {ties} of them the "
            f"target's top two logits are within {2 * max_abs:.3g} (twice the max |Δ|) of each other "
            f"(largest such margin {margins.max():.3g}).")
    if ties == where.size:
        return text + " These are near-ties that activation rounding can flip, not a defect."
    return text + f" {where.size - ties} are not near-ties: the graphs compute different things there."
