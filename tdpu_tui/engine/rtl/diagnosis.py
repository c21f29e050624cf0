"""Why a core's results are not exact: named hypotheses tested against every observed result.

Each hypothesis predicts what a core with that one fault would return for every tile; one
that predicts every observed result (where it is defined) and at least one wrong result
explains the run. Like `validate`'s layout check, nothing is guessed from a sample.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

UNSIGNED = "activations read as unsigned (lanes zero-extended)"
SWAPPED = "the −1 and +1 codes swapped"
REVERSED = "lanes in reverse order"
LATE = "weights applied one input late"
EARLY = "weights applied one input early"
NONE_EXPLAINS = "no single hypothesis explains it"


def wrapped(bits: int) -> str:
    return f"the sum wrapped to {bits} bits"


def saturated(bits: int) -> str:
    return f"the sum saturated to {bits} bits"


def not_sign_extended(bits: int) -> str:
    return f"the result's sign not extended (only its low {bits} bits kept, zero above)"


@dataclass
class Observed:
    """Every tile of one or more streams: what went in, what came out."""
    data: np.ndarray        # [T, L] int8
    weights: np.ndarray     # [T, L] in {-1, 0, 1}
    got: np.ndarray         # [T] int64
    stream: np.ndarray      # [T] which stream a tile belongs to (neighbours only within one)

    @property
    def expected(self) -> np.ndarray:
        return _dot(self.data.astype(np.int64), self.weights)


def _dot(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    return np.einsum("tl,tl->t", x.astype(np.int64), w.astype(np.int64))


def _shifted(obs: Observed, by: int) -> tuple[np.ndarray, np.ndarray]:
    """Weights of the tile `by` places later in the same stream, and where there is one."""
    t = len(obs.got)
    idx = np.arange(t) + by
    ok = (idx >= 0) & (idx < t)
    idx = np.clip(idx, 0, max(t - 1, 0))
    ok &= obs.stream[idx] == obs.stream
    return obs.weights[idx], ok


def _wrap(v: np.ndarray, bits: int) -> np.ndarray:
    m = 1 << bits
    return ((v + (m >> 1)) % m) - (m >> 1)


Prediction = tuple[np.ndarray, np.ndarray]   # (predicted [T], defined [T] bool)


def hypotheses(obs: Observed) -> list[tuple[str, str, Callable[[], Prediction]]]:
    """(family, name, prediction) for every hypothesis; the width families widest first."""
    every = np.ones(len(obs.got), bool)
    exp = obs.expected
    out: list[tuple[str, str, Callable[[], Prediction]]] = [
        ("unsigned", UNSIGNED, lambda: (_dot(obs.data.view(np.uint8), obs.weights), every)),
        ("swapped", SWAPPED, lambda: (-exp, every)),
        ("reversed", REVERSED, lambda: (_dot(obs.data, obs.weights[:, ::-1]), every)),
    ]

    def late() -> Prediction:
        w, ok = _shifted(obs, -1)
        return _dot(obs.data, w), ok

    def early() -> Prediction:
        w, ok = _shifted(obs, 1)
        return _dot(obs.data, w), ok

    out += [("late", LATE, late), ("early", EARLY, early)]
    for bits in range(31, 3, -1):
        out.append(("wrapped", wrapped(bits), lambda b=bits: (_wrap(exp, b), every)))
        out.append(("saturated", saturated(bits),
                    lambda b=bits: (np.clip(exp, -(1 << (b - 1)), (1 << (b - 1)) - 1), every)))
        out.append(("sign", not_sign_extended(bits), lambda b=bits: (exp & ((1 << b) - 1), every)))
    return out


def explain(obs: Observed) -> list[str]:
    """The hypotheses that explain every observed result; [] when exact or nothing does.

    Of the width hypotheses (wrapped, saturated, sign) only the widest that explains is named."""
    exp = obs.expected
    wrong = obs.got != exp
    if not wrong.any():
        return []
    found: list[str] = []
    families: set[str] = set()
    for family, name, predict in hypotheses(obs):
        if family in families:
            continue
        pred, defined = predict()
        if (defined & wrong).any() and np.array_equal(pred[defined], obs.got[defined]):
            families.add(family)
            found.append(name)
    return found


def phrase(found: list[str]) -> str:
    return " or ".join(found) if found else NONE_EXPLAINS
