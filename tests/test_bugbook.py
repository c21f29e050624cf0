"""The bug book's codec, validation, numbering and failure drafts (docs/spec.md §7)."""

import difflib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tdpu_tui.engine.records import bugbook
from tdpu_tui.engine.records.bugbook import (
    STAGE_VALUES, STATUS_VALUES, TEMPLATE_HEADER, BugBook, BugDocument, BugRecord,
    BugValidationError, failure_signature, parse_bugs,
)
from tdpu_tui.engine.stages import bug_stages

FIXTURES = Path(__file__).parent / "fixtures" / "bugs"
FIXTURE_NAMES = sorted(p.name for p in FIXTURES.glob("*.md"))
BUG_STAGES = bug_stages()


def stage_label(name):
    return bugbook.stage_label(name, BUG_STAGES)


def parse_stage(value):
    return bugbook.parse_stage(value, BUG_STAGES)


def draft_from_failure(path, stage, message, tail=()):
    return bugbook.draft_from_failure(path, stage, message, tail, bug_stages=BUG_STAGES)


def copy_fixture(name: str, tmp_path: Path) -> Path:
    dst = tmp_path / "bugs_found.md"
    dst.write_bytes((FIXTURES / name).read_bytes())
    return dst


def changed_line_numbers(before: bytes, after: bytes) -> list[int]:
    """0-based indices of lines of `before` that the edit replaced or removed."""
    a = before.decode("utf-8-sig").splitlines(keepends=True)
    b = after.decode("utf-8-sig").splitlines(keepends=True)
    out = []
    for tag, i1, i2, _, _ in difflib.SequenceMatcher(a=a, b=b, autojunk=False).get_opcodes():
        if tag != "equal":
            out.extend(range(i1, i2) if i2 > i1 else [i1])
    return out


# -- round trip --------------------------------------------------------------------------------

def test_fixtures_cover_every_tolerance():
    assert {"template.md", "fullwidth_colons.md", "reordered.md", "crlf.md", "mixed_eol.md",
            "bom.md", "tabs.md", "no_trailing_rule.md", "multiline.md"} <= set(FIXTURE_NAMES)


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_unchanged_document_writes_back_byte_identical(name):
    data = (FIXTURES / name).read_bytes()
    assert BugDocument.from_bytes(data).to_bytes() == data


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_update_to_the_same_values_does_not_touch_the_file(name, tmp_path):
    path = copy_fixture(name, tmp_path)
    before = path.read_bytes()
    mtime = path.stat().st_mtime_ns
    book = BugBook(path)
    rec = book.load()[0]
    book.update(rec.number, title=rec.title, error=rec.error, cause=rec.cause, fix=rec.fix)
    assert path.read_bytes() == before
    assert path.stat().st_mtime_ns == mtime


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_status_edit_rewrites_only_the_status_line(name, tmp_path):
    path = copy_fixture(name, tmp_path)
    before = path.read_bytes()
    book = BugBook(path)
    rec = book.load()[0]
    new = "已解决" if rec.status != "已解决" else "待验证"
    book.update(rec.number, status=new)
    after = path.read_bytes()
    assert BugBook(path).load()[0].status == new
    changed = changed_line_numbers(before, after)
    status_line = next(i for i, line in enumerate(before.decode("utf-8-sig").splitlines())
                       if "状态" in line and line.startswith(("-", "*", "+")))
    assert changed == [status_line]
    assert after.startswith(b"\xef\xbb\xbf") == before.startswith(b"\xef\xbb\xbf")


# -- what hands produce -------------------------------------------------------------------------

def test_template_placeholders_are_read_as_text():
    (rec,) = parse_bugs((FIXTURES / "template.md").read_bytes())
    assert rec == BugRecord(1, "[标题]", "YYYY-MM-DD HH:MM", "[导出/编译/仿真/替换]", "[完整错误信息]",
                            "[分析]", "[修复方法]", "[未解决/已解决/待验证]", [])


