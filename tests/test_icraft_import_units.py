"""Reading what comes back from the Icraft host: log encodings, zip members, command outcomes."""

from __future__ import annotations

import codecs
import stat
import zipfile

import pytest

from tdpu_tui.engine.icraft import importer as imp


def test_log_lines_read_gbk_crlf_and_utf16_with_bom(tmp_path):
    gbk = tmp_path / "gbk.log"
    gbk.write_bytes("[12/01/26 10:00:00.1] [I] 开始\r\n[12/01/26 10:00:00.2] [F] 21002\r\n"
                    .encode("gbk"))
    assert list(imp.log_lines(gbk)) == ["[12/01/26 10:00:00.1] [I] 开始",
                                        "[12/01/26 10:00:00.2] [F] 21002"]
    u16 = tmp_path / "u16.log"
    u16.write_bytes(codecs.BOM_UTF16_LE + "[E] 执行以下命令时捕获到错误码26001:\r\nicraft-run\r\n"
                    .encode("utf-16-le"))
    assert list(imp.log_lines(u16)) == ["[E] 执行以下命令时捕获到错误码26001:", "icraft-run"]
    bom8 = tmp_path / "u8.log"
    bom8.write_bytes(codecs.BOM_UTF8 + b"[I] ok")
    assert list(imp.log_lines(bom8)) == ["[I] ok"]


def test_a_command_that_exits_0_after_a_bare_fatal_line_failed(tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "optimize.console.log").write_bytes(b"[I] start\r\n[F] 21002\r\n")
    (logs / "optimize.exit").write_text("0\r\n")
    out = imp.read_command(tmp_path, "net", "optimize")
    assert out.ran and not out.ok and out.error.code == 21002 and out.exit_status == 0
    assert "21002" in out.reason()
    assert not imp.read_command(tmp_path, "net", "run").ran


@pytest.mark.parametrize("member", ["/etc/evil", "C:/evil.txt", "a/../../evil", "..\\evil"])
def test_zip_members_that_escape_are_refused_before_anything_is_written(tmp_path, member):
    archive = tmp_path / "b.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("ok/bundle.json", "{}")
        zf.writestr(member, "x")
    dest = tmp_path / "project" / "unpacked"
    with pytest.raises(imp.BundleError, match="refused"):
        imp.safe_extract(archive, dest)
    assert not dest.exists()
    assert not (tmp_path / "evil").exists() and not (tmp_path / "project" / "evil").exists()


def test_a_symlink_member_is_refused(tmp_path):
    archive = tmp_path / "l.zip"
    info = zipfile.ZipInfo("ok/link")
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr(info, "/etc/passwd")
    with pytest.raises(imp.BundleError, match="symbolic link"):
        imp.safe_extract(archive, tmp_path / "dest")


def test_place_hard_links_else_copies_and_does_not_copy_an_unchanged_source_again(tmp_path,
                                                                                  monkeypatch):
    import os

    from tdpu_tui.engine.icraft import bundle as bd

    src = tmp_path / "g.onnx.data"
    src.write_bytes(b"w" * 1000)
    linked = bd.place(src, tmp_path / "b1" / src.name)
    assert linked.how == "hard link" and linked.bytes == 1000
    assert os.path.samefile(src, linked.path)

    def no_links(*_a):
        raise OSError(18, "Invalid cross-device link")
    monkeypatch.setattr(bd.os, "link", no_links)
    copied = bd.place(src, tmp_path / "b2" / src.name)
    assert copied.how == "copy" and copied.path.read_bytes() == src.read_bytes()
    inode = copied.path.stat().st_ino
    again = bd.place(src, tmp_path / "b2" / src.name)
    assert again.how == "copy" and again.path.stat().st_ino == inode     # not copied again
    os.utime(src, (copied.path.stat().st_mtime + 10,) * 2)               # the source changed
    src.write_bytes(b"v" * 1000)
    os.utime(src, (copied.path.stat().st_mtime + 10,) * 2)
    assert bd.place(src, tmp_path / "b2" / src.name).path.read_bytes() == b"v" * 1000
