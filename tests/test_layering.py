"""The execution core is importable without the TUI (harlequin's contract), and loading the
stages starts no numba. Every module is walked: a new one is checked without being listed."""

import pkgutil
import subprocess
import sys

import pytest

import kernels
import tdpu_tui


def _modules(package) -> list[str]:
    return sorted(m.name for m in pkgutil.walk_packages(package.__path__, package.__name__ + ".")
                  if not m.name.endswith("__main__"))


HEADLESS = [m for m in _modules(tdpu_tui) + _modules(kernels)
            if not m.startswith("tdpu_tui.app") and m != "tdpu_tui.cli"]


def test_the_walk_finds_the_engine():
    assert {"tdpu_tui.engine.core.pipeline", "tdpu_tui.engine.stages.validate",
            "tdpu_tui.batch", "kernels.ort"} <= set(HEADLESS)


def test_every_headless_module_imports_without_textual_or_rich():
    code = (
        "import importlib, sys\n"
        f"for name in {HEADLESS!r}:\n"
        "    importlib.import_module(name)\n"
        "    bad = [m for m in ('textual', 'rich') if m in sys.modules]\n"
        "    if bad:\n"
        "        print(name, ','.join(bad)); sys.exit(1)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, f"{proc.stdout.strip()} {proc.stderr[-2000:]}"


@pytest.mark.parametrize("module", [m for m in HEADLESS if m.startswith("tdpu_tui")])
def test_module_imports_alone(module):
    """Each module imports on its own, in a fresh interpreter (no hidden import-order cycle)."""
    proc = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_loading_the_stages_does_not_start_numba():
    """The app and `tdpu --batch` list every stage at start-up; numba (and its threads) come
    only with the first kernel call."""
    code = ("import sys; from tdpu_tui.engine.stages import all_stages; all_stages(); "
            "bad = [m for m in ('numba', 'kernels.bf16', 'kernels.bitlinear') if m in sys.modules]; "
            "print(','.join(bad)); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, f"start-up imported {proc.stdout.strip()} {proc.stderr[-2000:]}"
