"""MatMul -> BitLinear, as pattern -> check -> replacement (docs/spec.md §5)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from kernels.packing import pack
from tdpu_tui.engine.core.errors import GraphError, TdpuError
from tdpu_tui.engine.core.manifests import ExportMeta, ReplaceReport, export_identity
from tdpu_tui.engine.core.config import LM_HEAD_MODES, ReplaceConfig
from tdpu_tui.engine.graph.external import placeholder_tensor, save_streamed, tensor_bytes
from tdpu_tui.engine.graph.index import GraphIndex
from tdpu_tui.engine.osutil.files import commit_files, human_bytes, staging_dir
from tdpu_tui.engine.rewrite.inventory import ALREADY, BITLINEAR_DOMAIN, candidate_nodes, free_name, iter_nodes
from tdpu_tui.engine.rewrite.lm_head import bf16_source, plan_bf16
from tdpu_tui.engine.rewrite.patterns import Projection
from tdpu_tui.engine.rewrite.selection import resolve_selection, selection_reason


@dataclass
class Decision:
    name: str
    op_type: str
    action: str                      # "replaced" | "kept" | "bf16" (lm_head, [replace].lm_head)
    reason: str
    layer: int | None = None
    projection: str | None = None
    k: int | None = None
    n: int | None = None
    weight: str | None = None
    status: str = ""
    zeros: float | None = None
    scale: float | None = None
    act_quant: bool = False
    bitlinear: str | None = None     # name of the emitted BitLinear (or LinearBF16) node
    bytes_before: int = 0            # projection weight bytes (weight + scale) before / after
    bytes_after: int = 0
    weight_nk: bool | None = None    # weight stored [N, K] (else [K, N]); set for bf16 lm_heads



@dataclass
class ReplaceOutcome:
    """What a replace pass decided, node by node (written as `core.manifests.ReplaceReport`)."""

    source: str
    output: str
    layout: str
    decisions: list[Decision] = field(default_factory=list)
    source_stamp: dict = field(default_factory=dict)   # taken before the source was read
    lm_head: str = "float"
    include: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    overrides: dict[str, bool] = field(default_factory=dict)   # the app's selection file

    @property
    def replaced(self) -> list[Decision]:
        return [d for d in self.decisions if d.action == "replaced"]

    @property
    def kept(self) -> list[Decision]:
        return [d for d in self.decisions if d.action == "kept"]

    @property
    def bf16(self) -> list[Decision]:
        return [d for d in self.decisions if d.action == "bf16"]

    @property
    def bytes_before(self) -> int:
        return sum(d.bytes_before for d in self.replaced)

    @property
    def bytes_after(self) -> int:
        return sum(d.bytes_after for d in self.replaced)

    def manifest(self) -> ReplaceReport:
        return ReplaceReport(
            source=self.source, output=self.output, layout=self.layout,
            nodes=[asdict(d) for d in self.decisions], source_stamp=self.source_stamp,
            lm_head=self.lm_head, include=self.include, exclude=self.exclude,
            overrides=self.overrides, replaced=len(self.replaced), kept=len(self.kept),
            bf16=len(self.bf16), weight_bytes_before=self.bytes_before,
            weight_bytes_after=self.bytes_after)



def bitlinear_name(matmul_name: str) -> str:
    for suffix in ("/MatMul", "/Gemm"):
        if matmul_name.endswith(suffix):
            return matmul_name[: -len(suffix)] + "/BitLinear"
    return f"{matmul_name}/BitLinear"



def _dtype_bytes(t: onnx.TensorProto) -> int:
    return int(np.prod(t.dims, dtype=np.int64)) * helper.tensor_dtype_to_np_dtype(t.data_type).itemsize



def _packed_weight(g: GraphIndex, proj: Projection, layout: str) -> Callable[[], np.ndarray]:
    def make() -> np.ndarray:
        w = g.array(proj.weight)
        w_nk = w if proj.weight_nk else w.T
        return pack(np.sign(np.asarray(w_nk, dtype=np.float32)).astype(np.int8), layout)
    return make



def _live(graph: onnx.GraphProto, nodes: list[onnx.NodeProto]) -> tuple[list[onnx.NodeProto], set[str]]:
    """Dead-node elimination: keep the nodes the graph outputs depend on."""
    live = {o.name for o in graph.output}
    kept: list[onnx.NodeProto] = []
    for node in reversed(nodes):
        if any(o in live for o in node.output):
            kept.append(node)
            live.update(i for i in node.input if i)
    kept.reverse()
    return kept, live



def source_stamp(path: Path) -> dict:
    """What identifies the exported graph a BitLinear graph was made from (validate compares):
    the export's time from its meta file and the sizes of the graph and its data."""
    meta: dict = {}
    meta_file = path.with_suffix(".meta.json")
    if meta_file.exists():
        with contextlib.suppress(TdpuError):   # a graph from elsewhere: its sizes identify it
            meta = {"exported_at": ExportMeta.load(meta_file).exported_at}
    return {k: v for k, v in export_identity(path, meta).items()
            if k == "exported_at" or k.endswith(" bytes")}



