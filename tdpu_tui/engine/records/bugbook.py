"""The bug book: `phase3_logs/bugs_found.md` (SPEC §7), read and written without losing a byte.

The file is the user's document. It is kept as a list of lines (text + its own line ending),
and the records are parsed out of it in place: every record remembers which lines hold its
heading and each of its bullets. So
- writing back an unchanged document gives the same bytes (BOM, CRLF/LF mix, tabs, free text);
- an edit replaces only the lines of the edited bullet (or heading), in the bullet's own style;
- a new record is appended after everything else, in the template's shape.

Reading tolerates what hands produce: `:` or `：`, `**key**:` / `**key：**` / `key:`, `-`/`*`/`+`
bullets, fields missing or in any order, unknown bullets (kept in `BugRecord.extra`), wrapped
or indented continuation lines, fenced blocks, records without a trailing `---`.

Multi-line values are written as a fenced block indented under the bullet; the fence is one
backtick longer than the longest backtick run inside (at least three).

Numbers are never reused. A new record gets 1 + the largest of: every number in the file, the
high-water mark kept in a hidden line of the file itself
(`<!-- tdpu:last-bug-number N … -->`, written after the `# …` title by every `add`), and every
number this `BugBook` has seen. The mark lives in the document rather than a sidecar so that
it travels with the file (git, scp); deleting that line by hand gives up the promise for
numbers that were deleted by hand too.

Failure drafts carry their signature as an HTML comment line (`<!-- tdpu:signature S -->`),
invisible when the Markdown is rendered.

Writes: an advisory `fcntl` lock on `.bugs_found.md.lock` beside the file; under it the file
is read again, the change is applied to what is on disk *now* (so edits saved by an editor in
the meantime are kept, record by record), and the result goes to a temporary file in the same
directory, fsync, rename. If the record being updated was changed on disk too, both versions
are kept: the file's stays under its number, ours is appended as a new record with a `冲突`
bullet, and a message says so (`BugBook.messages`). A record deleted on disk while it was being
edited here comes back, with the edit. A writer killed before its rename leaves the file as it
was; its temp file is removed by the next writer.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import datetime as _dt
import hashlib
import os
import re
import textwrap
import threading
from collections.abc import Container, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tdpu_tui.engine.core.errors import TdpuError
from tdpu_tui.engine.osutil.files import FileLock, atomic_path


STAGE_VALUES = ("导出", "编译", "仿真", "替换")
STATUS_VALUES = ("未解决", "已解决", "待验证")
TEMPLATE_HEADER = "# Phase 3 Bug记录\n\n"
TIME_FORMAT = "%Y-%m-%d %H:%M"

# Pipeline stage name -> 发现阶段 (SPEC §1 stages, §7 values).
STAGE_LABELS = {
    "export": "导出",
    "precheck": "编译",
    "parse": "编译",
    "optimize": "编译",
    "simulate": "仿真",
    "replace": "替换",
    "validate": "替换",
}

# Record attribute -> bullet key, in template order.
FIELD_KEYS = {
    "time": "发现时间",
    "stage": "发现阶段",
    "error": "错误信息",
    "cause": "根本原因",
    "fix": "解决方案",
    "status": "状态",
}
_KEY_FIELDS = {v: k for k, v in FIELD_KEYS.items()}
_ORDER = list(FIELD_KEYS)
_EDITABLE = ("title", *_ORDER, "extra")
_BOM = b"\xef\xbb\xbf"
DRAFT_TAIL_LINES = 20
CONFLICT_KEY = "冲突"


class BugValidationError(TdpuError):
    """A value the bug book does not accept; `.field` names the record attribute."""

    def __init__(self, field: str, message: str):
        self.field = field
        self.reason = message
        label = FIELD_KEYS.get(field)
        super().__init__(f"{label} ({field}): {message}" if label else f"{field}: {message}")


@dataclass
class BugRecord:
    number: int
    title: str
    time: str = ""
    stage: str = ""
    error: str = ""
    cause: str = ""
    fix: str = ""
    status: str = ""
    extra: list[tuple[str, str]] = field(default_factory=list)
    # Failure signature of a draft (see draft_from_failure); "" for records written by hand.
    signature: str = ""

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["extra"] = [list(kv) for kv in self.extra]
        return d


def _content(r: BugRecord) -> tuple:
    """What a person edits in a record (not its number, not the draft signature)."""
    return (r.title, r.time, r.stage, r.error, r.cause, r.fix, r.status,
            tuple(tuple(kv) for kv in r.extra))


# ---------------------------------------------------------------------------------------------
# Validation

def stage_label(stage_name: str) -> str:
    """发现阶段 for a pipeline stage name (`export` -> 导出); a §7 value is returned as is."""
    if stage_name in STAGE_VALUES:
        return stage_name
    try:
        return STAGE_LABELS[stage_name]
    except KeyError:
        known = ", ".join([*STAGE_LABELS, *STAGE_VALUES])
        raise BugValidationError("stage", f"expected a stage name ({known}), found {stage_name!r}") from None


def _stage_aliases() -> str:
    by_label: dict[str, list[str]] = {}
    for name, label in STAGE_LABELS.items():
        by_label.setdefault(label, []).append(name)
    return ", ".join(f"{'/'.join(names)} → {label}" for label, names in by_label.items())


def parse_stage(value: Any) -> str:
    """发现阶段 for a value typed on the command line: a §7 value (导出 …) or a pipeline stage
    name in any case (`export` -> 导出, as `stage_label`). The records hold the §7 value only;
    an unknown value raises BugValidationError listing both forms."""
    if isinstance(value, str):
        v = value.strip()
        if v in STAGE_VALUES:
            return v
        if v.lower() in STAGE_LABELS:
            return STAGE_LABELS[v.lower()]
    raise BugValidationError("stage", f"expected one of {', '.join(STAGE_VALUES)}, or a pipeline "
                                      f"stage name ({_stage_aliases()}); found {value!r}")


def _choice(field_name: str, value: Any, allowed: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value.strip() not in allowed:
        raise BugValidationError(field_name, f"expected one of {', '.join(allowed)}; found {value!r}")
    return value.strip()


def _text(field_name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise BugValidationError(field_name, f"expected text, found {type(value).__name__} {value!r}")
    return value.replace("\r\n", "\n").replace("\r", "\n")


def _title(value: Any) -> str:
    value = _text("title", value)
    if "\n" in value:
        raise BugValidationError("title", f"expected one line, found {value!r}")
    value = value.strip()
    if not value:
        raise BugValidationError("title", "expected a title, found an empty one")
    return value


def _when(value: Any) -> str:
    if value is None:
        return _dt.datetime.now().strftime(TIME_FORMAT)
    if isinstance(value, _dt.datetime):
        return value.strftime(TIME_FORMAT)
    if isinstance(value, str):
        v = value.strip()
        with contextlib.suppress(ValueError):
            if _dt.datetime.strptime(v, TIME_FORMAT).strftime(TIME_FORMAT) == v:
                return v
    raise BugValidationError("time", f"expected YYYY-MM-DD HH:MM, found {value!r}")


def _extra(value: Any) -> list[tuple[str, str]]:
    if value is None:
        return []
    out = []
    for item in value:
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            raise BugValidationError("extra", f"expected (key, value) pairs, found {item!r}")
        key, val = item
        if (not isinstance(key, str) or not key.strip() or key != key.strip()
                or re.search(r"[\n\r:：*`]", key) or key[0] in "_#[" or key[-1] == "_"):
            raise BugValidationError(
                "extra", f"expected a one-line key without ':', '*', '`' or edge '_', found {key!r}")
        if key in _KEY_FIELDS:
            raise BugValidationError("extra", f"{key!r} is a field of its own, not an extra bullet")
        out.append((key, _text("extra", val)))
    return out


def _changed_value(base: BugRecord, field_name: str, value: Any) -> Any:
    """The validated new value; a value equal to the current one passes as is, so a form that
    sends every field back does not trip over a hand-written 发现时间 or a template placeholder."""
    current = getattr(base, field_name)
    if field_name == "extra":
        if value is not None and [tuple(kv) for kv in value] == current:
            return current
    elif isinstance(value, str):
        text = value.replace("\r\n", "\n").replace("\r", "\n")
        if text == current or (field_name in ("title", "time", "stage", "status")
                               and text.strip() == current):
            return current
    return _validate(field_name, value)


def _validate(field_name: str, value: Any) -> Any:
    if field_name == "title":
        return _title(value)
    if field_name == "time":
        return _when(value)
    if field_name == "stage":
        return _choice("stage", value, STAGE_VALUES)
    if field_name == "status":
        return _choice("status", value, STATUS_VALUES)
    if field_name == "extra":
        return _extra(value)
    return _text(field_name, value)


def field_problems(values: dict[str, Any], base: BugRecord | None = None) -> dict[str, str]:
    """Field -> what is wrong with its value, by the rules `add` (no `base`) and `update`
    (`base`: the record edited; a value it already holds passes) apply. The form lists them all."""
    problems = {}
    for name, value in values.items():
        try:
            if base is None:
                _validate(name, value)
            else:
                _changed_value(base, name, value)
        except BugValidationError as exc:
            problems[name] = exc.reason
    return problems


# ---------------------------------------------------------------------------------------------
# Codec

_HEADING_RE = re.compile(
    r"^ {0,3}#{1,6}[ \t]+bug[ \t]*#?[ \t]*(?P<num>\d+)"
    r"(?:[ \t]*[:：.\-–—][ \t]*|[ \t]+|[ \t]*$)(?P<title>.*?)[ \t]*$",
    re.IGNORECASE,
)
_FIELD_RE = re.compile(
    r"^(?P<indent>[ \t]*)[-*+][ \t]+(?P<b1>\*\*|__)?(?P<key>[^\s:：*_][^:：\n]*?)[ \t]*"
    r"(?P<b2>\*\*|__)?[ \t]*[:：][ \t]*(?P<b3>(?:\*\*|__)[ \t]*)?(?P<value>.*?)[ \t]*$"
)
_BULLET_RE = re.compile(r"^[ \t]*[-*+][ \t]")
_BREAK_RE = re.compile(r"^ {0,3}([-*_])[ \t]*(?:\1[ \t]*){2,}$")
_FENCE_OPEN_RE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})(?P<info>.*)$")
_SIGNATURE_RE = re.compile(r"^[ \t]*<!--[ \t]*tdpu:signature[ \t]+(?P<sig>\S+)[ \t]*-->[ \t]*$")
_MARK_RE = re.compile(r"^[ \t]*<!--[ \t]*tdpu:last-bug-number[ \t]+(?P<n>\d+)\b.*-->[ \t]*$")
_MARK_TEXT = "<!-- tdpu:last-bug-number {n} (已用过的最大 Bug 编号；编号不重复使用，请保留此行) -->"

Line = tuple[str, str]  # (text, line ending: "\n", "\r\n" or "" for an unterminated last line)


def _split_lines(text: str) -> list[Line]:
    parts = text.split("\n")
    lines: list[Line] = []
    for part in parts[:-1]:
        lines.append((part[:-1], "\r\n") if part.endswith("\r") else (part, "\n"))
    if parts[-1]:
        lines.append((parts[-1], ""))
    return lines


def _width(ws: str) -> int:
    col = 0
    for ch in ws:
        col = col + 4 - col % 4 if ch == "\t" else col + 1
    return col


def _leading(text: str) -> str:
    return text[: len(text) - len(text.lstrip(" \t"))]


def _find_fences(texts: list[str]) -> dict[int, int]:
    """Opening line -> closing line of each fenced block.

    A fence left open by hand is plain text, and no fence runs past a record heading at the
    start of a line: a stray fence must not swallow the records after it (tdpu's own fences
    are indented under their bullet).
    """
    fences: dict[int, int] = {}
    i, n = 0, len(texts)
    while i < n:
        m = _FENCE_OPEN_RE.match(texts[i])
        if m and not (m["fence"][0] == "`" and "`" in m["info"]):
            closer = re.compile(rf"^[ \t]*{re.escape(m['fence'][0])}{{{len(m['fence'])},}}[ \t]*$")
            for j in range(i + 1, n):
                if texts[j].startswith("#") and _HEADING_RE.match(texts[j]):
                    break
                if closer.match(texts[j]):
                    fences[i] = j
                    i = j
                    break
        i += 1
    return fences


@dataclass
class _Field:
    key: str
    start: int          # the bullet line
    end: int            # one past the field's last line (trailing blank lines excluded)
    indent: str
    prefix: str         # the bullet line up to the value, e.g. "- **状态**:"
    sep: str            # what separated prefix and value ("" after "状态：" in some hands)
    inline: str
    value: str = ""


@dataclass
class _Span:
    number: int
    heading: int
    end: int            # one past the chunk (next heading or end of file)
    title: str
    title_prefix: str
    fields: list[_Field]
    signature: str
    has_break: bool     # a `---` follows the record's bullets
    body_end: int = 0   # one past the last non-blank line before the `---` (or the chunk end)

    def first(self, key: str) -> _Field | None:
        return next((f for f in self.fields if f.key == key), None)

    def record(self) -> BugRecord:
        rec = BugRecord(self.number, self.title, signature=self.signature)
        seen: set[str] = set()
        for f in self.fields:
            attr = _KEY_FIELDS.get(f.key)
            if attr is not None and attr not in seen:
                seen.add(attr)
                setattr(rec, attr, f.value)
            else:
                rec.extra.append((f.key, f.value))
        return rec

    def extra_fields(self) -> list[_Field]:
        seen: set[str] = set()
        out = []
        for f in self.fields:
            if f.key in _KEY_FIELDS and f.key not in seen:
                seen.add(f.key)
            else:
                out.append(f)
        return out


def _fence_for(lines: list[str]) -> str:
    longest = max((len(run) for line in lines for run in re.findall(r"`+", line)), default=0)
    return "`" * max(3, longest + 1)


def _render_field(prefix: str, value: str, indent: str, sep: str = " ") -> list[str]:
    """The lines of one bullet. One-line values stay inline; others become an indented fence."""
    if "\n" not in value and value == value.strip():
        return [f"{prefix}{sep}{value}" if value else prefix]
    body = value.split("\n")
    inner = indent + "  "
    fence = _fence_for(body)
    return [prefix, inner + fence, *[inner + line if line else "" for line in body], inner + fence]


def _render_record(rec: BugRecord) -> list[str]:
    out = [f"## Bug #{rec.number}: {rec.title}"]
    for attr in _ORDER:
        out += _render_field(f"- **{FIELD_KEYS[attr]}**:", getattr(rec, attr), "")
    for key, value in rec.extra:
        out += _render_field(f"- **{key}**:", value, "")
    if rec.signature:
        out.append(f"<!-- tdpu:signature {rec.signature} -->")
    return out


class BugDocument:
    """The file as lines plus the records found in them. Mutations re-parse."""

    def __init__(self, text: str, bom: bool = False):
        self.bom = bom
        self.lines: list[Line] = _split_lines(text)
        self._parse()

    @classmethod
    def from_bytes(cls, data: bytes) -> BugDocument:
        bom = data.startswith(_BOM)
        # surrogateescape: bytes that are not UTF-8 survive the round trip untouched.
        return cls(data[len(_BOM) if bom else 0:].decode("utf-8", "surrogateescape"), bom)

    def text(self) -> str:
        return "".join(t + e for t, e in self.lines)

    def to_bytes(self) -> bytes:
        return (_BOM if self.bom else b"") + self.text().encode("utf-8", "surrogateescape")

    @property
    def records(self) -> list[BugRecord]:
        return [s.record() for s in self.spans]

    def record(self, number: int) -> BugRecord | None:
        span = self.span(number)
        return span.record() if span else None

    def span(self, number: int) -> _Span | None:
        """The first record numbered `number` (a hand-copied record may repeat a number)."""
        return next((s for s in self.spans if s.number == number), None)

    @property
    def max_number(self) -> int:
        return max((s.number for s in self.spans), default=0)

    # -- parsing ------------------------------------------------------------------------------

    def _parse(self) -> None:
        texts = [t for t, _ in self.lines]
        crlf = sum(1 for _, e in self.lines if e == "\r\n")
        self.eol = "\r\n" if crlf * 2 > len(self.lines) else "\n"
        self.fences = _find_fences(texts)
        self.in_fence: set[int] = set()
        in_fence = self.in_fence
        for o, c in self.fences.items():
            in_fence.update(range(o, c + 1))
        heads = [i for i, t in enumerate(texts) if i not in in_fence and _HEADING_RE.match(t)]
        self.spans = [self._parse_record(texts, h, nxt)
                      for h, nxt in zip(heads, [*heads[1:], len(texts)])]
        self.high_water = 0
        self.mark_line: int | None = None
        for i, t in enumerate(texts):
            m = None if i in in_fence else _MARK_RE.match(t)
            if m:
                self.high_water = max(self.high_water, int(m["n"]))
                if self.mark_line is None:
                    self.mark_line = i
        self.first_heading = heads[0] if heads else len(texts)

    def _parse_record(self, texts: list[str], h: int, end: int) -> _Span:
        m = _HEADING_RE.match(texts[h])
        span = _Span(int(m["num"]), h, end, m["title"], texts[h][: m.start("title")], [], "", False,
                     h + 1)
        cur: _Field | None = None
        blank = False
        i = h + 1
        while i < end:
            t = texts[i]
            if t.strip() and not _BREAK_RE.match(t):
                # Bullets added to a record without any go here: below its notes, where they
                # cannot become the continuation of anything.
                span.body_end = (self.fences.get(i, i)) + 1
            if i in self.fences:
                close = self.fences[i]
                if cur is not None and (not blank or _width(_leading(t)) >= _width(cur.indent) + 2):
                    cur.end = close + 1
                else:
                    cur = None
                i, blank = close + 1, False
                continue
            if not t.strip():
                blank, i = True, i + 1
                continue
            if _BREAK_RE.match(t):
                span.has_break = True
                break
            fm = _FIELD_RE.match(t)
            depth = _width(_leading(t))
            if fm and depth <= 3 and (cur is None or depth < _width(cur.indent) + 2):
                valid_b3 = fm["b3"] is not None and fm["b1"] is not None and fm["b2"] is None
                vstart = fm.start("value") if fm["b3"] is None or valid_b3 else fm.start("b3")
                prefix = t[:vstart].rstrip(" \t")
                inline = t[vstart: fm.end("value")]
                sep = t[len(prefix):vstart] if inline else ("" if prefix.endswith("：") else " ")
                cur = _Field(fm["key"].strip(), i, i + 1, fm["indent"], prefix, sep, inline)
                span.fields.append(cur)
            elif m_sig := _SIGNATURE_RE.match(t):
                span.signature = span.signature or m_sig["sig"]
                cur = None
            elif cur is not None and (depth >= _width(cur.indent) + 2
                                      or not (blank or _BULLET_RE.match(t) or t.lstrip().startswith("<!--"))):
                cur.end = i + 1
            else:
                cur = None
            blank = False
            i += 1
        for f in span.fields:
            f.value = self._field_value(texts, f)
        return span

    def _field_value(self, texts: list[str], f: _Field) -> str:
        parts = [f.inline] if f.inline else []
        block: list[str] = []

        def flush() -> None:
            lines = textwrap.dedent("\n".join(block)).split("\n") if block else []
            while lines and not lines[0].strip():
                lines.pop(0)
            while lines and not lines[-1].strip():
                lines.pop()
            if lines:
                parts.append("\n".join(lines))
            block.clear()

        i = f.start + 1
        while i < f.end:
            if i in self.fences:
                flush()
                ind = _leading(texts[i])
                body = []
                for t in texts[i + 1: self.fences[i]]:
                    lead = _leading(t)
                    body.append(t[len(ind):] if t.startswith(ind) else t[min(len(lead), len(ind)):])
                parts.append("\n".join(body))
                i = self.fences[i] + 1
            else:
                block.append(texts[i])
                i += 1
        flush()
        return "\n".join(parts)

    # -- editing ------------------------------------------------------------------------------

    def _eol_at(self, i: int) -> str:
        return self.lines[i][1] if 0 <= i < len(self.lines) and self.lines[i][1] else self.eol

    def _apply(self, edits: list[tuple[int, int, list[str]]]) -> None:
        """Replace line ranges (start, end) by new texts; later edits first so indices hold."""
        lines = list(self.lines)
        for seq, (start, end, texts) in sorted(enumerate(edits), key=lambda e: (e[1][0], e[0]),
                                               reverse=True):
            eol = self._eol_at(start if start < end else start - 1)
            last_eol = lines[end - 1][1] if end > start else eol
            if start == end and start == len(lines) and lines and not lines[-1][1]:
                lines[-1] = (lines[-1][0], self.eol)
                last_eol = ""
            new = [(t, eol) for t in texts]
            if new:
                new[-1] = (new[-1][0], last_eol)
            lines[start:end] = new
        self.lines = lines
        self._parse()

    def update_record(self, number: int, changes: dict[str, Any]) -> None:
        """Rewrite only the heading/bullets whose value changes, in the bullet's own style."""
        span = self.span(number)
        if span is None:
            raise KeyError(number)
        current = span.record()
        edits: list[tuple[int, int, list[str]]] = []
        if "title" in changes and changes["title"] != current.title:
            prefix = span.title_prefix
            if not re.search(r"[:：.\-–—][ \t]*$", prefix):
                prefix = prefix.rstrip() + ": "
            edits.append((span.heading, span.heading + 1, [prefix + changes["title"]]))
        for idx, attr in enumerate(_ORDER):
            if attr not in changes or changes[attr] == getattr(current, attr):
                continue
            key = FIELD_KEYS[attr]
            f = span.first(key)
            if f is not None:
                edits.append((f.start, f.end, _render_field(f.prefix, changes[attr], f.indent, f.sep)))
                continue
            before = [g.end for g in span.fields if _KEY_FIELDS.get(g.key) in _ORDER[:idx]]
            pos = max(before) if before else (span.fields[0].start if span.fields else span.body_end)
            edits.append((pos, pos, _render_field(f"- **{key}**:", changes[attr], "")))
        if "extra" in changes and list(changes["extra"]) != current.extra:
            old = span.extra_fields()
            remaining = list(changes["extra"])
            for f in old:
                match = next((kv for kv in remaining if kv[0] == f.key), None)
                if match is None:
                    edits.append((f.start, f.end, []))
                    continue
                remaining.remove(match)
                if match[1] != f.value:
                    edits.append((f.start, f.end, _render_field(f.prefix, match[1], f.indent, f.sep)))
            pos = max((g.end for g in span.fields), default=span.body_end)
            for key, value in remaining:
                edits.append((pos, pos, _render_field(f"- **{key}**:", value, "")))
        if edits:
            self._apply(edits)

    def append_record(self, rec: BugRecord) -> None:
        """Append after everything else, separated by `---` as in the template."""
        texts: list[str] = []
        last = self.lines[-1][0] if self.lines else ""
        if self.spans and not self.spans[-1].has_break:
            if last.strip():
                texts.append("")
            texts.append("---")
            last = "---"
        if last.strip():
            texts.append("")
        texts += [*_render_record(rec), "", "---"]
        n = len(self.lines)
        self._apply([(n, n, texts)])
        if self.lines and not self.lines[-1][1]:
            self.lines[-1] = (self.lines[-1][0], self.eol)

    def set_high_water(self, number: int) -> None:
        if self.mark_line is not None:
            text = self.lines[self.mark_line][0]
            m = _MARK_RE.match(text)
            new = text[: m.start("n")] + str(number) + text[m.end("n"):]
            self._apply([(self.mark_line, self.mark_line + 1, [new])])
            return
        pos = 0
        for i in range(self.first_heading):
            if self.lines[i][0].startswith("# ") and i not in self.in_fence:
                pos = i + 1
                break
        self._apply([(pos, pos, [_MARK_TEXT.format(n=number)])])


