"""`phase3_logs/rtl_log.md` and the TDPU cost-model section of `performance_report.md`.

The rtl log is written whole by each run of the stage: the core (sources and their hashes, top,
LEN, Verilator), the measured timing, per node the tiles checked and wrong, the mismatches,
the diagnosis, the golden vectors. The TDPU section (docs/spec.md §9) is a marked section of the
performance report, so `validate` keeps it when it rewrites the rest.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tdpu_tui.engine.records.style import code_path, fmt_time, pct, verdict_line

TDPU_SECTION = "tdpu-cost-model"
SWEEP_CHART = "tdpu_cost_sweep.png"


def host_total_ms(host: dict) -> float:
    """The sum of the host's ops (`rtl.cost.host_ops_ms`: {op: ms, "shapes": text})."""
    return sum(v for k, v in host.items() if k != "shapes")


def _verdict(run: Any) -> str:
    return verdict_line([run.verdict] if run.diagnosis is not None else [])


def render_rtl_log(run: Any, *, root: Path | None = None) -> str:
    """The log's markdown from the stage's `RtlRun`."""
    c = run.core
    lines = ["# RTL co-simulation log (stage `rtl`)", "",
             f"- **生成时间 generated**: {fmt_time(zone=True)}",
             f"- **结论 verdict**: {_verdict(run)}",
             f"- **详情 detail**: {run.verdict}",
             f"- **机器 machine**: {run.machine}", "",
             "## 核 The core", "",
             f"- top `{c['top']}`, LEN = {c['lanes']}, Verilator {c['verilator']}",
             f"- build: {code_path(c['build_dir'], root)} ({c['build']})" if "build_dir" in c else "- build: —", "",
             "| source | sha256 |", "|---|---|"]
    lines += [f"| {code_path(p, root)} | `{h}` |" for p, h in c["sources"].items()]
    t = run.timing
    lines += ["", "## 时序 Timing (measured on the harness)", ""]
    if not t:
        lines += ["- not measured: the core did not answer its inputs (see the verdict)"]
    else:
        lines += [
            f"- latency: **{t.get('latency_cycles')}** cycles (edge accepting the input counted as 1, "
            "to the edge after which o_data_ready is high)",
            f"- initiation interval, fresh weights every input: **{t.get('initiation_interval')}** cycle(s)",
            f"- initiation interval, weights loaded once: **{t.get('initiation_interval_reused')}** cycle(s)",
            f"- each tile's weights load {t.get('weight_load', 'in the cycle of the previous input')}",
            f"- bubbles: {t.get('bubbles')}",
            f"- reset: {t.get('reset')}"]
    lines += [f"- note: {n}" for n in run.timing_notes]
    lines += ["", "## 节点 Nodes checked", "",
              "| node | K | N | tokens | rows | tiles | wrong | rows ≠ ternary_matmul_int | tiles/s |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for d in run.nodes:
        rate = d["tiles"] / d["seconds"] if d["seconds"] > 0 else 0
        lines.append(f"| `{d['node']}` | {d['k']} | {d['n']} | {d['tokens']} | {d['rows']} | {d['tiles']} | "
                     f"{d['wrong']} | {d['rows_wrong']} | {rate:,.0f} |")
    lines += ["", "## 诊断 Diagnosis", "",
              f"{run.diagnosis if run.diagnosis is not None else 'exact: nothing to explain'}", ""]
    if run.mismatches:
        lines += ["Mismatches (first 20 per stream):", "", "```"] + run.mismatches + ["```", ""]
    lines += ["## 黄金向量 Golden vectors", "",
              "`$readmemh` files, one word per tile, most significant digit first: "
              "`{expected[31:0], i_weight[2·LEN-1:0], i_data[8·LEN-1:0]}`; index `index.json`.", "",
              "| file | node | tiles | sha256 |", "|---|---|---:|---|"]
    lines += [f"| `{v['file']}` | `{v['node']}` | {v['tiles']} | `{v['sha256'][:16]}…` |" for v in run.vectors]
    return "\n".join(lines) + "\n"


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.4f}"


