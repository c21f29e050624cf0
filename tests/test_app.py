"""The Textual app, driven by a Pilot: pipeline, log, nodes and bug panels, quitting mid-run.

Fake stages (the Pipeline's `stages=`) keep most tests fast; the tests marked `slow` run the
real tiny pipeline (synthetic model, outputs in tmp_path).
"""

from __future__ import annotations

import asyncio
import functools
import shutil
import threading
import time
from pathlib import Path

import pytest
from conftest import write_config
from textual import events

from tdpu_tui.app.app import TdpuApp
from tdpu_tui.app.log_panel import LevelHighlighter
from tdpu_tui.app.screens import BugForm, ConfirmScreen, HelpScreen
from tdpu_tui.engine.core.artifacts import Artifacts
from tdpu_tui.engine.core.config import load_config
from tdpu_tui.engine.core.errors import StageFailed
from tdpu_tui.engine.core.pipeline import Pipeline
from tdpu_tui.engine.core.stage import Skip, Stage

SIZES = [(120, 40), (80, 24)]


def aio(test):
    """Run an async test in a fresh event loop (no pytest async plugin needed)."""
    @functools.wraps(test)
    def run(*args, **kwargs):
        return asyncio.run(test(*args, **kwargs))
    return run


# -- helpers (also used by test_app_snapshots.py and test_app_tmux.py) -------------------------

class FakeStage(Stage):
    """Logs, reports progress, then ends ok / failed / skipped; or holds until released."""

    def __init__(self, name: str, needs: tuple[str, ...] = (), *, fail: str | None = None,
                 skip: str | None = None, hold: threading.Event | None = None,
                 lines: tuple[str, ...] = ()):
        self.name, self.title, self.needs = name, f"fake {name}", needs
        self.fail, self.skip, self.hold, self.lines = fail, skip, hold, lines
        self.runs = 0
        self.started = threading.Event()

    def run(self, ctx) -> str:
        self.runs += 1
        self.started.set()
        ctx.log(f"{self.name}: starting")
        for line in self.lines:
            ctx.log(line)
        ctx.progress(1, 2, "halfway")
        if self.hold is not None:
            while not self.hold.is_set():
                ctx.check_cancelled()
                time.sleep(0.01)
        if self.fail:
            ctx.log(f"[E] {self.fail}", "error")
            raise StageFailed(self.fail)
        if self.skip:
            raise Skip(self.skip)
        ctx.progress(2, 2)
        return f"{self.name} finished"


def fake_stages(**overrides: FakeStage) -> list[FakeStage]:
    """export ok, precheck fails, parse blocked by it, replace skipped, validate ok."""
    stages = {
        "export": FakeStage("export"),
        "precheck": FakeStage("precheck", ("export",), fail="undocumented op Pow at /model/Pow"),
        "parse": FakeStage("parse", ("precheck",)),
        "replace": FakeStage("replace", ("export",), skip="nothing selected"),
        "validate": FakeStage("validate", ("export",)),
    }
    stages.update(overrides)
    return list(stages.values())


async def wait_for(pilot, condition, timeout: float = 20.0, step: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s")
        await pilot.pause(step)


async def run_and_wait(pilot, app, key: str = "r", timeout: float = 60.0) -> None:
    await pilot.press(key)
    await wait_for(pilot, lambda: app.worker is not None and not app.running, timeout)
    await wait_for(pilot, lambda: app.last_summary is not None, timeout)


def statuses(app) -> dict[str, str]:
    return {name: row.status.value for name, row in app.pipeline_panel.rows.items()}


@pytest.fixture
def cfg(tmp_path):
    return load_config(write_config(tmp_path))


# -- pipeline panel -----------------------------------------------------------------------------

@aio
async def test_a_damaged_status_row_does_not_stop_the_app(cfg):
    _write_status(cfg, {"export": {"status": "running", "pid": 1099511627776, "started_at": "x"},
                        "precheck": {"status": "running", "pid": 1, "started_ts": "soon",
                                     "started_at": "2026-11-26T10:00:00+00:00"},
                        "parse": {"status": "ok", "seconds": "fast"}, "replace": "nonsense"})
    app = TdpuApp(cfg, stages=fake_stages())
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.pause(1.5)
        assert statuses(app)["precheck"] == "running" and statuses(app)["parse"] == "pending"
        assert app.is_running


def _write_status(cfg, rows: dict) -> None:
    import json
    path = Artifacts.of(cfg).run_status
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"format": "tdpu-status/1", "stages": rows}), encoding="utf-8")


@aio
async def test_pipeline_tab_shows_a_batch_run_from_another_process(cfg):
    """`tdpu --batch` in another SSH session: its outcomes show, marked, and follow the file."""
    import subprocess
    import sys
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    other = {"pid": 1, "started_at": "2026-11-26T10:00:00", "finished_at": "2026-11-26T10:00:05"}
    _write_status(cfg, {
        "export": {**other, "status": "ok", "seconds": 5.0, "message": "icraft profile, 136 nodes"},
        "precheck": {**other, "status": "running", "seconds": None, "message": "", "finished_at": ""},
        "replace": {**other, "pid": dead.pid, "status": "running", "seconds": None, "message": ""},
    })
    app = TdpuApp(cfg, stages=fake_stages())
    async with app.run_test(size=(120, 40)) as pilot:
        await wait_for(pilot, lambda: statuses(app)["export"] == "ok")
        rows = app.pipeline_panel.rows
        assert statuses(app) == {"export": "ok", "precheck": "running", "parse": "pending",
                                 "replace": "failed", "validate": "pending"}
        assert rows["export"].message == "icraft profile, 136 nodes"
        assert rows["export"].origin == "run by process 1, finished 2026-11-26 10:00:05"
        assert rows["precheck"].note == "running in process 1"
        assert f"process {dead.pid} ended while this stage ran" in rows["replace"].message
        detail = str(app.query_one("#stage-detail").render())
        assert "not this session's run: run by process 1" in detail
        # The other run goes on: the file changes and the tab follows it.
        _write_status(cfg, {"precheck": {**other, "status": "failed", "seconds": 1.0,
                                         "message": "undocumented op Pow"}})
        await wait_for(pilot, lambda: statuses(app)["precheck"] == "failed", timeout=5)
        # A process that dies without writing again (kill -9) is noticed without a file change.
        sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        try:
            _write_status(cfg, {"validate": {**other, "pid": sleeper.pid, "status": "running",
                                             "seconds": None, "message": "", "finished_at": ""}})
            await wait_for(pilot, lambda: statuses(app)["validate"] == "running", timeout=5)
        finally:
            sleeper.kill()
            sleeper.wait()
        await wait_for(pilot, lambda: statuses(app)["validate"] == "failed", timeout=5)
        # A run started here takes its rows over (and is not shown as another process's).
        await run_and_wait(pilot, app)
        assert not any(r.origin for r in rows.values())
        assert statuses(app)["export"] == "ok" and statuses(app)["precheck"] == "failed"



@pytest.mark.parametrize("size", SIZES)
@aio
async def test_run_all_shows_every_stage_status_and_result(cfg, size):
    app = TdpuApp(cfg, stages=fake_stages())
    async with app.run_test(size=size) as pilot:
        assert set(statuses(app).values()) == {"pending"}
        await run_and_wait(pilot, app)
        assert statuses(app) == {"export": "ok", "precheck": "failed", "parse": "skipped",
                                 "replace": "skipped", "validate": "ok"}
        rows = app.pipeline_panel.rows
        assert rows["precheck"].message == "undocumented op Pow at /model/Pow"
        assert rows["parse"].message == "not run: precheck failed"
        assert rows["export"].result_line() == "export finished"
        assert rows["export"].seconds is not None
        table = app.pipeline_panel.table
        assert str(table.get_cell("precheck", "status")) == "✘ failed"
        assert str(table.get_cell("export", "progress")).endswith("100%")
        assert "ok" in app.sub_title and "failed" in app.sub_title


