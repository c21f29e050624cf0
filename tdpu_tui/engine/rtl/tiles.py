"""Tiles (docs/spec.md §8) in the order the board streams them, the directed corners, their schedule.

For a BitLinear node (K inputs, N outputs) and token m, tile (m, n, t) is the int8 activations
`q[m, t·LEN:(t+1)·LEN]` (lanes past K zero) with the weights `W[n, t·LEN:(t+1)·LEN]`; tokens
outermost, then rows, then K-tiles, so the weights change with every tile. The schedule presents
input i in the same cycle as the load of tile i+1's weights (tile 0's load as far ahead of
input 0 as every other load of its input) — an input is multiplied by weights latched at an
earlier edge, so a core that takes the weights of the same edge is caught, as is one that lags
a load behind.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tdpu_tui.engine.rtl.harness import FLAG_LOAD, FLAG_VALID, Cycles, concat, reset_cycles

RESET_CYCLES = 4
DRAIN_CYCLES = 256


@dataclass
class TileSet:
    """Tiles of one stream: data [T, L] int8, weights [T, L] in {-1, 0, 1}, where they come from."""
    name: str
    data: np.ndarray
    weights: np.ndarray
    token: np.ndarray       # [T] the token index (into the node's activations) of each tile
    row: np.ndarray         # [T] n
    ktile: np.ndarray       # [T] t
    k: int
    n: int
    tokens: list[int]       # the tokens streamed
    rows: int               # rows streamed per token

    def __len__(self) -> int:
        return len(self.data)

    @property
    def expected(self) -> np.ndarray:
        """Each tile's sum over its lanes, int64."""
        return np.einsum("tl,tl->t", self.data.astype(np.int64), self.weights.astype(np.int64))

    @property
    def ktiles(self) -> int:
        return int(self.ktile.max()) + 1 if len(self) else 0


def pad_k(a: np.ndarray, lanes: int) -> np.ndarray:
    k = a.shape[-1]
    pad = (-k) % lanes
    if pad:
        a = np.concatenate([a, np.zeros((*a.shape[:-1], pad), a.dtype)], axis=-1)
    return a.reshape(*a.shape[:-1], -1, lanes)


