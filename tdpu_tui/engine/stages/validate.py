"""Stage `validate`: the replaced graph against the original, node by node, then speed.

1. Logits on the same seeded inputs. The reference profile quantizes activations in the
   graph, so the original graph is the target. The icraft profile does not: there the target
   is the PyTorch reference with `quantize_activations=True` (what BitLinear computes); the
   float graph's agreement is reported beside it. Argmax agreement below 99 % fails.
2. A sample of replaced nodes: their input X and output Y are captured from the original
   graph (extra graph outputs on an in-memory copy). The BitLinear integer core
   (`kernels.bitlinear.quantize_activations` + `ternary_matmul_int`) must equal an int64
   NumPy product exactly, and the rescaled result must lie within the activation-quantization
   bound of Y: |Δy[m, n]| ≤ weight_scale · (0.5 / s[m]) · Σ_k |W[n, k]|.
3. When a node misses that bound, its weights are decoded in the other packing layout; if
   that fits, the report says the bytes are in the other order than the node declares.
4. Speed (prefill and single-token step) and projection weight bytes of the float graph, the
   BitLinear graph and the MatMulNBits peer (`perf_report`).
"""

from __future__ import annotations

import functools
import os
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from tdpu_tui.engine.core.cache import free_memory
from tdpu_tui.engine.core.errors import StageFailed, UsageError
from tdpu_tui.engine.core.manifests import ExportMeta, ReplaceReport
from tdpu_tui.engine.core.stage import Stage, StageContext
from tdpu_tui.engine.graph.index import GraphIndex
from tdpu_tui.engine.model import compare
from tdpu_tui.engine.model.agreement import Verdict, judge, versus_reference
from tdpu_tui.engine.model.compare import (
    MIN_ARGMAX_AGREEMENT,
    compare_logits,
    format_comparison,
    graph_bytes,
    graph_session,
    ort_session,
    require_graph,
    runs_in_segments,
    seeded_inputs,
    shared_session,
    weight_bytes,
)
from tdpu_tui.engine.osutil.files import human_bytes, owned_prefix
from tdpu_tui.engine.osutil.platform import load_average
from tdpu_tui.engine.records.perf_report import (
    GraphTiming,
    PerfResult,
    ProjectionTiming,
    write_performance_report,
)
from tdpu_tui.engine.records.style import fmt_time, pct, verdict_line
from tdpu_tui.engine.rewrite.inventory import BITLINEAR_DOMAIN, bitlinear_attrs
from tdpu_tui.engine.rewrite.matmulnbits import lower_to_matmulnbits
from tdpu_tui.engine.validation.nodes import (
    NodeCheck,
    check_bf16_node,
    check_node,
    explain_disagreement,
)
from tdpu_tui.engine.validation.timing import interleaved_medians, projection_graphs

# Below this hidden size the timings measure the operator bridge's fixed cost (said in the report).
SMALL_HIDDEN = 1024


