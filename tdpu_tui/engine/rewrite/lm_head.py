"""`[replace].lm_head = "bf16"`: the (tied) lm_head at the checkpoint's bfloat16 precision.

The lm_head is never ternary, so BitLinear does not apply to it; exported as float32 it is
the largest weight of the graph (128256 × 2560: 1.31 GB) and, at a few layers, most of a
single-token step. BitNet b1.58 2B4T stores it (the embedding table, tied) in bf16, so it can
be held in bf16 without changing a single value:

pattern      the node `[replace]` keeps whose module is `lm_head`: `MatMul(x, W[K, N])`,
             `MatMul(x, Transpose(W[N, K]))` or `Gemm(x, W, transB)` without bias, alpha = 1.
check        a float32 weight whose every value is exactly a bfloat16 (else the error names
             the graph, the node, the count and the first value that would be rounded; it is
             raised while the output is staged, so nothing is left half-written). One lm_head,
             whose weight is not also a graph input (a value fed at run time).
replacement  `ai.tdpu::LinearBF16(x, W_bf16[N, K])` with the same output; a `Gather` of the
             same (tied) table becomes `Cast(Gather(W_bf16, ids), FLOAT)`, so the table is
             stored once, in bf16, under its own name. When anything else still reads the
             float table (another node, or it is a graph output), it stays and the bf16
             copy is named `<weight>.bf16` (the report says so and counts both).

Arithmetic stays float32 (`kernels.bf16`): logits differ from the float graph only by the
order of float32 sums.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper

from tdpu_tui.engine.rewrite.inventory import BITLINEAR_DOMAIN, free_name
from tdpu_tui.engine.graph.index import attr
from tdpu_tui.engine.graph.index import GraphIndex
from tdpu_tui.engine.core.errors import GraphError

OP_TYPE = "LinearBF16"
ROWS_PER_CHUNK = 4096


@dataclass
class Bf16Plan:
    node: onnx.NodeProto                     # the lm_head MatMul/Gemm
    new_node: onnx.NodeProto                 # LinearBF16 in its place
    weight: str                              # the float initializer read
    new_weight: str                          # the bf16 initializer written
    n: int
    k: int
    nk: bool                                 # W stored [N, K] (else [K, N])
    absorbed: list[onnx.NodeProto] = field(default_factory=list)          # a Transpose of W
    gathers: dict[int, list[onnx.NodeProto]] = field(default_factory=dict)  # id(Gather) -> [Gather, Cast]
    bytes_before: int = 0
    float_kept_for: list[str] = field(default_factory=list)   # why the float table stays too

    @property
    def bytes_after(self) -> int:
        """Bytes of the lm_head's weights in the replaced graph (both tables when the float stays)."""
        return self.n * self.k * 2 + (self.bytes_before if self.float_kept_for else 0)

    def replacements(self) -> dict[int, list[onnx.NodeProto]]:
        out = {id(self.node): [self.new_node], **self.gathers}
        out.update({id(n): [] for n in self.absorbed})
        return out

    def placeholder(self) -> onnx.TensorProto:
        t = onnx.TensorProto()
        t.name, t.data_type = self.new_weight, TensorProto.BFLOAT16
        t.dims.extend([self.n, self.k])
        t.doc_string = f"{self.weight} as bfloat16 [out, in] (exact: the checkpoint's bf16 values)"
        return t


def linear_bf16_name(node_name: str) -> str:
    for suffix in ("/MatMul", "/Gemm"):
        if node_name.endswith(suffix):
            return node_name[: -len(suffix)] + "/" + OP_TYPE
    return f"{node_name}/{OP_TYPE}"


