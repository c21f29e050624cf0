"""tdpu with the POSIX-only calls gone, as on Windows: `fcntl` and `resource` unimportable,
`os.pread`, `os.killpg`, `os.getloadavg`, `os.chown`, `signal.SIGKILL` and `signal.SIGHUP`
removed before anything of tdpu is imported (locks then fall back to filelock's soft lock, as
its Windows lock needs no fcntl either)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# Run first in the child, like a sitecustomize: what Windows lacks is made to be missing.
# psutil is imported first: its Linux backend needs `resource`, and on Windows psutil brings its
# own backend instead. It then finds no os.getloadavg, so it offers no getloadavg either.
BOOTSTRAP = textwrap.dedent("""\
    import os, signal, sys
    for name in ("pread", "killpg", "getloadavg", "chown"):
        if hasattr(os, name):
            delattr(os, name)
    for name in ("SIGKILL", "SIGHUP"):
        if hasattr(signal, name):
            delattr(signal, name)
    import psutil
    sys.modules["fcntl"] = None          # `import fcntl` raises ImportError
    sys.modules["resource"] = None
    for module in ("fcntl", "resource"):
        try:
            __import__(module)
        except ImportError:
            pass
        else:
            raise SystemExit(f"bootstrap: {module} is still importable")
    """)

IMPORT_ALL = BOOTSTRAP + textwrap.dedent("""\
    import importlib, pkgutil
    import kernels, tdpu_tui
    names = []
    for package in (tdpu_tui, kernels):
        for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            if info.name == "tdpu_tui.__main__":
                continue
            importlib.import_module(info.name)
            names.append(info.name)
    print("\\n".join(names))
    """)

BATCH = BOOTSTRAP + textwrap.dedent("""\
    from tdpu_tui.cli import main
    raise SystemExit(main(sys.argv[1:]))
    """)


def _run(script: str, *args: str, cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", script, *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


@pytest.mark.slow
def test_every_module_imports_without_the_posix_only_calls(tmp_path):
    proc = _run(IMPORT_ALL, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    imported = set(proc.stdout.split())
    for expected in ("tdpu_tui.engine.stages.export", "tdpu_tui.engine.stages.validate",
                     "tdpu_tui.engine.osutil.tail", "tdpu_tui.engine.core.run_status",
                     "tdpu_tui.engine.icraft.driver", "tdpu_tui.batch", "tdpu_tui.app.app",
                     "kernels.ort"):
        assert expected in imported


@pytest.mark.slow
def test_batch_on_the_tiny_model_without_the_posix_only_calls(tmp_path):
    shutil.copy(REPO / "tdpu.toml", tmp_path / "tdpu.toml")   # the shipped config: tiny, synthetic
    summary_path = tmp_path / "summary.json"
    proc = _run(BATCH, "--batch", "--json", str(summary_path), cwd=tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    stages = {s["name"]: s for s in json.loads(summary_path.read_text(encoding="utf-8"))["stages"]}
    status = {n: s["status"] for n, s in stages.items()}
    assert {n: status.pop(n) for n in ("export", "precheck", "simulate", "replace", "validate")} == dict.fromkeys(
        ("export", "precheck", "simulate", "replace", "validate"), "ok")
    assert status.pop("parse") == status.pop("optimize") == "skipped"    # no Icraft on this host
    assert all(s == "skipped" for s in status.values()), status          # e.g. rtl without sources
    summary = json.loads(summary_path.read_text(encoding="utf-8"))
    assert summary["metrics"]["export"]["peak_rss_bytes"] > 50 << 20    # measured through psutil
    report = (tmp_path / "phase3_logs" / "performance_report.md").read_text(encoding="utf-8")
    assert "load average n/a" in report
    rows = json.loads((tmp_path / "phase3_logs" / "runs" / "status.json").read_text(encoding="utf-8"))
    assert all(row["status"] != "running" for row in rows["stages"].values())
    output = tmp_path / "models" / "output"
    assert not [p.name for p in output.iterdir() if p.name.startswith((".staging-", ".validate-"))]