def parse_bugs(data: bytes | str) -> list[BugRecord]:
    """The records of a bug file's contents."""
    doc = BugDocument.from_bytes(data) if isinstance(data, bytes) else BugDocument(data)
    return doc.records


# ---------------------------------------------------------------------------------------------
# The book: load, lock, merge, write

@dataclass
class _Txn:
    doc: BugDocument
    messages: list[str] = field(default_factory=list)


def _diff_messages(old: list[BugRecord], new: list[BugRecord], where: str,
                   own: Container[str] = ()) -> list[str]:
    before = {r.number: r for r in reversed(old)}
    after = {r.number: r for r in reversed(new)}
    msgs = []
    for n, r in after.items():
        if n not in before:
            if r.signature and r.signature in own:
                continue
            msgs.append(f"Bug #{n} ({r.title}) was added to {where} outside this session")
        elif _content(r) != _content(before[n]):
            msgs.append(f"Bug #{n} was changed in {where} outside this session; kept that version")
    for n in before:
        if n not in after:
            msgs.append(f"Bug #{n} was removed from {where} outside this session "
                        f"(its number will not be reused)")
    return msgs


class BugBook:
    """`phase3_logs/bugs_found.md` for one session (the app, one CLI call, one failed stage).

    Every `add`/`update` is applied to the file as it is on disk at that moment, under the lock,
    and written at once; `records` is what was last read or written.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.messages: list[str] = []
        self._doc: BugDocument | None = None
        self._loaded = False
        self._stamp: tuple[int, int, int] | None = None
        self._digest: str | None = None
        self._seen = 0
        self._mutex = threading.Lock()
        # Failure signatures this session drafted through another BugBook (the app drafts from
        # its run thread): those records are not reported as added outside this session.
        self.own_signatures: set[str] = set()

    @property
    def lock_path(self) -> Path:
        target = self._target
        return target.with_name(f".{target.name}.lock")

    @property
    def _target(self) -> Path:
        # Write through a symlink to the real file instead of replacing the link.
        return Path(os.path.realpath(self.path))

    # -- reading ------------------------------------------------------------------------------

    def _read(self) -> tuple[BugDocument | None, tuple[int, int, int] | None, str | None]:
        try:
            with open(self.path, "rb") as fh:
                st = os.fstat(fh.fileno())
                data = fh.read()
        except FileNotFoundError:
            return None, None, None
        stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
        return BugDocument.from_bytes(data), stamp, hashlib.sha256(data).hexdigest()

    def _adopt(self, doc: BugDocument | None, stamp: Any, digest: str | None) -> None:
        self._doc, self._stamp, self._digest, self._loaded = doc, stamp, digest, True
        if doc is not None:
            self._seen = max(self._seen, doc.max_number, doc.high_water)

    def load(self) -> list[BugRecord]:
        self._adopt(*self._read())
        return self.records

    @property
    def records(self) -> list[BugRecord]:
        if not self._loaded:
            self.load()
        return copy.deepcopy(self._doc.records) if self._doc is not None else []

    def get(self, number: int) -> BugRecord | None:
        return next((r for r in self.records if r.number == number), None)

    def changed_on_disk(self) -> bool:
        """True when the file differs from what this book last read or wrote."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return self._digest is not None
        if self._stamp is not None and (st.st_ino, st.st_size, st.st_mtime_ns) == self._stamp:
            return False
        _, stamp, digest = self._read()
        if digest == self._digest:
            self._stamp = stamp  # touched or rewritten with the same bytes
        return digest != self._digest

    def reload(self) -> list[str]:
        """Read the file again; messages say which records changed outside this session."""
        old = self._doc.records if self._doc is not None else []
        doc, stamp, digest = self._read()
        changed = digest != self._digest
        self._adopt(doc, stamp, digest)
        if not changed:
            return []
        msgs = _diff_messages(old, doc.records if doc else [], self.path.name, self.own_signatures)
        if not msgs and not self._only_own_drafts(old, doc):
            msgs = [f"{self.path.name} was edited outside this session (no bug record changed)"]
        self.messages.extend(msgs)
        return msgs

    def _only_own_drafts(self, old: list[BugRecord], doc: BugDocument | None) -> bool:
        """True when the only difference is records this session drafted (nothing to report)."""
        numbers = {r.number for r in old}
        added = [r for r in (doc.records if doc else []) if r.number not in numbers]
        return bool(added) and all(r.signature in self.own_signatures for r in added)

    # -- writing ------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[_Txn]:
        with self._mutex, FileLock(self.lock_path):
            doc, stamp, digest = self._read()
            if not self._loaded:
                self._adopt(doc, stamp, digest)
            merged: list[str] = []
            if digest != self._digest:
                old = self._doc.records if self._doc is not None else []
                merged = _diff_messages(old, doc.records if doc else [], self.path.name,
                                        self.own_signatures)
            original = doc.to_bytes() if doc is not None else None
            if doc is None or not original:
                doc = BugDocument(TEMPLATE_HEADER)
            txn = _Txn(doc)
            yield txn
            data = txn.doc.to_bytes()
            if data != original:
                stamp, digest = self._write(data)
            self._adopt(txn.doc, stamp, digest)
            self.messages.extend(merged + txn.messages)

    def _write(self, data: bytes) -> tuple[tuple[int, int, int], str]:
        target = self._target
        # Only writers holding the lock create temp files, so any left over are from a crash.
        for orphan in target.parent.glob(f".{target.name}.*.tmp"):
            with contextlib.suppress(OSError):
                orphan.unlink()
        # atomic_path keeps the replaced file's mode; a new book gets 0o666 minus the umask.
        with atomic_path(target) as tmp:
            with open(tmp, "wb") as fh:
                fh.write(data)
        st = os.stat(target)
        return (st.st_ino, st.st_size, st.st_mtime_ns), hashlib.sha256(data).hexdigest()

    def _next_number(self, doc: BugDocument) -> int:
        n = max(doc.max_number, doc.high_water, self._seen) + 1
        self._seen = n
        return n

    def _append(self, doc: BugDocument, rec: BugRecord) -> BugRecord:
        rec.number = self._next_number(doc)
        doc.append_record(rec)
        doc.set_high_water(rec.number)
        return doc.spans[-1].record()

    def add(self, title: str, stage: str, error: str = "", cause: str = "", fix: str = "",
            status: str = "未解决", time: str | _dt.datetime | None = None, *,
            extra: Iterable[tuple[str, str]] | None = None) -> BugRecord:
        """Append a record with a fresh number and write the file. Returns it as written."""
        rec = BugRecord(0, _title(title), _when(time or None), _validate("stage", stage),
                        _text("error", error or ""), _text("cause", cause or ""),
                        _text("fix", fix or ""), _validate("status", status), _extra(extra))
        with self._transaction() as txn:
            return self._append(txn.doc, rec)

    def update(self, number: int, *, base: BugRecord | None = None, **fields: Any) -> BugRecord:
        """Change fields of record `number` (None means "leave as is") and write the file.

        `base` is the record as the editor showed it (a form opened a while ago); by default,
        the record as this book last read it. If the file's record was changed since then in
        other fields only, both changes are kept in it. If the same field was changed in both,
        both versions are kept: the file's stays, ours is appended under a new number
        (returned) with a `冲突` bullet, and `messages` says so.

        A number held by two records in the file (a record copied by hand) is refused with
        BugValidationError naming the lines of each; nothing is written.
        """
        unknown = sorted(set(fields) - set(_EDITABLE))
        if unknown:
            raise BugValidationError(unknown[0], f"not an editable field (editable: {', '.join(_EDITABLE)})")
        with self._transaction() as txn:
            doc = txn.doc
            same = [sp for sp in doc.spans if sp.number == number]
            if len(same) > 1:
                # A hand-copied record: which one is meant cannot be told, so neither is touched.
                lines = ", ".join(str(sp.heading + 1) for sp in same)
                raise BugValidationError(
                    "number", f"Bug #{number} appears {len(same)} times in {self.path} (lines "
                              f"{lines}); give all but one of them a new number by hand, then "
                              f"try again")
            if base is None and self._doc is not None:
                base = self._doc.record(number)
            theirs = doc.record(number)
            if base is None and theirs is None:
                raise BugValidationError("number", f"no Bug #{number} in {self.path}")
            base = base or theirs
            changes = {k: _changed_value(base, k, v) for k, v in fields.items() if v is not None}
            ours = dataclasses.replace(base, **changes)
            if theirs is not None and _content(theirs) == _content(base):
                doc.update_record(number, changes)
                return doc.record(number)
            if theirs is not None and _content(theirs) == _content(ours):
                return theirs
            name = self.path.name
            mine = {k: v for k, v in changes.items() if v != getattr(base, k)}
            if theirs is not None and all(getattr(theirs, k) == getattr(base, k) for k in mine):
                doc.update_record(number, mine)
                txn.messages.append(f"Bug #{number} was also changed in {name} meanwhile, in other "
                                    f"fields: kept both changes")
                return doc.record(number)
            if theirs is None:
                doc.append_record(ours)
                txn.messages.append(f"Bug #{number} was removed from {name} while it was being "
                                    f"edited here; restored it with the edit")
                return doc.spans[-1].record()
            note = (f"与 Bug #{number} 同时被修改：文件中的版本保留为 Bug #{number}，"
                    f"这是在 tdpu 中编辑的版本")
            ours.extra = [*ours.extra, (CONFLICT_KEY, note)]
            ours.signature = ""
            saved = self._append(doc, ours)
            txn.messages.append(
                f"Bug #{number} was changed in {name} and here at the same time: kept the file's "
                f"version as Bug #{number} and saved this edit as Bug #{saved.number}")
            return saved

    def draft(self, stage_name: str, message: str, log_tail: Iterable[str] | str = ()) -> BugRecord | None:
        """Record a failed stage unless a record with the same failure signature exists."""
        label = stage_label(stage_name)
        signature = failure_signature(stage_name, message)
        first = next((ln.strip() for ln in _strip_ansi(message).splitlines() if ln.strip()), "")
        title = f"{stage_name} 失败" + (f": {first}" if first else "")
        if len(title) > 100:
            title = title[:99] + "…"
        rec = BugRecord(0, title, _when(None), label, _draft_error(message, log_tail), "", "",
                        "未解决", [], signature)
        with self._transaction() as txn:
            if any(s.signature == signature for s in txn.doc.spans):
                return None
            return self._append(txn.doc, rec)


