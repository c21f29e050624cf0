"""Issue #12 and #13 items 1-3 checked against stand-ins written independently of
tests/fixtures/icraft/ (in tests/fixtures/icraft_independent/, from SPEC §6/§10 and the Icraft
manuals only): an `icraft` (Linux build), an `icraft.exe` seen through WSL interop (rejects
POSIX paths with 26001, maps Windows paths back, a Windows PID unlike the relay's, its tree
outside the relay's), `wslpath` and `taskkill.exe`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import psutil
import pytest

from tdpu_tui.engine.icraft import driver as ic
from tdpu_tui.engine.icraft import importer as imp
from tdpu_tui.engine.icraft import wsl

FAKES = Path(__file__).parent / "fixtures" / "icraft_independent"
ICRAFT = FAKES / "icraft"
sys.path.insert(0, str(FAKES))
import winsim  # noqa: E402


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("IC2_", "WSL_", "ICRAFT"))}
    env.update(extra)
    return env


def _run(argv, tmp: Path, timeout_s: float = 20.0, **env) -> tuple[ic.RunResult, list[str]]:
    lines: list[str] = []
    res = ic.run_icraft([str(a) for a in argv], cwd=tmp, log_dirs=[tmp / "logs"],
                        timeout_s=timeout_s, on_line=lambda ln, _lv, _s: lines.append(ln),
                        env=_env(**env))
    return res, lines


def _parse_argv(tmp: Path, exe=ICRAFT) -> list[str]:
    net = tmp / "m.onnx"
    net.write_bytes(b"not a real graph")
    return [str(exe), "parse", "--net_name", "n", "--framework", "Onnx", "--network", str(net),
            "--jr_path", f"{tmp}/", "--log_path", f"{tmp}/logs/", "--inputs", "1,16,64",
            "--inputs_layout", "FD"]


# --- #13.3: failure read from [F]/[E] lines, whatever the exit status ----------------------

@pytest.mark.parametrize("fail", ["parse:21002:exit0:bare", "parse:21002:exit0",
                                  "parse:26001:exit0:logonly", "parse:21002"])
@pytest.mark.parametrize("win", ["0", "1"])
def test_failure_lines_beat_exit_status(tmp_path, fail, win):
    res, _ = _run(_parse_argv(tmp_path), tmp_path, IC2_FAIL=fail, IC2_WIN=win)
    code = int(fail.split(":")[1])
    assert not res.ok and res.error_code == code, (res.returncode, res.tail)
    if "exit0" in fail:
        assert res.returncode == 0
    else:
        assert res.returncode == code & 0xFF


@pytest.mark.parametrize("line", [
    "[F] 21002", "  [F] 21002\r", "\ufeff[F] 21002", "[12/02/26 16:00:01.123] [F] 21002",
    "[2026-12-02 16:00:01.123] [fatal] 21002", "[10/19/22 10:45:03] [stdout]-[F] 21002",
    "[2026-12-02 16:00:01.123] [icraft-run] [critical] 21002",
])
def test_fatal_line_forms(line):
    scan = ic.ErrorScan()
    scan.feed(ic.decode_line(line.encode("utf-8")))
    assert scan.failed and scan.code == 21002, line


def test_gbk_crlf_caught_code_line():
    scan = ic.ErrorScan()
    for raw in ("[E] 执行以下命令时捕获到错误码26001:\r\n".encode("gbk"), b"icraft-run --json x\r\n"):
        scan.feed(ic.decode_line(raw))
    assert scan.failed and scan.code == 26001


def test_info_lines_are_not_failures():
    for line in ("[12/02/26 16:00:01.123] [I] 26001 nodes", "[2026-12-02 16:00:01.1] [info] E=3",
                 "[W] error-free", "Icraft-run 运行完成"):
        assert not ic.is_failure_line(line), line


# --- #13.1/#13.2: floods bounded in time and memory, no false timeouts --------------------

def _rss() -> int:
    return psutil.Process().memory_info().rss


@pytest.mark.parametrize("flood", ["parse", "parse:line", "parse:log"])
def test_flood_deadline_holds_memory_bounded(tmp_path, flood):
    before = _rss()
    t0 = time.monotonic()
    res, lines = _run(_parse_argv(tmp_path), tmp_path, timeout_s=1.5, IC2_FLOOD=flood)
    took = time.monotonic() - t0
    assert res.timed_out and not res.ok
    assert res.seconds < 1.5 + 1.0, res.seconds      # killed within 1 s of the deadline
    assert took < 1.5 + 3.0, took                    # and the call returns soon after
    assert _rss() - before < 150 << 20
    assert all(len(ln) <= ic.MAX_LINE_BYTES + 80 for ln in lines)
    assert sum(len(t) for t in res.tail) < 200_000


def test_large_output_quick_child_is_not_timed_out(tmp_path):
    res, _ = _run(_parse_argv(tmp_path), tmp_path, timeout_s=15, IC2_BIG="parse:60")
    assert res.ok and not res.timed_out, res.reason()


# --- WSL detection and path conversion (SPEC §10) ------------------------------------------

def test_folder_without_spaces_keeps_its_backslash(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", f"{FAKES}{os.pathsep}{os.environ['PATH']}")
    d = tmp_path / "plain"
    d.mkdir()
    out = wsl.windows_argv(["icraft.exe", "parse", "--jr_path", f"{d}/"])
    assert out[3].endswith("\\plain\\") and " " not in out[3]


def test_under_wsl_variants(tmp_path):
    rel = tmp_path / "osrelease"
    rel.write_text("5.15.167.4-microsoft-standard-WSL2\n")
    none = tmp_path / "none"
    assert wsl.under_wsl({"WSL_DISTRO_NAME": "Ubuntu"}, none)
    assert wsl.under_wsl({"WSL_INTEROP": "/run/WSL/12_interop"}, none)
    assert wsl.under_wsl({}, rel)
    plain = tmp_path / "plain"
    plain.write_text("6.8.0-45-generic\n")
    assert not wsl.under_wsl({}, plain)
    assert not wsl.under_wsl({"WSL_DISTRO_NAME": ""}, none)


@pytest.mark.parametrize("crlf", ["0", "1"])
@pytest.mark.parametrize("unc", ["wsl$", "wsl.localhost"])
def test_windows_argv_spaces_non_ascii(tmp_path, monkeypatch, crlf, unc):
    d = tmp_path / "带 空格 dir"
    d.mkdir()
    (d / "m.onnx").write_bytes(b"x")
    monkeypatch.setenv("PATH", f"{FAKES}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("IC2_WSLPATH_CRLF", crlf)
    monkeypatch.setenv("IC2_UNC", unc)
    monkeypatch.setenv("IC2_WSLPATH_STRICT", "1")
    argv = ["/mnt/c/Icraft/CLI/bin/icraft.exe", "run", "--json", str(d / "m.onnx"),
            "--input", f"{d / 'm.onnx'};{d / 'm.onnx'}", "--log_path", f"{d}/", "--backends", "Host"]
    out = wsl.windows_argv(argv)
    host = f"\\\\{unc}\\Ubuntu"
    want = host + str(d / "m.onnx").replace("/", "\\")
    assert out[3] == want and out[5] == f"{want};{want}"
    # a folder with white space ends in '/': WSL quotes it without escaping a trailing '\'
    assert out[7] == host + str(d).replace("/", "\\") + "/"
    assert out[8:] == ["--backends", "Host"] and all("\r" not in a for a in out)
    assert wsl.shown_argv(out)[0] == "C:\\Icraft\\CLI\\bin\\icraft.exe"


# --- hand-off zips as they come back --------------------------------------------------------

def _bundle_stub(folder: Path) -> None:
    (folder / "logs").mkdir(parents=True)
    (folder / "bundle.json").write_text(json.dumps({"format": "tdpu-icraft-bundle/1"}))
    (folder / "logs" / "parse.console.log").write_bytes("[F] 21002\r\n".encode("gbk"))


@pytest.mark.parametrize("style", ["posix-top", "backslash-top", "backslash-dirs", "flat",
                                   "non-ascii-top"])
def test_zip_variants(tmp_path, style):
    src = tmp_path / "src"
    _bundle_stub(src)
    z = tmp_path / "b.zip"
    top = {"posix-top": "icraft_output/", "backslash-top": "icraft_output\\",
           "backslash-dirs": "icraft_output\\", "flat": "", "non-ascii-top": "结果 folder/"}[style]
    sep = "\\" if "backslash" in style else "/"
    with zipfile.ZipFile(z, "w") as zf:
        if style == "backslash-dirs":
            zf.writestr(zipfile.ZipInfo(top), b"")
            zf.writestr(zipfile.ZipInfo(f"{top}logs{sep}"), b"")
        for p in sorted(src.rglob("*")):
            if p.is_file():
                zf.write(p, top + sep.join(p.relative_to(src).parts))
    root = imp.find_root(imp.safe_extract(z, tmp_path / "out"))
    assert (root / "bundle.json").is_file()
    assert (root / "logs" / "parse.console.log").is_file()
    assert imp.read_command(root, "n", "parse").error.code == 21002


@pytest.mark.parametrize("where", ["logs/simulate/tiny_optimized/ftmpSFB",
                                   "logs/simulate/ftmpSFB", ".icraft/logs/tiny_optimized/ftmpSFB",
                                   "logs/simulate/tiny_optimized/ftmp_SFB",
                                   "logs/simulate/tiny_optimized/sfb"])
def test_find_dump_where_the_manual_puts_it(tmp_path, where):
    d = tmp_path / where
    d.mkdir(parents=True)
    (d / "900_output.ftmp").write_bytes(b"\0" * 64)
    (d / "3_other.ftmp").write_bytes(b"\0" * 8)
    (tmp_path / "logs" / "simulate").mkdir(parents=True, exist_ok=True)
    (tmp_path / "logs" / "simulate" / "stray.ftmp").write_bytes(b"\0" * 64)   # not in a dump folder
    assert imp.find_dump(tmp_path, 64) == d / "900_output.ftmp"
    assert imp.find_dump(tmp_path, None).parent == d


def test_simulate_ignores_an_earlier_runs_dump_in_the_default_folder(tmp_path):
    from tdpu_tui.engine.stages.simulate import find_output_ftmp
    old = tmp_path / ".icraft" / "logs" / "n" / "ftmpSFB" / "1.ftmp"
    old.parent.mkdir(parents=True)
    old.write_bytes(b"\0" * 64)
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    (tmp_path / "logs").mkdir()
    assert find_output_ftmp(tmp_path / "logs", tmp_path, 64, since=time.time() - 5) is None
    assert find_output_ftmp(tmp_path / "logs", tmp_path, 64) == old


# --- the real flows on the tiny model: hand-off round trip, WSL interop --------------------

PROJECT_TOML = """\
[model]
source = "synthetic"
[model.synthetic]
preset = "tiny"
seed = 0
[export]
profile = "icraft"
seq_len = 16
verify_batch = 1
verify_tokens = 8
[icraft]
net_name = "tiny_net"
bin = "{bin}"
timeout_s = {timeout}
[paths]
output = "models/output"
logs = "phase3_logs"
"""


def _config(root: Path, name: str = "tdpu.toml", bin: str = "icraft-not-installed",
            timeout: float = 60):
    from tdpu_tui.engine.core.config import load_config
    path = root / name
    path.write_text(PROJECT_TOML.format(bin=bin, timeout=timeout), encoding="utf-8")
    return load_config(path)


def _pipeline(cfg, *names: str):
    from tdpu_tui.engine.core.pipeline import Pipeline
    from tdpu_tui.engine.stages import all_stages
    summary = Pipeline(cfg, stages=all_stages()).run(list(names))
    return {r.name: r for r in summary.results}


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A project in a folder with a space and non-ASCII letters, exported, parse skipped
    (no Icraft here): the hand-off bundle is written."""
    root = tmp_path_factory.mktemp("proj") / "工程 dir"
    root.mkdir()
    cfg = _config(root)
    res = _pipeline(cfg, "export", "precheck", "parse")
    assert res["export"].status.value == "ok", res["export"].message
    assert res["parse"].status.value == "skipped"
    assert "run_icraft" in res["parse"].message
    return cfg


