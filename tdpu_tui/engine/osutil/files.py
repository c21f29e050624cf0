"""Writes that never leave a half-written artifact: temp file in the same directory + rename.

The file written gets the mode it would have had if written in place: a rewritten file keeps
the mode of the file it replaces, a new one gets 0o666 minus the umask (not mkstemp's 0600),
so logs and reports stay readable by the rest of a shared board host's group.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path


try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no advisory lock, writes stay atomic
    fcntl = None  # type: ignore[assignment]

LOCK_TIMEOUT_S = 30.0


class LockTimeout(TimeoutError):
    """Another process held a lock longer than we wait; `filename` is the lock file."""


class FileLock:
    """An advisory `fcntl` lock on `path` (a lock file beside the data it guards).

    Read-modify-write cycles of a shared file (the bug book, the compile log) run under it, so
    two processes (`tdpu --batch` and the app, two batch runs) never lose each other's edits.
    Waiting longer than `timeout` raises LockTimeout naming the lock file.
    """

    def __init__(self, path: Path, timeout: float = LOCK_TIMEOUT_S):
        self.path = Path(path)
        self.timeout = timeout
        self.fd: int | None = None

    def __enter__(self) -> FileLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            # 0o666 minus the umask, like the files it guards: a group member must open it too.
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        except PermissionError:
            self.fd = os.open(self.path, os.O_RDONLY)   # someone else's lock file: flock still works
        if fcntl is None:
            return self
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return self
            except BlockingIOError:
                if time.monotonic() > deadline:
                    os.close(self.fd)
                    self.fd = None
                    raise LockTimeout(errno.ETIMEDOUT, f"another process has held this lock "
                                      f"for {self.timeout:.0f} s; try again", str(self.path)) from None
                time.sleep(0.02)

    def __exit__(self, *exc: object) -> None:
        if self.fd is not None:
            if fcntl is not None:
                fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


STATE_DIR = ".tdpu"


def state_dir(path: str | Path) -> Path:
    """The hidden folder beside `path` for what tdpu keeps about it (locks, the bug book's
    state), so they do not litter a folder of the user's records."""
    return Path(path).parent / STATE_DIR


def lock_for(path: str | Path) -> FileLock:
    """The lock guarding `path`: `NAME.lock` in the state folder beside the file a write to
    `path` lands in (`state_dir`)."""
    path = write_target(path)
    return FileLock(state_dir(path) / f"{path.name}.lock")


def fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process umask, read without changing it where possible.

    Linux ≥ 4.7 reports it in /proc/self/status; elsewhere it is set and restored under a lock
    (other threads of this process may create files in that instant, hence /proc first).
    """
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    with _UMASK_LOCK:
        old = os.umask(0o077)
        os.umask(old)
    return old


def mode_for(path: str | Path) -> int:
    """The permission bits a write to `path` should leave: those of the file there now
    (through a symlink: its target's), else 0o666 minus the umask."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except (FileNotFoundError, NotADirectoryError):
        return 0o666 & ~current_umask()


def write_target(path: str | Path) -> Path:
    """Where a write to `path` lands: a symlink is written through to the file it points to
    (the link stays a link), anything else is `path` itself."""
    path = Path(path)
    return Path(os.path.realpath(path)) if path.is_symlink() else path


@contextlib.contextmanager
def atomic_path(path: str | Path, *, fsync: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path`, else it is removed.

    The result has the mode `mode_for(path)` (the replaced file's, or 0o666 minus the umask).
    A symlink at `path` is kept: the file it points to is replaced (`write_target`).
    Ctrl-C (KeyboardInterrupt) counts as failure: the old file, if any, is untouched.
    """
    path = write_target(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if fsync:
            with open(tmp_path, "rb+") as fh:
                os.fsync(fh.fileno())
        # After the caller's writes and the fsync (a read-only mode must not stop them), before
        # the rename. A file system without modes (some network mounts) keeps what it gives.
        with contextlib.suppress(OSError):
            os.chmod(tmp_path, mode_for(path))
        with contextlib.suppress(OSError):   # keep the replaced file's group (shared projects)
            group = os.stat(path).st_gid
            if os.stat(tmp_path).st_gid != group:
                os.chown(tmp_path, -1, group)
        os.replace(tmp_path, path)
        if fsync:
            fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def staging_dir(final_dir: str | Path) -> Iterator[Path]:
    """A temporary directory inside `final_dir` for artifacts that must appear together.

    Move the finished files out with `commit_files`; the directory is removed either way.
    """
    final_dir = Path(final_dir)
    final_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".staging-", dir=final_dir))
    try:
        yield tmp
    finally:
        for p in sorted(tmp.rglob("*"), reverse=True):
            with contextlib.suppress(OSError):
                p.unlink() if not p.is_dir() else p.rmdir()
        with contextlib.suppress(OSError):
            tmp.rmdir()


def commit_files(pairs: list[tuple[Path, Path]]) -> None:
    """Rename each (staged, final) pair in order; data files first, index files last."""
    for src, dst in pairs:
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.replace(src, dst)
    for d in {dst.parent for _, dst in pairs}:
        fsync_dir(d)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
