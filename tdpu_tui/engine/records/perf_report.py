"""Speed and size of the float, BitLinear and MatMulNBits graphs, and the Phase 3 report.

The peer is ONNX Runtime's own low-bit operator: the BitLinear graph lowered to
`com.microsoft::MatMulNBits` (bits=2, accuracy_level=4, i.e. int8 activations). Ternary maps
onto it exactly: code w + 2 in {1, 2, 3} with the default zero point 2, and every block's
scale equal to the node's weight_scale.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from tdpu_tui.engine.osutil.files import atomic_write_bytes, human_bytes, lock_for
from tdpu_tui.engine.records.style import (
    code_path, metric_rows, metric_value, pct, ratio_words, relative_text,
)


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
    # Why BitLinear is slower here, said beside each slower ratio ("tiny shapes: …").
    why_slower: str = ""

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

    def headline(self) -> str:
        """BitLinear's speed in words, for the stage's one-line result."""
        r = self.ratios()
        if r["step_vs_float"] is not None:
            versus_peer = _time_words("step", r["step_vs_matmulnbits"], "MatMulNBits", "")
            return (f"{_time_words('step', r['step_vs_float'], 'float', '')}, "
                    f"{versus_peer.removeprefix('BitLinear step ')}")
        if r["prefill_vs_float"] is not None:
            return _time_words("prefill", r["prefill_vs_float"], "float", "")
        return "speed not measured"


def _ms(v: float | None) -> str:
    return f"{v:.2f}" if v is not None else "n/a"


LABELS = {"float": "float", "bitlinear": "BitLinear", "matmulnbits": "MatMulNBits"}


def _time_words(what: str, ratio: float | None, base: str, why: str) -> str:
    """BitLinear's time against `base` in words; `why` is said only when it is slower."""
    return ratio_words(f"BitLinear {what}", ratio, base, why=why if ratio and ratio > 1 else "")


def _ratio_rows(ratio, why: str) -> list[str]:
    """The ratio table: `ratio(which, base)` gives BitLinear's time over base's."""
    rows = ["| 比值 Ratio | 值 Value |", "|---|---|"]
    for which, what in (("step", "step"), ("prefill", "prefill")):
        for base in ("float", "matmulnbits"):
            rows.append(f"| {which}: BitLinear / {LABELS[base]} | "
                        f"{_time_words(what, ratio(which, base), LABELS[base], why)} |")
    return rows


# Charts written beside the report: (file name, alt text).
CHART_FILES = {"prefill": "performance_prefill.png", "step": "performance_step.png",
               "weights": "performance_weights.png"}


def _bytes_unit(largest: float) -> tuple[str, float]:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20)):
        if largest >= size:
            return unit, float(size)
    return "KiB", 1024.0


def draw_charts(directory: Path, perf: PerfResult) -> dict[str, Path]:
    """Prefill time, step time and projection weight bytes per graph, as PNGs in `directory`."""
    from tdpu_tui.engine.records import charts

    labels = [g.label for g in perf.graphs]
    where = "ONNX Runtime CPU, median of timed runs"
    unit, size = _bytes_unit(max((g.weight_bytes for g in perf.graphs), default=0))
    drawn = {
        "prefill": charts.bar_chart(directory / CHART_FILES["prefill"],
                                    f"Prefill ({perf.prefill_tokens} tokens) per graph", labels,
                                    [g.prefill_ms for g in perf.graphs], "ms", note=where),
        "step": charts.bar_chart(directory / CHART_FILES["step"],
                                 "Single-token step per graph (full forward, no KV cache)", labels,
                                 [g.step_ms for g in perf.graphs], "ms", note=where),
        "weights": charts.bar_chart(directory / CHART_FILES["weights"],
                                    "Projection weight bytes per graph", labels,
                                    [g.weight_bytes / size for g in perf.graphs], unit,
                                    note="the replaced projections only; kept MatMuls are the same in all"),
    }
    return drawn


CHART_ALT = {"prefill": "prefill time per graph", "step": "single-token step time per graph",
             "weights": "projection weight bytes per graph"}


def render_report(meta: dict, accuracy: dict, perf: PerfResult | None, nodes: list[dict],
                  verdict: str, notes: list[str], settings: dict[str, str] | None = None, *,
                  root: Path | None = None, charts: dict[str, Path] | None = None) -> str:
    """Markdown for phase3_logs/performance_report.md (tables pasteable into the Phase 3 report).

    Paths are shown relative to the project `root`; `charts` (from `draw_charts`) are linked
    by file name, as they sit beside the report.
    """
    lines = ["# 性能对比报告 Performance report — MatMul → BitLinear", "",
             f"- **结论 Verdict**: {verdict}",
             f"- **模型 Model**: profile `{meta.get('profile')}`, {meta.get('num_layers')} layers, "
             f"hidden {meta.get('hidden_size')}, vocab {meta.get('vocab_size')}",
             "- **检查点 Checkpoint**: "
             + (code_path(meta["checkpoint"], root) if meta.get("checkpoint") else "n/a")]
    labels = {"generated": "生成时间 Generated", "versions": "版本 Versions", "replace": "替换 Replace",
              "inputs": "输入 Inputs", "timing": "计时 Timing", "pass": "通过条件 Pass criteria",
              "kernel": "内核 Kernel"}
    for key, value in (settings or {}).items():
        lines.append(f"- **{labels.get(key, key)}**: {value}")
    lines.append("")
    lines += ["## 精度 Accuracy", "", f"Compared: {accuracy['compared']}", "",
              "| 指标 Metric | 值 Value |", "|---|---|"]
    lines += metric_rows(accuracy["logits"])
    if "vs_original" in accuracy:
        o = accuracy["vs_original"]
        lines += [f"| vs the float graph: argmax agreement | {pct(o['argmax_agreement'])} |",
                  f"| vs the float graph: cosine | {metric_value('cosine', o['cosine'])} |"]
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
        lines += _performance(perf, root, charts or {})
    if notes:
        lines += ["", "## 说明 Notes", ""] + [f"- {n}" for n in notes]
    return relative_text("\n".join(lines) + "\n", root)


