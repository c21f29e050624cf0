"""`ai.tdpu::BitLinear` in ONNX Runtime (kernels/ort.py)."""

import gc
import importlib
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
from onnx import TensorProto, helper, numpy_helper

from kernels import ort as kort
from kernels import packing
from kernels.bitlinear import bitlinear

NODE = "/model/layers.0/mlp/up_proj/BitLinear"


def bitlinear_model(w, layout="tdpu", *, ws=0.75, node=NODE, x_dims=("batch", "seq", None),
                    attrs=None, packed=None):
    n, k = w.shape
    p = packing.pack(w, layout) if packed is None else packed
    attributes = {"in_features": k, "out_features": n, "layout": layout}
    attributes.update(attrs or {})
    bl = helper.make_node("BitLinear", ["X", "model.layers.0.mlp.up_proj.weight",
                                        "model.layers.0.mlp.up_proj.weight_scale"], ["Y"],
                          domain="ai.tdpu", name=node, **attributes)
    dims = [d if d is not None else k for d in x_dims]
    graph = helper.make_graph(
        [bl], "bitlinear",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, dims)],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(p, "model.layers.0.mlp.up_proj.weight"),
         numpy_helper.from_array(np.array([ws], np.float32), "model.layers.0.mlp.up_proj.weight_scale")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.tdpu", 1)])


