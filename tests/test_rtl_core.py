"""Stage `rtl` on the reference core of tests/fixtures/rtl/ and on one broken variant per hypothesis.

One Verilator build per variant for the whole session (`rtl_builds` in conftest), LEN 16,
the tiny model's tiles."""

import hashlib
import json
import math
import re

import pytest

from tests.conftest import RTL_FIXTURES, RTL_LANES, run_tdpu
from tdpu_tui.engine.rtl import diagnosis

VARIANTS = {
    "broken_unsigned.sv": diagnosis.UNSIGNED,
    "broken_swapped.sv": diagnosis.SWAPPED,
    "broken_reversed.sv": diagnosis.REVERSED,
    "broken_weights_late.sv": diagnosis.LATE,
    "broken_weights_early.sv": diagnosis.EARLY,
    "broken_wrap.sv": diagnosis.wrapped(10),
    "broken_saturate.sv": diagnosis.saturated(10),
    "broken_no_sign_extend.sv": diagnosis.not_sign_extended(16),
}


def _project(rtl_project, rtl_builds, tmp_path, source, extra=""):
    """A copy of the exported tiny project whose build folder is the session's."""
    import shutil

    from tdpu_tui.engine.core.config import load_config

    rtl_builds(source)
    p = tmp_path / "p"
    shutil.copytree(rtl_project, p)
    (p / "out" / "rtl").symlink_to(rtl_builds.root, target_is_directory=True)
    text = (p / "tdpu.toml").read_text() + (f'\n[rtl]\nsources = ["{RTL_FIXTURES / source}"]\n'
                                            f"lanes = {RTL_LANES}\n{extra}")
    (p / "tdpu.toml").write_text(text)
    return load_config(p / "tdpu.toml")


def test_the_harness_measures_the_reference_cores_timing(rtl_builds):
    from tdpu_tui.engine.rtl.timing import measure

    t = measure(rtl_builds("vec_multi_core.sv").binary, RTL_LANES, (0, 1, 2), timeout_s=60)
    assert (t.latency, t.ii_fresh, t.ii_reused) == (1 + int(math.log2(RTL_LANES)), 1, 1)
    assert t.fresh_exact and t.reused_exact and not t.notes
    assert "256 answered, all exact, latency unchanged" in t.bubbles
    assert "0 pulse(s) during or right after it" in t.reset and t.reset.endswith("all exact")


# correct cores whose weight timing differs from the reference's: (source, II fresh, II reused, lead)
TIMED = {"slow_weights.sv": (2, 1, None), "load_takes_cycle.sv": (2, 1, 1)}


@pytest.mark.parametrize("source", sorted(TIMED))
def test_the_interval_is_measured_for_cores_that_need_more_than_one_cycle_per_fresh_tile(rtl_builds, source):
    """Weights usable two edges after their load, or no input in a load cycle: correct at II 2
    with fresh weights (each input as far after its load as every other), II 1 with weights reused."""
    from tdpu_tui.engine.rtl.timing import measure

    t = measure(rtl_builds(source).binary, RTL_LANES, (0, 1, 2), timeout_s=60)
    assert (t.latency, t.ii_fresh, t.ii_reused, t.lead) == (1 + int(math.log2(RTL_LANES)), *TIMED[source])
    assert t.fresh_exact and t.reused_exact
    assert "256 answered, all exact, latency unchanged" in t.bubbles and t.reset.endswith("all exact")
    assert bool(t.notes) == (t.lead is not None)


@pytest.mark.slow
def test_a_core_with_slow_weights_is_exact_at_its_own_interval(rtl_project, rtl_builds, tmp_path):
    cfg = _project(rtl_project, rtl_builds, tmp_path, "slow_weights.sv", "nodes = 2\nmax_tiles = 1500\n")
    r = _run_failing(cfg)
    assert r.status.value == "ok" and r.message.startswith("exact:"), r.message
    assert (r.metrics["initiation_interval"], r.metrics["initiation_interval_reused"]) == (2, 1)
    assert r.metrics["tiles_wrong"] == 0 and r.metrics["diagnosis"] is None


