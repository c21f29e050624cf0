"""`[replace].lm_head = "bf16"`: the (tied) lm_head at the checkpoint's bfloat16 precision.

The lm_head is never ternary, so BitLinear does not apply to it; exported as float32 it is
the largest weight of the graph (128256 × 2560: 1.31 GB) and, at a few layers, most of a
single-token step. BitNet b1.58 2B4T stores it (the embedding table, tied) in bf16, so it can
be held in bf16 without changing a single value:

pattern      the node `[replace]` keeps whose module is `lm_head`: `MatMul(x, W[K, N])`,
             `MatMul(x, Transpose(W[N, K]))` or `Gemm(x, W, transB)` without bias, alpha = 1.
check        every weight value is exactly a bfloat16 (else the error names the node and the
             first value that would be rounded).
replacement  `ai.tdpu::LinearBF16(x, W_bf16[N, K])` with the same output; a `Gather` of the
             same (tied) table becomes `Cast(Gather(W_bf16, ids), FLOAT)`, so the table is
             stored once, in bf16, under its own name. When anything else still reads the
             float table, it stays and the bf16 copy is named `<weight>.bf16`.

Arithmetic stays float32 (`kernels.bf16`): logits differ from the float graph only by the
order of float32 sums.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper

from kernels.bf16 import Bf16Error, bf16_bits
from tdpu_tui.engine.inventory import BITLINEAR_DOMAIN, GraphIndex, InventoryError, _attr

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

    @property
    def bytes_after(self) -> int:
        return self.n * self.k * 2

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
    """Match and check `node` (the lm_head); raise InventoryError naming it when it does not fit."""
    where = f"lm_head node {node.name!r}"
    if node.op_type == "Gemm":
        if len(node.input) > 2 and node.input[2]:
            raise InventoryError(f"{where}: Gemm with a bias; [replace].lm_head = \"bf16\" takes "
                                 "x·Wᵀ only")
        if _attr(node, "transA", 0) or abs(float(_attr(node, "alpha", 1.0)) - 1.0) > 1e-12:
            raise InventoryError(f"{where}: Gemm with transA or alpha ≠ 1")
    a, b = node.input[0], node.input[1]
    absorbed: list[onnx.NodeProto] = []
    if b in g.inits:
        weight = b
        nk = node.op_type == "Gemm" and bool(_attr(node, "transB", 0))
    elif ((p := g.producer.get(b)) is not None and p.op_type == "Transpose" and p.input[0] in g.inits
          and node.op_type == "MatMul" and list(_attr(p, "perm", [1, 0])) == [1, 0]
          and g.sole_consumer(b) is node):
        weight, nk = p.input[0], True
        absorbed.append(p)
    else:
        raise InventoryError(f"{where}: its weight {b!r} is not a constant initializer "
                             "(or a transposed one)")
    t = g.inits[weight]
    if len(t.dims) != 2 or t.data_type not in (TensorProto.FLOAT, TensorProto.BFLOAT16):
        raise InventoryError(f"{where}: weight {weight!r} is "
                             f"{helper.tensor_dtype_to_string(t.data_type)} {list(t.dims)}, "
                             "expected a 2-D float32 matrix")
    n, k = (int(t.dims[0]), int(t.dims[1])) if nk else (int(t.dims[1]), int(t.dims[0]))
    own = {id(node)} | {id(x) for x in absorbed}
    others = [c for c in g.consumers.get(weight, []) if id(c) not in own]
    gathers = [c for c in others if c.op_type == "Gather" and c.domain in ("", "ai.onnx")
               and c.input[0] == weight and int(_attr(c, "axis", 0)) == 0 and nk]
    rest = [c for c in others if c not in gathers]
    new_weight = weight if not rest and weight not in g.graph_outputs else _free(f"{weight}.bf16", taken)
    taken.add(new_weight)
    plan = Bf16Plan(node, helper.make_node(OP_TYPE, [a, new_weight], [node.output[0]],
                                           name=linear_bf16_name(node.name), domain=BITLINEAR_DOMAIN,
                                           doc_string=f"replaces {node.name}", in_features=k,
                                           out_features=n),
                    weight, new_weight, n, k, nk, absorbed,
                    bytes_before=n * k * helper.tensor_dtype_to_np_dtype(t.data_type).itemsize)
    for gather in gathers:
        mid = _free(f"{gather.output[0]}/bf16", taken)
        taken.add(mid)
        new_gather = onnx.NodeProto()
        new_gather.CopyFrom(gather)
        new_gather.input[0] = new_weight
        new_gather.output[0] = mid
        cast_name = (gather.name.rsplit("/", 1)[0] + "/Cast") if "/" in gather.name else f"{gather.name}/Cast"
        cast = helper.make_node("Cast", [mid], [gather.output[0]], name=cast_name, to=TensorProto.FLOAT)
        plan.gathers[id(gather)] = [new_gather, cast]
    return plan


def _free(preferred: str, taken: set[str]) -> str:
    name, i = preferred, 2
    while name in taken:
        name, i = f"{preferred}{i}", i + 1
    return name


def bf16_source(g: GraphIndex, plan: Bf16Plan) -> Callable[[], np.ndarray]:
    """The bf16 bit patterns [N, K] of the plan's weight, converted a block of rows at a time
    (a 1.31 GB float table never sits in memory twice)."""
    def make() -> np.ndarray:
        w = g.array(plan.weight)
        t = g.inits[plan.weight]
        if t.data_type == TensorProto.BFLOAT16:
            bits = np.asarray(w).view(np.uint16)
            return np.ascontiguousarray(bits if plan.nk else bits.T)
        out = np.empty((plan.n, plan.k), np.uint16)
        where = f"lm_head node {plan.node.name!r}: weight {plan.weight!r}"
        try:
            if plan.nk:
                for r in range(0, plan.n, ROWS_PER_CHUNK):
                    out[r:r + ROWS_PER_CHUNK] = bf16_bits(w[r:r + ROWS_PER_CHUNK], where)
            else:  # stored [K, N]: convert row blocks of W, transposed into place
                step = max(1, ROWS_PER_CHUNK * plan.k // max(plan.n, 1))
                for r in range(0, plan.k, step):
                    out[:, r:r + step] = bf16_bits(w[r:r + step], where).T
        except Bf16Error as exc:
            raise InventoryError(f"{exc}; keep [replace].lm_head = \"float\" for this graph") from None
        return out
    return make

