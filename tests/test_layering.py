"""The execution core must be importable without the TUI (STYLE.md, harlequin's contract)."""

import subprocess
import sys

import pytest

ENGINE_MODULES = [
    "tdpu_tui.engine.core.config",
    "tdpu_tui.engine.core.pipeline",
    "tdpu_tui.engine.stages.registry",
    "tdpu_tui.engine.stages.export",
    "tdpu_tui.engine.osutil.tail",
    "tdpu_tui.engine.records.bugbook",
    "tdpu_tui.engine.rewrite.inventory",
    "tdpu_tui.engine.stages.icraft",
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
    code = ("import sys; from tdpu_tui.engine.stages.registry import all_stages; all_stages(); "
            "bad = [m for m in ('numba', 'kernels.bf16', 'kernels.bitlinear') if m in sys.modules]; "
            "print(','.join(bad)); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, f"start-up imported {proc.stdout.strip()} {proc.stderr[-2000:]}"
