"""The execution core must be importable without the TUI (STYLE.md, harlequin's contract)."""

import subprocess
import sys

import pytest

ENGINE_MODULES = [
    "tdpu_tui.engine.config",
    "tdpu_tui.engine.pipeline",
    "tdpu_tui.engine.stages",
    "tdpu_tui.engine.export",
    "tdpu_tui.engine.tail",
    "tdpu_tui.engine.bugbook",
    "tdpu_tui.engine.inventory",
    "tdpu_tui.engine.icraft_stages",
    "tdpu_tui.bugs_cli",
    "tdpu_tui.batch",
    "kernels.packing",
]


@pytest.mark.parametrize("module", ENGINE_MODULES)
def test_engine_module_imports_without_textual_or_rich(module):
    code = (
        f"import importlib, sys; importlib.import_module({module!r}); "
        "bad = [m for m in ('textual', 'rich') if m in sys.modules]; "
        "print(','.join(bad)); sys.exit(1 if bad else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, f"{module} pulled in {proc.stdout.strip()} {proc.stderr[-2000:]}"


def test_loading_the_stages_does_not_start_numba():
    """The app and `tdpu --batch` list every stage at start-up; numba (and its threads) come
    only with the first kernel call."""
    code = ("import sys; from tdpu_tui.engine.stages import all_stages; all_stages(); "
            "bad = [m for m in ('numba', 'kernels.bf16', 'kernels.bitlinear') if m in sys.modules]; "
            "print(','.join(bad)); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, f"start-up imported {proc.stdout.strip()} {proc.stderr[-2000:]}"