@aio
async def test_a_result_with_brackets_is_shown_as_written(cfg):
    stages = [FakeStage("parse", skip="Icraft CLI 'icraft' not found on PATH; set [icraft].bin")]
    app = TdpuApp(cfg, stages=stages)
    async with app.run_test(size=(120, 40)) as pilot:
        await run_and_wait(pilot, app)
        cell = app.pipeline_panel.table.get_cell("parse", "result")
        assert cell.plain.endswith("set [icraft].bin")


@aio
async def test_the_panels_text_areas_are_drawn_in_the_foreground_colour(cfg):
    """Textual 8 caches a widget's text style keyed on the widget's own styles, so a style
    computed before the screen's colour reached it stayed transparent (the stage detail drawn
    in the background colour in about one start in three). Each text area names its colour."""
    app = TdpuApp(cfg, stages=fake_stages())
    async with app.run_test(size=(120, 40)) as pilot:
        await run_and_wait(pilot, app)
        await pilot.press("down")
        for tab, name in (("1", "#stage-detail"), ("2", "#log-status"), ("3", "#nodes-status"),
                          ("3", "#node-detail"), ("4", "#bugs-status"), ("4", "#bug-detail")):
            await pilot.press(tab)
            await pilot.pause()
            widget = app.screen.query_one(name)
            assert widget.styles.has_rule("color"), name
            assert widget.visual_style.foreground.a == 1, name


@pytest.mark.slow
@aio
async def test_the_tiny_pipeline_runs_from_the_app(cfg):
    """The real registry on the synthetic tiny model; Icraft is not installed here."""
    app = TdpuApp(cfg, stages=None)
    async with app.run_test(size=(120, 40)) as pilot:
        names = list(statuses(app))
        assert names[:2] == ["export", "precheck"] and "validate" in names
        await run_and_wait(pilot, app, timeout=300)
        got = statuses(app)
        assert got["export"] == "ok" and got["validate"] == "ok", app.pipeline_panel.rows
        assert all(s in ("ok", "skipped") for s in got.values()), got
        # The Nodes tab reloads on the new export: its inventory, from the graph just written.
        panel = app.nodes_panel
        await wait_for(pilot, lambda: not panel.loading and panel.nodes, timeout=60)
        assert panel.loaded_mtime == panel.export_mtime() is not None
        assert sum(1 for n in panel.nodes if n.ternary) == 14 and not panel.error
        assert any(line.startswith("validate") for line in app.log_panel.ring)


@aio
async def test_enter_runs_the_highlighted_stage_only(cfg):
    stages = fake_stages()
    app = TdpuApp(cfg, stages=stages)
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.press("down", "down", "down")  # replace
        await run_and_wait(pilot, app, "enter")
        assert [s.runs for s in stages] == [0, 0, 0, 1, 0]
        assert statuses(app)["replace"] == "skipped"
        assert statuses(app)["export"] == "pending"


@aio
async def test_results_of_stages_downstream_of_a_rerun_stage_are_marked_old(cfg):
    app = TdpuApp(cfg, stages=fake_stages())
    async with app.run_test(size=(120, 40)) as pilot:
        await run_and_wait(pilot, app)
        app.last_summary = None
        await run_and_wait(pilot, app, "enter")  # export only
        table = app.pipeline_panel.table
        assert table.get_cell("validate", "result").plain == \
            "old (export ran since): validate finished"
        assert table.get_cell("parse", "result").plain.startswith("old (export ran since)")
        assert not table.get_cell("export", "result").plain.startswith("old")
        app.last_summary = None
        await run_and_wait(pilot, app)
        assert table.get_cell("validate", "result").plain == "validate finished"


@aio
async def test_a_failed_or_cancelled_rerun_marks_everything_downstream_old(cfg):
    hold = threading.Event()
    stages = fake_stages()
    app = TdpuApp(cfg, stages=stages)
    try:
        async with app.run_test(size=(120, 40)) as pilot:
            await run_and_wait(pilot, app)
            table = app.pipeline_panel.table
            assert table.get_cell("validate", "result").plain == "validate finished"
            stages[0].fail = "checkpoint unreadable"
            app.last_summary = None
            await run_and_wait(pilot, app, "enter")  # export only, and it fails
            assert statuses(app)["export"] == "failed"
            assert table.get_cell("validate", "result").plain == \
                "old (export failed since): validate finished"
            # Transitively: parse needs precheck, which needs export.
            assert table.get_cell("parse", "result").plain == \
                "old (export failed since): not run: precheck failed"
            stages[0].fail, stages[0].hold = None, hold
            app.last_summary = None
            await pilot.press("enter")
            await wait_for(pilot, lambda: statuses(app)["export"] == "running")
            assert table.get_cell("validate", "result").plain == \
                "old (export is running): validate finished"
            await pilot.press("c")
            await wait_for(pilot, lambda: app.last_summary is not None and not app.running)
            assert statuses(app)["export"] == "cancelled"
            assert table.get_cell("replace", "result").plain == \
                "old (export was cancelled since): nothing selected"
            detail = str(app.query_one("#stage-detail").render())
            assert "export" in detail and "cancelled" in detail
    finally:
        hold.set()


def test_old_results_follow_the_needs_and_a_plain_skip_makes_nothing_old():
    from tdpu_tui.app.pipeline_panel import StageRow
    from tdpu_tui.app.staleness import Stale, stale_rows
    from tdpu_tui.engine.core.events import Status

    def row(name, needs, status, at, blocked_by=None):
        r = StageRow(name, name, tuple(needs), status, ran_at=at)
        r.blocked_by = blocked_by
        return r

    rows = {r.name: r for r in (
        row("export", (), Status.OK, 10.0),
        row("parse", ("export",), Status.SKIPPED, 11.0),            # no Icraft: nothing written
        row("optimize", ("parse",), Status.OK, 2.0),
        row("replace", ("export",), Status.OK, 3.0),
        row("validate", ("replace",), Status.OK, 12.0),             # ran on the old replace output
        row("rtl", ("validate",), Status.PENDING, None),
    )}
    assert stale_rows(rows) == {"replace": Stale("export", "ran"), "validate": Stale("export", "ran")}
    rows["parse"].blocked_by = "export"
    rows["export"].status = Status.FAILED
    got = stale_rows(rows)
    assert got["optimize"] == Stale("export", "failed") and got["replace"] == Stale("export", "failed")
    assert "rtl" not in got and "export" not in got and "parse" not in got


@aio
async def test_a_newer_run_elsewhere_marks_this_sessions_older_results_old(cfg):
    app = TdpuApp(cfg, stages=fake_stages())
    async with app.run_test(size=(120, 40)) as pilot:
        await run_and_wait(pilot, app)
        later = time.time() + 5
        _write_status(cfg, {"export": {"pid": 1, "status": "ok", "seconds": 2.0, "message": "again",
                                       "started_at": "2026-11-26T10:00:00", "started_ts": later,
                                       "finished_at": "2026-11-26T10:00:02"}})
        table = app.pipeline_panel.table
        await wait_for(pilot, lambda: table.get_cell("validate", "result").plain.startswith("old"),
                       timeout=5)
        assert table.get_cell("validate", "result").plain == \
            "old (export ran since): validate finished"


@aio
async def test_f_reruns_failed_stages_and_those_they_blocked(cfg):
    stages = fake_stages()
    app = TdpuApp(cfg, stages=stages)
    async with app.run_test() as pilot:
        await run_and_wait(pilot, app)
        stages[1].fail = None  # the cause is fixed
        app.last_summary = None
        await run_and_wait(pilot, app, "f")
        assert [s.runs for s in stages] == [1, 2, 1, 1, 1]
        assert statuses(app)["precheck"] == "ok" and statuses(app)["parse"] == "ok"


