"""The Textual app: a thin face over the engine's Pipeline and events (laid out as harlequin lays out its app).

Threads: the pipeline runs in a thread worker (its stages release the GIL); its events go into
an inbox that a 20 Hz pump drains in batches. Icraft's log files are followed by
`engine.tail.Tailer` in its own thread and drained by the same pump. Nothing here
reimplements a stage; `--batch` and this app consume the same events.
"""

from __future__ import annotations

import collections
import contextlib
import os
import threading
from collections.abc import Callable, Iterable
from functools import partial
from pathlib import Path

from textual import work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.css.query import NoMatches
from textual.widgets import Header, TabbedContent, TabPane
from textual.worker import Worker, WorkerState

from tdpu_tui.app import heap, run_control
from tdpu_tui.app.bug_actions import BugActions, BugNotFiled, BugRecorded
from tdpu_tui.app.bugs_panel import BugsPanel, BugsTable
from tdpu_tui.app.commands import TdpuCommands
from tdpu_tui.app.import_screen import ImportAction
from tdpu_tui.app.keybar import KeyBar
from tdpu_tui.app.log_history import earlier_runs
from tdpu_tui.app.log_panel import LogPanel, LogView
from tdpu_tui.app.nodes_panel import NodesPanel, NodesTable
from tdpu_tui.app.pipeline_panel import PipelinePanel, StagesTable, behind
from tdpu_tui.app.report_view import ReportView
from tdpu_tui.app.screens import ConfirmScreen, HelpScreen
from tdpu_tui.engine.core.artifacts import Artifacts
from tdpu_tui.engine.core.config import Config
from tdpu_tui.engine.core.errors import ExitCode
from tdpu_tui.engine.core.events import (
    Event,
    RunFinished,
    StageFinished,
    StageLog,
    StageProgress,
    StageStarted,
    Status,
)
from tdpu_tui.engine.core.pipeline import Pipeline
from tdpu_tui.engine.core.stage import Stage
from tdpu_tui.engine.osutil.tail import EchoFilter, Tailer

StageSource = Iterable[Stage] | Callable[[], Iterable[Stage]] | None


# Each tab and what gets the focus on it; its digit key is its place here.
_FOCUS = {"pipeline": StagesTable, "log": LogView, "nodes": NodesTable, "bugs": BugsTable,
          "report": ReportView}
# App-level actions that must not fire behind a modal screen (a form, the quit question).
_GUARDED = {"quit", "help", "run_all", "rerun_failed", "cancel", "add_bug", "show_tab",
            "import_bundle"}


