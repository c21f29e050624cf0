"""The command line a terminal user expects: --version, global options before a command,
help that lists the stages and the exit codes."""

from __future__ import annotations

import zipfile

import pytest

from tdpu_tui import __version__
from tdpu_tui.cli import EXIT_CODES, _parser, main, split_command
from tdpu_tui.engine.core.errors import ExitCode
from tdpu_tui.engine.stages import NAMES
from tests.conftest import run_tdpu, write_config

BOOK = """# Phase 3 Bug记录

## Bug #1: 导出时 lm_head 形状不对
- **发现时间**: 2026-12-01 10:00:00
- **发现阶段**: 导出
- **错误信息**:
  shape mismatch
- **根本原因**: 转置
- **解决方案**: 去掉转置
- **状态**: 已解决
"""


def test_version_prints_the_package_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"tdpu {__version__}"


def test_version_from_the_shell():
    proc = run_tdpu("--version", timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == f"tdpu {__version__}"


@pytest.fixture
def project_with_a_bug(tmp_path):
    config = write_config(tmp_path)
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "bugs_found.md").write_text(BOOK, encoding="utf-8")
    return config


def test_config_before_the_bugs_command_chooses_the_book(project_with_a_bug, tmp_path, monkeypatch, capsys):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)          # no tdpu.toml here: only --config can find the book
    assert main(["--config", str(project_with_a_bug), "bugs", "list"]) == 0
    out = capsys.readouterr().out
    assert "导出时 lm_head 形状不对" in out and "已解决" in out
    # the same with --config=PATH and with the option after the command
    assert main([f"--config={project_with_a_bug}", "bugs", "list", "--json"]) == 0
    assert '"number": 1' in capsys.readouterr().out
    assert main(["bugs", "list", "--config", str(project_with_a_bug)]) == 0
    assert "导出时 lm_head 形状不对" in capsys.readouterr().out


def test_config_before_bugs_from_the_shell(project_with_a_bug, tmp_path):
    proc = run_tdpu("--config", str(project_with_a_bug), "bugs", "list", cwd=tmp_path.parent, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "导出时 lm_head 形状不对" in proc.stdout


@pytest.mark.parametrize("argv", [["--config", "{cfg}", "icraft", "bundle"],
                                  ["icraft", "--config", "{cfg}", "bundle"],
                                  ["icraft", "bundle", "--config", "{cfg}"],
                                  ["--config", "{cfg}", "icraft", "import", "{bundle}"]])
def test_config_before_or_after_the_icraft_command_chooses_the_project(argv, tmp_path, monkeypatch,
                                                                        capsys):
    config = write_config(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)          # no tdpu.toml here: only --config names the project
    bundle = elsewhere / "back.zip"       # unpacked inside the project that --config names
    with zipfile.ZipFile(bundle, "w") as zf:
        zf.writestr("icraft_output/bundle.json", "{}")
    argv = [a.format(cfg=config, bundle=bundle) for a in argv]
    code = main(argv)
    err = capsys.readouterr().err
    # The project of --config was read (it has no export yet), not argparse's usage error.
    assert "usage:" not in err and str(tmp_path / "out") in err, err
    assert code == (ExitCode.FAILURE if "bundle" in argv else ExitCode.USAGE)


def test_a_pipeline_option_before_a_command_is_a_usage_error(project_with_a_bug, capsys):
    assert main(["--batch", "--config", str(project_with_a_bug), "bugs", "list"]) == ExitCode.USAGE
    err = capsys.readouterr().err
    assert "--batch applies to the pipeline, not to `tdpu bugs`" in err


def test_a_stage_named_like_a_command_is_an_option_value_not_the_command():
    parser = _parser()
    assert split_command(["--batch", "--stage", "bugs"], parser) == (["--batch", "--stage", "bugs"], None, [])
    assert split_command(["--config", "bugs", "bugs", "list"], parser) == (["--config", "bugs"], "bugs", ["list"])


def test_help_lists_the_stages_in_run_order_and_the_exit_codes(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "  " + ", ".join(NAMES) + "\n" in out
    assert NAMES[0] == "export" and "validate" in NAMES
    for code, why in EXIT_CODES.items():
        assert f"  {int(code):<3}  {why}" in out
    assert {int(c) for c in EXIT_CODES} == {0, 1, 2, 130}
    assert "tdpu [--config PATH] bugs" in out
    assert "--version" in out


def test_bugs_set_help_explains_n(capsys):
    assert main(["bugs", "set", "--help"]) == 0
    out = capsys.readouterr().out
    assert "the record to change: its number" in out and "Bug #N" in out
