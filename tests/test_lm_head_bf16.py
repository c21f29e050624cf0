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
from conftest import write_config
from kernels.bf16 import bf16_to_float32
from kernels.ort import create_session
from tdpu_tui.engine.core.config import load_config, parse_config
from tdpu_tui.engine.core.errors import ConfigError
from tdpu_tui.engine.core.events import Status
from tdpu_tui.engine.core.errors import GraphError
from tdpu_tui.engine.core.pipeline import Pipeline
from tdpu_tui.engine.stages import all_stages
from tdpu_tui.engine.rewrite.bitlinear import replace_model

OUT = Path("out")          # conftest.write_config: [paths].output


def _config(root: Path, profile: str = "reference", lm_head: str = "bf16"):
    extra = f"""
        [replace]
        lm_head = "{lm_head}"
        [validate]
        repeats = 2
        sample_nodes = 2
        """
    return load_config(write_config(root, extra, profile=profile, seq_len=32))


def _run(root: Path, stages: list[str], profile: str = "reference", lm_head: str = "bf16"):
    return {r.name: r for r in Pipeline(_config(root, profile, lm_head), all_stages()).run(stages).results}


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
    shutil.copytree(src / "out", dst / "out")
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
    md = (root / "logs" / "performance_report.md").read_text(encoding="utf-8")
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
    with pytest.raises(GraphError) as err:
        replace_model(src, dst, lm_head="bf16")
    message = str(err.value)
    assert "'/lm_head/Gemm'" in message and "not bfloat16 values" in message
    assert 'keep [replace].lm_head = "float"' in message
    assert not dst.exists() and not list((tmp_path / "out").glob("*"))   # nothing half-written


def test_an_unknown_lm_head_mode_is_a_config_error_naming_the_key(tmp_path):
    with pytest.raises(ConfigError) as err:
        parse_config('[replace]\nlm_head = "int4"\n', tmp_path / "tdpu.toml")
    assert "replace.lm_head" in str(err.value) and "'bf16'" in str(err.value)


# -- hand-made graphs: the forms and corner cases the exporter does not produce ------------------

V, H = 40, 12


def _bf16_table(seed: int = 0, shape=(V, H)) -> np.ndarray:
    w = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    return (w.view(np.uint32) & np.uint32(0xFFFF0000)).view(np.float32)


def _tied_transpose_graph(path: Path, *, emb_is_input: bool = False, head_name: str = "/lm_head/MatMul",
                          extra_nodes=(), extra_inits=()) -> Path:
    """ids -> Gather(emb) -> MatMul(·, Transpose(emb)) -> logits: a tied lm_head behind a Transpose."""
    from onnx import helper
    emb = _bf16_table()
    nodes = [helper.make_node("Gather", ["model.embed_tokens.weight", "input_ids"], ["h"],
                              name="/model/embed_tokens/Gather"),
             helper.make_node("Transpose", ["model.embed_tokens.weight"], ["embT"], name="/lm_head/Transpose",
                              perm=[1, 0]),
             helper.make_node("MatMul", ["h", "embT"], ["logits"], name=head_name), *extra_nodes]
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "s"])]
    if emb_is_input:
        inputs.append(helper.make_tensor_value_info("model.embed_tokens.weight", TensorProto.FLOAT, [V, H]))
    graph = helper.make_graph(nodes, "g", inputs,
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", "s", V])],
                              [numpy_helper.from_array(emb, "model.embed_tokens.weight"), *extra_inits])
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path),
              save_as_external_data=True, location=path.name + ".data", size_threshold=0)
    return path


def _ids() -> dict[str, np.ndarray]:
    return {"input_ids": np.array([[1, 7, 39], [0, 5, 5]], np.int64)}


def test_a_tied_lm_head_behind_a_transpose_is_held_in_bf16_and_checked(tmp_path):
    from tdpu_tui.engine.validation.nodes import check_bf16_node
    src = _tied_transpose_graph(tmp_path / "in" / "g.onnx")
    dst = tmp_path / "out" / "g.onnx"
    report = replace_model(src, dst, lm_head="bf16")
    (d,) = report.bf16
    assert (d.weight, d.k, d.n, d.weight_nk) == ("model.embed_tokens.weight", H, V, True)
    model = onnx.load(str(dst), load_external_data=False)
    assert Counter(n.op_type for n in model.graph.node) == {"Gather": 1, "Cast": 1, "LinearBF16": 1}
    want = onnx_runtime_logits(src)
    got = create_session(dst).run(["logits"], _ids())[0]
    assert np.abs(got - want).max() < 1e-5
    # The per-node check, in both orientations of the float table.
    emb = _bf16_table()
    bits = (emb.view(np.uint32) >> 16).astype(np.uint16)
    x = np.random.default_rng(1).standard_normal((5, H)).astype(np.float32)
    y = x @ emb.T
    assert check_bf16_node("n", x, y, bits, emb, True).result == "ok"
    assert check_bf16_node("n", x, y, bits, np.ascontiguousarray(emb.T), False).result == "ok"
    wrong = emb.copy()
    wrong[3, 4] = -wrong[3, 4]
    c = check_bf16_node("n", x, y, bits, wrong, True)
    assert (c.result, c.int_exact) == ("FAILED", False)


def onnx_runtime_logits(path: Path) -> np.ndarray:
    from tdpu_tui.engine.model.compare import ort_session
    return ort_session(str(path)).run(["logits"], _ids())[0]


