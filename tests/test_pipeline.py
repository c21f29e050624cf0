import json
import threading

import pytest

from tdpu_tui.batch import run_batch
from tdpu_tui.engine.core.config import load_config
from tdpu_tui.engine.core.errors import StageFailed
from tdpu_tui.engine.core.events import StageFinished, StageLog, StageProgress, StageStarted, Status
from tdpu_tui.engine.core.pipeline import Pipeline
from tdpu_tui.engine.core.stage import Skip, Stage


class Fake(Stage):
    def __init__(self, name, needs=(), outcome="ok"):
        self.name, self.needs, self.outcome = name, needs, outcome

    def run(self, ctx):
        ctx.log(f"{self.name} running")
        ctx.progress(1, 2, "half")
        if self.outcome == "skip":
            raise Skip("nothing to do")
        if self.outcome == "fail":
            raise StageFailed("boom: it broke")
        if self.outcome == "crash":
            raise ValueError("unexpected")
        if self.outcome == "interrupt":
            raise KeyboardInterrupt
        ctx.metric("value", 42)
        ctx.artifact(self.name, f"/tmp/{self.name}")
        return f"{self.name} done"


def test_a_failed_stage_stops_its_dependents_not_the_others(tmp_config):
    cfg = load_config(tmp_config)
    events = []
    stages = [Fake("a", outcome="fail"), Fake("b", needs=("a",)), Fake("c"), Fake("d", needs=("b",))]
    summary = Pipeline(cfg, stages, on_event=events.append).run()
    status = {r.name: r.status for r in summary.results}
    # d needs b, which did not run because a failed: d must not run on an earlier run's output.
    assert status == {"a": Status.FAILED, "b": Status.SKIPPED, "c": Status.OK, "d": Status.SKIPPED}
    assert summary.results[1].message == "not run: a failed"
    assert summary.results[3].message == "not run: a failed"
    assert summary.results[0].message == "boom: it broke"
    kinds = [type(e) for e in events if e.stage == "c"]
    assert kinds == [StageStarted, StageLog, StageProgress, StageFinished]


def test_skip_and_crash_statuses_with_reasons(tmp_config):
    cfg = load_config(tmp_config)
    summary = Pipeline(cfg, [Fake("s", outcome="skip"), Fake("x", outcome="crash")]).run()
    assert summary.results[0].status is Status.SKIPPED and summary.results[0].message == "nothing to do"
    assert summary.results[1].status is Status.FAILED
    assert "ValueError: unexpected" in summary.results[1].message
    assert any("Traceback" in line for line in summary.results[1].log_tail)


def test_each_stage_writes_its_log_file(tmp_config):
    cfg = load_config(tmp_config)
    Pipeline(cfg, [Fake("a")]).run()
    assert (cfg.logs_dir / "runs" / "a.log").read_text() == "a running\n"


def test_a_cancel_ends_the_stage_and_the_rest_cancelled_never_failed(tmp_config):
    cfg = load_config(tmp_config)
    cancel = threading.Event()

    class Cancelling(Fake):
        def run(self, ctx):
            cancel.set()
            ctx.check_cancelled()

    drafted = []
    summary = Pipeline(cfg, [Cancelling("a"), Fake("b")], cancel=cancel,
                       on_failure=lambda r, c: drafted.append(r)).run()
    assert [r.status for r in summary.results] == [Status.CANCELLED, Status.CANCELLED]
    assert summary.results[0].message == "stage 'a' cancelled"
    assert summary.results[1].message == "not run: cancelled"
    assert not summary.failed and summary.cancelled
    assert drafted == []  # the user's cancel is not a bug to record
    from tdpu_tui.engine.core import run_status
    recorded = run_status.load(cfg.logs_dir / "runs" / "status.json")
    assert {n: r.status for n, r in recorded.items()} == {"a": Status.CANCELLED, "b": Status.CANCELLED}


def test_failure_hook_gets_the_failed_result(tmp_config):
    cfg = load_config(tmp_config)
    seen = []
    Pipeline(cfg, [Fake("a", outcome="fail")], on_failure=lambda r, c: seen.append(r)).run()
    assert seen[0].name == "a" and "a running" in seen[0].log_tail


