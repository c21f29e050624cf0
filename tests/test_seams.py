"""Locks through filelock, owned temp names and the removal of a killed run's leftovers, and
files confined to their directory (tdpu_tui/engine/osutil/files.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tdpu_tui.engine.osutil import files, platform
from tdpu_tui.engine.osutil.files import (
    FileLock, LockTimeout, confined, lock_for, owned_prefix, remove_leftovers, staging_dir,
)


# -- locks ----------------------------------------------------------------------------------

HOLD = """
import sys, time
from pathlib import Path
from tdpu_tui.engine.osutil.files import FileLock
with FileLock(Path(sys.argv[1])):
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def _hold_in_child(lock: Path, seconds: float) -> subprocess.Popen:
    child = subprocess.Popen([sys.executable, "-c", HOLD, str(lock), str(seconds)],
                             stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "held"
    return child


def test_a_lock_held_by_another_process_times_out_naming_the_lock_file(tmp_path):
    lock = tmp_path / ".bugs_found.md.lock"
    child = _hold_in_child(lock, 30)
    try:
        start = time.monotonic()
        with pytest.raises(LockTimeout) as info:
            with FileLock(lock, timeout=0.5):
                pass
        assert time.monotonic() - start < 10
        assert info.value.filename == str(lock)
        assert str(lock) in str(info.value) and "another process" in str(info.value)
    finally:
        child.kill()
        child.wait(timeout=10)


def test_a_lock_is_taken_once_its_holder_lets_go(tmp_path):
    lock = tmp_path / ".x.lock"
    child = _hold_in_child(lock, 0.5)
    try:
        start = time.monotonic()
        with FileLock(lock, timeout=30):
            waited = time.monotonic() - start
        assert 0.1 < waited < 25
    finally:
        child.wait(timeout=10)


def test_a_lock_is_taken_again_after_its_holder_was_killed(tmp_path):
    lock = tmp_path / ".x.lock"
    child = _hold_in_child(lock, 60)
    child.kill()
    child.wait(timeout=10)
    with FileLock(lock, timeout=5):
        pass


def test_threads_take_the_lock_in_turn(tmp_path):
    target = tmp_path / "counter.txt"
    target.write_text("0")

    def bump():
        for _ in range(20):
            with lock_for(target):
                n = int(target.read_text())
                time.sleep(0.001)
                target.write_text(str(n + 1))

    threads = [threading.Thread(target=bump) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert target.read_text() == "80"


def test_the_lock_file_sits_in_the_state_folder_beside_the_file_it_guards(tmp_path):
    lock = lock_for(tmp_path / "sub" / "status.json")
    assert lock.path == tmp_path / "sub" / ".tdpu" / "status.json.lock"
    with lock:
        assert lock.path.exists()


# -- owned temp names and leftovers -------------------------------------------------------------

def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait(timeout=60)
    return child.pid


def _leftover(directory: Path, prefix: str, pid: int, start: int, host: str | None = None,
              size: int = 1000) -> Path:
    host = host or files._host_label()
    d = directory / f"{prefix}{pid}.{start}.{host}.abc123"
    d.mkdir(parents=True)
    (d / "bitnet_b1.58_full.onnx.data").write_bytes(b"\0" * size)
    return d


def test_owned_prefix_names_this_process_this_start_and_this_host():
    prefix = owned_prefix(".staging-")
    pid, start, host, rest = prefix[len(".staging-"):].split(".", 3)
    assert int(pid) == os.getpid()
    assert abs(int(start) - platform.process_start_time()) <= 1
    assert host == files._host_label() and rest == ""


def test_staging_dir_carries_its_owner(tmp_path):
    with staging_dir(tmp_path) as d:
        assert d.name.startswith(owned_prefix(".staging-"))
        assert remove_leftovers(tmp_path) == []      # ours, alive: kept
        assert d.is_dir()
    assert not d.exists()


def test_leftovers_of_a_dead_owner_are_removed_with_their_size(tmp_path):
    dead = _dead_pid()
    old = _leftover(tmp_path, ".staging-", dead, int(time.time()) - 100, size=4096)
    step1 = tmp_path / f".validate-step1-{dead}.{int(time.time())}.{files._host_label()}.xyz.onnx"
    step1.write_bytes(b"x" * 10)
    removed = dict(remove_leftovers(tmp_path))
    assert removed == {old: 4096, step1: 10}
    assert not old.exists() and not step1.exists()


def test_leftovers_of_a_live_owner_another_host_or_no_owner_are_kept(tmp_path):
    me = os.getpid()
    live = _leftover(tmp_path, ".validate-", me, int(platform.process_start_time()))
    elsewhere = _leftover(tmp_path, ".staging-", _dead_pid(), int(time.time()), host="other-host")
    untagged = tmp_path / ".staging-k2j4h5"
    untagged.mkdir()
    user_file = tmp_path / "bitnet_b1.58_full.onnx"
    user_file.write_bytes(b"graph")
    assert remove_leftovers(tmp_path) == []
    assert live.exists() and elsewhere.exists() and untagged.exists() and user_file.exists()


def test_a_reused_pid_does_not_keep_a_leftover(tmp_path):
    # Our own pid, but recorded as started long before this process existed: the pid was reused.
    stale = _leftover(tmp_path, ".staging-", os.getpid(), int(platform.process_start_time()) - 3600)
    assert [p for p, _ in remove_leftovers(tmp_path)] == [stale]


def test_remove_leftovers_of_a_missing_directory_is_nothing(tmp_path):
    assert remove_leftovers(tmp_path / "nope") == []


# -- confined names -------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["x.data", "sub/x.data", "a/./b", "model-00001-of-00002.safetensors"])
def test_relative_names_inside_are_kept(tmp_path, name):
    assert confined(tmp_path, name) == tmp_path / name


@pytest.mark.parametrize("name", ["../x", "a/../../b", "/etc/passwd", "C:\\x", "C:x", "..\\x",
                                  "\\\\server\\share\\x", "\\x", "", "a\0b", 3, None])
def test_names_leaving_the_directory_are_refused(tmp_path, name):
    assert confined(tmp_path, name) is None


# -- a full disk names the file --------------------------------------------------------------------

def test_a_failed_write_in_atomic_path_names_the_target(tmp_path):
    import errno
    target = tmp_path / "report.md"
    with pytest.raises(OSError) as info:
        with files.atomic_path(target):
            raise OSError(errno.ENOSPC, "No space left on device")
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(target)
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_in_a_staging_dir_names_the_output_folder(tmp_path):
    import errno
    with pytest.raises(OSError) as info:
        with staging_dir(tmp_path):
            raise OSError(errno.ENOSPC, "No space left on device")
    assert info.value.filename == str(tmp_path)
    assert list(tmp_path.iterdir()) == []