def reference_model(w, ws):
    """The exported reference projection of docs/CONTRACTS.md, with a float32 [K, N] weight."""
    n, k = w.shape
    nodes = [
        helper.make_node("Abs", ["X"], ["a"]),
        helper.make_node("ReduceMax", ["a"], ["m"], axes=[-1], keepdims=1),
        helper.make_node("Max", ["m", "eps"], ["c"]),
        helper.make_node("Div", ["c127", "c"], ["s"]),
        helper.make_node("Mul", ["X", "s"], ["xs"]),
        helper.make_node("Round", ["xs"], ["r"]),
        helper.make_node("Clip", ["r", "lo", "hi"], ["q"]),
        helper.make_node("MatMul", ["q", "W"], ["acc"]),
        helper.make_node("Div", ["acc", "s"], ["d"]),
        helper.make_node("Mul", ["d", "ws"], ["Y"]),
    ]
    f32 = lambda v: np.array(v, np.float32)  # noqa: E731
    inits = [numpy_helper.from_array(f32(1e-5), "eps"), numpy_helper.from_array(f32(127), "c127"),
             numpy_helper.from_array(f32(-128), "lo"), numpy_helper.from_array(f32(127), "hi"),
             numpy_helper.from_array(w.T.astype(np.float32), "W"), numpy_helper.from_array(f32([ws]), "ws")]
    graph = helper.make_graph(nodes, "ref", [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["b", "s", k])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def plain_session(model):
    return onnxruntime.InferenceSession(model.SerializeToString(), kort.session_options(),
                                        providers=["CPUExecutionProvider"])


@pytest.fixture
def rng():
    return np.random.default_rng(7)


def ternary(rng, n, k):
    return rng.integers(-1, 2, size=(n, k)).astype(np.int8)


@pytest.mark.parametrize("layout", ["tdpu", "hf"])
def test_operator_matches_bitlinear_via_create_session_and_plain_options(rng, layout):
    w = ternary(rng, 36, 70)
    model = bitlinear_model(w, layout)
    p = packing.pack(w, layout)
    x = (rng.standard_normal((2, 5, 70)) * 4).astype(np.float32)
    expected = bitlinear(x, p, np.float32(0.75), layout)
    for session in (kort.create_session(model), plain_session(model)):
        (y,) = session.run(None, {"X": x})
        np.testing.assert_array_equal(y, expected)
        (y1,) = session.run(None, {"X": x[:1, :1]})
        np.testing.assert_array_equal(y1, expected[:1, :1])


def test_operator_is_bit_exact_with_the_onnx_reference_graph(rng):
    w = ternary(rng, 64, 200)
    ws = 0.0371
    x = (rng.standard_normal((1, 9, 200)) * 2).astype(np.float32)
    x[0, 3] *= 1e-7
    (ref,) = onnxruntime.InferenceSession(reference_model(w, ws).SerializeToString(),
                                          providers=["CPUExecutionProvider"]).run(None, {"X": x})
    (y,) = kort.create_session(bitlinear_model(w, ws=ws)).run(None, {"X": x})
    np.testing.assert_array_equal(y, ref)


def test_create_session_reads_a_model_file_with_external_data_and_leaves_it_intact(tmp_path, rng):
    w = ternary(rng, 128, 96)
    path = tmp_path / "m.onnx"
    onnx.save(bitlinear_model(w, "hf"), str(path), save_as_external_data=True,
              location="m.onnx.data", size_threshold=0)
    before = path.read_bytes(), (tmp_path / "m.onnx.data").read_bytes()
    x = rng.standard_normal((3, 96)).astype(np.float32)
    (y,) = kort.create_session(path, threads=1).run(None, {"X": x[None]})
    np.testing.assert_array_equal(y[0], bitlinear(x, packing.pack(w, "hf"), 0.75, "hf"))
    assert (path.read_bytes(), (tmp_path / "m.onnx.data").read_bytes()) == before
    names = {t.name for t in onnx.load(str(path)).graph.initializer}
    assert "model.layers.0.mlp.up_proj.weight" in names


def test_prepacked_weights_leave_the_graph_and_are_released_with_the_session(rng):
    w = ternary(rng, 8, 16)
    model = bitlinear_model(w)
    gc.collect()
    start = kort.cache_info()["entries"]
    first = kort.create_session(model)
    second = kort.create_session(model)                  # same weights share one entry
    assert kort.cache_info()["entries"] == start + 1
    assert [n.op_type for n in model.graph.node] == ["BitLinear"]   # caller's model untouched
    del first
    gc.collect()
    assert kort.cache_info()["entries"] == start + 1
    del second
    gc.collect()
    assert kort.cache_info()["entries"] == start


def test_a_constant_scale_binds_the_node_to_x_and_a_key_and_a_fed_scale_stays_an_input(rng):
    """BitLinearBound(X, key): no attributes, no scale input (the bridge's per-call work); a scale
    computed at run time keeps the three-input BitLinearPrepacked. Both exact."""
    from kernels.ort.prepack import _rewrite
    from kernels.ort.registry import _bound, _release

    w = ternary(rng, 36, 70)
    x = (rng.standard_normal((2, 3, 70)) * 4).astype(np.float32)
    model = bitlinear_model(w)
    keys = _rewrite(model, None)
    try:
        (node,) = model.graph.node
        assert (node.op_type, len(node.input), len(node.attribute)) == ("BitLinearBound", 2, 0)
        assert _bound[keys[0]].name == NODE and _bound[keys[0]].scale == np.float32(0.75)
        assert "model.layers.0.mlp.up_proj.weight_scale" not in {t.name for t in model.graph.initializer}
    finally:
        _release(keys)
    assert not set(keys) & set(_bound)
    fed = bitlinear_model(w)
    scale = fed.graph.initializer.pop()            # the scale becomes a graph input
    fed.graph.input.append(helper.make_tensor_value_info(scale.name, TensorProto.FLOAT, [1]))
    session = kort.create_session(fed)
    (y,) = session.run(None, {"X": x, scale.name: np.array([0.75], np.float32)})
    np.testing.assert_array_equal(y, bitlinear(x, packing.pack(w, "tdpu"), np.float32(0.75), "tdpu"))
    (y2,) = session.run(None, {"X": x, scale.name: np.array([0.5], np.float32)})
    np.testing.assert_array_equal(y2, bitlinear(x, packing.pack(w, "tdpu"), np.float32(0.5), "tdpu"))


def test_float_weight_is_rejected_naming_the_node(rng):
    w = ternary(rng, 8, 16)
    model = bitlinear_model(w, packed=packing.pack(w, "tdpu").astype(np.float32))
    with pytest.raises(kort.BitLinearError, match=f"'{NODE}'.*FLOAT, expected UINT8"):
        kort.create_session(model)
    with pytest.raises(Exception, match=NODE):          # ONNX Runtime's own type check
        plain_session(model)


@pytest.mark.parametrize("attrs, message", [
    ({"in_features": 15}, r"last dimension 16, in_features is 15"),
    ({"out_features": 12}, r"shape \[2, 16\], expected \[out_features/4, in_features\] = \[3, 16\]"),
    ({"layout": "i2s"}, r"unknown layout 'i2s'"),
])
def test_attribute_mismatch_is_rejected_naming_the_node(rng, attrs, message):
    model = bitlinear_model(ternary(rng, 8, 16), attrs=attrs)
    with pytest.raises(kort.BitLinearError, match=f"BitLinear node '{NODE}': .*{message}"):
        kort.create_session(model)


def test_missing_attribute_is_rejected_naming_the_node(rng):
    model = bitlinear_model(ternary(rng, 8, 16))
    attributes = model.graph.node[0].attribute
    del attributes[[a.name for a in attributes].index("layout")]
    with pytest.raises(kort.BitLinearError, match=f"'{NODE}': missing attribute 'layout'"):
        kort.create_session(model)


def test_run_time_shape_mismatch_names_the_node(rng):
    model = bitlinear_model(ternary(rng, 8, 16), x_dims=("batch", "k"))
    session = kort.create_session(model)
    with pytest.raises(kort.BitLinearError, match=f"BitLinear node '{NODE}': X has shape \\[2, 15\\]"):
        session.run(None, {"X": np.ones((2, 15), np.float32)})
    (y,) = session.run(None, {"X": np.ones((2, 16), np.float32)})      # the session stays usable
    assert np.isfinite(y).all()


def test_run_time_mismatch_in_a_plain_session_gives_nan_and_a_log_record(rng, caplog):
    # An exception leaving a Python operator would terminate the process; the operator
    # logs the error and returns NaNs instead.
    session = plain_session(bitlinear_model(ternary(rng, 8, 16), x_dims=("batch", "k")))
    (y,) = session.run(None, {"X": np.ones((2, 15), np.float32)})
    assert y.shape == (2, 8) and np.isnan(y).all()
    assert "X has shape [2, 15]" in caplog.text


def test_reserved_code_in_weights_is_rejected_naming_the_node(rng):
    p = packing.pack(ternary(rng, 8, 16), "tdpu")
    p[1, 5] = 0b11_00_00_00
    model = bitlinear_model(np.zeros((8, 16), np.int8), packed=p)
    with pytest.raises(kort.BitLinearError, match=f"'{NODE}'.*reserved code 3.*byte \\[1, 5\\] bits 6..7"):
        kort.create_session(model)


def test_registration_is_idempotent(rng):
    from onnxruntime_extensions import _ocos

    importlib.reload(kort)
    kort.session_options()
    kort.session_options()
    types = [od.op_type for od in _ocos.Opdef._odlist.values() if od.op_type.startswith("ai.tdpu::")]
    # LinearBF16 itself is not registered (it runs only as LinearBF16Prepacked)
    assert sorted(types) == ["ai.tdpu::BitLinear", "ai.tdpu::BitLinearBound", "ai.tdpu::BitLinearPrepacked",
                             "ai.tdpu::LinearBF16Prepacked"]
    w = ternary(rng, 8, 16)
    x = rng.standard_normal((1, 16)).astype(np.float32)
    (y,) = kort.create_session(bitlinear_model(w, x_dims=(1, None))).run(None, {"X": x})
    np.testing.assert_array_equal(y, bitlinear(x, packing.pack(w, "tdpu"), 0.75, "tdpu"))


def test_unnamed_nodes_are_named_by_index_and_may_share_one_weight(rng):
    w = ternary(rng, 8, 16)
    model = bitlinear_model(w, node="")
    first = model.graph.node[0]
    second = helper.make_node("BitLinear", ["Y", *first.input[1:]], ["Z"], domain="ai.tdpu")
    second.attribute.extend(first.attribute)
    second.attribute[[a.name for a in second.attribute].index("in_features")].i = 8
    second.attribute[[a.name for a in second.attribute].index("out_features")].i = 8
    model.graph.node.append(second)
    del model.graph.output[:]
    model.graph.output.append(helper.make_tensor_value_info("Z", TensorProto.FLOAT, None))
    with pytest.raises(kort.BitLinearError, match=r"BitLinear node '#1': W .* expected .* = \[2, 8\]"):
        kort.create_session(model)
    square = ternary(rng, 16, 16)
    model = bitlinear_model(square, node="")
    first = model.graph.node[0]
    second = helper.make_node("BitLinear", ["Y", *first.input[1:]], ["Z"], domain="ai.tdpu")
    second.attribute.extend(first.attribute)
    model.graph.node.append(second)
    model.graph.output.append(helper.make_tensor_value_info("Z", TensorProto.FLOAT, None))
    x = rng.standard_normal((1, 1, 16)).astype(np.float32)
    y, z = kort.create_session(model).run(None, {"X": x})
    p = packing.pack(square, "tdpu")
    np.testing.assert_array_equal(z, bitlinear(bitlinear(x, p, 0.75, "tdpu"), p, 0.75, "tdpu"))


def test_two_threads_running_one_session_get_their_own_results_and_errors(rng):
    from concurrent.futures import ThreadPoolExecutor

    w = ternary(rng, 16, 40)
    session = kort.create_session(bitlinear_model(w, x_dims=("batch", "k")))
    p = packing.pack(w, "tdpu")
    inputs = [rng.standard_normal((1 + i % 4, 40)).astype(np.float32) for i in range(12)]

    def work(i):
        if i % 3 == 0:
            with pytest.raises(kort.BitLinearError, match="X has shape"):
                session.run(None, {"X": np.ones((1, 39), np.float32)})
        return session.run(None, {"X": inputs[i]})[0]

    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(work, range(len(inputs))))
    for x, y in zip(inputs, results):
        np.testing.assert_array_equal(y, bitlinear(x, p, 0.75, "tdpu"))