def test_batch_exit_codes_and_json_summary(tmp_config, tmp_path, monkeypatch, capsys):
    cfg = load_config(tmp_config)
    import tdpu_tui.engine.stages as registry
    monkeypatch.setattr(registry, "all_stages", lambda: [Fake("a"), Fake("b", outcome="skip")])
    out = tmp_path / "summary.json"
    assert run_batch(cfg, None, json_path=str(out)) == 0
    summary = json.loads(out.read_text())
    assert [s["name"] for s in summary["stages"]] == ["a", "b"]
    assert summary["stages"][1] == {"name": "b", "status": "skipped", "seconds": summary["stages"][1]["seconds"],
                                    "message": "nothing to do", "cancelled": False}
    assert summary["artifacts"] == {"a": "/tmp/a"} and summary["metrics"] == {"a": {"value": 42}}
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.strip()}
    assert rows["a"].split()[1] == "ok" and rows["a"].endswith("a done"), rows
    assert rows["b"].split()[1] == "skipped" and rows["b"].endswith("nothing to do"), rows

    monkeypatch.setattr(registry, "all_stages", lambda: [Fake("a", outcome="fail")])
    assert run_batch(cfg, None, bug_drafts=False) == 1
    monkeypatch.setattr(registry, "all_stages", lambda: [Fake("a", outcome="interrupt"), Fake("b")])
    capsys.readouterr()
    assert run_batch(cfg, None, json_path=str(out)) == 130
    doc = json.loads(out.read_text())
    assert doc["status"] == "interrupted" and doc["not_run"] == ["b"]
    assert doc["stages"][0]["status"] == "cancelled" and doc["stages"][0]["cancelled"] is True
    assert doc["stages"][0]["message"] == "interrupted (Ctrl-C)"
    assert capsys.readouterr().out.splitlines()[2].split()[:2] == ["a", "cancelled"]
    from tdpu_tui.engine.core import run_status
    assert run_status.load(cfg.logs_dir / "runs" / "status.json")["a"].status is Status.CANCELLED
    assert run_batch(cfg, ["zzz"]) == 2


def test_batch_drafts_one_bug_record_per_distinct_failure(tmp_config, monkeypatch, capsys):
    cfg = load_config(tmp_config)
    import tdpu_tui.engine.stages as registry
    from tdpu_tui.engine.records.bugbook import BugBook

    monkeypatch.setattr(registry, "all_stages", lambda: [Fake("export", outcome="fail")])
    assert run_batch(cfg, None) == 1
    assert "drafted Bug #1" in capsys.readouterr().err
    assert run_batch(cfg, None) == 1
    assert "already recorded as Bug #1" in capsys.readouterr().err
    records = BugBook(cfg.logs_dir / "bugs_found.md").load()
    assert len(records) == 1
    assert records[0].stage == "导出" and records[0].status == "未解决"
    assert "boom: it broke" in records[0].error and "export running" in records[0].error
    assert run_batch(cfg, None, bug_drafts=False) == 1
    assert "Bug #" not in capsys.readouterr().err


def test_cli_rejects_a_missing_model_dir_and_an_unwritable_json_before_running(tmp_config, tmp_path,
                                                                                capsys):
    from tdpu_tui.cli import main
    assert main(["--batch", "--config", str(tmp_config), "--model", str(tmp_path / "nope")]) == 2
    assert f"--model {tmp_path / 'nope'}: no such checkpoint directory" in capsys.readouterr().err
    # A directory that is not a checkpoint is the same usage error (no bug record drafted).
    half = tmp_path / "half"
    half.mkdir()
    (half / "config.json").write_text("{}")
    assert main(["--batch", "--config", str(tmp_config), "--model", str(half)]) == 2
    assert "no model.safetensors (or model.safetensors.index.json) in it" in capsys.readouterr().err
    assert not (tmp_path / "phase3_logs" / "bugs_found.md").exists()
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert main(["--batch", "--config", str(tmp_config), "--json", str(blocker / "run.json")]) == 2
    assert f"--json {blocker / 'run.json'}: cannot write" in capsys.readouterr().err


