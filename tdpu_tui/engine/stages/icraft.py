"""The Icraft stages: precheck, parse, optimize, simulate (SPEC §1, §6).

- `precheck` checks the exported graph against Icraft's op-support table; it fails only for a
  graph exported for Icraft (`[export] profile = "icraft"`) that still holds something
  unsupported.
- `parse` / `optimize` run `icraft parse` / `icraft optimize`; without the CLI they are skipped.
- `simulate` runs the model on the host — `icraft run --backends Host` on the optimized graph
  when Icraft is there, else ONNX Runtime on the exported graph — and compares its logits with
  the PyTorch reference.
Each stage records itself in its section of `phase3_logs/icraft_compile_log.md`.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from tdpu_tui.engine.icraft import driver as ic
from tdpu_tui.engine.records.compile_log import StageRecord
from tdpu_tui.engine.core.errors import Cancelled, StageFailed, TdpuError
from tdpu_tui.engine.osutil.files import atomic_write_bytes
from tdpu_tui.engine.core.pipeline import Skip, Stage, StageContext

ELEM_DTYPES = {1: np.float32, 6: np.int32, 7: np.int64, 10: np.float16, 11: np.float64}


def read_export_meta(ctx: StageContext) -> dict[str, Any]:
    path = ctx.paths.export_meta
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        ctx.log(f"{path} not found: assuming the reference profile", "warning")
        return {}
    except (OSError, ValueError) as exc:
        raise StageFailed(f"{path}: cannot read the export facts: {exc}") from None


def exported_graph(ctx: StageContext) -> Path:
    from tdpu_tui.engine.model.compare import require_graph
    return require_graph(ctx.paths.full_onnx, "export")


def graph_inputs(onnx_path: Path, seq_len: int) -> list[tuple[str, list[int], Any]]:
    """(name, fixed shape, numpy dtype) of each graph input.

    Icraft parses fixed shapes only: a dynamic first axis becomes the batch 1, any other
    dynamic axis the sequence length `seq_len`.
    """
    from tdpu_tui.engine.icraft.rules import load_graph

    graph = load_graph(onnx_path).graph
    inits = {t.name for t in graph.initializer}
    out = []
    for vi in graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        shape = []
        for axis, d in enumerate(tt.shape.dim):
            if d.HasField("dim_value") and d.dim_value > 0:
                shape.append(int(d.dim_value))
            else:
                shape.append(1 if axis == 0 else seq_len)
        out.append((vi.name, shape, ELEM_DTYPES.get(tt.elem_type, np.float32)))
    return out


def _files(*paths: Path) -> list[Path]:
    return [p for p in paths if p.exists()]


# --- precheck --------------------------------------------------------------------------------

class PrecheckStage(Stage):
    name = "precheck"
    title = "Icraft op precheck"
    needs = ("export",)

    def run(self, ctx: StageContext) -> str:
        from tdpu_tui.engine.icraft.optable import table_for
        from tdpu_tui.engine.icraft.rules import (
            precheck_model,
            summary_markdown,
            write_precheck_csv,
        )

        started = time.time()
        onnx_path = exported_graph(ctx)
        meta = read_export_meta(ctx)
        profile = meta.get("profile", "reference")
        table = table_for(ctx.config)
        ctx.log(f"op table: {table.origin} ({len(table)} ops)")
        ctx.progress(0, 2, "reading the graph (without weights)")
        report = precheck_model(onnx_path, table)
        ctx.progress(1, 2, "writing the results")
        net = ctx.config.icraft.net_name
        csv_path = ctx.paths.icraft_dir / f"{net}_precheck.csv"
        write_precheck_csv(csv_path, report)
        ctx.artifact("icraft_precheck_csv", csv_path)
        ctx.artifact("icraft_compile_log", ctx.paths.compile_log)

        counts = report.counts
        for cat, n in counts.items():
            ctx.metric(cat, n)
        ctx.metric("nodes", report.node_count)
        ctx.metric("blocking", len(report.blocking))
        for (op, cat), n in list(report.by_op().items())[:30]:
            ctx.log(f"{cat:12s} {op:20s} {n} node(s)", "warning" if cat != "advisory" else "info")

        blocking = len(report.blocking)
        found = ", ".join(f"{n} {cat}" for cat, n in counts.items() if n) or "no findings"
        notes = [f"export profile: `{profile}`"]
        failed = profile == "icraft" and blocking > 0
        if blocking and profile != "icraft":
            where = ctx.config.file.name if ctx.config.file else "tdpu.toml"
            hint = ('the reference profile is not meant for Icraft; export with '
                    f'[export] profile = "icraft" in {where}')
            notes.append(hint)
            ctx.log(hint, "warning")
        summary = f"{report.node_count} nodes checked: {found}"
        StageRecord(
            "precheck", "failed" if failed else "ok", summary=summary, started=started,
            seconds=time.time() - started, files=[csv_path], notes=notes,
            extra=summary_markdown(report, csv_path),
        ).write(ctx.paths.compile_log)
        ctx.progress(2, 2, "done")
        if failed:
            raise StageFailed(f"{blocking} node(s) Icraft does not support in the icraft-profile "
                              f"graph ({found}); see {csv_path}")
        return summary + (f"; {blocking} blocking for Icraft (reference profile: not failed)"
                          if blocking else "")


# --- parse / optimize ------------------------------------------------------------------------

def _prepare_log_dir(path: Path) -> Path:
    """A fresh log folder for this run (Icraft rewrites its logs; old ones would mislead)."""
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def run_component(ctx: StageContext, exe: Path, argv: list[str], outputs: list[Path],
                  log_dir: Path, record: StageRecord) -> ic.RunResult:
    """Run one Icraft command, record it, and fail the stage if Icraft failed."""
    cfg = ctx.config
    cwd = ctx.paths.icraft_dir
    ctx.log("$ " + " ".join(argv))
    for out in outputs:     # so a stale output from an earlier run is never taken for this one's
        out.unlink(missing_ok=True)
    record.command, record.cwd, record.started = argv, cwd, time.time()
    lines = 0

    def on_line(line: str, level: str, source: str) -> None:
        nonlocal lines
        lines += 1
        ctx.log(line, level, source)
        if lines % 50 == 0 and not ctx.cancelled:   # cancellation is the driver's to handle
            ctx.progress(lines, None, f"{lines} log lines")

    try:
        res = ic.run_icraft(argv, cwd=cwd, log_dirs=[log_dir], timeout_s=cfg.icraft.timeout_s,
                            on_line=on_line, cancelled=lambda: ctx.cancelled)
    except KeyboardInterrupt:
        record.status = "failed"
        record.summary = "interrupted (Ctrl-C); the icraft process group was killed"
        record.seconds = time.time() - record.started
        record.write(ctx.paths.compile_log)
        raise
    except OSError as exc:  # found but cannot be started (bad interpreter line, no permission)
        record.status, record.summary = "failed", f"cannot start {argv[0]}: {exc}"
        record.write(ctx.paths.compile_log)
        where = cfg.file or "the configuration"
        raise StageFailed(f"cannot start the Icraft CLI {argv[0]} ([icraft].bin in {where}): "
                          f"{exc}") from None
    copied = ic.copy_logs(res.log_files, log_dir)
    copied += sorted(log_dir.rglob("*_precheck.csv"))   # icraft parse's own precheck
    if res.stray_killed:
        ctx.log("Icraft left processes behind; they were killed", "warning")
    missing = [p for p in outputs if not p.exists()]
    ok = res.ok and not missing
    record.seconds = res.seconds
    record.exit_status = res.returncode
    record.error_code = res.error_code
    record.error_text = ic.explain_code(res.error_code)
    record.log_tail = res.tail
    record.status = "ok" if ok else "failed"
    record.files = _files(*outputs) + copied
    if res.ok and missing:
        record.summary = ("Icraft reported success but did not write "
                          + ", ".join(p.name for p in missing))
    elif not res.ok:
        record.summary = res.reason()
    record.write(ctx.paths.compile_log)
    ctx.artifact("icraft_compile_log", ctx.paths.compile_log)
    ctx.metric("seconds", round(res.seconds, 3))
    ctx.metric("exit_status", res.returncode)
    if res.error_code is not None:
        ctx.metric("error_code", res.error_code)
    if res.cancelled:
        raise Cancelled(f"stage '{ctx.stage}' cancelled (icraft stopped)")
    if not ok:
        raise StageFailed(f"icraft {argv[1]} failed: {record.summary} "
                          f"(command and log in {ctx.paths.compile_log})")
    return res


def _write_toml(ctx: StageContext, onnx_path: Path, inputs) -> Path:
    cfg = ctx.config
    base = ctx.paths.icraft_dir
    path = base / f"{cfg.icraft.net_name}.toml"
    text = ic.compile_toml(cfg, base, onnx_path, [s for _, s, _ in inputs],
                           [ftmp_path(ctx, n) for n, _, _ in inputs])
    atomic_write_bytes(path, text.encode("utf-8"))
    ctx.artifact("icraft_toml", path)
    return path


def ftmp_path(ctx: StageContext, input_name: str) -> Path:
    return ctx.paths.icraft_dir / "inputs" / f"{input_name}.ftmp"


def _require_cli(ctx: StageContext) -> Path:
    exe = ic.find_cli(ctx.config)
    if exe is None:
        reason = ic.missing_cli_reason(ctx.config)
        try:
            StageRecord(ctx.stage, "skipped", summary=reason).write(ctx.paths.compile_log)
        except (OSError, TdpuError) as exc:  # a log that cannot be written does not turn a skip
            ctx.log(f"{ctx.paths.compile_log}: not updated ({getattr(exc, 'strerror', None) or exc})",
                    "warning")
        raise Skip(reason)
    return exe


class ParseStage(Stage):
    name = "parse"
    title = "icraft parse"
    needs = ("precheck",)

    def run(self, ctx: StageContext) -> str:
        exe = _require_cli(ctx)
        cfg = ctx.config
        onnx_path = exported_graph(ctx)
        inputs = graph_inputs(onnx_path, cfg.export.seq_len)
        toml_path = _write_toml(ctx, onnx_path, inputs)
        jr = ctx.paths.icraft_dir
        log_dir = _prepare_log_dir(ctx.paths.icraft_logs / "parse")
        outputs = list(ic.parsed_files(jr, cfg.icraft.net_name, "parsed"))
        for stale in ic.parsed_files(jr, cfg.icraft.net_name, "optimized"):
            stale.unlink(missing_ok=True)   # it came from the parsed graph being replaced
        argv = ic.parse_argv(exe, cfg, onnx_path, [s for _, s, _ in inputs], jr, log_dir)
        record = StageRecord("parse", "running", notes=[f"same run by hand: `{toml_path}`"])
        res = run_component(ctx, exe, argv, outputs, log_dir, record)
        for p in outputs:
            ctx.artifact(f"icraft_{p.suffix[1:]}_parsed", p)
        return f"{outputs[0].name} + .raw in {res.seconds:.1f} s"


class OptimizeStage(Stage):
    name = "optimize"
    title = "icraft optimize"
    needs = ("parse",)

    def run(self, ctx: StageContext) -> str:
        exe = _require_cli(ctx)
        cfg = ctx.config
        jr = ctx.paths.icraft_dir
        pj, pr = ic.parsed_files(jr, cfg.icraft.net_name, "parsed")
        missing = [p for p in (pj, pr) if not p.exists()]
        if missing:
            raise StageFailed(f"{missing[0]} not found: run the parse stage first")
        log_dir = _prepare_log_dir(ctx.paths.icraft_logs / "optimize")
        outputs = list(ic.parsed_files(jr, cfg.icraft.net_name, "optimized"))
        argv = ic.optimize_argv(exe, cfg, pj, pr, jr, log_dir)
        notes = [f"passes switched on: {', '.join(cfg.icraft.pass_on) or 'none'}"]
        res = run_component(ctx, exe, argv, outputs, log_dir,
                            StageRecord("optimize", "running", notes=notes))
        for p in outputs:
            ctx.artifact(f"icraft_{p.suffix[1:]}_optimized", p)
        return f"{outputs[0].name} + .raw in {res.seconds:.1f} s"


# --- simulate --------------------------------------------------------------------------------

def validation_inputs(ctx: StageContext, meta: dict[str, Any], onnx_path: Path, ckpt):
    """Seeded token ids, and the graph's inputs built from them (embeddings for `icraft`)."""
    from tdpu_tui.engine.model.compare import seeded_inputs

    inputs = graph_inputs(onnx_path, ctx.config.export.seq_len)
    if len(inputs) != 1:
        raise StageFailed(f"{onnx_path}: expected one graph input, found {len(inputs)}")
    name, shape, dtype = inputs[0]
    seeded = seeded_inputs(ckpt, meta.get("profile", "reference"), shape[0], shape[1],
                           ctx.config.validate.seed)
    # Icraft's .ftmp inputs carry token ids as float32 too.
    feed = seeded.get("inputs_embeds", seeded["input_ids"]).astype(dtype, copy=False)
    if list(feed.shape) != shape:
        raise StageFailed(f"{onnx_path}: input '{name}' expects shape {shape}, "
                          f"the validation input has {list(feed.shape)}")
    return seeded["input_ids"], name, feed


