"""`phase3_logs/runs/status.json`: each stage's latest outcome, whichever process ran it.

A `tdpu --batch` run in one SSH session and the app in another share the project: the
pipeline records here when a stage starts and how it ended, and the app shows those rows
(marked as another process's) while it is not running stages itself.

    {"format": "tdpu-status/1",
     "stages": {"export": {"status": "ok", "seconds": 1.9, "message": "...",
                           "pid": 1234, "started_at": "...", "finished_at": "..."}, ...}}

`status` is a `Status` value ("running" while the stage runs). Updates are read-modify-write
under an advisory lock in the logs' state folder and written atomically, so concurrent runs of
different stages keep each other's rows. Reading never raises: a missing or damaged file
reads as no rows.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tdpu_tui.engine.core.events import StageResult, Status
from tdpu_tui.engine.osutil import platform
from tdpu_tui.engine.osutil.files import FileLock, atomic_path, state_dir

FORMAT = "tdpu-status/1"
MESSAGE_LIMIT = 2000


@dataclass(frozen=True)
class StageStatus:
    name: str
    status: Status
    seconds: float | None
    message: str
    pid: int | None
    started_at: str
    finished_at: str
    started_ts: float | None = None     # epoch seconds (time zones differ between sessions)
    host: str = ""
    blocked_by: str | None = None

    @property
    def elsewhere(self) -> bool:
        """Recorded on another host (a shared project directory): its pid means nothing here."""
        return bool(self.host) and self.host != socket.gethostname()

    @property
    def alive(self) -> bool:
        """Whether the process that reported this row still exists (meaningful while running;
        a row from another host counts as alive: it cannot be checked from here)."""
        if self.elsewhere:
            return True
        return platform.process_alive(self.pid, started_before=self.started_ts)


def _now() -> str:
    return _dt.datetime.now().isoformat(timespec="seconds")


def _lock(path: Path) -> FileLock:
    """The lock of `runs/status.json`: in the logs folder's one hidden state folder
    (`phase3_logs/.tdpu/runs.status.json.lock`), beside the bug book's and the logs' locks,
    not a second `.tdpu` inside `runs/`."""
    return FileLock(state_dir(path.parent) / f"{path.parent.name}.{path.name}.lock")


def _update(path: Path, name: str, fields: dict[str, Any]) -> None:
    with _lock(path):
        doc = _read(path)
        stages = doc.setdefault("stages", {})
        row = stages.get(name) if isinstance(stages.get(name), dict) else {}
        row.update(fields)
        stages[name] = row
        doc["format"] = FORMAT
        with atomic_path(path, fsync=False) as tmp:
            tmp.write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def record_started(path: str | Path, name: str) -> None:
    _update(Path(path), name, {"status": Status.RUNNING.value, "seconds": None, "message": "",
                               "pid": os.getpid(), "host": socket.gethostname(), "started_at": _now(),
                               "started_ts": round(time.time(), 3), "finished_at": ""})


def record_finished(path: str | Path, result: StageResult) -> None:
    _update(Path(path), result.name, {
        "status": result.status.value, "seconds": round(result.seconds, 3),
        "message": result.message[:MESSAGE_LIMIT], "blocked_by": result.blocked_by, "pid": os.getpid(), "host": socket.gethostname(),
        "finished_at": _now()})


def _read(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return {}
    return doc if isinstance(doc, dict) and doc.get("format") == FORMAT else {}


def load(path: str | Path) -> dict[str, StageStatus]:
    """The rows of the status file (an empty dict when it is missing or unreadable)."""
    out: dict[str, StageStatus] = {}
    stages = _read(Path(path)).get("stages", {})
    if not isinstance(stages, dict):
        return out
    for name, row in stages.items():
        if not isinstance(row, dict):
            continue
        try:
            status = Status(row.get("status"))
            seconds = row.get("seconds")
            pid = int(row["pid"]) if row.get("pid") else None
            if pid is not None and not 0 < pid < 2**31:
                pid = None
            ts = row.get("started_ts")
            out[name] = StageStatus(name, status, float(seconds) if seconds is not None else None,
                                    str(row.get("message", "")), pid,
                                    str(row.get("started_at", "")), str(row.get("finished_at", "")),
                                    float(ts) if isinstance(ts, (int, float)) else None,
                                    str(row.get("host", "")),
                                    str(row["blocked_by"]) if row.get("blocked_by") else None)
        except (ValueError, TypeError, KeyError, OverflowError):
            continue
    return out
