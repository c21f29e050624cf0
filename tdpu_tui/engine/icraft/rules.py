"""Check an ONNX graph against Icraft's op-support table before Icraft sees it.

The graph is loaded without its external weights; only small constants (scalars, index and
axes tensors) are read. Every finding has a category:

- `unsupported`  — the table says `no` (Sin, Cos);
- `undocumented` — the op is absent from the table (Pow, Where, Cast, …);
- `custom`       — an op outside the default ONNX domain (needs an Icraft custom operator);
- `constraint`   — a documented limit that the graph violates (Div by a tensor, …);
- `dynamic`      — a graph input without a fixed shape (Icraft parses fixed shapes only);
- `advisory`     — worth a look but not known to fail (a `partial` op whose limits cannot be
  decided statically, a Constant node). Advisories never fail the stage.

The CSV mirrors Icraft's own `xx_precheck.csv` (`index,node_type,node_output,note`).
"""

from __future__ import annotations

import collections
import functools
import csv
import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from tdpu_tui.engine.osutil.files import atomic_write_text
from tdpu_tui.engine.icraft.optable import OpTable
from tdpu_tui.engine.core.errors import GraphError
from tdpu_tui.engine.graph.index import GraphIndex, attr

CATEGORIES = ("unsupported", "undocumented", "custom", "constraint", "dynamic", "advisory")
BLOCKING = frozenset(CATEGORIES) - {"advisory"}
# Small constants are read even when stored as external data; weights never are.
MAX_CONST_ELEMENTS = 4096
# Ops that carry no computation: the parser folds or drops them, but no table names them.
DATA_OPS = {"Constant": "constant data (folded by the parser)",
            "Identity": "pass-through (removable before parse)"}


@dataclass(frozen=True)
class Finding:
    index: int | str          # node index in the graph, "-" for a graph input
    node_type: str
    node_output: str
    note: str
    category: str
    node_name: str = ""

    @property
    def blocking(self) -> bool:
        return self.category in BLOCKING


@dataclass
class PrecheckReport:
    model: str
    table: str
    node_count: int
    op_counts: dict[str, int]
    findings: list[Finding] = field(default_factory=list)

    @property
    def counts(self) -> dict[str, int]:
        c = collections.Counter(f.category for f in self.findings)
        return {k: c.get(k, 0) for k in CATEGORIES}

    @property
    def blocking(self) -> list[Finding]:
        return [f for f in self.findings if f.blocking]

    def by_op(self, blocking_only: bool = False) -> dict[tuple[str, str], int]:
        """(node_type, category) -> number of findings."""
        c = collections.Counter((f.node_type, f.category) for f in self.findings
                                if f.blocking or not blocking_only)
        return dict(sorted(c.items(), key=lambda kv: (-kv[1], kv[0])))


class _Graph(GraphIndex):
    """The graph index, with what the op checks ask: constant values and inferred shapes."""

    def __init__(self, model: onnx.ModelProto, base_dir: Path):
        super().__init__(model, base_dir)
        self.shapes = _infer_shapes(model)

    def is_const(self, name: str) -> bool:
        return name in self.inits or name in self.constants_any

    @functools.cached_property
    def constants_any(self) -> dict[str, onnx.NodeProto]:
        """Constant nodes by output, whatever attribute holds their value."""
        return {n.output[0]: n for n in self.graph.node
                if n.op_type == "Constant" and n.domain in ("", "ai.onnx") and n.output}

    def const_size(self, name: str) -> int | None:
        if name in self.inits:
            return int(np.prod(self.inits[name].dims, dtype=np.int64))
        value = self.const_value(name)
        return None if value is None else int(value.size)

    def const_value(self, name: str) -> np.ndarray | None:
        if name in self.inits:
            if int(np.prod(self.inits[name].dims, dtype=np.int64)) > MAX_CONST_ELEMENTS:
                return None
            # tdpu's reader (confined to the graph's folder; a hard-linked data file, as the
            # hand-off bundle makes, is fine): a value it cannot read is not constant here.
            try:
                return np.array(self.array(name))
            except GraphError:
                return None
        node = self.constants_any.get(name)
        if node is None:
            return None
        for a in node.attribute:
            if a.name == "value":
                return numpy_helper.to_array(a.t)
            if a.name in ("value_float", "value_int"):
                return np.asarray(onnx.helper.get_attribute_value(a))
            if a.name in ("value_floats", "value_ints"):
                return np.asarray(list(onnx.helper.get_attribute_value(a)))
        return None

    def rank(self, name: str) -> int | None:
        shape = self.shape(name)
        return None if shape is None else len(shape)

    def shape(self, name: str) -> list[int | str | None] | None:
        if name in self.inits:
            return list(self.inits[name].dims)
        return self.shapes.get(name)