@aio
async def test_keys_answer_while_a_stage_runs_and_c_cancels_it(cfg):
    hold = threading.Event()
    stages = fake_stages(export=FakeStage("export", hold=hold))
    app = TdpuApp(cfg, stages=stages)
    try:
        async with app.run_test() as pilot:
            await pilot.press("r")
            await wait_for(pilot, lambda: statuses(app)["export"] == "running")
            start = time.perf_counter()
            await pilot.press("2")
            assert app.query_one("#tabs").active == "log"
            assert time.perf_counter() - start < 1.0
            await pilot.press("1", "c")
            await wait_for(pilot, lambda: not app.running)
            await wait_for(pilot, lambda: statuses(app)["export"] == "cancelled")
            assert app.pipeline_panel.rows["export"].message == "stage 'export' cancelled"
            await wait_for(pilot, lambda: statuses(app)["validate"] == "cancelled")
            assert app.pipeline_panel.rows["precheck"].message == "not run: cancelled"
            assert "■ cancelled" in app.pipeline_panel.table.get_cell("export", "status").plain
            # A run starts the book (its title line); a cancel drafts no record in it.
            assert _bugs(cfg).read_text(encoding="utf-8") == "# Phase 3 Bug记录\n"
            assert not any(n.title == "stage failed" for n in app._notifications)
            assert any("run cancelled" in n.message for n in app._notifications)
            # Nor is it offered as a draft: `d` is not in the footer and opens no form.
            assert app.pipeline_panel.current == "export"
            assert app.pipeline_panel.table.check_action("draft_bug", ()) is False
            await pilot.press("d")
            await pilot.pause()
            assert not isinstance(app.screen, BugForm)
    finally:
        hold.set()


@aio
async def test_quit_during_a_run_asks_first_then_stops_the_stage(cfg):
    hold = threading.Event()
    stages = fake_stages(export=FakeStage("export", hold=hold))
    app = TdpuApp(cfg, stages=stages)
    try:
        async with app.run_test() as pilot:
            await pilot.press("r")
            await wait_for(pilot, lambda: statuses(app)["export"] == "running")
            await pilot.press("q")
            await wait_for(pilot, lambda: isinstance(app.screen, ConfirmScreen))
            await pilot.press("n")
            await wait_for(pilot, lambda: not isinstance(app.screen, ConfirmScreen))
            assert app.running and not app.pipeline.cancel.is_set()
            await pilot.press("q")
            await wait_for(pilot, lambda: isinstance(app.screen, ConfirmScreen))
            worker = app.worker
            await pilot.press("y")
            await wait_for(pilot, lambda: not app.is_running, timeout=10)
        assert app.return_value == 130  # quit during a run: interrupted
        assert app.pipeline.cancel.is_set()
        assert worker.is_finished
        assert stages[0].runs == 1 and all(s.runs == 0 for s in stages[1:])
    finally:
        hold.set()


@aio
async def test_quit_when_idle_does_not_ask(cfg):
    app = TdpuApp(cfg, stages=fake_stages())
    async with app.run_test() as pilot:
        await pilot.press("q")
        await wait_for(pilot, lambda: not app.is_running, timeout=5)
    assert app.return_value == 0


@aio
async def test_help_lists_the_keys_and_escape_closes_it(cfg):
    app = TdpuApp(cfg, stages=fake_stages())
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("question_mark")
        assert isinstance(app.screen, HelpScreen)
        await pilot.pause()
        text = "\n".join(str(w.render()) for w in app.screen.query(".help-column"))
        for key in ("enter", "space", "ctrl+s", "end", "ctrl+p", "5"):
            assert key in text
        # It fits 80×24 whole, and how to close it is its first line.
        dialog = app.screen.query_one("#help")
        assert dialog.region.height <= 24 and dialog.region.width <= 80
        for column in app.screen.query(".help-column"):
            assert column.region.height == len(str(column.render()).splitlines())
            assert column.region.bottom <= dialog.region.bottom
            assert all(len(line) <= column.region.width for line in str(column.render()).splitlines())
        # The left column's lines end before the right column starts: a gap, not "tabend".
        left = app.screen.query_one("#help-text")
        assert all(len(line) < left.region.width for line in str(left.render()).splitlines())
        assert left.region.right == app.screen.query_one("#help-text-right").region.x
        close = app.screen.query_one("#help-close")
        assert close.region.y == dialog.region.y + 1 and "escape" in str(close.render())
        await pilot.press("r")  # app keys are inert behind a dialog
        assert app.worker is None
        await pilot.press("escape")
        assert not isinstance(app.screen, HelpScreen)


@aio
async def test_no_color_is_honoured_and_status_is_not_colour_only(cfg, monkeypatch):
    monkeypatch.setenv("NO_COLOR", "1")
    app = TdpuApp(cfg, stages=fake_stages())
    async with app.run_test(size=(80, 24)) as pilot:
        assert app.no_color
        await run_and_wait(pilot, app)
        table = app.pipeline_panel.table
        assert [str(table.get_cell(n, "status")) for n in ("export", "precheck", "parse")] == [
            "✔ ok", "✘ failed", "– skipped"]


def test_run_app_reports_a_bad_configuration_path_as_usage_error(tmp_path, capsys):
    from tdpu_tui.app import run_app
    assert run_app(tmp_path / "missing.toml") == 2
    assert "missing.toml" in capsys.readouterr().err


@aio
async def test_a_broken_stage_registry_is_shown_not_fatal(cfg):
    def broken():
        raise ImportError("cannot import name 'ReplaceStage'")

    app = TdpuApp(cfg, stages=broken)
    async with app.run_test() as pilot:
        assert "ReplaceStage" in app.pipeline_panel.problem
        await pilot.press("r")
        assert app.worker is None


# -- log panel ----------------------------------------------------------------------------------

@aio
async def test_stage_log_lines_reach_the_log_panel(cfg):
    stages = fake_stages(export=FakeStage("export", lines=("graph written", "[W] slow")))
    app = TdpuApp(cfg, stages=stages)
    async with app.run_test() as pilot:
        await run_and_wait(pilot, app)
        lines = list(app.log_panel.ring)
        assert any(line.startswith("export") and line.endswith("│ graph written") for line in lines)
        assert any("[error] [E] undocumented op Pow" in line for line in lines)


@aio
async def test_log_panel_follows_a_file_through_truncation(cfg, tmp_path):
    log = tmp_path / "net_parse.log"
    log.write_text("[11/26/26 08:00:00.000] [I] first run\n")
    app = TdpuApp(cfg, stages=fake_stages(), follow=[log])
    async with app.run_test() as pilot:
        panel = app.log_panel

        def seen(text):
            return lambda: any(text in line for line in panel.ring)

        await wait_for(pilot, seen("first run"))
        with open(log, "a") as fh:
            fh.write("[11/26/26 08:00:01.000] [E] 执行以下命令时捕获到错误码21002:\n")
        await wait_for(pilot, seen("错误码21002"))
        log.write_bytes("[W] 第二次\n".encode("gbk"))  # Icraft rewrote it (GBK, shorter)
        await wait_for(pilot, seen("[W] 第二次"))
        assert any("truncated" in line for line in panel.ring)
        assert panel.received == 3


@aio
async def test_a_batch_run_elsewhere_shows_and_our_own_run_is_not_shown_twice(cfg):
    runs = Artifacts.of(cfg).run_logs
    runs.mkdir(parents=True)
    (runs / "export.log").write_text("export from last night\n")
    app = TdpuApp(cfg, stages=fake_stages())
    async with app.run_test() as pilot:
        panel = app.log_panel
        await wait_for(pilot, lambda: any("last night" in line for line in panel.ring))
        with open(runs / "validate.log", "w") as fh:  # `tdpu --batch` in another shell
            fh.write("validate from the batch run\n")
        await wait_for(pilot, lambda: any("from the batch run" in line for line in panel.ring))
        await run_and_wait(pilot, app)
        await pilot.pause(0.5)  # time for the tailer to see the run logs our run wrote
        assert sum("export: starting" in line for line in panel.ring) == 1
        with open(runs / "export.log", "a") as fh:
            fh.write("appended later\n")
        await wait_for(pilot, lambda: any("appended later" in line for line in panel.ring))
        assert sum("export: starting" in line for line in panel.ring) == 1


