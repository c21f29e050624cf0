"""The Stage contract: what a stage is and what it sees while it runs.

A stage is an object with a `name`, the names it `needs`, the bug book's 发现阶段 it files
under (`bug_stage`), the section of `icraft_compile_log.md` it writes (`log_section`, or None),
and `run(ctx)`. It reports through its context (progress, log lines, artifacts, metrics) and
never prints. It ends
- `ok` by returning a one-line message,
- `skipped` by raising `Skip(reason)`,
- `failed` by raising anything else (`StageFailed` for an expected failure, no traceback).
"""

from __future__ import annotations

import collections
import contextlib
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

from tdpu_tui.engine.core.artifacts import Artifacts
from tdpu_tui.engine.core.cache import RunCache
from tdpu_tui.engine.core.config import Config
from tdpu_tui.engine.core.errors import Cancelled, TdpuError
from tdpu_tui.engine.core.events import Event, StageLog, StageProgress

EventSink = Callable[[Event], None]
LOG_TAIL_LINES = 40


class Skip(TdpuError):
    """Raised by a stage to end as `skipped`; the message is the reason."""


class StageContext:
    """What a running stage sees: configuration, artifact paths, and the reporting calls."""

    def __init__(self, config: Config, stage: str, emit: EventSink, cancel: threading.Event,
                 log_file: Path | None = None, cache: RunCache | None = None):
        self.config = config
        self.paths = Artifacts.of(config)
        self.stage = stage
        # Loads shared with the other stages of this run (graphs, sessions, the reference).
        self.cache = cache if cache is not None else RunCache()
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
                try:
                    self._log_fh.write(f"{event.text}\n")
                except OSError as exc:   # a full disk must not turn one log line into the failure
                    self.close()
                    self._emit(StageLog(self.stage, f"{self.log_file}: the stage log stops here "
                                        f"({exc.strerror or exc})", "warning"))
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
        fh, self._log_fh = self._log_fh, None
        if fh is not None:
            with contextlib.suppress(OSError):   # its last line could not be written (a full disk)
                fh.close()


class Stage:
    name: ClassVar[str] = ""
    title: ClassVar[str] = ""
    needs: ClassVar[tuple[str, ...]] = ()
    # The bug book's 发现阶段 (docs/spec.md §7) a failure of this stage is filed under.
    bug_stage: ClassVar[str] = ""
    # The section of icraft_compile_log.md this stage writes, if any.
    log_section: ClassVar[str | None] = None

    def run(self, ctx: StageContext) -> str:  # pragma: no cover - interface
        raise NotImplementedError
