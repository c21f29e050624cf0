"""export → precheck → parse → optimize → simulate through `tdpu --batch`, with and without the
fake Icraft, on the tiny synthetic model."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent / "fixtures" / "icraft"))
import helpers  # noqa: E402

from tdpu_tui.engine.stages import simulate as icraft_stages  # noqa: E402
from tdpu_tui.engine.records.compile_log import read_section  # noqa: E402
from tdpu_tui.engine.core.config import load_config  # noqa: E402
from tdpu_tui.engine.core.events import Status  # noqa: E402
from tdpu_tui.engine.core.pipeline import Pipeline  # noqa: E402
from tdpu_tui.engine.stages import all_stages  # noqa: E402

pytestmark = pytest.mark.slow

ICRAFT_STAGES = ["precheck", "parse", "optimize", "simulate"]


def write_project(root: Path, profile: str, timeout_s: float = 120) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    cfg = root / "tdpu.toml"
    cfg.write_text("\n".join([
        "[model]", 'source = "synthetic"', "[model.synthetic]", 'preset = "tiny"', "seed = 0",
        "[export]", f'profile = "{profile}"', "seq_len = 16", "verify_batch = 1",
        "verify_tokens = 8",
        "[icraft]", 'net_name = "tiny_net"', f"timeout_s = {timeout_s}",
        "[paths]", 'output = "models/output"', 'logs = "phase3_logs"', ""]), encoding="utf-8")
    return cfg


def batch(cfg: Path, stages: list[str], env: dict[str, str]) -> tuple[int, dict]:
    out = cfg.parent / "run.json"
    out.unlink(missing_ok=True)
    argv = [sys.executable, "-m", "tdpu_tui", "--batch", "--config", str(cfg), "--json", str(out)]
    for s in stages:
        argv += ["--stage", s]
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300,
                          stdin=subprocess.DEVNULL)
    assert out.exists(), proc.stdout + proc.stderr
    return proc.returncode, json.loads(out.read_text(encoding="utf-8"))


def by_name(summary: dict) -> dict[str, dict]:
    return {s["name"]: s for s in summary["stages"]}


def no_icraft_env(tmp_path: Path) -> dict[str, str]:
    env = helpers.fake_env()
    env["PATH"] = str(Path(sys.executable).parent)   # python only: no `icraft` anywhere
    return env


@pytest.fixture(scope="module")
def icraft_project(tmp_path_factory):
    """An icraft-profile export, shared by the tests that drive the fake CLI."""
    root = tmp_path_factory.mktemp("icraft_profile")
    cfg = write_project(root, "icraft")
    code, summary = batch(cfg, ["export"], no_icraft_env(root))
    assert code == 0, summary
    return cfg


def test_reference_profile_without_icraft(tmp_path):
    cfg = write_project(tmp_path, "reference")
    code, summary = batch(cfg, ["export"] + ICRAFT_STAGES, no_icraft_env(tmp_path))
    st = by_name(summary)
    assert code == 0, summary
    assert st["precheck"]["status"] == "ok" and "blocking for Icraft" in st["precheck"]["message"]
    assert summary["metrics"]["precheck"]["constraint"] > 0      # Div by a tensor, Gather, …
    for name in ("parse", "optimize"):
        assert st[name]["status"] == "skipped"
        assert st[name]["message"].startswith(
            "Icraft CLI 'icraft' not found on PATH; set [icraft].bin; ")
    assert st["simulate"]["status"] == "ok"
    assert st["simulate"]["message"].startswith("simulated on onnxruntime (Icraft not installed)")
    sim = summary["metrics"]["simulate"]
    assert sim["argmax_agreement"] >= 0.99 and sim["max_abs"] < 1e-3
    log = (tmp_path / "phase3_logs" / "icraft_compile_log.md").read_text(encoding="utf-8")
    for name in ICRAFT_STAGES:
        assert f"<!-- tdpu:section {name} -->" in log
    csv_path = tmp_path / "models/output/icraft_output/tiny_net_precheck.csv"
    assert csv_path.read_text(encoding="utf-8").startswith("index,node_type,node_output,note\n")


def test_icraft_profile_through_the_fake_icraft(icraft_project):
    cfg = icraft_project
    code, summary = batch(cfg, ICRAFT_STAGES, helpers.fake_env("ok"))
    st = by_name(summary)
    assert code == 0, summary
    assert [st[n]["status"] for n in ICRAFT_STAGES] == ["ok"] * 4, summary
    assert summary["metrics"]["precheck"]["blocking"] == 0
    assert st["simulate"]["message"].startswith("simulated on icraft run (Host backend)")
    assert summary["metrics"]["simulate"]["argmax_agreement"] >= 0.99
    out = cfg.parent / "models/output/icraft_output"
    embeds = np.fromfile(out / "inputs" / "inputs_embeds.ftmp", dtype=np.float32)
    assert embeds.size == 1 * 16 * 64          # [1, seq_len, hidden] of the tiny preset
    section = read_section(cfg.parent / "phase3_logs/icraft_compile_log.md", "simulate")
    assert "--backends Host" in section and "--input " in section and "ftmpSFB" in section


def test_parse_failure_in_batch_names_code_and_command(icraft_project):
    cfg = icraft_project
    code, summary = batch(cfg, ["parse", "optimize"], helpers.fake_env("parse:fail21002"))
    st = by_name(summary)
    assert code == 1
    assert st["parse"]["status"] == "failed" and "21002" in st["parse"]["message"]
    assert st["optimize"]["status"] == "skipped"
    assert st["optimize"]["message"] == "not run: parse failed"
    section = read_section(cfg.parent / "phase3_logs/icraft_compile_log.md", "parse")
    assert "- error code: **21002**" in section and " parse --net_name tiny_net " in section


def test_simulate_fails_below_99_percent_argmax_agreement(icraft_project, monkeypatch,
                                                         tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))          # no icraft: the onnxruntime path
    real = icraft_stages.onnxruntime_logits

    def scrambled(onnx_path, name, feed, cache=None):
        logits = real(onnx_path, name, feed, cache)
        return np.ascontiguousarray(logits[..., ::-1])
    monkeypatch.setattr(icraft_stages, "onnxruntime_logits", scrambled)
    cfg = load_config(icraft_project)
    results = Pipeline(cfg, stages=all_stages()).run(["simulate"]).results
    assert results[0].status is Status.FAILED
    assert "is below 99.00%" in results[0].message


def _wait_gone(pid: int, seconds: float = 10) -> bool:
    deadline = time.monotonic() + seconds
    while not helpers.process_gone(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return helpers.process_gone(pid)


def test_batch_timeout_kills_icraft_and_its_children(icraft_project, tmp_path):
    pidfile = tmp_path / "component.pid"
    cfg = icraft_project.parent / "tdpu_timeout.toml"
    cfg.write_text(icraft_project.read_text(encoding="utf-8")
                   .replace("timeout_s = 120", "timeout_s = 2"), encoding="utf-8")
    code, summary = batch(cfg, ["parse"], helpers.fake_env("hang",
                                                           FAKE_ICRAFT_PIDFILE=str(pidfile)))
    assert code == 1 and "timed out" in by_name(summary)["parse"]["message"]
    assert _wait_gone(int(pidfile.read_text()))


def test_ctrl_c_in_batch_exits_130_and_leaves_no_icraft_behind(icraft_project, tmp_path):
    pidfile = tmp_path / "component.pid"
    argv = [sys.executable, "-m", "tdpu_tui", "--batch", "--config", str(icraft_project),
            "--stage", "parse"]
    proc = subprocess.Popen(argv, env=helpers.fake_env("hang", FAKE_ICRAFT_PIDFILE=str(pidfile)),
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not pidfile.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert pidfile.exists(), proc.communicate(timeout=10)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, out.decode() + err.decode()
    assert _wait_gone(int(pidfile.read_text()))
    section = read_section(icraft_project.parent / "phase3_logs/icraft_compile_log.md", "parse")
    assert "interrupted (Ctrl-C)" in section