def _bundle(cfg) -> Path:
    return cfg.base_dir / "models" / "output" / "icraft_output"


def _host_copy(cfg, dest: Path) -> Path:
    """The bundle copied to the 'Windows host' (a folder with spaces and non-ASCII letters)."""
    shutil.copytree(_bundle(cfg), dest)
    return dest


def _run_script(folder: Path, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    bindir = cwd / "Icraft bin 目录"
    if not bindir.exists():
        bindir.mkdir()
        for f in ("icraft", "icraft_core.py"):
            shutil.copy2(FAKES / f, bindir / f)
    e = _env(ICRAFT=str(bindir / "icraft"), IC2_WIN="1", **env)
    return subprocess.run(["sh", str(folder / "run_icraft.sh")], cwd=cwd, env=e,
                          capture_output=True, timeout=120, stdin=subprocess.DEVNULL)


def _explorer_zip(folder: Path, dest: Path) -> Path:
    """A zip as Windows tools make it: one top folder, `\\` between name parts, folder entries."""
    with zipfile.ZipFile(dest, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(zipfile.ZipInfo(folder.name + "\\"), b"")
        for p in sorted(folder.rglob("*")):
            name = folder.name + "\\" + "\\".join(p.relative_to(folder).parts)
            if p.is_dir():
                zf.writestr(zipfile.ZipInfo(name + "\\"), b"")
            else:
                zf.write(p, name)
    return dest


def _import(cfg, path: Path):
    from tdpu_tui.engine.stages.handoff import import_bundle
    rep = import_bundle(cfg, path)
    return rep, {r.name: r for r in rep.results}


def test_round_trip_failure_then_rerun_folder_and_zip(project, tmp_path):
    host = _host_copy(project, tmp_path / "host 主机" / "icraft_output")
    # An optimize failure that exits 0, written only to Icraft's log file: the script stops.
    proc = _run_script(host, tmp_path, IC2_FAIL="optimize:21002:exit0:logonly")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert (host / "logs" / "optimize.exit").read_text().strip() == "0"
    assert not (host / "logs" / "run.exit").exists()      # stopped at the first failure
    rep, res = _import(project, host)
    assert rep.exit_code == 1 and not rep.refused
    assert res["parse"].status.value == "ok"
    assert res["optimize"].status.value == "failed" and "21002" in res["optimize"].message
    assert res["simulate"].status.value == "skipped"
    assert rep.drafted and rep.drafted[0].startswith("drafted")
    rep2, _ = _import(project, host)                       # the same failure: one record
    assert rep2.drafted and rep2.drafted[0].startswith("already recorded")

    # Run again in the same folder, now succeeding: nothing of the failed run is read back.
    proc = _run_script(host, tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rep, res = _import(project, host)
    assert rep.exit_code == 0, [(r.name, r.message) for r in rep.results]
    assert res["simulate"].status.value == "ok"
    assert "argmax agreement 100.00%" in res["simulate"].message
    log = (project.base_dir / "phase3_logs" / "icraft_compile_log.md").read_text(encoding="utf-8")
    assert "imported" in log and "21002" not in log.split("## ")[-1]
    status = json.loads((project.base_dir / "phase3_logs" / "runs" / "status.json")
                        .read_text(encoding="utf-8"))
    assert "imported" in json.dumps(status, ensure_ascii=False)

    # The same folder zipped on Windows, moved to a path with spaces, imported.
    z = _explorer_zip(host, tmp_path / "back 回来.zip")
    rep, res = _import(project, z)
    assert rep.exit_code == 0, rep.refused or [(r.name, r.message) for r in rep.results]
    assert res["simulate"].status.value == "ok"


def test_bundle_from_another_export_is_refused_naming_both(project, tmp_path):
    host = _host_copy(project, tmp_path / "old bundle")
    doc = json.loads((host / "bundle.json").read_text(encoding="utf-8"))
    doc["export"]["exported_at"] = "2020-01-01T00:00:00"
    (host / "bundle.json").write_text(json.dumps(doc), encoding="utf-8")
    rep, _ = _import(project, host)
    assert rep.exit_code == 2 and not rep.results
    assert "2020-01-01T00:00:00" in rep.refused
    meta = json.loads((project.base_dir / "models/output/bitnet_b1.58_full.meta.json")
                      .read_text(encoding="utf-8"))
    assert str(meta["exported_at"]) in rep.refused


@pytest.fixture
def wsl_env(monkeypatch, tmp_path):
    reg = tmp_path / "winprocs"
    monkeypatch.setenv("PATH", f"{FAKES}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("WSL_DISTRO_NAME", "Ubuntu-22.04")
    monkeypatch.setenv("WSL_INTEROP", "/run/WSL/8_interop")
    monkeypatch.setenv("IC2_DISTRO", "Ubuntu-22.04")
    monkeypatch.setenv("IC2_WINPROCS", str(reg))
    monkeypatch.setenv("IC2_TASKKILL_LOG", str(tmp_path / "taskkill.log"))
    monkeypatch.setenv("IC2_WSLPATH_CRLF", "1")
    monkeypatch.setenv("IC2_WSLPATH_STRICT", "1")
    monkeypatch.setenv("IC2_TRACE", str(tmp_path / "trace.log"))
    for k in ("IC2_FAIL", "IC2_HANG", "IC2_FLOOD", "IC2_BIG", "IC2_WIN"):
        monkeypatch.delenv(k, raising=False)
    assert shutil.which("powershell.exe") is None   # the PID lookup is not there: /IM then
    return tmp_path


def _trace(tmp: Path) -> list[list[str]]:
    f = tmp / "trace.log"
    return [json.loads(line.split("\t", 1)[1]) for line in f.read_text("utf-8").splitlines()] \
        if f.exists() else []


def test_wsl_interop_success(project, wsl_env):
    cfg = _config(project.base_dir, "wsl.toml", bin="icraft.exe")
    res = _pipeline(cfg, "parse", "optimize", "simulate")
    assert all(r.status.value == "ok" for r in res.values()), \
        {n: r.message for n, r in res.items()}
    assert "argmax agreement" in res["simulate"].message
    calls = _trace(wsl_env)
    assert [c[0] for c in calls] == ["parse", "optimize", "run"]
    for c in calls:         # every path as Windows sees it, none POSIX
        assert not any(a.startswith("/") for a in c), c
    log = (project.base_dir / "phase3_logs" / "icraft_compile_log.md").read_text(encoding="utf-8")
    assert "\\\\wsl.localhost\\Ubuntu-22.04\\" in log and "interop" in log
    assert not winsim.running()


def test_wsl_interop_failure(project, wsl_env, monkeypatch):
    monkeypatch.setenv("IC2_FAIL", "optimize:21002:exit0")
    cfg = _config(project.base_dir, "wsl.toml", bin="icraft.exe")
    res = _pipeline(cfg, "parse", "optimize", "simulate")
    assert res["parse"].status.value == "ok"
    assert res["optimize"].status.value == "failed" and "21002" in res["optimize"].message
    # simulate runs on the host anyway (onnxruntime), never on a missing optimized graph
    assert "icraft run" not in res["simulate"].message


def test_wsl_interop_timeout_ends_the_windows_tree(project, wsl_env, monkeypatch):
    monkeypatch.setenv("IC2_HANG", "parse")
    cfg = _config(project.base_dir, "wsl.toml", bin="icraft.exe", timeout=2)
    t0 = time.monotonic()
    res = _pipeline(cfg, "parse")
    took = time.monotonic() - t0
    assert res["parse"].status.value == "failed" and "timed out" in res["parse"].message
    calls = (wsl_env / "taskkill.log").read_text(encoding="utf-8").splitlines()
    assert calls and all("/T" in c.split() and "/F" in c.split() for c in calls), calls
    deadline = time.monotonic() + 3
    while winsim.running() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not winsim.running(), winsim.running()        # icraft.exe and icraft-parse.exe
    assert took < 2 + 8, took


def test_wsl_cancel_ends_the_windows_tree_driver_level(wsl_env, tmp_path, monkeypatch):
    monkeypatch.setenv("IC2_HANG", "parse")
    exe = shutil.which("icraft.exe")
    (tmp_path / "logs").mkdir()
    argv = wsl.windows_argv(_parse_argv(tmp_path, exe))
    tree = wsl.InteropTree(exe, argv)
    t0 = time.monotonic()
    lines: list[str] = []
    res = ic.run_icraft(argv, cwd=tmp_path, log_dirs=[tmp_path / "logs"], timeout_s=30,
                        on_line=lambda ln, _lv, _s: lines.append(ln),
                        cancelled=lambda: time.monotonic() - t0 > 1.0, windows=tree)
    assert res.cancelled and not res.ok
    assert tree.calls and tree.calls[0][1:4] == ["/T", "/F", "/IM"]
    assert any("taskkill.exe /T /F" in ln for ln in res.tail), res.tail
    deadline = time.monotonic() + 3
    while winsim.running() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not winsim.running()
    assert time.monotonic() - t0 < 1.0 + 6


@pytest.mark.parametrize("line,fails", [
    ("\x1b[31m[F] 21002\x1b[0m", True), ("50%\r[12/02/26 16:00:01.1] [F] 21002", True),
    ("[10/19/22 10:45:03] [stdout]-[E] bad", True), ("[2026-12-02 16:00:01.123] [error] x", True),
    ("[12/02/26 16:00:01.123] [I] 21002 nodes [E]rror-free", False), ("all good", False),
])
def test_sh_script_reads_failure_lines_as_the_driver_does(tmp_path, line, fails):
    from tdpu_tui.engine.icraft import bundle as bd
    folder = tmp_path / "b dir"
    folder.mkdir()
    (folder / "run_icraft.sh").write_text(bd._sh_script("n"), encoding="utf-8")
    prog = tmp_path / "my icraft.py"
    prog.write_text(f"import sys\nsys.stdout.write({line!r} + '\\n')\n", encoding="utf-8")
    # a command line with a quoted path in it
    env = _env(ICRAFT=f"{sys.executable} '{prog}'")
    proc = subprocess.run(["sh", str(folder / "run_icraft.sh")], cwd=tmp_path, env=env,
                          capture_output=True, timeout=60, stdin=subprocess.DEVNULL)
    assert (proc.returncode == 1) == fails, proc.stdout + proc.stderr
    assert (folder / "logs" / "parse.exit").read_text().strip() == "0"
    assert ic.is_failure_line(ic.decode_line(line.encode())) == fails
    # The PowerShell script's pattern, in Python's regex dialect (close to .NET's for it);
    # Select-String is case-insensitive and reads lines split at LF.
    import re
    assert bool(re.search(bd.FAILURE_PATTERN_PS, line, re.I | re.M)) == fails


@pytest.mark.parametrize("flood", ["parse", "parse:line"])
def test_flood_through_the_parse_stage(project, monkeypatch, flood):
    monkeypatch.setenv("IC2_FLOOD", flood)
    cfg = _config(project.base_dir, "flood.toml", bin=str(ICRAFT), timeout=2)
    log = project.base_dir / "phase3_logs" / "icraft_compile_log.md"
    before = _rss()
    t0 = time.monotonic()
    res = _pipeline(cfg, "parse")
    took = time.monotonic() - t0
    assert res["parse"].status.value == "failed" and "timed out" in res["parse"].message
    assert took < 2 + 4, took
    assert _rss() - before < 200 << 20
    assert log.stat().st_size < 2 << 20
    text = log.read_text(encoding="utf-8")
    parse_section = text[text.index("## parse"):][:400_000] if "## parse" in text else text
    assert len(parse_section) < 400_000


def test_wsl_cancel_with_powershell_ends_the_windows_pid(wsl_env, tmp_path, monkeypatch):
    """With powershell.exe there, the Windows PID (not the relay's) is learnt while Icraft
    runs and `taskkill.exe /T /F /PID <it>` ends icraft.exe and icraft-parse.exe."""
    monkeypatch.setenv("PATH", f"{FAKES / 'with_powershell'}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("IC2_HANG", "parse")
    exe = shutil.which("icraft.exe")
    (tmp_path / "logs").mkdir()
    argv = wsl.windows_argv(_parse_argv(tmp_path, exe))
    tree = wsl.InteropTree(exe, argv)
    seen: dict[int, dict] = {}
    t0 = time.monotonic()
    cancel_at: list[float] = []

    def cancelled() -> bool:
        seen.update(winsim.running())
        if time.monotonic() - t0 > 2.5:
            cancel_at.append(time.monotonic())
            return True
        return False

    res = ic.run_icraft(argv, cwd=tmp_path, log_dirs=[tmp_path / "logs"], timeout_s=30,
                        on_line=lambda *_a: None, cancelled=cancelled, windows=tree)
    assert res.cancelled
    ours = [w for w, d in seen.items() if d["image"] == "icraft.exe"]
    assert len(ours) == 1 and tree.calls[0][1:] == ["/T", "/F", "/PID", str(ours[0])]
    assert seen[ours[0]]["pid"] != ours[0]
    deadline = time.monotonic() + 3
    while winsim.running() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not winsim.running()
    assert res.seconds - (cancel_at[0] - t0) < 1.0 + 0.5


def test_zip_from_a_chinese_windows_gbk_names(tmp_path):
    """Explorer on a Chinese Windows stores names in GBK without the UTF-8 flag, with `\\`
    between parts; '淺' is one of the GBK characters whose second byte is 0x5C."""
    src = tmp_path / "src"
    _bundle_stub(src)
    top = "工程淺 结果"
    placeholder = "Q" * len(top.encode("gbk"))
    z = tmp_path / "b.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr(zipfile.ZipInfo(placeholder + "\\"), b"")
        for p in sorted(src.rglob("*")):
            if p.is_file():
                zf.write(p, placeholder + "\\" + "\\".join(p.relative_to(src).parts))
    z.write_bytes(z.read_bytes().replace(placeholder.encode(), top.encode("gbk")))
    root = imp.find_root(imp.safe_extract(z, tmp_path / "out"))
    assert root.name == top
    assert imp.read_command(root, "n", "parse").error.code == 21002