def test_ctrl_c_during_a_run_raises_keyboardinterrupt_after_it_not_a_crash(tmp_path):
    """SIGINT while ONNX Runtime is inside a Python operator used to abort the process
    (pybind11::error_already_set, exit 134); it is now delivered when `run` returns."""
    import subprocess
    import sys
    script = tmp_path / "interrupt.py"
    script.write_text(f"""
import os, signal, sys, threading, time
sys.path[:0] = [{str(Path(__file__).resolve().parents[1])!r}, {str(Path(__file__).resolve().parent)!r}]
import numpy as np
import bitlinear_graphs as bg
from kernels.ort import create_session
s = create_session(bg.build("reference", layers=2))
feed = {{s.get_inputs()[0].name: np.zeros((1, 64), np.int64)}}
for delay in (0.2, 0.35, 0.5, 0.65, 0.8):
    threading.Timer(delay, lambda: os.kill(os.getpid(), signal.SIGINT)).start()
    try:
        t0 = time.time()
        while time.time() - t0 < 5:
            s.run(None, feed)
        print("not interrupted")
        sys.exit(1)
    except KeyboardInterrupt:
        pass
print("clean")
""", encoding="utf-8")
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "clean", out.stderr[-2000:]


def test_an_unreadable_scale_names_the_node_and_takes_no_registry_entry(tmp_path, rng):
    w = ternary(rng, 8, 16)
    model = bitlinear_model(w)
    scale = next(t for t in model.graph.initializer if t.name.endswith("weight_scale"))
    onnx.external_data_helper.set_external_data(scale, location="missing.data", offset=0, length=4)
    scale.ClearField("raw_data")
    scale.ClearField("float_data")
    scale.data_location = TensorProto.EXTERNAL
    gc.collect()
    before = kort.cache_info()
    with pytest.raises(kort.BitLinearError, match=f"BitLinear node '{NODE}': weight_scale"):
        kort._rewrite(model, str(tmp_path))
    assert kort.cache_info() == before