def replace_model(src: str | Path, dst: str | Path, *, layout: str = "tdpu",
                  include: list[str] | tuple[str, ...] = ("*",), exclude: list[str] | tuple[str, ...] = (),
                  overrides: Mapping[str, bool] | None = None, report_path: str | Path | None = None,
                  lm_head: str = "float",
                  on_decision: Callable[[Decision], None] | None = None,
                  on_progress: Callable[[int, int, str], None] | None = None) -> ReplaceOutcome:
    """Replace the selected ternary MatMuls of `src`, writing `dst` (+ `dst.data`) atomically.

    `lm_head`: "float" keeps the lm_head as exported; "bf16" holds it (and a tied embedding
    table) in bfloat16 behind ai.tdpu::LinearBF16 (`tdpu_tui.engine.rewrite.lm_head`).
    """
    if lm_head not in LM_HEAD_MODES:
        raise GraphError(f"[replace].lm_head: expected one of {LM_HEAD_MODES}, found {lm_head!r}")
    src, dst = Path(src), Path(dst)
    stamp = source_stamp(src)       # before reading: an export that lands meanwhile is not ours
    g = GraphIndex.load(src)
    items = list(iter_nodes(g))
    protos = list(candidate_nodes(g))        # the NodeProto of each item (names need not be unique)
    entries = [e for e, _ in items]
    rcfg = ReplaceConfig(include=list(include), exclude=list(exclude), layout=layout)
    selected = resolve_selection(entries, rcfg, overrides)

    report = ReplaceOutcome(str(src), str(dst), layout, lm_head=lm_head, include=list(include),
                           exclude=list(exclude), overrides=dict(overrides or {}), source_stamp=stamp)
    chosen: list[tuple[Projection, Decision]] = []
    head_nodes: list[tuple[onnx.NodeProto, Decision]] = []
    for (entry, proj), proto in zip(items, protos, strict=True):
        d = Decision(entry.name, entry.op_type, "kept", "", entry.layer, entry.projection, entry.k,
                     entry.n, entry.weight, entry.status, entry.zeros, entry.scale, entry.act_quant)
        if entry.status == ALREADY:
            d.reason = ALREADY
        elif selected.get(entry.name) and proj is not None:
            d.action, d.reason = "replaced", selection_reason(entry, rcfg, overrides)
            d.bitlinear = bitlinear_name(entry.name)
            chosen.append((proj, d))
        else:
            d.reason = selection_reason(entry, rcfg, overrides)
            if lm_head == "bf16" and entry.projection == "lm_head":
                head_nodes.append((proto, d))
        report.decisions.append(d)
        if on_decision is not None and not (head_nodes and head_nodes[-1][1] is d):
            on_decision(d)   # an lm_head to hold in bf16 is reported once its plan is made

    graph = g.graph
    removed = {id(n) for proj, _ in chosen for n in (proj.node, *proj.absorbed)}
    # Names still used by nodes that stay (plus graph inputs/outputs) cannot be reused.
    taken = {i for n in graph.node if id(n) not in removed for i in (*n.input, *n.output)}
    taken |= {v.name for v in (*graph.input, *graph.output)}
    lazy: dict[str, Callable[[], np.ndarray]] = {}
    new_inits: dict[str, onnx.TensorProto] = {}
    by_matmul: dict[int, onnx.NodeProto] = {}
    placement: dict[str, tuple[str, str]] = {}
    for proj, d in chosen:
        wname = free_name(proj.weight, taken, ".bitlinear")
        module = proj.weight[: -len(".weight")] if proj.weight.endswith(".weight") else proj.weight
        sname = free_name(f"{module}.weight_scale", taken | {wname}, ".bitlinear")
        taken |= {wname, sname}
        placement[proj.weight] = (wname, sname)
        lazy[wname] = _packed_weight(g, proj, layout)
        scale = np.array([d.scale], dtype=np.float32)
        lazy[sname] = lambda scale=scale: scale
        new_inits[wname] = placeholder_tensor(wname, onnx.TensorProto.UINT8, [d.n // 4, d.k])
        new_inits[sname] = placeholder_tensor(sname, onnx.TensorProto.FLOAT, [1])
        node = helper.make_node("BitLinear", [proj.x, wname, sname], [proj.y], name=d.bitlinear,
                                domain=BITLINEAR_DOMAIN, doc_string=f"replaces {proj.node.name}",
                                in_features=d.k, out_features=d.n, layout=layout)
        by_matmul[id(proj.node)] = node
        w_t = g.inits[proj.weight]
        folded = [i for n in proj.absorbed for i in n.input if i in g.inits and i != proj.weight]
        d.bytes_before = _dtype_bytes(w_t) + sum(_dtype_bytes(g.inits[i]) for i in folded)
        d.bytes_after = d.n // 4 * d.k + 4

    swaps: dict[int, list[onnx.NodeProto]] = {k: [v] for k, v in by_matmul.items()}
    swaps.update({i: [] for i in removed if i not in by_matmul})
    if len(head_nodes) > 1:
        names = ", ".join(repr(n.name) for n, _ in head_nodes)
        raise GraphError(f"{src}: [replace].lm_head = \"bf16\" found {len(head_nodes)} lm_head "
                             f"nodes ({names}); it holds one lm_head in bf16 (exclude the others "
                             "or keep lm_head = \"float\")")
    for node, d in head_nodes:
        plan = plan_bf16(g, node, taken)
        swaps.update(plan.replacements())
        lazy[plan.new_weight] = bf16_source(g, plan, str(src))
        new_inits[plan.new_weight] = plan.placeholder()
        placement[plan.weight] = (*placement.get(plan.weight, ()), plan.new_weight)
        d.action, d.bitlinear = "bf16", plan.new_node.name
        d.weight, d.k, d.n, d.weight_nk = plan.weight, plan.k, plan.n, plan.nk
        d.reason = (f"[replace].lm_head = \"bf16\": {plan.weight} held as bfloat16, exact "
                    f"({human_bytes(plan.bytes_before)} → {human_bytes(plan.n * plan.k * 2)})")
        if plan.float_kept_for:
            d.reason += (f"; a copy: the float table stays for {', '.join(plan.float_kept_for)} "
                         f"({human_bytes(plan.bytes_after)} in all)")
        d.bytes_before, d.bytes_after = plan.bytes_before, plan.bytes_after
        if on_decision is not None:
            on_decision(d)

    nodes = [m for n in graph.node for m in swaps.get(id(n), [n])]
    nodes, live = _live(graph, nodes)

    model = onnx.ModelProto()
    model.CopyFrom(g.model)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    # The packed weight and its scale take the place of the float weight they replace.
    order: list[onnx.TensorProto] = []
    for t in graph.initializer:
        order.extend(new_inits[n] for n in placement.get(t.name, ()))
        if t.name in live and t.name not in new_inits:
            order.append(t)
    del model.graph.initializer[:]
    model.graph.initializer.extend(order)
    init_names = {t.name for t in order}
    dropped = {t.name for t in graph.initializer} - init_names
    keep_inputs = [v for v in model.graph.input if v.name not in dropped]
    del model.graph.input[:]
    model.graph.input.extend(keep_inputs)
    produced = {o for n in nodes for o in n.output}
    keep_vi = [v for v in model.graph.value_info if v.name in produced]
    del model.graph.value_info[:]
    model.graph.value_info.extend(keep_vi)
    if (chosen or report.bf16) and not any(o.domain == BITLINEAR_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(BITLINEAR_DOMAIN, 1))

    def source(t: onnx.TensorProto) -> np.ndarray:
        if t.name in lazy:
            return lazy[t.name]()
        return tensor_bytes(t, g.base_dir)

    with staging_dir(dst.parent) as stage:
        onnx_tmp, data_tmp = stage / dst.name, stage / f"{dst.name}.data"
        save_streamed(model, source, onnx_tmp, data_tmp, on_progress)
        pairs = [(data_tmp, dst.with_name(f"{dst.name}.data")), (onnx_tmp, dst)]
        if report_path is not None:
            report_tmp = stage / Path(report_path).name
            report.manifest().dump(report_tmp)
            pairs.append((report_tmp, Path(report_path)))
        commit_files(pairs)
    return report
