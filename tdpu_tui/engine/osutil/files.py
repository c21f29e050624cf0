"""Writes that never leave a half-written artifact: temp file in the same directory + rename.

The file written gets the mode it would have had if written in place: a rewritten file keeps
the mode of the file it replaces, a new one gets 0o666 minus the umask (not mkstemp's 0600),
so logs and reports stay readable by the rest of a shared board host's group.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import re
import shutil
import socket
import stat
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path, PurePosixPath, PureWindowsPath

import filelock

from tdpu_tui.engine.osutil import platform

LOCK_TIMEOUT_S = 30.0
# A file system out of room: the write that hit it names no file.
_SPACE_ERRNOS = {errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", errno.ENOSPC)}


class LockTimeout(TimeoutError):
    """Another process held a lock longer than we wait; `filename` is the lock file."""


class FileLock:
    """An exclusive lock on `path` (a lock file beside the data it guards), held with
    `filelock`: `flock` on POSIX, `msvcrt.locking` on Windows.

    Read-modify-write cycles of a shared file (the bug book, the compile log) run under it, so
    two processes (`tdpu --batch` and the app, two batch runs) never lose each other's edits.
    Waiting longer than `timeout` raises LockTimeout naming the lock file.
    """

    def __init__(self, path: Path, timeout: float = LOCK_TIMEOUT_S):
        self.path = Path(path)
        self.timeout = timeout
        self._lock: filelock.BaseFileLock | None = None

    def __enter__(self) -> FileLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # 0o666 minus the umask, like the files it guards: a group member must open it too.
        lock = filelock.FileLock(str(self.path), timeout=self.timeout, mode=0o666 & ~current_umask())
        try:
            lock.acquire()
        except filelock.Timeout:
            raise LockTimeout(errno.ETIMEDOUT, f"another process has held this lock "
                              f"for {self.timeout:.0f} s; try again", str(self.path)) from None
        self._lock = lock
        return self

    def __exit__(self, *exc: object) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None


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
        if hasattr(os, "chown"):   # POSIX: keep the replaced file's group (shared projects)
            with contextlib.suppress(OSError):
                group = os.stat(path).st_gid
                if os.stat(tmp_path).st_gid != group:
                    os.chown(tmp_path, -1, group)
        os.replace(tmp_path, path)
        if fsync:
            fsync_dir(path.parent)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        named = with_filename(exc, path)
        if named is exc:
            raise
        # The caller's write that failed (a full disk) names no file: it was this one.
        raise named from exc


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def confined(base_dir: str | Path, name: str) -> Path | None:
    """`base_dir / name` when `name` is a relative path that stays inside `base_dir`, else None
    (absolute, a drive or UNC form, or a `..` part, whichever the separator). A file that a
    graph or an index names is read only there; symlinks inside are the user's own doing."""
    if not isinstance(name, str) or not name or "\0" in name:
        return None
    windows = PureWindowsPath(name)    # splits on both separators, knows drives
    if PurePosixPath(name).is_absolute() or windows.drive or windows.root or ".." in windows.parts:
        return None
    return Path(base_dir) / name


def with_filename(exc: BaseException, path: str | Path) -> BaseException:
    """`exc`, or for an OSError that names no file, the same error naming `path`."""
    if isinstance(exc, OSError) and exc.filename is None and exc.errno is not None:
        return OSError(exc.errno, exc.strerror or os.strerror(exc.errno), str(path))
    return exc


# Temporary files and directories that a killed run leaves behind start with one of these,
# followed by their owner (`owner_tag`), so a later run can tell whose they are.
STAGING_PREFIX = ".staging-"
LEFTOVER_PREFIXES = (STAGING_PREFIX, ".validate-step1-", ".validate-")


def _host_label() -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname()) or "host"


@functools.lru_cache(maxsize=4)
def _owner_tag(pid: int) -> str:
    return f"{pid}.{int(platform.process_start_time(pid))}.{_host_label()}"


def owned_prefix(prefix: str) -> str:
    """`prefix` followed by this process's `PID.START.HOST.` (pid, its start time in epoch
    seconds, the host): a temp name made with it can be removed once that process is gone."""
    return f"{prefix}{_owner_tag(os.getpid())}."


def _owner(name: str) -> tuple[int, int] | None:
    """(pid, start) of a leftover name made on this host, or None."""
    for prefix in LEFTOVER_PREFIXES:
        if not name.startswith(prefix):
            continue
        parts = name[len(prefix):].split(".", 3)
        if len(parts) == 4 and parts[0].isdigit() and parts[1].isdigit() and parts[3] \
                and len(parts[0]) < 12 and len(parts[1]) < 15 and parts[2] == _host_label():
            return int(parts[0]), int(parts[1])
    return None


def _tree_bytes(path: Path) -> int:
    if not path.is_dir() or path.is_symlink():
        with contextlib.suppress(OSError):
            return path.lstat().st_size
        return 0
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, f)).st_size
    return total


def remove_leftovers(directory: str | Path) -> list[tuple[Path, int]]:
    """Remove the temporary files and directories in `directory` whose owner process is gone
    (killed, or the machine restarted); returns each removed path with its size in bytes.

    Only names made with `owned_prefix` on this host are considered: another host's (a shared
    project directory) cannot be checked from here, and a live owner's are in use.
    """
    directory = Path(directory)
    removed: list[tuple[Path, int]] = []
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return removed
    for entry in entries:
        owner = _owner(entry.name)
        if owner is None or platform.process_alive(owner[0], started_before=owner[1]):
            continue
        path = Path(entry.path)
        size = _tree_bytes(path)
        try:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        except OSError:
            continue
        removed.append((path, size))
    return removed


@contextlib.contextmanager
def staging_dir(final_dir: str | Path) -> Iterator[Path]:
    """A temporary directory inside `final_dir` for artifacts that must appear together.

    Move the finished files out with `commit_files`; the directory is removed either way. Its
    name carries this process (`owned_prefix`): if the process is killed, a later run removes it.
    """
    final_dir = Path(final_dir)
    final_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=owned_prefix(STAGING_PREFIX), dir=final_dir))
    try:
        yield tmp
    except OSError as exc:
        if exc.filename is None and exc.errno in _SPACE_ERRNOS:
            raise with_filename(exc, final_dir) from exc
        raise
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
