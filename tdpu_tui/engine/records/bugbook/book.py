"""The bug book on disk: one session's view of `bugs_found.md`, its lock, its merges, and what it
remembers beside the file.

Writes: under the book's lock (`osutil.files.lock_for`: a lock file in the hidden state folder
beside the book, `.tdpu/`), the file is read again, the change is applied to what is on disk
*now* (so edits saved by an editor in the meantime are kept, record by record), and the result
goes to a temporary file in the same directory, fsync, rename. If the record being updated was
changed on disk too, both versions are kept: the file's stays under its number, ours is appended
as a new record with a `冲突` bullet, and a message says so (`BugBook.messages`). A record deleted
on disk while it was being edited here comes back, with the edit. A writer killed before its
rename leaves the file as it was; its temp file is removed by the next writer. A one-shot caller
(`tdpu bugs set`) uses `BugBook.set`: read and write under the same lock, nothing to merge.

Numbers are never reused. A new record gets 1 + the largest of: every number in the file, the
last number used as kept in the state file, and every number this `BugBook` has seen. The state
file (`.tdpu/<book name>.json` beside the book) also maps each drafted failure signature to its
record, so a draft whose signature comment was removed by hand is still the same failure's
record. Nothing is written into the user's text between or above the records; deleting the
state file gives up the promise for numbers deleted by hand.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import datetime as _dt
import hashlib
import json
import os
import threading
from collections.abc import Container, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tdpu_tui.engine.osutil.files import atomic_path, lock_for, state_dir, write_target
from tdpu_tui.engine.records.bugbook.codec import BugDocument
from tdpu_tui.engine.records.bugbook.model import (
    CONFLICT_KEY, EDITABLE, TEMPLATE_HEADER, TITLE_LINE, BugBookError, BugRecord,
    BugValidationError, content, extra_value, text_value, time_value, title_value, validate,
    changed_value,
)

_STATE_ABOUT = ("tdpu's memory of the bug book beside this folder: the last record number used "
                "(numbers are never reused) and the record each drafted failure signature went to")


@dataclass
class BookState:
    """What the book remembers outside the user's text (`.tdpu/<book>.json`)."""

    last_number: int = 0
    drafts: dict[str, int] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> tuple[BookState, str]:
        """The state, and a problem ("" if none). An unreadable state file is not fatal: the
        book still holds every record, and the state is written again at the next change."""
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            state = cls(int(data.get("last_number", 0)),
                        {str(k): int(v) for k, v in dict(data.get("drafts", {})).items()})
        except FileNotFoundError:
            return cls(), ""
        except (OSError, ValueError, TypeError, AttributeError) as exc:
            return cls(), f"{path}: unreadable ({exc}); it is written again at the next change"
        return state, ""

    def dump(self, path: Path) -> None:
        data = {"about": _STATE_ABOUT, "last_number": self.last_number,
                "drafts": dict(sorted(self.drafts.items(), key=lambda kv: kv[1]))}
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(data, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")


@dataclass
class _Txn:
    doc: BugDocument
    state: BookState
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
        elif content(r) != content(before[n]):
            msgs.append(f"Bug #{n} was changed in {where} outside this session; kept that version")
    for n in before:
        if n not in after:
            msgs.append(f"Bug #{n} was removed from {where} outside this session "
                        f"(its number will not be reused)")
    return msgs


_ON_DISK = object()


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
        return lock_for(self.path).path

    @property
    def state_path(self) -> Path:
        target = write_target(self.path)
        return state_dir(target) / f"{target.name}.json"

    # -- reading ------------------------------------------------------------------------------

    def _read(self) -> tuple[BugDocument | None, tuple[int, int, int] | None, str | None]:
        try:
            with open(self.path, "rb") as fh:
                st = os.fstat(fh.fileno())
                data = fh.read()
        except FileNotFoundError:
            return None, None, None
        stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
        try:
            doc = BugDocument.from_bytes(data)
        except BugBookError as exc:
            raise BugBookError(f"{self.path}: {exc}") from None
        return doc, stamp, hashlib.sha256(data).hexdigest()

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
        existed = self._digest is not None
        doc, stamp, digest = self._read()
        changed = digest != self._digest
        self._adopt(doc, stamp, digest)
        if not changed:
            return []
        msgs = _diff_messages(old, doc.records if doc else [], self.path.name, self.own_signatures)
        # A file that appears holding no record is the template a run starts (`ensure_book`,
        # this session's or another's): nothing anyone needs to hear about.
        created_empty = not existed and not (doc.records if doc else [])
        if not msgs and not created_empty and not self._only_own_drafts(old, doc):
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
    def _transaction(self, *, fresh: bool = False) -> Iterator[_Txn]:
        """The document as on disk now, under the lock; what the block leaves in it is written.
        `fresh`: forget what was read before (a one-shot edit merges nothing)."""
        with self._mutex, lock_for(self.path):
            doc, stamp, digest = self._read()
            if fresh or not self._loaded:
                self._adopt(doc, stamp, digest)
            merged: list[str] = []
            if digest != self._digest:
                old = self._doc.records if self._doc is not None else []
                merged = _diff_messages(old, doc.records if doc else [], self.path.name,
                                        self.own_signatures)
            state, problem = BookState.load(self.state_path)
            if problem:
                merged.append(problem)
            before = dataclasses.replace(state, drafts=dict(state.drafts))
            original = doc.to_bytes() if doc is not None else None
            if doc is None or not original:
                doc = BugDocument(TEMPLATE_HEADER)
            high_water = doc.high_water
            txn = _Txn(doc, state)
            yield txn
            state.last_number = max(state.last_number, high_water, txn.doc.max_number)
            data = txn.doc.to_bytes()
            if data != original:
                txn.doc.drop_legacy_marks()
                data = txn.doc.to_bytes()
            if data != original:
                stamp, digest = self._write(data)
            # The last number only needs keeping once the book changes; a draft's signature or a
            # damaged state file, at once. After the book: a crash in between loses nothing, as
            # the book's own numbers count too.
            if state != before and (data != original or problem or state.drafts != before.drafts):
                state.dump(self.state_path)
            self._adopt(txn.doc, stamp, digest)
            self._seen = max(self._seen, state.last_number)
            self.messages.extend(merged + txn.messages)

    def _write(self, data: bytes) -> tuple[tuple[int, int, int], str]:
        target = write_target(self.path)
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

    def _next_number(self, txn: _Txn) -> int:
        doc = txn.doc
        n = max(doc.max_number, doc.high_water, txn.state.last_number, self._seen) + 1
        self._seen = txn.state.last_number = n
        return n

    def _append(self, txn: _Txn, rec: BugRecord) -> BugRecord:
        rec.number = self._next_number(txn)
        txn.doc.append_record(rec)
        if rec.signature:
            txn.state.drafts[rec.signature] = rec.number
        return txn.doc.spans[-1].record()

    def ensure(self) -> bool:
        """Create the book with the template's title line when there is none; True if created."""
        with self._mutex, lock_for(self.path):
            if write_target(self.path).exists():
                return False
            with atomic_path(write_target(self.path)) as tmp:
                tmp.write_text(TITLE_LINE + "\n", encoding="utf-8")
            return True

    def add(self, title: str, stage: str, error: str = "", cause: str = "", fix: str = "",
            status: str = "未解决", time: str | _dt.datetime | None = None, *,
            extra: Iterable[tuple[str, str]] | None = None, signature: str = "") -> BugRecord:
        """Append a record with a fresh number and write the file. Returns it as written.

        `signature`: the failure signature of a draft saved from a form, so the pipeline's
        automatic draft of the same failure finds it instead of adding another.
        """
        rec = BugRecord(0, title_value(title), time_value(time or None), validate("stage", stage),
                        text_value("error", error or ""), text_value("cause", cause or ""),
                        text_value("fix", fix or ""), validate("status", status),
                        extra_value(extra), signature.strip())
        with self._transaction() as txn:
            return self._append(txn, rec)

    def add_draft(self, rec: BugRecord) -> tuple[BugRecord, bool]:
        """Append the draft `rec` unless its failure is already recorded: (the draft, True),
        or (the existing record, False). One transaction: two runs failing alike at the same
        time give one record."""
        with self._transaction() as txn:
            existing = self._drafted(txn, rec.signature)
            if existing is not None:
                return existing, False
            return self._append(txn, rec), True

    def _drafted(self, txn: _Txn, signature: str) -> BugRecord | None:
        doc = txn.doc
        span = next((s for s in doc.spans if s.signature == signature), None)
        if span is None and signature in txn.state.drafts:
            span = doc.span(txn.state.drafts[signature])
        return span.record() if span is not None else None

    def set(self, number: int, **fields: Any) -> BugRecord:
        """`update` for a one-shot caller (`tdpu bugs set`): the record is read and written under
        the same lock, as the file holds it now, so there is nothing to merge."""
        return self.update(number, base=_ON_DISK, **fields)

    def update(self, number: int, *, base: Any = None, **fields: Any) -> BugRecord:
        """Change fields of record `number` (None means "leave as is") and write the file.

        `base` is the record as the editor showed it (a form opened a while ago); by default,
        the record as this book last read it. If the file's record was changed since then in
        other fields only, both changes are kept in it. If the same field was changed in both,
        both versions are kept: the file's stays, ours is appended under a new number
        (returned) with a `冲突` bullet, and `messages` says so.

        A number held by two records in the file (a record copied by hand) is refused with
        BugValidationError naming the lines of each; nothing is written.
        """
        unknown = sorted(set(fields) - set(EDITABLE))
        if unknown:
            raise BugValidationError(unknown[0], f"not an editable field (editable: {', '.join(EDITABLE)})",
                                     f"不是可编辑的字段（可编辑：{', '.join(EDITABLE)}）")
        with self._transaction(fresh=base is _ON_DISK) as txn:
            if base is _ON_DISK:
                base = None
            doc = txn.doc
            same = [sp for sp in doc.spans if sp.number == number]
            if len(same) > 1:
                # A hand-copied record: which one is meant cannot be told, so neither is touched.
                lines = ", ".join(str(sp.heading + 1) for sp in same)
                raise BugValidationError(
                    "number", f"Bug #{number} appears {len(same)} times in {self.path} (lines "
                              f"{lines}); give all but one of them a new number by hand, then "
                              f"try again",
                    f"Bug #{number} 在文件中出现了 {len(same)} 次（第 {lines} 行），请先手工改号")
            if base is None and self._doc is not None:
                base = self._doc.record(number)
            theirs = doc.record(number)
            if base is None and theirs is None:
                raise BugValidationError("number", f"no Bug #{number} in {self.path}",
                                         f"没有 Bug #{number}")
            base = base or theirs
            changes = {k: changed_value(base, k, v) for k, v in fields.items() if v is not None}
            ours = dataclasses.replace(base, **changes)
            if theirs is not None and content(theirs) == content(base):
                doc.update_record(number, changes)
                return doc.record(number)
            if theirs is not None and content(theirs) == content(ours):
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
            saved = self._append(txn, ours)
            txn.messages.append(
                f"Bug #{number} was changed in {name} and here at the same time: kept the file's "
                f"version as Bug #{number} and saved this edit as Bug #{saved.number}")
            return saved


def ensure_book(path: str | Path) -> bool:
    """The pipeline's start: `path` exists afterwards, with the template's title line if it was
    missing (so the book is where the plan says from the first run on). True if created."""
    return BugBook(path).ensure()
