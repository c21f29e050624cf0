"""The hand-off bundle and `tdpu icraft import`: bundle → copy elsewhere → run_icraft.sh with
the fake Icraft there → import of that copy (and of a zip of it), on the tiny synthetic model."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "fixtures" / "icraft"))
import helpers  # noqa: E402

from tdpu_tui.engine.core import run_status  # noqa: E402
from tdpu_tui.engine.records.compile_log import read_section  # noqa: E402

pytestmark = pytest.mark.slow


def write_project(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    cfg = root / "tdpu.toml"
    cfg.write_text("\n".join([
        "[model]", 'source = "synthetic"', "[model.synthetic]", 'preset = "tiny"', "seed = 0",
        "[export]", 'profile = "icraft"', "seq_len = 16", "verify_batch = 1", "verify_tokens = 8",
        "[icraft]", 'net_name = "tiny_net"', "timeout_s = 120",
        "[paths]", 'output = "models/output"', 'logs = "phase3_logs"', ""]), encoding="utf-8")
    return cfg


def no_icraft_env() -> dict[str, str]:
    env = helpers.fake_env()
    env["PATH"] = str(Path(sys.executable).parent)   # python only: no `icraft` anywhere
    env.pop("ICRAFT", None)
    return env


def tdpu(cfg: Path, *args: str, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tdpu_tui", *args, "--config", str(cfg)]
                          if args[0] == "--batch" else
                          [sys.executable, "-m", "tdpu_tui", "icraft", *args, "--config", str(cfg)],
                          env=env or no_icraft_env(), capture_output=True, text=True, timeout=300,
                          stdin=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("handoff")
    cfg = write_project(root)
    proc = tdpu(cfg, "--batch", "--stage", "export", "--stage", "precheck", "--stage", "parse")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return cfg


def run_on_host(bundle: Path, dest: Path, mode: str = "ok") -> subprocess.CompletedProcess:
    """Copy the bundle elsewhere (as to the Windows host) and run its shell script there."""
    shutil.copytree(bundle, dest)
    env = helpers.fake_env(mode)
    env["ICRAFT"] = str(helpers.FAKE_ICRAFT)
    return subprocess.run(["sh", str(dest / "run_icraft.sh")], cwd="/", env=env,
                          capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)


def bundle_dir(cfg: Path) -> Path:
    return cfg.parent / "models/output/icraft_output"


def test_parse_without_icraft_leaves_a_complete_bundle(project):
    out = bundle_dir(project)
    doc = json.loads((out / "bundle.json").read_text(encoding="utf-8"))
    meta = json.loads((cfg_meta := project.parent / "models/output/bitnet_b1.58_full.meta.json")
                      .read_text(encoding="utf-8"))
    assert doc["format"] == "tdpu-icraft-bundle/1" and doc["tdpu_version"] == "0.1.0"
    assert doc["export"]["exported_at"] == meta["exported_at"], cfg_meta
    assert doc["export"]["profile"] == "icraft"
    graph_files = {f["file"]: f for f in doc["graph"]["files"]}
    assert set(graph_files) == {"graph/bitnet_b1.58_full.onnx", "graph/bitnet_b1.58_full.onnx.data"}
    for name, row in graph_files.items():
        assert row["how"] == "hard link"        # same file system as the export
        assert os.path.samefile(out / name, project.parent / "models/output" / Path(name).name)
        assert row["bytes"] == (out / name).stat().st_size > 0
    (inp,) = doc["inputs"]
    assert inp["name"] == "inputs_embeds" and inp["shape"] == [1, 16, 64] and inp["seed"] == 7
    assert (out / inp["file"]).stat().st_size == 16 * 64 * 4
    toml = (out / "tiny_net.toml").read_text(encoding="utf-8")
    assert 'network = "graph/bitnet_b1.58_full.onnx"' in toml
    assert "dump_output = true" in toml and 'dump_format = "SFB"' in toml
    assert 'input = "inputs/inputs_embeds.ftmp"' in toml
    ps1 = (out / "run_icraft.ps1").read_bytes()
    assert ps1.startswith(b"\xef\xbb\xbf") and b"\r\n" in ps1 and b"$env:ICRAFT" in ps1
    assert os.access(out / "run_icraft.sh", os.X_OK)
    section = read_section(project.parent / "phase3_logs/icraft_compile_log.md", "parse")
    assert "## parse — skipped" in section and "run_icraft.ps1" in section
    data = graph_files["graph/bitnet_b1.58_full.onnx.data"]["bytes"]
    assert "- hand-off bundle: bitnet_b1.58_full.onnx.data: hard link, " in section
    assert f"({data} bytes)" in section         # which way, and how many bytes


def test_round_trip_through_run_icraft_sh_then_import_folder_and_zip(project, tmp_path):
    host = tmp_path / "windows_host" / "icraft_output"
    ran = run_on_host(bundle_dir(project), host)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    for cmd in ("parse", "optimize", "run"):
        assert (host / "logs" / f"{cmd}.exit").read_text().strip() == "0"
    assert (host / "tiny_net_optimized.json").exists()

    proc = tdpu(project, "import", str(host))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    log = project.parent / "phase3_logs/icraft_compile_log.md"
    for stage in ("parse", "optimize", "simulate"):
        section = read_section(log, stage)
        assert f"## {stage} — ok" in section and f"imported from {host}" in section
    sim = read_section(log, "simulate")
    assert "icraft run on the Icraft host (imported)" in sim and "| argmax agreement | 100.00%" in sim
    rows = run_status.load(project.parent / "phase3_logs/runs/status.json")
    assert {n: rows[n].status.value for n in ("parse", "optimize", "simulate")} == \
        {"parse": "ok", "optimize": "ok", "simulate": "ok"}
    assert all(rows[n].message.startswith("imported: ") for n in ("parse", "optimize", "simulate"))

    archive = tmp_path / "back.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for p in sorted(host.rglob("*")):
            zf.write(p, f"icraft_output/{p.relative_to(host).as_posix()}")
    proc = tdpu(project, "import", str(archive))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    unpacked = project.parent / "models/output/icraft_import/back/icraft_output"
    assert (unpacked / "bundle.json").is_file()
    # inside the project: shown relative to it, as every path in the records
    assert "unpacked in models/output/icraft_import/back/icraft_output" in read_section(log, "simulate")


def test_an_optimize_failure_that_exits_0_is_imported_as_failed_and_drafted_once(project, tmp_path):
    host = tmp_path / "host"
    ran = run_on_host(bundle_dir(project), host, mode="optimize:fail21002")
    assert ran.returncode == 1                      # the script stopped at optimize
    assert (host / "logs/optimize.exit").read_text().strip() == "0"   # Icraft itself said 0
    assert not (host / "logs/run.exit").exists()
    bugs = project.parent / "phase3_logs/bugs_found.md"
    before = bugs.read_text(encoding="utf-8") if bugs.exists() else ""
    proc = tdpu(project, "import", str(host))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    log = project.parent / "phase3_logs/icraft_compile_log.md"
    opt = read_section(log, "optimize")
    assert "## optimize — failed" in opt and "- error code: **21002**" in opt
    assert "imported from" in opt and "icraft optimize tiny_net.toml" in opt
    rows = run_status.load(project.parent / "phase3_logs/runs/status.json")
    assert rows["parse"].status.value == "ok" and rows["optimize"].status.value == "failed"
    assert rows["simulate"].status.value == "skipped" and rows["simulate"].blocked_by == "optimize"
    after = bugs.read_text(encoding="utf-8")
    assert after.count("## Bug #") == before.count("## Bug #") + 1
    assert "21002" in after
    proc = tdpu(project, "import", str(host))      # the same failure again: no second draft
    assert proc.returncode == 1
    assert bugs.read_text(encoding="utf-8").count("## Bug #") == after.count("## Bug #")


def test_a_bundle_from_another_export_is_refused_naming_both(project, tmp_path):
    host = tmp_path / "host"
    shutil.copytree(bundle_dir(project), host)
    doc = json.loads((host / "bundle.json").read_text(encoding="utf-8"))
    doc["export"]["exported_at"] = "2020-01-01T00:00:00"
    (host / "bundle.json").write_text(json.dumps(doc), encoding="utf-8")
    meta = json.loads((project.parent / "models/output/bitnet_b1.58_full.meta.json")
                      .read_text(encoding="utf-8"))
    log = project.parent / "phase3_logs/icraft_compile_log.md"
    before = log.read_bytes()
    proc = tdpu(project, "import", str(host))
    assert proc.returncode == 2
    assert "another export" in proc.stderr
    assert "exported 2020-01-01T00:00:00" in proc.stderr
    assert f"exported {meta['exported_at']}" in proc.stderr
    assert log.read_bytes() == before               # nothing recorded


def test_a_zip_whose_members_escape_is_refused_and_nothing_is_written(project, tmp_path):
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("icraft_output/bundle.json", "{}")
        zf.writestr("../../escaped.txt", "x")
    proc = tdpu(project, "import", str(archive))
    assert proc.returncode == 2
    assert "'../../escaped.txt'" in proc.stderr and "refused" in proc.stderr
    assert not (project.parent / "models/output/escaped.txt").exists()
    assert not (project.parent / "models/escaped.txt").exists()
    assert not (project.parent / "models/output/icraft_import/evil").exists()


def test_icraft_bundle_command_writes_a_zip(project, tmp_path):
    dest = tmp_path / "handoff.zip"
    proc = tdpu(project, "bundle", "--zip", str(dest))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    with zipfile.ZipFile(dest) as zf:
        names = set(zf.namelist())
    assert {"icraft_output/bundle.json", "icraft_output/tiny_net.toml",
            "icraft_output/run_icraft.ps1", "icraft_output/run_icraft.sh",
            "icraft_output/graph/bitnet_b1.58_full.onnx",
            "icraft_output/graph/bitnet_b1.58_full.onnx.data",
            "icraft_output/inputs/inputs_embeds.ftmp"} <= names
    assert not any("/logs/" in n for n in names)
    assert "hard link" in proc.stdout


def test_a_cancel_during_the_comparison_is_cancelled_not_a_failure_and_drafts_nothing(project,
                                                                                       tmp_path):
    import threading

    from tdpu_tui.engine.core.config import load_config
    from tdpu_tui.engine.core.events import StageStarted, Status
    from tdpu_tui.engine.stages.handoff import import_bundle

    host = tmp_path / "host"
    assert run_on_host(bundle_dir(project), host).returncode == 0
    bugs = project.parent / "phase3_logs/bugs_found.md"
    before = bugs.read_text(encoding="utf-8") if bugs.exists() else ""
    cancel = threading.Event()

    def on_event(ev):       # the app's `c` while the output is compared with the reference
        if isinstance(ev, StageStarted) and ev.stage == "simulate":
            cancel.set()

    report = import_bundle(load_config(project), host, on_event, cancel=cancel)
    status = {r.name: r.status for r in report.results}
    assert status == {"parse": Status.OK, "optimize": Status.OK, "simulate": Status.CANCELLED}
    assert report.drafted == []
    assert (bugs.read_text(encoding="utf-8") if bugs.exists() else "") == before
    rows = run_status.load(project.parent / "phase3_logs/runs/status.json")
    assert rows["simulate"].status.value == "cancelled"
