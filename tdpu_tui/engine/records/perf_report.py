"""Speed and size of the float, BitLinear and MatMulNBits graphs, and the Phase 3 report.

The peer is ONNX Runtime's own low-bit operator: the BitLinear graph lowered to
`com.microsoft::MatMulNBits` (bits=2, accuracy_level=4, i.e. int8 activations). Ternary maps
onto it exactly: code w + 2 in {1, 2, 3} with the default zero point 2, and every block's
scale equal to the node's weight_scale.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper

from kernels.packing import unpack
from tdpu_tui.engine.osutil.files import human_bytes
from tdpu_tui.engine.rewrite.inventory import BITLINEAR_DOMAIN, GraphIndex, bitlinear_attrs, tensor_bytes
from tdpu_tui.engine.stages.replace import placeholder_tensor, save_streamed

NBITS_DOMAIN = "com.microsoft"
NBITS_BLOCK = 128
# Pause before each timed block (see interleaved_medians).
SETTLE_S = 0.2


def nbits_block_size(k: int) -> int:
    return next((b for b in (NBITS_BLOCK, 64, 32, 16) if k % b == 0), 16)


def nbits_pack(w: np.ndarray, block: int) -> np.ndarray:
    """int8 [N, K] ternary -> MatMulNBits B uint8 [N, ceil(K/block), block/4] (code w + 2)."""
    n, k = w.shape
    blocks = -(-k // block)
    codes = np.full((n, blocks * block), 2, np.uint8)     # padding decodes to 0
    codes[:, :k] = (w + 2).astype(np.uint8)
    c = codes.reshape(n, blocks, block // 4, 4)
    return (c[..., 0] | (c[..., 1] << 2) | (c[..., 2] << 4) | (c[..., 3] << 6)).astype(np.uint8)


def lower_to_matmulnbits(src: Path, dst: Path) -> int:
    """Write `dst` (+ .data): `src` with every BitLinear as MatMulNBits. Returns projection bytes."""
    g = GraphIndex.load(src)
    model = onnx.ModelProto()
    model.CopyFrom(g.model)
    lazy: dict[str, Callable[[], np.ndarray]] = {}
    new_inits: list[onnx.TensorProto] = []
    drop: set[str] = set()
    nodes: list[onnx.NodeProto] = []
    total = 0
    for node in g.graph.node:
        if node.op_type != "BitLinear" or node.domain != BITLINEAR_DOMAIN:
            nodes.append(node)
            continue
        x, wname, sname = node.input
        k, n, layout = bitlinear_attrs(node)
        block = nbits_block_size(k)
        blocks = -(-k // block)
        bname, cname = f"{wname}.nbits", f"{wname}.nbits_scales"

        def packed(wname=wname, layout=layout, block=block) -> np.ndarray:
            return nbits_pack(unpack(np.asarray(g.array(wname)), layout), block)

        def scales(sname=sname, count=n * blocks) -> np.ndarray:
            return np.full(count, g.scalar(sname), np.float32)

        lazy[bname], lazy[cname] = packed, scales
        new_inits += [placeholder_tensor(bname, onnx.TensorProto.UINT8, [n, blocks, block // 4]),
                      placeholder_tensor(cname, onnx.TensorProto.FLOAT, [n * blocks])]
        total += n * blocks * block // 4 + 4 * n * blocks
        drop |= {wname, sname}
        nodes.append(helper.make_node("MatMulNBits", [x, bname, cname], list(node.output),
                                      name=node.name.replace("/BitLinear", "/MatMulNBits"),
                                      domain=NBITS_DOMAIN, K=k, N=n, bits=2, block_size=block,
                                      accuracy_level=4))
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    keep = [t for t in g.graph.initializer if t.name not in drop] + new_inits
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    # The ai.tdpu import goes with the BitLinear nodes, unless another of its ops stays
    # (LinearBF16: an lm_head held in bf16).
    still_tdpu = any(n.domain == BITLINEAR_DOMAIN for n in nodes)
    ops = [o for o in model.opset_import if o.domain != BITLINEAR_DOMAIN or still_tdpu]
    del model.opset_import[:]
    model.opset_import.extend(ops)
    if not any(o.domain == NBITS_DOMAIN for o in ops):
        model.opset_import.append(helper.make_opsetid(NBITS_DOMAIN, 1))

    def source(t: onnx.TensorProto) -> np.ndarray:
        return lazy[t.name]() if t.name in lazy else tensor_bytes(t, g.base_dir)

    save_streamed(model, source, dst, dst.with_name(dst.name + ".data"))
    return total


@dataclass
class ProjectionTiming:
    """One decoder layer's projections alone, as a float chain, BitLinear and MatMulNBits."""

    layer: int
    nodes: int
    tokens: int
    step_ms: dict[str, float] = field(default_factory=dict)
    prefill_ms: dict[str, float] = field(default_factory=dict)

    def ratio(self, which: str, a: str, b: str) -> float | None:
        d = self.step_ms if which == "step" else self.prefill_ms
        return d[a] / d[b] if d.get(a) and d.get(b) else None


