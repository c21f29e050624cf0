"""The pipeline panel: every stage with status, duration, progress and result."""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass, field

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.message import Message
from textual.widgets import DataTable, Static

from tdpu_tui.app.staleness import Stale, stale_rows
from tdpu_tui.engine.core.events import StageResult, Status
from tdpu_tui.engine.core.stage import LOG_TAIL_LINES

_STATUS_STYLE = {
    Status.PENDING: ("·", "pending", "dim"),
    Status.RUNNING: ("▶", "running", "bold cyan"),
    Status.OK: ("✔", "ok", "green"),
    Status.FAILED: ("✘", "failed", "bold red"),
    Status.SKIPPED: ("–", "skipped", "yellow"),
    Status.CANCELLED: ("■", "cancelled", "magenta"),
}
BAR_WIDTH = 8
FIXED = {"stage": 9, "status": 11, "time": 6, "progress": 13}


def format_seconds(seconds: float | None) -> str:
    if seconds is None:
        return ""
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def progress_bar(done: float | None, total: float | None) -> str:
    if done is None or not total:
        return ""
    frac = max(0.0, min(1.0, done / total))
    filled = int(round(frac * BAR_WIDTH))
    return "█" * filled + "░" * (BAR_WIDTH - filled) + f" {frac * 100:3.0f}%"


def behind(done: float | None, total: float | None, was_done: float | None,
           was_total: float | None) -> bool:
    """Whether done/total is less far than was_done/was_total: one bar per run, so a stage that
    restarts its count (a new phase) never moves it back."""
    return bool(total and was_total and done is not None and was_done is not None
                and done / total < was_done / was_total)


@dataclass
class StageRow:
    name: str
    title: str
    needs: tuple[str, ...] = ()
    status: Status = Status.PENDING
    seconds: float | None = None
    started: float | None = None
    done: float | None = None
    total: float | None = None
    note: str = ""
    message: str = ""
    bug_number: int | None = None  # the record drafted for this stage's failure
    # Wall-clock start of the run the shown result comes from (None: no result yet).
    ran_at: float | None = None
    stale: Stale | None = None  # a stage this one needs ran again (or failed) since: result is old
    blocked_by: str | None = None  # not run because this needed stage failed
    origin: str = ""  # set when the row shows another process's run (phase3_logs/runs/status.json)
    log_tail: collections.deque[str] = field(
        default_factory=lambda: collections.deque(maxlen=LOG_TAIL_LINES))

    def elapsed(self) -> float | None:
        if self.status is Status.RUNNING and self.started is not None:
            return time.monotonic() - self.started
        return self.seconds

    def result_line(self) -> str:
        if self.status is Status.RUNNING:
            return self.note or (self.title or "")
        first = self.message.splitlines()[0] if self.message else ""
        return first


class StagesTable(DataTable):
    BINDINGS = [
        Binding("enter", "run_stage", "Run stage"),
        Binding("d", "draft_bug", "Draft bug"),
    ]

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        """The footer shows `d` only on a failed stage, `enter` only when a run can start."""
        panel = self.parent
        if not isinstance(panel, PipelinePanel):
            return True
        row = panel.rows.get(self._current() or "")
        if action == "draft_bug":
            return row is not None and row.status is Status.FAILED
        if action == "run_stage":
            return row is not None and not getattr(self.app, "running", False)
        return True

    class RunStage(Message):
        def __init__(self, name: str):
            super().__init__()
            self.name = name

    class DraftBug(Message):
        def __init__(self, name: str):
            super().__init__()
            self.name = name

    def _current(self) -> str | None:
        if not self.row_count:
            return None
        return self.coordinate_to_cell_key(self.cursor_coordinate).row_key.value

    def action_run_stage(self) -> None:
        if (name := self._current()) is not None:
            self.post_message(self.RunStage(name))

    def action_draft_bug(self) -> None:
        if (name := self._current()) is not None:
            self.post_message(self.DraftBug(name))