@aio
async def test_our_runs_icraft_lines_are_shown_once_in_the_order_the_stage_saw_them(cfg):
    logs = Artifacts.of(cfg).icraft_logs / "parse"
    log_file = logs / "bitnet_b158_parse.log"
    said = [("[11/26/26 09:59:35.500] [W] 正在检查输入文件", "warning", str(log_file)),
            ("[11/26/26 09:59:35.527] [F] 21002", "error", str(log_file)),
            ("[11/26/26 09:59:35.539] [E] 执行以下命令时捕获到错误码10:", "error", "icraft stdout")]

    class Icraft(FakeStage):
        def run(self, ctx) -> str:
            logs.mkdir(parents=True, exist_ok=True)
            log_file.write_text("".join(line + "\n" for line, _, src in said if src != "icraft stdout"))
            for line, level, source in said:  # as run_icraft passes them on: each once
                ctx.log(line, level, source)
            time.sleep(0.3)  # a tailer on the log folder would have read the file by now
            raise StageFailed("Icraft error 21002")

    app = TdpuApp(cfg, stages=[Icraft("parse")])
    async with app.run_test() as pilot:
        await run_and_wait(pilot, app)
        await pilot.pause(0.5)
        ring = list(app.log_panel.ring)
        shown = [x for x in ring if "[11/26/26" in x]
        assert [x.split("│ ", 1)[1] for x in shown] == [line for line, _, _ in said], ring
        assert not any("[error] [11/26/26" in x for x in ring)  # no level tag on Icraft's own


@aio
async def test_a_run_elsewhere_shows_an_icraft_line_once_from_its_stage_log_and_icraft_log(cfg):
    paths = Artifacts.of(cfg)
    app = TdpuApp(cfg, stages=fake_stages())
    async with app.run_test() as pilot:
        line = "[11/26/26 09:59:35.527] [F] 21002"
        (paths.icraft_logs / "optimize").mkdir(parents=True)
        (paths.icraft_logs / "optimize" / "bitnet_b158_optimize.log").write_text(line + "\n")
        paths.run_logs.mkdir(parents=True)
        (paths.run_logs / "optimize.log").write_text(f"{line}\n[error] icraft optimize failed\n")
        ring = app.log_panel.ring
        await wait_for(pilot, lambda: any("icraft optimize failed" in x for x in ring))
        await pilot.pause(0.3)
        assert sum(line in x for x in ring) == 1, list(ring)


@aio
async def test_a_file_the_tailer_cannot_read_is_said_in_the_log_panel(cfg):
    app = TdpuApp(cfg, stages=fake_stages())
    async with app.run_test() as pilot:
        app.tailer.events.append("tail error: [Errno 13] Permission denied: 'x.log'")
        await wait_for(pilot, lambda: any("Permission denied" in x for x in app.log_panel.ring))


@aio
async def test_icraft_logs_under_the_output_directory_are_tailed(cfg):
    app = TdpuApp(cfg, stages=fake_stages())
    async with app.run_test() as pilot:
        logs = Artifacts.of(cfg).icraft_logs / "parse"
        logs.mkdir(parents=True)
        (logs / "bitnet_b158_parse.log").write_text("[I] parse ok\n")
        await wait_for(pilot, lambda: any("parse ok" in line for line in app.log_panel.ring))
        assert any(line.startswith("parse     │ [I] parse ok") for line in app.log_panel.ring)


@aio
async def test_log_filter_end_follow_and_memory_bound(cfg, tmp_path):
    log = tmp_path / "big.log"
    app = TdpuApp(cfg, stages=fake_stages(), follow=[log])
    async with app.run_test(size=(80, 24)) as pilot:
        panel = app.log_panel
        panel.ring = type(panel.ring)(panel.ring, maxlen=500)
        panel.max_lines = panel.view.max_lines = 500
        log.write_text("".join(f"{'[E] ' if i % 100 == 0 else ''}line {i}\n" for i in range(2000)))
        await wait_for(pilot, lambda: panel.received == 2000)
        assert len(panel.ring) == 500 and panel.view.line_count <= 500
        await pilot.press("2")
        assert panel.following
        await pilot.press("home")
        assert not panel.following
        await pilot.press("end")
        assert panel.following
        await pilot.press("slash", *"[e]", "enter")
        assert panel.filter_text == "[e]"
        assert "filter: '[e]'" in str(panel.query_one("#log-status").render())  # not markup
        assert panel.view.line_count == 5  # 1500..1900 are still in the ring
        await pilot.press("escape")
        assert panel.filter_text == "" and panel.view.line_count == 500


def test_error_and_warning_lines_are_highlighted():
    from rich.text import Text
    h = LevelHighlighter()
    for line, style in (("[01/02/26 10:00:00.1] [E] boom", "bold red"), ("[F] 21002", "bold red"),
                        ("[W] careful", "bold yellow"), ("[I] fine", None)):
        text = Text(line)
        h.highlight(text)
        assert [str(s.style) for s in text.spans] == ([style] if style else [])


# -- nodes panel --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def exported_dir(tmp_path_factory):
    """A tiny export (real export stage) that tests copy before changing anything."""
    from tdpu_tui.engine.stages import all_stages
    d = tmp_path_factory.mktemp("app_export")
    cfg = load_config(write_config(d))
    export = [s for s in all_stages() if s.name == "export"]
    result = Pipeline(cfg, stages=export).run().results[0]
    assert result.status.value == "ok", result.message
    return d


@pytest.fixture
def exported(exported_dir, tmp_path):
    d = tmp_path / "project"
    shutil.copytree(exported_dir, d)
    return load_config(d / "tdpu.toml")


def _row_names(table) -> list[str]:
    return [table.coordinate_to_cell_key((i, 0)).row_key.value for i in range(table.row_count)]


@pytest.mark.slow
@pytest.mark.parametrize("size", SIZES)
@aio
async def test_nodes_toggles_are_saved_to_the_selection_file(exported, size):
    from tdpu_tui.engine.rewrite.selection import load_selection
    app = TdpuApp(exported, stages=fake_stages())
    selection_file = Artifacts.of(exported).replace_selection
    async with app.run_test(size=size) as pilot:
        await pilot.press("3")
        panel = app.nodes_panel
        await wait_for(pilot, lambda: panel.nodes)
        ternary = [n.name for n in panel.nodes if n.ternary]
        assert len(ternary) == 14 and all(panel.selection[n] for n in ternary)
        table = panel.table
        first = _row_names(table).index(ternary[0])
        table.move_cursor(row=first)
        await pilot.press("space")
        assert load_selection(selection_file) == {ternary[0]: False}
        assert str(table.get_cell(ternary[0], "replace")) == "[ ]"
        await pilot.press("n")
        assert not any(load_selection(selection_file).values())
        await pilot.press("a")
        assert load_selection(selection_file) == {n: True for n in ternary}
        # A row that is not ternary cannot be toggled, and says why.
        other = next(n for n in panel.nodes if not n.ternary)
        table.move_cursor(row=_row_names(table).index(other.name))
        await pilot.press("space")
        assert other.name not in load_selection(selection_file)
        assert any(f"cannot be replaced: {other.status}" in n.message and not n.markup
                   for n in app._notifications)


