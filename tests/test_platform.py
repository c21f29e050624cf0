"""The platform seams (tdpu_tui/engine/osutil/platform.py): each branch, run on this machine."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import threading
import time
from collections import namedtuple

import psutil
import pytest

from tdpu_tui.engine.osutil import platform

# -- peak RSS -------------------------------------------------------------------------------

def test_peak_rss_from_rusage_is_kilobytes_on_linux_and_bytes_on_macos():
    assert platform.peak_rss_from_rusage(2048, "linux") == 2048 * 1024
    assert platform.peak_rss_from_rusage(2048, "darwin") == 2048


def test_peak_rss_from_psutil_takes_the_windows_peak_working_set():
    WinInfo = namedtuple("pmem", "rss vms peak_wset wset")
    assert platform.peak_rss_from_memory_info(WinInfo(100, 200, 5000, 100)) == 5000
    LinuxInfo = namedtuple("pmem", "rss vms")
    assert platform.peak_rss_from_memory_info(LinuxInfo(123, 456)) == 123


def test_peak_rss_without_resource_asks_psutil(monkeypatch):
    monkeypatch.setitem(sys.modules, "resource", None)     # import fails, as on Windows
    monkeypatch.setattr(platform, "_vm_hwm_bytes", lambda: None)   # and there is no /proc
    Info = namedtuple("pmem", "rss vms peak_wset")
    monkeypatch.setattr(psutil.Process, "memory_info", lambda self: Info(10, 20, 7 << 20))
    assert platform.peak_rss_bytes() == 7 << 20


def test_vm_hwm_is_read_from_proc_status(tmp_path):
    status = tmp_path / "status"
    status.write_text("Name:\tpython\nVmPeak:\t  900 kB\nVmHWM:\t   1234 kB\nVmRSS:\t  1000 kB\n")
    assert platform._vm_hwm_bytes(str(status)) == 1234 * 1024
    assert platform._vm_hwm_bytes(str(tmp_path / "absent")) is None


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="no /proc on this system")
def test_a_small_child_of_a_big_parent_reports_its_own_peak():
    # ru_maxrss carries the spawning parent's resident set across exec; the peak must not.
    hold = bytearray(300 << 20)
    hold[::4096] = b"x" * len(hold[::4096])           # touch every page: resident
    code = "from tdpu_tui.engine.osutil.platform import peak_rss_bytes; print(peak_rss_bytes())"
    child = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                               check=True).stdout)
    del hold
    assert child < 150 << 20


def test_peak_rss_is_at_least_the_current_rss():
    assert platform.peak_rss_bytes() >= psutil.Process().memory_info().rss * 0.9


# -- load -----------------------------------------------------------------------------------

def test_load_average_is_the_one_minute_value(monkeypatch):
    monkeypatch.setattr(psutil, "getloadavg", lambda: (1.5, 2.0, 3.0), raising=False)
    assert platform.load_average() == 1.5


def test_load_average_is_unknown_where_psutil_has_none(monkeypatch):
    monkeypatch.delattr(psutil, "getloadavg", raising=False)
    assert platform.load_average() is None


def test_windows_load_of_zeros_is_not_known_yet(monkeypatch):
    monkeypatch.setattr(sys, "platform", "win32")
    monkeypatch.setattr(psutil, "getloadavg", lambda: (0.0, 0.0, 0.0), raising=False)
    assert platform.load_average() is None
    monkeypatch.setattr(psutil, "getloadavg", lambda: (0.25, 0.0, 0.0), raising=False)
    assert platform.load_average() == 0.25


def test_load_average_on_this_machine_matches_the_kernel():
    if not hasattr(os, "getloadavg"):
        pytest.skip("no kernel load average here")
    assert platform.load_average() == pytest.approx(os.getloadavg()[0], abs=1.0)


# -- liveness -------------------------------------------------------------------------------

def test_this_process_is_alive_and_a_finished_child_is_not():
    assert platform.process_alive(os.getpid())
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait(timeout=60)
    assert not platform.process_alive(child.pid)
    assert not platform.process_alive(None)
    assert not platform.process_alive(0)
    assert not platform.process_alive(-5)


def test_a_killed_child_not_yet_reaped_is_not_alive():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        child.kill()
        deadline = time.monotonic() + 10
        while psutil.Process(child.pid).status() != psutil.STATUS_ZOMBIE and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not platform.process_alive(child.pid)    # a zombie until waited for
    finally:
        child.wait(timeout=10)


def test_a_pid_started_after_the_record_is_a_reused_pid():
    me = os.getpid()
    started = platform.process_start_time()
    assert platform.process_alive(me, started_before=started)
    assert platform.process_alive(me, started_before=time.time())
    assert not platform.process_alive(me, started_before=started - 60)


def test_liveness_never_sends_a_signal(monkeypatch):
    def no_kill(*_args):
        raise AssertionError("os.kill must not be used: signal 0 is CTRL_C_EVENT on Windows")
    monkeypatch.setattr(os, "kill", no_kill)
    assert platform.process_alive(os.getpid())


def test_a_process_we_may_not_inspect_counts_as_alive(monkeypatch):
    def denied(self):
        raise psutil.AccessDenied(self.pid)
    monkeypatch.setattr(psutil.Process, "status", denied)
    assert platform.process_alive(os.getpid())


# -- positional reads ---------------------------------------------------------------------------

@pytest.fixture
def open_file(tmp_path):
    path = tmp_path / "f.log"
    path.write_bytes(b"0123456789abcdef")
    with open(path, "rb") as fh:
        fh.read(4)
        yield fh


def test_pread_reads_at_the_offset_and_leaves_the_position(open_file):
    assert platform.pread(open_file, 3, 10) == b"abc"
    assert open_file.read(2) == b"45"


def test_pread_without_os_pread_seeks_and_restores(open_file, monkeypatch):
    monkeypatch.delattr(os, "pread")
    assert platform.pread(open_file, 3, 10) == b"abc"
    assert open_file.tell() == 4
    assert open_file.read(2) == b"45"


def test_pread_by_seek_past_the_end_and_from_threads(open_file):
    assert platform.pread_by_seek(open_file, 8, 14) == b"ef"
    got = []
    threads = [threading.Thread(target=lambda i=i: got.append(platform.pread_by_seek(open_file, 2, 2 * i)))
               for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(got) == sorted(bytes(b"0123456789abcdef"[2 * i: 2 * i + 2]) for i in range(8))
    assert open_file.tell() == 4


def test_pread_by_seek_on_an_in_memory_file():
    fh = io.BytesIO(b"hello world")
    fh.seek(6)
    assert platform.pread_by_seek(fh, 5, 0) == b"hello"
    assert fh.read() == b"world"


# -- stop signals ---------------------------------------------------------------------------------

def test_posix_stop_signals_are_term_and_hup():
    assert platform.termination_signals() == [signal.SIGTERM, signal.SIGHUP]


def test_windows_stop_signals_are_term_and_break_where_they_exist(monkeypatch):
    monkeypatch.setattr(os, "name", "nt")
    monkeypatch.setattr(signal, "SIGBREAK", 21, raising=False)
    assert platform.termination_signals() == [signal.SIGTERM, 21]
    monkeypatch.delattr(signal, "SIGBREAK")
    assert platform.termination_signals() == [signal.SIGTERM]


def test_the_machine_is_named_with_its_cpu(monkeypatch):
    model = platform.cpu_model()
    assert model and "\n" not in model
    line = platform.machine_summary()
    assert line.startswith(model) and f"{os.cpu_count()} CPUs" in line
    import builtins
    real_open = builtins.open

    def no_proc(path, *a, **k):
        if str(path) == "/proc/cpuinfo":
            raise FileNotFoundError(path)
        return real_open(path, *a, **k)
    monkeypatch.setattr(builtins, "open", no_proc)       # as on Windows: Python's own answer
    assert platform.cpu_model()


def test_release_free_memory_trims_with_glibc_and_does_nothing_elsewhere(monkeypatch):
    monkeypatch.setattr(platform, "_TRIM", [])
    import numpy as np
    blocks = [np.ones(1 << 17) for _ in range(64)]      # 64 MiB in 1 MiB blocks, half freed
    del blocks[::2]
    assert platform.release_free_memory() in (True, False)    # True under glibc, False without
    monkeypatch.setattr(platform, "_TRIM", [])
    monkeypatch.setattr(platform.sys, "platform", "win32")
    assert platform.release_free_memory() is False
    assert platform._TRIM == [None]
