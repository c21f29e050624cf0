"""`fsutil`'s atomic writes leave the mode a plain write would: the replaced file's, or the umask's."""

import os
import stat
from pathlib import Path

import pytest

from tdpu_tui.engine.osutil import files as fsutil
from tdpu_tui.engine.osutil.files import (
    atomic_path, atomic_write_bytes, atomic_write_text, current_umask, mode_for,
)


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def umask():
    """Set the process umask for one test; the old one comes back afterwards."""
    old = os.umask(0o022)
    os.umask(old)

    def set_(value: int) -> None:
        os.umask(value)

    yield set_
    os.umask(old)


@pytest.mark.parametrize(("mask", "expected"), [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664),
                                                  (0o077, 0o600)])
def test_a_new_file_gets_0666_minus_the_umask(tmp_path, umask, mask, expected):
    umask(mask)
    text, data = tmp_path / "logs" / "export_log.md", tmp_path / "feed.bin"
    atomic_write_text(text, "# export\n")
    atomic_write_bytes(data, b"\x00\x01")
    assert oct(mode(text)) == oct(expected)
    assert oct(mode(data)) == oct(expected)
    assert text.read_text(encoding="utf-8") == "# export\n"


@pytest.mark.parametrize("existing", [0o640, 0o644, 0o600, 0o664, 0o444])
def test_a_rewritten_file_keeps_its_mode_whatever_the_umask(tmp_path, umask, existing):
    umask(0o077)
    path = tmp_path / "performance_report.md"
    path.write_text("old\n", encoding="utf-8")
    path.chmod(existing)
    inode = path.stat().st_ino
    atomic_write_text(path, "new\n")
    assert path.stat().st_ino != inode  # replaced by rename
    assert oct(mode(path)) == oct(existing)
    assert path.read_text(encoding="utf-8") == "new\n"


def test_atomic_path_sets_the_mode_even_if_the_caller_recreates_the_temp_file(tmp_path, umask):
    umask(0o022)
    path = tmp_path / "status.json"
    with atomic_path(path, fsync=False) as tmp:
        tmp.unlink()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, b"{}\n")
        os.close(fd)
    assert oct(mode(path)) == oct(0o644)
    assert path.read_bytes() == b"{}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["status.json"]


def test_a_symlink_is_written_through_and_stays_a_link(tmp_path, umask):
    umask(0o077)
    shared = tmp_path / "shared"
    shared.mkdir()
    real = shared / "icraft_compile_log.md"
    real.write_text("old\n", encoding="utf-8")
    real.chmod(0o644)
    link = tmp_path / "logs" / "icraft_compile_log.md"
    link.parent.mkdir()
    link.symlink_to(os.path.relpath(real, link.parent))
    atomic_write_text(link, "new\n")
    assert link.is_symlink()
    assert real.read_text(encoding="utf-8") == "new\n"
    assert oct(mode(real)) == oct(0o644)
    # the temp file was made beside the target, and nothing is left over in either directory
    assert sorted(p.name for p in shared.iterdir()) == ["icraft_compile_log.md"]
    assert sorted(p.name for p in link.parent.iterdir()) == ["icraft_compile_log.md"]


def test_a_dangling_symlink_creates_its_target_with_the_umask_mode(tmp_path, umask):
    umask(0o022)
    link = tmp_path / "run.json"
    link.symlink_to(tmp_path / "target.json")
    atomic_write_text(link, "{}\n")
    assert link.is_symlink()
    assert (tmp_path / "target.json").read_text(encoding="utf-8") == "{}\n"
    assert oct(mode(tmp_path / "target.json")) == oct(0o644)


def test_failure_leaves_the_old_file_and_its_mode(tmp_path):
    path = tmp_path / "a_precheck.csv"
    path.write_text("old\n", encoding="utf-8")
    path.chmod(0o640)
    with pytest.raises(KeyboardInterrupt), atomic_path(path) as tmp:
        tmp.write_text("half", encoding="utf-8")
        raise KeyboardInterrupt
    assert path.read_text(encoding="utf-8") == "old\n"
    assert oct(mode(path)) == oct(0o640)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_precheck.csv"]


def test_current_umask_reads_without_changing_it(umask, monkeypatch):
    umask(0o027)
    assert current_umask() == 0o027
    assert os.umask(0o027) == 0o027  # unchanged by the read

    def no_proc(*args, **kwargs):
        raise FileNotFoundError("/proc/self/status")

    # No /proc (macOS, a container without it): set and restored under the lock.
    monkeypatch.setattr(fsutil, "open", no_proc, raising=False)
    assert current_umask() == 0o027
    assert os.umask(0o027) == 0o027


def test_mode_for(tmp_path, umask):
    umask(0o002)
    assert mode_for(tmp_path / "new.md") == 0o664
    assert mode_for(tmp_path / "no_dir" / "new.md") == 0o664
    f = tmp_path / "old.md"
    f.write_text("x", encoding="utf-8")
    f.chmod(0o640)
    assert mode_for(f) == 0o640


def test_a_lock_file_is_made_for_the_group_like_the_files_it_guards(tmp_path):
    import os
    import stat

    from tdpu_tui.engine.osutil.files import lock_for
    old = os.umask(0o002)
    try:
        with lock_for(tmp_path / "icraft_compile_log.md"):
            pass
    finally:
        os.umask(old)
    lock = tmp_path / ".tdpu" / "icraft_compile_log.md.lock"  # not littering the records folder
    assert stat.S_IMODE(lock.stat().st_mode) == 0o664