@pytest.mark.slow
@aio
async def test_nodes_filter_and_reload_after_a_new_export(exported):
    app = TdpuApp(exported, stages=fake_stages())
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.press("3")
        panel = app.nodes_panel
        await wait_for(pilot, lambda: panel.nodes)
        await pilot.press("slash", *"down_proj", "enter")
        assert _row_names(panel.table) == ["/model/layers.0/mlp/down_proj/MatMul",
                                           "/model/layers.1/mlp/down_proj/MatMul"]
        await pilot.press("escape")
        assert panel.table.row_count == len(panel.nodes)
        before = panel.loaded_mtime
        onnx = Artifacts.of(exported).full_onnx
        onnx.touch()
        await wait_for(pilot, lambda: panel.loaded_mtime != before, timeout=5)


@pytest.mark.slow
@aio
async def test_all_and_none_act_on_the_filtered_nodes_only(exported):
    from tdpu_tui.engine.rewrite.selection import load_selection
    app = TdpuApp(exported, stages=fake_stages())
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.press("3")
        panel = app.nodes_panel
        await wait_for(pilot, lambda: panel.nodes)
        await pilot.press("slash", *"up_proj", "enter", "n")
        saved = load_selection(Artifacts.of(exported).replace_selection)
        assert saved == {"/model/layers.0/mlp/up_proj/MatMul": False,
                         "/model/layers.1/mlp/up_proj/MatMul": False}
        assert panel.selection["/model/layers.0/mlp/down_proj/MatMul"] is True


@pytest.mark.slow
@aio
async def test_lm_head_detail_says_it_is_held_in_bf16_when_configured(exported):
    exported.replace.lm_head = "bf16"
    app = TdpuApp(exported, stages=fake_stages())
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.press("3")
        panel = app.nodes_panel
        await wait_for(pilot, lambda: panel.nodes)
        panel.table.move_cursor(row=_row_names(panel.table).index("/lm_head/Gemm"))
        await pilot.pause()
        detail = str(app.query_one("#node-detail").render())
        assert "held in bf16 as LinearBF16" in detail
        assert str(panel.table.get_cell("/lm_head/Gemm", "replace")) == "bf16"
        panel.table.move_cursor(row=_row_names(panel.table).index("/model/layers.0/mlp/up_proj/MatMul"))
        await pilot.pause()
        assert "bf16" not in str(app.query_one("#node-detail").render())


@pytest.mark.slow
@aio
async def test_toggled_nodes_are_kept_by_replace(exported):
    """Deselect a node in the app, run `replace` from the app, find it still a MatMul."""
    import onnx

    app = TdpuApp(exported)
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.press("3")
        panel = app.nodes_panel
        await wait_for(pilot, lambda: panel.nodes)
        keep = "/model/layers.1/mlp/up_proj/MatMul"
        panel.table.move_cursor(row=_row_names(panel.table).index(keep))
        await pilot.press("space")
        await pilot.press("1")
        table = app.pipeline_panel.table
        table.move_cursor(row=_row_names(table).index("replace"))
        await run_and_wait(pilot, app, "enter")
        assert statuses(app)["replace"] == "ok", app.pipeline_panel.rows["replace"].message
    graph = onnx.load(str(Artifacts.of(exported).bitlinear_onnx), load_external_data=False).graph
    ops = {n.name: n.op_type for n in graph.node}
    assert ops.get(keep) == "MatMul"
    assert sum(1 for n in graph.node if n.op_type == "BitLinear") == 13


# -- bugs panel and form ----------------------------------------------------------------------

BUG_FILE = """# Phase 3 Bug记录

## Bug #1: parse 报错 21002
- **发现时间**: 2026-11-20 10:00
- **发现阶段**: 编译
- **错误信息**: [F] 21002
- **根本原因**: Pow 不支持
- **解决方案**: 用 Mul 替代
- **状态**: 已解决

---
"""


def _bugs(cfg) -> Path:
    path = Artifacts.of(cfg).bugs
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


async def _type(pilot, text: str) -> None:
    for ch in text:
        await pilot.press(ch if ch != " " else "space")


@pytest.mark.parametrize("size", SIZES)
@aio
async def test_add_a_bug_through_the_form(cfg, size):
    path = _bugs(cfg)
    path.write_text(BUG_FILE, encoding="utf-8")
    app = TdpuApp(cfg, stages=fake_stages())
    async with app.run_test(size=size) as pilot:
        await pilot.press("4")
        assert app.bugs_panel.table.row_count == 1
        await pilot.press("b")
        form = app.screen
        assert isinstance(form, BugForm)
        form.query_one("#f-title").value = "optimize "
        await _type(pilot, "hangs [icraft]")
        form.query_one("#f-stage").value = "编译"
        form.query_one("#f-error").text = "[E] 执行以下命令时捕获到错误码21002:\nicraft optimize"
        form.query_one("#f-cause").text = "pass order"
        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: not isinstance(app.screen, BugForm))
        assert app.bugs_panel.table.row_count == 2
        assert app.bugs_panel.table.get_cell("2", "title").plain == "optimize hangs [icraft]"
    text = path.read_text(encoding="utf-8")
    assert BUG_FILE.split("\n", 2)[2] in text  # the existing record is untouched, byte for byte
    assert "## Bug #2: optimize hangs [icraft]" in text
    assert "错误码21002" in text and "- **根本原因**: pass order" in text
    assert "- **状态**: 未解决" in text


@aio
async def test_the_form_validates_and_escape_cancels(cfg):
    path = _bugs(cfg)
    app = TdpuApp(cfg, stages=fake_stages())
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("b")
        form = app.screen
        form.query_one("#f-time").value = "2026-13-40 25:00"
        await pilot.press("ctrl+s")
        problems = str(form.query_one("#bug-form-problems").render())
        assert "title" in problems and "time" in problems and "stage" in problems
        assert "error" not in problems  # optional, as for `tdpu bugs add`
        assert app.screen is form and form.focused.id == "f-title"
        # Fixing a field takes its problem off the list at once (the others stay).
        await pilot.press(*"hang")
        await pilot.pause()
        problems = str(form.query_one("#bug-form-problems").render())
        assert "title" not in problems and "time" in problems and "stage" in problems
        await pilot.press("tab", "tab", "enter")  # the stage list opens; escape closes only it
        await pilot.press("escape")
        assert app.screen is form
        await pilot.press("escape")  # something was typed: asks before throwing it away
        assert isinstance(app.screen, ConfirmScreen)
        await pilot.press("n")
        assert app.screen is form and form.query_one("#f-time").value == "2026-13-40 25:00"
        await pilot.press("escape", "y")
        await wait_for(pilot, lambda: not isinstance(app.screen, (BugForm, ConfirmScreen)))
        await pilot.press("b", "escape")  # nothing typed: closes at once
        assert not isinstance(app.screen, BugForm)
    assert not path.exists()


def test_the_form_checks_fields_by_the_bug_books_rules():
    from tdpu_tui.engine.records.bugbook import BugRecord, field_problems
    ok = {"title": "t", "time": "2026-11-26 09:00", "stage": "导出", "status": "未解决", "error": ""}
    assert field_problems(ok) == {}
    assert set(field_problems({**ok, "time": "2026-02-30 09:00"})) == {"time"}
    assert set(field_problems({**ok, "stage": "x", "status": ""})) == {"stage", "status"}
    # Editing a hand-written record: a 发现时间 it already holds is kept as it is.
    hand = BugRecord(1, "t", "2月11日 下午", "导出", status="未解决")
    assert field_problems({**ok, "time": "2月11日 下午"}, base=hand) == {}
    assert set(field_problems({**ok, "time": "2月12日"}, base=hand)) == {"time"}