def test_a_scale_also_listed_as_a_graph_input_can_still_be_fed(rng):
    w = ternary(rng, 8, 16)
    model = bitlinear_model(w)
    name = "model.layers.0.mlp.up_proj.weight_scale"
    model.graph.input.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, [1]))
    rewritten = onnx.ModelProto()
    rewritten.CopyFrom(model)
    keys = kort._rewrite(rewritten, None)
    kort._release(keys)
    assert [n.op_type for n in rewritten.graph.node] == ["BitLinearPrepacked"]
    session = kort.create_session(model)
    x = rng.standard_normal((1, 1, 16)).astype(np.float32)
    p = packing.pack(w, "tdpu")
    (y,) = session.run(None, {"X": x})
    np.testing.assert_array_equal(y, bitlinear(x, p, np.float32(0.75), "tdpu"))   # the default
    (y,) = session.run(None, {"X": x, name: np.array([0.25], np.float32)})
    np.testing.assert_array_equal(y, bitlinear(x, p, np.float32(0.25), "tdpu"))   # fed


def test_a_bound_weight_beyond_the_exact_k_fails_at_run_naming_the_node_and_is_released():
    """The bound node's weight is checked at its first call (as the product's other errors):
    create_session takes it, run raises naming the node, the session's end releases it."""
    from kernels.bitlinear import MAX_K

    w = np.zeros((4, MAX_K + 4), np.int8)
    gc.collect()
    before = kort.cache_info()
    sess = kort.create_session(bitlinear_model(w, x_dims=(1, None)))
    with pytest.raises(kort.BitLinearError, match=f"BitLinear node '{NODE}'.*int32-exact limit") as info:
        sess.run(None, {"X": np.ones((1, MAX_K + 4), np.float32)})
    del sess, info          # its traceback holds the session
    gc.collect()
    assert kort.cache_info() == before