def test_full_width_colons_and_bullet_styles():
    (rec,) = parse_bugs((FIXTURES / "fullwidth_colons.md").read_bytes())
    assert (rec.number, rec.title, rec.time, rec.stage, rec.error, rec.cause, rec.fix, rec.status) == (
        1, "icraft parse 报 21002", "2026-02-11 14:30", "编译", "[F] 21002", "Gather 不是单索引选择",
        "走 icraft profile，输入 inputs_embeds", "已解决")


def test_full_width_edit_keeps_the_bullet_style(tmp_path):
    path = copy_fixture("fullwidth_colons.md", tmp_path)
    BugBook(path).update(1, status="待验证", error="[F] 21003")
    text = path.read_text(encoding="utf-8")
    assert "- **状态**：待验证\n" in text
    assert "* 错误信息：[F] 21003\n" in text


def test_reordered_missing_and_extra_fields_free_text_and_notes():
    recs = parse_bugs((FIXTURES / "reordered.md").read_bytes())
    assert [r.number for r in recs] == [2, 5]
    two, five = recs
    assert (two.stage, two.status, two.time) == ("仿真", "待验证", "2026-02-12 09:05")
    assert two.error == "logits 全为 NaN\n第二行缩进续行"
    assert two.extra == [("负责人", "小王"), ("备注", "见 #1\n- 子项一\n- 子项二")]
    assert (five.time, five.error, five.fix) == ("", "", "")
    assert five.cause == "hf 与 tdpu 打包顺序混用\n懒续行：这一行没有缩进"


def test_missing_field_is_inserted_in_template_order(tmp_path):
    path = copy_fixture("reordered.md", tmp_path)
    before = path.read_text(encoding="utf-8")
    BugBook(path).update(5, time="2026-02-20 10:00", fix="按 tdpu 顺序重新打包")
    after = path.read_text(encoding="utf-8")
    lines = after.splitlines()
    start = lines.index("## Bug #5: 缺字段的记录")
    assert lines[start + 1:start + 3] == ["- **发现时间**: 2026-02-20 10:00", "- **发现阶段**: 替换"]
    assert "- **解决方案**: 按 tdpu 顺序重新打包" in lines[start:]
    # the preamble, the other record, the free text and the trailing note are untouched
    assert after.split("## Bug #5")[0] == before.split("## Bug #5")[0]
    assert after.endswith("---\n\n结尾的备注。\n")


def test_extra_bullets_can_be_edited_added_and_removed(tmp_path):
    path = copy_fixture("reordered.md", tmp_path)
    BugBook(path).update(2, extra=[("负责人", "小李"), ("复现", "seed=3")])
    rec = BugBook(path).load()[0]
    assert rec.extra == [("负责人", "小李"), ("复现", "seed=3")]
    assert "子项一" not in path.read_text(encoding="utf-8")


def test_crlf_document_stays_crlf_after_an_edit(tmp_path):
    path = copy_fixture("crlf.md", tmp_path)
    BugBook(path).update(1, cause="opset 16 的 LayerNormalization\n需要 opset 17")
    data = path.read_bytes()
    assert b"\n" not in data.replace(b"\r\n", b"")
    assert BugBook(path).load()[0].cause == "opset 16 的 LayerNormalization\n需要 opset 17"


def test_mixed_line_endings_keep_each_untouched_line_ending(tmp_path):
    path = copy_fixture("mixed_eol.md", tmp_path)
    BugBook(path).update(1, error="改过的错误信息")
    data = path.read_bytes()
    assert b"- **\xe5\x8f\x91\xe7\x8e\xb0\xe6\x97\xb6\xe9\x97\xb4**: 2026-02-11 10:00\n" in data
    assert "- **错误信息**: 改过的错误信息\n".encode() in data  # that line ended in LF
    assert "- **发现阶段**: 编译\r\n".encode() in data


def test_bom_is_kept_and_not_part_of_the_text(tmp_path):
    path = copy_fixture("bom.md", tmp_path)
    book = BugBook(path)
    assert book.load()[0].number == 3
    book.add("新问题", "仿真")
    data = path.read_bytes()
    assert data.startswith(b"\xef\xbb\xbf# Phase 3 Bug")
    assert data.count(b"\xef\xbb\xbf") == 1