@aio
async def test_edit_a_bug_through_the_form(cfg):
    path = _bugs(cfg)
    path.write_text(BUG_FILE + "\n用户自己写的备注\n", encoding="utf-8")
    app = TdpuApp(cfg, stages=fake_stages())
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.press("4", "enter")
        form = app.screen
        assert isinstance(form, BugForm)
        assert form.query_one("#f-title").value == "parse 报错 21002"
        assert form.query_one("#f-status").value == "已解决"
        form.query_one("#f-status").value = "待验证"
        form.query_one("#f-fix").text = "用 Mul 替代，并重新导出"
        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: not isinstance(app.screen, BugForm))
    text = path.read_text(encoding="utf-8")
    assert "- **状态**: 待验证" in text and "用 Mul 替代，并重新导出" in text
    assert "用户自己写的备注" in text and text.count("## Bug #") == 1


@aio
async def test_a_key_typed_right_after_a_tab_digit_goes_to_that_tab(cfg):
    path = _bugs(cfg)
    path.write_text(BUG_FILE, encoding="utf-8")
    stages = fake_stages()
    app = TdpuApp(cfg, stages=stages)
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.pause()
        app.post_message(events.Key("4", "4"))
        app.post_message(events.Key("enter", "\r"))
        await wait_for(pilot, lambda: isinstance(app.screen, BugForm), timeout=5)
        assert all(s.runs == 0 for s in stages)  # enter did not run the highlighted stage


@aio
async def test_a_hand_edit_made_while_the_form_is_open_is_not_overwritten(cfg):
    path = _bugs(cfg)
    path.write_text(BUG_FILE, encoding="utf-8")
    app = TdpuApp(cfg, stages=fake_stages())
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.press("4", "enter")
        form = app.screen
        assert isinstance(form, BugForm)
        # Someone edits the file meanwhile; the Bugs tab reloads it behind the form.
        path.write_text(BUG_FILE.replace("Pow 不支持", "Pow 不在算子表里"), encoding="utf-8")
        await wait_for(pilot, lambda: app.bugs_panel.record(1).cause == "Pow 不在算子表里",
                       timeout=5)
        form.query_one("#f-status").value = "待验证"
        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: not isinstance(app.screen, BugForm))
    text = path.read_text(encoding="utf-8")
    assert "- **根本原因**: Pow 不在算子表里" in text and "- **状态**: 待验证" in text
    assert text.count("## Bug #") == 1


@aio
async def test_a_failed_stage_drafts_its_bug_record_and_d_edits_it(cfg):
    app = TdpuApp(cfg, stages=fake_stages())
    async with app.run_test(size=(120, 40)) as pilot:
        await run_and_wait(pilot, app)
        text = _bugs(cfg).read_text(encoding="utf-8")
        assert "## Bug #1: precheck 失败: undocumented op Pow" in text  # drafted at once
        assert "- **发现阶段**: 编译" in text and "- **状态**: 未解决" in text
        await pilot.press("d")  # export is ok: nothing to draft
        assert not isinstance(app.screen, BugForm)
        await pilot.press("down", "d")
        form = app.screen
        assert isinstance(form, BugForm)
        values = form.current()
        assert values["stage"] == "编译" and values["status"] == "未解决"
        assert values["title"].startswith("precheck 失败: undocumented op Pow")
        assert "undocumented op Pow at /model/Pow" in values["error"]
        assert "[E] undocumented op Pow" in values["error"]  # the log tail
        form.query_one("#f-cause").text = "Pow 不在 Icraft 的算子表里"
        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: not isinstance(app.screen, BugForm))
        await run_and_wait(pilot, app)  # the same failure again: no second record
        await pilot.pause(1.5)  # the Bugs tab's disk check has seen the draft
        assert app.bugs_panel.table.row_count == 1
        # The draft is this session's own: never reported as an edit made elsewhere.
        assert not any("outside this session" in n.message for n in app._notifications)
    text = _bugs(cfg).read_text(encoding="utf-8")
    assert text.count("## Bug #") == 1
    assert "Pow 不在 Icraft 的算子表里" in text


@aio
async def test_bug_file_changed_on_disk_is_reloaded(cfg):
    path = _bugs(cfg)
    path.write_text(BUG_FILE, encoding="utf-8")
    app = TdpuApp(cfg, stages=fake_stages())
    async with app.run_test() as pilot:
        await pilot.press("4")
        assert app.bugs_panel.table.row_count == 1
        path.write_text(BUG_FILE + BUG_FILE.split("\n", 2)[2].replace("#1", "#2"), encoding="utf-8")
        await wait_for(pilot, lambda: app.bugs_panel.table.row_count == 2, timeout=5)
        # notify() posts a message: the notice lands a moment after the table's rebuild
        await wait_for(pilot, lambda: any(n.title == "bug records" for n in app._notifications), timeout=5)
        assert any(n.title == "bug records" for n in app._notifications)


# -- #13.15: memory per tab switch, the collector after runs -----------------------------------

@aio
async def test_tab_switches_leave_no_footer_keys_behind(cfg):
    """Textual's Footer kept every removed key alive (a data_bind watcher per key)."""
    import gc

    from textual.widgets._footer import FooterKey
    app = TdpuApp(cfg, stages=fake_stages())
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.press("1", "2", "3", "4", "1")
        await pilot.pause(0.2)
        gc.collect()
        before = sum(isinstance(o, FooterKey) for o in gc.get_objects())
        for i in range(16):
            await pilot.press("1234"[i % 4])
        await pilot.press("1")
        await pilot.pause(0.2)
        gc.collect()
        alive = [o for o in gc.get_objects() if isinstance(o, FooterKey)]
        # One bar's keys may be on their way out; the leak kept ~10 per switch (160 here).
        assert len(alive) <= 2 * before, (before, len(alive))
        assert any(k.description == "Run all" for k in app.query(FooterKey))


@aio
async def test_after_a_run_what_survives_is_frozen_for_the_collector(cfg):
    import gc
    app = TdpuApp(cfg, stages=fake_stages())
    try:
        async with app.run_test() as pilot:
            await run_and_wait(pilot, app)
            await wait_for(pilot, lambda: app.run_done.is_set())
            assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()


# -- #15.3 the report view, #15.8 the command palette and the footer's keys -------------------

def _write_report(cfg, step_bitlinear: float = 1.25) -> None:
    from tdpu_tui.engine.records.perf_report import GraphTiming, PerfResult, _performance
    perf = PerfResult([GraphTiming("float", "/x/a.onnx", 4 << 20, 1.5, 0.5),
                       GraphTiming("bitlinear", "/x/b.onnx", 1 << 20, 3.0, step_bitlinear),
                       GraphTiming("matmulnbits", "/x/c.onnx", 1100 << 10, None, 0.4)], 16, 13)
    path = Artifacts.of(cfg).performance_report
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("# report\n" + "\n".join(_performance(perf, None, {})) + "\n", encoding="utf-8")


def test_the_report_figures_are_read_back_from_the_written_tables():
    from tdpu_tui.engine.records.perf_report import (
        GraphTiming, PerfResult, ProjectionTiming, _performance, read_report_figures,
    )
    perf = PerfResult([GraphTiming("float", "/x/a.onnx", 4096, 1.5, 0.5),
                       GraphTiming("bitlinear", "/x/b.onnx", 1024, 3.0, None),
                       GraphTiming("matmulnbits", "/x/c.onnx", 1100, 0.9, 0.3)], 16, 13)
    perf.projections = ProjectionTiming(0, 7, 16)
    perf.projections.prefill_ms.update(float=0.2, bitlinear=0.1)
    perf.projections.step_ms.update(float=0.02, bitlinear=0.01)
    got = read_report_figures("\n".join(_performance(perf, None, {})))
    assert [(g.label, g.prefill_ms, g.step_ms, g.weight_bytes) for g in got.graphs] == \
        [("float", 1.5, 0.5, 4096), ("bitlinear", 3.0, None, 1024), ("matmulnbits", 0.9, 0.3, 1100)]
    assert got.prefill_tokens == 16 and got.projections_layer == 0
    assert got.projections["bitlinear"] == (0.1, 0.01) and got.projections["matmulnbits"] == (None, None)
    assert read_report_figures("# report\n\n## 精度 Accuracy\n| a | b |\n") is None


