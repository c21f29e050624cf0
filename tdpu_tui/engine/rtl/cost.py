"""The TDPU cost model (docs/spec.md §9): BitLinear cycles and weight traffic per token on the board.

Per BitLinear node (K, N) and token: `cycles = ceil(N · ceil(K / lanes) · II / cores) + L` (the
tiles split over the cores, the last result L cycles after the last input), weight bytes
`N · K / 4`, time `max(cycles / clock, bytes / bandwidth)` and the bound that holds. Prefill of
S tokens loads each weight tile once and streams all S tokens through it:
`ceil(N · ceil(K / lanes) · S · II_reused / cores) + L`.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass

# BitNet b1.58 2B4T (docs/spec.md §4): 30 layers of these (K, N).
SHAPES_2B4T = (("q_proj", 2560, 2560), ("k_proj", 2560, 640), ("v_proj", 2560, 640),
               ("o_proj", 2560, 2560), ("gate_proj", 2560, 6912), ("up_proj", 2560, 6912),
               ("down_proj", 6912, 2560))
LAYERS_2B4T = 30
# Its config.json's shapes, for the host's share of a 2B4T token (`host_ops_ms`).
CONFIG_2B4T = {"hidden_size": 2560, "intermediate_size": 6912, "num_attention_heads": 20,
               "num_key_value_heads": 5, "num_hidden_layers": LAYERS_2B4T, "vocab_size": 128256}
SWEEP_LANES = (16, 32, 64, 128)
SWEEP_CORES = (1, 2, 4)


@dataclass(frozen=True)
class CoreTiming:
    lanes: int
    latency: int
    ii: int
    ii_reused: int
    measured: bool

    @classmethod
    def assumed(cls, lanes: int) -> CoreTiming:
        return cls(lanes, 1 + int(math.log2(lanes)), 1, 1, False)

    def with_lanes(self, lanes: int) -> CoreTiming:
        """The same core at another width: the adder tree one level deeper per doubling."""
        depth = int(math.log2(lanes)) - int(math.log2(self.lanes))
        return CoreTiming(lanes, max(1, self.latency + depth), self.ii, self.ii_reused, self.measured)


@dataclass(frozen=True)
class Board:
    cores: int
    clock_mhz: float
    ddr_gb_s: float


def node_cycles(k: int, n: int, t: CoreTiming, cores: int, tokens: int = 1, reused: bool = False) -> int:
    tiles = n * -(-k // t.lanes) * tokens
    ii = t.ii_reused if reused else t.ii
    return -(-tiles * ii // cores) + t.latency


@dataclass
class NodeCost:
    name: str
    layer: int | None
    k: int
    n: int
    cycles: int
    weight_bytes: int
    compute_s: float
    memory_s: float

    @property
    def seconds(self) -> float:
        return max(self.compute_s, self.memory_s)

    @property
    def bound(self) -> str:
        return "compute" if self.compute_s >= self.memory_s else "bandwidth"


def node_cost(name: str, k: int, n: int, t: CoreTiming, board: Board, tokens: int = 1,
              reused: bool = False) -> NodeCost:
    cycles = node_cycles(k, n, t, board.cores, tokens, reused)
    wbytes = n * k // 4
    return NodeCost(name, layer_of(name), k, n, cycles, wbytes, cycles / (board.clock_mhz * 1e6),
                    wbytes / (board.ddr_gb_s * 1e9))


def layer_of(name: str) -> int | None:
    m = re.search(r"layers[._/](\d+)", name)
    return int(m.group(1)) if m else None


@dataclass
class GraphCost:
    nodes: list[NodeCost]

    @property
    def cycles(self) -> int:
        return sum(c.cycles for c in self.nodes)

    @property
    def seconds(self) -> float:
        return sum(c.seconds for c in self.nodes)

    @property
    def weight_bytes(self) -> int:
        return sum(c.weight_bytes for c in self.nodes)

    @property
    def bound(self) -> str:
        compute = sum(c.compute_s for c in self.nodes)
        memory = sum(c.memory_s for c in self.nodes)
        return "compute" if compute >= memory else "bandwidth"

    def by_layer(self) -> dict[int | None, GraphCost]:
        out: dict[int | None, GraphCost] = {}
        for c in self.nodes:
            out.setdefault(c.layer, GraphCost([])).nodes.append(c)
        return out


def graph_cost(nodes: list[tuple[str, int, int]], t: CoreTiming, board: Board, tokens: int = 1,
               reused: bool = False) -> GraphCost:
    return GraphCost([node_cost(name, k, n, t, board, tokens, reused) for name, k, n in nodes])


def shapes_2b4t() -> list[tuple[str, int, int]]:
    return [(f"model.layers.{i}.{proj}", k, n) for i in range(LAYERS_2B4T) for proj, k, n in SHAPES_2B4T]


def sweep(t: CoreTiming, board: Board) -> dict[tuple[int, int], GraphCost]:
    """2B4T per token for every lanes × cores of docs/spec.md §9."""
    nodes = shapes_2b4t()
    return {(lanes, cores): graph_cost(nodes, t.with_lanes(lanes), Board(cores, board.clock_mhz, board.ddr_gb_s))
            for lanes in SWEEP_LANES for cores in SWEEP_CORES}


def _median_ms(fn, repeats: int = 7) -> float:
    import time

    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2] * 1e3


LM_HEAD_BLOCK = 16384


def host_ops_ms(conf: dict, seq_len: int) -> dict:
    """The ops that stay on the host, for one token with `seq_len` of context, timed here with
    NumPy float32 (this machine's figures, not the board's): {op: ms} for the whole model.
    Timed once per process and shape (a run, or the app, asks again for the same model)."""
    hidden = int(conf["hidden_size"])
    inter = int(conf.get("intermediate_size", 4 * hidden))
    heads = int(conf.get("num_attention_heads", 1))
    kv = int(conf.get("num_key_value_heads", heads))
    layers = int(conf.get("num_hidden_layers", 1))
    vocab = int(conf.get("vocab_size", 1))
    return dict(_host_ops_ms(hidden, inter, heads, kv, layers, vocab, int(seq_len)))


@functools.lru_cache(maxsize=16)
def _host_ops_ms(hidden: int, inter: int, heads: int, kv: int, layers: int, vocab: int,
                 seq_len: int) -> dict:
    import numpy as np

    hd = hidden // heads
    rng = np.random.default_rng(0)
    x = rng.standard_normal(hidden).astype(np.float32)
    xi = rng.standard_normal(inter).astype(np.float32)
    g, gi = np.ones(hidden, np.float32), np.ones(inter, np.float32)

    def rms(v, w):
        return v / np.sqrt(np.mean(v * v) + 1e-5) * w

    q = rng.standard_normal((kv, heads // kv, hd)).astype(np.float32)
    k = rng.standard_normal((kv, seq_len, hd)).astype(np.float32)
    val = rng.standard_normal((kv, seq_len, hd)).astype(np.float32)

    def attention():
        s = np.einsum("kgd,ksd->kgs", q, k) * (hd ** -0.5)
        s = np.exp(s - s.max(axis=-1, keepdims=True))
        s /= s.sum(axis=-1, keepdims=True)
        return np.einsum("kgs,ksd->kgd", s, val)

    rows = min(vocab, LM_HEAD_BLOCK)
    head = rng.standard_normal((rows, hidden), dtype=np.float32)
    table = head
    ids = np.array([rows // 2])
    norms = _median_ms(lambda: (rms(x, g), rms(x, g), rms(x, g), rms(xi, gi)))
    return {
        "embedding": _median_ms(lambda: table[ids]),
        "norms": norms * layers + _median_ms(lambda: rms(x, g)),
        "attention": _median_ms(attention) * layers,
        "lm_head": _median_ms(lambda: head @ x) * vocab / rows,
        "shapes": f"hidden {hidden}, {layers} layers, {heads}/{kv} heads, vocab {vocab}, context {seq_len}",
    }