def test_tabs_in_bullets_and_a_tab_indented_fence():
    (rec,) = parse_bugs((FIXTURES / "tabs.md").read_bytes())
    assert (rec.title, rec.time, rec.stage, rec.status) == ("Tab 分隔", "2026-02-14 08:00", "导出", "未解决")
    assert rec.error == 'Traceback (most recent call last):\n\tFile "export.py", line 3\nRuntimeError: bad'


def test_record_without_trailing_rule_gets_one_before_the_next_record(tmp_path):
    path = copy_fixture("no_trailing_rule.md", tmp_path)
    before = path.read_bytes()
    rec = BugBook(path).add("第三条", "仿真", time="2026-02-16 09:00")
    after = path.read_bytes()
    assert rec.number == 3
    assert after.startswith(before)
    tail = after[len(before):].decode()
    assert tail.startswith("\n\n---\n\n## Bug #3: 第三条\n")
    assert [r.number for r in BugBook(path).load()] == [1, 2, 3]


def test_fenced_block_hides_headings_and_rules_and_keeps_blank_lines():
    (rec,) = parse_bugs((FIXTURES / "multiline.md").read_bytes())
    assert rec.number == 7
    assert rec.error == ("[02/15/26 12:00:01.123] [F] 21002\n```\n## Bug #99: 这不是一条记录\n"
                         "- **状态**: 已解决\n```\n---")
    assert rec.cause == "第一行\n\n第三行（中间有空行）"
    assert rec.fix == "用 `Slice(LayerNormalization(...))` 代替 RMSNorm"


def test_a_fence_left_open_by_hand_does_not_hide_later_records(tmp_path):
    path = tmp_path / "bugs_found.md"
    path.write_text("# Phase 3 Bug记录\n\n笔记：\n```\n没有闭合的代码块\n\n## Bug #1: 仍然是记录\n"
                    "- **状态**: 未解决\n", encoding="utf-8")
    assert [r.title for r in BugBook(path).load()] == ["仍然是记录"]
    BugBook(path).add("第二条", "编译", error="a\n```\nb")
    assert [(r.number, r.error) for r in BugBook(path).load()] == [(1, ""), (2, "a\n```\nb")]


def test_multi_line_value_is_an_indented_fence_longer_than_any_backtick_run(tmp_path):
    path = tmp_path / "bugs_found.md"
    error = "Traceback:\n```\nx = `a`\n```\n  indented\n\nafter a blank line"
    BugBook(path).add("多行", "编译", error=error, time="2026-02-16 09:00")
    text = path.read_text(encoding="utf-8")
    assert "- **错误信息**:\n  ````\n  Traceback:\n  ```\n" in text
    assert "\n\n  after a blank line\n  ````\n" in text
    assert BugBook(path).load()[0].error == error


# -- creation, validation -----------------------------------------------------------------------

@pytest.fixture
def umask():
    """Set the process umask for one test; the old one comes back afterwards."""
    old = os.umask(0o022)
    os.umask(old)
    yield os.umask
    os.umask(old)


def test_missing_file_is_created_with_the_template_header(tmp_path, umask):
    umask(0o022)
    path = tmp_path / "phase3_logs" / "bugs_found.md"
    assert BugBook(path).load() == []
    BugBook(path).add("第一条", "导出", time="2026-02-16 09:00")
    text = path.read_text(encoding="utf-8")
    assert text.startswith("# Phase 3 Bug记录\n")
    assert TEMPLATE_HEADER.startswith("# Phase 3 Bug记录\n\n")
    assert text.endswith(
        "## Bug #1: 第一条\n- **发现时间**: 2026-02-16 09:00\n- **发现阶段**: 导出\n- **错误信息**:\n"
        "- **根本原因**:\n- **解决方案**:\n- **状态**: 未解决\n\n---\n")
    assert oct(path.stat().st_mode & 0o777) == oct(0o644)