@pytest.mark.parametrize("size", SIZES)
@aio
async def test_the_report_tab_charts_the_comparison_and_follows_the_file(cfg, size):
    app = TdpuApp(cfg, stages=fake_stages())
    async with app.run_test(size=size) as pilot:
        await pilot.press("5")
        assert app.query_one("#tabs").active == "report"
        charts = app.query_one("#report-charts")
        assert "no report yet" in str(charts.render())
        _write_report(cfg)
        await wait_for(pilot, lambda: "Single-token step" in str(charts.render()), timeout=5)
        text = str(charts.render())
        assert "BitLinear 2.5 × slower than float" in text
        assert "BitLinear 0.25 × float (4.0 × smaller)" in text
        step = text.split("Prefill")[0]
        lines = {line.split()[0]: line for line in step.splitlines() if line.startswith("  ")}
        assert "n/a" in [ln for ln in text.splitlines() if "MatMulNBits" in ln][1]
        assert lines["BitLinear"].count("█") > lines["float"].count("█") > 0
        assert all(len(line) <= size[0] for line in text.splitlines())
        _write_report(cfg, step_bitlinear=0.25)
        await wait_for(pilot, lambda: "BitLinear 0.50 × float (2.0 × faster)" in str(charts.render())
                       or "BitLinear 0.5 × float (2.0 × faster)" in str(charts.render()), timeout=5)


@aio
async def test_the_report_tab_says_the_reports_ratios_not_those_of_its_rounded_times(cfg):
    """0.117 and 0.404 ms are tabled as 0.12 and 0.40 (3.3 ×); the report says 3.5 ×."""
    from tdpu_tui.engine.records.perf_report import (
        GraphTiming, PerfResult, ProjectionTiming, _performance,
    )
    perf = PerfResult([GraphTiming("float", "/x/a.onnx", 294968, 1.054, 0.117),
                       GraphTiming("bitlinear", "/x/b.onnx", 18488, 2.458, 0.404),
                       GraphTiming("matmulnbits", "/x/c.onnx", 22528, 1.832, 0.117)], 128, 14,
                      why_slower="tiny shapes: the operator bridge's fixed cost")
    perf.projections = ProjectionTiming(0, 7, 128, step_ms={"float": 0.0198, "bitlinear": 0.0127},
                                        prefill_ms={"float": 0.1, "bitlinear": 0.5})
    report = "\n".join(_performance(perf, None, {}))
    assert "| 0.12 | " in report and "BitLinear step 3.5 × slower than float (tiny shapes" in report
    path = Artifacts.of(cfg).performance_report
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("# report\n" + report + "\n", encoding="utf-8")
    app = TdpuApp(cfg, stages=fake_stages())
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("5")
        charts = app.query_one("#report-charts")
        await wait_for(pilot, lambda: "Single-token step" in str(charts.render()), timeout=5)
        text = str(charts.render())
        assert "Single-token step (ms)  BitLinear 3.5 × slower than float\n" in text
        assert "3.3 ×" not in text and "tiny shapes" not in text   # the reason stays in the report
        assert "BitLinear 2.3 × slower than float\n" in text                 # prefill
        assert "BitLinear 0.063 × float (16 × smaller)" in text
        assert "BitLinear 0.64 × float (1.6 × faster)" in text               # projections alone


def _tdpu_section() -> tuple[str, dict]:
    """The rtl stage's TDPU section as it writes it, with a 2B4T host share of 53.6 ms."""
    from tdpu_tui.engine.records.rtl_log import render_tdpu_section
    from tdpu_tui.engine.rtl import cost

    timing, board = cost.CoreTiming.assumed(32), cost.Board(1, 200, 4.0)
    shapes = [("/model/layers.0/mlp/up_proj/BitLinear", 64, 128)]
    big = cost.graph_cost(cost.shapes_2b4t(), timing, board)
    grid = cost.sweep(timing, board)
    host = {"embedding": 0.1, "norms": 3.5, "attention": 20.0, "lm_head": 30.0, "shapes": "hidden 2560"}
    body = render_tdpu_section(timing, board, cost.graph_cost(shapes, timing, board),
                               cost.graph_cost(shapes, timing, board, tokens=16, reused=True), 16, big,
                               cost.graph_cost(cost.shapes_2b4t(), timing, board, tokens=16, reused=True),
                               grid, None, None, host_2b4t=host)
    return body, grid


def test_the_tdpu_sweep_is_read_back_from_the_reports_section():
    from tdpu_tui.engine.records.perf_report import read_report_figures
    body, grid = _tdpu_section()
    got = read_report_figures("# report\n\n" + body)
    assert got is not None and got.graphs == []
    assert got.sweep == {k: round(v.seconds * 1e3, 4) for k, v in grid.items()}
    assert got.sweep_host_ms == 53.6


@pytest.mark.parametrize("size", SIZES)
@aio
async def test_the_report_tab_charts_the_tdpu_sweep_once_the_rtl_stage_wrote_it(cfg, size):
    path = Artifacts.of(cfg).performance_report
    path.parent.mkdir(parents=True, exist_ok=True)
    body, grid = _tdpu_section()
    path.write_text("# report\n\n" + body + "\n", encoding="utf-8")   # no validate run yet
    app = TdpuApp(cfg, stages=fake_stages())
    async with app.run_test(size=size) as pilot:
        await pilot.press("5")
        charts = app.query_one("#report-charts")
        await wait_for(pilot, lambda: "TDPU cost model" in str(charts.render()), timeout=5)
        text = str(charts.render())
        assert "no performance section" in text and "Single-token step" not in text
        assert "TDPU cost model, 2B4T per token  LEN × cores; host ops add 53.6 ms here" in text
        rows = {line.split()[0]: line for line in text.splitlines()
                if line.startswith("  ") and "×" in line.split()[0]}
        assert list(rows) == [f"{lanes}×{cores}" for lanes, cores in sorted(grid)]
        assert rows["16×1"].rstrip().endswith(f"{grid[(16, 1)].seconds * 1e3:.1f} ms")
        assert rows["16×1"].count("█") > rows["32×1"].count("█") > rows["128×4"].count("█") > 0
        assert all(len(line) <= size[0] for line in rows.values())
        _write_report(cfg)
        path.write_text(path.read_text(encoding="utf-8") + "\n" + body + "\n", encoding="utf-8")
        await wait_for(pilot, lambda: "Single-token step" in str(charts.render()), timeout=5)
        text = str(charts.render())
        assert "TDPU cost model" in text and "no performance section" not in text


def _footer_keys(app) -> set[str]:
    from textual.widgets._footer import FooterKey
    return {k.description for k in app.query(FooterKey)}


@aio
async def test_the_footer_shows_a_key_only_where_it_can_act(cfg):
    hold = threading.Event()
    stages = fake_stages()
    app = TdpuApp(cfg, stages=stages)
    try:
        async with app.run_test(size=(120, 40)) as pilot:
            await pilot.pause(0.2)
            assert {"Run all", "Run stage"} <= _footer_keys(app)
            assert not {"Draft bug", "Cancel", "Rerun"} & _footer_keys(app)
            await run_and_wait(pilot, app)
            await pilot.pause(0.2)
            assert "Rerun" in _footer_keys(app) and "Draft bug" not in _footer_keys(app)
            await pilot.press("down")  # precheck failed
            await wait_for(pilot, lambda: "Draft bug" in _footer_keys(app), timeout=5)
            await pilot.press("4")
            await wait_for(pilot, lambda: "$EDITOR" in _footer_keys(app), timeout=5)
            assert "Edit bug" in _footer_keys(app)   # the run drafted precheck's record
            _bugs(cfg).write_text("# Phase 3 Bug记录\n", encoding="utf-8")
            await wait_for(pilot, lambda: "Edit bug" not in _footer_keys(app), timeout=5)
            await pilot.press("enter")
            assert not isinstance(app.screen, BugForm)
            await pilot.press("1")
            stages[0].hold = hold
            app.last_summary = None
            await pilot.press("r")
            await wait_for(pilot, lambda: "Cancel" in _footer_keys(app), timeout=5)
            assert not {"Run all", "Run stage", "Rerun"} & _footer_keys(app)
            hold.set()
            await wait_for(pilot, lambda: app.last_summary is not None and not app.running)
            await wait_for(pilot, lambda: "Cancel" not in _footer_keys(app), timeout=5)
    finally:
        hold.set()


