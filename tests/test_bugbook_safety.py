"""The bug book under concurrent writers, crashes and edits made outside the session."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from tdpu_tui.engine.records.bugbook import CONFLICT_KEY, BugBook

ROOT = Path(__file__).parents[1]
FIXTURES = Path(__file__).parent / "fixtures" / "bugs"


def run_python(code: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args],
                            env={**os.environ, "PYTHONPATH": str(ROOT)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_two_processes_adding_fifty_records_each_lose_nothing(tmp_path):
    path = tmp_path / "phase3_logs" / "bugs_found.md"
    code = """
        import sys
        from tdpu_tui.engine.records.bugbook import BugBook
        path, who = sys.argv[1], sys.argv[2]
        for i in range(50):
            BugBook(path).add(f"{who} {i}", "编译", error=f"{who}\\nline {i}")
    """
    procs = [run_python(code, str(path), who) for who in ("alpha", "beta")]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    records = BugBook(path).load()
    assert len(records) == 100
    assert sorted(r.number for r in records) == list(range(1, 101))
    titles = {r.title for r in records}
    assert titles == {f"{who} {i}" for who in ("alpha", "beta") for i in range(50)}
    assert all(r.error == f"{r.title.split()[0]}\nline {r.title.split()[1]}" for r in records)
    assert not list(path.parent.glob(".bugs_found.md.*.tmp"))


def test_writer_killed_between_fsync_and_rename_leaves_the_original_intact(tmp_path):
    path = tmp_path / "bugs_found.md"
    path.write_bytes((FIXTURES / "reordered.md").read_bytes())
    before = path.read_bytes()
    code = """
        import os, sys
        from tdpu_tui.engine.records.bugbook import BugBook
        def die(src, dst):
            assert open(src, "rb").read().count(b"## Bug #") == 3  # the new file is complete
            os._exit(9)
        os.replace = die
        BugBook(sys.argv[1]).add("never lands", "导出")
    """
    p = run_python(code, str(path))
    _, err = p.communicate(timeout=60)
    assert p.returncode == 9, err
    assert path.read_bytes() == before
    leftovers = list(tmp_path.glob(".bugs_found.md.*.tmp"))
    assert len(leftovers) == 1  # the crashed writer's temp file

    rec = BugBook(path).add("lands", "导出")  # the next writer cleans up after it
    assert rec.number == 6
    assert not list(tmp_path.glob(".bugs_found.md.*.tmp"))
    assert path.read_bytes().startswith(before)


def test_write_is_atomic_and_keeps_the_file_mode(tmp_path):
    path = tmp_path / "bugs_found.md"
    path.write_bytes((FIXTURES / "template.md").read_bytes())
    path.chmod(0o600)
    inode = path.stat().st_ino
    BugBook(path).update(1, status="已解决")
    assert path.stat().st_ino != inode  # replaced by rename, not rewritten in place
    assert path.stat().st_mode & 0o777 == 0o600
    assert (tmp_path / ".tdpu" / "bugs_found.md.lock").exists()
    assert not list(tmp_path.glob("*.lock")) and not list(tmp_path.glob(".*.lock"))


def test_writes_go_through_a_symlink_to_the_real_file(tmp_path):
    real = tmp_path / "real.md"
    real.write_bytes((FIXTURES / "template.md").read_bytes())
    link = tmp_path / "bugs_found.md"
    link.symlink_to(real)
    BugBook(link).update(1, status="已解决")
    assert link.is_symlink()
    assert BugBook(real).load()[0].status == "已解决"


def test_external_edit_during_a_session_is_merged_not_overwritten(tmp_path):
    path = tmp_path / "bugs_found.md"
    path.write_bytes((FIXTURES / "reordered.md").read_bytes())
    book = BugBook(path)
    book.load()
    assert not book.changed_on_disk()

    # an editor saves: new preamble text, record #2 changed, a record #9 added by hand
    text = path.read_text(encoding="utf-8")
    text = text.replace("手写的前言", "手写并修改过的前言").replace("- **负责人**: 小王", "- **负责人**: 小张")
    text += "\n## Bug #9: 手工添加\n- **发现阶段**: 导出\n- **状态**: 未解决\n"
    path.write_text(text, encoding="utf-8")
    assert book.changed_on_disk()

    book.update(5, status="已解决")
    rec = book.add("会话中新增", "仿真")

    after = path.read_text(encoding="utf-8")
    assert "手写并修改过的前言" in after
    assert "- **负责人**: 小张" in after
    assert "## Bug #9: 手工添加" in after
    numbers = [r.number for r in BugBook(path).load()]
    assert numbers == [2, 5, 9, 10] and rec.number == 10
    assert BugBook(path).get(5).status == "已解决"
    assert any("Bug #9" in m and "added" in m for m in book.messages)
    assert any("Bug #2" in m and "changed" in m for m in book.messages)
    assert not book.changed_on_disk()


def test_same_record_changed_on_both_sides_keeps_both(tmp_path):
    path = tmp_path / "bugs_found.md"
    path.write_bytes((FIXTURES / "template.md").read_bytes())
    book = BugBook(path)
    book.load()
    other = BugBook(path)  # e.g. `tdpu bugs set 1 --status 已解决` from a shell
    other.update(1, status="已解决", cause="shell 里写的原因")

    saved = book.update(1, status="待验证", cause="app 里写的原因")

    records = BugBook(path).load()
    assert [r.number for r in records] == [1, 2]
    theirs, ours = records
    assert (theirs.status, theirs.cause) == ("已解决", "shell 里写的原因")
    assert (ours.status, ours.cause, ours.title) == ("待验证", "app 里写的原因", "[标题]")
    assert saved == ours
    assert ours.extra[-1][0] == CONFLICT_KEY and "Bug #1" in ours.extra[-1][1]
    assert any("Bug #1" in m and "Bug #2" in m and "same time" in m for m in book.messages)


def test_different_fields_changed_on_both_sides_are_merged(tmp_path):
    path = tmp_path / "bugs_found.md"
    path.write_bytes((FIXTURES / "template.md").read_bytes())
    book = BugBook(path)
    book.load()
    BugBook(path).update(1, cause="shell 里写的原因")
    saved = book.update(1, status="已解决")
    records = BugBook(path).load()
    assert [r.number for r in records] == [1] and saved == records[0]
    assert (saved.status, saved.cause) == ("已解决", "shell 里写的原因")
    assert any("Bug #1" in m and "kept both" in m for m in book.messages)


def test_an_edit_is_merged_against_the_record_the_editor_showed(tmp_path):
    """A form opened before a hand edit, saved after the book reloaded the file: the hand edit
    of the same field is not overwritten by the form's stale value."""
    path = tmp_path / "bugs_found.md"
    path.write_bytes((FIXTURES / "template.md").read_bytes())
    book = BugBook(path)
    shown = book.load()[0]
    BugBook(path).update(1, cause="手写的原因")
    book.reload()
    fields = {"title": shown.title, "cause": "表单里的原因", "status": shown.status}
    saved = book.update(1, base=shown, **fields)
    records = BugBook(path).load()
    assert [(r.number, r.cause) for r in records] == [(1, "手写的原因"), (2, "表单里的原因")]
    assert saved.number == 2 and saved.extra[-1][0] == CONFLICT_KEY


