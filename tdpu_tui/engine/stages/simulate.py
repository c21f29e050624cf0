"""Stage `simulate`: the model run on the host and compared with the PyTorch reference.

`icraft run --backends Host` on the optimized graph when Icraft is there, else ONNX Runtime on
the exported graph; the verdict is judged against the reference's own rounding floor."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from tdpu_tui.engine.core.errors import StageFailed
from tdpu_tui.engine.core.stage import Stage, StageContext
from tdpu_tui.engine.icraft import driver as ic
from tdpu_tui.engine.model.compare import runs_in_segments, shared_session
from tdpu_tui.engine.osutil.files import atomic_write_bytes, human_bytes
from tdpu_tui.engine.records.compile_log import StageRecord
from tdpu_tui.engine.records.style import metric_rows, pct
from tdpu_tui.engine.stages.common import (
    exported_graph,
    read_export_meta,
    validation_inputs,
)
from tdpu_tui.engine.stages.icraft_run import ftmp_path, prepare_log_dir, run_component


def onnxruntime_logits(onnx_path: Path, name: str, feed: np.ndarray, cache=None) -> np.ndarray:
    """Logits of the graph at `onnx_path` on ONNX Runtime (the run's shared session with
    `cache`); a graph too large for one session runs in segments (`compare.graph_session`)."""
    from tdpu_tui.engine.model.compare import graph_session, onnx_logits, shared_session

    session = shared_session(cache, onnx_path) if cache is not None else graph_session(onnx_path)
    return np.asarray(onnx_logits(onnx_path, {name: feed}, session), dtype=np.float32)


def segments_note(session) -> str | None:
    """What the record says when `session` runs its graph in segments, else None."""
    segments = getattr(session, "segments", None)
    if not segments:
        return None
    return (f"the graph ({human_bytes(session.nbytes)} of weights) ran in {len(segments)} segments of "
            f"at most {human_bytes(max(g.nbytes for g in segments))} of weights each, one ONNX Runtime "
            "session loaded at a time (the same results as one session over the whole graph)")


def find_output_ftmp(log_dir: Path, cwd: Path, nbytes: int,
                     since: float | None = None) -> Path | None:
    """The dumped output feature map of this run (`driver.find_dump`): in its own log folder,
    else in Icraft's default one (`cwd/.icraft/logs`, written since `since`)."""
    return (ic.find_dump([log_dir], nbytes)
            or ic.find_dump([cwd / ".icraft" / "logs"], nbytes, newer_than=since))


def compare_with_reference(ctx: StageContext, ckpt, profile: str, name: str, feed: np.ndarray,
                           ids: np.ndarray, logits: np.ndarray, backend: str, record: StageRecord,
                           started: float, seed: int | None = None) -> str:
    """Judge `logits` (the model run on `backend`) against the PyTorch reference, record the
    verdict in the simulate section of the compile log, and fail when it does not hold.
    A local simulate and an imported Icraft run both end here."""
    from tdpu_tui.engine.model.agreement import versus_reference

    cfg = ctx.config
    ctx.progress(2, 3, "running the PyTorch reference")
    # The reference profile quantizes activations inside the graph; the icraft one is float.
    reference_inputs = ({"inputs_embeds": feed} if profile == "icraft"
                        else {"input_ids": ids.astype(np.int64)})
    verdict = versus_reference(ckpt, reference_inputs, logits, quantize=profile != "icraft",
                               cache=ctx.cache)
    cmp = verdict.metrics
    agreement = float(cmp["argmax_agreement"])
    for key in ("max_abs", "mean_abs", "argmax_agreement"):
        ctx.metric(key, float(cmp[key]))
    if "cosine" in cmp:
        ctx.metric("cosine", float(cmp["cosine"]))
    ctx.metric("backend", backend)
    ok = verdict.ok
    summary = (f"simulated on {backend}: argmax agreement {pct(agreement)}"
               + (" within tolerance" if ok and verdict.floor is not None else "") + ", "
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
    record.notes = ([(f"export profile: `{profile}` (reference quantizes activations: "
                     f"{profile != 'icraft'})"),
                    (f"input: `{name}` {list(feed.shape)} {feed.dtype}, token ids seeded "
                     f"with [validate].seed = {cfg.validate.seed if seed is None else seed}")]
                    + record.notes)
    if verdict.why:
        record.notes.append(verdict.why)
    record.extra = "\n".join(["| metric | value |", "|---|---|", *metric_rows(cmp)])
    record.write(ctx.paths.compile_log)
    ctx.artifact("icraft_compile_log", ctx.paths.compile_log)
    ctx.progress(3, 3, "done")
    if not ok:
        raise StageFailed(f"{summary}: {verdict.why}")
    return summary


class SimulateStage(Stage):
    name = "simulate"
    title = "simulate on the host"
    needs = ("export",)
    bug_stage = "仿真"
    log_section = "simulate"

    def run(self, ctx: StageContext) -> str:
        from tdpu_tui.engine.model.checkpoint import open_checkpoint

        started = time.time()
        cfg = ctx.config
        onnx_path = exported_graph(ctx)
        meta = read_export_meta(ctx)
        profile = meta.profile
        ctx.progress(0, 3, "loading the checkpoint")
        ckpt = open_checkpoint(meta.checkpoint)
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
        record = StageRecord("simulate", "running", started=started, root=cfg.base_dir)
        if fallback is None:
            logits = self._icraft_run(ctx, exe, oj, orw, name, feed, ids, meta, ckpt, record)
            backend = "icraft run (Host backend)"
        else:
            ctx.log(f"simulated on onnxruntime ({fallback})", "warning")
            t0 = time.perf_counter()
            logits = onnxruntime_logits(onnx_path, name, feed, ctx.cache)
            note = None
            if runs_in_segments(onnx_path):   # held by the run cache: its plan, not its weights
                note = segments_note(shared_session(ctx.cache, onnx_path))
            if note:
                record.notes.append(note)
                ctx.log(note)
            record.notes.append(f"ONNX Runtime on `{onnx_path}` in {time.perf_counter() - t0:.2f} s")
            backend = "onnxruntime (Icraft not installed)" if exe is None else "onnxruntime"
            record.notes.append(f"why not Icraft: {fallback}")

        return compare_with_reference(ctx, ckpt, profile, name, feed, ids, logits, backend,
                                      record, started)

    def _icraft_run(self, ctx, exe, oj, orw, name, feed, ids, meta, ckpt, record) -> np.ndarray:
        ftmp = ftmp_path(ctx, name)
        atomic_write_bytes(ftmp, np.ascontiguousarray(feed, dtype=np.float32).tobytes())
        ctx.artifact("icraft_input_ftmp", ftmp)
        log_dir = prepare_log_dir(ctx.paths.icraft_logs / "simulate")
        argv = ic.run_argv(exe, oj, orw, [ftmp], log_dir)
        run_component(ctx, exe, argv, [], log_dir, record)
        vocab = int(meta.vocab_size or ckpt.config.vocab_size)
        shape = (feed.shape[0], feed.shape[1], vocab)
        nbytes = int(np.prod(shape)) * 4
        out = find_output_ftmp(log_dir, ctx.paths.icraft_dir, nbytes,
                               since=(record.started or time.time()) - 2.0)
        if out is None:
            raise StageFailed(f"icraft run wrote no output feature map of {nbytes} bytes "
                              f"(float32 {list(shape)}) under {log_dir}/**/ftmp{ic.DUMP_FORMAT}/")
        ctx.log(f"output feature map: {out}")
        record.files.append(out)
        return np.fromfile(out, dtype=np.float32).reshape(shape)
