"""The event stream a pipeline run emits. Both faces (batch and app) consume only these."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Any


class Status(str, Enum):
    PENDING = "pending"
    RUNNING = "running"
    OK = "ok"
    FAILED = "failed"
    SKIPPED = "skipped"
    # Stopped by a cancel (`c` or quit in the app, Ctrl-C in batch), or not run because of one:
    # not a failure, never drafted as a bug record.
    CANCELLED = "cancelled"


@dataclass
class StageResult:
    name: str
    status: Status
    seconds: float = 0.0
    message: str = ""
    artifacts: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    # The last lines the stage logged (for bug drafts and the app's error view).
    log_tail: list[str] = field(default_factory=list)
    # Skipped because this stage (failed, at the root of the chain) is needed and broke.
    blocked_by: str | None = None
    # Failed through a usage mistake (`UsageError`): reported, not drafted as a bug record.
    usage_error: bool = False

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "status": self.status.value,
                "seconds": round(self.seconds, 3), "message": self.message}


@dataclass
class RunSummary:
    results: list[StageResult] = field(default_factory=list)
    interrupted: bool = False

    @property
    def failed(self) -> bool:
        return any(r.status is Status.FAILED for r in self.results)

    @property
    def cancelled(self) -> bool:
        return self.interrupted or any(r.status is Status.CANCELLED for r in self.results)

    def as_json(self) -> dict[str, Any]:
        artifacts: dict[str, str] = {}
        metrics: dict[str, Any] = {}
        for r in self.results:
            artifacts.update(r.artifacts)
            if r.metrics:
                metrics[r.name] = r.metrics
        return {"stages": [r.as_json() for r in self.results],
                "artifacts": artifacts, "metrics": metrics}


@dataclass(frozen=True)
class Event:
    stage: str | None
    time: float = field(default_factory=time.time, kw_only=True)


@dataclass(frozen=True)
class StageStarted(Event):
    pass


@dataclass(frozen=True)
class StageProgress(Event):
    done: float
    total: float | None = None
    note: str = ""


# A line that states its own level: Icraft's `[MM/DD/YY hh:mm:ss.ms] [L] msg` and
# `[YYYY-MM-DD hh:mm:ss.ms] [info] msg` (3_Component_Utils.md §3.1.2, icraft-run).
LEVEL_MARK_RE = re.compile(r"^\s*\[[\d/:. -]+\]\s*\[(?P<level>[DIWEF]|debug|info|warning|warn|"
                           r"error|critical|fatal)\]", re.I)


@dataclass(frozen=True)
class StageLog(Event):
    line: str
    level: str = "info"          # debug | info | warning | error
    # Where the line comes from: "" for the stage itself, else a file path (Icraft logs).
    source: str = ""

    @property
    def text(self) -> str:
        """The line as the faces show it: `[level] ` in front unless it is info or the line
        already says its level (an Icraft log line)."""
        if self.level == "info" or LEVEL_MARK_RE.match(self.line):
            return self.line
        return f"[{self.level}] {self.line}"


@dataclass(frozen=True)
class StageFinished(Event):
    result: StageResult


@dataclass(frozen=True)
class RunFinished(Event):
    summary: RunSummary
