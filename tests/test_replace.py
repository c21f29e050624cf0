"""The MatMul → BitLinear pass: structure, packing, idempotence, atomicity, and `--batch`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import bitlinear_graphs as bg
from kernels.packing import unpack
from tdpu_tui.engine.rewrite.inventory import inventory
from tdpu_tui.engine.rewrite.selection import save_selection
from tdpu_tui.engine.rewrite.bitlinear import replace_model

REPO = Path(__file__).resolve().parents[1]


def _weights(path: Path) -> dict[str, np.ndarray]:
    m = onnx.load(str(path))  # with external data: the test graphs are tiny
    return {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}


@pytest.mark.parametrize("profile", ["reference", "icraft"])
@pytest.mark.parametrize("form", ["scale_mul", "values", "transpose"])
def test_each_projection_chain_becomes_one_bitlinear(tmp_path, profile, form):
    src = bg.save(bg.build(profile, layers=2, form=form), tmp_path / "in" / "g.onnx")
    dst = tmp_path / "out" / "bitnet_b1.58_bitlinear.onnx"
    report = replace_model(src, dst, layout="tdpu", exclude=["*lm_head*"])
    model = onnx.load(str(dst), load_external_data=False)
    ops = Counter(n.op_type for n in model.graph.node)
    assert ops["BitLinear"] == 14 and len(report.replaced) == 14
    # What is left of MatMul: attention (2 per layer) and, in the icraft profile, the lm_head.
    assert ops["MatMul"] + ops["Gemm"] == 5
    for op in ("Round", "Clip", "Abs", "ReduceMax", "Max", "Div"):
        assert ops[op] == 0, f"{op} of the activation quantization survived"
    assert any(o.domain == "ai.tdpu" and o.version == 1 for o in model.opset_import)
    names = {t.name for t in model.graph.initializer}
    used = {i for n in model.graph.node for i in n.input}
    assert names <= used, f"orphaned initializers: {sorted(names - used)}"
    node = next(n for n in model.graph.node if n.name == "/model/layers.1/mlp/down_proj/BitLinear")
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    assert (node.domain, attrs) == ("ai.tdpu", {"in_features": 48, "out_features": 32, "layout": b"tdpu"})
    assert list(node.input[1:]) == ["model.layers.1.mlp.down_proj.weight",
                                    "model.layers.1.mlp.down_proj.weight_scale"]
    assert node.input[0] == "/model/layers.1/mlp/Mul_1_output_0"   # x before quantization


@pytest.mark.parametrize("layout", ["tdpu", "hf"])
def test_packed_weights_decode_to_the_original_ternary_values(tmp_path, layout):
    src = bg.save(bg.build("reference", layers=1, form="values", seed=5), tmp_path / "in" / "g.onnx")
    before = _weights(src)
    scales = {n.weight: n.scale for n in inventory(src) if n.ternary}
    dst = tmp_path / "out" / "g.onnx"
    replace_model(src, dst, layout=layout)
    after = _weights(dst)
    for name, scale in scales.items():
        w_kn = before[name]                           # {-s, 0, +s}, [K, N]
        p = after[name]
        assert p.dtype == np.uint8 and p.shape == (w_kn.shape[1] // 4, w_kn.shape[0])
        np.testing.assert_array_equal(unpack(p, layout), np.sign(w_kn.T).astype(np.int8))
        ws = after[name.replace(".weight", ".weight_scale")]
        assert ws.dtype == np.float32 and ws.shape == (1,)
        assert ws[0] == pytest.approx(np.abs(w_kn).max(), rel=1e-6) == pytest.approx(scale)


def test_weights_are_streamed_to_external_data(tmp_path):
    src = bg.save(bg.build("reference", layers=1, hidden=64, inter=128), tmp_path / "in" / "g.onnx")
    dst = tmp_path / "out" / "bitnet_b1.58_bitlinear.onnx"
    replace_model(src, dst)
    model = onnx.load(str(dst), load_external_data=False)
    big = [t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert big and all(
        {e.key: e.value for e in t.external_data}["location"] == "bitnet_b1.58_bitlinear.onnx.data" for t in big)
    assert all(int({e.key: e.value for e in t.external_data}["offset"]) % 4096 == 0 for t in big)


def test_running_twice_gives_the_same_bytes_and_a_replaced_graph_is_a_no_op(tmp_path):
    src = bg.save(bg.build("reference", layers=2), tmp_path / "in" / "g.onnx")
    a = tmp_path / "a" / "bitnet_b1.58_bitlinear.onnx"
    b = tmp_path / "b" / "bitnet_b1.58_bitlinear.onnx"
    c = tmp_path / "c" / "bitnet_b1.58_bitlinear.onnx"
    replace_model(src, a)
    replace_model(src, b)
    again = replace_model(a, c)
    for x in (b, c):
        assert x.read_bytes() == a.read_bytes()
        assert Path(f"{x}.data").read_bytes() == Path(f"{a}.data").read_bytes()
    assert not again.replaced
    assert Counter(d.reason for d in again.decisions)["already BitLinear"] == 14


def test_interrupted_pass_leaves_previous_artifacts_untouched(tmp_path):
    src = bg.save(bg.build("reference", layers=2), tmp_path / "in" / "g.onnx")
    out = tmp_path / "out"
    dst = out / "bitnet_b1.58_bitlinear.onnx"
    report = out / "replace_report.json"
    replace_model(src, dst, report_path=report, exclude=["*mlp*"])
    snapshot = {p.name: p.read_bytes() for p in out.iterdir()}

    def interrupt(done, total, note):
        if done == total // 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        replace_model(src, dst, report_path=report, on_progress=interrupt)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == snapshot


def test_report_names_every_node_with_its_reason(tmp_path):
    src = bg.save(bg.build("reference", layers=1), tmp_path / "in" / "g.onnx")
    overrides = {"/model/layers.0/mlp/up_proj/MatMul": False}
    report = replace_model(src, tmp_path / "o" / "g.onnx", include=["*"], exclude=["*k_proj*"],
                           overrides=overrides, report_path=tmp_path / "o" / "r.json")
    reasons = {d.name: (d.action, d.reason) for d in report.decisions}
    assert len(reasons) == len(inventory(src)) == 10
    assert reasons["/model/layers.0/self_attn/k_proj/MatMul"] == (
        "kept", "not selected: excluded by [replace].exclude '*k_proj*'")
    assert reasons["/model/layers.0/mlp/up_proj/MatMul"] == ("kept", "deselected in the selection file")
    assert reasons["/model/layers.0/self_attn/MatMul"] == ("kept", "activation × activation")
    assert reasons["/lm_head/Gemm"] == ("kept", "tied embedding")
    assert reasons["/model/layers.0/self_attn/q_proj/MatMul"] == ("replaced", "selected by [replace].include '*'")
    saved = json.loads((tmp_path / "o" / "r.json").read_text())
    assert saved["replaced"] == 5 and saved["kept"] == 5
    # float32 weights become 2 bits each; the five 4-byte scales stay as they are
    assert saved["weight_bytes_before"] - 20 == 16 * (saved["weight_bytes_after"] - 20)


def _batch(cfg: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "NO_COLOR": "1"}
    return subprocess.run([sys.executable, "-m", "tdpu_tui", "--batch", "--config", str(cfg), *args],
                          cwd=REPO, capture_output=True, text=True, env=env, timeout=300)


def _config(tmp_path: Path, extra: str = "") -> Path:
    cfg = tmp_path / "tdpu.toml"
    cfg.write_text(f"""
