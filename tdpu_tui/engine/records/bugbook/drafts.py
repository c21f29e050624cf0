"""Bug drafts from failed stages: one rule for both faces and the app's form.

A draft is a record (状态 未解决) built from the failure: the title is the stage and the first
line of its message, the 错误信息 the message and the last lines of the stage's log, with ANSI
colour codes stripped and each line cut at a fixed length. Its failure signature (the stage and
the message with what varies between runs normalised: times, temp names, addresses, pids,
durations) is kept in the record, so a later run failing the same way finds the record instead
of adding another. A later success changes nothing: records are only ever closed by a person.

Usage mistakes are reported, not drafted: a stage run out of order, a missing file the user
named (`core.errors.UsageError`, `StageResult.usage_error`), and a cancel.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

from tdpu_tui.engine.core.events import StageResult, Status
from tdpu_tui.engine.records.bugbook.book import BugBook
from tdpu_tui.engine.records.bugbook.model import TIME_FORMAT, BugRecord, stage_label

DRAFT_TAIL_LINES = 20
DRAFT_LINE_CHARS = 500
DRAFT_TITLE_CHARS = 100

_ANSI_RE = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[@-Z\\-_]")
_TMP_RE = re.compile(
    r"(?:[A-Za-z]:\\Users\\[^\\\s]+\\AppData\\Local\\Temp"
    r"|(?:[A-Za-z]:)?[\\/](?:private[\\/])?(?:var[\\/]folders|var[\\/]tmp|tmp|temp))"
    r"(?:[\\/][^\s'\"\\/:]+)*", re.IGNORECASE)
_VOLATILE = [
    # tdpu's own temp names (`osutil.files.owned_prefix`): .staging-PID.START.HOST.<random>,
    # .validate-…, .validate-step1-…: the owner and the random part vary between runs
    (re.compile(r"(?<![\w.])(\.(?:staging|validate-step1|validate)-)\d+\.\d+\.[A-Za-z0-9_-]+?\."
                r"([A-Za-z0-9_.-]*?)[a-z0-9_]{6,12}(?![a-z0-9_])"), r"\1<owner>.\2<r>"),
    # the other temp names tdpu makes (8 random characters, as `tempfile` draws them): a file
    # being replaced (`osutil.files.atomic_path`: .NAME.<r>.tmp, NAME may hold dots and digits,
    # .bitnet_b1.58_full.raw.k3j4h5ab.tmp) and the RTL harness's folder (tdpu-rtl-<r>)
    (re.compile(r"(?<![\w.])(\.[^\s\\/'\"]+\.)[a-z0-9_]{8}(\.tmp)(?![\w])"), r"\1<r>\2"),
    (re.compile(r"\b(tdpu-rtl-)[a-z0-9_]{8}(?![a-z0-9_])"), r"\1<r>"),
    # a temp directory and the random names under it; the file name itself is kept
    (_TMP_RE, lambda m: "<tmp>/" + re.split(r"[\\/]", m.group(0))[-1]),
    # random parts of temp names: tempfile's tmpab12cd…, .staging-k2j3h4ab/, .book.md.x1y2z3w4.tmp
    (re.compile(r"\btmp[a-z0-9_]{5,}", re.IGNORECASE), "tmp<r>"),
    (re.compile(r"(?<![\w.])(\.[A-Za-z][\w.]*?[-.])[a-z0-9_]{6,12}(?![a-z0-9_])"), r"\1<r>"),
    # dates and times: 2026-02-11 14:30:05.123, [02/11/26 14:30:05.123], 14:30:05
    (re.compile(r"\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}(?::\d{2}(?:[.,]\d+)?)?(?:Z|[+-]\d{2}:?\d{2})?"), "<time>"),
    (re.compile(r"\d{2}/\d{2}/\d{2,4}[ T]\d{2}:\d{2}(?::\d{2}(?:[.,]\d+)?)?"), "<time>"),
    (re.compile(r"\b\d{1,2}:\d{2}:\d{2}(?:[.,]\d+)?\b"), "<time>"),
    # ids: uuids, addresses, hex digests
    (re.compile(r"\b[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}\b"), "<id>"),
    (re.compile(r"\b0x[0-9a-fA-F]+\b"), "<hex>"),
    (re.compile(r"\b(?=[0-9a-fA-F]*[a-fA-F])(?=[0-9a-fA-F]*\d)[0-9a-fA-F]{8,}\b"), "<hex>"),
    (re.compile(r"\b(pid|process|thread)\b[ =:#]*\d+", re.IGNORECASE),
     lambda m: m.group(1).lower() + " <n>"),
    (re.compile(r"\b\d+(?:\.\d+)?\s*(?:ms|s|sec|seconds|秒)\b"), "<duration>"),
]
_PATH_RE = re.compile(r"(?:[A-Za-z]:)?[\w.~<>-]*(?:[\\/][\w.~<>-]+)+")


def strip_ansi(text: str) -> str:
    return _ANSI_RE.sub("", text)


def failure_signature(stage_name: str, message: str) -> str:
    """`stage:hash` of the message with its volatile parts (times, temp names, numbers in paths,
    addresses, ids, pids, durations) normalised, so re-running the same failure gives the same
    value."""
    text = strip_ansi(message)
    for pattern, repl in _VOLATILE:
        text = pattern.sub(repl, text)
    text = _PATH_RE.sub(lambda m: re.sub(r"\d+", "N", m.group(0)), text)
    text = " ".join(text.split())
    digest = hashlib.sha1(f"{stage_name}\n{text}".encode("utf-8", "surrogateescape")).hexdigest()
    return f"{stage_name}:{digest[:12]}"


def _cut(line: str) -> str:
    line = strip_ansi(line).rstrip()
    return line if len(line) <= DRAFT_LINE_CHARS else line[: DRAFT_LINE_CHARS - 1] + "…"


def draft_title(stage_name: str, message: str) -> str:
    first = next((ln.strip() for ln in strip_ansi(message).splitlines() if ln.strip()), "")
    title = f"{stage_name} 失败" + (f": {first}" if first else "")
    return title if len(title) <= DRAFT_TITLE_CHARS else title[: DRAFT_TITLE_CHARS - 1] + "…"


def draft_error(message: str, log_tail: Iterable[str] | str = ()) -> str:
    """错误信息 of a draft: the message, then `日志末尾:` and the log's last lines."""
    tail_lines = log_tail.splitlines() if isinstance(log_tail, str) else [str(x) for x in log_tail]
    tail = [_cut(t) for t in tail_lines][-DRAFT_TAIL_LINES:]
    while tail and not tail[0].strip():
        tail.pop(0)
    text = "\n".join(_cut(ln) for ln in strip_ansi(message).strip().splitlines())
    if any(t.strip() for t in tail):
        text += ("\n\n" if text else "") + "日志末尾:\n" + "\n".join(tail)
    return text.replace("\r\n", "\n").replace("\r", "\n")