def _dims(type_proto: onnx.TypeProto) -> list[int | str | None] | None:
    if not type_proto.HasField("tensor_type") or not type_proto.tensor_type.HasField("shape"):
        return None
    out: list[int | str | None] = []
    for d in type_proto.tensor_type.shape.dim:
        if d.HasField("dim_value"):
            out.append(d.dim_value)
        elif d.HasField("dim_param"):
            out.append(d.dim_param)
        else:
            out.append(None)
    return out


def _infer_shapes(model: onnx.ModelProto) -> dict[str, list[int | str | None]]:
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:  # a graph shape inference cannot follow still gets the op checks
        inferred = model
    shapes: dict[str, list[int | str | None]] = {}
    g = inferred.graph
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        dims = _dims(vi.type)
        if dims is not None:
            shapes[vi.name] = dims
    return shapes


def _input(node: onnx.NodeProto, i: int) -> str:
    return node.input[i] if len(node.input) > i else ""


# --- documented constraints, one function per op; each returns notes of violations ---------

def _check_div(node, g: _Graph) -> list[str]:
    divisor = _input(node, 1)
    if not g.is_const(divisor):
        return [f"divisor '{divisor}' is a tensor; Icraft maps Div to DivideScalar, which needs "
                "a constant scalar divisor"]
    size = g.const_size(divisor)
    if size is not None and size != 1:
        return [f"divisor '{divisor}' is a constant of {size} elements; Icraft's DivideScalar "
                "needs a scalar"]
    return []


def _check_gather(node, g: _Graph) -> list[str]:
    indices = _input(node, 1)
    if not g.is_const(indices):
        return [f"indices '{indices}' are not constant (an embedding lookup?); Icraft parses "
                "Gather only as a single-index select (indices.size() >= 2 not supported)"]
    size = g.const_size(indices)
    if size is not None and size > 1:
        return [f"indices '{indices}' hold {size} values; Icraft parses Gather only as a "
                "single-index select (indices.size() >= 2 not supported)"]
    return []


def _check_clip(node, g: _Graph) -> list[str]:
    out = []
    for i, what in ((1, "min"), (2, "max")):
        name = _input(node, i)
        if name and not g.is_const(name):
            out.append(f"{what} '{name}' is a tensor; Icraft needs constant Clip bounds")
    return out


def _check_slice(node, g: _Graph) -> list[str]:
    out = []
    for i, what in ((1, "starts"), (2, "ends"), (3, "axes"), (4, "steps")):
        name = _input(node, i)
        if name and not g.is_const(name):
            out.append(f"{what} '{name}' is not constant; Icraft needs fixed Slice parameters")
    steps = _input(node, 4)
    if steps and g.is_const(steps):
        value = g.const_value(steps)
        if value is not None and (np.asarray(value) < 0).any():
            out.append(f"negative step {np.asarray(value).tolist()}; Icraft's Slice does not "
                       "support negative steps")
    return out


def _check_squeeze(node, g: _Graph) -> list[str]:
    axes_name = _input(node, 1)
    axes = attr(node, "axes")
    if axes_name:
        if not g.is_const(axes_name):
            return [f"axes '{axes_name}' are not constant; Icraft needs fixed Squeeze axes"]
        value = g.const_value(axes_name)
        axes = None if value is None else np.asarray(value).ravel().tolist()
    if axes is None or len(axes) == 0:
        shape = g.shape(_input(node, 0))
        if shape is None:
            return ["Squeeze without axes on a tensor of unknown shape; Icraft squeezes one "
                    "dim at most (dims.size() > 1 not supported)"]
        ones = [i for i, d in enumerate(shape) if d == 1]
        if len(ones) > 1:
            return [f"Squeeze without axes removes {len(ones)} dims {ones}; Icraft squeezes one "
                    "dim at most (dims.size() > 1 not supported)"]
        return []
    if len(axes) > 1:
        return [f"squeezes {len(axes)} axes {list(axes)}; Icraft squeezes one dim at most "
                "(dims.size() > 1 not supported)"]
    return []


