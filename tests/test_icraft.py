"""The Icraft driver and the parse/optimize stages, against the fake `icraft` in fixtures/."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "fixtures" / "icraft"))
import helpers  # noqa: E402

from tdpu_tui.engine.icraft import driver as ic  # noqa: E402
from tdpu_tui.engine.core.artifacts import Artifacts  # noqa: E402
from tdpu_tui.engine.records.compile_log import read_section, update_section  # noqa: E402
from tdpu_tui.engine.core.config import load_config  # noqa: E402
from tdpu_tui.engine.core.events import StageLog, Status  # noqa: E402
from tdpu_tui.engine.stages.optimize import OptimizeStage  # noqa: E402
from tdpu_tui.engine.stages.parse import ParseStage  # noqa: E402
from tdpu_tui.engine.stages.precheck import PrecheckStage  # noqa: E402
from tdpu_tui.engine.core.pipeline import Pipeline  # noqa: E402


@pytest.fixture
def fake_path(monkeypatch):
    """The fake `icraft` first on PATH; returns a function that sets its mode."""
    env = helpers.fake_env()
    monkeypatch.setenv("PATH", env["PATH"])

    def mode(m: str, **extra: str) -> None:
        monkeypatch.setenv("FAKE_ICRAFT_MODE", m)
        for k, v in extra.items():
            monkeypatch.setenv(k, v)
    mode("ok")
    return mode


def project(tmp_path, model=None, profile="icraft", **cfg_kw):
    cfg = load_config(helpers.write_config(tmp_path, **cfg_kw))
    paths = Artifacts.of(cfg)
    helpers.save_export(paths.output, model or helpers.clean_graph(), profile)
    return cfg, paths


def run(cfg, names, cancel=None):
    events = []
    pipe = Pipeline(cfg, stages=[PrecheckStage(), ParseStage(), OptimizeStage()],
                    on_event=events.append, cancel=cancel)
    summary = pipe.run(names)
    return {r.name: r for r in summary.results}, events


# --- argument lists (docs/spec.md §6 and the manuals) -----------------------------------------------

def test_parse_argv_is_complete_for_a_non_image_input(tmp_path):
    cfg = load_config(helpers.write_config(tmp_path))
    argv = ic.parse_argv("icraft", cfg, Path("/m/full.onnx"), [[1, 128, 2560]], Path("/o"),
                         Path("/o/logs"))
    pairs = dict(zip(argv[2::2], argv[3::2]))
    assert argv[:2] == ["icraft", "parse"]
    assert pairs == {"--net_name": "tiny_net", "--framework": "Onnx",
                     "--network": "/m/full.onnx", "--jr_path": "/o/", "--log_path": "/o/logs/",
                     "--inputs": "1,128,2560", "--inputs_layout": "FD", "--pre_method": "nop",
                     "--pre_mean": "nop", "--pre_scale": "nop", "--channel_swap": "nop",
                     "--target": "buyi"}
    two = ic.parse_argv("icraft", cfg, Path("m"), [[1, 8], [1, 8, 4]], Path("o"), Path("l"))
    assert "1,8;1,8,4" in two and "FD;FD" in two and "nop;nop" in two


def test_optimize_and_run_argv(tmp_path):
    cfg = load_config(helpers.write_config(tmp_path, pass_on=("a.P", "b.Q")))
    opt = ic.optimize_argv("icraft", cfg, Path("/o/n_parsed.json"), Path("/o/n_parsed.raw"),
                           Path("/o"), Path("/l"))
    assert opt[:2] == ["icraft", "optimize"] and opt[opt.index("--pass_on") + 1] == "a.P;b.Q"
    assert opt[opt.index("--json") + 1] == "/o/n_parsed.json"
    run_ = ic.run_argv("icraft", Path("j"), Path("r"), [Path("a.ftmp"), Path("b.ftmp")],
                       Path("/l"))
    assert run_[run_.index("--input") + 1] == "a.ftmp;b.ftmp"
    assert run_[run_.index("--backends") + 1] == "Host" and "--dump_output" in run_
    cfg.icraft.pass_on = []
    assert "--pass_on" not in ic.optimize_argv("icraft", cfg, Path("j"), Path("r"), Path("o"),
                                               Path("l"))


def test_error_scan_prefers_the_five_digit_code_over_the_truncated_status():
    scan = ic.ErrorScan()
    for line in ["[11/26/26 09:00:00.001] [I] 开始",
                 "[11/26/26 09:00:00.002] [F] 21002",
                 "[11/26/26 09:00:00.003] [E] 执行以下命令时捕获到错误码10:"]:
        scan.feed(line)
    assert scan.failed and scan.code == 21002
    only_status = ic.ErrorScan()
    only_status.feed("[03/01/26 17:00:36.306] [E] 执行以下命令时捕获到错误码1:")
    assert only_status.code == 1
    assert "exit status of the failed component" in ic.explain_code(1)
    assert ic.explain_code(26000).startswith("缺少必须参数")
    assert "reserved" in ic.explain_code(26005)
    quiet = ic.ErrorScan()
    quiet.feed("[11/26/26 09:00:00.002] [W] slow")
    assert not quiet.failed


def test_log_lines_decode_utf8_gbk_and_garbage():
    assert ic.decode_line("[I] 解析完成\r\n".encode("gbk")) == "[I] 解析完成"
    assert ic.decode_line("[I] 解析完成\n".encode()) == "[I] 解析完成"
    assert ic.decode_line(b"[I] \xff\xfe\xfd ok") .endswith("ok")
    assert ic.decode_line(b"Run [#  ] 10%\rRun [###] 100% Done!\n") == "Run [###] 100% Done!"
    assert ic.line_level("[11/26/26 09:00:00.002] [W] x") == "warning"
    assert ic.line_level("[2026-11-26 09:00:00.002] [info] x") == "info"


def test_icraft_log_files_are_read_whole_including_a_last_line_without_newline(tmp_path):
    """run_icraft follows its log folder with engine.tail.Tailer, read synchronously."""
    script = tmp_path / "fake.py"
    script.write_text(
        "import pathlib, time\n"
        "log = pathlib.Path('logs/n_parse.log')\n"
        "log.parent.mkdir(exist_ok=True)\n"
        "log.write_bytes('[I] 开始\\n'.encode('gbk'))\n"
        "time.sleep(0.3)\n"
        "with open(log, 'ab') as fh:\n"
        "    fh.write(b'tail without newline')\n")
    lines = []
    res = ic.run_icraft([sys.executable, str(script)], cwd=tmp_path, log_dirs=[tmp_path / "logs"],
                        timeout_s=30, on_line=lambda *a: lines.append(a))
    assert res.ok, res.reason()
    assert [(line, src) for line, _, src in lines] == [
        ("[I] 开始", str(tmp_path / "logs" / "n_parse.log")),
        ("tail without newline", str(tmp_path / "logs" / "n_parse.log"))]
    assert res.log_files == [tmp_path / "logs" / "n_parse.log"]


def test_compile_log_sections_are_rewritten_in_place(tmp_path):
    path = tmp_path / "icraft_compile_log.md"
    update_section(path, "optimize", "## optimize — ok")
    update_section(path, "parse", "## parse — failed")
    with open(path, "a", encoding="utf-8") as fh:
        fh.write("\nmy own note 手写\n")
    update_section(path, "parse", "## parse — ok")
    text = path.read_text(encoding="utf-8")
    assert text.index("## parse — ok") < text.index("## optimize — ok")
    assert "failed" not in text and text.endswith("my own note 手写\n")


def _write_sections(path: str, names: list[str], rounds: int) -> None:
    for i in range(rounds):
        for name in names:
            update_section(path, name, f"## {name} — round {i}")


def test_compile_log_writers_in_two_processes_keep_each_others_sections(tmp_path):
    """A --batch run and the app writing their sections at the same time lose nothing."""
    import multiprocessing

    path = tmp_path / "icraft_compile_log.md"
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_write_sections, args=(str(path), names, 40))
             for names in (["precheck", "parse"], ["optimize", "simulate"])]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    text = path.read_text(encoding="utf-8")
    for name in ("precheck", "parse", "optimize", "simulate"):
        assert text.count(f"<!-- tdpu:section {name} -->") == 1
        assert f"## {name} — round 39" in text
    assert [text.index(f"tdpu:section {n}") for n in ("precheck", "parse", "optimize", "simulate")] == sorted(
        text.index(f"tdpu:section {n}") for n in ("precheck", "parse", "optimize", "simulate"))


def test_compile_log_keeps_crlf_and_gbk_notes_outside_the_sections_byte_for_byte(tmp_path):
    path = tmp_path / "icraft_compile_log.md"
    update_section(path, "parse", "## parse — failed")
    note = "\r\n板子上的笔记\r\n".encode("gbk")
    with open(path, "ab") as fh:
        fh.write(note)
    update_section(path, "parse", "## parse — ok")
    data = path.read_bytes()
    assert data.endswith(note) and b"## parse \xe2\x80\x94 ok" in data


# --- stages with the fake CLI ---------------------------------------------------------------

def test_parse_and_optimize_succeed_and_record_everything(tmp_path, fake_path):
    argv_log = tmp_path / "argv.jsonl"
    fake_path("ok", FAKE_ICRAFT_ARGV=str(argv_log))
    cfg, paths = project(tmp_path)
    results, events = run(cfg, ["precheck", "parse", "optimize"])
    assert [r.status for r in results.values()] == [Status.OK] * 3, \
        [r.message for r in results.values()]
    out = paths.icraft_dir
    for f in ("tiny_net_parsed.json", "tiny_net_parsed.raw", "tiny_net_optimized.json",
              "tiny_net_optimized.raw", "tiny_net.toml", "tiny_net_precheck.csv"):
        assert (out / f).is_file(), f
    assert (paths.icraft_logs / "parse" / "tiny_net_parse.log").is_file()
    parsed = json.loads((out / "tiny_net_parsed.json").read_text())
    assert parsed["inputs"] == [[1, 8, 16]]
    assert json.loads((out / "tiny_net_optimized.json").read_text())["passes"] == \
        ["tdpu.ReplaceMatMulWithBitLinear"]

    calls = [json.loads(line) for line in argv_log.read_text().splitlines()]
    assert [c[1] for c in calls] == ["parse", "optimize"]

    logs = [e for e in events if isinstance(e, StageLog) and e.stage == "parse"]
    # Icraft writes each line to stdout (UTF-8) and to its log file (GBK here): passed on once.
    done = [e for e in logs if e.line.endswith("[I] parse 完成")]
    assert len(done) == 1, [e.line for e in logs]
    assert not any("\ufffd" in e.line for e in logs)
    log_file = paths.icraft_logs / "parse" / "tiny_net_parse.log"
    assert "parse 完成".encode("gbk") in log_file.read_bytes()

    section = read_section(paths.compile_log, "parse")
    assert "## parse — ok" in section and "- working directory: `out/icraft_output`" in section  # relative to the project
    assert "--inputs 1,8,16" in section and "--framework Onnx" in section
    assert "tiny_net_parsed.json` | 64 B" not in section  # json is text, raw is 64 B
    assert "tiny_net_parsed.raw` | 64 B |" in section
    assert "## optimize — ok" in read_section(paths.compile_log, "optimize")


def test_the_written_toml_runs_by_hand(tmp_path, fake_path):
    cfg, paths = project(tmp_path)
    results, _ = run(cfg, ["parse"])
    assert results["parse"].status is Status.OK
    for f in paths.icraft_dir.glob("tiny_net_*.json"):
        f.unlink()
    env = helpers.fake_env()
    for command in ("parse", "optimize"):
        proc = subprocess.run(["icraft", command, "tiny_net.toml"], cwd=paths.icraft_dir,
                              env=env, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0 and "[F]" not in proc.stdout, proc.stdout + proc.stderr
    assert (paths.icraft_dir / "tiny_net_optimized.json").is_file()
    assert (paths.icraft_dir / "logs" / "parse" / "tiny_net_parse.log").is_file()


def test_failure_is_read_from_the_log_even_when_icraft_exits_0(tmp_path, fake_path):
    fake_path("optimize:fail21002")
    cfg, paths = project(tmp_path)
    results, _ = run(cfg, ["parse", "optimize"])
    assert results["parse"].status is Status.OK
    opt = results["optimize"]
    assert opt.status is Status.FAILED
    assert "Icraft error 21002" in opt.message and "icraft_compile_log.md" in opt.message
    assert opt.metrics["exit_status"] == 0 and opt.metrics["error_code"] == 21002
    section = read_section(paths.compile_log, "optimize")
    assert "## optimize — failed" in section
    assert "- exit status: 0" in section and "- error code: **21002**" in section
    assert f"{helpers.FAKE_ICRAFT} optimize --json" in section
    assert "[F] 21002" in section and "Exception info" in section
    assert not (paths.icraft_dir / "tiny_net_optimized.json").exists()


def test_missing_argument_is_error_26000(tmp_path, fake_path):
    lines = []
    res = ic.run_icraft(["icraft", "parse", "--net_name", "n", "--framework", "Onnx"],
                        cwd=tmp_path, log_dirs=[tmp_path / "logs"], timeout_s=30,
                        on_line=lambda *a: lines.append(a))
    assert not res.ok and res.error_code == 26000
    assert res.reason().startswith("Icraft error 26000: 缺少必须参数")
    assert res.returncode == 26000 & 0xFF
    # The default log folder (no --log_path given) is followed too.
    assert [f.name for f in res.log_files] == ["n_parse.log"]
    assert res.log_files[0].parent == tmp_path / ".icraft" / "logs"
    # Each line Icraft printed and logged is passed on once.
    said = [line for line, _, _ in lines if line.strip()]
    assert len(said) == len(set(said)), said


def test_exit_status_without_a_code_still_fails(tmp_path, fake_path):
    fake_path("exit3")
    cfg, paths = project(tmp_path)
    results, _ = run(cfg, ["parse"])
    assert results["parse"].status is Status.FAILED
    assert "error 3" in results["parse"].message or "exit status 3" in results["parse"].message


def test_success_without_outputs_fails(tmp_path, fake_path):
    fake_path("nooutput")
    cfg, paths = project(tmp_path)
    results, _ = run(cfg, ["parse"])
    assert results["parse"].status is Status.FAILED
    assert "did not write tiny_net_parsed.json" in results["parse"].message


def test_timeout_kills_the_whole_process_group(tmp_path, fake_path):
    pidfile = tmp_path / "component.pid"
    fake_path("hang", FAKE_ICRAFT_PIDFILE=str(pidfile))
    cfg, paths = project(tmp_path, timeout_s=2)
    start = time.monotonic()
    results, _ = run(cfg, ["parse"])
    assert results["parse"].status is Status.FAILED
    assert "timed out" in results["parse"].message
    assert time.monotonic() - start < 20
    grandchild = int(pidfile.read_text())      # the component the CLI started; ignores SIGTERM
    deadline = time.monotonic() + 5
    while not helpers.process_gone(grandchild) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert helpers.process_gone(grandchild)
    assert "timed out" in read_section(paths.compile_log, "parse")


def test_cancel_kills_the_process_group(tmp_path, fake_path):
    pidfile = tmp_path / "component.pid"
    fake_path("hang", FAKE_ICRAFT_PIDFILE=str(pidfile))
    cfg, paths = project(tmp_path)
    cancel = threading.Event()

    def cancel_when_running():
        deadline = time.monotonic() + 30
        while not pidfile.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        cancel.set()
    threading.Thread(target=cancel_when_running, daemon=True).start()
    results, _ = run(cfg, ["parse"], cancel=cancel)
    assert results["parse"].status is Status.CANCELLED and "cancelled" in results["parse"].message
    assert "## parse — cancelled" in paths.compile_log.read_text(encoding="utf-8")
    deadline = time.monotonic() + 5
    grandchild = int(pidfile.read_text())
    while not helpers.process_gone(grandchild) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert helpers.process_gone(grandchild)


def test_keyboard_interrupt_kills_the_process_group(tmp_path, fake_path):
    pidfile = tmp_path / "component.pid"
    fake_path("hang", FAKE_ICRAFT_PIDFILE=str(pidfile))

    def ctrl_c_once_running():
        if pidfile.exists():
            raise KeyboardInterrupt
        return False
    (tmp_path / "j").write_text("{}")
    (tmp_path / "r").write_bytes(b"")
    with pytest.raises(KeyboardInterrupt):
        ic.run_icraft(["icraft", "optimize", "--json", "j", "--raw", "r", "--jr_path", "."],
                      cwd=tmp_path, log_dirs=[], timeout_s=60, on_line=lambda *a: None,
                      cancelled=ctrl_c_once_running, term_grace=0.5)
    grandchild = int(pidfile.read_text())
    deadline = time.monotonic() + 5
    while not helpers.process_gone(grandchild) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert helpers.process_gone(grandchild)


def test_without_icraft_parse_and_optimize_are_skipped_with_the_reason(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    cfg, paths = project(tmp_path, bin="icraft")
    results, _ = run(cfg, ["precheck", "parse", "optimize"])
    assert results["precheck"].status is Status.OK
    for name in ("parse", "optimize"):
        assert results[name].status is Status.SKIPPED
        assert results[name].message.startswith(
            "Icraft CLI 'icraft' not found on PATH; set [icraft].bin; ")
    # The reason says what to copy and what to run there, and the compile log says the same.
    reason = results["parse"].message
    assert str(paths.icraft_dir) in reason and "run_icraft.ps1" in reason
    assert "tdpu icraft import" in reason
    section = read_section(paths.compile_log, "parse")
    assert "## parse — skipped" in section and "run_icraft.ps1" in section
    assert (paths.icraft_dir / "run_icraft.sh").is_file()
    assert (paths.icraft_dir / "tiny_net.toml").is_file()


def test_bin_as_a_path_relative_to_the_config(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(Path(sys.executable).parent))
    tools = tmp_path / "tools"
    tools.mkdir()
    shutil.copy2(helpers.FAKE_ICRAFT, tools / "icraft")
    cfg, paths = project(tmp_path, bin="tools/icraft")
    assert ic.find_cli(cfg) == tools / "icraft"
    results, _ = run(cfg, ["parse"])
    assert results["parse"].status is Status.OK, results["parse"].message
    cfg.icraft.bin = "tools/missing"
    assert "not found or not executable" in ic.missing_cli_reason(cfg)


@pytest.mark.parametrize("module", ["tdpu_tui.engine.icraft.driver", "tdpu_tui.engine.stages.simulate",
                                    "tdpu_tui.engine.icraft.rules", "tdpu_tui.engine.icraft.optable",
                                    "tdpu_tui.engine.records.compile_log"])
def test_icraft_modules_import_without_textual_or_rich(module):
    code = (f"import importlib, sys; importlib.import_module({module!r}); "
            "print(','.join(m for m in ('textual', 'rich') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "", proc.stdout + proc.stderr


def test_a_failed_parse_leaves_no_stale_graph_for_later_stages(tmp_path, fake_path):
    cfg, paths = project(tmp_path)
    results, _ = run(cfg, ["parse", "optimize"])
    assert results["optimize"].status is Status.OK
    fake_path("parse:fail21002")
    results, _ = run(cfg, ["parse", "optimize"])
    assert results["parse"].status is Status.FAILED
    assert results["optimize"].status is Status.SKIPPED
    assert not list(paths.icraft_dir.glob("tiny_net_parsed.*"))
    assert not list(paths.icraft_dir.glob("tiny_net_optimized.*"))


def test_an_icraft_cli_that_cannot_start_fails_the_stage_naming_the_key(tmp_path):
    broken = tmp_path / "icraft"
    broken.write_text("#!/nonexistent/interpreter\n")
    broken.chmod(0o755)
    cfg, paths = project(tmp_path, bin=str(broken))
    results, _ = run(cfg, ["parse"])
    r = results["parse"]
    assert r.status is Status.FAILED
    assert r.message.startswith(f"cannot start the Icraft CLI {broken} ([icraft].bin in ")
    assert "Traceback" not in "\n".join(r.log_tail)
    assert "## parse — failed" in read_section(paths.compile_log, "parse")