def test_the_build_is_cached_by_the_sources_hash(rtl_builds, tmp_path):
    from tdpu_tui.engine.core.config import Config
    from tdpu_tui.engine.rtl import build

    first = rtl_builds("vec_multi_core.sv")
    cfg = Config()
    cfg.rtl.sources = [str(RTL_FIXTURES / "vec_multi_core.sv")]
    cfg.rtl.lanes = RTL_LANES
    again = build.build(build.Core.of(cfg), rtl_builds.verilator, rtl_builds.root, timeout_s=60)
    assert again.cached and again.binary == first.binary
    changed = tmp_path / "vec_multi_core.sv"
    changed.write_text((RTL_FIXTURES / "vec_multi_core.sv").read_text() + "\n// edited\n")
    cfg.rtl.sources = [str(changed)]
    cfg.rtl.include_dirs = [str(RTL_FIXTURES)]
    assert build.Core.of(cfg).key(rtl_builds.verilator) != first.key


def test_the_reference_core_is_exact_through_tdpu_batch_stage_rtl(rtl_project, rtl_builds, tmp_path):
    cfg = _project(rtl_project, rtl_builds, tmp_path, "vec_multi_core.sv")
    out = tmp_path / "summary.json"
    proc = run_tdpu("--batch", "--config", str(cfg.file), "--stage", "rtl", "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(out.read_text())
    (stage,) = summary["stages"]
    assert stage["name"] == "rtl" and stage["status"] == "ok" and stage["message"].startswith("exact:")
    m = summary["metrics"]["rtl"]
    assert m["tiles_wrong"] == 0 and m["rows_wrong"] == 0 and m["diagnosis"] is None
    assert m["latency_cycles"] == 1 + int(math.log2(RTL_LANES)) and m["initiation_interval"] == 1

    # every (K, N) shape, the projections whole (16 tokens each); the corner tiles at the end
    index = json.loads((cfg.output_dir / "rtl_vectors" / "index.json").read_text())["vectors"]
    report = json.loads((cfg.output_dir / "replace_report.json").read_text())
    shapes = {(d["k"], d["n"]) for d in report["nodes"] if d["action"] == "replaced"}
    nodes = [v for v in index if v["node"] != "corner tiles"]
    assert {(v["K"], v["N"]) for v in nodes} == shapes
    assert all(len(v["tokens"]) == 16 and v["rows"] == v["N"] for v in nodes)
    assert m["tiles_checked"] == sum(v["tiles"] for v in index)
    assert index[-1]["node"] == "corner tiles"

    # the golden vectors: sha256 as indexed, one word per tile, each word's expected = its sum
    lay = index[0]["word"]
    for v in index:
        raw = (cfg.output_dir / "rtl_vectors" / v["file"]).read_bytes()
        assert hashlib.sha256(raw).hexdigest() == v["sha256"]
        lines = raw.decode().splitlines()
        assert len(lines) == v["tiles"]
        for line in lines[:: max(1, len(lines) // 50)]:
            word = int(line, 16)
            xs = [((word >> (8 * i)) & 0xFF) for i in range(RTL_LANES)]
            xs = [x - 256 if x > 127 else x for x in xs]
            codes = [(word >> (lay["weight"][0] + 2 * i)) & 3 for i in range(RTL_LANES)]
            exp = (word >> lay["expected"][0]) & 0xFFFFFFFF
            exp = exp - (1 << 32) if exp >> 31 else exp
            assert exp == sum(x * (c - 1) for x, c in zip(xs, codes))

    log = (cfg.logs_dir / "rtl_log.md").read_text()
    src_hash = hashlib.sha256((RTL_FIXTURES / "vec_multi_core.sv").read_bytes()).hexdigest()
    assert src_hash in log and "latency: **5** cycles" in log and "通过 passed" in log
    perf = (cfg.logs_dir / "performance_report.md").read_text()
    cycles = sum(n * math.ceil(k / RTL_LANES) + 5 for k, n in
                 [(d["k"], d["n"]) for d in report["nodes"] if d["action"] == "replaced"])
    assert summary["metrics"]["rtl"]["tdpu_cycles_per_token"] == cycles
    assert f"**This graph, one token**: {cycles} cycles" in perf and "measured by the rtl stage" in perf
    assert "lanes × cores" in perf and "2B4T" in perf


def _run_failing(cfg):
    from tdpu_tui.engine.core.artifacts import Artifacts
    from tdpu_tui.engine.core.pipeline import Pipeline
    from tdpu_tui.engine.records.bugbook import record_failure
    from tdpu_tui.engine.stages import all_stages, bug_stages

    def draft(result, cfg):
        record_failure(Artifacts.of(cfg).bugs, result.name, result.message, result.log_tail,
                       bug_stages=bug_stages())

    return Pipeline(cfg, stages=all_stages(), on_failure=draft).run(["rtl"]).results[0]


@pytest.mark.slow
@pytest.mark.parametrize("source", sorted(VARIANTS))
def test_each_broken_core_fails_and_is_explained_by_its_hypothesis(rtl_project, rtl_builds, tmp_path, source):
    cfg = _project(rtl_project, rtl_builds, tmp_path, source, "nodes = 2\nmax_tiles = 1500\n")
    r = _run_failing(cfg)
    assert r.status.value == "failed"
    want = VARIANTS[source]
    assert r.metrics["diagnosis"] == want
    assert re.match(rf"(\d+) of (\d+) tiles wrong; e\.g\. .+, K-tile \d+, expected -?\d+, got -?\d+; "
                    rf"explained by: {re.escape(want)}$", r.message) or \
        re.match(rf"(\d+) of (\d+) tiles wrong; e\.g\. corner tiles, directed tile \d+, expected -?\d+, "
                 rf"got -?\d+; explained by: {re.escape(want)}$", r.message), r.message
    wrong, total = map(int, re.match(r"(\d+) of (\d+)", r.message).groups())
    assert 0 < wrong <= total == r.metrics["tiles_checked"] and wrong == r.metrics["tiles_wrong"]
    book = (cfg.logs_dir / "bugs_found.md").read_text()
    assert "**发现阶段**: 仿真" in book and want in book
    log = (cfg.logs_dir / "rtl_log.md").read_text()
    assert "未通过 failed" in log and want in log and "expected" in log


def test_a_core_that_does_not_compile_fails_with_verilators_first_error(rtl_builds, tmp_path):
    from tdpu_tui.engine.core.config import Config
    from tdpu_tui.engine.core.errors import StageFailed
    from tdpu_tui.engine.rtl import build

    bad = tmp_path / "vec_multi_core.sv"
    bad.write_text("module vec_multi_core #(parameter int LEN = 16) (input logic clk);\n  assign = ;\nendmodule\n")
    cfg = Config()
    cfg.rtl.sources = [str(bad)]
    with pytest.raises(StageFailed, match=r"could not build vec_multi_core .*%Error.*vec_multi_core\.sv:2"):
        build.build(build.Core.of(cfg), rtl_builds.verilator, tmp_path / "b", timeout_s=120)


@pytest.mark.slow
def test_a_core_that_never_answers_fails_and_says_so_in_the_log(rtl_project, rtl_builds, tmp_path):
    cfg = _project(rtl_project, rtl_builds, tmp_path, "broken_silent.sv")
    r = _run_failing(cfg)
    assert r.status.value == "failed" and "no o_data_ready pulse" in r.message, r.message
    assert r.metrics["diagnosis"] == "the core does not answer every input"
    log = (cfg.logs_dir / "rtl_log.md").read_text()
    assert "未通过 failed" in log and "no o_data_ready pulse" in log and "not measured" in log
    assert "**发现阶段**: 仿真" in (cfg.logs_dir / "bugs_found.md").read_text()