def test_run_takes_the_direct_call_only_for_plain_numpy_feeds_and_keeps_ort_checks(rng):
    """`BitLinearSession.run` skips InferenceSession's Python checks for a dict of numpy arrays
    with every required input; anything else (a missing input, OrtValues, run options) goes
    through them, with ONNX Runtime's own messages."""
    import onnxruntime as ort

    w = ternary(rng, 8, 16)
    sess = kort.create_session(bitlinear_model(w, x_dims=(1, None)))
    x = rng.standard_normal((1, 16)).astype(np.float32)
    want = bitlinear(x, packing.pack(w, "tdpu"), 0.75, "tdpu")
    assert sess._tdpu_direct
    np.testing.assert_array_equal(sess.run(None, {"X": x})[0], want)
    np.testing.assert_array_equal(sess.run(["Y"], {"X": x})[0], want)
    np.testing.assert_array_equal(sess.run(None, {"X": ort.OrtValue.ortvalue_from_numpy(x)})[0], want)
    np.testing.assert_array_equal(sess.run(None, {"X": x}, ort.RunOptions())[0], want)
    with pytest.raises(ValueError, match="X"):
        sess.run(None, {"x": x})
    sess.set_providers(["CPUExecutionProvider"])
    np.testing.assert_array_equal(sess.run(None, {"X": x})[0], want)


def shared_input_model(rng, layout, scales, opset=17, k=40):
    """q, k, v on one X (h), gate and up on another (g = Relu(h)), one more node on a third
    (Abs of q's output, read after q's Split); every output a graph output but up's, which a
    MatMul alone reads (ONNX Runtime's optimizer folds a Mul by a constant into a following
    MatMul's alpha, a different rounding). The scale of node i is scales[i]."""
    nodes, inits, outs = [], [], []
    for i, (n, x) in enumerate([(k, "h"), (8, "h"), (8, "h"), (36, "g"), (36, "g"), (12, "a")]):
        inits += [numpy_helper.from_array(packing.pack(ternary(rng, n, k), layout), f"W{i}"),
                  numpy_helper.from_array(np.array([scales[i]], np.float32), f"S{i}")]
        nodes.append(helper.make_node("BitLinear", [x, f"W{i}", f"S{i}"], [f"Y{i}"], domain="ai.tdpu",
                                      name=f"node{i}", in_features=k, out_features=n, layout=layout))
        outs.append(helper.make_tensor_value_info(f"Y{i}", TensorProto.FLOAT, [1, "s", n]))
    nodes.insert(5, helper.make_node("Abs", ["Y0"], ["a"]))
    nodes.insert(3, helper.make_node("Relu", ["h"], ["g"]))
    nodes.insert(0, helper.make_node("Identity", ["x"], ["h"]))
    nodes.append(helper.make_node("MatMul", ["Y4", "M"], ["Z"]))
    del outs[4]                   # up's output is read by the MatMul alone
    inits.append(numpy_helper.from_array(rng.standard_normal((36, 5)).astype(np.float32), "M"))
    outs.append(helper.make_tensor_value_info("Z", TensorProto.FLOAT, [1, "s", 5]))
    graph = helper.make_graph(nodes, "shared", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "s", k])],
                              outs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid("ai.tdpu", 1)])