def draft_record(stage_name: str, message: str, log_tail: Iterable[str] | str = (), *,
                 bug_stages: Mapping[str, str]) -> BugRecord:
    """The draft of a failed stage (number 0: the book gives it one). `bug_stages` maps stage
    names to 发现阶段 (the registry's `bug_stages()`); an unknown stage raises
    BugValidationError."""
    return BugRecord(0, draft_title(stage_name, message), _dt.datetime.now().strftime(TIME_FORMAT),
                     stage_label(stage_name, bug_stages), draft_error(message, log_tail), "", "",
                     "未解决", [], failure_signature(stage_name, message))


def is_filed(result: StageResult) -> bool:
    """Whether a stage result is a bug to draft: a failure that is not a usage mistake."""
    return result.status is Status.FAILED and not result.usage_error


def record_failure(path: str | Path, stage_name: str, message: str,
                   log_tail: Iterable[str] | str = (), *,
                   bug_stages: Mapping[str, str]) -> tuple[BugRecord, bool]:
    """The record of a failed stage: (drafted record, True), or (the existing record of the same
    failure, False). Both faces call this when a stage fails, so the same failure is recorded
    once and the app can open the record that already exists."""
    rec = draft_record(stage_name, message, log_tail, bug_stages=bug_stages)
    return BugBook(path).add_draft(rec)


def draft_from_failure(path: str | Path, stage_name: str, message: str,
                       log_tail: Iterable[str] | str = (), *,
                       bug_stages: Mapping[str, str]) -> BugRecord | None:
    """Draft a record for a failed stage; None if this failure is already recorded."""
    record, created = record_failure(path, stage_name, message, log_tail, bug_stages=bug_stages)
    return record if created else None