def projection_graphs(bitlinear_path: Path, act_quant: bool, layer: int | None = None
                      ) -> tuple[int, dict[str, onnx.ModelProto]]:
    """In-memory graphs of one layer's projections side by side: input x{i} [1, M, K] -> y{i}.

    `float` is the exporter's chain (with the in-graph activation quantization when the
    profile has it) on float32 weights; `bitlinear` and `matmulnbits` are the single nodes.
    """
    from onnx import TensorProto, numpy_helper

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
    anything else on the machine falls evenly on all of them. Each block starts after a pause
    and one untimed run: a session's ONNX Runtime workers keep spinning for a while after its
    last run, and on two cores that would be charged to the next graph (the BitLinear
    session's numba threads most of all). `check` runs before every timed run (the stage's
    cancel check: c, q or Ctrl-C in the app stop the timing within one run).
    """
    block = -(-repeats // rounds)
    times: dict[str, list[float]] = {label: [] for label in runs}
    for _ in range(rounds):
        for label, run in runs.items():
            time.sleep(SETTLE_S)
            run()
            for _ in range(block):
                if check is not None:
                    check()
                t0 = time.perf_counter()
                run()
                times[label].append(time.perf_counter() - t0)
    return {label: statistics.median(t) * 1e3 for label, t in times.items()}


@dataclass
class GraphTiming:
    label: str
    path: str
    weight_bytes: int
    prefill_ms: float | None = None
    step_ms: float | None = None


@dataclass
class PerfResult:
    graphs: list[GraphTiming]
    prefill_tokens: int
    replaced: int
    notes: list[str] = field(default_factory=list)
    projections: ProjectionTiming | None = None

    def by_label(self, label: str) -> GraphTiming:
        return next(g for g in self.graphs if g.label == label)

    def ratios(self) -> dict[str, float | None]:
        f, b, p = (self.by_label(x) for x in ("float", "bitlinear", "matmulnbits"))

        def r(a: float | None, c: float | None) -> float | None:
            return a / c if a and c else None

        return {"step_vs_float": r(b.step_ms, f.step_ms), "step_vs_matmulnbits": r(b.step_ms, p.step_ms),
                "prefill_vs_float": r(b.prefill_ms, f.prefill_ms),
                "prefill_vs_matmulnbits": r(b.prefill_ms, p.prefill_ms),
                "weight_bytes_vs_float": r(b.weight_bytes, f.weight_bytes),
                "weight_bytes_nbits_vs_float": r(p.weight_bytes, f.weight_bytes)}


def _ms(v: float | None) -> str:
    return f"{v:.2f}" if v is not None else "n/a"


def _x(v: float | None) -> str:
    return f"{v:.3f}×" if v is not None else "n/a"


def render_report(meta: dict, accuracy: dict, perf: PerfResult | None, nodes: list[dict],
                  verdict: str, notes: list[str], settings: dict[str, str] | None = None) -> str:
    """Markdown for phase3_logs/performance_report.md (tables pasteable into the Phase 3 report)."""
    lines = ["# 性能对比报告 Performance report — MatMul → BitLinear", "",
             f"- **结论 Verdict**: {verdict}",
             f"- **模型 Model**: profile `{meta.get('profile')}`, {meta.get('num_layers')} layers, "
             f"hidden {meta.get('hidden_size')}, vocab {meta.get('vocab_size')}",
             f"- **检查点 Checkpoint**: `{meta.get('checkpoint')}`"]
    labels = {"generated": "生成时间 Generated", "versions": "版本 Versions", "replace": "替换 Replace",
              "inputs": "输入 Inputs", "timing": "计时 Timing", "pass": "通过条件 Pass criteria"}
    for key, value in (settings or {}).items():
        lines.append(f"- **{labels.get(key, key)}**: {value}")
    lines.append("")
    lines += ["## 精度 Accuracy", "", f"Compared: {accuracy['compared']}", "",
              "| 指标 Metric | 值 Value |", "|---|---|"]
    c = accuracy["logits"]
    lines += [f"| max abs diff | {c['max_abs']:.4g} |", f"| mean abs diff | {c['mean_abs']:.4g} |",
              f"| cosine | {c['cosine']:.6f} |",
              f"| argmax agreement | {c['argmax_agreement']:.2%} ({c['positions']} positions) |"]
    if "vs_original" in accuracy:
        o = accuracy["vs_original"]
        lines += [f"| vs the float graph: argmax agreement | {o['argmax_agreement']:.2%} |",
                  f"| vs the float graph: cosine | {o['cosine']:.6f} |"]
    lines.append("")
    for note in accuracy.get("explanations", []):
        lines.append(f"- {note}")
    lines += ["", "## 逐节点检查 Per-node checks", "",
              "| 节点 Node | K | N | 整数核 int core | max \\|Δ\\| vs MatMul | bound | 结果 Result |",
              "|---|---|---|---|---|---|---|"]
    for n in nodes:
        if n.get("layout") == "bf16":
            core = "bf16 weights exact" if n["int_exact"] else "bf16 weights DIFFER"
        else:
            core = "exact" if n["int_exact"] else "MISMATCH"
        lines.append(f"| `{n['name']}` | {n['k']} | {n['n']} | {core} | "
                     f"{n['max_err']:.3g} | {n['bound']:.3g} | {n['result']} |")
    if perf is not None:
        ratios = perf.ratios()
        lines += ["", "## 性能 Performance", "",
                  f"Median of timed runs (the three graphs timed in turns), ONNX Runtime CPU. Prefill: {perf.prefill_tokens} tokens; "
                  "single-token step: one token, full forward (no KV cache). "
                  f"BitLinear nodes: {perf.replaced}.", "",
                  "| 图 Graph | prefill (ms) | 单步 step (ms) | 投影权重 projection weights | 文件 File |",
                  "|---|---|---|---|---|"]
        for gt in perf.graphs:
            kept = Path(gt.path).exists()
            where = f"`{Path(gt.path).name}`" + ("" if kept else " (built for timing, not kept)")
            lines.append(f"| {gt.label} | {_ms(gt.prefill_ms)} | {_ms(gt.step_ms)} | "
                         f"{human_bytes(gt.weight_bytes)} ({gt.weight_bytes} B) | {where} |")
        lines += ["", "| 比值 Ratio | 值 Value |", "|---|---|",
                  f"| step: BitLinear / float | {_x(ratios['step_vs_float'])} |",
                  f"| step: BitLinear / MatMulNBits | {_x(ratios['step_vs_matmulnbits'])} |",
                  f"| prefill: BitLinear / float | {_x(ratios['prefill_vs_float'])} |",
                  f"| prefill: BitLinear / MatMulNBits | {_x(ratios['prefill_vs_matmulnbits'])} |",
                  f"| weights: BitLinear / float | {_x(ratios['weight_bytes_vs_float'])} |"]
        pt = perf.projections
        if pt is not None:
            lines += ["", f"### 投影层单独计时 Projections alone (layer {pt.layer}, {pt.nodes} nodes)", "",
                      "The same layer's projections as standalone graphs (no attention, norms, "
                      "embedding or lm_head), which is what the replacement changes.", "",
                      "| 实现 Implementation | prefill (ms) | 单步 step (ms) |", "|---|---|---|"]
            for label in ("float", "bitlinear", "matmulnbits"):
                lines.append(f"| {label} | {_ms(pt.prefill_ms.get(label))} | {_ms(pt.step_ms.get(label))} |")
            lines += ["", "| 比值 Ratio | 值 Value |", "|---|---|",
                      f"| step: BitLinear / float | {_x(pt.ratio('step', 'bitlinear', 'float'))} |",
                      f"| step: BitLinear / MatMulNBits | {_x(pt.ratio('step', 'bitlinear', 'matmulnbits'))} |",
                      f"| prefill: BitLinear / float | {_x(pt.ratio('prefill', 'bitlinear', 'float'))} |",
                      f"| prefill: BitLinear / MatMulNBits | "
                      f"{_x(pt.ratio('prefill', 'bitlinear', 'matmulnbits'))} |", ""]
        for note in perf.notes:
            lines.append(f"- {note}")
    if notes:
        lines += ["", "## 说明 Notes", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"