@pytest.mark.parametrize(("mask", "expected"), [(0o027, 0o640), (0o002, 0o664)])
def test_a_new_book_gets_0666_minus_the_umask(tmp_path, umask, mask, expected):
    umask(mask)
    path = tmp_path / "bugs_found.md"
    BugBook(path).add("t", "导出")
    assert oct(path.stat().st_mode & 0o777) == oct(expected)


def test_an_edited_book_keeps_its_mode_whatever_the_umask(tmp_path, umask):
    umask(0o077)
    path = copy_fixture("template.md", tmp_path)
    path.chmod(0o664)
    BugBook(path).update(1, status="已解决")
    BugBook(path).add("t", "导出")
    assert oct(path.stat().st_mode & 0o777) == oct(0o664)


def test_new_record_time_defaults_to_local_now(tmp_path):
    rec = BugBook(tmp_path / "b.md").add("t", "导出")
    assert len(rec.time) == 16 and rec.time[4] == "-" and rec.time[13] == ":"


@pytest.mark.parametrize(("kwargs", "field", "needles"), [
    ({"stage": "编译阶段"}, "stage", ["发现阶段", "导出, 编译, 仿真, 替换", "'编译阶段'"]),
    ({"status": "fixed"}, "status", ["状态", "未解决, 已解决, 待验证", "'fixed'"]),
    ({"title": "  "}, "title", ["empty"]),
    ({"title": "two\nlines"}, "title", ["one line"]),
    ({"time": "2026/02/11"}, "time", ["YYYY-MM-DD HH:MM", "'2026/02/11'"]),
    ({"extra": [("状态", "x")]}, "extra", ["field of its own", "'状态'"]),
    ({"extra": [("a:b", "x")]}, "extra", ["':'", "'a:b'"]),
])
def test_bad_values_are_rejected_naming_the_field(tmp_path, kwargs, field, needles):
    path = tmp_path / "bugs_found.md"
    with pytest.raises(BugValidationError) as err:
        BugBook(path).add(**{"title": "t", "stage": "导出", **kwargs})
    assert err.value.field == field
    for needle in needles:
        assert needle in str(err.value)
    assert not path.exists()


def test_update_rejects_unknown_fields_and_numbers(tmp_path):
    path = copy_fixture("template.md", tmp_path)
    book = BugBook(path)
    with pytest.raises(BugValidationError) as err:
        book.update(1, severity="high")
    assert err.value.field == "severity"
    with pytest.raises(BugValidationError) as err:
        book.update(42, status="已解决")
    assert err.value.field == "number" and "#42" in str(err.value)
    with pytest.raises(BugValidationError) as err:
        book.update(1, stage="export")
    assert err.value.field == "stage"


def test_a_form_sending_every_field_back_changes_only_what_was_edited(tmp_path):
    path = copy_fixture("template.md", tmp_path)  # placeholders are not valid stage/time values
    before = path.read_bytes()
    book = BugBook(path)
    rec = book.load()[0]
    values = {f: getattr(rec, f) for f in ("title", "time", "stage", "status", "error", "cause", "fix")}
    book.update(1, **{**values, "status": "已解决"})
    assert changed_line_numbers(before, path.read_bytes()) == [8]
    with pytest.raises(BugValidationError) as err:
        book.update(1, **{**values, "stage": "编译阶段"})
    assert err.value.field == "stage"


def test_values_match_spec():
    assert STAGE_VALUES == ("导出", "编译", "仿真", "替换")
    assert STATUS_VALUES == ("未解决", "已解决", "待验证")


# -- numbering ----------------------------------------------------------------------------------

def _remove_record(path: Path, number: int) -> None:
    text = path.read_text(encoding="utf-8")
    head, rest = text.split(f"## Bug #{number}:", 1)
    nxt = rest.find("\n## Bug #")
    path.write_text(head + (rest[nxt + 1:] if nxt >= 0 else ""), encoding="utf-8")


