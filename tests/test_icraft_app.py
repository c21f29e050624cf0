"""The Pipeline tab's Import action: `i` asks for a bundle path and runs the engine's import."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from conftest import write_config

from tdpu_tui.app.app import TdpuApp
from tdpu_tui.app.import_screen import ImportScreen
from tdpu_tui.engine.core.config import load_config


def test_import_key_asks_for_a_path_and_reports_a_refusal(tmp_path):
    cfg = load_config(write_config(tmp_path))
    bogus = tmp_path / "not_a_bundle"
    bogus.mkdir()

    async def scenario():
        app = TdpuApp(cfg, stages=[])
        async with app.run_test(size=(100, 30)) as pilot:
            await pilot.press("i")
            await pilot.pause()
            assert isinstance(app.screen, ImportScreen)
            field = app.screen.query_one("#import-path")
            field.value = str(bogus)
            await pilot.press("enter")
            for _ in range(100):
                await pilot.pause(0.05)
                if any(n.title == "icraft import" for n in app._notifications):
                    break
            notes = [n.message for n in app._notifications if n.title == "icraft import"]
            assert notes and notes[0].startswith("import refused: ")
            assert "no bundle.json" in notes[0] and str(bogus) in notes[0]

    asyncio.run(scenario())


def test_escape_closes_the_import_question_without_importing(tmp_path):
    cfg = load_config(write_config(tmp_path))

    async def scenario():
        app = TdpuApp(cfg, stages=[])
        async with app.run_test(size=(100, 30)) as pilot:
            await pilot.press("i")
            await pilot.pause()
            await pilot.press("escape")
            await pilot.pause()
            assert not isinstance(app.screen, ImportScreen)
            assert not any(n.title == "icraft import" for n in app._notifications)

    asyncio.run(scenario())


# --- an import that runs: the app's work in progress, like a run ------------------------------

def _bundle_run_on_a_host(tmp_path, monkeypatch):
    """A tiny project whose parse wrote the bundle (no Icraft here), and a copy of the bundle
    that the fake Icraft ran in through run_icraft.sh."""
    import os
    import shutil
    import subprocess
    import sys

    sys.path.insert(0, str(Path(__file__).parent / "fixtures" / "icraft"))
    import helpers

    from tdpu_tui.engine.core.pipeline import Pipeline
    from tdpu_tui.engine.stages import all_stages

    path = os.environ["PATH"]
    monkeypatch.setenv("PATH", str(Path(sys.executable).parent))     # no icraft on PATH
    (tmp_path / "project").mkdir()
    config = helpers.write_config(tmp_path / "project")
    cfg = load_config(config)
    results = Pipeline(cfg, stages=all_stages(), on_event=lambda e: None).run(
        ["export", "precheck", "parse"]).results
    assert [r.status.value for r in results] == ["ok", "ok", "skipped"], results
    monkeypatch.setenv("PATH", path)
    host = tmp_path / "host" / "icraft_output"
    shutil.copytree(cfg.output_dir / "icraft_output", host)
    env = helpers.fake_env("ok")
    env["ICRAFT"] = str(helpers.FAKE_ICRAFT)
    ran = subprocess.run(["sh", str(host / "run_icraft.sh")], env=env, capture_output=True,
                         text=True, timeout=300, stdin=subprocess.DEVNULL, check=False)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    return cfg, host


async def _answer_import(pilot, app, path):
    await pilot.press("i")
    await pilot.pause()
    assert isinstance(app.screen, ImportScreen)
    app.screen.query_one("#import-path").value = str(path)
    await pilot.press("enter")
    await pilot.pause()


async def _wait_for_note(pilot, app, title="icraft import", seconds=120):
    for _ in range(int(seconds / 0.05)):
        await pilot.pause(0.05)
        if any(n.title == title for n in app._notifications):
            return [n.message for n in app._notifications if n.title == title]
    raise AssertionError(f"no '{title}' notification in {seconds} s")


@pytest.mark.slow
def test_an_import_is_the_apps_work_in_progress_and_its_lines_show_once(tmp_path, monkeypatch):
    import threading

    from tdpu_tui.app.log_panel import LogPanel
    from tdpu_tui.engine.stages import handoff

    cfg, host = _bundle_run_on_a_host(tmp_path, monkeypatch)
    gate = threading.Event()
    real_import = handoff.import_bundle

    def gated_import(*args, **kwargs):     # the tiny import is quick: hold it while we look
        gate.wait(30)
        return real_import(*args, **kwargs)

    monkeypatch.setattr(handoff, "import_bundle", gated_import)

    async def scenario():
        app = TdpuApp(cfg)
        async with app.run_test(size=(120, 40)) as pilot:
            await pilot.pause(0.5)
            before = len(app.query_one(LogPanel).ring)
            await _answer_import(pilot, app, host)
            assert app.running                         # r, f and i wait for it; c stops it
            await pilot.press("r")
            await pilot.pause()
            assert app.pipeline is None                # no run started beside the import
            gate.set()
            notes = await _wait_for_note(pilot, app)
            assert notes[0] == f"imported {host}"
            await pilot.pause(1.0)                     # a tail turn or two after the import
            assert not app.running
            rows = app.pipeline_panel.rows
            assert {n: rows[n].status.value for n in ("parse", "optimize", "simulate")} == \
                dict.fromkeys(("parse", "optimize", "simulate"), "ok")
            lines = list(app.query_one(LogPanel).ring)[before:]
            # The stage logs the import writes are not tailed as well: each line once, no
            # "truncated" notices from the tailer.
            assert lines and len(lines) == len(set(lines)), lines
            assert not [s for s in lines if "truncated" in s]

    asyncio.run(scenario())


def test_c_cancels_an_import_in_progress(tmp_path, monkeypatch):
    from tdpu_tui.engine.core.events import StageResult, Status
    from tdpu_tui.engine.stages import handoff

    cfg = load_config(write_config(tmp_path))
    seen = {}

    def slow_import(config, source, on_event=None, *, bug_drafts=True, cancel=None):
        seen["cancelled"] = cancel.wait(30)
        report = handoff.ImportReport(Path(source), root=Path(source))
        report.results.append(StageResult("parse", Status.CANCELLED, 0.0, "import cancelled"))
        return report

    monkeypatch.setattr(handoff, "import_bundle", slow_import)

    async def scenario():
        app = TdpuApp(cfg, stages=[])
        async with app.run_test(size=(100, 30)) as pilot:
            await _answer_import(pilot, app, tmp_path)
            assert app.running
            await pilot.press("c")
            await _wait_for_note(pilot, app, seconds=30)
            assert seen["cancelled"] is True
            assert not app.running

    asyncio.run(scenario())
