"""Icraft's Windows build from WSL: detection, path conversion, and a fake interop world
(fake `wslpath`, `icraft.exe` that takes only Windows paths, `taskkill.exe`)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "fixtures" / "icraft"))
import helpers  # noqa: E402

from tdpu_tui.engine.core.artifacts import Artifacts  # noqa: E402
from tdpu_tui.engine.core.config import load_config  # noqa: E402
from tdpu_tui.engine.core.events import Status  # noqa: E402
from tdpu_tui.engine.core.pipeline import Pipeline  # noqa: E402
from tdpu_tui.engine.icraft import wsl  # noqa: E402
from tdpu_tui.engine.records.compile_log import read_section  # noqa: E402
from tdpu_tui.engine.stages.optimize import OptimizeStage  # noqa: E402
from tdpu_tui.engine.stages.parse import ParseStage  # noqa: E402

UNC = "\\\\wsl.localhost\\FakeDistro"


def test_wsl_is_detected_from_the_environment_or_the_kernel(tmp_path):
    plain = tmp_path / "osrelease"
    plain.write_text("6.1.0-generic\n")
    assert not wsl.under_wsl({}, plain)
    assert wsl.under_wsl({"WSL_DISTRO_NAME": "Ubuntu"}, plain)
    assert wsl.under_wsl({"WSL_INTEROP": "/run/WSL/1_interop"}, plain)
    ms = tmp_path / "osrelease-ms"
    ms.write_text("5.15.153.1-microsoft-standard-WSL2\n")
    assert wsl.under_wsl({}, ms)
    assert not wsl.under_wsl({}, tmp_path / "missing")


@pytest.mark.parametrize("exe,windows", [("icraft.exe", True), ("/opt/x/ICRAFT.EXE", True),
                                         ("/mnt/c/Icraft/bin/icraft", True),
                                         ("/usr/bin/icraft", False), ("/mnt/data/icraft", False)])
def test_windows_programs_are_recognised_by_name_or_drive_mount(exe, windows):
    assert wsl.is_windows_program(exe) is windows


@pytest.fixture
def interop(monkeypatch, tmp_path):
    """The environment of a WSL session with the fake interop tools first on PATH."""
    env = helpers.fake_env()
    monkeypatch.setenv("PATH", env["PATH"])
    monkeypatch.setenv("WSL_DISTRO_NAME", "FakeDistro")
    monkeypatch.setenv("FAKE_ICRAFT_MODE", "ok")
    monkeypatch.setenv("FAKE_TASKKILL_LOG", str(tmp_path / "taskkill.log"))
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    return monkeypatch


def test_path_arguments_are_converted_with_wslpath(interop, tmp_path):
    argv = ["/x/icraft.exe", "run", "--json", "/p/a.json", "--input", "/p/i1.ftmp;/mnt/d/i2.ftmp",
            "--log_path", "/p/logs/", "--backends", "Host", "--dump_output"]
    win = wsl.windows_argv(argv)
    assert win == ["/x/icraft.exe", "run", "--json", UNC + "\\p\\a.json",
                   "--input", UNC + "\\p\\i1.ftmp;D:\\i2.ftmp", "--log_path", UNC + "\\p\\logs\\",
                   "--backends", "Host", "--dump_output"]
    assert wsl.shown_argv(win)[0] == UNC + "\\x\\icraft.exe"


def project(tmp_path, **kw):
    cfg = load_config(helpers.write_config(tmp_path, bin="icraft.exe", **kw))
    paths = Artifacts.of(cfg)
    helpers.save_export(paths.output, helpers.clean_graph(), "icraft")
    return cfg, paths


def run(cfg, names):
    pipe = Pipeline(cfg, stages=[ParseStage(), OptimizeStage()], on_event=lambda e: None)
    return {r.name: r for r in pipe.run(names).results}


def test_parse_and_optimize_run_through_interop_with_windows_paths(interop, tmp_path):
    cfg, paths = project(tmp_path)
    results = run(cfg, ["parse", "optimize"])
    assert results["parse"].status is Status.OK, results["parse"].message
    assert results["optimize"].status is Status.OK, results["optimize"].message
    assert (paths.icraft_dir / "tiny_net_optimized.json").exists()   # read back through Linux
    section = read_section(paths.compile_log, "parse")
    assert "Command (as Windows saw it):" in section
    assert f"{UNC}\\" in section and "--network" in section
    assert "run through WSL interop" in section
    assert "开始执行 parse 组件" in section or "parse 完成" in section      # GBK decoded


def test_without_interop_the_windows_program_rejects_posix_paths(monkeypatch, interop, tmp_path):
    monkeypatch.setattr(wsl, "under_wsl", lambda *a, **k: False)
    cfg, paths = project(tmp_path)
    results = run(cfg, ["parse"])
    assert results["parse"].status is Status.FAILED
    assert "26001" in results["parse"].message
    assert "文件或路径不存在" in read_section(paths.compile_log, "parse")


def test_an_icraft_failure_under_interop_is_read_from_its_gbk_output(interop, tmp_path):
    interop.setenv("FAKE_ICRAFT_MODE", "parse:fail21002")
    cfg, paths = project(tmp_path)
    results = run(cfg, ["parse", "optimize"])
    assert results["parse"].status is Status.FAILED and "21002" in results["parse"].message
    assert results["optimize"].status is Status.SKIPPED


def _wait_gone(pid: int, seconds: float = 10) -> bool:
    deadline = time.monotonic() + seconds
    while not helpers.process_gone(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@pytest.mark.parametrize("with_powershell", [False, True])
def test_a_timeout_ends_the_windows_process_tree_with_taskkill(interop, tmp_path, with_powershell):
    if with_powershell:     # the PID found by command line, as powershell.exe reports it
        interop.setenv("PATH", str(helpers.HERE / "ps") + ":" + __import__("os").environ["PATH"])
    win_pid = tmp_path / "win.pid"
    component = tmp_path / "component.pid"
    interop.setenv("FAKE_ICRAFT_MODE", "hang")
    interop.setenv("FAKE_ICRAFT_PIDFILE", str(component))
    interop.setenv("FAKE_WIN_PIDFILE", str(win_pid))
    cfg, paths = project(tmp_path, timeout_s=3)
    start = time.monotonic()
    results = run(cfg, ["parse"])
    assert time.monotonic() - start < 30
    assert results["parse"].status is Status.FAILED and "timed out" in results["parse"].message
    calls = [json.loads(line) for line in (tmp_path / "taskkill.log").read_text().splitlines()]
    assert calls and calls[0][:2] == ["/T", "/F"]
    if with_powershell:
        assert calls[0][2:] == ["/PID", win_pid.read_text().strip()]
    else:
        assert calls[0][2:] == ["/IM", "icraft.exe"]
    # The Windows process and what it started are gone: only taskkill could end them (they are
    # not in the Linux tree of the interop relay).
    assert _wait_gone(int(win_pid.read_text()))
    assert _wait_gone(int(component.read_text()))
    assert "taskkill.exe /T /F" in read_section(paths.compile_log, "parse")



def test_under_wsl_the_default_name_finds_the_windows_program(interop, tmp_path):
    from tdpu_tui.engine.icraft import driver as ic

    cfg, paths = project(tmp_path)
    cfg.icraft.bin = "icraft"           # the shipped default, and only icraft.exe on PATH
    tools = tmp_path / "win"
    tools.mkdir()
    for name in ("icraft.exe", "wslpath"):
        (tools / name).write_text(f'#!/bin/sh\nexec "{sys.executable}" "{helpers.HERE / name}" "$@"\n')
        (tools / name).chmod(0o755)
    interop.setenv("PATH", f"{tools}:/usr/bin:/bin")
    assert ic.find_cli(cfg) == tools / "icraft.exe"
    results = run(cfg, ["parse"])
    assert results["parse"].status is Status.OK, results["parse"].message
    assert "run through WSL interop" in read_section(paths.compile_log, "parse")

    interop.setattr(wsl, "under_wsl", lambda *a, **k: False)     # not WSL: `icraft` is `icraft`
    assert ic.find_cli(cfg) is None
    assert ic.missing_cli_reason(cfg) == "Icraft CLI 'icraft' not found on PATH; set [icraft].bin"
    interop.undo()
    interop.setenv("WSL_DISTRO_NAME", "FakeDistro")
    interop.setenv("PATH", "/usr/bin:/bin")
    assert ic.find_cli(cfg) is None
    assert "(nor 'icraft.exe' on the Windows PATH)" in ic.missing_cli_reason(cfg)