# ---------------------------------------------------------------------------------------------
# Drafts from failed stages

_ANSI_RE = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")
_TMP_RE = re.compile(
    r"(?:[A-Za-z]:\\Users\\[^\\\s]+\\AppData\\Local\\Temp"
    r"|(?:[A-Za-z]:)?[\\/](?:private[\\/])?(?:var[\\/]folders|var[\\/]tmp|tmp|temp))"
    r"(?:[\\/][^\s'\"\\/:]+)*", re.IGNORECASE)
_VOLATILE = [
    # a temp directory and the random names under it; the file name itself is kept
    (_TMP_RE, lambda m: "<tmp>/" + re.split(r"[\\/]", m.group(0))[-1]),
    # dates and times: 2026-02-11 14:30:05.123, [02/11/26 14:30:05.123], 14:30:05
    (re.compile(r"\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}(?::\d{2}(?:[.,]\d+)?)?(?:Z|[+-]\d{2}:?\d{2})?"), "<time>"),
    (re.compile(r"\d{2}/\d{2}/\d{2,4}[ T]\d{2}:\d{2}(?::\d{2}(?:[.,]\d+)?)?"), "<time>"),
    (re.compile(r"\b\d{1,2}:\d{2}:\d{2}(?:[.,]\d+)?\b"), "<time>"),
    (re.compile(r"\b0x[0-9a-fA-F]+\b"), "<hex>"),
    (re.compile(r"\b(pid|PID|process)[ =:]*\d+"), r"\1 <n>"),
    (re.compile(r"\b\d+(?:\.\d+)?\s*(?:ms|s|sec|seconds|秒)\b"), "<duration>"),
]
_PATH_RE = re.compile(r"(?:[A-Za-z]:)?[\w.~<>-]*(?:[\\/][\w.~<>-]+)+")


