"""What differs between Linux and Windows, one function per concern.

Nothing else in tdpu calls a POSIX-only API (`resource`, `fcntl`, `os.pread`, `os.killpg`,
`os.getloadavg`, `os.kill(pid, 0)`): it asks here. Each function picks its branch when it is
called, from what the running Python offers, so both branches run (and are tested) on Linux.
Locks are `filelock`'s (`osutil/files.py`); process trees are the Icraft driver's.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
from typing import Any, BinaryIO

import psutil

# A process started within this many seconds of a recorded time counts as the same one
# (creation times are read back with limited precision).
START_TIME_SLACK_S = 1.0


def peak_rss_bytes() -> int:
    """The largest resident set this process has had, in bytes.

    Linux keeps it per address space in /proc/self/status (`VmHWM`), which starts afresh at
    exec; `getrusage` there would also count the parent's resident set at the moment it
    spawned this process (the kernel folds the vfork'ed address space into `ru_maxrss`), so a
    small command started by a big one would report the big one's peak. Other POSIX systems
    keep it in `getrusage` (bytes on macOS); Windows in the process's peak working set, which
    psutil reads. Where none exists the current RSS is the best there is.
    """
    hwm = _vm_hwm_bytes()
    if hwm is not None:
        return hwm
    try:
        import resource
    except ImportError:
        return peak_rss_from_memory_info(psutil.Process().memory_info())
    return peak_rss_from_rusage(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, sys.platform)


def _vm_hwm_bytes(status: str = "/proc/self/status") -> int | None:
    try:
        with open(status, encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024        # "VmHWM:   12345 kB"
    except (OSError, ValueError, IndexError):
        pass
    return None


_TRIM: list = []      # glibc's malloc_trim, looked up once ([None] where there is none)


def release_free_memory() -> bool:
    """Hand back to the system the memory the C allocator keeps after it was freed.

    glibc keeps freed heap pages resident (below its trim threshold, or between blocks still in
    use): after the PyTorch reference (3.4 GiB at 2B4T) is dropped, ~2 GiB of it would stay in
    the process's RSS, and the next ONNX Runtime session would come on top. `malloc_trim(0)`
    returns them. Other C libraries (musl, macOS, Windows) have no such call and return large
    blocks by themselves: nothing to do there. True when memory was returned.
    """
    if not _TRIM:
        trim = None
        if sys.platform.startswith("linux"):
            try:
                trim = ctypes.CDLL(None).malloc_trim
                trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
            except (OSError, AttributeError):
                trim = None
        _TRIM.append(trim)
    return bool(_TRIM[0] is not None and _TRIM[0](0))


def peak_rss_from_rusage(ru_maxrss: int, platform: str) -> int:
    return int(ru_maxrss) if platform == "darwin" else int(ru_maxrss) * 1024


def peak_rss_from_memory_info(info: Any) -> int:
    """psutil's `memory_info()`: `peak_wset` on Windows, else the current `rss`."""
    peak = getattr(info, "peak_wset", None)
    return int(peak) if peak else int(info.rss)


def load_average() -> float | None:
    """The 1-minute system load average, or None where the system gives none.

    psutil takes it from the kernel on POSIX and emulates it on Windows, where it reads
    (0, 0, 0) for the first 5 s after the first call: that is "not known yet", not "idle".
    """
    getloadavg = getattr(psutil, "getloadavg", None)
    if getloadavg is None:
        return None
    try:
        loads = getloadavg()
    except OSError:
        return None
    if sys.platform == "win32" and not any(loads):
        return None
    return float(loads[0])


def cpu_model() -> str:
    """The CPU's model name as people know it ("AMD EPYC", "Intel(R) Xeon(R) …"): Linux's
    /proc/cpuinfo, else what Python's platform module says (Windows: the processor string)."""
    import platform as _platform

    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return _platform.processor() or _platform.machine() or "unknown CPU"


def machine_summary() -> str:
    """One line naming the machine a figure was measured on: CPU, count, system, Python."""
    import platform as _platform

    return (f"{cpu_model()}; {os.cpu_count()} CPUs; {_platform.system()} {_platform.release()}; "
            f"Python {_platform.python_version()}")


def process_alive(pid: int | None, *, started_before: float | None = None) -> bool:
    """Whether `pid` is a running process (a zombie is not), asked through psutil.

    Never `os.kill(pid, 0)`: on Windows signal 0 is CTRL_C_EVENT and would interrupt it.
    With `started_before` (epoch seconds), a process created later is a reused pid, not the one
    that was recorded. A process we may not inspect exists: it counts as alive.
    """
    if not pid or pid <= 0:
        return False
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        if started_before is not None and proc.create_time() > started_before + START_TIME_SLACK_S:
            return False
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return False
    except (psutil.AccessDenied, OverflowError, ValueError):
        return True
    return True


def process_start_time(pid: int | None = None) -> float:
    """When process `pid` (default: this one) was created, in epoch seconds."""
    return psutil.Process(pid).create_time()


_SEEK_LOCK = threading.Lock()


def pread(fh: BinaryIO, size: int, offset: int) -> bytes:
    """Up to `size` bytes of open file `fh` at `offset`, leaving its position where it was.

    `os.pread` where it exists; on Windows a seek and read under a lock, the position restored.
    """
    positional = getattr(os, "pread", None)
    if positional is not None:
        return positional(fh.fileno(), size, offset)
    return pread_by_seek(fh, size, offset)


def pread_by_seek(fh: BinaryIO, size: int, offset: int) -> bytes:
    with _SEEK_LOCK:
        where = fh.tell()
        try:
            fh.seek(offset)
            return fh.read(size)
        finally:
            fh.seek(where)


def termination_signals() -> list[signal.Signals]:
    """The signals that ask this process to stop, besides SIGINT (Ctrl-C).

    POSIX: SIGTERM (kill, systemd, CI) and SIGHUP (the SSH session closed). Windows: SIGTERM
    exists only for `signal.raise_signal`, and SIGBREAK is Ctrl-Break in a console.
    """
    names = ("SIGTERM", "SIGBREAK") if os.name == "nt" else ("SIGTERM", "SIGHUP")
    return [getattr(signal, n) for n in names if hasattr(signal, n)]