def assert_same_outputs(fused, unfused, feeds):
    for feed in feeds:
        for a, b in zip(fused.run(None, feed), unfused.run(None, feed), strict=True):
            assert a.shape == b.shape and np.array_equal(a, b)


@pytest.mark.parametrize("layout", ["tdpu", "hf"])
@pytest.mark.parametrize("scales", [(0.5,) * 6, (0.011, 0.7, 3.0, 0.5, 0.0123457, 1.5)], ids=["same", "own"])
@pytest.mark.parametrize("opset", [11, 17, 18])
def test_nodes_reading_one_x_run_as_one_kernel_call_with_bit_identical_outputs(rng, layout, scales, opset):
    """q, k, v (one X) and gate, up (another) become one BitLinearBound each over the stacked
    weights and a Split; the nodes' own scales are applied in the operator, not as graph Mul
    nodes. The outputs equal the unfused session's bit for bit, for one and for many rows."""
    from kernels.ort.prepack import _rewrite
    from kernels.ort.registry import _bound, _release

    model = shared_input_model(rng, layout, scales, opset)
    rewritten = onnx.ModelProto()
    rewritten.CopyFrom(model)
    keys = _rewrite(rewritten, None)
    try:
        onnx.checker.check_model(rewritten)
        ops = [n.op_type for n in rewritten.graph.node]
        assert ops.count("BitLinearBound") == 3 and ops.count("Split") == 2 and "Mul" not in ops
        fused = {_bound[key].name: _bound[key] for key in keys}
        assert sorted(fused) == ["node0 + node1 + node2", "node3 + node4", "node5"]
        own = len(set(scales)) > 1
        assert (fused["node3 + node4"].columns is not None) == own
        assert not {"W0", "W1", "W3", "S0"} & {t.name for t in rewritten.graph.initializer}
        assert sum(kort.KEY_SUFFIX in t.name for t in rewritten.graph.initializer) == 3
    finally:
        _release(keys)
    gc.collect()
    start = kort.cache_info()["entries"]
    fused_session = kort.create_session(model)
    assert kort.cache_info()["entries"] == start + 3     # the nodes' own weights are not kept
    feeds = []
    for m in (1, 3, 17):
        x = (rng.standard_normal((1, m, 40)) * 3).astype(np.float32)
        x[0, 0, :3] = (0.0, -0.0, 1e-9)
        feeds.append({"x": x})
    assert_same_outputs(fused_session, kort.create_session(model, fuse=False), feeds)


def test_a_graph_of_bitlinear_alone_is_fused_with_an_onnx_opset_added(rng):
    """No default-domain opset import (only ai.tdpu nodes): the Split needs one."""
    model = shared_input_model(rng, "tdpu", (0.5, 0.25, 0.125, 1, 1, 1))
    keep = [n for n in model.graph.node if n.domain == "ai.tdpu" and n.input[0] == "h"]
    for node in keep:
        node.input[0] = "x"
    del model.graph.node[:]
    model.graph.node.extend(keep)
    del model.graph.output[3:]
    del model.opset_import[0]
    rng_x = rng.standard_normal((1, 2, 40)).astype(np.float32)
    assert_same_outputs(kort.create_session(model), kort.create_session(model, fuse=False), [{"x": rng_x}])


def test_a_node_with_a_fed_scale_is_not_fused_with_the_nodes_beside_it(rng):
    model = shared_input_model(rng, "tdpu", (0.5, 0.25, 0.125, 1, 1, 1))
    scale = next(t for t in model.graph.initializer if t.name == "S1")
    model.graph.initializer.remove(scale)
    model.graph.input.append(helper.make_tensor_value_info("S1", TensorProto.FLOAT, [1]))
    x = rng.standard_normal((1, 2, 40)).astype(np.float32)
    assert_same_outputs(kort.create_session(model), kort.create_session(model, fuse=False),
                        [{"x": x, "S1": np.array([0.3], np.float32)}])
    from kernels.ort.prepack import _rewrite
    from kernels.ort.registry import _bound, _release

    keys = _rewrite(model, None)
    try:
        assert sorted(_bound[key].name for key in keys if key in _bound) == [
            "node0 + node2", "node3 + node4", "node5"]
        assert [n.op_type for n in model.graph.node].count("BitLinearPrepacked") == 1
    finally:
        _release(keys)