def render_tdpu_section(timing: Any, board: Any, per_token: Any, prefill: Any, seq_len: int, big: Any,
                        big_prefill: Any, grid: dict, host: dict | None, chart: Path | None, *,
                        root: Path | None = None, host_2b4t: dict | None = None) -> str:
    """The docs/spec.md §9 section: this graph per token and per prefill, per layer, 2B4T, the sweep."""
    how = "measured by the rtl stage" if timing.measured else "assumed (the rtl stage did not run)"
    lines = ["## TDPU cost model (BitLinear on the board, docs/spec.md §9)", "",
             f"- core: LEN = {timing.lanes}, latency L = {timing.latency} cycles, interval II = {timing.ii} "
             f"(fresh weights), {timing.ii_reused} (reused): **{how}**",
             f"- board ([tdpu]): {board.cores} core(s), {board.clock_mhz:g} MHz, DDR {board.ddr_gb_s:g} GB/s "
             "for weights",
             "- per node and token: cycles = ceil(N · ceil(K / LEN) · II / cores) + L; weight bytes N · K / 4; "
             "time = max(cycles / clock, bytes / bandwidth)", "",
             f"**This graph, one token**: {per_token.cycles} cycles, {_ms(per_token.seconds)} ms, "
             f"{per_token.weight_bytes} weight bytes, {per_token.bound}-bound "
             f"({len(per_token.nodes)} BitLinear nodes).  ",
             f"**Prefill of {seq_len} tokens** (each weight tile loaded once, every token streamed through "
             f"it): {prefill.cycles} cycles, {_ms(prefill.seconds)} ms, {prefill.bound}-bound.", "",
             "| layer | nodes | cycles / token | weight bytes | ms / token | bound |",
             "|---|---:|---:|---:|---:|---|"]
    for layer, gc in sorted(per_token.by_layer().items(), key=lambda kv: (kv[0] is None, kv[0] or 0)):
        lines.append(f"| {'—' if layer is None else layer} | {len(gc.nodes)} | {gc.cycles} | {gc.weight_bytes} | "
                     f"{_ms(gc.seconds)} | {gc.bound} |")
    lines += ["", f"**Scaled to BitNet b1.58 2B4T** (30 layers × q, k, v, o, gate, up, down): one token "
              f"{big.cycles} cycles, {_ms(big.seconds)} ms, {big.weight_bytes} weight bytes, {big.bound}-bound; "
              f"prefill of {seq_len} tokens {big_prefill.cycles} cycles, {_ms(big_prefill.seconds)} ms, "
              f"{big_prefill.bound}-bound.", "",
              "2B4T per token, lanes × cores (L grows by one adder level per doubling of LEN; II as above):", "",
              "| LEN \\ cores | " + " | ".join(str(c) for c in sorted({c for _, c in grid})) + " |",
              "|---|" + "---:|" * len({c for _, c in grid})]
    for lanes in sorted({lanes for lanes, _ in grid}):
        cells = [f"{_ms(grid[(lanes, c)].seconds)} ms ({grid[(lanes, c)].bound})"
                 for c in sorted({c for _, c in grid})]
        lines.append(f"| {lanes} | " + " | ".join(cells) + " |")
    if host_2b4t:
        h = host_total_ms(host_2b4t)
        share = h / (h + big.seconds * 1e3)
        lines += ["", f"2B4T's host ops, one token ({host_2b4t['shapes']}), timed with NumPy float32 "
                  f"**on this machine — not the board's figures**: {h:.3f} ms, {pct(share)} of the token "
                  f"with BitLinear at LEN {timing.lanes} on {board.cores} core(s); the chart stacks them "
                  "on each bar."]
    if chart is not None:
        lines += ["", f"![2B4T ms per token, lanes × cores, with the host's share]({Path(chart).name})"]
    if host:
        total = host_total_ms(host)
        lines += ["", f"Ops that stay on the host, one token ({host['shapes']}), timed with NumPy float32 "
                  "**on this machine — not the board's figures**: "
                  + ", ".join(f"{k} {v:.3f} ms" for k, v in host.items() if k != "shapes")
                  + f"; total {total:.3f} ms."]
    if root is not None:
        lines += ["", f"(written {fmt_time(zone=True)} by the rtl stage; {code_path(Path(root) / 'tdpu.toml', root)}"
                  " [tdpu] holds the board figures)"]
    return "\n".join(lines)


def draw_sweep_chart(path: Path, grid: dict, board: Any, timing: Any, host_2b4t: dict | None = None) -> Path:
    """A bar per lanes × cores: 2B4T ms per token, BitLinear on the TDPU with the host's ops
    at 2B4T's shapes (`host_2b4t`, timed on this machine) stacked on it."""
    from tdpu_tui.engine.records.charts import bar_chart

    keys = sorted(grid)
    how = "measured" if timing.measured else "assumed"
    note = f"LEN × cores at {board.clock_mhz:g} MHz, DDR {board.ddr_gb_s:g} GB/s; L, II {how} at LEN {timing.lanes}"
    if not host_2b4t:
        return bar_chart(path, "TDPU cost model: 2B4T BitLinear ms per token", [f"{k[0]}×{k[1]}" for k in keys],
                         [grid[k].seconds * 1e3 for k in keys], "ms", note=note, color="#1f77b4")
    return bar_chart(path, "TDPU cost model: 2B4T ms per token, with the host's share",
                     [f"{k[0]}×{k[1]}" for k in keys], [grid[k].seconds * 1e3 for k in keys], "ms",
                     note=note + "; host ops timed on this machine, not the board",
                     stacked=[host_total_ms(host_2b4t)] * len(keys), color="#1f77b4",
                     legend=("BitLinear on the TDPU (cost model)", "host ops (attention, norms, embedding, lm_head)"))