def _length_one_copy(path: Path) -> Path:
    """The icraft graph at `path` rebuilt for sequence length 1, saved beside it (same data file)."""
    from tdpu_tui.engine.graph.builder import with_sequence_length

    model = with_sequence_length(onnx.load(str(path), load_external_data=False), 1, path.parent)
    fd, name = tempfile.mkstemp(prefix=owned_prefix(".validate-step1-"), suffix=".onnx", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(model.SerializeToString())
    except BaseException:
        os.unlink(name)
        raise
    return Path(name)


def choose_kernel(cfg) -> dict:
    """Put `[kernels].path` in force for this process's BitLinear products; what will run."""
    from kernels import select

    try:
        select.set_path(None if cfg.kernels.path == "auto" else cfg.kernels.path)
        return select.selection()
    except ValueError as exc:
        raise StageFailed(f"{cfg.file}: [kernels].path: {exc}") from None


def _bitlinear_session(path: Path):
    from kernels.ort import (
        create_session,  # numba and onnxruntime-extensions: only when needed
    )

    return create_session(path)


# One progress bar over validate's phases, in run order (it never goes back): each phase
# has its share of 0–100 %.
PHASES = {"accuracy": (0.0, 50.0), "timing": (50.0, 90.0), "projections": (90.0, 100.0)}


class Validation:
    """One validation run (kept as an object so the benchmark can reuse its pieces)."""

    def bar(self, phase: str, done: float, total: float, note: str) -> None:
        """Progress `done`/`total` within `phase`, on the stage's one bar."""
        lo, hi = PHASES[phase]
        self.ctx.progress(round(lo + (hi - lo) * min(1.0, done / total), 1), 100, note)

    def __init__(self, ctx: StageContext):
        self.ctx = ctx
        self.cfg = ctx.config
        self.paths = ctx.paths
        self.notes: list[str] = []
        self.meta = ExportMeta.load(self.paths.export_meta)
        self.report = ReplaceReport.load(self.paths.replace_report)
        self.profile = self.meta.profile
        self.replaced = self.report.with_action("replaced")
        self.bf16 = self.report.with_action("bf16")
        self.captured: tuple[str, ...] = ()   # the float session's extra outputs
        self.segmented: dict[str, int] = {}   # graph label -> segments it was timed in
        self.kernel = choose_kernel(ctx.config)
        # This stage runs its own float session (with the sampled nodes' tensors as outputs).
        ctx.cache.drop("ort-session")

    @functools.cached_property
    def original(self) -> GraphIndex:
        """The exported graph's structure (weights stay on disk), read once per run."""
        return self.index(self.paths.full_onnx)

    def index(self, path: Path) -> GraphIndex:
        return self.ctx.cache.for_file("graph-index", path, lambda: GraphIndex.load(path))

    def float_session(self, extra: tuple[str, ...] = ()):
        """The float graph's session, with `extra` tensors as outputs (the sampled nodes' X and Y):
        one for the capture run and the prefill timing, held while memory allows. At 2B4T the
        graph runs in segments (`compare.graph_session`): what is held is the plan, and each
        segment's weights are loaded while it runs."""
        src = self.paths.full_onnx
        segmented = runs_in_segments(src)

        def load():
            model = onnx.load(str(src), load_external_data=False)
            return graph_session(model, src.parent, extra_outputs=extra, make_room=self.ctx.cache.make_room)

        return self.ctx.cache.for_file("ort-capture", src, load, extra,
                                       nbytes=0 if segmented else graph_bytes(src))

    def bitlinear_session(self, path: Path):
        return shared_session(self.ctx.cache, path, _bitlinear_session)

    # The timed sessions: the run's shared ones for the graphs themselves, fresh ones for the
    # length-1 copies the single-token step of the icraft profile runs on. A graph run in
    # segments gets its own plan whose segments prepack their weights: each is loaded for many
    # timed runs, not for one as in the capture run.
    def timed_float_session(self, path: Path):
        if path == self.paths.full_onnx and not runs_in_segments(path):
            return self.float_session(self.captured)
        return graph_session(path, make_room=self.ctx.cache.make_room, segments_prepack=True)

    def timed_bitlinear_session(self, path: Path):
        return (self.bitlinear_session(path) if path == self.paths.bitlinear_onnx
                else _bitlinear_session(path))

    # inputs --------------------------------------------------------------------------------

    def tokens(self) -> int:
        seq = self.meta.seq_len
        max_pos = self.meta.max_position_embeddings
        if self.profile == "reference" and max_pos and seq > int(max_pos):
            self.notes.append(f"seq_len {seq} exceeds the model's {max_pos} positions: "
                              f"clamped to {max_pos} tokens")
            return int(max_pos)
        return seq

    def inputs(self, tokens: int) -> dict[str, np.ndarray]:
        from tdpu_tui.engine.model.checkpoint import open_checkpoint

        batch = 1 if self.profile == "icraft" else self.cfg.validate.batch
        with open_checkpoint(self.meta.checkpoint) as ckpt:
            return seeded_inputs(ckpt, self.profile, batch, tokens, self.cfg.validate.seed)

    def feed(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {self.meta.input_name: inputs[self.meta.input_name]}

    # accuracy ------------------------------------------------------------------------------

    def sample(self) -> list[dict]:
        count = max(0, min(self.cfg.validate.sample_nodes, len(self.replaced)))
        if count == 0:
            return []
        picks = np.linspace(0, len(self.replaced) - 1, count).round().astype(int)
        return [self.replaced[i] for i in sorted(set(picks.tolist()))]

    def run_original(self, feed: dict[str, np.ndarray], extra: list[str]) -> dict[str, np.ndarray]:
        """Logits and the `extra` tensors from the original graph (extra outputs, in memory)."""
        have = {o.name for o in self.original.graph.output}
        wanted = [t for t in dict.fromkeys(extra) if t not in have and t not in feed]
        self.captured = tuple(wanted)
        sess = self.float_session(self.captured)
        names = ["logits", *wanted]
        out = dict(zip(names, sess.run(names, feed), strict=True))
        out.update({k: v for k, v in feed.items() if k in extra})
        return out

    def versus_reference(self, inputs: dict[str, np.ndarray], got: np.ndarray) -> Verdict:
        from tdpu_tui.engine.model.checkpoint import open_checkpoint

        with open_checkpoint(self.meta.checkpoint) as ckpt:
            return versus_reference(ckpt, {"inputs_embeds": inputs["inputs_embeds"]}, got, quantize=True,
                                    cache=self.ctx.cache)

    def check_nodes(self, captured: dict[str, np.ndarray], sample: list[dict], g: GraphIndex
                    ) -> list[NodeCheck]:
        by_name = {n.name: n for n in g.graph.node if n.domain == BITLINEAR_DOMAIN}
        checks = []
        for d in self.bf16:
            node = by_name[d["bitlinear"]]
            bits = np.asarray(g.array(node.input[1])).view(np.uint16)
            if d.get("weight_nk") is None or d.get("weight") not in self.original.inits:
                raise StageFailed(f"{self.paths.replace_report}: the bf16 lm_head {d['name']!r} does not "
                                  "say which weight it holds or how (re-run replace)")
            w_float = self.original.array(d["weight"])
            c = check_bf16_node(d["name"], captured[node.input[0]], captured[node.output[0]], bits,
                                w_float, bool(d["weight_nk"]))
            self.ctx.log(f"node {c.name} (bf16): weights {'exact' if c.int_exact else 'DIFFER'}, "
                         f"max |Δ| {c.max_err:.3g} vs the float MatMul (bound {c.bound:.3g}): {c.result}",
                         "info" if c.result == "ok" else "error")
            checks.append(c)
        for d in sample:
            node = by_name[d["bitlinear"]]
            _, _, layout = bitlinear_attrs(node)
            p = np.asarray(g.array(node.input[1]))
            c = check_node(d["name"], captured[node.input[0]], captured[node.output[0]], p,
                           float(g.scalar(node.input[2])), layout)
            self.ctx.log(f"node {c.name}: integer core {'exact' if c.int_exact else 'MISMATCH'}, "
                         f"max |Δ| {c.max_err:.3g} (bound {c.bound:.3g}), relative RMS {c.rel_rms:.2g}: "
                         f"{c.result}" + (f" — {c.diagnosis}" if c.diagnosis else ""),
                         "info" if c.result == "ok" else "error")
            checks.append(c)
        return checks

    # speed ---------------------------------------------------------------------------------

    def measure(self, tokens: int, inputs: dict[str, np.ndarray]) -> PerfResult:
        name = self.meta.input_name
        prefill = {name: inputs[name][:1]}
        step = {name: inputs[name][:1, :1]}
        # The icraft graph has a fixed sequence length: its single-token step runs on a copy
        # rebuilt for length 1 (same weights, read from the same external data).
        fixed = name == "inputs_embeds"
        perf = PerfResult([], tokens, len(self.replaced), [])
        # Timings on a shared machine mean little without its load; the OpenMP wait policy
        # decides whether the numba kernel's idle threads spin against ONNX Runtime's.
        load = load_average()
        load_text = "n/a (not reported by this system)" if load is None else f"{load:.2f}"
        perf.notes.append(f"machine: {os.cpu_count()} CPUs, load average {load_text} when "
                          f"timing started; OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}")
        before = self.report.weight_bytes_before
        after = self.report.weight_bytes_after
        with tempfile.TemporaryDirectory(prefix=owned_prefix(".validate-"), dir=self.paths.output) as tmp:
            nbits_path = Path(tmp) / "bitnet_b1.58_matmulnbits.onnx"
            self.ctx.log("lowering the BitLinear graph to com.microsoft::MatMulNBits (bits=2) for the peer")
            nbits_bytes = lower_to_matmulnbits(self.paths.bitlinear_onnx, nbits_path)
            # The peer is lowered from the BitLinear graph: with a bf16 lm_head it holds the same
            # LinearBF16 node, so both differ from each other in the projections only.
            graphs = [("float", self.paths.full_onnx, before, self.timed_float_session),
                      ("bitlinear", self.paths.bitlinear_onnx, after, self.timed_bitlinear_session),
                      ("matmulnbits", nbits_path, nbits_bytes,
                       _bitlinear_session if self.bf16 else ort_session)]
            step_paths: dict[str, Path] = {}
            try:
                if fixed:
                    for label, path, _, _ in graphs:  # one at a time, so `finally` sees each copy
                        step_paths[label] = _length_one_copy(path)
                    perf.notes.append(f"icraft profile (fixed length {tokens}): the single-token step "
                                      "runs on copies of the three graphs rebuilt for length 1")
                prefill_ms, step_ms = self._time_graphs(graphs, step_paths, prefill, step, perf, tokens)
            finally:
                for p in step_paths.values():
                    p.unlink(missing_ok=True)
            for timing in perf.graphs:
                timing.prefill_ms, timing.step_ms = prefill_ms[timing.label], step_ms.get(timing.label)
                self.ctx.log(f"{timing.label}: prefill {timing.prefill_ms:.2f} ms, step "
                             f"{'n/a' if timing.step_ms is None else f'{timing.step_ms:.2f} ms'}, "
                             f"projection weights {timing.weight_bytes} B")
        perf.projections = self.measure_projections(tokens, True)
        hidden = int(self.meta.hidden_size or 0)
        if 0 < hidden < SMALL_HIDDEN:
            perf.why_slower = "tiny shapes: the operator bridge's fixed cost"
            perf.notes.append(
                f"hidden size {hidden}: at shapes this small every BitLinear call costs mostly the fixed "
                "~0.01–0.03 ms of the Python operator bridge, not arithmetic, so the BitLinear graph is "
                "slower than the float one here. The 2B4T shapes ([model.synthetic] preset = \"2b4t\"; "
                "benchmarks/bench_replace.py) show what the kernel gains.")
        for d in self.bf16:
            perf.notes.append(
                f"[replace].lm_head = \"bf16\": {d['name']} runs as {d['bitlinear']} in the BitLinear and "
                f"MatMulNBits graphs, its weights {d['weight']} held in bfloat16 "
                f"({human_bytes(d['bytes_before'])} → {human_bytes(d['bytes_after'])}; every value is the "
                "checkpoint's, sums in float32). The float graph keeps the float32 MatMul: the whole-graph "
                "ratios include this change; the projections-alone table does not.")
        kept = self.kept_weight_bytes()
        if kept:
            names = ", ".join(f"{n} ({human_bytes(b)})" for n, b in kept.items())
            perf.notes.append(
                f"every graph also multiplies by the float weights of the MatMuls that were kept: {names}. "
                "Neither BitLinear nor MatMulNBits changes that part, and in a single-token step it can "
                "outweigh the projections; the projections-alone table isolates what the replacement changes.")
        return perf

    def kept_weight_bytes(self) -> dict[str, int]:
        """Bytes of the float weights behind kept MatMul/Gemm nodes (e.g. the tied lm_head)."""
        g = self.original
        out: dict[str, int] = {}
        for d in self.report.nodes:
            w = d.get("weight")
            if d["action"] == "kept" and w in g.inits and len(g.inits[w].dims) == 2:
                t = g.inits[w]
                out[w] = int(np.prod(t.dims)) * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
        return {k: v for k, v in sorted(out.items(), key=lambda kv: -kv[1]) if v >= 1 << 20}

    def _time_graphs(self, graphs: list, step_paths: dict[str, Path], prefill: dict, step: dict,
                     perf: PerfResult, tokens: int) -> tuple[dict[str, float], dict[str, float]]:
        repeats = self.cfg.validate.repeats
        # A float graph too large for one session (the full 2B model: 9 GiB of weights) runs in
        # segments: it is timed segment by segment on its own, the others in turns with each
        # other. Timing in turns needs those loaded at once: when together they would exceed
        # the limit of one session, each is timed on its own instead, to bound memory.
        segmented = [g for g in graphs if g[3] == self.timed_float_session and runs_in_segments(g[1])]
        whole = [g for g in graphs if g not in segmented]
        for label, path, nbytes, _ in graphs:
            perf.graphs.append(GraphTiming(label, str(path), int(nbytes)))
        whole_bytes = {g[0]: weight_bytes(g[1]) for g in whole}
        together = sum(whole_bytes.values()) <= compare.WHOLE_SESSION_LIMIT
        if not together:
            perf.notes.append("the graphs are too large to hold beside each other: "
                              "timed one after another, not in turns")
        prefill_ms: dict[str, float] = {}
        step_ms: dict[str, float] = {}
        groups = ([whole] if together else [[g] for g in whole]) if whole else []
        # a load per graph, prefill and step per group or segmented graph
        steps, done = len(whole) + 2 * len(groups) + 2 * len(segmented), 0
        for label, path, _, factory in segmented:
            self.ctx.check_cancelled()
            self.bar("timing", done, steps, f"timing prefill of the {label} graph, segment by segment")
            done += 1
            session = factory(path)
            prefill_ms[label] = self._segment_medians(session, prefill, repeats)
            segments, largest, total = len(session.segments), session.largest_segment_bytes(), session.nbytes
            if label in step_paths:
                session = factory(step_paths[label])
            self.bar("timing", done, steps, f"timing the single-token step of the {label} graph, "
                                            "segment by segment")
            done += 1
            step_ms[label] = self._segment_medians(session, step, max(repeats, 5) * 2)
            del session
            free_memory()
            self.segmented[label] = segments
            perf.notes.append(
                f"the {label} graph ({human_bytes(total)} of weights) ran in {segments} segments of "
                f"≤ {human_bytes(largest)} of weights each, one ONNX Runtime session loaded at a time; "
                "its time is the sum of the segments' medians, each segment timed on its own input "
                "(not in turns with the other graphs)")
        for group in groups:
            self.ctx.cache.make_room(sum(whole_bytes[g[0]] for g in group))
            sessions = {}
            for label, path, _, factory in group:
                self.ctx.check_cancelled()
                self.bar("timing", done, steps, f"loading the {label} graph")
                done += 1
                sessions[label] = factory(path)
            self.bar("timing", done, steps, f"timing prefill ({tokens} tokens)")
            done += 1
            prefill_ms |= interleaved_medians(
                {k: (lambda s=s: s.run(["logits"], prefill)) for k, s in sessions.items()}, repeats,
                check=self.ctx.check_cancelled)
            if step_paths:     # the length-1 copies replace the graphs, the run's held ones too
                del sessions
                self.ctx.cache.drop("ort-session")
                self.ctx.cache.drop("ort-capture")
                free_memory()
                sessions = {label: factory(step_paths[label]) for label, _, _, factory in group}
            self.bar("timing", done, steps, "timing the single-token step")
            done += 1
            step_ms |= interleaved_medians(
                {k: (lambda s=s: s.run(["logits"], step)) for k, s in sessions.items()}, max(repeats, 5) * 2,
                check=self.ctx.check_cancelled)
            del sessions
            free_memory()
        return prefill_ms, step_ms

    def _segment_medians(self, session, feed: dict[str, np.ndarray], repeats: int) -> float:
        """Milliseconds of one run of a graph: on a SegmentedSession the sum of its segments'
        medians, each timed while it is loaded, on the tensors the segments before it computed."""
        if not hasattr(session, "segments"):
            return interleaved_medians({"graph": lambda: session.run(["logits"], feed)}, repeats,
                                       check=self.ctx.check_cancelled)["graph"]
        medians: list[float] = []

        def visit(seg, sess, seg_feed, outputs) -> None:
            medians.append(interleaved_medians({"segment": lambda: sess.run(outputs, seg_feed)}, repeats,
                                               check=self.ctx.check_cancelled)["segment"])

        session.run(["logits"], feed, visit=visit)
        return sum(medians)

    def measure_projections(self, tokens: int, with_step: bool) -> ProjectionTiming:
        """One layer's projections alone: the part of the graph the replacement changes."""
        from kernels.ort import create_session

        self.bar("projections", 0, 1, "timing one layer's projections alone")
        layer, models = projection_graphs(self.paths.bitlinear_onnx, self.profile == "reference")
        inputs = models["float"].graph.input
        pt = ProjectionTiming(layer, len(inputs), tokens)
        rng = np.random.default_rng(self.cfg.validate.seed)

        def feed(m: int) -> dict[str, np.ndarray]:
            return {i.name: rng.standard_normal((1, m, i.type.tensor_type.shape.dim[2].dim_value)
                                                ).astype(np.float32) for i in inputs}

        step, prefill = feed(1), feed(tokens)
        repeats = self.cfg.validate.repeats
        sessions = {label: create_session(model) if label == "bitlinear"
                    else ort_session(model.SerializeToString()) for label, model in models.items()}
        pt.prefill_ms = interleaved_medians(
            {k: (lambda s=s: s.run(None, prefill)) for k, s in sessions.items()}, repeats,
            check=self.ctx.check_cancelled)
        if with_step:
            pt.step_ms = interleaved_medians(
                {k: (lambda s=s: s.run(None, step)) for k, s in sessions.items()}, max(repeats, 5) * 4,
                check=self.ctx.check_cancelled)
        for label in sessions:
            self.ctx.log(f"layer {layer} projections alone, {label}: prefill {pt.prefill_ms[label]:.2f} ms"
                         + (f", step {pt.step_ms[label]:.3f} ms" if with_step else ""))
        del sessions
        del models
        free_memory()
        return pt

    # the whole stage -----------------------------------------------------------------------

    def settings(self, measured: bool = True) -> dict[str, str]:
        """What a reader needs to reproduce the figures: when, with what, how measured."""
        def runs(repeats: int) -> int:      # interleaved_medians: three rounds of equal blocks
            return -(-repeats // 3) * 3

        from importlib.metadata import PackageNotFoundError, version

        def ver(name: str) -> str:
            try:
                return version(name)
            except PackageNotFoundError:
                return "?"

        v, r = self.cfg.validate, self.report
        off = sorted(n for n, on in r.overrides.items() if not on)
        on = sorted(n for n, on in r.overrides.items() if on)
        picks = (f"include {r.include}, exclude {r.exclude}"
                 + (f"; the app's selection file turns off {len(off)} node(s)"
                    + (f" ({', '.join(off[:4])}{', …' if len(off) > 4 else ''})" if off else "")
                    if off else "")
                 + (f"; turns on {len(on)}" if on else ""))
        k = self.kernel
        return {
            "kernel": f"BitLinear core {k['decode']} (one token), {k['prefill']} (prefill): {k['source']}",
            "generated": fmt_time(zone=True),
            "versions": ", ".join(f"{n} {ver(n)}" for n in ("tdpu", "onnxruntime", "onnxruntime-extensions",
                                                            "numba", "numpy", "onnx")),
            "replace": (f"layout {r.layout}, lm_head {r.lm_head}; {picks}"),
            "inputs": (f"seed {v.seed}, batch {1 if self.profile == 'icraft' else v.batch}, "
                       f"{self.tokens()} tokens; {min(v.sample_nodes, len(self.replaced))} of "
                       f"{len(self.replaced)} BitLinear nodes checked one by one"),
            "timing": (f"median of {runs(v.repeats)} runs (prefill) and {runs(max(v.repeats, 5) * 2)} "
                       f"runs (single-token step) per whole graph, {runs(v.repeats)} and "
                       f"{runs(max(v.repeats, 5) * 4)} for the projections alone; graphs taken in turns, "
                       "in three rounds" + "".join(
                           f"; the {label} graph in {n} segments, each segment's median of {v.repeats} and "
                           f"{max(v.repeats, 5) * 2} runs on its own, summed"
                           for label, n in self.segmented.items())
                       if measured else "not measured"),
            "pass": (f"argmax agreement ≥ {pct(MIN_ARGMAX_AGREEMENT)} (or within the reference's own "
                     "rounding floor), every checked integer core exact, every checked node within "
                     "the activation-quantization bound"),
        }

    def check_inputs(self) -> None:
        """Both graphs are there, whole, and the BitLinear graph was made from this export."""
        require_graph(self.paths.full_onnx, "export")
        require_graph(self.paths.bitlinear_onnx, "replace")
        from tdpu_tui.engine.rewrite.bitlinear import source_stamp
        made_from = self.report.source_stamp
        if made_from and made_from != source_stamp(self.paths.full_onnx):
            raise UsageError(f"{self.paths.bitlinear_onnx} was made from an earlier export: "
                              f"{self.paths.full_onnx} changed since the replace stage ran "
                              "(run replace, then validate)")

    def run(self, measure: bool = True) -> str:
        ctx = self.ctx
        self.check_inputs()
        if not self.replaced:
            raise StageFailed(f"{self.paths.replace_report}: no node was replaced; nothing to validate")
        tokens = self.tokens()
        for n in self.notes:
            ctx.log(n, "warning")
        if self.profile != "icraft":    # judged against the exported graph: no PyTorch reference
            ctx.cache.drop("reference")
        inputs = self.inputs(tokens)
        feed = self.feed(inputs)
        g = self.index(self.paths.bitlinear_onnx)
        sample = self.sample()
        bl_nodes = {n.name: n for n in g.graph.node if n.domain == BITLINEAR_DOMAIN}
        missing = [d["bitlinear"] for d in sample if d["bitlinear"] not in bl_nodes]
        if missing:
            raise StageFailed(f"{self.paths.bitlinear_onnx}: BitLinear node {missing[0]!r} listed in "
                              f"{self.paths.replace_report} is not in the graph (re-run replace)")
        missing = [d["bitlinear"] for d in self.bf16 if d["bitlinear"] not in bl_nodes]
        if missing:
            raise StageFailed(f"{self.paths.bitlinear_onnx}: LinearBF16 node {missing[0]!r} listed in "
                              f"{self.paths.replace_report} is not in the graph (re-run replace)")
        extra = [t for d in (*self.bf16, *sample)
                 for t in (bl_nodes[d["bitlinear"]].input[0], bl_nodes[d["bitlinear"]].output[0])]
        self.bar("accuracy", 0, 4, "running the original graph")
        original = self.run_original(feed, extra)
        self.bar("accuracy", 1, 4, "running the BitLinear graph")
        got = self.bitlinear_session(self.paths.bitlinear_onnx).run(["logits"], feed)[0]
        accuracy: dict[str, Any] = {}
        floor_why = ""
        if self.profile == "icraft":
            self.bar("accuracy", 2, 4, "running the PyTorch reference (quantize_activations=True)")
            verdict = self.versus_reference(inputs, got)
            want = verdict.want
            logits = verdict.metrics
            if verdict.floor is not None:
                accuracy["reference_floor"] = verdict.floor
                floor_why = verdict.why
            accuracy["compared"] = ("BitLinear graph vs the PyTorch reference with quantize_activations=True "
                                    "(the icraft graph keeps float activations, so it is not the target)")
            accuracy["vs_original"] = compare_logits(got, original["logits"])
        else:
            want = original["logits"]
            logits = compare_logits(got, want)
            accuracy["compared"] = ("BitLinear graph vs the exported graph, which quantizes activations "
                                    "in-graph exactly as BitLinear does")
        accuracy["logits"] = logits
        # Nothing after this needs the PyTorch reference (3.4 GiB at 2B4T, held by the run cache
        # since export; its logits are kept): it goes before the timing loads the graphs again.
        ctx.cache.drop("reference")
        ctx.log(f"logits: {format_comparison(logits)} ({accuracy['compared']})")
        why = explain_disagreement(got, want, logits["max_abs"])
        accuracy["explanations"] = [w for w in (why, floor_why) if w]
        for w in accuracy["explanations"]:
            ctx.log(w)

        self.bar("accuracy", 3, 4, "checking sampled nodes")
        checks = self.check_nodes(original, sample, g)
        del original
        checks_bl = [c for c in checks if c.layout != "bf16"]
        diagnoses = sorted({c.diagnosis for c in checks_bl if c.diagnosis})
        problems = []
        within_floor = bool(floor_why) and judge(logits, accuracy.get("reference_floor"))[0]
        if logits["argmax_agreement"] < MIN_ARGMAX_AGREEMENT and not within_floor:
            problems.append(f"argmax agreement {pct(logits['argmax_agreement'])} is below "
                            f"{pct(MIN_ARGMAX_AGREEMENT)}" + (f": {why}" if why else ""))
        if not logits.get("finite", True):
            problems.append("the BitLinear graph produced non-finite logits")
        bad_bf16 = [c.name for c in checks if c.layout == "bf16" and c.result != "ok"]
        if bad_bf16:
            problems.append(f"the bf16 lm_head {bad_bf16[0]} does not match the float graph's "
                            "(weights or float32 rounding bound)")
        bad_int = [c.name for c in checks_bl if not c.int_exact]
        if bad_int:
            problems.append(f"integer core differs from the int64 reference at {bad_int[0]}"
                            + (f" and {len(bad_int) - 1} more" if len(bad_int) > 1 else ""))
        bad_float = [c.name for c in checks_bl if c.result != "ok" and c.int_exact]
        if bad_float:
            problems.append(f"{len(bad_float)} of {len(checks_bl)} sampled nodes miss the "
                            f"activation-quantization bound (first {bad_float[0]})")
        problems += diagnoses

        perf = None
        if measure and not problems:
            perf = self.measure(tokens, inputs)
        elif problems:
            self.notes.append("performance not measured: the replaced graph failed validation")
        # A pass below the bar rests on the reference's rounding floor: the verdict says so.
        tolerance = floor_why if within_floor and logits["argmax_agreement"] < MIN_ARGMAX_AGREEMENT else ""
        verdict = verdict_line(problems, tolerance)
        charts = write_performance_report(
            self.paths.performance_report, self.meta.as_json(), accuracy, perf, [asdict(c) for c in checks], verdict,
            self.notes, self.settings(measured=perf is not None), root=self.cfg.base_dir)
        ctx.artifact("performance_report", self.paths.performance_report)
        for key, chart in charts.items():
            ctx.artifact(f"performance_chart_{key}", chart)
        self._metrics(logits, checks, diagnoses, perf)
        if problems:
            raise StageFailed("validation failed: " + "; ".join(problems))
        summary = (f"argmax agreement {pct(logits['argmax_agreement'])}"
                   + (" within tolerance: near ties at the reference's rounding floor" if tolerance else "")
                   + f", cosine {logits['cosine']:.6f}; {len(checks) - len(self.bf16)} nodes exact"
                   + (", bf16 lm_head weights exact" if self.bf16 else ""))
        if perf is not None:
            summary += f"; {perf.headline()}"
        return summary

    def _metrics(self, logits: dict, checks: list[NodeCheck], diagnoses: list[str],
                 perf: PerfResult | None) -> None:
        m = self.ctx.metric
        m("compared_against", "pytorch_reference_quantized" if self.profile == "icraft" else "original_graph")
        for key in ("max_abs", "mean_abs", "cosine", "argmax_agreement", "positions"):
            m(key, logits[key])
        bitlinear = [c for c in checks if c.layout != "bf16"]
        m("nodes_checked", len(bitlinear))
        m("int_core_exact", all(c.int_exact for c in bitlinear))
        bf16 = [c for c in checks if c.layout == "bf16"]
        if bf16:
            m("lm_head_bf16_ok", all(c.result == "ok" for c in bf16))
        m("layout_diagnosis", diagnoses[0] if diagnoses else None)
        m("replaced", len(self.replaced))
        m("kernel_path_decode", self.kernel["decode"])
        m("kernel_path_prefill", self.kernel["prefill"])
        if perf is None:
            return
        for gt in perf.graphs:
            m(f"{gt.label}_prefill_ms", gt.prefill_ms)
            m(f"{gt.label}_step_ms", gt.step_ms)
            m(f"{gt.label}_weight_bytes", gt.weight_bytes)
        m("prefill_tokens", perf.prefill_tokens)
        for key, value in perf.ratios().items():
            m(f"ratio_{key}", value)
        pt = perf.projections
        if pt is not None:
            m("projections_layer", pt.layer)
            for label in ("float", "bitlinear", "matmulnbits"):
                m(f"projections_{label}_prefill_ms", pt.prefill_ms.get(label))
                m(f"projections_{label}_step_ms", pt.step_ms.get(label))
            for which in ("step", "prefill"):
                m(f"ratio_projections_{which}_vs_float", pt.ratio(which, "bitlinear", "float"))
                m(f"ratio_projections_{which}_vs_matmulnbits", pt.ratio(which, "bitlinear", "matmulnbits"))


class ValidateStage(Stage):
    name = "validate"
    title = "Validate BitLinear graph"
    needs = ("replace",)
    bug_stage = "替换"

    def run(self, ctx: StageContext) -> str:
        return Validation(ctx).run()