[model]
source = "synthetic"
[model.synthetic]
preset = "tiny"
[export]
seq_len = 32
[validate]
repeats = 2
[paths]
output = "{tmp_path / 'models' / 'output'}"
logs = "{tmp_path / 'phase3_logs'}"
{extra}""")
    return cfg


def test_batch_export_and_replace_on_the_tiny_preset(tmp_path):
    cfg = _config(tmp_path)
    out = tmp_path / "models" / "output"
    # The app writes the selection file; the batch run must honour it.
    save_selection(out / "replace_selection.json", {"/model/layers.1/mlp/gate_proj/MatMul": False})
    proc = _batch(cfg, "--stage", "export", "--stage", "replace", "--json", str(tmp_path / "out.json"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "out.json").read_text())
    assert [s["status"] for s in summary["stages"]] == ["ok", "ok"]
    metrics = summary["metrics"]["replace"]
    assert (metrics["replaced"], metrics["kept"]) == (13, 10)
    assert metrics["weight_bytes_after"] * 12 <= metrics["weight_bytes_before"]
    report = json.loads((out / "replace_report.json").read_text())
    kept = {d["name"]: d["reason"] for d in report["nodes"] if d["action"] == "kept"}
    assert kept["/model/layers.1/mlp/gate_proj/MatMul"] == "deselected in the selection file"
    assert kept["/lm_head/Gemm"] in ("tied embedding", "not selected: excluded by [replace].exclude '*lm_head*'")

    # Everything selected again: exactly seven BitLinear nodes per layer, none for lm_head.
    save_selection(out / "replace_selection.json", {})
    assert _batch(cfg, "--stage", "replace").returncode == 0
    model = onnx.load(str(out / "bitnet_b1.58_bitlinear.onnx"), load_external_data=False)
    per_layer = Counter(n.name.split("/")[2] for n in model.graph.node if n.op_type == "BitLinear")
    assert per_layer == {"layers.0": 7, "layers.1": 7}
    assert not any("lm_head" in n.name for n in model.graph.node if n.op_type == "BitLinear")
    # Inside the project, artifacts are named relative to its root (tdpu.toml's directory).
    assert summary["artifacts"]["replace_report"] == "models/output/replace_report.json"


def test_pass_holds_one_weight_at_a_time_not_the_whole_model(tmp_path):
    import tracemalloc

    # 2 layers of 256-wide projections: 14 float weights, 5.25 MiB in all, 0.5 MiB the largest.
    src = bg.save(bg.build("reference", layers=2, hidden=256, inter=512, vocab=64), tmp_path / "in" / "g.onnx")
    total = sum(p.stat().st_size for p in src.parent.iterdir())
    tracemalloc.start()
    try:
        inventory(src)
        replace_model(src, tmp_path / "out" / "g.onnx")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert total > 5 << 20
    assert peak < 2 << 20, f"peak {peak} bytes traced for {total} bytes of weights"
