"""Follow growing log files from a background thread (toolong's approach, plus rotation).

Files are tracked by byte offset, never by storing their lines: a reader thread polls each
file, reads new bytes in 64 KiB chunks, splits them into lines and queues them for the
consumer, which takes whole batches (`drain`) at its own pace. When the consumer falls
behind, the queue fills and the reader stops reading (back-pressure): the unread lines wait
in the file, not in memory, and none is lost.

Icraft rewrites its logs on every run, and logs written on Windows may be GBK, so:
- a file whose inode changes (rotated, replaced) or whose size shrinks below the offset
  (truncated) is reopened and read from its start; a file rewritten so fast that it is
  already longer again is caught by its first bytes changing;
- each line is decoded as UTF-8, else GBK, else UTF-8 with replacement characters.

UI-free: the app's log panel and any headless follower use the same class.
"""

from __future__ import annotations

import collections
import contextlib
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tdpu_tui.engine.osutil import platform

CHUNK_SIZE = 64 * 1024
# How many bytes of a file's start identify it (a rewrite changes its first timestamp).
HEAD_BYTES = 64


def decode_line(raw: bytes) -> str:
    """UTF-8, else GBK (Icraft on Windows), else UTF-8 with U+FFFD for the bad bytes."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        pass
    try:
        return raw.decode("gbk")
    except UnicodeDecodeError:
        return raw.decode("utf-8", errors="replace")


@dataclass
class _Followed:
    path: Path
    label: str
    fh: object | None = None
    inode: tuple[int, int] | None = None
    offset: int = 0
    head: bytes = b""
    partial: bytes = b""
    last_data: float = field(default_factory=time.monotonic)
    reopened: int = 0


class Tailer:
    """Follows files and directories of log files; `drain()` returns the new lines in batches.

    `drain()` returns `[(label, [line, ...]), ...]` in file order per file. `reopened` counts
    truncations/rotations seen (the consumer may want to mark them).
    """

    def __init__(self, *, interval: float = 0.05, chunk_size: int = CHUNK_SIZE,
                 max_pending: int = 50_000, partial_flush_s: float = 1.0,
                 on_ready=None):
        self.interval = interval
        self.chunk_size = chunk_size
        self.max_pending = max_pending
        self.partial_flush_s = partial_flush_s
        # Called from the reader thread when lines become available after the queue was empty.
        self.on_ready = on_ready
        self._files: dict[Path, _Followed] = {}
        self._dirs: dict[Path, tuple[str, bool, Callable[[Path], str] | None]] = {}
        self._pending: collections.deque[tuple[str, Path, list[str]]] = collections.deque()
        self._pending_lines = 0
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lines_read = 0
        self.reopened = 0
        self.events: collections.deque[str] = collections.deque(maxlen=100)

    # -- what to follow -------------------------------------------------------------------
    def follow(self, path: str | Path, label: str | None = None, *, from_start: bool = True) -> None:
        """Follow `path` (it may not exist yet). `from_start=False` skips what is already there."""
        self._add(Path(path), label, from_start, None)

    def _add(self, path: Path, label: str | None, from_start: bool, found_in: Path | None) -> None:
        f = _Followed(path, label or path.name)
        if not from_start:
            with contextlib.suppress(OSError):
                st = path.stat()
                f.offset = st.st_size
                f.inode = (st.st_dev, st.st_ino)
                with open(path, "rb") as fh:
                    f.head = fh.read(min(HEAD_BYTES, st.st_size))
        with self._cond:
            # A file found in a directory that was unfollowed meanwhile stays unfollowed.
            if path in self._files or (found_in is not None and found_in not in self._dirs):
                return
            self._files[path] = f

    def follow_dir(self, directory: str | Path, pattern: str = "*.log", *, recursive: bool = True,
                   label: Callable[[Path], str] | None = None, history: bool = True) -> None:
        """Follow every file matching `pattern` in `directory`, including files created later.

        `label(path)` names a file's lines (default: its path relative to `directory`).
        `history=False` skips what the files already hold (files created later are read whole).
        """
        directory = Path(directory)
        if not history:  # before the directory is watched, so the reader cannot take them whole
            for p in self._matching(directory, pattern, recursive):
                self._add(p, self._label(directory, p, label), False, None)
        with self._cond:
            self._dirs[directory] = (pattern, recursive, label)

    def unfollow_dir(self, directory: str | Path) -> None:
        """Stop following `directory` and the files found in it."""
        directory = Path(directory)
        with self._cond:
            self._dirs.pop(directory, None)
            inside = [p for p in self._files if p.is_relative_to(directory)]
        for p in inside:
            self.unfollow(p)

    @staticmethod
    def _matching(directory: Path, pattern: str, recursive: bool) -> list[Path]:
        if not directory.is_dir():
            return []
        found = directory.rglob(pattern) if recursive else directory.glob(pattern)
        return sorted(p for p in found if p.is_file())

    @staticmethod
    def _label(directory: Path, path: Path, label: Callable[[Path], str] | None) -> str:
        return label(path) if label else str(path.relative_to(directory))

    def unfollow(self, path: str | Path) -> None:
        with self._cond:
            f = self._files.pop(Path(path), None)
        if f is not None and f.fh is not None:
            f.fh.close()

    @property
    def paths(self) -> list[Path]:
        with self._cond:
            return list(self._files)

    # -- consumer side --------------------------------------------------------------------
    @property
    def pending(self) -> int:
        return self._pending_lines

    def drain(self, max_lines: int | None = None) -> list[tuple[str, list[str]]]:
        """Take queued lines (at most about `max_lines`), oldest first; never blocks."""
        return [(label, lines) for label, _path, lines in self.drain_files(max_lines)]

    def drain_files(self, max_lines: int | None = None) -> list[tuple[str, Path, list[str]]]:
        """`drain`, with the file each batch of lines came from."""
        out: list[tuple[str, Path, list[str]]] = []
        taken = 0
        with self._cond:
            while self._pending and (max_lines is None or taken < max_lines):
                label, path, lines = self._pending.popleft()
                if max_lines is not None and taken + len(lines) > max_lines:
                    keep = max_lines - taken
                    self._pending.appendleft((label, path, lines[keep:]))
                    lines = lines[:keep]
                out.append((label, path, lines))
                taken += len(lines)
            self._pending_lines -= taken
            self._cond.notify_all()
        return out

    # -- reader thread ----------------------------------------------------------------------
    def start(self) -> Tailer:
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, name="tdpu-tail", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 2.0) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        with self._cond:
            for f in self._files.values():
                if f.fh is not None:
                    f.fh.close()
                    f.fh = None

    def flush(self) -> None:
        """Hand over each file's last line that has no newline yet (its writer has finished)."""
        with self._cond:
            files = list(self._files.values())
        for f in files:
            self._flush_partial(f)

    def poll(self) -> int:
        """One pass over every file (the thread's body; or called directly, without the thread,
        by a consumer that drains after each pass)."""
        self._discover()
        with self._cond:
            files = list(self._files.values())
        return sum(self._read_file(f) for f in files)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                got = self.poll()
            except Exception as exc:  # a broken file must not kill the follower
                self.events.append(f"tail error: {exc}")
                got = 0
            if not got:
                self._stop.wait(self.interval)

    def _discover(self) -> None:
        with self._cond:
            dirs = list(self._dirs.items())
        for directory, (pattern, recursive, label) in dirs:
            for p in self._matching(directory, pattern, recursive):
                if p not in self._files:
                    self._add(p, self._label(directory, p, label), True, directory)

    def _open(self, f: _Followed) -> bool:
        try:
            fh = open(f.path, "rb")  # noqa: SIM115 - kept open while followed
        except OSError:
            return False
        st = os.fstat(fh.fileno())
        same = f.inode == (st.st_dev, st.st_ino)
        f.fh = fh
        if not same:
            if f.inode is not None:
                self._note_reopen(f, "replaced")
            f.inode = (st.st_dev, st.st_ino)
            f.offset = 0
            f.head = b""
            f.partial = b""
        fh.seek(f.offset)
        return True

    def _note_reopen(self, f: _Followed, why: str) -> None:
        f.reopened += 1
        self.reopened += 1
        self.events.append(f"{f.label}: {why}, reading from the start")

    def _changed_identity(self, f: _Followed) -> str | None:
        """Why `f` must be read again from its start, or None."""
        try:
            st = f.path.stat()
        except OSError:
            return None  # gone for now: keep what the open handle still reads
        if (st.st_dev, st.st_ino) != f.inode:
            return "replaced"
        if st.st_size < f.offset:
            return "truncated"
        if f.head:
            try:
                now = platform.pread(f.fh, len(f.head), 0)
            except OSError:
                return None
            if now != f.head:
                return "rewritten"
        return None

    def _read_file(self, f: _Followed) -> int:
        if f.fh is None and not self._open(f):
            return 0
        why = self._changed_identity(f)
        if why == "replaced":
            # Read what the old file still holds, then switch to the new one.
            got = self._read_available(f)
            self._flush_partial(f)
            f.fh.close()
            f.fh = None
            if not self._open(f):
                return got
            return got + self._read_available(f)
        if why is not None:
            self._flush_partial(f)
            self._note_reopen(f, why)
            f.offset = 0
            f.head = b""
            f.fh.seek(0)
        got = self._read_available(f)
        if not got and f.partial and time.monotonic() - f.last_data > self.partial_flush_s:
            self._flush_partial(f)
        return got

    def _read_available(self, f: _Followed) -> int:
        lines_total = 0
        while not self._stop.is_set():
            if not self._wait_for_room():
                break
            data = f.fh.read(self.chunk_size)
            if not data:
                break
            if len(f.head) < HEAD_BYTES:
                f.head += data[: HEAD_BYTES - len(f.head)]
            f.offset += len(data)
            f.last_data = time.monotonic()
            buf = f.partial + data
            parts = buf.split(b"\n")
            f.partial = parts.pop()
            if parts:
                self._push(f, [decode_line(p.rstrip(b"\r")) for p in parts])
                lines_total += len(parts)
        return lines_total

    def _flush_partial(self, f: _Followed) -> None:
        if f.partial:
            self._push(f, [decode_line(f.partial.rstrip(b"\r"))])
            f.partial = b""

    def _wait_for_room(self) -> bool:
        with self._cond:
            while self._pending_lines >= self.max_pending and not self._stop.is_set():
                self._cond.wait(0.1)
        return not self._stop.is_set()

    def _push(self, f: _Followed, lines: list[str]) -> None:
        with self._cond:
            was_empty = not self._pending_lines
            if self._pending and self._pending[-1][1] == f.path:
                self._pending[-1][2].extend(lines)
            else:
                self._pending.append((f.label, f.path, lines))
            self._pending_lines += len(lines)
            self.lines_read += len(lines)
        if was_empty and self.on_ready is not None:
            self.on_ready()


class EchoFilter:
    """Shows a line once when it arrives by two roads.

    Icraft writes each log line to its stdout and to its log file, so the same line reaches a
    reader twice: as the child's output and from the followed file (in either order).
    `fresh(channel, lines)` drops a line whose exact text came from another channel recently,
    once; repeats from the same channel are kept (a log may say the same thing twice).
    """

    def __init__(self, window: int = 4096):
        self.window = window
        self._recent: collections.OrderedDict[str, object] = collections.OrderedDict()

    def fresh(self, channel: object, lines: list[str]) -> list[str]:
        out = []
        for line in lines:
            if not line.strip():
                out.append(line)
                continue
            seen_on = self._recent.get(line)
            if seen_on is not None and seen_on != channel:
                del self._recent[line]
                continue
            self._recent[line] = channel
            self._recent.move_to_end(line)
            if len(self._recent) > self.window:
                self._recent.popitem(last=False)
            out.append(line)
        return out