def onnxruntime_logits(onnx_path: Path, name: str, feed: np.ndarray) -> np.ndarray:
    from tdpu_tui.engine.model.compare import onnx_logits

    return np.asarray(onnx_logits(onnx_path, {name: feed}), dtype=np.float32)


def find_output_ftmp(log_dir: Path, cwd: Path, nbytes: int) -> Path | None:
    """The dumped output feature map: a `.ftmp` under `ftmpSFB/` of the logits' size.

    icraft run dumps into `<log_path>/<network>/ftmp<format>/` (1_Start_Running.md §1); the
    manuals do not name the files, so the logits are recognised by their byte size.
    """
    candidates = []
    for root in (log_dir, cwd / ".icraft" / "logs"):
        if root.is_dir():
            candidates += [p for p in root.rglob("*.ftmp")
                           if p.parent.name == f"ftmp{ic.DUMP_FORMAT}" and p.stat().st_size == nbytes]
    return max(candidates, key=lambda p: p.stat().st_mtime) if candidates else None


class SimulateStage(Stage):
    name = "simulate"
    title = "simulate on the host"
    needs = ("export",)

    def run(self, ctx: StageContext) -> str:
        from tdpu_tui.engine.model.agreement import versus_reference
        from tdpu_tui.engine.model.checkpoint import open_checkpoint

        started = time.time()
        cfg = ctx.config
        onnx_path = exported_graph(ctx)
        meta = read_export_meta(ctx)
        profile = meta.get("profile", "reference")
        if not meta.get("checkpoint"):
            raise StageFailed(f"{ctx.paths.export_meta}: no 'checkpoint' entry: re-run export")
        ctx.progress(0, 3, "loading the checkpoint")
        ckpt = open_checkpoint(meta["checkpoint"])
        ids, name, feed = validation_inputs(ctx, meta, onnx_path, ckpt)

        exe = ic.find_cli(cfg)
        oj, orw = ic.parsed_files(ctx.paths.icraft_dir, cfg.icraft.net_name, "optimized")
        fallback = None
        if exe is None:
            fallback = f"{ic.missing_cli_reason(cfg)}"
        elif not (oj.exists() and orw.exists()):
            fallback = f"Icraft found but {oj.name} is missing: run parse and optimize first"
        elif oj.stat().st_mtime < onnx_path.stat().st_mtime:
            fallback = f"{oj.name} is older than the exported graph: run parse and optimize again"

        ctx.progress(1, 3, "running the model")
        record = StageRecord("simulate", "running", started=started)
        if fallback is None:
            logits = self._icraft_run(ctx, exe, oj, orw, name, feed, ids, meta, ckpt, record)
            backend = "icraft run (Host backend)"
        else:
            ctx.log(f"simulated on onnxruntime ({fallback})", "warning")
            t0 = time.perf_counter()
            logits = onnxruntime_logits(onnx_path, name, feed)
            record.notes.append(f"ONNX Runtime on `{onnx_path}` in {time.perf_counter() - t0:.2f} s")
            backend = "onnxruntime (Icraft not installed)" if exe is None else "onnxruntime"
            record.notes.append(f"why not Icraft: {fallback}")

        ctx.progress(2, 3, "running the PyTorch reference")
        # The reference profile quantizes activations inside the graph; the icraft one is float.
        reference_inputs = ({"inputs_embeds": feed} if profile == "icraft"
                            else {"input_ids": ids.astype(np.int64)})
        verdict = versus_reference(ckpt, reference_inputs, logits, quantize=profile != "icraft")
        cmp = verdict.metrics
        agreement = float(cmp["argmax_agreement"])
        for key in ("max_abs", "mean_abs", "argmax_agreement"):
            ctx.metric(key, float(cmp[key]))
        if "cosine" in cmp:
            ctx.metric("cosine", float(cmp["cosine"]))
        ctx.metric("backend", backend)
        ok = verdict.ok
        summary = (f"simulated on {backend}: argmax agreement {agreement:.2%}, "
                   f"max |Δ| {float(cmp['max_abs']):.3g}, mean |Δ| {float(cmp['mean_abs']):.3g} "
                   f"vs the PyTorch reference")
        ctx.log(summary)
        if verdict.floor is not None:
            ctx.metric("reference_floor", verdict.floor)
        if verdict.why:
            ctx.log(verdict.why, "info" if ok else "error")
        record.status = "ok" if ok else "failed"
        record.summary = summary
        record.seconds = time.time() - started
        record.notes = [f"export profile: `{profile}` (reference quantizes activations: "
                        f"{profile != 'icraft'})",
                        f"input: `{name}` {list(feed.shape)} {feed.dtype}, token ids seeded "
                        f"with [validate].seed = {cfg.validate.seed}"] + record.notes
        if verdict.why:
            record.notes.append(verdict.why)
        record.extra = "\n".join(["| metric | value |", "|---|---|"]
                                 + [f"| {k} | {float(cmp[k]):.6g} |"
                                    for k in ("max_abs", "mean_abs", "cosine", "argmax_agreement")
                                    if k in cmp])
        record.write(ctx.paths.compile_log)
        ctx.artifact("icraft_compile_log", ctx.paths.compile_log)
        ctx.progress(3, 3, "done")
        if not ok:
            raise StageFailed(f"{summary}: {verdict.why}")
        return summary

    def _icraft_run(self, ctx, exe, oj, orw, name, feed, ids, meta, ckpt, record) -> np.ndarray:
        ftmp = ftmp_path(ctx, name)
        atomic_write_bytes(ftmp, np.ascontiguousarray(feed, dtype=np.float32).tobytes())
        ctx.artifact("icraft_input_ftmp", ftmp)
        log_dir = _prepare_log_dir(ctx.paths.icraft_logs / "simulate")
        argv = ic.run_argv(exe, oj, orw, [ftmp], log_dir)
        run_component(ctx, exe, argv, [], log_dir, record)
        vocab = int(meta.get("vocab_size") or ckpt.config.vocab_size)
        shape = (feed.shape[0], feed.shape[1], vocab)
        nbytes = int(np.prod(shape)) * 4
        out = find_output_ftmp(log_dir, ctx.paths.icraft_dir, nbytes)
        if out is None:
            raise StageFailed(f"icraft run wrote no output feature map of {nbytes} bytes "
                              f"(float32 {list(shape)}) under {log_dir}/**/ftmp{ic.DUMP_FORMAT}/")
        ctx.log(f"output feature map: {out}")
        record.files.append(out)
        return np.fromfile(out, dtype=np.float32).reshape(shape)
