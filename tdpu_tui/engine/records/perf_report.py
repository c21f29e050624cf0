"""Speed and size of the float, BitLinear and MatMulNBits graphs, and the Phase 3 report.

The peer is ONNX Runtime's own low-bit operator: the BitLinear graph lowered to
`com.microsoft::MatMulNBits` (bits=2, accuracy_level=4, i.e. int8 activations). Ternary maps
onto it exactly: code w + 2 in {1, 2, 3} with the default zero point 2, and every block's
scale equal to the node's weight_scale.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


from tdpu_tui.engine.osutil.files import human_bytes


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
