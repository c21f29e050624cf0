"""Icraft on another machine: the hand-off bundle parse writes, and `tdpu icraft import` of
the results that come back (see `docs/icraft.md`).

An import is recorded like a local run: the parse, optimize and simulate sections of
`icraft_compile_log.md`, the rows of `phase3_logs/runs/status.json`, the stage logs in
`phase3_logs/runs/`, and a bug draft per distinct failure; every record says it was imported.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tdpu_tui.engine.core import run_status
from tdpu_tui.engine.core.config import Config
from tdpu_tui.engine.core.errors import Cancelled, ConfigError, ExitCode, StageFailed, TdpuError
from tdpu_tui.engine.core.manifests import export_identity
from tdpu_tui.engine.core.events import (
    Event,
    StageFinished,
    StageLog,
    StageResult,
    StageStarted,
    Status,
)
from tdpu_tui.engine.core.stage import StageContext
from tdpu_tui.engine.icraft import bundle as bd
from tdpu_tui.engine.icraft import driver as ic
from tdpu_tui.engine.icraft import importer as imp
from tdpu_tui.engine.records.compile_log import StageRecord
from tdpu_tui.engine.stages.common import (
    exported_graph,
    graph_inputs,
    read_export_meta,
    validation_inputs,
)

# Icraft's commands and the tdpu stages whose records they fill.
STAGE_OF = {"parse": "parse", "optimize": "optimize", "run": "simulate"}
IMPORT_DIR = "icraft_import"


# --- the bundle -------------------------------------------------------------------------------

def write_handoff(ctx: StageContext) -> bd.Bundle:
    """Write the hand-off bundle for the current export into the Icraft output folder."""
    from tdpu_tui import __version__
    from tdpu_tui.engine.model.checkpoint import open_checkpoint

    cfg = ctx.config
    onnx_path = exported_graph(ctx)
    meta = read_export_meta(ctx)
    inputs = graph_inputs(onnx_path, cfg.export.seq_len)
    input_data, missing = None, ""
    try:
        ckpt = open_checkpoint(meta.checkpoint)
        _ids, name, feed = validation_inputs(ctx, meta, onnx_path, ckpt)
        input_data = {name: np.ascontiguousarray(feed, dtype=np.float32).tobytes()}
        vocab = int(meta.vocab_size or ckpt.config.vocab_size)
    except (TdpuError, OSError) as exc:
        missing = f"the seeded input could not be built: {exc}"
        ctx.log(f"hand-off bundle without its input: {exc}", "warning")
        vocab = int(meta.vocab_size or 0)
    shape = inputs[0][1] if len(inputs) == 1 else None
    out_shape = [shape[0], shape[1], vocab] if shape and len(shape) >= 2 and vocab else None
    bundle = bd.write_bundle(cfg, ctx.paths.icraft_dir, onnx_path, meta.as_json(), inputs, input_data,
                             missing, cfg.validate.seed, out_shape, __version__)
    for f in bundle.files:
        ctx.log(f"hand-off bundle: {f.describe()}")
    ctx.artifact("icraft_bundle", bundle.folder)
    ctx.artifact("icraft_toml", bundle.toml)
    return bundle


def handoff_hint(bundle: bd.Bundle) -> str:
    """What to do with the bundle when Icraft cannot run here."""
    return (f"hand-off bundle ready: copy {bundle.folder} to the Windows host, run "
            f"`powershell -ExecutionPolicy Bypass -File run_icraft.ps1` in it (or `sh run_icraft.sh` "
            f"with $ICRAFT set), then bring it back with `tdpu icraft import <folder or zip>`")


# --- importing --------------------------------------------------------------------------------

@dataclass
class ImportReport:
    source: Path
    root: Path | None = None
    refused: str = ""
    results: list[StageResult] = field(default_factory=list)
    drafted: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        if self.refused:
            return ExitCode.USAGE
        if any(r.status is Status.FAILED for r in self.results):
            return ExitCode.FAILURE
        return ExitCode.OK


def _unpack(cfg: Config, source: Path) -> Path:
    if source.is_dir():
        return imp.find_root(source)
    if source.is_file():
        dest = cfg.output_dir / IMPORT_DIR / (source.stem or "bundle")
        return imp.find_root(imp.safe_extract(source, dest))
    raise imp.BundleError(f"{source}: no such folder or zip file")


def _check_same_export(ctx: StageContext, manifest: dict, root: Path) -> None:
    paths = ctx.paths
    if not paths.full_onnx.exists() or not paths.export_meta.exists():
        raise imp.BundleError(f"this project has no export ({paths.full_onnx}): the bundle in "
                              f"{root} was made from {bd.describe_identity(manifest['export'])}")
    meta = read_export_meta(ctx)
    here = export_identity(paths.full_onnx, meta.as_json())
    theirs = manifest["export"]
    if here != theirs:
        raise imp.BundleError(
            f"{root / bd.BUNDLE_JSON}: the bundle was made from another export — bundle: "
            f"{bd.describe_identity(theirs)}; this project ({paths.export_meta}): "
            f"{bd.describe_identity(here)}. Make a new bundle (`tdpu icraft bundle`) and run "
            "Icraft on it again")


def import_bundle(cfg: Config, source: str | Path, on_event: Callable[[Event], None] | None = None,
                  *, bug_drafts: bool = True, cancel: threading.Event | None = None) -> ImportReport:
    """Read a bundle folder or zip after Icraft ran in it and record what happened."""
    from tdpu_tui.engine.core.artifacts import Artifacts
    from tdpu_tui.engine.core.config import check_net_name

    emit = on_event or (lambda _e: None)
    cancel = cancel or threading.Event()
    paths = Artifacts.of(cfg)
    report = ImportReport(Path(source))
    probe = StageContext(cfg, "import", emit, cancel)
    try:
        root = report.root = _unpack(cfg, Path(source).expanduser().resolve())
        manifest = imp.read_manifest(root)
        net = str(manifest["net_name"])
        try:
            check_net_name(net, root / bd.BUNDLE_JSON)
        except ConfigError as exc:
            raise imp.BundleError(str(exc).replace("key 'icraft.net_name'", "'net_name'")) from None
        _check_same_export(probe, manifest, root)
    except (imp.BundleError, OSError) as exc:
        report.refused = str(exc)
        return report
    finally:
        probe.close()

    where = f"imported from {report.source}"
    if report.root != report.source.resolve():
        where += f" (unpacked in {report.root})"
    made = (f"bundle made {manifest.get('made_at', '?')} by tdpu "
            f"{manifest.get('tdpu_version', '?')}")
    broken: str | None = None
    for command, stage in STAGE_OF.items():
        if cancel.is_set():
            break
        ctx = StageContext(cfg, stage, emit, cancel, paths.run_logs / f"{stage}.log")
        emit(StageStarted(stage))
        _note(paths.run_status, stage, None)
        started = time.time()
        outcome = imp.read_command(root, net, command)
        blocked_by = None
        try:
            if broken is not None:
                status, message, blocked_by = (Status.SKIPPED,
                                               f"not run: {broken} failed (imported)", broken)
            elif not outcome.ran:
                status, message = Status.SKIPPED, f"imported: {outcome.reason()}"
                StageRecord(stage, "skipped", summary=message, started=started,
                            notes=[where, made], root=cfg.base_dir).write(paths.compile_log)
            elif command != "run" or not outcome.ok:
                status, message = _record_command(ctx, root, manifest, outcome, stage, where,
                                                  made, started)
            else:
                status, message = _record_run(ctx, root, manifest, outcome, where, made, started)
        except Cancelled:        # the app's cancel: not a failure of the Icraft host's run
            status, message = Status.CANCELLED, f"import cancelled during {stage}"
            ctx.log(message, "warning")
        except (TdpuError, OSError) as exc:
            status, message = Status.FAILED, f"imported: {exc}"
            ctx.log(message, "error")
        except KeyboardInterrupt:   # the status row must not stay "running"
            _note(paths.run_status, stage,
                  StageResult(stage, Status.CANCELLED, time.time() - started,
                              "import interrupted (Ctrl-C)"))
            raise
        finally:
            ctx.close()
        result = StageResult(stage, status, time.time() - started, message, ctx.artifacts,
                             ctx.metrics, outcome.tail or ctx.log_tail, blocked_by)
        _note(paths.run_status, stage, result)
        report.results.append(result)
        emit(StageFinished(stage, result))
        if status is Status.FAILED:
            broken = broken or stage
            if bug_drafts:
                _draft(paths.bugs, result, report, emit)
        elif blocked_by:
            broken = broken or blocked_by
    return report


def _note(path: Path, stage: str, result: StageResult | None) -> None:
    try:
        if result is None:
            run_status.record_started(path, stage)
        else:
            run_status.record_finished(path, result)
    except Exception:  # the status file is a courtesy to other processes, never the outcome
        pass


def _draft(bugs: Path, result: StageResult, report: ImportReport, emit) -> None:
    from tdpu_tui.engine.records.bugbook import record_failure
    from tdpu_tui.engine.stages import bug_stages
    try:
        record, created = record_failure(bugs, result.name, result.message, result.log_tail,
                                         bug_stages=bug_stages())
    except Exception as exc:  # a bug draft must never mask the failure itself
        emit(StageLog(result.name, f"could not draft a bug record: {exc}", "warning"))
        return
    if record is not None:
        verb = "drafted" if created else "already recorded as"
        report.drafted.append(f"{verb} Bug #{record.number}")
        emit(StageLog(result.name, f"{verb} Bug #{record.number} in {bugs}", "info"))


def _record_command(ctx: StageContext, root: Path, manifest: dict, outcome: imp.CommandOutcome,
                    stage: str, where: str, made: str, started: float) -> tuple[Status, str]:
    command = outcome.command
    for line in outcome.tail:
        ctx.log(line, ic.line_level(line), "imported")
    ok = outcome.ok
    record = StageRecord(stage, "ok" if ok else "failed", summary="" if ok else outcome.reason(),
                         command=["icraft", command, manifest["toml"]], cwd=root,
                         started=started, exit_status=outcome.exit_status,
                         error_code=outcome.error.code,
                         error_text=ic.explain_code(outcome.error.code), log_tail=outcome.tail,
                         files=outcome.log_files + _existing(root, manifest, command),
                         notes=[where, made], root=ctx.config.base_dir)
    record.seconds = None
    record.write(ctx.paths.compile_log)
    ctx.artifact("icraft_compile_log", ctx.paths.compile_log)
    if outcome.error.code is not None:
        ctx.metric("error_code", outcome.error.code)
    if ok:
        return Status.OK, f"imported: icraft {command} ok on the Icraft host"
    return Status.FAILED, (f"imported: icraft {command} failed on the Icraft host: "
                           f"{outcome.reason()} (log in {ctx.paths.compile_log})")


def _existing(root: Path, manifest: dict, command: str) -> list[Path]:
    net = manifest["net_name"]
    stage = {"parse": "parsed", "optimize": "optimized"}.get(command)
    return [p for p in ic.parsed_files(root, net, stage) if p.exists()] if stage else []


def _record_run(ctx: StageContext, root: Path, manifest: dict, outcome: imp.CommandOutcome,
                where: str, made: str, started: float) -> tuple[Status, str]:
    from tdpu_tui.engine.model.checkpoint import open_checkpoint
    from tdpu_tui.engine.stages.simulate import compare_with_reference

    meta = read_export_meta(ctx)
    rows = manifest.get("inputs") or []
    record = StageRecord("simulate", "running", started=started, cwd=root,
                         command=["icraft", "run", manifest["toml"]],
                         exit_status=outcome.exit_status, log_tail=outcome.tail,
                         notes=[where, made], root=ctx.config.base_dir)
    if len(rows) != 1 or "sha256" not in rows[0]:
        raise StageFailed(f"{root / bd.BUNDLE_JSON}: the bundle holds no seeded input "
                          f"({manifest.get('input_missing') or 'none recorded'})")
    row = rows[0]
    ftmp = root / row["file"]
    data = ftmp.read_bytes()
    if hashlib.sha256(data).hexdigest() != row["sha256"]:
        raise StageFailed(f"{ftmp}: not the input tdpu wrote into the bundle (its sha256 differs "
                          f"from {bd.BUNDLE_JSON})")
    shape = [int(d) for d in row["shape"]]
    feed = np.frombuffer(data, dtype=np.float32).reshape(shape)
    out = manifest.get("output") or {}
    nbytes = int(out["bytes"]) if out.get("bytes") else None
    dump = imp.find_dump(root, nbytes)
    if dump is None:
        raise StageFailed("imported: icraft run wrote no output feature map"
                          + (f" of {nbytes} bytes" if nbytes else "")
                          + f" under {root / bd.LOG_DIRS['run']}/**/ftmp{ic.DUMP_FORMAT}/")
    record.files = outcome.log_files + [dump]
    ctx.log(f"output feature map: {dump}")
    logits = np.fromfile(dump, dtype=np.float32)
    if out.get("shape"):
        logits = logits.reshape([int(d) for d in out["shape"]])
    ckpt = open_checkpoint(meta.checkpoint)
    profile = meta.profile
    ids = feed.astype(np.int64) if profile != "icraft" else np.zeros(shape[:2], np.int64)
    summary = compare_with_reference(ctx, ckpt, profile, row["name"], feed.copy(), ids, logits,
                                     "icraft run on the Icraft host (imported)", record, started,
                                     seed=row.get("seed"))
    return Status.OK, f"imported: {summary}"