def test_numbers_of_records_deleted_by_hand_are_not_reused(tmp_path):
    path = tmp_path / "bugs_found.md"
    for i in range(3):
        BugBook(path).add(f"bug {i}", "导出")
    _remove_record(path, 3)
    _remove_record(path, 2)
    assert [r.number for r in BugBook(path).load()] == [1]
    assert BugBook(path).add("next", "编译").number == 4
    # Remembered beside the book, not in the user's text.
    assert "tdpu:" not in path.read_text(encoding="utf-8")
    assert json.loads((tmp_path / ".tdpu" / "bugs_found.md.json").read_text())["last_number"] == 4


def test_hand_written_higher_number_wins(tmp_path):
    path = copy_fixture("multiline.md", tmp_path)  # Bug #7, no marker
    assert BugBook(path).add("next", "编译").number == 8


def test_a_session_remembers_numbers_it_saw_even_without_the_state_file(tmp_path):
    path = tmp_path / "bugs_found.md"
    book = BugBook(path)
    book.add("a", "导出")
    book.add("b", "导出")
    book.state_path.unlink()
    _remove_record(path, 2)
    book.reload()
    assert book.add("c", "导出").number == 3


# -- drafts from failed stages ------------------------------------------------------------------

@pytest.mark.parametrize(("stage", "label"), [
    ("export", "导出"), ("precheck", "编译"), ("parse", "编译"), ("optimize", "编译"),
    ("simulate", "仿真"), ("replace", "替换"), ("validate", "替换"), ("仿真", "仿真"),
])
def test_stage_label(stage, label):
    assert stage_label(stage) == label


@pytest.mark.parametrize(("value", "label"), [
    ("export", "导出"), ("Export", "导出"), (" precheck ", "编译"), ("parse", "编译"),
    ("OPTIMIZE", "编译"), ("simulate", "仿真"), ("replace", "替换"), ("validate", "替换"),
    ("导出", "导出"), (" 编译 ", "编译"), ("仿真", "仿真"), ("替换", "替换"),
])
def test_parse_stage_takes_both_forms(value, label):
    assert parse_stage(value) == label


@pytest.mark.parametrize("value", ["deploy", "编译阶段", "", "export 失败", None])
def test_parse_stage_rejects_other_values_listing_both_forms(value):
    with pytest.raises(BugValidationError) as err:
        parse_stage(value)
    assert err.value.field == "stage"
    msg = str(err.value)
    assert "导出, 编译, 仿真, 替换" in msg and repr(value) in msg
    assert "export → 导出" in msg and "precheck/parse/optimize → 编译" in msg
    assert "simulate/rtl → 仿真" in msg and "replace/validate → 替换" in msg


def test_the_book_itself_stores_only_the_spec_values(tmp_path):
    # The aliases are the command line's (parse_stage); add/update keep docs/spec.md §7's rule.
    with pytest.raises(BugValidationError):
        BugBook(tmp_path / "b.md").add("t", "export")


def test_stage_label_rejects_unknown_stage():
    with pytest.raises(BugValidationError) as err:
        stage_label("deploy")
    assert err.value.field == "stage" and "'deploy'" in str(err.value)


def test_draft_from_failure_fills_the_record(tmp_path):
    path = tmp_path / "bugs_found.md"
    tail = [f"[02/11/26 14:30:{i:02d}.000] [I] step {i}" for i in range(30)] + ["[F] 21002"]
    rec = draft_from_failure(path, "parse", "icraft parse failed: [F] 21002\nsee the log", tail)
    assert rec is not None
    assert rec.stage == "编译" and rec.status == "未解决"
    assert rec.title == "parse 失败: icraft parse failed: [F] 21002"
    assert rec.error.startswith("icraft parse failed: [F] 21002\nsee the log\n\n日志末尾:\n")
    assert rec.error.endswith("step 29\n[F] 21002")
    assert "step 5" not in rec.error  # only the last lines of the log
    assert BugBook(path).load() == [rec]
    assert f"<!-- tdpu:signature {rec.signature} -->" in path.read_text(encoding="utf-8")