def _performance(perf: PerfResult, root: Path | None, charts: dict[str, Path]) -> list[str]:
    ratios = perf.ratios()
    lines = ["", "## 性能 Performance", "",
             f"Median of timed runs (the three graphs timed in turns), ONNX Runtime CPU. "
             f"Prefill: {perf.prefill_tokens} tokens; single-token step: one token, full forward "
             f"(no KV cache). BitLinear nodes: {perf.replaced}.", "",
             "| 图 Graph | prefill (ms) | 单步 step (ms) | 投影权重 projection weights | 文件 File |",
             "|---|---|---|---|---|"]
    for gt in perf.graphs:
        kept = Path(gt.path).exists()
        where = (code_path(gt.path, root) if kept
                 else f"`{Path(gt.path).name}` (built for timing, not kept)")
        lines.append(f"| {gt.label} | {_ms(gt.prefill_ms)} | {_ms(gt.step_ms)} | "
                     f"{human_bytes(gt.weight_bytes)}, {gt.weight_bytes} B | {where} |")
    lines += [""] + _ratio_rows(lambda which, base: ratios[f"{which}_vs_{base}"], perf.why_slower)
    lines += [f"| weights: BitLinear / float | "
              f"{ratio_words('BitLinear weights', ratios['weight_bytes_vs_float'], 'float', kind='size')} |",
              f"| weights: MatMulNBits / float | "
              f"{ratio_words('MatMulNBits weights', ratios['weight_bytes_nbits_vs_float'], 'float', kind='size')} |"]
    if charts:
        lines += ["", "### 图表 Charts", ""]
        for key, path in charts.items():
            lines += [f"![{CHART_ALT.get(key, key)}]({path.name})", ""]
        lines.pop()
    pt = perf.projections
    if pt is not None:
        lines += ["", f"### 投影层单独计时 Projections alone (layer {pt.layer}, {pt.nodes} nodes)", "",
                  "The same layer's projections as standalone graphs (no attention, norms, "
                  "embedding or lm_head), which is what the replacement changes.", "",
                  "| 实现 Implementation | prefill (ms) | 单步 step (ms) |", "|---|---|---|"]
        for label in ("float", "bitlinear", "matmulnbits"):
            lines.append(f"| {label} | {_ms(pt.prefill_ms.get(label))} | {_ms(pt.step_ms.get(label))} |")
        lines += [""] + _ratio_rows(lambda which, base: pt.ratio(which, "bitlinear", base), perf.why_slower)
        lines.append("")
    for note in perf.notes:
        lines.append(f"- {note}")
    return lines


# Sections another stage writes into the report (the TDPU cost model): kept when validate
# rewrites the rest.
_SECTION_RE = re.compile(r"<!-- tdpu:section (?P<name>[\w.-]+) -->.*?<!-- /tdpu:section (?P=name) -->", re.S)


def _begin(name: str) -> str:
    return f"<!-- tdpu:section {name} -->"


def _end(name: str) -> str:
    return f"<!-- /tdpu:section {name} -->"


def kept_sections(text: str) -> list[str]:
    """The marked sections of a report, in the order they appear."""
    return [m.group(0) for m in _SECTION_RE.finditer(text)]