def _strip_ansi(text: str) -> str:
    return _ANSI_RE.sub("", text)


def failure_signature(stage_name: str, message: str) -> str:
    """`stage:hash` of the message with its volatile parts (times, temp paths, numbers in paths,
    addresses, pids, durations) normalised, so re-running the same failure gives the same value."""
    text = _strip_ansi(message)
    for pattern, repl in _VOLATILE:
        text = pattern.sub(repl, text)
    text = _PATH_RE.sub(lambda m: re.sub(r"\d+", "N", m.group(0)), text)
    text = " ".join(text.split())
    digest = hashlib.sha1(f"{stage_name}\n{text}".encode("utf-8", "surrogateescape")).hexdigest()
    return f"{stage_name}:{digest[:12]}"


def _draft_error(message: str, log_tail: Iterable[str] | str) -> str:
    tail_lines = log_tail.splitlines() if isinstance(log_tail, str) else [str(x) for x in log_tail]
    tail = [_strip_ansi(t).rstrip()[:500] for t in tail_lines][-DRAFT_TAIL_LINES:]
    while tail and not tail[0].strip():
        tail.pop(0)
    text = _strip_ansi(message).strip()
    if any(t.strip() for t in tail):
        text += ("\n\n" if text else "") + "日志末尾:\n" + "\n".join(tail)
    return text.replace("\r\n", "\n").replace("\r", "\n")


def draft_from_failure(path: str | Path, stage_name: str, message: str,
                       log_tail: Iterable[str] | str = ()) -> BugRecord | None:
    """Draft a record (状态 未解决) for a failed stage; None if this failure is already recorded.

    The failure's signature (`failure_signature`) is stored in the record as an HTML comment.
    A later success changes nothing: records are only ever closed by a person.
    """
    return BugBook(path).draft(stage_name, message, log_tail)


def record_failure(path: str | Path, stage_name: str, message: str,
                   log_tail: Iterable[str] | str = ()) -> tuple[BugRecord | None, bool]:
    """The record of a failed stage: (drafted record, True), or (the existing record, False).

    Both faces call this when a stage fails, so the same failure is recorded once and the app
    can open the record that already exists.
    """
    book = BugBook(path)
    record = book.draft(stage_name, message, log_tail)
    if record is not None:
        return record, True
    signature = failure_signature(stage_name, message)
    existing = next((r for r in book.load() if r.signature == signature), None)
    return existing, False
