"""Whatever a record holds, writing it and reading the file back gives the same record."""

import dataclasses
import re
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tdpu_tui.engine.records.bugbook import STAGE_VALUES, STATUS_VALUES, BugBook, BugDocument, BugRecord

# Markdown specials, fences, bullets, headings, HTML comments, colons of both widths, Chinese.
SPECIALS = ["`", "```", "````", "~~~", "*", "**", "_", "#", "## Bug #3: x", "- **状态**: 已解决",
            "---", "<!--", "-->", "<!-- tdpu:signature x -->", "|", ">", "[", "]", ":", "：",
            "\\", "\t", " ", "  ", "\n", "\n\n", "错误", "根本原因", "未解决", "\u3000", "é"]
pieces = st.one_of(st.sampled_from(SPECIALS), st.text(max_size=6))
text = st.lists(pieces, max_size=8).map("".join)
one_line = text.map(lambda s: s.replace("\n", " ").replace("\r", " ").strip()).filter(bool)
extra_key = st.text(alphabet="备注负责人复现 abcXYZ-0123().", min_size=1, max_size=8) \
    .map(str.strip).filter(lambda k: bool(k) and k not in ("状态",))
record = st.fixed_dictionaries({
    "title": one_line,
    "stage": st.sampled_from(STAGE_VALUES),
    "status": st.sampled_from(STATUS_VALUES),
    "error": text,
    "cause": text,
    "fix": text,
    "extra": st.lists(st.tuples(extra_key, text), max_size=2),
})


def kept_lines(data: bytes) -> list[bytes]:
    data = data.removeprefix(b"\xef\xbb\xbf")
    return [ln for ln in re.split(rb"(?<=\n)", data) if ln]


def normalised(s: str) -> str:
    return s.replace("\r\n", "\n").replace("\r", "\n")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(record, min_size=1, max_size=3))
def test_records_survive_write_then_read(records):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bugs_found.md"
        book = BugBook(path)
        written = [book.add(**r, time="2026-02-11 14:30") for r in records]
        for r, w in zip(records, written):
            assert (w.title, w.stage, w.status) == (r["title"], r["stage"], r["status"])
            assert (w.error, w.cause, w.fix) == tuple(normalised(r[k]) for k in ("error", "cause", "fix"))
            assert w.extra == [(k, normalised(v)) for k, v in r["extra"]]
        assert BugBook(path).load() == written
        data = path.read_bytes()
        assert BugDocument.from_bytes(data).to_bytes() == data


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(record, record)
def test_editing_one_record_leaves_the_other_byte_identical(first, second):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bugs_found.md"
        book = BugBook(path)
        a = book.add(**first, time="2026-02-11 14:30")
        book.add(**second, time="2026-02-11 14:31")
        before = path.read_text(encoding="utf-8")
        updated = book.update(a.number, error=second["error"], title=second["title"],
                              extra=second["extra"])
        after = path.read_text(encoding="utf-8")
        assert after[after.index("## Bug #2:"):] == before[before.index("## Bug #2:"):]
        assert BugBook(path).load()[0] == updated
        assert (updated.error, updated.title) == (normalised(second["error"]), second["title"])


# Lines a hand-edited file may hold, in any order and with any line ending.
HAND_LINES = ["# Phase 3 Bug记录", "## Bug #1: a", "## Bug #2：b", "### bug 3", "- **状态**: 未解决",
              "- **状态：** 已解决", "* 错误信息：x", "- **备注**: y", "  continued", "lazy line",
              "---", "```", "  ````", "~~~", "", "\t- nested", "<!-- tdpu:signature s:1 -->",
              "<!-- tdpu:last-bug-number 4 -->", "free text", "- **发现阶段**:"]
hand_document = st.tuples(
    st.booleans(),
    st.lists(st.tuples(st.one_of(st.sampled_from(HAND_LINES), st.text(max_size=8)),
                       st.sampled_from(["\n", "\r\n"])), max_size=25),
    st.booleans(),
).map(lambda t: (b"\xef\xbb\xbf" if t[0] else b"")
      + "".join(a.replace("\n", " ").replace("\r", " ") + e for a, e in t[1]).encode("utf-8")
      + (b"tail without newline" if t[2] else b""))


@settings(max_examples=150, deadline=None)
@given(hand_document)
def test_any_hand_edited_file_reads_and_writes_back_byte_identical(data):
    doc = BugDocument.from_bytes(data)
    assert doc.to_bytes() == data
    assert all(isinstance(r.number, int) for r in doc.records)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(hand_document, st.sampled_from(STATUS_VALUES))
def test_editing_a_hand_edited_file_changes_only_that_record(data, status):
    doc = BugDocument.from_bytes(data)
    if not doc.spans:
        return
    span = doc.spans[0]
    records = doc.records
    before = [t + e for t, e in doc.lines]
    doc.update_record(span.number, {"status": status, "title": "新标题"})
    after = [t + e for t, e in doc.lines]
    expected = [dataclasses.replace(records[0], status=status, title="新标题"), *records[1:]]
    assert doc.records == expected
    # lines before the record and after its chunk are untouched
    assert after[: span.heading] == before[: span.heading]
    tail = len(before) - span.end
    assert (after[len(after) - tail:] if tail else []) == before[span.end:]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(hand_document, record)
def test_appending_to_a_hand_edited_file_keeps_its_records_and_reads_back(data, new):
    doc = BugDocument.from_bytes(data)
    records = doc.records
    rec = BugRecord(doc.max_number + 1, new["title"], "2026-02-11 14:30", new["stage"],
                    normalised(new["error"]), normalised(new["cause"]), normalised(new["fix"]),
                    new["status"], [(k, normalised(v)) for k, v in new["extra"]])
    doc.append_record(rec)
    assert doc.records == [*records, rec]
    # every original line is still there, in place (the last one may gain its line ending)
    original, out = kept_lines(data), kept_lines(doc.to_bytes())
    if original:
        assert out[: len(original) - 1] == original[:-1]
        assert out[len(original) - 1].startswith(original[-1])
    assert BugDocument.from_bytes(doc.to_bytes()).records == [*records, rec]
