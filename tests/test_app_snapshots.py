"""Snapshots of the app's main screens at 120×40 and 80×24 (pytest-textual-snapshot).

Deterministic: fake stages with a fake clock (fixed durations), a fixed bug time, tmp paths
shown relative to the configuration file, notifications cleared before the picture.
Regenerate with `pytest tests/test_app_snapshots.py --snapshot-update` and review the SVGs.
"""

from __future__ import annotations

import shutil

import pytest
from conftest import write_config
from test_app import fake_stages, wait_for

import tdpu_tui.engine.core.pipeline as pipeline_module
from tdpu_tui.app.app import TdpuApp
from tdpu_tui.engine.core.artifacts import Artifacts
from tdpu_tui.engine.core.config import load_config
from tdpu_tui.engine.core.pipeline import Pipeline

SIZES = [pytest.param((120, 40), id="120x40"), pytest.param((80, 24), id="80x24")]

BUGS = """# Phase 3 Bug记录

## Bug #1: parse 报错 21002 (Pow 不在算子表)
- **发现时间**: 2026-11-20 10:00
- **发现阶段**: 编译
- **错误信息**:
  ```
  [F] 21002
  [E] 执行以下命令时捕获到错误码21002:
  ```
- **根本原因**: RMSNorm 导出成 Pow
- **解决方案**: icraft profile 用 LayerNormalization 构造
- **状态**: 已解决

---

## Bug #2: BitLinear 输出行被打乱
- **发现时间**: 2026-11-21 15:30
- **发现阶段**: 替换
- **错误信息**: cosine 0.12 vs reference
- **根本原因**: hf 打包被当作 tdpu 读取
- **解决方案**:
- **状态**: 待验证

---
"""


class FakeClock:
    """Stands in for `time` in the pipeline module: every stage takes exactly 1.25 s."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self) -> float:
        self.now += 1.25
        return self.now


@pytest.fixture
def project(tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline_module, "time", FakeClock())
    return load_config(write_config(tmp_path))


@pytest.fixture(scope="module")
def exported_dir(tmp_path_factory):
    from tdpu_tui.engine.stages import all_stages
    d = tmp_path_factory.mktemp("snap_export")
    cfg = load_config(write_config(d))
    export = [s for s in all_stages() if s.name == "export"]
    assert Pipeline(cfg, stages=export).run().results[0].status.value == "ok"
    return d


def no_blink(app) -> None:
    """A blinking cursor is caught on or off at random: the picture holds it steady."""
    for widget in app.screen.query("Input, TextArea"):
        widget.cursor_blink = False
        widget._pause_blink(visible=True)   # and where the blink was: on, its timer stopped


async def _ran(pilot) -> None:
    app = pilot.app
    await pilot.press("r")
    await wait_for(pilot, lambda: app.last_summary is not None and not app.running)
    await pilot.pause(0.1)
    app.clear_notifications()
    await pilot.pause()


@pytest.mark.parametrize("size", SIZES)
def test_snapshot_pipeline_after_a_run(snap_compare, project, size):
    async def run_before(pilot):
        await _ran(pilot)
        await pilot.press("down")  # the failed stage: its error and the d hint

    assert snap_compare(TdpuApp(project, stages=fake_stages()), terminal_size=size,
                        run_before=run_before)


@pytest.mark.parametrize("size", SIZES)
def test_snapshot_log_panel(snap_compare, project, size):
    async def run_before(pilot):
        await _ran(pilot)
        await pilot.press("2")

    assert snap_compare(TdpuApp(project, stages=fake_stages()), terminal_size=size,
                        run_before=run_before)


@pytest.mark.slow
@pytest.mark.parametrize("size", SIZES)
def test_snapshot_nodes_panel(snap_compare, exported_dir, tmp_path, size):
    d = tmp_path / "project"
    shutil.copytree(exported_dir, d)
    cfg = load_config(d / "tdpu.toml")

    async def run_before(pilot):
        await pilot.press("3")
        panel = pilot.app.nodes_panel
        await wait_for(pilot, lambda: panel.nodes)
        await pilot.press("space")  # q_proj of layer 0 deselected
        pilot.app.clear_notifications()
        await pilot.pause()

    assert snap_compare(TdpuApp(cfg, stages=fake_stages()), terminal_size=size,
                        run_before=run_before)


@pytest.mark.parametrize("size", SIZES)
def test_snapshot_bugs_panel(snap_compare, project, size):
    path = Artifacts.of(project).bugs
    path.parent.mkdir(parents=True)
    path.write_text(BUGS, encoding="utf-8")

    async def run_before(pilot):
        await pilot.press("4")

    assert snap_compare(TdpuApp(project, stages=fake_stages()), terminal_size=size,
                        run_before=run_before)


@pytest.mark.parametrize("size", SIZES)
def test_snapshot_bug_form_drafted_from_a_failed_stage(snap_compare, project, size):
    async def run_before(pilot):
        await _ran(pilot)
        await pilot.press("down", "d")
        await wait_for(pilot, lambda: pilot.app.screen.query("#f-time"))
        no_blink(pilot.app)
        pilot.app.screen.query_one("#f-time").value = "2026-11-26 09:30"
        await pilot.pause()

    assert snap_compare(TdpuApp(project, stages=fake_stages()), terminal_size=size,
                        run_before=run_before)


@pytest.mark.parametrize("size", SIZES)
def test_snapshot_help(snap_compare, project, size):
    assert snap_compare(TdpuApp(project, stages=fake_stages()), terminal_size=size,
                        press=["question_mark"])


@pytest.mark.parametrize("size", SIZES)
def test_snapshot_report_tab(snap_compare, project, size):
    from test_app import _write_report
    _write_report(project)

    async def run_before(pilot):
        await pilot.press("5")
        await wait_for(pilot, lambda: "Single-token" in str(pilot.app.query_one("#report-charts").render()))

    assert snap_compare(TdpuApp(project, stages=fake_stages()), terminal_size=size,
                        run_before=run_before)


@pytest.mark.parametrize("size", SIZES)
def test_snapshot_pipeline_after_a_cancel_and_a_rerun(snap_compare, project, size):
    """A cancelled export: its own status, and what needs it marked old."""
    import threading

    from test_app import FakeStage
    hold = threading.Event()
    stages = fake_stages()

    async def run_before(pilot):
        app = pilot.app
        await _ran(pilot)
        stages[0].hold = hold
        app.last_summary = None
        await pilot.press("enter")
        await wait_for(pilot, lambda: app.pipeline_panel.rows["export"].status.value == "running")
        await pilot.press("c")
        await wait_for(pilot, lambda: app.last_summary is not None and not app.running)
        app.clear_notifications()
        await pilot.pause()

    assert isinstance(stages[0], FakeStage)
    try:
        assert snap_compare(TdpuApp(project, stages=stages), terminal_size=size,
                            run_before=run_before)
    finally:
        hold.set()
