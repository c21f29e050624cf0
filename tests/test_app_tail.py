"""The log follower behind the app's log panel (tdpu_tui/engine/osutil/tail.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from tdpu_tui.engine.osutil.tail import EchoFilter, Tailer, decode_line


def _lines(tailer: Tailer) -> list[str]:
    tailer.poll()
    return [line for _label, lines in tailer.drain() for line in lines]


def test_new_lines_arrive_in_order_and_partial_lines_wait_for_their_newline(tmp_path):
    log = tmp_path / "a.log"
    log.write_bytes(b"one\ntwo\nthr")
    t = Tailer()
    t.follow(log)
    assert _lines(t) == ["one", "two"]
    with open(log, "ab") as fh:
        fh.write(b"ee\r\nfour\n")
    assert _lines(t) == ["three", "four"]
    assert _lines(t) == []


def test_follow_without_history_skips_existing_content(tmp_path):
    log = tmp_path / "a.log"
    log.write_text("old\n")
    t = Tailer()
    t.follow(log, from_start=False)
    with open(log, "a") as fh:
        fh.write("new\n")
    assert _lines(t) == ["new"]


def test_truncated_file_is_read_again_from_its_start(tmp_path):
    log = tmp_path / "icraft_parse.log"
    log.write_text("a long first run line\nsecond line of the first run\n")
    t = Tailer()
    t.follow(log)
    assert len(_lines(t)) == 2
    log.write_text("run 2\n")  # shorter than what was read: truncation
    assert _lines(t) == ["run 2"]
    assert t.reopened == 1


def test_file_rewritten_longer_between_polls_is_caught_by_its_first_bytes(tmp_path):
    log = tmp_path / "x.log"
    log.write_text("[11/26/26 08:00:00.001] [I] run 1\n")
    t = Tailer()
    t.follow(log)
    _lines(t)
    with open(log, "w") as fh:  # same inode, already longer than before
        fh.write("[11/26/26 09:00:00.002] [I] run 2\n[11/26/26 09:00:00.003] [E] boom\n")
    assert _lines(t) == ["[11/26/26 09:00:00.002] [I] run 2", "[11/26/26 09:00:00.003] [E] boom"]


def test_rotated_file_is_finished_then_the_new_one_is_followed(tmp_path):
    log = tmp_path / "r.log"
    log.write_text("first\n")
    t = Tailer()
    t.follow(log)
    assert _lines(t) == ["first"]
    with open(log, "a") as fh:
        fh.write("last of old\n")
    os.rename(log, tmp_path / "r.log.1")
    log.write_text("fresh\n")
    assert _lines(t) == ["last of old", "fresh"]


def test_gbk_and_broken_bytes_are_decoded_line_by_line():
    assert decode_line("错误码21002".encode("gbk")) == "错误码21002"
    assert decode_line("错误码".encode()) == "错误码"
    assert decode_line(b"ok \xff\xfe\xff end") == "ok \ufffd\ufffd\ufffd end"


def test_directory_follow_picks_up_files_created_later(tmp_path):
    logs = tmp_path / "logs"
    t = Tailer()
    t.follow_dir(logs)
    assert _lines(t) == []
    (logs / "sub").mkdir(parents=True)
    (logs / "sub" / "net_parse.log").write_text("[I] parsed\n")
    (logs / "ignored.csv").write_text("x\n")
    t.poll()
    batches = t.drain()
    assert batches == [("sub/net_parse.log", ["[I] parsed"])]


def test_back_pressure_keeps_the_queue_bounded_and_loses_nothing(tmp_path):
    log = tmp_path / "big.log"
    n = 30_000
    log.write_text("".join(f"line {i}\n" for i in range(n)))
    t = Tailer(max_pending=1_000, chunk_size=4096, interval=0.01).start()
    t.follow(log)
    got: list[str] = []
    deadline = time.monotonic() + 20
    peak = 0
    while len(got) < n and time.monotonic() < deadline:
        peak = max(peak, t.pending)
        for _label, lines in t.drain(500):
            got.extend(lines)
        time.sleep(0.001)
    t.stop()
    assert got == [f"line {i}" for i in range(n)]
    # The reader stops when the queue is full; one chunk of lines may overshoot.
    assert peak <= 1_000 + 4096 // len("line 0\n") + 1


def test_thread_follows_a_file_written_by_another_process(tmp_path):
    log = tmp_path / "proc.log"
    t = Tailer(interval=0.01).start()
    t.follow(log)
    code = ("import sys,time\nwith open(sys.argv[1], 'w', buffering=1) as f:\n"
            "    for i in range(200):\n        f.write(f'p {i}\\n')\n        time.sleep(0.001)\n")
    subprocess.run([sys.executable, "-c", code, str(log)], check=True)
    got: list[str] = []
    deadline = time.monotonic() + 10
    while len(got) < 200 and time.monotonic() < deadline:
        for _label, lines in t.drain():
            got.extend(lines)
        time.sleep(0.01)
    t.stop()
    assert got == [f"p {i}" for i in range(200)]


def test_directory_without_history_then_unfollowed(tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / "export.log").write_text("last night\n")
    t = Tailer()
    t.follow_dir(runs, label=lambda p: p.stem, history=False)
    assert _lines(t) == []
    with open(runs / "export.log", "a") as fh:
        fh.write("now\n")
    (runs / "validate.log").write_text("new file\n")
    t.poll()
    assert t.drain() == [("export", ["now"]), ("validate", ["new file"])]
    t.unfollow_dir(runs)
    (runs / "replace.log").write_text("not followed\n")
    with open(runs / "export.log", "a") as fh:
        fh.write("not followed either\n")
    assert _lines(t) == [] and t.paths == []


def test_echo_filter_shows_a_line_from_two_roads_once_and_keeps_same_road_repeats():
    echo = EchoFilter()
    assert echo.fresh("stdout", ["[I] a", "[I] b"]) == ["[I] a", "[I] b"]
    assert echo.fresh("file", ["[I] a", "[I] b", "[I] c"]) == ["[I] c"]
    assert echo.fresh("stdout", ["[I] c", "[I] c"]) == ["[I] c"]  # the echo, then a new repeat
    assert echo.fresh("file", ["waiting", "waiting", ""]) == ["waiting", "waiting", ""]


def test_drain_files_names_the_file_of_each_batch(tmp_path):
    a, b = tmp_path / "a.log", tmp_path / "b.log"
    a.write_text("one\n")
    b.write_text("two\n")
    t = Tailer()
    t.follow(a, "same")
    t.follow(b, "same")
    t.poll()
    assert t.drain_files() == [("same", a, ["one"]), ("same", b, ["two"])]
