"""`tdpu --batch`: the headless face. Progress to stderr, results to stdout (docs/spec.md §2)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import TextIO

from tdpu_tui.engine.core.config import Config
from tdpu_tui.engine.core.errors import ExitCode
from tdpu_tui.engine.core.events import (
    Event, RunSummary, StageFinished, StageLog, StageProgress, StageResult, StageStarted, Status,
)
from tdpu_tui.engine.osutil.files import atomic_write_text
from tdpu_tui.engine.osutil.platform import termination_signals
from tdpu_tui.engine.records.style import fmt_time, rel_path, relative_text, zone_name
from tdpu_tui.engine import stages as registry
from tdpu_tui.engine.core.pipeline import Pipeline

PLAIN_PROGRESS_INTERVAL_S = 2.0
BAR_WIDTH = 28
_COLORS = {Status.OK: "32", Status.FAILED: "31", Status.SKIPPED: "33", Status.CANCELLED: "35"}


class ProgressPrinter:
    """Renders events on stderr: a live line on a terminal, plain lines otherwise."""

    def __init__(self, stream: TextIO | None = None):
        # sys.stderr when made, not when this module was imported (a redirected or replaced
        # stderr since then, as pytest's capture does, must be the one written to)
        self.stream = stream if stream is not None else sys.stderr
        self.live = self.stream.isatty() and os.environ.get("TERM", "") != "dumb"
        self.color = self.live and "NO_COLOR" not in os.environ
        self._last_live = 0.0
        self._live_shown = False
        self._last_plain: dict[str | None, float] = {}
        self._lock = threading.Lock()
        self.gone = False

    def _paint(self, text: str, status: Status) -> str:
        code = _COLORS.get(status)
        return f"\x1b[{code}m{text}\x1b[0m" if self.color and code else text

    def _clear_live(self) -> None:
        if self._live_shown:
            self.stream.write("\r\x1b[2K")
            self._live_shown = False

    def __call__(self, event: Event) -> None:
        with self._lock:
            if self.gone:
                return
            try:
                self._handle(event)
                self.stream.flush()
            except OSError:   # the terminal went away (SSH closed): the run goes on without it
                self.gone = True

    def _handle(self, event: Event) -> None:
        if isinstance(event, StageStarted):
            self._clear_live()
            self.stream.write(f"[{event.stage}] started\n")
        elif isinstance(event, StageProgress):
            note = f" {event.note}" if event.note else ""
            if event.total:
                frac = max(0.0, min(1.0, event.done / event.total))
                text = f"[{event.stage}] {frac:6.1%}{note}"
            else:
                text = f"[{event.stage}]{note}"
            if self.live:
                now = time.monotonic()
                if now - self._last_live < 0.1:
                    return
                self._last_live = now
                if event.total:
                    filled = int(BAR_WIDTH * frac)
                    bar = "#" * filled + "-" * (BAR_WIDTH - filled)
                    text = f"[{event.stage}] [{bar}] {frac:6.1%}{note}"
                # One terminal row: a wrapped line would not be erased by the next update.
                columns = shutil.get_terminal_size().columns - 1
                self.stream.write("\r\x1b[2K" + text[:columns])
                self._live_shown = True
            elif note:
                # Plain lines (logs, CI): at most one progress line per stage every 2 s.
                now = time.monotonic()
                if now - self._last_plain.get(event.stage, -1e9) >= PLAIN_PROGRESS_INTERVAL_S:
                    self._last_plain[event.stage] = now
                    self.stream.write(text + "\n")
        elif isinstance(event, StageLog):
            # Debug lines (the trace behind an error already reported in one line) go to the
            # stage's log file (phase3_logs/runs/<stage>.log), not to the terminal.
            if event.level == "debug":
                return
            self._clear_live()
            self.stream.write(f"[{event.stage}] {event.text}\n")
        elif isinstance(event, StageFinished):
            self._clear_live()
            r = event.result
            status = self._paint(r.status.value, r.status)
            self.stream.write(f"[{r.name}] {status} in {r.seconds:.1f}s: {r.message}\n")


def summary_table(results: list[StageResult]) -> str:
    rows = [("stage", "status", "seconds", "result")]
    rows += [(r.name, r.status.value, f"{r.seconds:.1f}", r.message.splitlines()[0] if r.message else "")
             for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = []
    for i, row in enumerate(rows):
        lines.append("  ".join(c.ljust(w) for c, w in zip(row[:3], widths)) + "  " + row[3])
        if i == 0:
            lines.append("  ".join("-" * w for w in widths) + "  " + "-" * 6)
    return "\n".join(lines)


def _draft_bug(result: StageResult, cfg: Config) -> None:
    from tdpu_tui.engine.core.artifacts import Artifacts
    from tdpu_tui.engine.records.bugbook import is_filed, record_failure
    path = Artifacts.of(cfg).bugs
    if not is_filed(result):
        print(f"[{result.name}] a usage mistake, not a bug: not filed in {path.name}", file=sys.stderr)
        return
    record, created = record_failure(path, result.name, result.message, result.log_tail,
                                     bug_stages=registry.bug_stages())
    verb = "drafted" if created else "already recorded as"
    print(f"[{result.name}] {verb} Bug #{record.number} in {path}", file=sys.stderr)


def _open_bug_book(cfg: Config) -> None:
    """A run starts the bug book (the template's title line) where the plan keeps it."""
    from tdpu_tui.engine.core.artifacts import Artifacts
    from tdpu_tui.engine.core.errors import TdpuError
    from tdpu_tui.engine.records.bugbook import ensure_book
    path = Artifacts.of(cfg).bugs
    try:
        ensure_book(path)
    except (OSError, TdpuError) as exc:  # the stages report an unusable [paths].logs themselves
        print(f"tdpu: warning: {path}: cannot create the bug book: {exc}", file=sys.stderr)


def _say(text: str, stream: TextIO) -> None:
    """print, except to a terminal that is gone (SIGHUP): the summary and --json still follow."""
    with contextlib.suppress(OSError, ValueError):
        try:
            print(text, file=stream, flush=True)
        except UnicodeEncodeError:   # LANG=C, an ASCII pipe: '→', '×', 中文 as escapes, not lost
            enc = getattr(stream, "encoding", None) or "ascii"
            print(text.encode(enc, "backslashreplace").decode(enc, "replace"), file=stream,
                  flush=True)


@contextlib.contextmanager
def stop_signals_as_ctrl_c() -> Iterator[None]:
    """SIGTERM and SIGHUP (SIGBREAK on Windows) end the run as Ctrl-C does: the stage running
    is interrupted, Icraft's process tree ended, statuses closed, nothing half-written, exit 130.

    The signal goes to whatever handles SIGINT at that moment, so it is held while ONNX Runtime
    runs Python operators, as Ctrl-C is. A signal ignored at start (`nohup` ignores SIGHUP) stays
    ignored.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def as_ctrl_c(_signum: int, frame: FrameType | None) -> None:
        handler = signal.getsignal(signal.SIGINT)
        if callable(handler):
            handler(signal.SIGINT, frame)
        else:
            raise KeyboardInterrupt

    previous = {}
    for sig in termination_signals():
        try:
            if signal.getsignal(sig) is signal.SIG_IGN:
                continue
            previous[sig] = signal.signal(sig, as_ctrl_c)
        except (ValueError, OSError):
            continue
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def json_summary(summary: RunSummary, cfg: Config, *, code: int, started: float, finished: float,
                 selected: list[str]) -> dict:
    """The `--json` document: the run's outcome first, then each stage, artifacts and metrics.

    Paths, in the artifacts and in the stages' messages, are relative to the project root
    (tdpu.toml's directory, given absolute as `project`), times local as in the records, with
    the zone beside them.
    """
    from tdpu_tui import __version__

    root = cfg.base_dir
    body = summary.as_json()
    ran = {r.name for r in summary.results}
    if summary.interrupted:
        status = "interrupted"
    elif summary.failed:
        status = "failed"
    elif summary.cancelled:
        status = "cancelled"
    else:
        status = "ok"
    stages = []
    for r, entry in zip(summary.results, body["stages"]):
        entry = dict(entry, cancelled=r.status is Status.CANCELLED)
        if entry.get("message"):
            entry["message"] = relative_text(entry["message"], root)
        if r.blocked_by:
            entry["blocked_by"] = r.blocked_by
        stages.append(entry)
    head = {
        "status": status,
        "interrupted": summary.interrupted,
        "exit_code": int(code),
        "started": fmt_time(started),
        "finished": fmt_time(finished),
        "time_zone": zone_name(started),
        "seconds": round(finished - started, 3),
        "config": rel_path(cfg.file, root) if cfg.file is not None else None,
        "project": str(Path(root).resolve()),
        "tdpu_version": __version__,
    }
    if summary.interrupted:
        head["not_run"] = [n for n in selected if n not in ran]
    return {**head, "stages": stages,
            "artifacts": {k: rel_path(v, root) for k, v in body["artifacts"].items()},
            "metrics": body["metrics"]}


def run_batch(cfg: Config, stages: list[str] | None, *, json_path: str | None = None,
              bug_drafts: bool = True) -> int:
    printer = ProgressPrinter()
    pipeline = Pipeline(cfg, registry.all_stages(), on_event=printer,
                        on_failure=_draft_bug if bug_drafts else None)
    started = time.time()
    try:
        selected = [s.name for s in pipeline.select(stages)]
    except KeyError as exc:
        print(f"tdpu: error: {exc.args[0]}", file=sys.stderr)
        return ExitCode.USAGE
    _open_bug_book(cfg)
    summary: RunSummary | None = None
    code = ExitCode.OK
    with stop_signals_as_ctrl_c():
        try:
            summary = pipeline.run(stages)
            code = (ExitCode.FAILURE if summary.failed
                    else ExitCode.INTERRUPT if summary.cancelled else ExitCode.OK)
        except KeyboardInterrupt:
            with contextlib.suppress(OSError):
                printer._clear_live()
            _say("tdpu: interrupted", sys.stderr)
            summary = pipeline.summary
            if summary is not None:
                summary.interrupted = True
            code = ExitCode.INTERRUPT
        if summary is not None:
            code = _finish(summary, cfg, json_path, code, started, selected)
    return int(code)


def _finish(summary: RunSummary, cfg: Config, json_path: str | None, code: int, started: float,
            selected: list[str]) -> int:
    """The summary table on stdout and the --json file (a stop signal meanwhile ends as Ctrl-C)."""
    try:
        _say(summary_table(summary.results), sys.stdout)
        if json_path:
            try:
                doc = json_summary(summary, cfg, code=code, started=started, finished=time.time(),
                                   selected=selected)
                atomic_write_text(Path(json_path), json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
            except OSError as exc:
                _say(f"tdpu: error: --json {json_path}: {exc}", sys.stderr)
                code = max(code, ExitCode.FAILURE)
    except KeyboardInterrupt:
        _say("tdpu: interrupted", sys.stderr)
        code = ExitCode.INTERRUPT
    return code
