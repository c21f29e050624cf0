"""Timing: graphs of single projections, and medians of runs interleaved in turns."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from kernels.packing import unpack
from tdpu_tui.engine.graph.index import GraphIndex
from tdpu_tui.engine.rewrite.inventory import BITLINEAR_DOMAIN, bitlinear_attrs
from tdpu_tui.engine.rewrite.matmulnbits import NBITS_DOMAIN, nbits_block_size, nbits_pack


# Pause before each timed block, and the run time from which a block needs no untimed run
# before it (see interleaved_medians).
SETTLE_S = 0.2
LONG_RUN_S = 1.0


def projection_graphs(bitlinear_path: Path, act_quant: bool, layer: int | None = None
                      ) -> tuple[int, dict[str, onnx.ModelProto]]:
    """In-memory graphs of one layer's projections side by side: input x{i} [1, M, K] -> y{i}.

    `float` is the exporter's chain (with the in-graph activation quantization when the
    profile has it) on float32 weights; `bitlinear` and `matmulnbits` are the single nodes.
    """

    g = GraphIndex.load(bitlinear_path)
    nodes = [n for n in g.graph.node if n.op_type == "BitLinear" and n.domain == BITLINEAR_DOMAIN]
    if layer is None:
        layer = next((int(n.name.split("layers.")[1].split("/")[0]) for n in nodes if "layers." in n.name), 0)
    mine = [n for n in nodes if f"layers.{layer}/" in n.name] or nodes
    parts: dict[str, tuple[list, list]] = {k: ([], []) for k in ("float", "bitlinear", "matmulnbits")}
    inputs, outputs = [], []
    for i, node in enumerate(mine):
        k, n, layout = bitlinear_attrs(node)
        p = np.asarray(g.array(node.input[1]))
        ws = np.array([g.scalar(node.input[2])], np.float32)
        w = unpack(p, layout)
        x, y = f"x{i}", f"y{i}"
        inputs.append(helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, "seq", k]))
        outputs.append(helper.make_tensor_value_info(y, TensorProto.FLOAT, [1, "seq", n]))
        fn, fi = parts["float"]
        fi += [numpy_helper.from_array(np.ascontiguousarray(w.T, dtype=np.float32), f"w{i}"),
               numpy_helper.from_array(ws, f"ws{i}")]
        a = x
        if act_quant:
            fi += [numpy_helper.from_array(np.array(v, np.float32), f"c{i}_{j}")
                   for j, v in enumerate((1e-5, 127.0, -128.0))]
            fn += [helper.make_node("Abs", [x], [f"ab{i}"]),
                   helper.make_node("ReduceMax", [f"ab{i}"], [f"mx{i}"], axes=[-1], keepdims=1),
                   helper.make_node("Max", [f"mx{i}", f"c{i}_0"], [f"cl{i}"]),
                   helper.make_node("Div", [f"c{i}_1", f"cl{i}"], [f"s{i}"]),
                   helper.make_node("Mul", [x, f"s{i}"], [f"xs{i}"]),
                   helper.make_node("Round", [f"xs{i}"], [f"r{i}"]),
                   helper.make_node("Clip", [f"r{i}", f"c{i}_2", f"c{i}_1"], [f"q{i}"])]
            a = f"q{i}"
        fn.append(helper.make_node("MatMul", [a, f"w{i}"], [f"acc{i}"]))
        if act_quant:
            fn.append(helper.make_node("Div", [f"acc{i}", f"s{i}"], [f"d{i}"]))
        fn.append(helper.make_node("Mul", [f"d{i}" if act_quant else f"acc{i}", f"ws{i}"], [y]))
        bn, bi = parts["bitlinear"]
        bi += [numpy_helper.from_array(p, f"p{i}"), numpy_helper.from_array(ws, f"ws{i}")]
        bn.append(helper.make_node("BitLinear", [x, f"p{i}", f"ws{i}"], [y], domain=BITLINEAR_DOMAIN,
                                   name=f"BitLinear{i}", in_features=k, out_features=n, layout=layout))
        nn, ni = parts["matmulnbits"]
        block = nbits_block_size(k)
        blocks = -(-k // block)
        ni += [numpy_helper.from_array(nbits_pack(w, block), f"b{i}"),
               numpy_helper.from_array(np.full(n * blocks, ws[0], np.float32), f"sc{i}")]
        nn.append(helper.make_node("MatMulNBits", [x, f"b{i}", f"sc{i}"], [y], domain=NBITS_DOMAIN,
                                   K=k, N=n, bits=2, block_size=block, accuracy_level=4))
    models = {}
    for label, (nodes_, inits) in parts.items():
        graph = helper.make_graph(nodes_, f"projections_{label}", inputs, outputs, initializer=inits)
        opsets = [helper.make_opsetid("", 17)]
        if label == "bitlinear":
            opsets.append(helper.make_opsetid(BITLINEAR_DOMAIN, 1))
        if label == "matmulnbits":
            opsets.append(helper.make_opsetid(NBITS_DOMAIN, 1))
        models[label] = helper.make_model(graph, opset_imports=opsets)
    return layer, models


def interleaved_medians(runs: dict[str, Callable[[], Any]], repeats: int, rounds: int = 3,
                        check: Callable[[], None] | None = None) -> dict[str, float]:
    """Median milliseconds of each callable over `repeats` timed runs, taken in turns.

    The graphs take turns in `rounds` blocks (a a a, b b b, c c c, a a a, ...), so load from
    anything else on the machine falls evenly on all of them; a single callable has no turns
    to take and runs in one block. Each block starts after a pause and one untimed run: a
    session's ONNX Runtime workers keep spinning for a while after its last run, and on two
    cores that would be charged to the next graph (the BitLinear session's numba threads most
    of all). A callable whose first block's runs took LONG_RUN_S or more each skips the untimed
    run of its later blocks: the pause covers the workers' spin (milliseconds), and such a run
    streams its weights from memory whatever ran before (at 2B4T an untimed prefill run costs
    seconds). `check` runs before every timed run (the stage's cancel check: c, q or Ctrl-C in
    the app stop the timing within one run).
    """
    rounds = 1 if len(runs) == 1 else rounds
    block = -(-repeats // rounds)
    times: dict[str, list[float]] = {label: [] for label in runs}
    for r in range(rounds):
        for label, run in runs.items():
            time.sleep(SETTLE_S)
            if r == 0 or min(times[label]) < LONG_RUN_S:
                run()
            for _ in range(block):
                if check is not None:
                    check()
                t0 = time.perf_counter()
                run()
                times[label].append(time.perf_counter() - t0)
    return {label: statistics.median(t) * 1e3 for label, t in times.items()}
