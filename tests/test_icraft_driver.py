"""The Icraft driver under runaway output and time: bounded memory, a deadline that holds, no
false timeouts, failure read from bare `[F]`/`[E]` lines; and the process-tree helpers."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from tdpu_tui.engine.icraft import driver as ic
from tdpu_tui.engine.icraft import proc as proc_tree


def script(tmp_path: Path, body: str) -> list[str]:
    path = tmp_path / "child.py"
    path.write_text(textwrap.dedent(body), encoding="utf-8")
    return [sys.executable, str(path)]


def rss() -> int:
    return psutil.Process().memory_info().rss


def run(argv, tmp_path, **kw):
    kw.setdefault("timeout_s", 60)
    kw.setdefault("on_line", lambda *a: None)
    return ic.run_icraft(argv, cwd=tmp_path, log_dirs=kw.pop("log_dirs", []), **kw)


def test_a_bare_fatal_line_then_exit_0_fails_with_its_code(tmp_path):
    res = run(script(tmp_path, 'print("[F] 21002")\n'), tmp_path)
    assert res.returncode == 0 and not res.ok
    assert res.error_code == 21002 and "21002" in res.reason()


@pytest.mark.parametrize("line", ["[E] 执行以下命令时捕获到错误码26001:", "[E] cannot open model",
                                  "[12/01/26 10:00:00.123] [E] cannot open model", "  [f] 26000"])
def test_error_and_fatal_marks_fail_with_or_without_timestamp(line):
    scan = ic.ErrorScan()
    scan.feed(line)
    assert scan.failed


def test_info_and_warning_lines_are_not_failures():
    scan = ic.ErrorScan()
    for line in ("[I] ok", "[W] slow", "[2026-12-01 10:00:00.1] [info] fine", "Errors: 0 found"):
        scan.feed(line)
    assert not scan.failed


def test_line_cutter_keeps_a_bounded_prefix_and_says_how_much_was_cut():
    cut = ic.LineCutter(limit=10)
    lines = cut.feed(b"short\n" + b"x" * 25) + cut.feed(b"yy\nlast")
    assert lines[0] == "short"
    assert lines[1] == "x" * 10 + ic.cut_note(17)
    assert cut.flush() == ["last"]


@pytest.mark.slow
def test_endless_output_is_timed_out_on_time_with_bounded_memory(tmp_path):
    argv = script(tmp_path, """
        import signal, sys
        signal.signal(signal.SIGTERM, signal.SIG_IGN)   # only a kill ends it
        line = b"[I] " + b"x" * 2000 + b"\\n"
        while True:
            sys.stdout.buffer.write(line * 64)
        """)
    before = rss()
    start = time.monotonic()
    shown = []
    res = run(argv, tmp_path, timeout_s=3, on_line=lambda line, *a: shown.append(len(line)))
    elapsed = time.monotonic() - start
    assert res.timed_out and not res.ok and "timed out after 3 s" in res.reason()
    assert elapsed < 3 + 2.5, elapsed          # the kill comes within about 1 s of the deadline
    assert rss() - before < 150 << 20
    assert len(res.tail) <= 30 + ic.FAILURE_LINES
    assert all(len(line) <= ic.MAX_LINE_BYTES + 64 for line in res.tail)


@pytest.mark.slow
def test_one_huge_line_is_cut_and_costs_little_memory(tmp_path):
    argv = script(tmp_path, """
        import sys
        chunk = b"y" * (1 << 20)
        for _ in range(200):
            sys.stdout.buffer.write(chunk)
        sys.stdout.buffer.write(b"\\n[I] done\\n")
        """)
    before = rss()
    res = run(argv, tmp_path, timeout_s=120)
    assert res.ok, res.reason()
    assert rss() - before < 100 << 20
    big = next(line for line in res.tail if line.startswith("yyy"))
    assert big == "y" * ic.MAX_LINE_BYTES + ic.cut_note(200 * (1 << 20) - ic.MAX_LINE_BYTES)
    assert "[I] done" in res.tail


@pytest.mark.slow
def test_a_fast_child_with_large_output_is_not_timed_out_by_slow_handling(tmp_path):
    argv = script(tmp_path, """
        import sys
        sys.stdout.buffer.write(b"[I] line of output\\n" * 400_000)
        """)

    def slow(*_a):
        time.sleep(0.002)          # a slow consumer (a terminal, the app)

    start = time.monotonic()
    res = run(argv, tmp_path, timeout_s=10, on_line=slow)
    elapsed = time.monotonic() - start
    assert not res.timed_out and res.ok, res.reason()
    # What counts is the child's own time, not tdpu's handling of its lines.
    assert res.seconds < 10 and res.seconds < elapsed


def test_stray_descendants_are_ended_after_the_child_exits(tmp_path):
    pidfile = tmp_path / "stray.pid"
    argv = script(tmp_path, f"""
        import subprocess, sys
        p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        open({str(pidfile)!r}, "w").write(str(p.pid))
        """)
    res = run(argv, tmp_path)
    assert res.stray_killed
    pid = int(pidfile.read_text())
    deadline = time.monotonic() + 5
    while psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_popen_kwargs_start_a_new_group_on_either_system(monkeypatch):
    monkeypatch.setattr(proc_tree, "IS_WINDOWS", False)
    assert proc_tree.popen_kwargs() == {"start_new_session": True}
    monkeypatch.setattr(proc_tree, "IS_WINDOWS", True)
    assert proc_tree.popen_kwargs() == {"creationflags": 0x200}    # CREATE_NEW_PROCESS_GROUP


def test_tree_end_takes_children_that_ignore_sigterm(tmp_path):
    pidfile = tmp_path / "kid.pid"
    child = subprocess.Popen(script(tmp_path, f"""
        import signal, subprocess, sys, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"
        p = subprocess.Popen([sys.executable, "-c", code])
        open({str(pidfile)!r}, "w").write(str(p.pid))
        time.sleep(60)
        """), **proc_tree.popen_kwargs())
    deadline = time.monotonic() + 60        # a loaded machine starts Python slowly
    while not (pidfile.exists() and pidfile.read_text()):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    kid = int(pidfile.read_text())
    tree = proc_tree.Tree(child.pid)
    tree.end(grace=0.3)
    child.wait(timeout=15)
    deadline = time.monotonic() + 10
    while psutil.pid_exists(kid) and psutil.Process(kid).status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline, "the grandchild survived"
        time.sleep(0.05)
    assert not tree.alive()


@pytest.mark.slow
def test_a_flood_into_a_log_file_is_bounded_and_its_last_fatal_line_still_counts(tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    argv = script(tmp_path, f"""
        with open({str(logs / "net_parse.log")!r}, "wb") as fh:
            line = b"[I] " + b"z" * 1000 + b"\\n"
            for _ in range(100_000):
                fh.write(line)
            fh.write(b"[F] 26001\\n")
        """)
    before = rss()
    res = run(argv, tmp_path, log_dirs=[logs], timeout_s=120)
    assert not res.ok and res.error_code == 26001
    assert rss() - before < 150 << 20
    assert len(res.tail) <= 30 + ic.FAILURE_LINES