def test_same_change_on_both_sides_is_not_a_conflict(tmp_path):
    path = tmp_path / "bugs_found.md"
    path.write_bytes((FIXTURES / "template.md").read_bytes())
    book = BugBook(path)
    book.load()
    BugBook(path).update(1, status="已解决")
    book.update(1, status="已解决")
    assert [r.number for r in BugBook(path).load()] == [1]


def test_record_deleted_on_disk_while_edited_is_restored_with_the_edit(tmp_path):
    path = tmp_path / "bugs_found.md"
    path.write_bytes((FIXTURES / "no_trailing_rule.md").read_bytes())
    book = BugBook(path)
    book.load()
    text = path.read_text(encoding="utf-8")
    path.write_text(text[: text.index("## Bug #2")], encoding="utf-8")
    book.update(2, status="已解决")
    records = BugBook(path).load()
    assert [(r.number, r.status) for r in records] == [(1, "已解决"), (2, "已解决")]
    assert any("Bug #2" in m and "removed" in m for m in book.messages)


def test_reload_reports_what_changed_outside(tmp_path):
    path = tmp_path / "bugs_found.md"
    book = BugBook(path)
    book.add("a", "导出")
    book.add("b", "导出")
    assert book.reload() == []
    other = BugBook(path)
    other.update(1, status="已解决")
    other.add("c", "编译")
    text = path.read_text(encoding="utf-8")
    path.write_text(text.replace("## Bug #2: b", "## Bug #2: b (改名)"), encoding="utf-8")
    messages = book.reload()
    assert len(messages) == 3
    assert any("Bug #1" in m and "changed" in m for m in messages)
    assert any("Bug #2" in m and "changed" in m for m in messages)
    assert any("Bug #3" in m and "added" in m for m in messages)
    assert [r.title for r in book.records] == ["a", "b (改名)", "c"]
    path.write_text(path.read_text(encoding="utf-8") + "\n随手记一笔。\n", encoding="utf-8")
    assert book.changed_on_disk()
    assert book.reload() == [f"{path.name} was edited outside this session (no bug record changed)"]


def test_a_book_created_empty_is_not_an_outside_edit(tmp_path):
    # A run starts the template (ensure_book) a moment before it drafts; a poll that lands in
    # between saw "edited outside this session" (CI, test_app's drafting test).
    from tdpu_tui.engine.records.bugbook import ensure_book
    path = tmp_path / "bugs_found.md"
    book = BugBook(path)
    book.load()
    ensure_book(path)
    assert book.changed_on_disk()
    assert book.reload() == []
    path.write_text(path.read_text(encoding="utf-8") + "\n随手记一笔。\n", encoding="utf-8")
    assert book.reload() == [f"{path.name} was edited outside this session (no bug record changed)"]


def test_records_are_copies_so_callers_cannot_corrupt_the_merge_base(tmp_path):
    path = tmp_path / "bugs_found.md"
    book = BugBook(path)
    book.add("a", "导出")
    book.records[0].status = "已解决"  # a form that mutates what it was given
    assert book.update(1, status="已解决").number == 1
    assert [r.number for r in BugBook(path).load()] == [1]
