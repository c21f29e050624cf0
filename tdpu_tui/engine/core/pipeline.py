"""Stages, their dependencies, and the runner that both faces drive.

A stage is an object with a `name`, the names it `needs`, and `run(ctx)`. It reports through
its context (progress, log lines, artifacts, metrics) and never prints. It ends
- `ok` by returning a one-line message,
- `skipped` by raising `Skip(reason)`,
- `failed` by raising anything else (`StageFailed` for an expected failure, no traceback).
A failed stage stops the stages that depend on it in the same run, not the others.
"""

from __future__ import annotations

import collections
import errno
import threading
import time
import traceback
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from tdpu_tui.engine.core.artifacts import Artifacts
from tdpu_tui.engine.core.config import Config
from tdpu_tui.engine.core.errors import Cancelled, StageFailed, TdpuError
from tdpu_tui.engine.core.events import (
    Event, RunFinished, RunSummary, StageFinished, StageLog, StageProgress, StageResult,
    StageStarted, Status,
)

EventSink = Callable[[Event], None]
LOG_TAIL_LINES = 40


class Skip(TdpuError):
    """Raised by a stage to end as `skipped`; the message is the reason."""


class StageContext:
    """What a running stage sees: configuration, artifact paths, and the reporting calls."""

    def __init__(self, config: Config, stage: str, emit: EventSink, cancel: threading.Event,
                 state: dict[str, Any], log_file: Path | None = None):
        self.config = config
        self.paths = Artifacts.of(config)
        self.stage = stage
        self.state = state  # shared by the stages of one run (e.g. the loaded checkpoint)
        self.artifacts: dict[str, str] = {}
        self.metrics: dict[str, Any] = {}
        self._emit = emit
        self._cancel = cancel
        self._tail: collections.deque[str] = collections.deque(maxlen=LOG_TAIL_LINES)
        self._log_fh = None
        if log_file is not None:
            log_file.parent.mkdir(parents=True, exist_ok=True)
            self._log_fh = open(log_file, "w", encoding="utf-8", buffering=1)  # noqa: SIM115
        self.log_file = log_file

    def progress(self, done: float, total: float | None = None, note: str = "") -> None:
        self.check_cancelled()
        self._emit(StageProgress(self.stage, done, total, note))

    def log(self, line: str, level: str = "info", source: str = "") -> None:
        for part in str(line).splitlines() or [""]:
            if level != "debug":           # the tail feeds bug drafts and the app's error view
                self._tail.append(part)
            event = StageLog(self.stage, part, level, source)
            if self._log_fh is not None:
                self._log_fh.write(f"{event.text}\n")
            self._emit(event)

    def artifact(self, name: str, path: str | Path) -> None:
        self.artifacts[name] = str(path)

    def metric(self, name: str, value: Any) -> None:
        self.metrics[name] = value

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def check_cancelled(self) -> None:
        if self._cancel.is_set():
            raise Cancelled(f"stage '{self.stage}' cancelled")

    @property
    def log_tail(self) -> list[str]:
        return list(self._tail)

    def close(self) -> None:
        if self._log_fh is not None:
            self._log_fh.close()
            self._log_fh = None


class Stage:
    name: str = ""
    title: str = ""
    needs: tuple[str, ...] = ()

    def run(self, ctx: StageContext) -> str:  # pragma: no cover - interface
        raise NotImplementedError


FailureHook = Callable[[StageResult, Config], None]


def os_error_message(exc: OSError) -> str:
    """`path: reason (hint)` for an error from the file system."""
    what = exc.strerror or str(exc)
    hint = ""
    if isinstance(exc, PermissionError) or exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        hint = (" — check its permissions (outputs go to [paths].output and [paths].logs of tdpu.toml; "
                "inputs are [model].source and the graphs the stages before wrote)")
    elif exc.errno == errno.ENOSPC:
        hint = " — the disk is full"
    where = exc.filename if exc.filename is not None else ""
    also = f" → {exc.filename2}" if getattr(exc, "filename2", None) else ""
    return f"{where}{also}: {what}{hint}" if where else f"{type(exc).__name__}: {what}{hint}"


