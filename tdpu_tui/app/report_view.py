"""The Report tab: the performance comparison of `performance_report.md` as terminal bar charts.

The same figures as the report's PNG charts (`records/perf_report.py`): prefill and
single-token step time per graph, projection weight bytes per graph, one layer's
projections timed alone, and the TDPU cost model's 2B4T sweep once the rtl stage wrote it. Read from the report the validate stage wrote (here or in a
`--batch` run elsewhere; checked every second while the tab is shown), drawn with Rich text
in Textual's own widgets: no plotting dependency, and it works over SSH at 80×24.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import VerticalScroll
from textual.widgets import Static

from tdpu_tui.engine.osutil.files import human_bytes
from tdpu_tui.engine.records.style import ratio_words

# One colour per graph, as in the PNG charts (records/charts.py).
COLORS = {"float": "grey62", "bitlinear": "dodger_blue2", "matmulnbits": "green3"}
NAMES = {"float": "float", "bitlinear": "BitLinear", "matmulnbits": "MatMulNBits"}
LABEL_W = 13
NO_TIMING = ("it has no performance section: speed was not measured "
             "(validation failed, or [validate] did not time the graphs)")


def bar_chart(title: str, rows: list[tuple[str, float | None]], shown: list[str], width: int,
              note: str = "") -> Text:
    """One bar per graph, scaled to the largest; `shown` are the values as text. A graph with
    no value says "n/a" instead of a bar. The bars are marks, not only colour (NO_COLOR)."""
    text = Text()
    text.append(title, style="bold")
    if note:
        text.append(f"  {note}", style="dim")
    text.append("\n")
    largest = max((v for _, v in rows if v), default=0.0)
    value_w = max((len(s) for s in shown), default=0)
    room = max(4, width - LABEL_W - value_w - 3)
    for (label, value), value_text in zip(rows, shown, strict=True):
        text.append(f"  {NAMES.get(label, label)[:LABEL_W - 1]:<{LABEL_W - 1}}")
        if value is None or not largest:
            text.append(f"{'':<{room}} ")
            text.append("n/a\n", style="dim")
            continue
        filled = max(1, round(room * value / largest))
        text.append("█" * filled, style=COLORS.get(label, "magenta"))
        text.append(" " * (room - filled) + " ")
        text.append(f"{value_text:>{value_w}}\n")
    return text


def _ratio(a: float | None, b: float | None, kind: str = "time", said: str | None = None) -> str:
    """BitLinear against float in words ("BitLinear 2.5 × slower than float").

    `said`: the report's own words for it, used when there (the tables' times are rounded, so
    a ratio of them can differ from the report's); its reason in parentheses is left to the
    report, the figures in parentheses ("2.3 × faster") are kept."""
    if said:
        m = re.fullmatch(r"(.*?) \(([^()]*)\)", said)
        if m:
            figures = [part for part in m.group(2).split("; ") if "×" in part]
            said = m.group(1) + (f" ({'; '.join(figures)})" if figures else "")
        return re.sub(r"^BitLinear (?:step|prefill|weights) ", "BitLinear ", said)
    if not a or not b:
        return ""
    return ratio_words("BitLinear", a / b, "float", kind=kind)


class ReportView(VerticalScroll, can_focus=True):
    """The charts; `reload()` rereads the report when it changed on disk."""

    def __init__(self, report: Path, shown_path: str, **kwargs):
        super().__init__(**kwargs)
        self.report = report
        self.shown_path = shown_path
        self.figures = None
        self.error = ""
        self._seen: tuple | None | bool = False     # the report's (mtime, size); False: not read yet

    def compose(self) -> ComposeResult:
        yield Static("", id="report-charts")

    def on_mount(self) -> None:
        self.reload()
        self.set_interval(1.0, self.reload)

    def on_resize(self) -> None:
        self.draw()

    def reload(self) -> None:
        """Read the report again when its size or time changed (and once at the start)."""
        try:
            st = os.stat(self.report)
            stamp: tuple | None = (st.st_mtime_ns, st.st_size)
        except OSError:
            stamp = None
        if stamp == self._seen:        # unchanged (also: still missing) — nothing to redraw
            return
        self._seen = stamp
        self.figures, self.error = None, ""
        if stamp is None:
            self.error = "no report yet: the validate stage writes it (r runs every stage)"
        else:
            from tdpu_tui.engine.records.perf_report import read_report_figures
            try:
                self.figures = read_report_figures(self.report.read_text(encoding="utf-8",
                                                                         errors="replace"))
            except OSError as exc:
                self.error = f"cannot read it: {exc}"
            if self.figures is None and not self.error:
                self.error = NO_TIMING
        self.draw()

    def draw(self) -> None:
        width = max(30, self.size.width - 2)
        text = Text()
        text.append(self.shown_path, style="bold")
        if self.error:
            text.append(f": {self.error}", style="yellow")
            self.query_one("#report-charts", Static).update(text)
            return
        f = self.figures
        if f.graphs:
            self._graph_charts(text, f, width)
        else:
            text.append(f": {NO_TIMING}\n", style="yellow")
        if f.sweep:
            text.append("\n")
            text.append(self._sweep_chart(f, width))
        self.query_one("#report-charts", Static).update(text)

    @staticmethod
    def _graph_charts(text: Text, f, width: int) -> None:
        """Step, prefill and weight bytes per graph, one layer's projections alone."""
        graphs = f.graphs

        def said(table: str, row: str) -> str | None:
            return f.ratios.get((table, row))

        by = {g.label: g for g in graphs}
        tokens = f" ({f.prefill_tokens} tokens)" if f.prefill_tokens else ""
        text.append("  · ONNX Runtime CPU, median of timed runs\n\n", style="dim")
        step = [(g.label, g.step_ms) for g in graphs]
        text.append(bar_chart("Single-token step (ms)", step, [_ms(v) for _, v in step], width,
                              _ratio(_get(by, "bitlinear", "step_ms"), _get(by, "float", "step_ms"),
                                     said=said("graphs", "step: BitLinear / float"))))
        text.append("\n")
        prefill = [(g.label, g.prefill_ms) for g in graphs]
        text.append(bar_chart(f"Prefill{tokens} (ms)", prefill, [_ms(v) for _, v in prefill], width,
                              _ratio(_get(by, "bitlinear", "prefill_ms"),
                                     _get(by, "float", "prefill_ms"),
                                     said=said("graphs", "prefill: BitLinear / float"))))
        text.append("\n")
        weights = [(g.label, float(g.weight_bytes)) for g in graphs]
        text.append(bar_chart("Projection weight bytes", weights,
                              [human_bytes(v) for _, v in weights], width,
                              _ratio(_get(by, "bitlinear", "weight_bytes"),
                                     _get(by, "float", "weight_bytes"), "size",
                                     said=said("graphs", "weights: BitLinear / float"))))
        if f.projections:
            text.append("\n")
            rows = [(label, step_ms) for label, (_, step_ms) in f.projections.items()]
            layer = f" (layer {f.projections_layer})" if f.projections_layer is not None else ""
            text.append(bar_chart(f"Projections alone{layer}, step (ms)", rows,
                                  [_ms(v) for _, v in rows], width,
                                  _ratio(f.projections.get("bitlinear", (None, None))[1],
                                         f.projections.get("float", (None, None))[1],
                                         said=said("projections", "step: BitLinear / float"))))

    @staticmethod
    def _sweep_chart(f, width: int) -> Text:
        """The TDPU cost model's 2B4T sweep, as the report's chart (which stacks the host on it)."""
        keys = sorted(f.sweep)
        rows = [(f"{lanes}×{cores}", f.sweep[(lanes, cores)]) for lanes, cores in keys]
        note = "LEN × cores"
        if f.sweep_host_ms is not None:
            note += f"; host ops add {f.sweep_host_ms:.1f} ms here"   # timed on this machine
        return bar_chart("TDPU cost model, 2B4T per token", rows, [f"{v:.1f} ms" for _, v in rows],
                         width, note)


def _ms(v: float | None) -> str:
    return f"{v:.2f} ms" if v is not None else "n/a"


def _get(by: dict, label: str, attr: str) -> float | None:
    g = by.get(label)
    return getattr(g, attr) if g is not None else None