def test_batch_reports_a_json_summary_it_cannot_write(tmp_config, monkeypatch, capsys):
    cfg = load_config(tmp_config)
    import tdpu_tui.batch as batch
    import tdpu_tui.engine.stages as registry
    monkeypatch.setattr(registry, "all_stages", lambda: [Fake("a")])

    def disk_full(path, text):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(batch, "atomic_write_text", disk_full)
    assert run_batch(cfg, None, json_path="run.json") == 1
    assert "--json run.json: [Errno 28] No space left on device" in capsys.readouterr().err


@pytest.mark.parametrize("flags", [["--stage", "export"], ["--json", "x.json"], ["--no-bug-drafts"]])
def test_batch_only_options_without_batch_are_usage_errors(tmp_config, flags, capsys):
    from tdpu_tui.cli import main
    assert main(["--config", str(tmp_config), *flags]) == 2
    assert f"{flags[0]} needs --batch" in capsys.readouterr().err


def test_every_stage_outcome_is_recorded_for_other_processes(tmp_config):
    import os

    from tdpu_tui.engine.core import run_status
    cfg = load_config(tmp_config)
    path = cfg.logs_dir / "runs" / "status.json"
    seen_while_running = {}

    class Peek(Fake):
        def run(self, ctx):
            seen_while_running.update(run_status.load(path))
            return super().run(ctx)

    stages = [Fake("a", outcome="fail"), Fake("b", needs=("a",)), Peek("c"), Fake("s", outcome="skip")]
    Pipeline(cfg, stages).run()
    assert seen_while_running["c"].status is Status.RUNNING and seen_while_running["c"].alive
    rows = run_status.load(path)
    assert {n: r.status for n, r in rows.items()} == {
        "a": Status.FAILED, "b": Status.SKIPPED, "c": Status.OK, "s": Status.SKIPPED}
    assert rows["a"].message == "boom: it broke" and rows["b"].message == "not run: a failed"
    assert rows["c"].pid == os.getpid() and rows["c"].finished_at
    # Another run of one stage keeps the other stages' rows.
    Pipeline(cfg, [Fake("a")]).run()
    rows = run_status.load(path)
    assert rows["a"].status is Status.OK and rows["c"].status is Status.OK and len(rows) == 4


def test_a_file_system_error_names_the_file_without_a_traceback(tmp_config):
    cfg = load_config(tmp_config)

    class Denied(Fake):
        def run(self, ctx):
            raise PermissionError(13, "Permission denied", "/srv/models/output/x.onnx")

    summary = Pipeline(cfg, [Denied("a")]).run()
    r = summary.results[0]
    assert r.status is Status.FAILED
    assert r.message.startswith("/srv/models/output/x.onnx: Permission denied — check its permissions")
    assert "[paths].output" in r.message and not any("Traceback" in line for line in r.log_tail)
    assert "Traceback" in (cfg.logs_dir / "runs" / "a.log").read_text()   # kept for whoever digs


def test_an_unwritable_status_file_is_a_warning_not_a_failure(tmp_config):
    from tdpu_tui.engine.core import run_status
    cfg = load_config(tmp_config)
    status = cfg.logs_dir / "runs" / "status.json"
    status.mkdir(parents=True)                    # a directory where the file should be
    events = []
    summary = Pipeline(cfg, [Fake("a"), Fake("b")], on_event=events.append).run()
    assert [r.status for r in summary.results] == [Status.OK, Status.OK]
    warnings = [e.line for e in events if isinstance(e, StageLog) and e.level == "warning"]
    assert len(warnings) == 1 and "could not record the stage's status" in warnings[0]
    assert run_status.load(status) == {}


@pytest.mark.parametrize("text", ["", "{", "[]", '{"format": "other"}',
                                  '{"format": "tdpu-status/1", "stages": {"a": {"status": "weird"}, "b": 3}}'])
def test_a_damaged_status_file_reads_as_no_rows(tmp_path, text):
    from tdpu_tui.engine.core import run_status
    path = tmp_path / "status.json"
    path.write_text(text, encoding="utf-8")
    assert run_status.load(path) == {}