def _check_pad(node, g: _Graph) -> list[str]:
    out = []
    rank = g.rank(_input(node, 0))
    if rank is None:
        out.append("input rank unknown; Icraft pads only 4-D or 5-D inputs")
    elif rank not in (4, 5):
        out.append(f"input is {rank}-D; Icraft pads only 4-D or 5-D inputs")
    pads_name = _input(node, 1)
    pads = attr(node, "pads")
    if pads_name:
        if not g.is_const(pads_name):
            return out + [f"pads '{pads_name}' are not constant; Icraft needs fixed padding"]
        value = g.const_value(pads_name)
        pads = None if value is None else np.asarray(value).ravel().tolist()
    axes_name = _input(node, 3)
    if pads and rank and not axes_name and len(pads) == 2 * rank:
        nc = [pads[0], pads[1], pads[rank], pads[rank + 1]]
        if any(nc):
            out.append(f"pads {pads} pad the N or C dim; Icraft does not pad N or C")
    return out


def _check_binary_consts(node, g: _Graph) -> list[str]:
    names = [n for n in node.input[:2] if n]
    if len(names) == 2 and all(g.is_const(n) for n in names):
        return [f"both inputs are constants; Icraft needs at least one feature-map input "
                f"(fold '{node.output[0]}' before export)"]
    return []


def _check_expand(node, g: _Graph) -> list[str]:
    shape = _input(node, 1)
    if shape and not g.is_const(shape):
        return [f"target shape '{shape}' is not constant; Icraft needs fixed shapes"]
    return []


def _check_pool_rank(node, g: _Graph) -> list[str]:
    rank = g.rank(_input(node, 0))
    if rank == 2:
        return ["rank-2 input; Icraft's pooling does not take 2-D input"]
    return []


def _check_reducemax(node, g: _Graph) -> list[str]:
    # Icraft lowers ReduceMax to MaxPool, so MaxPool's input limit applies.
    rank = g.rank(_input(node, 0))
    if rank is not None and rank <= 2:
        return [f"{rank}-D input; Icraft lowers ReduceMax to MaxPool, which does not take "
                "rank-2 input"]
    return []


def _check_maxpool(node, g: _Graph) -> list[str]:
    out = _check_pool_rank(node, g)
    if len(node.output) > 1 and node.output[1]:
        out.append("second output (Indices) used; Icraft's MaxPool has no return_indices")
    return out


CHECKS = {
    "Div": _check_div,
    "Gather": _check_gather,
    "Clip": _check_clip,
    "Slice": _check_slice,
    "Squeeze": _check_squeeze,
    "Pad": _check_pad,
    "MatMul": _check_binary_consts,
    "Gemm": _check_binary_consts,
    "Add": _check_binary_consts,
    "Sub": _check_binary_consts,
    "Mul": _check_binary_consts,
    "Expand": _check_expand,
    "AveragePool": _check_pool_rank,
    "MaxPool": _check_maxpool,
    "ReduceMax": _check_reducemax,
}

# `partial` ops whose limits a static check cannot decide: noted as advisories.
ADVISORIES = {
    "ReduceMax": "partial: Icraft lowers ReduceMax to MaxPool; check the result after parse",
    "Expand": "partial: documented only for torch expand/expand_as; check the result after parse",
    "Conv": "partial: zero padding only; the manuals disagree about 5-D input",
    "ConvTranspose": "partial: group must be 1, zero padding only",
    "Resize": "partial: scale factors with a prime factor > 22 are not supported",
    "AveragePool": "partial: count_include_pad is forced to 1; 3-D pooling without padding",
}