class PipelinePanel(Vertical):
    def __init__(self, run_logs: str = "", **kwargs):
        super().__init__(**kwargs)
        self.rows: dict[str, StageRow] = {}
        self.problem = ""
        self.run_logs = run_logs  # where each stage's log file is, as shown to the user

    def compose(self) -> ComposeResult:
        yield StagesTable(id="stages", cursor_type="row", zebra_stripes=False)
        yield Static("", id="stage-detail")

    def on_mount(self) -> None:
        table = self.query_one(StagesTable)
        for key, label in (("stage", "Stage"), ("status", "Status"), ("time", "Time"),
                           ("progress", "Progress"), ("result", "Result")):
            table.add_column(label, key=key, width=FIXED.get(key, 30))
        self.set_interval(1.0, self.tick)

    @property
    def table(self) -> StagesTable:
        return self.query_one(StagesTable)

    def set_stages(self, stages: list, problem: str = "") -> None:
        """Show these stages (objects with name/title/needs), keeping the results already shown."""
        old = self.rows
        self.rows = {}
        for s in stages:
            row = old.get(s.name) or StageRow(s.name, getattr(s, "title", "") or s.name)
            row.needs = tuple(getattr(s, "needs", ()))
            self.rows[s.name] = row
        self.problem = problem
        table = self.table
        table.clear()
        for row in self.rows.values():
            table.add_row(*self._cells(row), key=row.name)
        self.refresh_detail()

    @property
    def current(self) -> str | None:
        return self.table._current()

    # -- events -----------------------------------------------------------------------------
    def started(self, name: str, at: float | None = None) -> None:
        row = self.rows.get(name)
        if row is None:
            return
        row.status, row.started, row.seconds = Status.RUNNING, time.monotonic(), None
        row.ran_at = at if at is not None else time.time()
        row.done = row.total = None
        row.note = row.message = row.origin = ""
        row.log_tail.clear()
        self.update_row(name)
        self.refresh_stale()

    def progress(self, name: str, done: float, total: float | None, note: str) -> None:
        row = self.rows.get(name)
        if row is None:
            return
        if behind(done, total, row.done, row.total):
            done, total = row.done, row.total
        row.done, row.total = done, total
        if note:
            row.note = note
        self.update_row(name)

    def logged(self, name: str, line: str) -> None:
        row = self.rows.get(name)
        if row is not None:
            row.log_tail.append(line)

    def finished(self, result: StageResult) -> None:
        row = self.rows.get(result.name)
        if row is None:
            return
        row.status, row.seconds, row.message = result.status, result.seconds, result.message
        row.started, row.origin, row.blocked_by = None, "", result.blocked_by
        if result.log_tail:
            row.log_tail.clear()
            row.log_tail.extend(result.log_tail)
        if result.status is Status.OK and row.total:
            row.done = row.total
        self.update_row(result.name)
        self.refresh_stale()

    def mark_pending(self, names: list[str]) -> None:
        """The stages of a run about to start: what needs them and does not run is old now."""
        now = time.time()
        for name in names:
            row = self.rows.get(name)
            if row is not None:
                row.status, row.seconds, row.started, row.message = Status.PENDING, None, None, ""
                row.done = row.total = None
                row.note = row.origin = ""
                row.ran_at, row.blocked_by = now, None
                self.update_row(name)
        self.refresh_stale()

    def refresh_stale(self) -> None:
        """Mark old every result downstream of a newer, failed or cancelled run it needs."""
        stale = stale_rows(self.rows)
        for row in self.rows.values():
            new = stale.get(row.name)
            if new != row.stale:
                row.stale = new
                self.update_row(row.name)

    def show_recorded(self, recorded: dict, own_pid: int) -> None:
        """Rows from the status file (`engine/core/run_status.py`) that another process wrote: a
        `tdpu --batch` run in another shell, or an earlier session of the app."""
        for name, st in recorded.items():
            row = self.rows.get(name)
            if row is None or (st.pid == own_pid and not st.elsewhere):
                continue
            when = (st.finished_at or st.started_at).replace("T", " ")
            where = (f"process {st.pid}" if st.pid else "an unrecorded process") + (
                f" on {st.host}" if st.elsewhere else "")
            row.done = row.total = None
            row.note = ""
            row.ran_at = st.started_ts
            row.bug_number = None          # this session's record, if any, is not about that run
            row.log_tail.clear()
            if st.status is Status.RUNNING:
                if st.alive:
                    row.status, row.seconds, row.message = Status.RUNNING, None, ""
                    ago = time.time() - st.started_ts if st.started_ts else 0.0
                    row.started = time.monotonic() - max(0.0, ago)
                    row.note = f"running in {where}"
                    row.origin = f"run by {where} (started {st.started_at.replace('T', ' ')})"
                else:
                    row.status, row.seconds, row.started = Status.FAILED, None, None
                    row.message = (f"{where} ended while this stage ran "
                                   f"(started {st.started_at.replace('T', ' ')}): interrupted or killed")
                    row.origin = f"run by {where}, which is gone"
            else:
                row.status, row.seconds, row.started, row.message = st.status, st.seconds, None, st.message
                row.blocked_by = st.blocked_by
                row.origin = f"run by {where}, finished {when}"
            self.update_row(name)
        self.refresh_stale()

    @property
    def others_running(self) -> bool:
        """Rows showing another process's stage as still running (their liveness is re-checked)."""
        return any(r.origin and r.status is Status.RUNNING for r in self.rows.values())

    def tick(self) -> None:
        """Refresh the elapsed time of running stages (once a second)."""
        for row in self.rows.values():
            if row.status is Status.RUNNING:
                self.table.update_cell(row.name, "time", format_seconds(row.elapsed()))

    # -- rendering --------------------------------------------------------------------------
    def _cells(self, row: StageRow) -> list:
        mark, word, style = _STATUS_STYLE[row.status]
        return [
            Text(row.name, style="bold"),
            Text(f"{mark} {word}", style=style),
            format_seconds(row.elapsed()),
            progress_bar(row.done, row.total),
            self._result_cell(row),
        ]

    @staticmethod
    def _result_cell(row: StageRow) -> Text:
        # Text, not str: a str cell is markup, and results hold keys like [icraft].bin.
        text = Text(no_wrap=True, overflow="ellipsis")
        if row.stale is not None:
            text.append(f"{row.stale.label()}: ", style="italic")
            text.append(row.result_line(), style="dim")
        else:
            text.append(row.result_line())
        return text

    def update_row(self, name: str) -> None:
        row = self.rows[name]
        table = self.table
        keys = ("stage", "status", "time", "progress", "result")
        for key, value in zip(keys, self._cells(row), strict=True):
            table.update_cell(name, key, value)
        if self.current == name:
            self.refresh_detail()
            table.refresh_bindings()

    def on_resize(self) -> None:
        used = sum(FIXED.values()) + 2 * (len(FIXED) + 1) + 2
        width = max(20, self.size.width - used)
        table = self.table
        for column in table.columns.values():
            if column.key.value == "result":
                column.width = width
                column.auto_width = False
        table.refresh()

    def on_data_table_row_highlighted(self, _event: DataTable.RowHighlighted) -> None:
        self.refresh_detail()
        self.table.refresh_bindings()

    def refresh_detail(self) -> None:
        detail = self.query_one("#stage-detail", Static)
        if self.problem:
            detail.update(Text(self.problem, style="bold red"))
            return
        name = self.current
        row = self.rows.get(name) if name else None
        if row is None:
            detail.update("")
            return
        text = Text()
        text.append(row.name, style="bold")
        if row.title and row.title != row.name:
            text.append(f" — {row.title}")
        if row.needs:
            text.append(f"   needs: {', '.join(row.needs)}", style="dim")
        if self.run_logs and row.status is not Status.PENDING:
            text.append(f"   log: {self.run_logs}/{row.name}.log", style="dim")
        text.append("\n")
        if row.stale is not None:
            text.append(f"result of an earlier run: {row.stale.cause} {row.stale.what} since "
                        "(enter runs this stage again)\n", style="italic")
        if row.origin:
            text.append(f"not this session's run: {row.origin} (recorded in runs/status.json)\n",
                        style="italic")
        if row.status is Status.RUNNING and row.note:
            text.append(row.note + "\n")
        if row.message:
            style = "red" if row.status is Status.FAILED else ""
            text.append(row.message + "\n", style=style)
        if row.status is Status.FAILED:
            tail = list(row.log_tail)[-6:]
            if tail:
                text.append("last log lines:\n", style="dim")
                for line in tail:
                    text.append(f"  {line}\n", style="dim")
            text.append("d", style="bold reverse")
            text.append(" draft a bug record from this error   ")
            text.append("enter", style="bold reverse")
            text.append(" run it again")
        elif row.status is Status.PENDING:
            text.append("enter", style="bold reverse")
            text.append(" run this stage   ")
            text.append("r", style="bold reverse")
            text.append(" run every stage")
        detail.update(text)
