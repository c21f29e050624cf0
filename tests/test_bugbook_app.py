"""The app's bug actions (`tdpu_tui/app/bug_actions.py`): the book's drafting rule, usage
mistakes reported and not filed, a form-saved draft that later runs find."""

from conftest import write_config
from test_app import FakeStage, aio, run_and_wait, wait_for

from tdpu_tui.app.app import TdpuApp
from tdpu_tui.app.screens import BugForm
from tdpu_tui.engine.core.artifacts import Artifacts
from tdpu_tui.engine.core.config import load_config
from tdpu_tui.engine.core.errors import UsageError
from tdpu_tui.engine.core.stage import Stage
from tdpu_tui.engine.records.bugbook import BugBook, failure_signature


class OutOfOrder(Stage):
    name, title, needs = "validate", "validate", ()

    def run(self, ctx):
        ctx.log("validate: starting")
        raise UsageError("out/bitnet_b1.58_bitlinear.onnx was made from an earlier export")


def _cfg(tmp_path):
    return load_config(write_config(tmp_path))


@aio
async def test_a_usage_mistake_in_the_app_is_reported_and_d_does_not_draft_it(tmp_path):
    cfg = _cfg(tmp_path)
    path = Artifacts.of(cfg).bugs
    app = TdpuApp(cfg, stages=[FakeStage("export"), OutOfOrder()])
    async with app.run_test(size=(120, 40)) as pilot:
        await run_and_wait(pilot, app)
        await wait_for(pilot, lambda: any("usage mistake" in n.message for n in app._notifications))
        failed = [n for n in app._notifications if n.title == "stage failed"]
        assert failed and "d opens its bug record" not in failed[0].message
        await pilot.press("down", "d")
        await pilot.pause()
        assert not isinstance(app.screen, BugForm)
        assert any("not a bug" in n.message and "earlier export" in n.message
                   for n in app._notifications)
    # The run started the book; the mistake is not in it.
    assert path.read_text(encoding="utf-8") == "# Phase 3 Bug记录\n"


@aio
async def test_a_draft_saved_from_the_form_is_found_by_the_next_run(tmp_path):
    cfg = _cfg(tmp_path)
    path = Artifacts.of(cfg).bugs
    message = "undocumented op Pow at /model/Pow"
    app = TdpuApp(cfg, stages=[FakeStage("export"), FakeStage("precheck", fail=message)])
    async with app.run_test(size=(120, 40)) as pilot:
        await run_and_wait(pilot, app)
        await wait_for(pilot, lambda: app.pipeline_panel.rows["precheck"].bug_number == 1)
        (auto,) = BugBook(path).load()
        # The automatic draft is deleted by hand: d drafts in the form by the same rule.
        path.write_text("# Phase 3 Bug记录\n", encoding="utf-8")
        await wait_for(pilot, lambda: app.bugs_panel.record(1) is None, timeout=5)
        await pilot.press("down", "d")
        form = app.screen
        assert isinstance(form, BugForm)
        values = form.current()
        assert values["title"] == f"precheck 失败: {message}"
        assert values["stage"] == "编译" and values["status"] == "未解决"
        # One rule for both: the form's draft is the automatic one.
        assert (values["title"], values["stage"], values["error"]) == (auto.title, auto.stage, auto.error)
        assert values["error"].startswith(f"{message}\n\n日志末尾:\nprecheck: starting\n[E] {message}")
        assert form.heading.startswith("根据失败的阶段 precheck 新建")
        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: not isinstance(app.screen, BugForm))
        saved = BugBook(path).load()
        assert [r.number for r in saved] == [2]  # number 1 is not reused
        assert saved[0].signature == failure_signature("precheck", message)
        await run_and_wait(pilot, app)  # the same failure again: that record, not a new one
        await wait_for(pilot, lambda: app.pipeline_panel.rows["precheck"].bug_number == 2)
    assert [r.number for r in BugBook(path).load()] == [2]


@aio
async def test_the_form_speaks_both_languages(tmp_path):
    cfg = _cfg(tmp_path)
    app = TdpuApp(cfg, stages=[FakeStage("export")])
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("b")
        form = app.screen
        assert isinstance(form, BugForm)
        assert form.heading == "新建 Bug 记录 · New bug record"
        await pilot.press("ctrl+s")
        problems = str(form.query_one("#bug-form-problems").render())
        assert "标题 title" in problems and "标题不能为空 · expected a title" in problems
        assert "发现阶段 stage" in problems and "expected one of 导出, 编译, 仿真, 替换" in problems
        await pilot.press("x", "escape")  # something typed: the form asks first
        await wait_for(pilot, lambda: app.screen is not form)
        question = str(app.screen.query_one("#confirm-question").render())
        assert "放弃" in question and "Discard" in question