def test_same_failure_is_drafted_once_despite_volatile_details(tmp_path):
    path = tmp_path / "bugs_found.md"
    first = ("2026-02-11 14:30:05 export failed after 12.5s: cannot write "
             "/tmp/tmpa1b2c3/bitnet_b1.58_full.onnx (pid 4242, at 0x7f3a2c)")
    again = ("2026-02-12 09:01:44 export failed after 3.25s: cannot write "
             "/tmp/tmpzz9q/bitnet_b1.58_full.onnx (pid 77, at 0x55aa10)")
    assert failure_signature("export", first) == failure_signature("export", again)
    assert draft_from_failure(path, "export", first, ["a"]) is not None
    assert draft_from_failure(path, "export", again, ["b"]) is None
    assert len(BugBook(path).load()) == 1


def test_different_failures_or_stages_get_their_own_drafts(tmp_path):
    path = tmp_path / "bugs_found.md"
    assert failure_signature("parse", "[F] 21002") != failure_signature("parse", "[F] 26000")
    assert draft_from_failure(path, "parse", "[F] 21002", []) is not None
    assert draft_from_failure(path, "parse", "[F] 26000", []) is not None
    assert draft_from_failure(path, "optimize", "[F] 21002", []) is not None
    assert [r.stage for r in BugBook(path).load()] == ["编译", "编译", "编译"]


def test_closing_a_draft_by_hand_and_rerunning_keeps_everything(tmp_path):
    path = tmp_path / "bugs_found.md"
    rec = draft_from_failure(path, "simulate", "onnxruntime: NaN in logits", [])
    BugBook(path).update(rec.number, status="已解决", cause="fp16 溢出")
    before = path.read_bytes()
    # a later run of the same failing stage, then a successful one: nothing is drafted or removed
    assert draft_from_failure(path, "simulate", "onnxruntime: NaN in logits", []) is None
    assert path.read_bytes() == before


# -- layering -----------------------------------------------------------------------------------

@pytest.mark.parametrize("module", ["tdpu_tui.engine.records.bugbook", "tdpu_tui.bugs_cli"])
def test_bug_book_imports_without_textual_or_rich(module):
    code = (f"import importlib, sys; importlib.import_module({module!r}); "
            "bad = [m for m in ('textual', 'rich') if m in sys.modules]; "
            "print(','.join(bad)); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]


# -- duplicate numbers --------------------------------------------------------------------------

DUPLICATED = (
    "# Phase 3 Bug记录\n\n"
    "## Bug #3: 第一条\n- **发现阶段**: 导出\n- **状态**: 未解决\n\n---\n\n"     # heading: line 3
    "## Bug #4: 其他\n- **状态**: 未解决\n\n---\n\n"                           # line 9
    "## Bug #3: 手工复制的\n- **发现阶段**: 编译\n- **状态**: 未解决\n\n---\n"  # line 14
)


def test_update_of_a_duplicated_number_is_refused_naming_both_lines(tmp_path):
    path = tmp_path / "bugs_found.md"
    path.write_text(DUPLICATED, encoding="utf-8")
    before = path.read_bytes()
    book = BugBook(path)
    book.load()
    with pytest.raises(BugValidationError) as err:
        book.update(3, status="已解决")
    assert err.value.field == "number"
    msg = str(err.value)
    assert "Bug #3" in msg and "lines 3, 14" in msg and str(path) in msg
    assert path.read_bytes() == before
    assert not list(tmp_path.glob(".bugs_found.md.*.tmp"))
    # other records are edited as usual; a form's base does not get around the check either
    assert book.update(4, status="已解决").status == "已解决"
    with pytest.raises(BugValidationError):
        BugBook(path).update(3, base=BugBook(path).load()[0], status="已解决")


def test_a_duplicate_made_on_disk_while_a_book_is_open_is_refused(tmp_path):
    path = tmp_path / "bugs_found.md"
    book = BugBook(path)
    book.add("一", "导出", time="2026-02-16 09:00")
    text = path.read_text(encoding="utf-8")
    path.write_text(text + "\n## Bug #1: 复制\n- **状态**: 未解决\n", encoding="utf-8")
    before = path.read_bytes()
    with pytest.raises(BugValidationError) as err:
        book.update(1, status="已解决")
    assert "Bug #1" in str(err.value) and "lines 3, 13" in str(err.value)  # no marker line above
    assert path.read_bytes() == before
