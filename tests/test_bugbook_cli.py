"""`tdpu bugs list | add | set` (docs/spec.md §2): `tdpu_tui.bugs_cli.main(argv)`."""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tdpu_tui.bugs_cli import main
from tdpu_tui.engine.records.bugbook import BugBook

ROOT = Path(__file__).parents[1]
FIXTURES = Path(__file__).parent / "fixtures" / "bugs"


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A directory with a tdpu.toml whose logs go to ./logs."""
    (tmp_path / "tdpu.toml").write_text('[paths]\nlogs = "logs"\n', encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_add_then_list_and_json(project, capsys):
    assert main(["add", "--title", "parse 报 21002", "--stage", "编译", "--error", "[F] 21002"]) == 0
    assert "Bug #1 added" in capsys.readouterr().out
    path = project / "logs" / "bugs_found.md"
    assert path.exists()
    assert main(["add", "--title", "NaN", "--stage", "仿真", "--status", "待验证",
                 "--cause", "fp16", "--fix", "fp32 RMSNorm"]) == 0
    capsys.readouterr()

    assert main(["list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["#", "状态", "阶段", "发现时间", "标题"]
    assert lines[1].split()[:3] == ["1", "未解决", "编译"] and lines[1].endswith("parse 报 21002")
    assert lines[2].split()[:3] == ["2", "待验证", "仿真"] and lines[2].endswith("NaN")
    # columns line up although the status and stage columns are full-width
    assert lines[1].index("parse") == lines[2].index("NaN")

    assert main(["list", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [d["number"] for d in data] == [1, 2]
    assert set(data[0]) == {"number", "title", "time", "stage", "error", "cause", "fix", "status",
                            "extra", "signature"}
    assert (data[1]["cause"], data[1]["fix"], data[1]["status"]) == ("fp16", "fp32 RMSNorm", "待验证")


def test_list_accepts_config_after_the_command(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = tmp_path / "elsewhere" / "my.toml"
    cfg.parent.mkdir()
    cfg.write_text('[paths]\nlogs = "records"\n', encoding="utf-8")
    bugs = cfg.parent / "records" / "bugs_found.md"
    bugs.parent.mkdir()
    bugs.write_bytes((FIXTURES / "reordered.md").read_bytes())
    assert main(["list", "--json", "--config", str(cfg)]) == 0
    assert [d["number"] for d in json.loads(capsys.readouterr().out)] == [2, 5]
    assert main(["--config", str(cfg), "list"]) == 0


@pytest.mark.parametrize("argv", [
    ["add", "--title", "t", "--stage", "导出"],
    ["set", "1", "--status", "已解决"],
    ["list"],
    ["list", "--json"],
])
def test_without_a_config_file_the_commands_fail_like_tdpu_itself(tmp_path, capsys, monkeypatch, argv):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    err = captured.err
    assert str(tmp_path / "tdpu.toml") in err and "configuration file not found" in err
    assert "--config PATH" in err
    assert list(tmp_path.iterdir()) == []  # no stray phase3_logs/bugs_found.md


def test_without_a_config_file_add_and_set_leave_an_existing_default_book_alone(tmp_path, capsys,
                                                                              monkeypatch):
    monkeypatch.chdir(tmp_path)
    book = tmp_path / "phase3_logs" / "bugs_found.md"
    book.parent.mkdir()
    book.write_bytes((FIXTURES / "reordered.md").read_bytes())
    before = book.read_bytes()
    assert main(["add", "--title", "t", "--stage", "导出"]) == 2
    assert main(["set", "2", "--status", "已解决"]) == 2
    assert book.read_bytes() == before
    assert "tdpu.toml" in capsys.readouterr().err
    # reading it still works, and says which file it read
    assert main(["list", "--json"]) == 0
    captured = capsys.readouterr()
    assert [d["number"] for d in json.loads(captured.out)] == [2, 5]
    assert "no tdpu.toml here" in captured.err and str(book) in captured.err


def test_an_explicit_config_works_without_a_tdpu_toml_here(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = tmp_path / "elsewhere" / "my.toml"
    cfg.parent.mkdir()
    cfg.write_text('[paths]\nlogs = "records"\n', encoding="utf-8")
    assert main(["add", "--config", str(cfg), "--title", "t", "--stage", "export"]) == 0
    assert main(["--config", str(cfg), "set", "1", "--status", "已解决"]) == 0
    assert capsys.readouterr().err == ""
    rec = BugBook(cfg.parent / "records" / "bugs_found.md").load()[0]
    assert (rec.stage, rec.status) == ("导出", "已解决")
    assert not (tmp_path / "phase3_logs").exists()


def test_the_cli_main_reports_the_same_missing_config_as_tdpu(tmp_path, capsys, monkeypatch):
    from tdpu_tui.cli import main as tdpu_main
    monkeypatch.chdir(tmp_path)
    assert tdpu_main(["bugs", "add", "--title", "t", "--stage", "导出"]) == 2
    assert tdpu_main(["--batch"]) == 2
    err = capsys.readouterr().err
    assert err.count(f"{tmp_path / 'tdpu.toml'}: configuration file not found") == 2


def test_set_changes_only_the_given_fields(project, capsys):
    main(["add", "--title", "t", "--stage", "导出", "--cause", "c"])
    assert main(["set", "1", "--status", "已解决", "--fix", "f"]) == 0
    assert "Bug #1 updated" in capsys.readouterr().out
    rec = BugBook(project / "logs" / "bugs_found.md").load()[0]
    assert (rec.title, rec.stage, rec.cause, rec.fix, rec.status) == ("t", "导出", "c", "f", "已解决")


def test_error_file_dash_reads_stdin(project, monkeypatch):
    main(["add", "--title", "t", "--stage", "导出"])
    trace = "Traceback (most recent call last):\n  File \"x.py\", line 1\nValueError: ```bad```\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO(trace))
    assert main(["set", "1", "--error-file", "-"]) == 0
    path = project / "logs" / "bugs_found.md"
    assert BugBook(path).load()[0].error == trace.rstrip("\n")
    assert "  ````\n  Traceback" in path.read_text(encoding="utf-8")


def test_error_file_from_a_file(project, tmp_path):
    f = tmp_path / "err.txt"
    f.write_text("line 1\nline 2\n", encoding="utf-8")
    assert main(["add", "--title", "t", "--stage", "编译", "--error-file", str(f)]) == 0
    assert BugBook(project / "logs" / "bugs_found.md").load()[0].error == "line 1\nline 2"


def test_error_file_with_gbk_lines_from_icraft_is_decoded(project, tmp_path):
    f = tmp_path / "bitnet_b158_optimize.log"
    f.write_bytes("[I] 开始执行 optimize 组件\r\n".encode("gbk") + "[F] 21002 错误\n".encode("utf-8"))
    assert main(["add", "--title", "t", "--stage", "编译", "--error-file", str(f)]) == 0
    error = BugBook(project / "logs" / "bugs_found.md").load()[0].error
    assert error == "[I] 开始执行 optimize 组件\n[F] 21002 错误"


@pytest.mark.parametrize(("argv", "needles"), [
    (["add", "--title", "t", "--stage", "部署"], ["发现阶段", "--stage", "'部署'", "导出, 编译, 仿真, 替换",
                                                "export → 导出", "replace/validate → 替换"]),
    (["add", "--title", "t", "--stage", "deploy"], ["--stage", "'deploy'", "simulate/rtl → 仿真"]),
    (["add", "--title", "t", "--stage", "导出", "--status", "done"], ["状态", "--status", "'done'"]),
    (["add", "--title", "", "--stage", "导出"], ["--title", "empty"]),
    (["add", "--stage", "导出"], ["--title"]),
    (["add", "--title", "t", "--stage", "导出", "--error", "x", "--error-file", "-"], ["not allowed"]),
    (["add", "--title", "t", "--stage", "导出", "--error-file", "/nonexistent/e.txt"], ["/nonexistent/e.txt"]),
    (["set", "1"], ["nothing to change"]),
    (["set", "x", "--status", "已解决"], ["invalid int value"]),
    ([], ["list, add or set"]),
    (["frobnicate"], ["invalid choice"]),
])
def test_bad_usage_or_values_exit_2_with_a_message(project, capsys, argv, needles):
    assert main(argv) == 2
    err = capsys.readouterr().err
    for needle in needles:
        assert needle in err
    assert not (project / "logs" / "bugs_found.md").exists()


@pytest.mark.parametrize(("given", "stored"), [
    ("export", "导出"), ("precheck", "编译"), ("parse", "编译"), ("optimize", "编译"),
    ("simulate", "仿真"), ("replace", "替换"), ("validate", "替换"), ("Export", "导出"),
    ("仿真", "仿真"),
])
def test_stage_takes_the_pipeline_stage_names(project, capsys, given, stored):
    assert main(["add", "--title", "export 失败", "--stage", given]) == 0
    path = project / "logs" / "bugs_found.md"
    assert BugBook(path).load()[0].stage == stored
    assert f"- **发现阶段**: {stored}\n" in path.read_text(encoding="utf-8")


def test_set_stage_takes_the_pipeline_stage_names(project, capsys):
    main(["add", "--title", "t", "--stage", "导出"])
    assert main(["set", "1", "--stage", "simulate"]) == 0
    path = project / "logs" / "bugs_found.md"
    assert BugBook(path).load()[0].stage == "仿真"
    before = path.read_bytes()
    capsys.readouterr()
    assert main(["set", "1", "--stage", "deploy"]) == 2
    err = capsys.readouterr().err
    assert "'deploy'" in err and "导出, 编译, 仿真, 替换" in err and "export → 导出" in err
    assert path.read_bytes() == before


def test_set_of_a_duplicated_number_is_refused_without_writing(project, capsys):
    path = project / "logs" / "bugs_found.md"
    path.parent.mkdir()
    path.write_text("# Phase 3 Bug记录\n\n## Bug #3: 一\n- **状态**: 未解决\n\n---\n\n"
                    "## Bug #3: 手工复制\n- **状态**: 未解决\n\n---\n", encoding="utf-8")
    before = path.read_bytes()
    assert main(["set", "3", "--status", "已解决"]) == 2
    err = capsys.readouterr().err
    assert "Bug #3" in err and "lines 3, 8" in err
    assert path.read_bytes() == before


def test_set_of_a_missing_record_exits_2(project, capsys):
    main(["add", "--title", "t", "--stage", "导出"])
    capsys.readouterr()
    assert main(["set", "7", "--status", "已解决"]) == 2
    assert "Bug #7" in capsys.readouterr().err


def test_bad_config_exits_2_naming_the_file(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["list", "--config", "missing.toml"]) == 2
    assert "missing.toml" in capsys.readouterr().err
    (tmp_path / "tdpu.toml").write_text('[paths]\nlogz = "x"\n', encoding="utf-8")
    assert main(["list"]) == 2
    err = capsys.readouterr().err
    assert "tdpu.toml" in err and "paths.logz" in err


def test_unwritable_bug_file_exits_1(project, capsys):
    logs = project / "logs"
    logs.mkdir()
    (logs / "bugs_found.md").mkdir()  # a directory where the file should be
    assert main(["add", "--title", "t", "--stage", "导出"]) == 1
    assert "tdpu bugs:" in capsys.readouterr().err


def test_list_of_a_missing_file_says_so(project, capsys):
    assert main(["list"]) == 0
    assert "no bug records" in capsys.readouterr().out
    assert main(["list", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []


def test_help_exits_0(capsys):
    assert main(["--help"]) == 0
    assert "list" in capsys.readouterr().out


def test_runs_as_a_separate_process_with_stdin(project):
    proc = subprocess.run(
        [sys.executable, "-c", "import sys; from tdpu_tui.bugs_cli import main; "
         "sys.exit(main(sys.argv[1:]))", "add", "--title", "from a pipe", "--stage", "替换",
         "--error-file", "-"],
        input="第一行\n第二行\n", capture_output=True, text=True, cwd=project,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr
    assert BugBook(project / "logs" / "bugs_found.md").load()[0].error == "第一行\n第二行"