def _read(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8", "surrogateescape")
    except FileNotFoundError:
        return ""


def write_report(path: str | Path, markdown: str) -> None:
    """Write the report's own text; every marked section already in the file stays, after it."""
    path = Path(path)
    with lock_for(path):
        kept = kept_sections(_read(path))
        text = markdown.rstrip("\n") + "\n" + "".join(f"\n{block}\n" for block in kept)
        atomic_write_bytes(path, text.encode("utf-8", "surrogateescape"))


def update_section(path: str | Path, name: str, body: str) -> None:
    """Replace (or append) the section `name` of the report, leaving everything else as it is.

    The block is `<!-- tdpu:section NAME -->` … `<!-- /tdpu:section NAME -->`; the validate
    stage keeps it when it rewrites the report.
    """
    path = Path(path)
    block = f"{_begin(name)}\n{body.strip()}\n{_end(name)}"
    with lock_for(path):
        text = _read(path)
        pattern = re.compile(re.escape(_begin(name)) + r".*?" + re.escape(_end(name)), re.S)
        if pattern.search(text):
            text = pattern.sub(lambda _m: block, text, count=1)
        else:
            text = (text.rstrip("\n") + "\n\n" if text.strip() else "") + block + "\n"
        atomic_write_bytes(path, text.encode("utf-8", "surrogateescape"))


def write_performance_report(path: str | Path, meta: dict, accuracy: dict, perf: PerfResult | None,
                             nodes: list[dict], verdict: str, notes: list[str],
                             settings: dict[str, str] | None = None, *,
                             root: Path | None = None) -> dict[str, Path]:
    """Draw the charts beside the report, then write the report linking them. Returns the charts.

    A chart that cannot be drawn is said in the report's notes; the report is written anyway.
    """
    path = Path(path)
    notes = list(notes)
    charts: dict[str, Path] = {}
    if perf is None:
        remove_charts(path.parent)
    else:
        try:
            charts = draw_charts(path.parent, perf)
        except ImportError as exc:
            remove_charts(path.parent)
            notes.append(f"charts not drawn: {exc.name or exc} is not installed (pip install matplotlib)")
        except (OSError, ValueError, RuntimeError) as exc:
            remove_charts(path.parent)
            notes.append(f"charts not drawn: {exc}")
    write_report(path, render_report(meta, accuracy, perf, nodes, verdict, notes, settings,
                                     root=root, charts=charts))
    return charts


def remove_charts(directory: Path) -> None:
    """Charts of an earlier run: gone when this report has none, so none is taken for its."""
    for name in CHART_FILES.values():
        (directory / name).unlink(missing_ok=True)


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


@dataclass
class ReportFigures:
    """The performance tables of a written report, read back (for the app's report view)."""

    graphs: list[GraphTiming]
    projections: dict[str, tuple[float | None, float | None]] = field(default_factory=dict)
    projections_layer: int | None = None
    prefill_tokens: int | None = None
    # The ratio tables' words as written, by table and row: ("graphs", "step: BitLinear / float")
    # -> "BitLinear step 3.5 × slower than float (…)". The app says what the report says,
    # not a ratio of the tables' rounded times.
    ratios: dict[tuple[str, str], str] = field(default_factory=dict)
    # The TDPU cost model's 2B4T sweep (its section, once the rtl stage wrote it):
    # (LEN, cores) -> ms per token on the TDPU, and the host's ops per token (this machine's).
    sweep: dict[tuple[int, int], float] = field(default_factory=dict)
    sweep_host_ms: float | None = None


_NUM = re.compile(r"^-?\d+(?:\.\d+)?$")
_RATIO_ROW = re.compile(r"^(step|prefill|weights): \w+ / \w+$")


def _num(cell: str) -> float | None:
    cell = cell.strip()
    return float(cell) if _NUM.match(cell) else None


def read_report_figures(text: str) -> ReportFigures | None:
    """The per-graph table (prefill, step, projection weight bytes), the projections-alone
    table and the ratio rows' words of `performance_report.md`, as `_performance` writes them,
    and the TDPU section's 2B4T sweep; None when the report has neither a performance section
    (not measured, or validation failed) nor that sweep."""
    graphs: list[GraphTiming] = []
    out = ReportFigures(graphs)
    table = ""
    cores: list[int] = []
    for line in text.splitlines():
        if line.startswith("| LEN \\ cores |"):
            table = "sweep"
            cores = [int(c) for c in re.findall(r"\| (\d+)", line)]
        elif table == "sweep" and re.match(r"\| \d+ \|", line):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            for c, cell in zip(cores, cells[1:]):
                m = re.match(r"([\d.]+) ms", cell)
                if m:
                    out.sweep[(int(cells[0]), c)] = float(m.group(1))
        elif m := re.match(r"2B4T's host ops, one token .*?: ([\d.]+) ms", line):
            out.sweep_host_ms = float(m.group(1))
        elif line.startswith("## "):
            table = "graphs" if "Performance" in line else ""
        elif line.startswith("### "):
            m = re.search(r"Projections alone \(layer (\d+)", line)
            table = "projections" if m else ""
            if m:
                out.projections_layer = int(m.group(1))
        elif table and line.startswith("Median of timed runs"):
            m = re.search(r"Prefill: (\d+) tokens", line)
            out.prefill_tokens = int(m.group(1)) if m else None
        elif table and line.startswith("| ") and not line.startswith("|---"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if len(cells) == 2 and _RATIO_ROW.match(cells[0]):
                out.ratios[(table, cells[0])] = cells[1]
            elif table == "graphs" and len(cells) >= 4:
                size = re.search(r"(\d+) B\b", cells[3])
                if size is None:
                    continue
                graphs.append(GraphTiming(cells[0], "", int(size.group(1)), _num(cells[1]),
                                          _num(cells[2])))
            elif table == "projections" and len(cells) == 3 and cells[0] in LABELS:
                out.projections[cells[0]] = (_num(cells[1]), _num(cells[2]))
    return out if graphs or out.sweep else None
