"""The runner both faces drive: the stages it is given, in that order, honouring `needs`.

A failed stage stops the stages that depend on it in the same run, not the others: they end
`skipped` with `blocked_by` naming the failed stage at the root. A cancel (`c` or quit in the
app, Ctrl-C in batch) ends the running stage `cancelled` and the stages after it `cancelled`
("not run: cancelled"); neither is a failure nor drafted as a bug record.
"""

from __future__ import annotations

import errno
import threading
import time
import traceback
from collections.abc import Callable, Iterable
from pathlib import Path

from tdpu_tui.engine.core import run_status
from tdpu_tui.engine.core.artifacts import Artifacts
from tdpu_tui.engine.core.cache import RunCache
from tdpu_tui.engine.core.config import Config
from tdpu_tui.engine.core.errors import Cancelled, ConfigError, StageFailed, TdpuError, UsageError
from tdpu_tui.engine.core.events import (
    Event, RunFinished, RunSummary, StageFinished, StageLog, StageResult, StageStarted, Status,
)
from tdpu_tui.engine.core.stage import EventSink, Skip, Stage, StageContext
from tdpu_tui.engine.osutil.files import human_bytes, remove_leftovers, with_filename

FailureHook = Callable[[StageResult, Config], None]
# The message of a stage Ctrl-C (or SIGTERM/SIGHUP, handled as Ctrl-C) stopped.
INTERRUPTED = "interrupted (Ctrl-C)"
_SPACE_ERRNOS = {errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", errno.ENOSPC)}
# The project's folders unusable (a file where [paths] names a folder — ENOTDIR, or EEXIST
# from making that folder —, no permission, a read-only or full file system): reported naming
# the file, not drafted as a bug of the model, the graphs or Icraft (SPEC §7).
_PLACE_ERRNOS = _SPACE_ERRNOS | {errno.ENOTDIR, errno.EISDIR, errno.EEXIST, errno.EACCES,
                                 errno.EPERM, errno.EROFS}


def os_error_message(exc: OSError) -> str:
    """`path: reason (hint)` for an error from the file system."""
    what = exc.strerror or str(exc)
    hint = ""
    if isinstance(exc, PermissionError) or exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        hint = (" — check its permissions (outputs go to [paths].output and [paths].logs of tdpu.toml; "
                "inputs are [model].source and the graphs the stages before wrote)")
    elif exc.errno in _SPACE_ERRNOS:
        hint = " — the disk is full"
    elif isinstance(exc, (NotADirectoryError, FileExistsError)):
        hint = (" — a file stands where a directory is expected (check [paths].output and "
                "[paths].logs of tdpu.toml)")
    where = exc.filename if exc.filename is not None else ""
    also = f" → {exc.filename2}" if getattr(exc, "filename2", None) else ""
    return f"{where}{also}: {what}{hint}" if where else f"{type(exc).__name__}: {what}{hint}"


class Pipeline:
    """Runs stages in registry order, honouring dependencies, emitting events."""

    def __init__(self, config: Config, stages: Iterable[Stage],
                 on_event: EventSink | None = None, cancel: threading.Event | None = None,
                 on_failure: FailureHook | None = None):
        self.config = config
        self.stages = list(stages)
        self.by_name = {s.name: s for s in self.stages}
        self.cancel = cancel or threading.Event()
        self.on_failure = on_failure
        self._sink = on_event or (lambda _e: None)
        self._lock = threading.Lock()
        self._interrupted = False
        self._status_warned = False
        self._notes: list[str] = []
        self._open_rows: set[str] = set()
        self.summary: RunSummary | None = None
        self.cache: RunCache | None = None

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.stages]

    def emit(self, event: Event) -> None:
        with self._lock:
            self._sink(event)

    def select(self, names: Iterable[str] | None) -> list[Stage]:
        if not names:
            return list(self.stages)
        wanted = list(dict.fromkeys(names))
        unknown = [n for n in wanted if n not in self.by_name]
        if unknown:
            raise KeyError(f"unknown stage {unknown[0]!r} (stages: {', '.join(self.names)})")
        return [s for s in self.stages if s.name in wanted]

    def run(self, names: Iterable[str] | None = None) -> RunSummary:
        selected = self.select(names)
        summary = self.summary = RunSummary()
        outcome: dict[str, Status] = {}
        # Stages that failed, or were not run because something they need failed: what needs
        # them must not run on the artifacts of an earlier run either.
        broken: dict[str, str] = {}     # stage -> the failed stage at the root
        cache = self.cache = RunCache()   # kept after the run for its load counts
        paths = Artifacts.of(self.config)
        self._notes = self._remove_leftovers(paths)
        try:
            for stage in selected:
                blocked = [d for d in stage.needs if d in broken]
                if self.cancel.is_set():
                    result = StageResult(stage.name, Status.CANCELLED, message="not run: cancelled")
                    self.emit(StageStarted(stage.name))
                elif blocked:
                    root = broken[blocked[0]]
                    result = StageResult(stage.name, Status.SKIPPED,
                                         message=f"not run: {root} failed", blocked_by=root)
                    self.emit(StageStarted(stage.name))
                else:
                    self._note_status(paths.run_status, stage.name, None)
                    result = self._run_one(stage, paths.run_logs / f"{stage.name}.log", cache)
                self._note_status(paths.run_status, stage.name, result)
                outcome[stage.name] = result.status
                if result.status is Status.FAILED:
                    broken[stage.name] = stage.name
                elif blocked:
                    broken[stage.name] = broken[blocked[0]]
                summary.results.append(result)
                self.emit(StageFinished(stage.name, result))
                if self._interrupted:
                    raise KeyboardInterrupt
                # A stage stopped by a cancel (c, quit, Ctrl-C) is not a bug to record: it ends
                # CANCELLED; a failure that raced a cancel is not drafted either.
                if (result.status is Status.FAILED and self.on_failure is not None
                        and not self.cancel.is_set()):
                    try:
                        self.on_failure(result, self.config)
                    except Exception as exc:  # a bug draft must never mask the stage's failure
                        self.emit(StageLog(stage.name, f"could not draft a bug record: {exc}",
                                           "warning"))
        except KeyboardInterrupt:
            summary.interrupted = True
            # Interrupted between recording a start and its outcome: the row must not stay "running".
            for name in list(self._open_rows):
                self._note_status(paths.run_status, name,
                                  StageResult(name, Status.CANCELLED, message=INTERRUPTED))
            raise
        finally:
            cache.clear()
            self.emit(RunFinished(None, summary))
        return summary

    def _note_status(self, path: Path, name: str, result: StageResult | None) -> None:
        """Record a stage's start (result None) or outcome for other processes (the app).
        A failure to write is a warning, never the stage's failure."""
        try:
            if result is None:
                self._open_rows.add(name)
                run_status.record_started(path, name)
            else:
                self._open_rows.discard(name)
                run_status.record_finished(path, result)
        except Exception as exc:
            if not self._status_warned:
                self._status_warned = True
                self.emit(StageLog(name, f"{path}: could not record the stage's status ({exc})",
                                   "warning"))

    @staticmethod
    def _remove_leftovers(paths: Artifacts) -> list[str]:
        """Remove what killed runs left in the output folder (staging copies, validation
        graphs) and beside the synthetic checkpoints (one being written); the lines to log
        about it."""
        removed = remove_leftovers(paths.output) + remove_leftovers(paths.synthetic_root)
        if not removed:
            return []
        total = sum(size for _, size in removed)
        names = ", ".join(p.name for p, _ in removed[:3]) + (", …" if len(removed) > 3 else "")
        return [f"removed {len(removed)} leftover(s) of an interrupted run in {paths.output} "
                f"({human_bytes(total)}): {names}"]

    def _run_one(self, stage: Stage, log_file: Path, cache: RunCache) -> StageResult:
        self.emit(StageStarted(stage.name))
        start = time.perf_counter()
        try:
            ctx = StageContext(self.config, stage.name, self.emit, self.cancel, log_file, cache)
        except OSError as exc:      # [paths].logs unusable: the stage cannot keep its log
            message = f"cannot write the stage log: {os_error_message(with_filename(exc, log_file))}"
            self.emit(StageLog(stage.name, message, "error"))
            # Where the stage keeps its log is the project's folders, never the model's bug.
            return StageResult(stage.name, Status.FAILED, time.perf_counter() - start, message,
                               log_tail=[message], usage_error=True)
        for note in self._notes:
            ctx.log(note)
        self._notes = []
        status, message, usage = Status.OK, "", False
        try:
            message = stage.run(ctx) or "done"
        except Skip as exc:
            status, message = Status.SKIPPED, str(exc)
        except Cancelled as exc:
            status, message = Status.CANCELLED, str(exc)
            ctx.log(message, "warning")
        except KeyboardInterrupt:
            status, message = Status.CANCELLED, INTERRUPTED
            ctx.log(message, "warning")
            self._interrupted = True
        except TdpuError as exc:
            # A configuration value a stage found wrong (a missing [icraft].op_table, impossible
            # [model.synthetic] shapes) is the user's to fix, as a stage run out of order is.
            status, message = Status.FAILED, str(exc)
            usage = isinstance(exc, (UsageError, ConfigError))
            ctx.log(message, "error")
        except OSError as exc:
            usage = exc.errno in _PLACE_ERRNOS
            if exc.filename is not None:   # the file system said no: name the file first
                status, message = Status.FAILED, os_error_message(exc)
                ctx.log(message, "error")
                for line in traceback.format_exc().rstrip().splitlines():
                    ctx.log(line, "debug")
            elif exc.errno in _SPACE_ERRNOS:   # a write that hit a full disk, somewhere
                status, message = Status.FAILED, (
                    f"{type(exc).__name__}: {exc.strerror or exc} — the disk is full (this stage writes "
                    f"to {ctx.paths.output} and {ctx.paths.logs})")
                for line in traceback.format_exc().rstrip().splitlines():
                    ctx.log(line, "error")
            else:                          # a pipe, a socket, a library: as any other error
                status, message = Status.FAILED, f"{type(exc).__name__}: {exc}"
                for line in traceback.format_exc().rstrip().splitlines():
                    ctx.log(line, "error")
        except Exception as exc:  # an unexpected error is still a stage failure, with its trace
            status, message = Status.FAILED, f"{type(exc).__name__}: {exc}"
            for line in traceback.format_exc().rstrip().splitlines():
                ctx.log(line, "error")
        finally:
            ctx.close()
        return StageResult(stage.name, status, time.perf_counter() - start, message,
                           ctx.artifacts, ctx.metrics, ctx.log_tail, usage_error=usage)


__all__ = ["Pipeline", "Skip", "Stage", "StageContext", "StageFailed", "Status"]