class Pipeline:
    """Runs stages in registry order, honouring dependencies, emitting events."""

    def __init__(self, config: Config, stages: Iterable[Stage] | None = None,
                 on_event: EventSink | None = None, cancel: threading.Event | None = None,
                 on_failure: FailureHook | None = None):
        if stages is None:
            from tdpu_tui.engine.stages.registry import all_stages
            stages = all_stages()
        self.config = config
        self.stages = list(stages)
        self.by_name = {s.name: s for s in self.stages}
        self.cancel = cancel or threading.Event()
        self.on_failure = on_failure
        self._sink = on_event or (lambda _e: None)
        self._lock = threading.Lock()
        self._interrupted = False
        self._status_warned = False
        self.summary: RunSummary | None = None

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
        state: dict[str, Any] = {}
        paths = Artifacts.of(self.config)
        try:
            for stage in selected:
                blocked = [d for d in stage.needs if d in broken]
                if self.cancel.is_set():
                    result = StageResult(stage.name, Status.SKIPPED, message="not run: cancelled")
                    self.emit(StageStarted(stage.name))
                elif blocked:
                    result = StageResult(stage.name, Status.SKIPPED,
                                         message=f"not run: {broken[blocked[0]]} failed")
                    self.emit(StageStarted(stage.name))
                else:
                    self._note_status(paths.run_status, stage.name, None)
                    result = self._run_one(stage, state, paths.run_logs / f"{stage.name}.log")
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
                # A stage stopped by a cancel (c, quit, Ctrl-C) is not a bug to record.
                if (result.status is Status.FAILED and self.on_failure is not None
                        and not self.cancel.is_set()):
                    try:
                        self.on_failure(result, self.config)
                    except Exception as exc:  # a bug draft must never mask the stage's failure
                        self.emit(StageLog(stage.name, f"could not draft a bug record: {exc}",
                                           "warning"))
        except KeyboardInterrupt:
            summary.interrupted = True
            raise
        finally:
            self.emit(RunFinished(None, summary))
        return summary

    def _note_status(self, path: Path, name: str, result: StageResult | None) -> None:
        """Record a stage's start (result None) or outcome for other processes (the app).
        A failure to write is a warning, never the stage's failure."""
        from tdpu_tui.engine.core import run_status
        try:
            if result is None:
                run_status.record_started(path, name)
            else:
                run_status.record_finished(path, result)
        except Exception as exc:
            if not self._status_warned:
                self._status_warned = True
                self.emit(StageLog(name, f"{path}: could not record the stage's status ({exc})",
                                   "warning"))

    def _run_one(self, stage: Stage, state: dict[str, Any], log_file: Path) -> StageResult:
        ctx = StageContext(self.config, stage.name, self.emit, self.cancel, state, log_file)
        self.emit(StageStarted(stage.name))
        start = time.perf_counter()
        status, message = Status.OK, ""
        try:
            message = stage.run(ctx) or "done"
        except Skip as exc:
            status, message = Status.SKIPPED, str(exc)
        except Cancelled as exc:
            status, message = Status.FAILED, str(exc)
        except KeyboardInterrupt:
            status, message = Status.FAILED, "interrupted"
            ctx.log(message, "error")
            self._interrupted = True
        except TdpuError as exc:
            status, message = Status.FAILED, str(exc)
            ctx.log(message, "error")
        except OSError as exc:
            if exc.filename is not None:   # the file system said no: name the file first
                status, message = Status.FAILED, os_error_message(exc)
                ctx.log(message, "error")
                for line in traceback.format_exc().rstrip().splitlines():
                    ctx.log(line, "debug")
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
                           ctx.artifacts, ctx.metrics, ctx.log_tail)


__all__ = ["Pipeline", "Skip", "Stage", "StageContext", "StageFailed", "Status"]