def _check_inputs(g: _Graph) -> list[Finding]:
    findings = []
    for vi in g.graph.input:
        if vi.name in g.inits:
            continue
        dims = _dims(vi.type)
        if dims is None:
            findings.append(Finding("-", "Input", vi.name, "dynamic: input has no shape; "
                                    "Icraft needs a fixed input shape (--inputs)", "dynamic"))
            continue
        loose = [f"{i}:{d if d is not None else '?'}" for i, d in enumerate(dims)
                 if not isinstance(d, int) or d <= 0]
        if loose:
            findings.append(Finding(
                "-", "Input", vi.name,
                f"dynamic: dims {', '.join(loose)} of shape {dims} are not fixed; Icraft parses "
                "fixed shapes only (export with [export] profile = \"icraft\")", "dynamic"))
    return findings


def load_graph(path: str | Path) -> onnx.ModelProto:
    """The graph without its external weights."""
    return onnx.load(str(path), load_external_data=False)


def precheck_model(model: onnx.ModelProto | str | Path, table: OpTable,
                   base_dir: str | Path | None = None) -> PrecheckReport:
    if isinstance(model, (str, Path)):
        origin = str(model)
        base_dir = Path(model).parent if base_dir is None else base_dir
        model = load_graph(model)
    else:
        origin = model.graph.name or "<model>"
    g = _Graph(model, Path(base_dir or "."))
    op_counts = collections.Counter(n.op_type for n in g.graph.node)
    findings = _check_inputs(g)
    for index, node in enumerate(g.graph.node):
        out = node.output[0] if node.output else ""
        op = node.op_type

        def add(note: str, category: str, _i=index, _n=node, _o=out, _op=op) -> None:
            findings.append(Finding(_i, _op, _o, note, category, _n.name))

        if node.domain not in ("", "ai.onnx"):
            add(f"custom: {node.domain}::{op} is not an ONNX op; Icraft needs a custom operator "
                "for it (parse + backends, see customop.md)", "custom")
            continue
        if op in DATA_OPS:
            add(f"advisory: not in Icraft's op table; {DATA_OPS[op]}", "advisory")
            continue
        row = table.get(op)
        if row is None:
            add(f"undocumented: {op} is not in Icraft's ONNX op table; nothing documents that "
                "Icraft parses it", "undocumented")
            continue
        if row.supported == "no":
            add(f"unsupported: Icraft does not support {op} ({row.constraints})", "unsupported")
            continue
        violations = CHECKS[op](node, g) if op in CHECKS else []
        for v in violations:
            add(f"constraint: {v}", "constraint")
        if not violations and row.supported == "partial" and op in ADVISORIES:
            add(f"advisory: {ADVISORIES[op]}", "advisory")
    return PrecheckReport(origin, table.origin, len(g.graph.node), dict(op_counts), findings)


def precheck_csv(report: PrecheckReport) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["index", "node_type", "node_output", "note"])
    for f in report.findings:
        w.writerow([f.index, f.node_type, f.node_output, f.note])
    return buf.getvalue()


def write_precheck_csv(path: str | Path, report: PrecheckReport) -> None:
    atomic_write_text(path, precheck_csv(report))


def summary_markdown(report: PrecheckReport, csv_path: Path | None = None,
                     max_rows: int = 25) -> str:
    counts = report.counts
    lines = [
        f"- graph: `{report.model}` ({report.node_count} nodes, "
        f"{len(report.op_counts)} op types)",
        f"- op table: `{report.table}`",
        "- findings: " + ", ".join(f"{k} {v}" for k, v in counts.items())
        + f" (blocking {len(report.blocking)})",
    ]
    if csv_path is not None:
        lines.append(f"- full list: `{csv_path}`")
    groups = report.by_op()
    if groups:
        lines += ["", "| op | category | nodes | example |", "|---|---|---|---|"]
        example = {}
        for f in report.findings:
            example.setdefault((f.node_type, f.category), f)
        for (op, cat), n in list(groups.items())[:max_rows]:
            f = example[(op, cat)]
            note = f.note.replace("|", "\\|")
            where = f.node_name or f.node_output
            lines.append(f"| {op} | {cat} | {n} | `{where}`: {note} |")
        if len(groups) > max_rows:
            lines.append(f"| … | | | {len(groups) - max_rows} more groups in the CSV |")
    return "\n".join(lines)
