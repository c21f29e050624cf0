"""Inventory of MatMul/Gemm nodes and the per-node selection, on hand-built exported graphs."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import bitlinear_graphs as bg
from tdpu_tui.engine.core.config import ReplaceConfig
from tdpu_tui.engine.rewrite.inventory import inventory
from tdpu_tui.engine.rewrite.patterns import PERMUTATION, classify_values
from tdpu_tui.engine.rewrite.selection import load_selection, resolve_selection, save_selection
from tdpu_tui.engine.core.errors import GraphError


@pytest.fixture(params=["reference", "icraft"])
def profile(request):
    return request.param


@pytest.mark.parametrize("form", ["scale_mul", "values", "transpose"])
def test_every_projection_is_ternary_whatever_the_weight_form(tmp_path, profile, form):
    path = bg.save(bg.build(profile, layers=2, form=form), tmp_path / "g.onnx")
    nodes = inventory(path)
    ternary = [n for n in nodes if n.ternary]
    assert len(ternary) == 14
    for layer in (0, 1):
        got = sorted(n.projection for n in ternary if n.layer == layer)
        assert got == sorted(p for _, p in bg.PROJECTIONS)
    q = next(n for n in ternary if n.name == "/model/layers.0/self_attn/q_proj/MatMul")
    assert (q.k, q.n, q.weight) == (32, 32, "model.layers.0.self_attn.q_proj.weight")
    assert q.module == "model.layers.0.self_attn.q_proj"
    assert q.act_quant is (profile == "reference")
    assert 0.2 < q.zeros < 0.6
    assert q.scale > 0


def test_weight_scale_is_the_folded_mul_times_the_value_magnitude(tmp_path):
    a = bg.build("reference", layers=1, form="scale_mul", seed=3)
    b = bg.build("reference", layers=1, form="values", seed=3)
    sa = {n.name: n.scale for n in inventory(bg.save(a, tmp_path / "a.onnx"))}
    sb = {n.name: n.scale for n in inventory(bg.save(b, tmp_path / "b.onnx"))}
    for name, scale in sa.items():
        if scale is not None:
            assert sb[name] == pytest.approx(scale, rel=1e-6)


def test_reasons_for_nodes_that_are_not_ternary(tmp_path, profile):
    nodes = {n.name: n for n in inventory(bg.save(bg.build(profile), tmp_path / "g.onnx"))}
    assert nodes["/model/layers.0/self_attn/MatMul"].status == "activation × activation"
    assert nodes["/model/layers.1/self_attn/MatMul_1"].status == "activation × activation"
    if profile == "reference":
        assert nodes["/lm_head/Gemm"].status == "tied embedding"
    else:
        assert nodes["/lm_head/MatMul"].status.startswith("float weights: 2048 distinct values")
    assert not any(n.ternary for n in nodes.values() if "lm_head" in n.name)


def test_modified_activation_quantization_is_named_not_replaced(tmp_path):
    model = bg.build("reference", layers=1)
    clip = next(n for n in model.graph.node if n.name == "/model/layers.0/mlp/up_proj/act_quant/Clip")
    hi = numpy_helper.from_array(np.array(126.0, np.float32), "const_126")
    model.graph.initializer.append(hi)
    clip.input[2] = "const_126"
    nodes = {n.name: n for n in inventory(bg.save(model, tmp_path / "g.onnx"))}
    up = nodes["/model/layers.0/mlp/up_proj/MatMul"]
    assert not up.ternary
    assert "Clip(-128.0, 126.0)" in up.status


def test_signed_permutation_is_not_a_projection(tmp_path):
    perm = np.zeros((8, 8), np.float32)
    for i in range(4):
        perm[i + 4, i], perm[i, i + 4] = -1, 1
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 8])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 8])
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "rot"], ["y"], name="/rope/MatMul")],
                              "g", [x], [y], [numpy_helper.from_array(perm, "rot")])
    path = tmp_path / "g.onnx"
    onnx.save(helper.make_model(graph), str(path))
    [node] = inventory(path)
    assert node.status == PERMUTATION


def test_classify_values_counts_distinct_floats_and_zero_share():
    w = np.array([[0.5, 0, -0.5, 0], [0, 0, 0.5, -0.5]], np.float32)
    assert classify_values(w) == ("ternary", 0.5, 0.5)
    f = np.arange(12, dtype=np.float32).reshape(3, 4)
    assert classify_values(f)[0] == "float weights: 12 distinct values"
    # a NaN or an infinity is never a ternary scale, nor -0.0 a second value
    assert classify_values(np.array([0, np.inf, -np.inf], np.float32))[0].startswith("float weights")
    assert classify_values(np.array([0.5, np.nan, -0.5], np.float32))[0].startswith("float weights")
    assert classify_values(np.array([0.0, -0.0, 0.25, -0.25], np.float32)) == ("ternary", 0.5, 0.25)


def test_inventory_reads_weights_through_a_memory_map_not_the_whole_model(tmp_path, monkeypatch):
    path = bg.save(bg.build("reference", layers=1), tmp_path / "g.onnx")
    calls = []
    real = onnx.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("load_external_data", True))
        return real(*args, **kwargs)

    monkeypatch.setattr(onnx, "load", spy)
    inventory(path)
    assert calls == [False]


def test_missing_graph_is_a_clear_error(tmp_path):
    with pytest.raises(GraphError, match="run the export stage first"):
        inventory(tmp_path / "nope.onnx")


# Selection ----------------------------------------------------------------------------


@pytest.fixture
def nodes(tmp_path):
    return inventory(bg.save(bg.build("reference", layers=2), tmp_path / "g.onnx"))


def test_globs_select_ternary_nodes_and_exclude_wins(nodes):
    cfg = ReplaceConfig(include=["*/layers.0/*", "*lm_head*"], exclude=["*down_proj*"])
    sel = resolve_selection(nodes, cfg)
    chosen = sorted(k for k, v in sel.items() if v)
    assert len(chosen) == 6
    assert all("/layers.0/" in k and "down_proj" not in k for k in chosen)
    assert sel["/lm_head/Gemm"] is False            # matched by a glob but not ternary: kept
    assert set(sel) == {n.name for n in nodes}


def test_selection_file_overrides_globs(nodes):
    cfg = ReplaceConfig(include=["*"], exclude=[])
    overrides = {"/model/layers.1/mlp/up_proj/MatMul": False}
    sel = resolve_selection(nodes, cfg, overrides)
    assert sel["/model/layers.1/mlp/up_proj/MatMul"] is False
    assert sum(sel.values()) == 13
    cfg = ReplaceConfig(include=["*q_proj*"], exclude=[])
    sel = resolve_selection(nodes, cfg, {"/model/layers.0/mlp/down_proj/MatMul": True})
    assert sorted(k for k, v in sel.items() if v) == [
        "/model/layers.0/mlp/down_proj/MatMul", "/model/layers.0/self_attn/q_proj/MatMul",
        "/model/layers.1/self_attn/q_proj/MatMul"]


def test_selecting_a_node_that_is_not_ternary_names_node_and_reason(nodes):
    with pytest.raises(GraphError, match=r"'/lm_head/Gemm'.*not ternary: tied embedding"):
        resolve_selection(nodes, ReplaceConfig(), {"/lm_head/Gemm": True})


def test_selection_file_round_trips_atomically(tmp_path):
    path = tmp_path / "models" / "output" / "replace_selection.json"
    assert load_selection(path) == {}
    mapping = {"/model/layers.0/self_attn/q_proj/MatMul": True, "/lm_head/Gemm": False}
    save_selection(path, mapping)
    assert load_selection(path) == mapping
    assert json.loads(path.read_text()) == mapping
    assert [p.name for p in path.parent.iterdir()] == ["replace_selection.json"]


def test_bad_selection_file_is_an_error_naming_the_file(tmp_path):
    path = tmp_path / "sel.json"
    path.write_text('{"a": "yes"}')
    with pytest.raises(GraphError, match="sel.json"):
        load_selection(path)


def test_external_data_that_does_not_fit_its_tensor_names_file_and_tensor(tmp_path):
    path = bg.save(bg.build("icraft", layers=1), tmp_path / "g.onnx")
    model = onnx.load(str(path), load_external_data=False)
    name = "model.layers.0.mlp.up_proj.weight"
    t = next(t for t in model.graph.initializer if t.name == name)
    entry = next(e for e in t.external_data if e.key == "length")
    entry.value = str(int(entry.value) - 4)
    path.write_bytes(model.SerializeToString())
    with pytest.raises(GraphError, match=rf"g\.onnx\.data: tensor '{name}'.*length"):
        inventory(path)
