"""PNG bar charts for the reports, drawn headless with matplotlib's Agg canvas.

matplotlib is imported on the first chart, never when the stages load. The figure is built
with `matplotlib.figure.Figure` and an Agg canvas, not pyplot: no global figure state and
no GUI backend, so a chart can be drawn from the app's worker thread or over SSH.

Every chart is `WIDTH_PX` × `HEIGHT_PX` pixels (the report embeds them at that size) and is
written atomically. Chart text is English only: the fonts matplotlib ships lack CJK glyphs.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

from tdpu_tui.engine.osutil.files import atomic_write_bytes

WIDTH_PX, HEIGHT_PX = 800, 360
DPI = 100
# One colour per graph, the same in every chart.
COLORS = {"float": "#7f7f7f", "bitlinear": "#1f77b4", "matmulnbits": "#2ca02c"}
FALLBACK_COLORS = ("#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22")


def _value_text(v: float, unit: str) -> str:
    if v >= 100:
        text = f"{v:.0f}"
    elif v >= 10:
        text = f"{v:.1f}"
    else:
        text = f"{v:.3g}"
    return f"{text} {unit}".strip()


def bar_chart(path: str | Path, title: str, labels: Sequence[str], values: Sequence[float | None],
              unit: str, *, note: str = "", stacked: Sequence[float] | None = None,
              legend: tuple[str, str] | None = None, color: str | None = None) -> Path:
    """One bar per label, its value written on it; `None` draws no bar and says "n/a".

    `unit` labels the y axis and the values ("ms", "KiB"); `note` is a line of small print
    under the chart (what was measured, on which machine). `stacked`: a second part on top of
    each bar (the value written is then the sum), `legend` names the two parts; `color` is
    every bar's (else one per graph). Returns `path`.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if len(labels) != len(values) or (stacked is not None and len(stacked) != len(values)):
        raise ValueError(f"{path}: {len(labels)} labels for {len(values)} values")
    fig = Figure(figsize=(WIDTH_PX / DPI, HEIGHT_PX / DPI), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    heights = [0.0 if v is None else float(v) for v in values]
    extra = iter(FALLBACK_COLORS * (len(labels) // len(FALLBACK_COLORS) + 1))
    colors = [color or COLORS.get(label) or next(extra) for label in labels]
    first = legend[0] if legend else None
    bars = ax.bar(range(len(labels)), heights, color=colors, width=0.6, label=first)
    tops = list(heights)
    if stacked is not None:
        ax.bar(range(len(labels)), [float(x) for x in stacked], bottom=heights, color="#c7c7c7",
               width=0.6, label=legend[1] if legend else None)
        tops = [h + float(x) for h, x in zip(heights, stacked)]
    top = max(tops, default=0.0) or 1.0
    ax.set_ylim(0, top * 1.18)
    for bar, v, height in zip(bars, values, tops):
        total = None if v is None else height
        text = "n/a" if total is None else _value_text(float(total), unit)
        ax.annotate(text, (bar.get_x() + bar.get_width() / 2, height),
                    xytext=(0, 3), textcoords="offset points", ha="center", va="bottom", fontsize=9)
    if legend:
        ax.legend(loc="upper right", fontsize=8, frameon=False)
    ax.set_xticks(range(len(labels)), list(labels))
    ax.set_ylabel(unit)
    ax.set_title(title)
    ax.spines[["top", "right"]].set_visible(False)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    if note:
        fig.supxlabel(note, fontsize=8, color="#555555")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    path = Path(path)
    atomic_write_bytes(path, buf.getvalue())
    return path


def png_size(path: str | Path) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk; ValueError when the file is not a PNG."""
    head = Path(path).read_bytes()[:24]
    if head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
        raise ValueError(f"{path}: not a PNG file")
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