def choose_tokens(m: int, n: int, k: int, lanes: int, max_tiles: int) -> tuple[list[int], int]:
    """Tokens (spread over the sequence) and rows per token that fit in `max_tiles`; whole when they fit."""
    kt = -(-k // lanes)
    per_token = n * kt
    fit = max_tiles // per_token
    if fit >= m:
        return list(range(m)), n
    if fit >= 1:
        return sorted(set(np.linspace(0, m - 1, fit).round().astype(int).tolist())), n
    return [0], max(1, max_tiles // kt)


def node_tiles(name: str, q: np.ndarray, w: np.ndarray, lanes: int, tokens: list[int], rows: int) -> TileSet:
    """Tiles of `q[tokens]` [M, K] int8 against the first `rows` rows of `w` [N, K] ternary."""
    qs = pad_k(np.ascontiguousarray(q[tokens]), lanes)             # [M, T, L]
    ws = pad_k(np.ascontiguousarray(w[:rows]), lanes)              # [R, T, L]
    m, kt = qs.shape[0], qs.shape[1]
    data = np.broadcast_to(qs[:, None], (m, rows, kt, lanes)).reshape(-1, lanes)
    weights = np.broadcast_to(ws[None], (m, rows, kt, lanes)).reshape(-1, lanes)
    tok, row, kti = np.meshgrid(np.asarray(tokens), np.arange(rows), np.arange(kt), indexing="ij")
    return TileSet(name, np.ascontiguousarray(data), np.ascontiguousarray(weights), tok.ravel(),
                   row.ravel(), kti.ravel(), int(q.shape[1]), int(w.shape[0]), list(tokens), rows)


def corner_tiles(lanes: int, seed: int = 0) -> tuple[TileSet, np.ndarray, np.ndarray]:
    """The directed tiles, and the small node (q [1, K], W [4, K], K not a multiple of LEN) whose
    two K-tiles end the set, so its rows can be checked against `ternary_matmul_int` too."""
    rng = np.random.default_rng(seed)
    alt = np.where(np.arange(lanes) % 2 == 0, 1, -1)
    cases = [
        (np.full(lanes, -128), np.full(lanes, -1)),            # all -128 with all -1: +128·LEN
        (np.full(lanes, 127), np.full(lanes, 1)),              # all +127 with all +1
        (np.full(lanes, -128), np.full(lanes, 1)),             # the most negative sum
        (np.full(lanes, 127), np.full(lanes, -1)),
        (np.where(alt > 0, 127, -128), alt),                   # alternating signs
        (np.where(alt > 0, -128, 127), alt),
        (np.zeros(lanes), np.zeros(lanes)),                    # all zeros
        (np.zeros(lanes), rng.integers(-1, 2, lanes)),
    ]
    for i in range(lanes):                                     # one lane at a time
        x, wt = np.zeros(lanes), np.zeros(lanes)
        x[i], wt[i] = -128 + (i % 7), 1
        cases.append((x, wt))
    bit = 1                                                    # sums at every power of two: a
    while (1 << bit) + 1 <= 127 * lanes:                       # width fault shows at its own bit
        for target in ((1 << bit) - 1, 1 << bit, -(1 << bit), -(1 << bit) - 1):
            x = _spread(target, lanes)
            if x is not None:
                cases.append((x, np.ones(lanes)))
        bit += 1
    data = np.array([c[0] for c in cases], np.int8)
    weights = np.array([c[1] for c in cases], np.int8)
    k = lanes + lanes // 2 + 1                                 # not a multiple of LEN
    q = rng.integers(-128, 128, (1, k)).astype(np.int8)
    w = rng.integers(-1, 2, (4, k)).astype(np.int8)
    ragged = node_tiles("corner", q, w, lanes, [0], 4)
    base = len(cases)
    token = np.concatenate([np.full(base, -1), ragged.token])
    row = np.concatenate([np.full(base, -1), ragged.row])
    ktile = np.concatenate([np.arange(base), ragged.ktile])
    tiles = TileSet("corner tiles", np.concatenate([data, ragged.data]),
                    np.concatenate([weights, ragged.weights]), token, row, ktile, k, 4, [0], 4)
    return tiles, q, w


def _spread(target: int, lanes: int) -> np.ndarray | None:
    """int8 lanes summing to `target` (None when out of reach)."""
    x = np.zeros(lanes)
    rest = target
    for i in range(lanes):
        x[i] = min(127, max(-128, rest))
        rest -= int(x[i])
    return x if rest == 0 else None


def codes_of(weights: np.ndarray, neg: int, zero: int, pos: int) -> np.ndarray:
    """Ternary values -> the core's 2-bit codes ([rtl.codes])."""
    return np.array([neg, zero, pos], np.uint8)[weights.astype(np.int64) + 1]


def fresh_schedule(data: np.ndarray, codes: np.ndarray, gap: int = 1,
                   lead: int | None = None) -> tuple[Cycles, np.ndarray]:
    """Reset, then every input with fresh weights, `gap` cycles apart; (cycles, input cycle of each).

    `lead` None: tile i+1's weights load in the cycle of input i, tile 0's `gap` cycles before
    input 0, so every input follows the load of its weights by `gap` cycles (tile 0 too: a core
    whose weights need two edges to settle is exact from `gap` 2 on, not at no gap at all).
    `lead` d (1 <= d < gap): each tile's weights load d cycles before its input, in a cycle of
    their own (for a core that takes no input in a load cycle)."""
    count, lanes = data.shape
    d = gap if lead is None else lead
    c = Cycles.empty(d + count * gap + DRAIN_CYCLES, lanes)
    at = d + np.arange(count) * gap                  # relative to the end of the reset
    loads = at - d
    c.flags[loads] |= FLAG_LOAD
    c.codes[loads] = codes
    c.flags[at] |= FLAG_VALID
    c.data[at] = data
    return concat([reset_cycles(lanes, RESET_CYCLES), c]), at + RESET_CYCLES


def reused_schedule(data: np.ndarray, codes: np.ndarray, gap: int = 1,
                    settle: int = 1) -> tuple[Cycles, np.ndarray]:
    """Reset, one load of `codes`, the first input `settle` cycles later, then every input `gap`
    cycles apart with those weights."""
    count, lanes = data.shape
    c = Cycles.empty(settle + count * gap + DRAIN_CYCLES, lanes)
    at = settle + np.arange(count) * gap
    c.flags[0] = FLAG_LOAD
    c.codes[0] = codes
    c.flags[at] = FLAG_VALID
    c.data[at] = data
    return concat([reset_cycles(lanes, RESET_CYCLES), c]), at + RESET_CYCLES
