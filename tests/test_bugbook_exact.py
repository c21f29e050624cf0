"""The bug book kept exactly: nothing written outside records, notes under a field kept, fenced
headings as text, one-shot edits under the lock, a book from the first run, locks out of sight,
usage mistakes not filed, English status aliases and a form in both languages."""

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import write_config

from tdpu_tui.bugs_cli import main
from tdpu_tui.engine.core.config import load_config
from tdpu_tui.engine.core.errors import StageFailed, UsageError
from tdpu_tui.engine.core.events import Status
from tdpu_tui.engine.core.pipeline import Pipeline
from tdpu_tui.engine.core.stage import Stage
from tdpu_tui.engine.records.bugbook import (
    CONFLICT_KEY, BugBook, BugBookError, BugValidationError, failure_signature, field_problems,
    record_failure,
)
from tdpu_tui.engine.stages import bug_stages

ROOT = Path(__file__).parents[1]
BUG_STAGES = bug_stages()
OLD_MARK = "<!-- tdpu:last-bug-number 7 (已用过的最大 Bug 编号；编号不重复使用，请保留此行) -->"
RECORD = ("## Bug #1: parse 报 21002\n- **发现时间**: 2026-02-11 14:30\n- **发现阶段**: 编译\n"
          "- **错误信息**: [F] 21002\n- **根本原因**:\n- **解决方案**:\n- **状态**: 未解决\n\n---\n")


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A directory with a tdpu.toml whose logs go to ./logs."""
    (tmp_path / "tdpu.toml").write_text('[paths]\nlogs = "logs"\n', encoding="utf-8")
    (tmp_path / "logs").mkdir()
    monkeypatch.chdir(tmp_path)
    return tmp_path


def state_of(book_path: Path) -> dict:
    return json.loads((book_path.parent / ".tdpu" / f"{book_path.name}.json").read_text("utf-8"))


# -- nothing outside records (the last number lives beside the book) --------------------------

def test_add_writes_nothing_above_or_between_the_records(tmp_path):
    path = tmp_path / "bugs_found.md"
    head = "# Phase 3 Bug记录\n\n团队的前言：记录 Phase 3 的问题。\n\n" + RECORD + "\n两条记录之间的笔记。\n"
    path.write_text(head, encoding="utf-8")
    rec = BugBook(path).add("第二条", "仿真", time="2026-02-12 09:00")
    text = path.read_text(encoding="utf-8")
    assert rec.number == 2
    assert text.startswith(head)
    assert text[len(head):].startswith("\n## Bug #2: 第二条\n")
    assert "<!--" not in text and "tdpu:" not in text
    assert state_of(path)["last_number"] == 2


def test_a_book_with_an_older_versions_marker_reads_and_loses_only_that_line(tmp_path):
    path = tmp_path / "bugs_found.md"
    old = f"# Phase 3 Bug记录\n{OLD_MARK}\n\n手写的前言。\n\n{RECORD}"
    path.write_text(old, encoding="utf-8")
    book = BugBook(path)
    assert [r.number for r in book.load()] == [1]
    assert path.read_text(encoding="utf-8") == old  # reading changes nothing
    assert book.add("第八条", "导出", time="2026-02-12 09:00").number == 8  # the marker's 7 counted
    text = path.read_text(encoding="utf-8")
    assert text.startswith(old.replace(OLD_MARK + "\n", ""))  # the rest byte for byte
    assert "tdpu:last-bug-number" not in text
    assert state_of(path)["last_number"] == 8
    text = text[: text.index("## Bug #8")]
    path.write_text(text, encoding="utf-8")  # #8 deleted by hand: its number stays used
    assert BugBook(path).add("第九条", "导出").number == 9


def test_a_marker_inside_a_record_or_a_fence_is_the_users_text(tmp_path):
    path = tmp_path / "bugs_found.md"
    text = (f"# Phase 3 Bug记录\n\n```\n{OLD_MARK}\n```\n\n"
            + RECORD.replace("- **状态**: 未解决\n", f"- **状态**: 未解决\n{OLD_MARK}\n"))
    path.write_text(text, encoding="utf-8")
    BugBook(path).update(1, cause="Gather")
    after = path.read_text(encoding="utf-8")
    assert after.count(OLD_MARK) == 2
    assert after == text.replace("- **根本原因**:\n", "- **根本原因**: Gather\n")


def test_a_drafts_signature_is_remembered_beside_the_book(tmp_path):
    path = tmp_path / "bugs_found.md"
    rec, created = record_failure(path, "parse", "icraft parse failed: [F] 21002", [],
                                  bug_stages=BUG_STAGES)
    assert created and state_of(path)["drafts"] == {rec.signature: rec.number}
    # Someone tidies the record and drops the signature comment: still the same failure's record.
    text = path.read_text(encoding="utf-8")
    path.write_text(text.replace(f"<!-- tdpu:signature {rec.signature} -->\n", ""), encoding="utf-8")
    again, created = record_failure(path, "parse", "icraft parse failed: [F] 21002", [],
                                    bug_stages=BUG_STAGES)
    assert not created and again.number == rec.number
    assert len(BugBook(path).load()) == 1


def test_a_damaged_state_file_is_said_and_rebuilt(tmp_path):
    path = tmp_path / "bugs_found.md"
    book = BugBook(path)
    book.add("一", "导出")
    book.state_path.write_text("{not json", encoding="utf-8")
    book = BugBook(path)
    assert book.add("二", "导出").number == 2
    assert any(str(book.state_path) in m and "unreadable" in m for m in book.messages)
    assert state_of(path)["last_number"] == 2


# -- notes nested under a one-line field --------------------------------------------------------

NOTED = ("# Phase 3 Bug记录\n\n## Bug #1: optimize 卡住\n- **发现阶段**: 编译\n"
         "- **状态**: 未解决\n  - 2月12日 又复现了一次\n    在 buyi 上\n  等 Icraft 3.1 再试\n"
         "- **根本原因**: 未知\n\n---\n")


def test_set_status_keeps_the_notes_nested_under_the_status_bullet(project, capsys):
    path = project / "logs" / "bugs_found.md"
    path.write_bytes(NOTED.encode())
    assert main(["set", "1", "--status", "已解决"]) == 0
    assert path.read_bytes() == NOTED.replace("- **状态**: 未解决", "- **状态**: 已解决").encode()
    assert BugBook(path).load()[0].status == "已解决"
    assert main(["set", "1", "--stage", "export"]) == 0  # another one-line field, same rule
    assert "  等 Icraft 3.1 再试\n" in path.read_text(encoding="utf-8")


def test_a_value_written_under_its_empty_bullet_is_edited_where_it_is(tmp_path):
    path = tmp_path / "bugs_found.md"
    text = ("## Bug #1: t\n- **状态**:\n  待验证\n  （等下一版）\n- **发现阶段**:\n"
            "  - 还没定\n")
    path.write_text(text, encoding="utf-8")
    rec = BugBook(path).load()[0]
    assert (rec.status, rec.stage) == ("待验证", "")
    BugBook(path).update(1, status="已解决", stage="导出")
    assert path.read_text(encoding="utf-8") == text.replace("  待验证", "  已解决").replace(
        "- **发现阶段**:\n", "- **发现阶段**: 导出\n")


# -- fenced blocks --------------------------------------------------------------------------------

def test_a_record_heading_inside_a_fenced_block_at_the_margin_is_text(tmp_path):
    path = tmp_path / "bugs_found.md"
    text = ("# Phase 3 Bug记录\n\n记录的格式，例如：\n\n```markdown\n## Bug #7: [标题]\n"
            "- **状态**: [未解决/已解决/待验证]\n```\n\n" + RECORD)
    path.write_text(text, encoding="utf-8")
    assert [r.number for r in BugBook(path).load()] == [1]
    assert BugBook(path).add("第二条", "导出").number == 2  # no number skipped
    with pytest.raises(BugValidationError) as err:
        BugBook(path).update(7, status="已解决")
    assert err.value.field == "number"
    assert path.read_text(encoding="utf-8").startswith(text)  # the code block as it was


def test_a_fence_under_a_bullet_cannot_close_one_left_open_at_the_margin(tmp_path):
    path = tmp_path / "bugs_found.md"
    path.write_text("# Phase 3 Bug记录\n\n```\n忘了闭合\n\n" + RECORD, encoding="utf-8")
    BugBook(path).add("二", "编译", error="多行\n错误")  # an indented fence of tdpu's own
    BugBook(path).add("三", "编译")
    assert [r.number for r in BugBook(path).load()] == [1, 2, 3]


@pytest.mark.parametrize("opened", ["  ````", "   ~~~"])
def test_a_fence_left_open_two_or_three_columns_in_does_not_swallow_an_added_record(
        tmp_path, opened):
    # CommonMark closes such a fence with one indented up to 3 columns: tdpu's own fences at
    # two columns would close it and hide the record behind it (hypothesis found `  ````).
    path = tmp_path / "bugs_found.md"
    path.write_text(f"# Phase 3 Bug记录\n\n{opened}\n忘了闭合\n\n" + RECORD, encoding="utf-8")
    BugBook(path).add("二", "编译", error="多行\n```\n~~~", fix="```\t")
    BugBook(path).update(2, cause="也是\n多行")
    BugBook(path).update(1, cause="第一条\n多行")
    records = BugBook(path).load()
    assert [r.number for r in records] == [1, 2]
    assert (records[1].error, records[1].fix, records[1].cause) == ("多行\n```\n~~~", "```\t",
                                                                     "也是\n多行")
    assert records[0].cause == "第一条\n多行"
    assert f"{opened}\n忘了闭合\n" in path.read_text(encoding="utf-8")


@pytest.mark.parametrize("opened", ["  ```", "  ~~~~"])
def test_a_fence_left_open_in_a_list_item_does_not_swallow_a_field_written_after_it(
        tmp_path, opened):
    # A fence under a bullet closes at any indentation until the next record heading; tdpu's
    # own fence of the same character would close it and swallow the fields after it (review).
    path = tmp_path / "bugs_found.md"
    path.write_text(f"# Phase 3 Bug记录\n\n## Bug #1: t\n- **错误信息**: e\n{opened}\n  忘了闭合\n"
                    "- **状态**: 未解决\n", encoding="utf-8")
    BugBook(path).update(1, cause="c1\nc2")
    BugBook(path).update(1, fix="f1\n~~~\nf2")
    BugBook(path).add("二", "编译", error="多行\n错误")
    records = BugBook(path).load()
    assert [r.number for r in records] == [1, 2]
    assert records[0].error == f"e\n{opened.strip()}\n忘了闭合"
    assert (records[0].cause, records[0].fix, records[0].status) == ("c1\nc2", "f1\n~~~\nf2", "未解决")
    assert records[1].error == "多行\n错误"


# -- one-shot commands, absurd numbers, JSON encoding ----------------------------------------------

def test_concurrent_one_shot_sets_apply_one_after_the_other_without_conflict_copies(project):
    path = project / "logs" / "bugs_found.md"
    path.write_text("# Phase 3 Bug记录\n\n" + RECORD, encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-m", "tdpu_tui", "bugs", "set", "1", "--cause",
                               f"原因 {i}"], cwd=project, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(8)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0] * 8, [err for _, err in outs]
    records = BugBook(path).load()
    assert [r.number for r in records] == [1]
    assert records[0].cause in {f"原因 {i}" for i in range(8)}
    assert not any(k == CONFLICT_KEY for k, _ in records[0].extra)
    assert not any("same time" in err or "meanwhile" in err for _, err in outs)


def test_a_heading_number_of_5000_digits_is_a_clear_error(project, capsys):
    path = project / "logs" / "bugs_found.md"
    text = "# Phase 3 Bug记录\n\n## Bug #" + "9" * 5000 + ": 手滑\n- **状态**: 未解决\n"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(BugBookError) as err:
        BugBook(path).load()
    assert str(path) in str(err.value) and "line 3" in str(err.value) and "5000 digits" in str(err.value)
    for argv in (["list"], ["list", "--json"], ["set", "1", "--status", "已解决"],
                 ["add", "--title", "t", "--stage", "导出"]):
        assert main(argv) == 1
        captured = capsys.readouterr()
        assert "5000 digits" in captured.err and "Traceback" not in captured.err
    assert path.read_text(encoding="utf-8") == text


@pytest.mark.parametrize("encoding", ["ascii", "latin-1", "utf-8"])
def test_list_json_is_utf8_with_undecodable_bytes_escaped(project, encoding):
    path = project / "logs" / "bugs_found.md"
    path.write_bytes("# Phase 3 Bug记录\n\n## Bug #1: 编译 ".encode() + b"\xb1\xe0\xd2\xeb"
                     + "\n- **状态**: 未解决\n".encode())
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONIOENCODING": encoding}
    for argv in (["list", "--json"], ["list"]):
        proc = subprocess.run([sys.executable, "-m", "tdpu_tui", "bugs", *argv], cwd=project,
                              env=env, capture_output=True, timeout=120)
        assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    data = json.loads(subprocess.run(
        [sys.executable, "-m", "tdpu_tui", "bugs", "list", "--json"], cwd=project, env=env,
        capture_output=True, timeout=120, check=True).stdout.decode("utf-8"))
    title = data[0]["title"]
    assert title.startswith("编译 ")
    assert title.encode("utf-8", "surrogateescape") == "编译 ".encode() + b"\xb1\xe0\xd2\xeb"


# -- a book from the first run, locks out of sight --------------------------------------------------

class Quiet(Stage):
    def __init__(self, name, error=None):
        self.name, self.error = name, error

    def run(self, ctx):
        if self.error is not None:
            raise self.error
        return "done"


def test_a_pipeline_run_creates_the_book_with_the_template_title(tmp_path, monkeypatch):
    import tdpu_tui.engine.stages as registry
    from tdpu_tui.batch import run_batch
    cfg = load_config(write_config(tmp_path))
    monkeypatch.setattr(registry, "all_stages", lambda: [Quiet("export")])
    path = tmp_path / "logs" / "bugs_found.md"
    assert run_batch(cfg, None, bug_drafts=False) == 0
    assert path.read_text(encoding="utf-8") == "# Phase 3 Bug记录\n"
    path.write_text("# 我们自己的标题\n", encoding="utf-8")
    assert run_batch(cfg, None) == 0
    assert path.read_text(encoding="utf-8") == "# 我们自己的标题\n"  # an existing book is left alone
    assert run_batch(cfg, ["nope"]) == 2  # a usage error runs nothing, creates nothing
    path.unlink()
    assert run_batch(cfg, ["nope"]) == 2 and not path.exists()


def test_lock_files_stay_in_one_hidden_folder(tmp_path, monkeypatch):
    import tdpu_tui.engine.stages as registry
    from tdpu_tui.batch import run_batch
    cfg = load_config(write_config(tmp_path))
    monkeypatch.setattr(registry, "all_stages",
                        lambda: [Quiet("export", StageFailed("boom")), Quiet("precheck")])
    assert run_batch(cfg, None) == 1
    BugBook(tmp_path / "logs" / "bugs_found.md").add("t", "导出")
    logs = tmp_path / "logs"
    assert not [p.name for p in logs.iterdir() if p.name.endswith(".lock") or p.name.endswith(".tmp")]
    assert (logs / ".tdpu" / "bugs_found.md.lock").exists()
    assert [p.name for p in logs.iterdir() if p.name.startswith(".")] == [".tdpu"]


# -- usage mistakes and volatile names ---------------------------------------------------------------

def test_a_usage_mistake_is_reported_not_drafted(tmp_path, monkeypatch, capsys):
    import tdpu_tui.engine.stages as registry
    from tdpu_tui.batch import run_batch
    cfg = load_config(write_config(tmp_path))
    mistake = UsageError("out/bitnet_b1.58_bitlinear.onnx was made from an earlier export: "
                         "out/bitnet_b1.58_full.onnx changed since the replace stage ran")
    monkeypatch.setattr(registry, "all_stages", lambda: [Quiet("validate", mistake)])
    assert run_batch(cfg, None) == 1
    err = capsys.readouterr().err
    assert "a usage mistake, not a bug: not filed in bugs_found.md" in err
    assert BugBook(tmp_path / "logs" / "bugs_found.md").load() == []
    summary = Pipeline(cfg, [Quiet("validate", mistake), Quiet("parse", StageFailed("[F] 21002"))]).run()
    assert [(r.status, r.usage_error) for r in summary.results] == [(Status.FAILED, True),
                                                                    (Status.FAILED, False)]


def test_a_stage_run_out_of_order_is_a_usage_error(tmp_path):
    from tdpu_tui.engine.model.compare import require_graph
    with pytest.raises(UsageError) as err:
        require_graph(tmp_path / "bitnet_b1.58_bitlinear.onnx", "replace")
    assert "run the replace stage first" in str(err.value)


def test_validate_after_a_fresh_export_is_reported_not_drafted(tmp_path, capsys):
    from tdpu_tui.batch import run_batch
    cfg = load_config(write_config(tmp_path))
    assert run_batch(cfg, ["export", "replace"]) == 0
    time.sleep(1.1)  # the export's stamp tells exports apart by the second
    assert run_batch(cfg, ["export"]) == 0
    capsys.readouterr()
    assert run_batch(cfg, ["validate"]) == 1
    captured = capsys.readouterr()
    assert "was made from an earlier export" in captured.out  # the summary table
    assert "[validate] a usage mistake, not a bug: not filed in bugs_found.md" in captured.err
    assert BugBook(tmp_path / "logs" / "bugs_found.md").load() == []


RANDOM_NAMES = [
    "cannot write models/output/.staging-k2j3h4ab/bitnet_b1.58_full.onnx: disk full (pid 4242)",
    "cannot write models/output/.staging-zz9q_x01/bitnet_b1.58_full.onnx: disk full (pid 77)",
    "cannot write models/output/.staging-abcdefgh/bitnet_b1.58_full.onnx: disk full (PID=31337)",
    "cannot write models/output/.staging-0_1_2_3_/bitnet_b1.58_full.onnx: disk full (pid: 9)",
]


def test_random_temp_names_hex_ids_and_pids_do_not_make_new_records(tmp_path):
    path = tmp_path / "bugs_found.md"
    for message in RANDOM_NAMES:
        record_failure(path, "export", message, [], bug_stages=BUG_STAGES)
    for message in ("onnxruntime: session tmpab12cd failed, id 5f3a9c01d2e4 at 0x7f3a2c",
                    "onnxruntime: session tmpq9w8e7r6 failed, id 0a1b2c3d4e5f at 0x55aa10",
                    "onnxruntime: session tmpzzzzzzzz failed, id 99887766aabb at 0x1"):
        record_failure(path, "validate", message, [], bug_stages=BUG_STAGES)
    for message in ("write .bugs_found.md.x1y2z3w4.tmp failed (thread 12)",
                    "write .bugs_found.md.q0q0q0q0.tmp failed (thread 99)"):
        record_failure(path, "replace", message, [], bug_stages=BUG_STAGES)
    assert [r.title.split()[0] for r in BugBook(path).load()] == ["export", "validate", "replace"]
    # What does tell failures apart still does.
    assert failure_signature("export", "[F] 21002 in layer 3") != failure_signature("export", "[F] 26000 in layer 3")
    assert failure_signature("export", "missing output logits") != failure_signature("export", "missing output hidden")


# -- English status aliases, a form in both languages ------------------------------------------------

@pytest.mark.parametrize(("given", "stored"), [("unresolved", "未解决"), ("resolved", "已解决"),
                                               ("to-verify", "待验证"), ("Resolved", "已解决"),
                                               ("TO_VERIFY", "待验证"), ("已解决", "已解决")])
def test_status_takes_english_aliases(project, capsys, given, stored):
    assert main(["add", "--title", "t", "--stage", "导出", "--status", given]) == 0
    assert main(["set", "1", "--status", given]) == 0
    path = project / "logs" / "bugs_found.md"
    assert BugBook(path).load()[0].status == stored
    assert f"- **状态**: {stored}\n" in path.read_text(encoding="utf-8")


def test_a_bad_status_lists_the_values_and_their_aliases(project, capsys):
    assert main(["add", "--title", "t", "--stage", "导出", "--status", "done"]) == 2
    err = capsys.readouterr().err
    for needle in ("--status", "'done'", "未解决, 已解决, 待验证", "resolved → 已解决",
                   "to-verify → 待验证"):
        assert needle in err


def test_help_names_the_stages_and_the_status_aliases(capsys):
    assert main(["add", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "export, precheck, parse, optimize, simulate, replace, validate" in out
    assert "unresolved | resolved | to-verify" in out


def test_the_forms_problems_are_in_both_languages():
    problems = field_problems({"title": " ", "time": "2026/02/11", "stage": "x", "status": "done"})
    assert problems["title"] == "标题不能为空 · expected a title, found an empty one"
    assert problems["time"].startswith("时间格式应为 YYYY-MM-DD HH:MM") and "expected YYYY-MM-DD HH:MM" in problems["time"]
    assert problems["stage"].startswith("应为 导出, 编译, 仿真, 替换 之一") and "expected one of" in problems["stage"]
    assert "应为 未解决, 已解决, 待验证 之一" in problems["status"] and "resolved → 已解决" in problems["status"]


def test_records_does_not_import_the_stages():
    code = textwrap.dedent("""
        import sys
        import tdpu_tui.engine.records.bugbook
        sys.exit(1 if any(m.startswith("tdpu_tui.engine.stages") for m in sys.modules) else 0)
    """)
    proc = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0
