"""Every MatMul/Gemm of an exported graph: what it computes, and whether it can become BitLinear.

The app's node browser, `tdpu --batch --stage replace` and the replacement pass read the graph
through this module. The graph is loaded without its external data; each weight is read from
the `.onnx.data` file on demand through a memory map and scanned in chunks, so listing a
2B-parameter graph never holds more than one chunk of one weight in memory.

Patterns recognised around a node `M = MatMul(A, B)` (CONTRACTS.md "Export"):

- weight `B`: an initializer `[K, N]`; or `Transpose(perm=[1, 0])` of an initializer `[N, K]`;
  or, for `Gemm(A, B, transB=1)`, an initializer `[N, K]`.
- activation `A`: the reference profile's in-graph quantization
  `s = Div(127, Max(ReduceMax(Abs(x)), 1e-5))`, `A = Clip(Round(Mul(x, s)), -128, 127)`, with
  `M` followed by `Div(., s)`; or any float tensor (icraft profile).
- rescale: one `Mul` (or `Div`) by a constant scalar after `M` (after the `Div(., s)` when
  activations are quantized) is folded into the weight scale.
- values: the weight holds {-s, 0, +s}; s = 1 with a folded `Mul(., weight_scale)` is the
  exporter's form.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx

from tdpu_tui.engine.graph.index import GraphIndex, attr
from tdpu_tui.engine.rewrite.patterns import NoMatch, PERMUTATION, Projection, _is_signed_permutation, classify_values, match_projection
from tdpu_tui.engine.core.errors import GraphError
from tdpu_tui.engine.rewrite.patterns import TERNARY

ALREADY = "already BitLinear"
BITLINEAR_DOMAIN = "ai.tdpu"


@dataclass
class MatMulNode:
    name: str
    op_type: str
    layer: int | None
    projection: str | None
    k: int | None
    n: int | None
    weight: str | None
    status: str
    zeros: float | None = None      # share of zero weights (ternary nodes)
    scale: float | None = None      # effective weight scale (multiply convention)
    module: str | None = None       # checkpoint module path, e.g. model.layers.0.self_attn.q_proj
    act_quant: bool = False         # the reference profile's in-graph activation quantization
    layout: str | None = None       # only for nodes that already are BitLinear

    @property
    def ternary(self) -> bool:
        return self.status == TERNARY

    def as_json(self) -> dict:
        return asdict(self)


def bitlinear_attrs(node: onnx.NodeProto) -> tuple[int, int, str]:
    """(in_features K, out_features N, layout) of a BitLinear node; layout defaults to tdpu."""
    k, n = attr(node, "in_features"), attr(node, "out_features")
    if k is None or n is None:
        raise GraphError(f"BitLinear node {node.name!r}: missing in_features or out_features")
    return int(k), int(n), attr(node, "layout", "tdpu")


def _parse_module(node_name: str, weight: str | None) -> tuple[int | None, str | None, str | None]:
    if weight and weight.endswith(".weight") and ".layers." in weight:
        module = weight[: -len(".weight")]
    else:
        parts = [p for p in node_name.split("/") if p]
        module = ".".join(parts[:-1]) if len(parts) > 1 else None
    text = f"{node_name} {weight or ''}"
    layer = re.search(r"layers\.(\d+)", text)
    proj = re.search(r"\b(\w+_proj|lm_head)\b", text.replace("/", " ").replace(".", " "))
    return (int(layer.group(1)) if layer else None, proj.group(1) if proj else None, module)


def _bitlinear_entry(g: GraphIndex, node: onnx.NodeProto) -> MatMulNode:
    weight = node.input[1] if len(node.input) > 1 else None
    scale = g.scalar(node.input[2]) if len(node.input) > 2 else None
    layer, proj, module = _parse_module(node.name, weight)
    zeros = None
    if weight in g.inits:
        from kernels.packing import codes_of
        codes = codes_of(np.asarray(g.array(weight)))
        zeros = float((codes == 1).mean())
    return MatMulNode(node.name, node.op_type, layer, proj, attr(node, "in_features"),
                      attr(node, "out_features"), weight, ALREADY, zeros, scale, module,
                      layout=attr(node, "layout", "tdpu"))


def free_name(preferred: str, taken: set[str], suffix: str = "") -> str:
    """`preferred`, else `preferred + suffix`, `preferred + suffix + "2"`, … : the first name not
    in `taken` (for tensors a graph rewrite adds)."""
    name, i = preferred, 1
    while name in taken:
        name, i = f"{preferred}{suffix}{'' if i == 1 else i}", i + 1
    return name


def candidate_nodes(g: GraphIndex) -> Iterator[onnx.NodeProto]:
    """The nodes `iter_nodes` reports, in the same order: MatMul, Gemm and BitLinear."""
    for node in g.graph.node:
        if node.op_type == "BitLinear" and node.domain == BITLINEAR_DOMAIN:
            yield node
        elif node.op_type in ("MatMul", "Gemm") and node.domain in ("", "ai.onnx"):
            yield node


def iter_nodes(g: GraphIndex) -> Iterator[tuple[MatMulNode, Projection | None]]:
    """Every MatMul/Gemm/BitLinear in graph order with its match (None when not replaceable)."""
    for node in candidate_nodes(g):
        if node.op_type == "BitLinear":
            yield _bitlinear_entry(g, node), None
            continue
        try:
            proj = match_projection(g, node)
        except NoMatch as why:
            weight = node.input[1] if node.input[1] in g.inits else None
            layer, pname, module = _parse_module(node.name, weight)
            status = PERMUTATION if _is_signed_permutation(g, weight) else str(why)
            yield MatMulNode(node.name, node.op_type, layer, pname, None, None, weight, status,
                             module=module), None
            continue
        t = g.inits[proj.weight]
        n, k = (t.dims[0], t.dims[1]) if proj.weight_nk else (t.dims[1], t.dims[0])
        status, zeros, s = classify_values(g.array(proj.weight))
        if status == TERNARY and zeros == 1 - 1 / n and _is_signed_permutation(g, proj.weight):
            status = PERMUTATION
        if status == TERNARY and n % 4:
            status = f"N = {n} is not a multiple of 4 (packing needs four rows per byte)"
        layer, pname, module = _parse_module(node.name, proj.weight)
        scale = s * proj.folded_scale if s is not None else None
        entry = MatMulNode(node.name, node.op_type, layer, pname, int(k), int(n), proj.weight, status,
                           zeros, scale, module, proj.act_quant)
        yield entry, (proj if status == TERNARY else None)


_CACHE: dict[tuple, list[MatMulNode]] = {}


def _stamp(path: Path) -> tuple:
    files = [path, path.with_name(path.name + ".data")]
    return tuple((str(f.resolve()), f.stat().st_mtime_ns, f.stat().st_size) for f in files if f.exists())


def inventory(model_path: str | Path) -> list[MatMulNode]:
    """Every MatMul/Gemm (and BitLinear) node of the graph, with its replaceability.

    Scanning the weights of a 2B graph reads gigabytes, so the answer is remembered for as
    long as the graph and its data file are unchanged (size and modification time).
    """
    path = Path(model_path)
    try:
        key = _stamp(path)
    except OSError:
        key = None
    if key and key in _CACHE:
        return [dataclasses.replace(n) for n in _CACHE[key]]
    nodes = [entry for entry, _ in iter_nodes(GraphIndex.load(path))]
    if key:
        _CACHE.clear()
        _CACHE[key] = nodes
    return [dataclasses.replace(n) for n in nodes]


# Selection -------------------------------------------------------------------------------


