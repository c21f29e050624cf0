"""The bug file as text: parsed in place and written back keeping every byte not edited.

The file is kept as a list of lines (text + its own line ending), and the records are parsed
out of it in place: every record remembers which lines hold its heading and each of its
bullets. So
- writing back an unchanged document gives the same bytes (BOM, CRLF/LF mix, tabs, free text);
- an edit replaces only the lines of the edited bullet (or heading), in the bullet's own style;
- a new record is appended after everything else, in the template's shape.

Reading tolerates what hands produce: `:` or `：`, `**key**:` / `**key：**` / `key:`, `-`/`*`/`+`
bullets, fields missing or in any order, unknown bullets (kept in `BugRecord.extra`), wrapped
or indented continuation lines, fenced blocks, records without a trailing `---`.

A fenced block at the left margin (or indented up to 3 columns outside a list item) is text
whatever it holds (a `## Bug #7` in it is not a record). A fence indented under a bullet ends where that bullet's list item ends, at the next
record heading at the margin, so a fence left open by hand cannot swallow the records after it;
and no fence indented under a bullet closes one opened at the margin (tdpu's own fences are
indented). For 发现时间, 发现阶段 and 状态, whose value is one line, lines nested under the bullet
are notes: an edit of the value leaves them as they are.

Multi-line values are written as a fenced block indented under the bullet; the fence is one
backtick longer than the longest backtick run inside (at least three). Failure drafts carry
their signature as an HTML comment line inside the record (`<!-- tdpu:signature S -->`).

Older versions of tdpu kept the last number used in a comment line of the preamble
(`<!-- tdpu:last-bug-number N … -->`); it is still read, and the book removes it on its next
write (the number now lives beside the file, see `book`).
"""

from __future__ import annotations

import re
import textwrap
from dataclasses import dataclass
from typing import Any

from tdpu_tui.engine.records.bugbook.model import (
    FIELD_KEYS, KEY_FIELDS, MAX_NUMBER_DIGITS, ONE_LINE_FIELDS, ORDER, BugBookError, BugRecord,
)