@aio
async def test_the_command_palette_offers_the_apps_actions_where_they_can_act(cfg):
    from textual.command import CommandPalette

    from tdpu_tui.app.commands import app_commands
    stages = fake_stages()
    app = TdpuApp(cfg, stages=stages)
    async with app.run_test(size=(120, 40)) as pilot:
        names = [name for name, _, _ in app_commands(app)]
        # The stages come from what the Pipeline tab shows (the registry's), none hard-coded.
        assert [n for n in names if n.startswith("Run stage ")] == \
            [f"Run stage {s.name}" for s in stages]
        assert "Cancel the run" not in names and not any(n.startswith("Draft") for n in names)
        assert "Show the Report tab" in names
        await pilot.press("ctrl+p")
        await wait_for(pilot, lambda: isinstance(app.screen, CommandPalette), timeout=5)
        await pilot.press(*"run every")
        await pilot.pause(0.5)
        await pilot.press("enter")
        await wait_for(pilot, lambda: app.last_summary is not None and not app.running)
        assert all(s.runs == 1 for s in stages[:2])
        names = [name for name, _, _ in app_commands(app)]
        assert "Draft a bug record from precheck" in names
        assert "Rerun the failed and cancelled stages" in names
        await pilot.press("ctrl+p")
        await wait_for(pilot, lambda: isinstance(app.screen, CommandPalette), timeout=5)
        await pilot.press(*"report tab")
        await pilot.pause(0.5)
        await pilot.press("enter")
        await wait_for(pilot, lambda: app.query_one("#tabs").active == "report", timeout=5)


# -- #15.9 the Nodes tab at 80×24 --------------------------------------------------------------

@pytest.mark.slow
@aio
async def test_nodes_status_cut_with_an_ellipsis_and_the_full_line_below_wraps(exported):
    app = TdpuApp(exported, stages=fake_stages())
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("3")
        panel = app.nodes_panel
        await wait_for(pilot, lambda: panel.nodes)
        status_w = next(w for k, _, w in panel._columns if k == "status")
        longest = max(panel.nodes, key=lambda n: len(n.status))
        assert len(longest.status) > status_w   # the tiny model's lm_head: not ternary, and why
        panel.table.move_cursor(row=_row_names(panel.table).index(longest.name))
        await pilot.pause()
        table = panel.table
        line = table.render_line(1 + table.cursor_row - round(table.scroll_y)).text
        assert panel._shown_name(longest) in line and line.rstrip().endswith("…"), line
        detail = app.query_one("#node-detail")
        text = str(detail.render())
        assert longest.name in text and longest.status in text
        assert detail.region.height >= 2 and detail.region.right <= 80   # wrapped, not cut
        # A node that is not ternary (RoPE's rotate_half): its status is why, said once.
        rotate = next(n for n in panel.nodes if not n.ternary and "rotate_half" in n.name)
        panel.table.move_cursor(row=_row_names(panel.table).index(rotate.name))
        await pilot.pause()
        text = str(detail.render())
        assert rotate.name in text and text.count(rotate.status) == 1, text


# -- #15.10 the Log tab: a label column that stays, cut lines marked, earlier runs in order ----

def _view_line(view, y: int) -> str:
    return view.render_line(y).text


@aio
async def test_log_labels_stay_put_sideways_and_a_cut_line_says_so(cfg):
    app = TdpuApp(cfg, stages=fake_stages())
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("2")
        panel = app.log_panel
        long = "".join(f"{i:03d}-" for i in range(60))       # 240 characters
        # Enough lines for both scrollbars, which are drawn over the last columns.
        panel.add_lines("optimize", [long, "short line"] * 20)
        await pilot.pause()
        view = panel.view
        view.scroll_to(y=0, animate=False, immediate=True)
        await pilot.pause()
        shown = view.scrollable_content_region.width
        assert shown < view.size.width
        rows = [_view_line(view, y) for y in range(view.size.height)]
        y = next(i for i, r in enumerate(rows) if "000-001-" in r)
        assert rows[y].startswith("optimize  │ 000-001-") and rows[y][:shown].endswith("…")
        assert len(rows[y]) == view.size.width
        assert not rows[y + 1][:shown].rstrip().endswith("…")
        view.scroll_to(x=100, animate=False, immediate=True)
        await pilot.pause()
        row = _view_line(view, y)
        assert row.startswith("optimize  │ …")              # the label stays, the start is cut
        assert long[100 + 1:100 + 10] in row and "000-" not in row
        assert _view_line(view, y + 1).startswith("optimize  │ ")


@aio
async def test_earlier_runs_show_in_run_order_under_a_separator_with_their_time(cfg):
    import os

    from tdpu_tui.engine.records.style import fmt_time
    runs = Artifacts.of(cfg).run_logs
    runs.mkdir(parents=True)
    # File-name order (export, validate) is not run order: validate ran first here.
    (runs / "export.log").write_text("export line\n", encoding="utf-8")
    (runs / "validate.log").write_text("validate line\n", encoding="utf-8")
    os.utime(runs / "validate.log", (1_700_000_000, 1_700_000_000))
    _write_status(cfg, {"export": {"pid": 1, "status": "ok", "started_at": "x",
                                   "started_ts": 1_700_000_600.0, "finished_at": "y"}})
    app = TdpuApp(cfg, stages=fake_stages())
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.pause(0.3)
        ring = list(app.log_panel.ring)
        assert ring[:4] == [
            f"validate  │ ── validate.log · last written {fmt_time(1_700_000_000)} ──",
            "validate  │ validate line",
            f"export    │ ── export.log · run of {fmt_time(1_700_000_600.0)} ──",
            "export    │ export line",
        ]
        assert "earlier runs above" in ring[4]
        (runs / "export.log").open("a", encoding="utf-8").write("a later line\n")
        await wait_for(pilot, lambda: "export    │ a later line" in app.log_panel.ring, timeout=5)
        assert sum("export line" in line for line in app.log_panel.ring) == 1


# -- #15.11 the progress bar ---------------------------------------------------------------------

class PhasedStage(FakeStage):
    """Counts each phase from zero, as validate once did: the bar must not go back."""

    def run(self, ctx) -> str:
        ctx.progress(3, 4, "accuracy")
        ctx.progress(1, 3, "timing")
        self.started.set()
        while not self.hold.is_set():
            ctx.check_cancelled()
            time.sleep(0.01)
        return "done"


@aio
async def test_a_stage_progress_bar_never_goes_back_within_a_run(cfg):
    hold = threading.Event()
    stage = PhasedStage("validate", hold=hold)
    app = TdpuApp(cfg, stages=[stage])
    try:
        async with app.run_test(size=(120, 40)) as pilot:
            await pilot.press("r")
            await wait_for(pilot, lambda: app.pipeline_panel.rows["validate"].note == "timing")
            bar = app.pipeline_panel.table.get_cell("validate", "progress")
            assert bar.endswith(" 75%"), bar
            hold.set()
            await wait_for(pilot, lambda: app.last_summary is not None and not app.running)
    finally:
        hold.set()