def plan_bf16(g: GraphIndex, node: onnx.NodeProto, taken: set[str]) -> Bf16Plan:
    """Match and check `node` (the lm_head); raise GraphError naming it when it does not fit."""
    where = f"lm_head node {node.name!r}"
    if node.op_type == "Gemm":
        if len(node.input) > 2 and node.input[2]:
            raise GraphError(f"{where}: Gemm with a bias; [replace].lm_head = \"bf16\" takes "
                                 "x·Wᵀ only")
        if attr(node, "transA", 0) or abs(float(attr(node, "alpha", 1.0)) - 1.0) > 1e-12:
            raise GraphError(f"{where}: Gemm with transA or alpha ≠ 1")
    a, b = node.input[0], node.input[1]
    absorbed: list[onnx.NodeProto] = []
    if b in g.inits:
        weight = b
        nk = node.op_type == "Gemm" and bool(attr(node, "transB", 0))
    elif ((p := g.producer.get(b)) is not None and p.op_type == "Transpose" and p.input[0] in g.inits
          and node.op_type == "MatMul" and list(attr(p, "perm", [1, 0])) == [1, 0]
          and g.sole_consumer(b) is node):
        weight, nk = p.input[0], True
        absorbed.append(p)
    else:
        raise GraphError(f"{where}: its weight {b!r} is not a constant initializer "
                             "(or a transposed one)")
    t = g.inits[weight]
    if len(t.dims) != 2 or t.data_type != TensorProto.FLOAT:
        raise GraphError(f"{where}: weight {weight!r} is "
                             f"{helper.tensor_dtype_to_string(t.data_type)} {list(t.dims)}, "
                             "expected a 2-D float32 matrix")
    n, k = (int(t.dims[0]), int(t.dims[1])) if nk else (int(t.dims[1]), int(t.dims[0]))
    own = {id(node)} | {id(x) for x in absorbed}
    others = [c for c in g.consumers.get(weight, []) if id(c) not in own]
    gathers = [c for c in others if c.op_type == "Gather" and c.domain in ("", "ai.onnx")
               and c.input[0] == weight and int(attr(c, "axis", 0)) == 0 and nk]
    if weight in {v.name for v in g.graph.input}:
        raise GraphError(f"{where}: its weight {weight!r} is also a graph input (a value that can "
                             "be fed at run time); held in bf16 it would ignore what is fed: keep "
                             "[replace].lm_head = \"float\" for this graph")
    rest = [c for c in others if c not in gathers]
    keeps_float = [f"node {c.name or c.op_type!r}" for c in rest]
    if weight in g.graph_outputs:
        keeps_float.append("the graph output of the same name")
    new_weight = free_name(f"{weight}.bf16", taken) if keeps_float else weight
    taken.add(new_weight)
    plan = Bf16Plan(node, helper.make_node(OP_TYPE, [a, new_weight], [node.output[0]],
                                           name=linear_bf16_name(node.name), domain=BITLINEAR_DOMAIN,
                                           doc_string=f"replaces {node.name}", in_features=k,
                                           out_features=n),
                    weight, new_weight, n, k, nk, absorbed, bytes_before=n * k * 4,
                    float_kept_for=keeps_float)
    for gather in gathers:
        mid = free_name(f"{gather.output[0]}/bf16", taken)
        taken.add(mid)
        new_gather = onnx.NodeProto()
        new_gather.CopyFrom(gather)
        new_gather.input[0] = new_weight
        new_gather.output[0] = mid
        cast_name = (gather.name.rsplit("/", 1)[0] + "/Cast") if "/" in gather.name else f"{gather.name}/Cast"
        cast = helper.make_node("Cast", [mid], [gather.output[0]], name=cast_name, to=TensorProto.FLOAT)
        plan.gathers[id(gather)] = [new_gather, cast]
    return plan


def bf16_source(g: GraphIndex, plan: Bf16Plan, graph_file: str) -> Callable[[], np.ndarray]:
    """The bf16 bit patterns [N, K] of the plan's float32 weight, converted a block of rows at a
    time (a 1.31 GB float table never sits in memory twice). Values that are not exactly
    bfloat16 raise GraphError naming the graph, the node, how many there are and the first."""
    def make() -> np.ndarray:
        from kernels.bf16 import split_bf16  # numba: imported when a table is converted, not at start-up

        w = g.array(plan.weight)
        out = np.empty((plan.n, plan.k), np.uint16)
        rows = w.shape[0]
        step = ROWS_PER_CHUNK if plan.nk else max(1, ROWS_PER_CHUNK * plan.k // max(plan.n, 1))
        bad, first = 0, None
        for r in range(0, rows, step):
            block = w[r:r + step]
            bits, count, at = split_bf16(block)
            if count and first is None:
                first = (r + at[0], at[1], float(block[at]))
            bad += count
            if plan.nk:
                out[r:r + step] = bits
            else:  # stored [K, N]: row blocks of W land transposed
                out[:, r:r + step] = bits.T
        if bad:
            i, j, value = first
            raise GraphError(
                f"{graph_file}: lm_head node {plan.node.name!r}: {bad} of {w.size} values of "
                f"{plan.weight!r} are not bfloat16 values (the first, {value!r} at [{i}, {j}], has "
                "mantissa bits below bfloat16's); holding them as bf16 would round them: keep "
                "[replace].lm_head = \"float\" for this graph")
        return out
    return make