class TdpuApp(BugActions, ImportAction, App[int]):
    CSS_PATH = Path(__file__).with_name("tdpu.tcss")  # absolute: subclasses live elsewhere
    TITLE = "tdpu"
    COMMANDS = {TdpuCommands}      # ctrl+p: the app's actions, not Textual's system commands

    BINDINGS = [
        Binding("q", "quit", "Quit"),
        Binding("ctrl+q", "quit", "Quit", show=False, priority=True),
        Binding("question_mark", "help", "Help", key_display="?"),
        Binding("r", "run_all", "Run all"),
        Binding("f", "rerun_failed", "Rerun"),
        Binding("c", "cancel", "Cancel"),
        Binding("b", "add_bug", "Bug"),
        Binding("i", "import_bundle", "Import", show=False),
        Binding("1", "show_tab('pipeline')", "Pipeline", show=False),
        Binding("2", "show_tab('log')", "Log", show=False),
        Binding("3", "show_tab('nodes')", "Nodes", show=False),
        Binding("4", "show_tab('bugs')", "Bugs", show=False),
        Binding("5", "show_tab('report')", "Report", show=False),
    ]

    PUMP_INTERVAL = 0.05          # s between UI updates from the worker and the tailer
    STATUS_INTERVAL = 1.0         # s between looks at runs/status.json (runs in other processes)
    MAX_INBOX = 20_000            # events queued before the worker waits (back-pressure)
    MAX_LINES_PER_PUMP = 20_000   # tailed lines shown per update (the rest wait in the file)

    def __init__(self, config: Config, *, stages: StageSource = None,
                 follow: Iterable[str | Path] = ()):
        super().__init__()
        self.config = config
        self.paths = Artifacts.of(config)
        self._stage_source = stages
        self._inbox: collections.deque[Event] = collections.deque()
        self._inbox_cond = threading.Condition()
        self._closing = False
        self._stopping = False
        self.tailer = Tailer()
        # A run elsewhere writes Icraft's lines to its stage log and Icraft to its own: shown once.
        self._echo = EchoFilter()
        self._init_bug_actions()
        self._follow = [Path(p) for p in follow]
        self.pipeline: Pipeline | None = None
        self.worker: Worker | None = None
        self.import_cancel = threading.Event()   # the running import's (import_screen.py)
        self.last_summary = None
        # Set when the run's thread is over (it may outlive the worker if the app quits at once).
        self.run_done: threading.Event | None = None
        self.sub_title = self._config_name()

    def say(self, message: str, *, title: str = "", severity: str = "information",
            timeout: float | None = None) -> None:
        """A notification whose text is shown as is (stage errors and log lines hold [brackets])."""
        self.notify(message, title=title, severity=severity, timeout=timeout, markup=False)

    # -- layout -------------------------------------------------------------------------------
    def compose(self) -> ComposeResult:
        yield Header()
        with TabbedContent(initial="pipeline", id="tabs"):
            with TabPane("1 Pipeline", id="pipeline"):
                yield PipelinePanel(self._shown(self.paths.run_logs), id="pipeline-panel")
            with TabPane("2 Log", id="log"):
                yield LogPanel(id="log-panel")
            with TabPane("3 Nodes", id="nodes"):
                yield NodesPanel(self.config, id="nodes-panel")
            with TabPane("4 Bugs", id="bugs"):
                yield BugsPanel(self.config, own_signatures=self._own_signatures, id="bugs-panel")
            with TabPane("5 Report", id="report"):
                yield ReportView(self.paths.performance_report,
                                 self._shown(self.paths.performance_report), id="report-view")
        yield KeyBar(show_command_palette=False, compact=True)

    @property
    def main(self):
        """The main screen (queries must not look at a dialog on top of it)."""
        stack = self.screen_stack
        if not stack:  # starting or shutting down
            raise NoMatches("no screen")
        return stack[0]

    @property
    def pipeline_panel(self) -> PipelinePanel:
        return self.main.query_one(PipelinePanel)

    @property
    def log_panel(self) -> LogPanel:
        return self.main.query_one(LogPanel)

    @property
    def nodes_panel(self) -> NodesPanel:
        return self.main.query_one(NodesPanel)

    @property
    def bugs_panel(self) -> BugsPanel:
        return self.main.query_one(BugsPanel)

    def on_mount(self) -> None:
        try:
            stages, problem = self._make_stages(), ""
        except Exception as exc:  # a broken stage module must not take the app down
            stages, problem = [], f"cannot load the stages: {type(exc).__name__}: {exc}"
        self.pipeline_panel.set_stages(stages, problem)
        # What earlier runs logged, in run order and headed; then only what is added.
        self._follow_other_runs(history=False)
        self._show_earlier_runs()
        for p in self._follow:
            self.follow_file(p)
        self.tailer.start()
        self.set_interval(self.PUMP_INTERVAL, self._pump)
        self._status_seen: tuple[int, int] | None = None
        self.check_recorded_status()
        self.set_interval(self.STATUS_INTERVAL, self.check_recorded_status)
        self.query_one(StagesTable).focus()

    def check_recorded_status(self) -> None:
        """Show stage outcomes another process recorded (a `tdpu --batch` run elsewhere) while
        this app is not running stages itself."""
        if self.running:
            return
        path = self.paths.run_status
        try:
            st = path.stat()
            stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        except OSError:
            return
        # Unchanged file: nothing new, unless a stage shown as running in another process may
        # have died without writing again (kill -9, the OOM killer).
        if stamp == self._status_seen and not self.pipeline_panel.others_running:
            return
        self._status_seen = stamp
        from tdpu_tui.engine.core import run_status
        self.pipeline_panel.show_recorded(run_status.load(path), os.getpid())

    def on_unmount(self) -> None:
        self._closing = True
        if self.pipeline is not None:
            self.pipeline.cancel.set()
        with self._inbox_cond:
            self._inbox_cond.notify_all()
        self.tailer.stop()

    def _shown(self, path: Path) -> str:
        """A path as the user sees it: relative to the configuration file when inside it."""
        try:
            return str(path.relative_to(self.config.base_dir))
        except ValueError:
            return str(path)

    def _config_name(self) -> str:
        return self.config.file.name if self.config.file is not None else "defaults"

    def _make_stages(self) -> list[Stage]:
        if self._stage_source is None:
            from tdpu_tui.engine.stages import all_stages
            return list(all_stages())
        if callable(self._stage_source):
            return list(self._stage_source())
        return list(self._stage_source)

    def file_label(self, path: Path) -> str:
        """Icraft names its logs {net}_{component}*.log: the label is the component part."""
        name = path.name.removesuffix(".log")
        return name.removeprefix(f"{self.config.icraft.net_name}_") or name

    def _follow_other_runs(self, history: bool) -> None:
        """The stage logs of runs this app did not start (`tdpu --batch` in another shell) and
        Icraft's log files. While a run started here goes on, its events carry both, in order."""
        self.tailer.follow_dir(self.paths.run_logs.resolve(), "*.log", recursive=False,
                               label=lambda p: p.stem, history=history)
        self.tailer.follow_dir(self.paths.icraft_dir.resolve(), "*.log", label=self.file_label,
                               history=history)

    def _show_earlier_runs(self) -> None:
        from tdpu_tui.engine.core import run_status
        started = {name: st.started_ts for name, st in run_status.load(self.paths.run_status).items()
                   if st.started_ts}
        runs = earlier_runs([
            (self.paths.run_logs.resolve(), "*.log", False, lambda p: p.stem, started),
            (self.paths.icraft_dir.resolve(), "*.log", True, self.file_label, {}),
        ])
        log = self.log_panel
        for run in runs:
            log.add_marker(run.label, run.header())
            lines = self._echo.fresh(run.path, run.lines)
            if lines:
                log.add_lines(run.label, lines)
        if runs:
            log.add_marker("", "earlier runs above · lines from now on below")
            log.update_status()

    def follow_file(self, path: str | Path, label: str | None = None) -> None:
        """Show the lines of `path` in the log panel as it grows (Icraft logs, any log)."""
        self.tailer.follow(Path(path).resolve(), label)

    # -- engine events (worker thread) -> inbox -> pump (UI thread) ---------------------------
    def _post_event(self, event: Event) -> None:
        """The pipeline's event sink; runs in the worker thread. Waits while the UI catches up."""
        with self._inbox_cond:
            while len(self._inbox) >= self.MAX_INBOX and not self._closing:
                self._inbox_cond.wait(0.1)
            self._inbox.append(event)

    def _pump(self) -> None:
        try:
            panel = self.pipeline_panel
            log = self.log_panel
        except NoMatches:  # shutting down: the widgets are gone
            return
        with self._inbox_cond:
            events = list(self._inbox)
            self._inbox.clear()
            self._inbox_cond.notify_all()
        pending_label, pending_lines = "", []

        def flush_lines() -> None:
            nonlocal pending_lines
            if pending_lines:
                log.add_lines(pending_label, pending_lines)
                pending_lines = []

        progressed: dict[str, StageProgress] = {}
        for ev in events:
            if isinstance(ev, StageLog):
                stage = ev.stage or ""
                panel.logged(stage, ev.line)
                if stage != pending_label:
                    flush_lines()
                    pending_label = stage
                pending_lines.append(ev.text)
            elif isinstance(ev, StageProgress):
                # Coalesced to one update per stage, the furthest bar with the latest note.
                prev = progressed.get(ev.stage)
                if prev is not None and behind(ev.done, ev.total, prev.done, prev.total):
                    ev = StageProgress(ev.stage, prev.done, prev.total, ev.note or prev.note)
                progressed[ev.stage] = ev
            else:
                flush_lines()
                self._apply_progress(progressed)
                self._handle(ev)
        flush_lines()
        self._apply_progress(progressed)

        got_tail = False
        for label, path, lines in self.tailer.drain_files(self.MAX_LINES_PER_PUMP):
            lines = self._echo.fresh(path, lines)
            if lines:
                log.add_lines(label, lines)
                got_tail = True
        while self.tailer.events:  # truncations, rotations, and files it could not read
            log.add_marker("tail", self.tailer.events.popleft())
        if events or got_tail:
            log.update_status()

    def _apply_progress(self, progressed: dict[str, StageProgress]) -> None:
        for ev in progressed.values():
            self.pipeline_panel.progress(ev.stage, ev.done, ev.total, ev.note)
        progressed.clear()

    def _handle(self, ev: Event) -> None:
        panel = self.pipeline_panel
        if isinstance(ev, StageStarted):
            panel.started(ev.stage, ev.time)
            self.sub_title = f"{self._config_name()} · running {ev.stage}"
        elif isinstance(ev, StageFinished):
            result = ev.result
            panel.finished(result)
            if result.status is Status.FAILED:  # a cancel is not a failure: it says so at the end
                first = result.message.splitlines()[0] if result.message else ""
                hint = "" if result.usage_error else "\nPipeline tab, d opens its bug record"
                self.say(f"{result.name} failed: {first}{hint}",
                         severity="error", title="stage failed", timeout=8)
            if result.name == "export" and result.status is Status.OK:
                self.nodes_panel.reload()
            if result.artifacts.get("performance_report"):
                self.main.query_one(ReportView).reload()
        elif isinstance(ev, (BugRecorded, BugNotFiled)):
            self.show_bug_event(ev)
        elif isinstance(ev, RunFinished):
            self.refresh_bindings()
            self._follow_other_runs(history=False)
            self.last_summary = ev.summary
            counts = collections.Counter(r.status.value for r in ev.summary.results)
            text = ", ".join(f"{n} {s}" for s, n in counts.items()) or "nothing run"
            self.sub_title = f"{self._config_name()} · last run: {text}"
            if ev.summary.cancelled:
                self.say(f"run cancelled: {text}", severity="warning")
            else:
                self.say(f"run finished: {text}",
                         severity="error" if ev.summary.failed else "information")

    # -- running ------------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self.worker is not None and self.worker.state in (WorkerState.PENDING,
                                                                 WorkerState.RUNNING)

    def start_run(self, names: list[str] | None) -> bool:
        if self.running:
            self.say("a run is in progress (c cancels it)", severity="warning")
            return False
        try:
            stages = self._make_stages()
        except Exception as exc:
            self.say(f"cannot load the stages: {exc}", severity="error")
            return False
        pipeline = Pipeline(self.config, stages=stages, on_event=self._post_event,
                            on_failure=self._record_failure)
        try:
            selected = pipeline.select(names)
        except KeyError as exc:
            self.say(str(exc.args[0]), severity="error")
            return False
        self.prepare_bug_book()
        self.pipeline_panel.mark_pending([s.name for s in selected])
        # This run's lines (its stages' and Icraft's) come as events; the files they also go
        # to are not followed until it ends, and then only for what others add.
        self.tailer.unfollow_dir(self.paths.run_logs.resolve())
        self.tailer.unfollow_dir(self.paths.icraft_dir.resolve())
        self.pipeline = pipeline
        self.run_done = done = threading.Event()
        self.worker = self.run_worker(partial(self._run_pipeline, pipeline, names, done),
                                      name="pipeline", group="pipeline", thread=True,
                                      exit_on_error=False)
        self.refresh_bindings()
        return True

    @staticmethod
    def _run_pipeline(pipeline: Pipeline, names: list[str] | None, done: threading.Event):
        heap.before_run()
        try:
            return pipeline.run(names)
        finally:
            heap.after_run()
            done.set()

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        if event.worker is self.worker:
            self.refresh_bindings()
        if event.worker is self.worker and event.state is WorkerState.ERROR:
            self.say(f"the run stopped: {event.worker.error}", severity="error")

    def action_run_all(self) -> None:
        self.start_run(None)

    def action_rerun_failed(self) -> None:
        rows = self.pipeline_panel.rows
        failed = [n for n, r in rows.items() if r.status in run_control.RERUN]
        if not failed:
            self.say("no failed or cancelled stage to rerun")
            return
        # Stages that did not run because of a failure run again with it.
        blocked = [n for n, r in rows.items()
                   if r.status is Status.SKIPPED and r.blocked_by is not None]
        self.start_run([n for n in rows if n in failed or n in blocked])

    def _cancel_event(self) -> threading.Event | None:
        """What stops the work in progress: an import's event while one runs, else the run's."""
        if self.worker is not None and self.worker.name == "icraft-import":
            return self.import_cancel
        return self.pipeline.cancel if self.pipeline is not None else None

    def action_cancel(self) -> None:
        cancel = self._cancel_event()
        if not self.running or cancel is None:
            self.say("nothing is running")
            return
        cancel.set()
        self.say("cancelling: the stage stops at its next check")

    def on_stages_table_run_stage(self, msg: StagesTable.RunStage) -> None:
        self.start_run([msg.name])

    # -- navigation, help, quit ----------------------------------------------------------------
    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        """Keys act, and the footer shows them, only where they can do something."""
        if action in _GUARDED and len(self.screen_stack) > 1:
            return False
        return run_control.can_act(self, action)

    @staticmethod
    def tab_keys() -> dict[str, str]:
        """Tab id -> its digit key."""
        return {tab: str(i) for i, tab in enumerate(_FOCUS, 1)}

    def draft_bug_from(self, name: str) -> None:
        """As `d` on that stage's row (the command palette's draft command)."""
        self.on_stages_table_draft_bug(StagesTable.DraftBug(name))

    def action_show_tab(self, tab: str) -> None:
        main = self.main
        main.query_one(TabbedContent).active = tab
        # At once, not as widget.focus() does (later): a key typed right after the digit
        # ("4" then enter) must reach the new tab, not run the highlighted stage.
        main.set_focus(main.query_one(_FOCUS[tab]))

    def action_help(self) -> None:
        self.push_screen(HelpScreen())

    async def action_quit(self) -> None:
        if self._stopping:      # q again while the run stops: leave at once, still "interrupted"
            self.exit(int(ExitCode.INTERRUPT))
            return
        if not self.running:
            self.exit(0)
            return
        stage = next((n for n, r in self.pipeline_panel.rows.items() if r.status is Status.RUNNING),
                     "a stage")
        self.push_screen(ConfirmScreen(f"[b]{stage}[/b] is running.\nStop the run and quit?"),
                         self._quit_answer)

    def _quit_answer(self, yes: bool | None) -> None:
        if yes:
            self._stop_and_exit()

    @work(group="quit")
    async def _stop_and_exit(self) -> None:
        self._stopping = True
        cancel = self._cancel_event()
        if cancel is not None:
            cancel.set()
        self.say("stopping the run… (q again leaves at once)", timeout=30)
        if self.worker is not None:
            # The run's own error is already reported; we are leaving.
            with contextlib.suppress(Exception):
                await self.worker.wait()
        self.exit(int(ExitCode.INTERRUPT))