_HEADING_RE = re.compile(
    r"^ {0,3}#{1,6}[ \t]+bug[ \t]*#?[ \t]*(?P<num>[0-9]+)"  # ASCII digits: int() reads ١٢ as 12
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
_LEGACY_MARK_RE = re.compile(
    rf"^[ \t]*<!--[ \t]*tdpu:last-bug-number[ \t]+(?P<n>[0-9]{{1,{MAX_NUMBER_DIGITS}}})\b.*-->[ \t]*$")
_BOM = b"\xef\xbb\xbf"

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


def _under_a_bullet(texts: list[str], i: int, depth: int) -> bool:
    """Whether the fence opened on line `i`, indented `depth` columns, belongs to a list item:
    the nearest line above it at the margin (indented less than a bullet's content, 2) is a
    bullet, reached through the item's indented lines, blank lines and lazily continued text.
    A fence indented 1-3 columns after free text, a heading, a rule or another fence is a block
    at the margin, as CommonMark reads it."""
    blank = lazy = False
    for j in range(i - 1, -1, -1):
        t = texts[j]
        if not t.strip():
            if lazy:
                return False     # a paragraph at the margin after a blank line: no item
            blank = True
            continue
        w = _width(_leading(t))
        if _BULLET_RE.match(t) and w < depth:
            return True
        if w >= 2:
            continue             # inside a list item (or deeper)
        if blank or _HEADING_RE.match(t) or t.lstrip().startswith("#") or _FENCE_OPEN_RE.match(t) \
                or _BREAK_RE.match(t):
            return False
        lazy = True              # text that may continue a bullet's paragraph: look further up
    return False


def _find_fences(texts: list[str]) -> tuple[dict[int, int], list[int], list[tuple[int, str, int]]]:
    """Opening line -> closing line of each fenced block (a fence never closed is text), and
    the fences never closed that a fence tdpu writes could close: the lines of those indented
    2-3 columns outside a list item (they close at up to 3 columns), and (line, fence
    character, end) of those in a list item (they close at any indentation until `end`, the
    next record heading or the end of the file)."""
    fences: dict[int, int] = {}
    loose: list[int] = []
    open_items: list[tuple[int, str, int]] = []
    i, n = 0, len(texts)
    while i < n:
        m = _FENCE_OPEN_RE.match(texts[i])
        if m and not (m["fence"][0] == "`" and "`" in m["info"]):
            depth = _width(m["indent"])
            in_item = depth >= 4 or (depth >= 2 and _under_a_bullet(texts, i, depth))
            # A fence at the margin closes only at the margin (tdpu's own fences, indented
            # under bullets, do not close it); one indented 2-3 columns outside a list item
            # closes at up to 3, as CommonMark allows.
            margin_close = 2 if depth < 2 else 4
            closer = re.compile(
                rf"^(?P<ws>[ \t]*){re.escape(m['fence'][0])}{{{len(m['fence'])},}}[ \t]*$")
            for j in range(i + 1, n):
                if in_item and _width(_leading(texts[j])) < depth and _HEADING_RE.match(texts[j]):
                    open_items.append((i, m["fence"][0], j))
                    break  # the bullet's list item ended at the heading, and the fence with it
                c = closer.match(texts[j])
                if c and (in_item or _width(c["ws"]) < margin_close):
                    fences[i] = j
                    i = j
                    break
            else:
                if in_item:
                    open_items.append((i, m["fence"][0], n))
                elif depth >= 2:
                    loose.append(i)
        i += 1
    return fences, loose, open_items


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
    value_line: int = -1  # one-line fields: the line holding the value (the bullet's, or the next)


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
            attr = KEY_FIELDS.get(f.key)
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
            if f.key in KEY_FIELDS and f.key not in seen:
                seen.add(f.key)
            else:
                out.append(f)
        return out


def _fence_for(lines: list[str], char: str = "`") -> str:
    longest = max((len(run) for line in lines for run in re.findall(f"{re.escape(char)}+", line)),
                  default=0)
    return char * max(3, longest + 1)


@dataclass(frozen=True)
class Fence:
    """How a multi-line value's fence is written: `indent` under its bullet, of `char`."""
    indent: str = "  "
    char: str = "`"


def render_field(prefix: str, value: str, indent: str, sep: str = " ", fence: Fence = Fence()
                 ) -> list[str]:
    """The lines of one bullet. One-line values stay inline; others become a `fence` under the
    bullet."""
    if "\n" not in value and value == value.strip():
        return [f"{prefix}{sep}{value}" if value else prefix]
    body = value.split("\n")
    inner = indent + fence.indent
    mark = _fence_for(body, fence.char)
    return [prefix, inner + mark, *[inner + line if line else "" for line in body], inner + mark]


def render_record(rec: BugRecord, fence: Fence = Fence()) -> list[str]:
    out = [f"## Bug #{rec.number}: {rec.title}"]
    for attr in ORDER:
        out += render_field(f"- **{FIELD_KEYS[attr]}**:", getattr(rec, attr), "", fence=fence)
    for key, value in rec.extra:
        out += render_field(f"- **{key}**:", value, "", fence=fence)
    if rec.signature:
        out.append(f"<!-- tdpu:signature {rec.signature} -->")
    return out


class BugDocument:
    """The file as lines plus the records found in them. Mutations re-parse.

    BugBookError when a record heading cannot be read (a number of absurd length), naming the line.
    """

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
        self.fences, self.loose_fences, self.open_item_fences = _find_fences(texts)
        self.in_fence: set[int] = set()
        in_fence = self.in_fence
        for o, c in self.fences.items():
            in_fence.update(range(o, c + 1))
        heads = [i for i, t in enumerate(texts) if i not in in_fence and _HEADING_RE.match(t)]
        self.spans = [self._parse_record(texts, h, nxt)
                      for h, nxt in zip(heads, [*heads[1:], len(texts)])]
        self.first_heading = heads[0] if heads else len(texts)
        # Marker lines of older versions: their number still counts; those of the preamble
        # (where those versions wrote them) go at the next write.
        self.high_water = 0
        self.legacy_marks: list[int] = []
        for i, t in enumerate(texts):
            m = None if i in in_fence or "tdpu:last-bug-number" not in t else _LEGACY_MARK_RE.match(t)
            if m:
                self.high_water = max(self.high_water, int(m["n"]))
                if i < self.first_heading:
                    self.legacy_marks.append(i)

    def _parse_record(self, texts: list[str], h: int, end: int) -> _Span:
        m = _HEADING_RE.match(texts[h])
        if len(m["num"]) > MAX_NUMBER_DIGITS:
            raise BugBookError(
                f"line {h + 1}: the record number of {texts[h][:40]!r}… has {len(m['num'])} digits; "
                f"expected at most {MAX_NUMBER_DIGITS} (编号位数过多，请手工改正这一行的编号)")
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
            if KEY_FIELDS.get(f.key) in ONE_LINE_FIELDS:
                f.value, f.value_line = self._one_line_value(texts, f)
            else:
                f.value = self._field_value(texts, f)
        return span

    def _one_line_value(self, texts: list[str], f: _Field) -> tuple[str, int]:
        """The bullet's own text; on an empty bullet, the plain line under it. What else is
        nested under the bullet is a note, not part of the value."""
        if f.inline:
            return f.inline, f.start
        for i in range(f.start + 1, f.end):
            t = texts[i]
            if not t.strip():
                continue
            if i in self.fences or _BULLET_RE.match(t):
                break
            return t.strip(), i
        return "", f.start

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

    def _fence(self, pos: int) -> Fence:
        """How a value's fence is written at line `pos` so that it closes no fence the user left
        open before it. Two columns under its bullet, as tdpu writes, but four past a fence
        opened 2-3 columns in outside a list item (a fence at two columns would close it); and
        tildes, not backticks, inside the reach of a backtick fence left open in a list item
        (which any fence of its character closes), or backticks for a tilde one. (A value with a
        line of that fence's character still closes it: the value is the user's, kept as is.)"""
        indent = "    " if self.loose_fences and self.loose_fences[0] < pos else "  "
        chars = {c for line, c, end in self.open_item_fences if line < pos <= end}
        return Fence(indent, "~" if chars == {"`"} else "`")

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

    def _field_edit(self, f: _Field, attr: str, value: str) -> tuple[int, int, list[str]]:
        fence = self._fence(f.start)
        if attr not in ONE_LINE_FIELDS:
            return f.start, f.end, render_field(f.prefix, value, f.indent, f.sep, fence)
        if f.value_line == f.start:
            return f.start, f.start + 1, render_field(f.prefix, value, f.indent, f.sep, fence)
        line = self.lines[f.value_line][0]
        return f.value_line, f.value_line + 1, [_leading(line) + value]

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
        for idx, attr in enumerate(ORDER):
            if attr not in changes or changes[attr] == getattr(current, attr):
                continue
            key = FIELD_KEYS[attr]
            f = span.first(key)
            if f is not None:
                edits.append(self._field_edit(f, attr, changes[attr]))
                continue
            before = [g.end for g in span.fields if KEY_FIELDS.get(g.key) in ORDER[:idx]]
            pos = max(before) if before else (span.fields[0].start if span.fields else span.body_end)
            edits.append((pos, pos, render_field(f"- **{key}**:", changes[attr], "",
                                                 fence=self._fence(pos))))
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
                    edits.append((f.start, f.end, render_field(f.prefix, match[1], f.indent, f.sep,
                                                               self._fence(f.start))))
            pos = max((g.end for g in span.fields), default=span.body_end)
            for key, value in remaining:
                edits.append((pos, pos, render_field(f"- **{key}**:", value, "",
                                                     fence=self._fence(pos))))
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
        texts += [*render_record(rec, self._fence(len(self.lines))), "", "---"]
        n = len(self.lines)
        self._apply([(n, n, texts)])
        if self.lines and not self.lines[-1][1]:
            self.lines[-1] = (self.lines[-1][0], self.eol)

    def drop_legacy_marks(self) -> None:
        """Remove the preamble's `tdpu:last-bug-number` lines an older tdpu wrote (and nothing
        else: the text around them stays byte for byte)."""
        if self.legacy_marks:
            self._apply([(i, i + 1, []) for i in self.legacy_marks])


def parse_bugs(data: bytes | str) -> list[BugRecord]:
    """The records of a bug file's contents."""
    doc = BugDocument.from_bytes(data) if isinstance(data, bytes) else BugDocument(data)
    return doc.records