def test_unnamed_nodes_convert_the_lm_head_not_the_first_node_with_the_same_empty_name(tmp_path):
    from onnx import helper
    rng = np.random.default_rng(2)
    q = rng.integers(-1, 2, (H, H)).astype(np.float32) * np.float32(0.5)
    head = np.ascontiguousarray(_bf16_table(3).T)                   # [H, V]
    nodes = [helper.make_node("MatMul", ["x", "model.layers.0.self_attn.q_proj.weight"], ["h"]),
             helper.make_node("MatMul", ["h", "lm_head.weight"], ["logits"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, H])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 3, V])],
                              [numpy_helper.from_array(q, "model.layers.0.self_attn.q_proj.weight"),
                               numpy_helper.from_array(head, "lm_head.weight")])
    src = tmp_path / "g.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(src))
    dst = tmp_path / "out" / "g.onnx"
    report = replace_model(src, dst, lm_head="bf16", exclude=[])
    assert [d.weight for d in report.bf16] == ["lm_head.weight"]
    model = onnx.load(str(dst), load_external_data=False)
    ops = [(n.op_type, n.input[1]) for n in model.graph.node]
    # (selection is by node name, so two unnamed nodes share one selection entry: q_proj may
    # stay a MatMul here; what matters is which node became LinearBF16)
    assert ops[1] == ("LinearBF16", "lm_head.weight")
    assert ops[0][0] in ("MatMul", "BitLinear") and ops[0][1] == "model.layers.0.self_attn.q_proj.weight"


def test_a_table_that_is_also_a_graph_input_is_refused(tmp_path):
    src = _tied_transpose_graph(tmp_path / "in" / "g.onnx", emb_is_input=True)
    with pytest.raises(GraphError, match="'model.embed_tokens.weight' is also a graph input"):
        replace_model(src, tmp_path / "out" / "g.onnx", lm_head="bf16")


def test_a_table_that_is_also_a_graph_output_keeps_its_float_copy(tmp_path):
    src = _tied_transpose_graph(tmp_path / "in" / "g.onnx")
    m = onnx.load(str(src))
    m.graph.output.append(onnx.helper.make_tensor_value_info("model.embed_tokens.weight",
                                                             TensorProto.FLOAT, [V, H]))
    onnx.save(m, str(src), save_as_external_data=True, location=src.name + ".data", size_threshold=0)
    dst = tmp_path / "out" / "g.onnx"
    (d,) = replace_model(src, dst, lm_head="bf16").bf16
    assert "the float table stays for the graph output of the same name" in d.reason
    assert d.bytes_after == V * H * 2 + V * H * 4          # both tables, as stored
    model = onnx.load(str(dst), load_external_data=False)
    names = {t.name: t.data_type for t in model.graph.initializer}
    assert names == {"model.embed_tokens.weight": TensorProto.FLOAT,
                     "model.embed_tokens.weight.bf16": TensorProto.BFLOAT16}
    got = create_session(dst).run(["logits"], _ids())[0]
    assert np.abs(got - onnx_runtime_logits(src)).max() < 1e-5


def test_two_lm_heads_are_refused_naming_both(tmp_path):
    from onnx import helper
    extra = [helper.make_node("Transpose", ["model.embed_tokens.weight"], ["embT2"], perm=[1, 0]),
             helper.make_node("MatMul", ["h", "embT2"], ["logits2"], name="/extra/lm_head/MatMul")]
    src = _tied_transpose_graph(tmp_path / "in" / "g.onnx", extra_nodes=extra)
    m = onnx.load(str(src))
    m.graph.output.append(onnx.helper.make_tensor_value_info("logits2", TensorProto.FLOAT, None))
    onnx.save(m, str(src))
    with pytest.raises(GraphError, match=r"2 lm_head nodes \('/lm_head/MatMul', '/extra/lm_head/MatMul'\)"):
        replace_model(src, tmp_path / "out" / "g.onnx", lm_head="bf16")


def test_the_not_bf16_error_gives_the_position_in_the_whole_table(tmp_path, monkeypatch):
    from tdpu_tui.engine.rewrite import lm_head
    monkeypatch.setattr(lm_head, "ROWS_PER_CHUNK", 8)              # several blocks on a small table
    src = _tied_transpose_graph(tmp_path / "in" / "g.onnx")
    m = onnx.load(str(src))
    t = next(t for t in m.graph.initializer if t.name == "model.embed_tokens.weight")
    emb = numpy_helper.to_array(t).copy()
    emb[33, 5] = np.float32(1.0000001)
    emb[35, 0] = np.float32(0.1)
    t.CopyFrom(numpy_helper.from_array(emb, t.name))
    onnx.save(m, str(src))
    with pytest.raises(GraphError) as err:
        replace_model(src, tmp_path / "out" / "g.onnx", lm_head="bf16")
    text = str(err.value)
    assert text.startswith(f"{src}: lm_head node '/lm_head/MatMul': 2 of {V * H} values")
    assert "at [33, 5]" in text


def test_the_matmulnbits_peer_keeps_the_ai_tdpu_import_for_linear_bf16(exported, tmp_path):
    from tdpu_tui.engine.rewrite.matmulnbits import lower_to_matmulnbits
    src = exported["reference"] / OUT / "bitnet_b1.58_full.onnx"
    mid = tmp_path / "bl" / "g.onnx"
    replace_model(src, mid, lm_head="bf16")
    peer = tmp_path / "nbits" / "g.onnx"
    peer.parent.mkdir()
    lower_to_matmulnbits(mid, peer)
    model = onnx.load(str(peer), load_external_data=False)
    assert {o.domain for o in model.opset_import} >= {"ai.tdpu", "com.microsoft"}
    assert [n.op_type for n in model.graph.node if n.domain == "ai.tdpu"] == ["LinearBF16"]
