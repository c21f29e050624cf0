"""`[replace].lm_head = "bf16"`: the tied lm_head held at the checkpoint's bf16 precision."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, numpy_helper

import bitlinear_graphs as bg
from kernels.bf16 import bf16_to_float32
from kernels.ort import create_session
from tdpu_tui.engine.config import ConfigError, parse_config
from tdpu_tui.engine.events import Status
from tdpu_tui.engine.inventory import InventoryError
from tdpu_tui.engine.pipeline import Pipeline
from tdpu_tui.engine.replace import replace_model

OUT = Path("models") / "output"


def _config(root: Path, profile: str = "reference", lm_head: str = "bf16"):
    return parse_config(f"""
[model.synthetic]
preset = "tiny"
[export]
profile = "{profile}"
seq_len = 32
[replace]
lm_head = "{lm_head}"
[validate]
repeats = 2
sample_nodes = 2
[paths]
output = "{root / 'models' / 'output'}"
logs = "{root / 'phase3_logs'}"
""", root / "tdpu.toml")


def _run(root: Path, stages: list[str], profile: str = "reference", lm_head: str = "bf16"):
    return {r.name: r for r in Pipeline(_config(root, profile, lm_head)).run(stages).results}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    roots = {}
    for profile in ("reference", "icraft"):
        root = tmp_path_factory.mktemp(profile)
        result = _run(root, ["export"], profile)["export"]
        assert result.status is Status.OK, result.message
        roots[profile] = root
    return roots


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src / "models", dst / "models")
    return dst


def _logits(session, path: Path, profile: str) -> np.ndarray:
    rng = np.random.default_rng(3)
    if profile == "reference":
        feed = {"input_ids": rng.integers(0, 256, (2, 9), dtype=np.int64)}
    else:
        inp = onnx.load(str(path), load_external_data=False).graph.input[0]
        dims = [d.dim_value for d in inp.type.tensor_type.shape.dim]
        feed = {"inputs_embeds": rng.standard_normal(dims).astype(np.float32)}
    return session.run(["logits"], feed)[0]


@pytest.mark.parametrize("profile", ["reference", "icraft"])
def test_lm_head_becomes_linear_bf16_holding_the_exact_weights(exported, tmp_path, profile):
    root = _copy(exported[profile], tmp_path)
    result = _run(root, ["replace"], profile)["replace"]
    assert result.status is Status.OK, result.message
    assert result.metrics["lm_head"] == "bf16" and result.metrics["replaced"] == 14
    full, out = root / OUT / "bitnet_b1.58_full.onnx", root / OUT / "bitnet_b1.58_bitlinear.onnx"
    model = onnx.load(str(out))
    ops = Counter(n.op_type for n in model.graph.node)
    assert ops["LinearBF16"] == 1 and ops["BitLinear"] == 14
    node = next(n for n in model.graph.node if n.op_type == "LinearBF16")
    assert node.domain == "ai.tdpu" and node.name == "/lm_head/LinearBF16"
    inits = {t.name: t for t in model.graph.initializer}
    w = inits[node.input[1]]
    assert w.data_type == TensorProto.BFLOAT16 and list(w.dims) == [256, 64]
    original = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(full)).graph.initializer}
    if profile == "reference":
        # The tied table is stored once, in bf16, under the checkpoint's name; the embedding
        # Gather reads it and casts the gathered rows.
        assert node.input[1] == "model.embed_tokens.weight"
        assert not any(t.data_type == TensorProto.FLOAT and list(t.dims) == [256, 64] for t in inits.values())
        gather = next(n for n in model.graph.node if n.op_type == "Gather")
        cast = next(n for n in model.graph.node if n.op_type == "Cast")
        assert gather.input[0] == "model.embed_tokens.weight" and cast.input[0] == gather.output[0]
        want = original["model.embed_tokens.weight"]
    else:
        assert node.input[1] == "lm_head.weight"
        want = original["lm_head.weight"].T          # exported [hidden, vocab]
    bits = np.asarray(numpy_helper.to_array(w)).view(np.uint16)
    assert np.array_equal(bf16_to_float32(bits).view(np.uint32), np.ascontiguousarray(want).view(np.uint32))
    report = json.loads((root / OUT / "replace_report.json").read_text(encoding="utf-8"))
    assert report["lm_head"] == "bf16" and report["bf16"] == 1 and report["replaced"] == 14
    head = [d for d in report["nodes"] if d["action"] == "bf16"]
    assert [d["bitlinear"] for d in head] == ["/lm_head/LinearBF16"]
    assert head[0]["bytes_after"] * 2 == head[0]["bytes_before"]
    # It computes what the same graph with the float lm_head does, up to the order of float32 sums.
    ref = tmp_path / "float_head" / "g.onnx"
    replace_model(full, ref, lm_head="float")
    a = _logits(create_session(ref), ref, profile)
    b = _logits(create_session(out), out, profile)
    assert np.abs(a - b).max() < 1e-4
    assert (a.argmax(-1) == b.argmax(-1)).all()


def test_validate_checks_the_bf16_node_and_reports_it(exported, tmp_path):
    root = _copy(exported["reference"], tmp_path)
    results = _run(root, ["replace", "validate"])
    result = results["validate"]
    assert result.status is Status.OK, result.message
    assert "bf16 lm_head weights exact" in result.message
    assert result.metrics["argmax_agreement"] == 1.0
    md = (root / "phase3_logs" / "performance_report.md").read_text(encoding="utf-8")
    assert "| `/lm_head/Gemm` | 64 | 256 | bf16 weights exact |" in md
    assert '[replace].lm_head = "bf16"' in md


def test_bf16_weights_that_differ_from_the_float_graph_fail_validation(exported, tmp_path):
    root = _copy(exported["reference"], tmp_path)
    assert _run(root, ["replace"])["replace"].status is Status.OK
    path = root / OUT / "bitnet_b1.58_bitlinear.onnx"
    model = onnx.load(str(path))
    t = next(t for t in model.graph.initializer if t.data_type == TensorProto.BFLOAT16)
    bits = np.asarray(numpy_helper.to_array(t)).view(np.uint16).copy()
    bits[17, 5] ^= 0x0001                                    # one mantissa bit of one weight
    t.raw_data = bits.tobytes()
    del t.external_data[:]
    t.data_location = TensorProto.DEFAULT
    onnx.save(model, str(path), save_as_external_data=True, location=path.name + ".data")
    result = _run(root, ["validate"])["validate"]
    assert result.status is Status.FAILED
    assert "bf16 lm_head /lm_head/Gemm does not match the float graph" in result.message


def test_running_twice_is_idempotent_and_the_output_passes_through(exported, tmp_path):
    src = exported["reference"] / OUT / "bitnet_b1.58_full.onnx"
    a, b, c = (tmp_path / x / "g.onnx" for x in "abc")
    replace_model(src, a, lm_head="bf16")
    replace_model(src, b, lm_head="bf16")
    again = replace_model(a, c, lm_head="bf16")
    assert b.read_bytes() == a.read_bytes() and c.read_bytes() == a.read_bytes()
    assert Path(f"{c}.data").read_bytes() == Path(f"{a}.data").read_bytes()
    assert not again.replaced and not again.bf16


def test_weights_that_are_not_bf16_values_are_refused_naming_the_node(tmp_path):
    # The test graphs' lm_head weights are arbitrary float32 values, not bf16 ones.
    src = bg.save(bg.build("reference", layers=1), tmp_path / "in" / "g.onnx")
    dst = tmp_path / "out" / "g.onnx"
    with pytest.raises(InventoryError) as err:
        replace_model(src, dst, lm_head="bf16")
    message = str(err.value)
    assert "'/lm_head/Gemm'" in message and "not bfloat16 values" in message
    assert 'keep [replace].lm_head = "float"' in message
    assert not dst.exists() and not list((tmp_path / "out").glob("*"))   # nothing half-written


def test_an_unknown_lm_head_mode_is_a_config_error_naming_the_key(tmp_path):
    with pytest.raises(ConfigError) as err:
        parse_config('[replace]\nlm_head = "int4"\n', tmp_path / "tdpu.toml")
    assert "replace.lm_head" in str(err.value) and "'bf16'" in str(err.value)
