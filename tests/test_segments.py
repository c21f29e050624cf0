"""A float graph run in segments (`graph.segments`, `model.segmented.SegmentedSession`): the same
results as one session over the whole graph, bit for bit, with one segment's weights loaded at a
time; and the stages that run the float graph going through it when it is too large (issue 11)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import write_config
from onnx import TensorProto, helper, numpy_helper

from tdpu_tui.engine.core.artifacts import Artifacts
from tdpu_tui.engine.core.cache import RunCache
from tdpu_tui.engine.core.errors import GraphError
from tdpu_tui.engine.core.events import Status
from tdpu_tui.engine.graph.segments import data_bytes, plan
from tdpu_tui.engine.model import compare
from tdpu_tui.engine.model.compare import graph_session, shared_session
from tdpu_tui.engine.model.segmented import SegmentedSession

V, H, LAYERS = 48, 16, 4


def _synthetic(directory: Path) -> Path:
    """A small graph with what segmenting must get right: a tied initializer read by the first
    and the last node (Gather / Gemm transB, as the reference profile's embedding and lm_head),
    a Constant read in every layer, an If whose branches read outer-scope tensors and an
    initializer, and MatMul → Mul chains ONNX Runtime fuses. Saved with external data."""
    rng = np.random.default_rng(3)
    inits = [numpy_helper.from_array(rng.standard_normal((V, H)).astype(np.float32), "embed"),
             numpy_helper.from_array(rng.standard_normal((H,)).astype(np.float32), "bias")]
    nodes = [helper.make_node("Constant", [], ["scale"], value=numpy_helper.from_array(np.array(0.25, np.float32))),
             helper.make_node("Gather", ["embed", "ids"], ["h0"], name="embed/Gather")]
    h = "h0"
    for i in range(LAYERS):
        inits.append(numpy_helper.from_array(rng.standard_normal((H, H)).astype(np.float32), f"w{i}"))
        nodes += [helper.make_node("MatMul", [h, f"w{i}"], [f"mm{i}"], name=f"layer{i}/MatMul"),
                  helper.make_node("Mul", [f"mm{i}", "scale"], [f"sc{i}"], name=f"layer{i}/Mul"),
                  helper.make_node("Relu", [f"sc{i}"], [f"act{i}"], name=f"layer{i}/Relu"),
                  helper.make_node("Add", [h, f"act{i}"], [f"h{i + 1}"], name=f"layer{i}/residual")]
        h = f"h{i + 1}"
        if i == 1:       # an If reading `h` and `bias` from the enclosing graph
            then_g = helper.make_graph([helper.make_node("Add", [h, "bias"], ["t_out"])], "then", [],
                                       [helper.make_tensor_value_info("t_out", TensorProto.FLOAT, None)])
            else_g = helper.make_graph([helper.make_node("Sub", [h, "bias"], ["e_out"])], "else", [],
                                       [helper.make_tensor_value_info("e_out", TensorProto.FLOAT, None)])
            nodes += [helper.make_node("ReduceSum", [h], ["total"], keepdims=0, name="cond/ReduceSum"),
                      helper.make_node("Greater", ["total", "zero"], ["cond"], name="cond/Greater"),
                      helper.make_node("If", ["cond"], ["h_if"], then_branch=then_g, else_branch=else_g,
                                       name="branch/If")]
            inits.append(numpy_helper.from_array(np.array(0.0, np.float32), "zero"))
            h = "h_if"
    nodes.append(helper.make_node("Gemm", [h + "_2d", "embed"], ["logits_2d"], transB=1, name="lm_head/Gemm"))
    nodes.insert(-1, helper.make_node("Reshape", [h, "flat"], [h + "_2d"], name="lm_head/Reshape"))
    inits.append(numpy_helper.from_array(np.array([-1, H], np.int64), "flat"))
    graph = helper.make_graph(nodes, "synthetic", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["n"])],
                              [helper.make_tensor_value_info("logits_2d", TensorProto.FLOAT, ["n", V])],
                              initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path = directory / "synthetic.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="synthetic.onnx.data", size_threshold=256)
    return path


def _intermediates(path: Path) -> list[str]:
    model = onnx.load(str(path), load_external_data=False)
    outs = {o.name for o in model.graph.output}
    return [o for n in model.graph.node for o in n.output if o not in outs and n.op_type != "Constant"]


def _whole(path: Path, extra: list[str], prepack: bool = False):
    """One session over the whole graph with `extra` outputs, prepacking as the segments do."""
    model = onnx.load(str(path), load_external_data=False)
    assert not compare.runs_in_segments(model)
    return compare.whole_session(model, path.parent, extra, prepack=prepack)


def test_segmented_run_equals_the_whole_graph_bit_for_bit(tmp_path):
    path = _synthetic(tmp_path)
    extra = _intermediates(path)
    budget = 2 * H * H * 4      # a layer: its weight and its copy; the embedding (3 KiB) alone is more
    seg = SegmentedSession(path, budget=budget, extra_outputs=extra)
    assert len(seg.segments) >= 4
    ids = np.array([0, 5, 47, 3, 3, 20], np.int64)
    names = ["logits_2d", *extra]
    want = _whole(path, extra).run(names, {"ids": ids})
    got = seg.run(names, {"ids": ids})
    for name, a, b in zip(names, want, got, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert np.array_equal(a, b), name
    # the tied embedding is loaded by the first segment and the last one
    assert "embed" in seg.segments[0].initializers and "embed" in seg.segments[-1].initializers
    # each segment loads no more than the budget, or one initializer larger than it
    assert all(s.load_bytes <= budget or s.initializers == ["embed"] for s in seg.segments)
    # the Constant is copied into the segments that read it, never handed over between them
    assert sum(bool(s.constants) for s in seg.segments) >= 2
    assert all("scale" not in s.inputs and "scale" not in s.outputs for s in seg.segments)
    # only what was asked for comes back; a name the graph does not compute is refused as ORT does
    assert np.array_equal(seg.run(["logits_2d"], {"ids": ids})[0], want[0])
    with pytest.raises(ValueError, match="invalid output"):
        seg.run(["no_such_tensor"], {"ids": ids})


def test_the_subgraphs_outer_references_become_inputs_of_their_segment(tmp_path):
    path = _synthetic(tmp_path)
    seg = SegmentedSession(path, budget=2 * H * H * 4)      # a layer per segment
    branch = next(s for s in seg.segments
                  if any(n.op_type == "If" for n in seg.plan.nodes[s.start:s.stop]))
    # the branches read `h2` (computed by the segment before) and `bias` (an initializer)
    assert "bias" in branch.initializers and branch.inputs == ["h2"]
    ids = np.arange(9, dtype=np.int64)
    assert np.array_equal(seg.run(None, {"ids": ids})[0],
                          _whole(path, []).run(None, {"ids": ids})[0])


def test_extra_outputs_from_a_middle_segment_and_only_boundary_tensors_kept(tmp_path):
    path = _synthetic(tmp_path)
    seg = SegmentedSession(path, budget=H * H * 4, extra_outputs=["mm2", "act2"])
    middle = [s for s in seg.segments if "mm2" in s.outputs]
    assert middle and middle[0].index not in (0, len(seg.segments) - 1)
    ids = np.arange(7, dtype=np.int64)
    want = _whole(path, ["mm2", "act2"]).run(["mm2", "act2", "logits_2d"], {"ids": ids})
    seen = []
    got = seg.run(["mm2", "act2", "logits_2d"], {"ids": ids},
                  visit=lambda s, sess, feed, outs: seen.append((s.index, sorted(feed), outs)))
    assert all(np.array_equal(a, b) for a, b in zip(want, got, strict=True))
    assert [i for i, _, _ in seen] == list(range(len(seg.segments)))
    for index, feed, outs in seen[1:]:     # a later segment is fed only what crosses into it
        assert len(feed) <= 2, (index, feed)


def test_segments_are_loaded_one_at_a_time_after_the_cache_makes_room(tmp_path):
    path = _synthetic(tmp_path)
    asked, live = [], []

    def factory(model_bytes, external_dir):
        live.append(1)
        assert len(live) == 1, "two segment sessions alive at once"
        session = compare.ort_session(model_bytes, external_dir)

        class Tracked:
            def run(self, names, feed):
                return session.run(names, feed)

            def __del__(self):
                live.pop()
        return Tracked()

    seg = SegmentedSession(path, budget=H * H * 4, factory=factory, make_room=asked.append)
    seg.run(None, {"ids": np.arange(4, dtype=np.int64)})
    assert asked == [s.load_bytes for s in seg.segments if s.load_bytes] and not live


def test_a_graph_above_the_limit_runs_in_segments_and_the_cache_holds_no_weights(tmp_path, monkeypatch):
    path = _synthetic(tmp_path)
    total = data_bytes(onnx.load(str(path), load_external_data=False))
    monkeypatch.setattr(compare, "WHOLE_SESSION_LIMIT", total - 1)
    monkeypatch.setattr(compare, "SEGMENT_BYTES", total // 3)
    cache = RunCache()
    session = shared_session(cache, path)
    assert isinstance(session, SegmentedSession) and len(session.segments) >= 3
    assert shared_session(cache, path) is session and cache.held_bytes() == 0
    monkeypatch.setattr(compare, "WHOLE_SESSION_LIMIT", total)
    assert not isinstance(graph_session(path), SegmentedSession)


def test_nodes_out_of_topological_order_are_refused_clearly(tmp_path):
    path = _synthetic(tmp_path)
    model = onnx.load(str(path), load_external_data=False)
    nodes = list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend([nodes[0], nodes[2], nodes[1], *nodes[3:]])
    with pytest.raises(GraphError, match="not in topological order"):
        plan(model, 1024)


# the exported BitNet graphs, both profiles ------------------------------------------------------

@pytest.fixture(scope="module", params=["reference", "icraft"])
def exported(request, tmp_path_factory):
    from tdpu_tui.engine.core.config import load_config
    from tdpu_tui.engine.core.pipeline import Pipeline
    from tdpu_tui.engine.stages import all_stages

    d = tmp_path_factory.mktemp(f"seg-{request.param}")
    cfg = load_config(write_config(d, profile=request.param))
    result = Pipeline(cfg, stages=all_stages()).run(["export"]).results[0]
    assert result.status is Status.OK, result.message
    return request.param, Artifacts.of(cfg).full_onnx


@pytest.mark.parametrize("prepack", [False, True])
def test_the_exported_graph_in_segments_equals_the_whole_graph(exported, prepack):
    profile, path = exported
    model = onnx.load(str(path), load_external_data=False)
    extra = [n.output[0] for n in model.graph.node if n.op_type in ("MatMul", "Add")]
    if profile == "icraft":
        hidden = model.graph.input[0].type.tensor_type.shape.dim[2].dim_value
        seq = model.graph.input[0].type.tensor_type.shape.dim[1].dim_value
        feed = {"inputs_embeds": np.random.default_rng(1).standard_normal((1, seq, hidden)).astype(np.float32)}
    else:
        feed = {"input_ids": np.random.default_rng(1).integers(0, 256, (2, 16)).astype(np.int64)}
    names = ["logits", *extra]
    want = _whole(path, extra, prepack).run(names, feed)
    for budget in (data_bytes(model) // 6, data_bytes(model) // 3):
        seg = SegmentedSession(path, budget=budget, extra_outputs=extra, prepack=prepack)
        assert len(seg.segments) >= 3
        got = seg.run(names, feed)
        for name, a, b in zip(names, want, got, strict=True):
            assert np.array_equal(a, b), (profile, budget, name)


def test_the_bitnet_graph_is_cut_where_only_the_hidden_state_crosses(exported):
    _, path = exported
    model = onnx.load(str(path), load_external_data=False)
    seg = SegmentedSession(path, budget=data_bytes(model) // 2)   # a layer fits: no cut inside one
    layer_cuts = [s for s in seg.segments[1:] if any("layers." in i for i in s.inputs)]
    assert layer_cuts
    for s in layer_cuts:      # the residual stream, plus (reference profile) the tables every layer shares
        hidden = [i for i in s.inputs if "layers." in i]
        assert len(hidden) == 1 and hidden[0].endswith("residual/Add_output_0"), s.inputs


# the stages ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("profile", ["reference", "icraft"])
def test_stages_run_a_float_graph_above_the_limit_in_segments(tmp_path, monkeypatch, profile):
    from tdpu_tui.engine.core.config import load_config
    from tdpu_tui.engine.core.pipeline import Pipeline
    from tdpu_tui.engine.stages import all_stages

    # the tiny float graph holds ~0.3–0.6 MiB of weights: force it into segments of ~100 KiB
    monkeypatch.setattr(compare, "WHOLE_SESSION_LIMIT", 200_000)
    monkeypatch.setattr(compare, "SEGMENT_BYTES", 100_000)
    runs: list[tuple[bool, bool]] = []     # (prepacked, timed) per run of a segmented graph
    run = SegmentedSession.run

    def recording_run(self, output_names, feed, visit=None):
        runs.append((self.prepack, visit is not None))
        return run(self, output_names, feed, visit)

    monkeypatch.setattr(SegmentedSession, "run", recording_run)
    cfg = load_config(write_config(tmp_path, "[validate]\nrepeats = 2\nsample_nodes = 4\n", profile=profile))
    summary = Pipeline(cfg, stages=all_stages()).run(["export", "simulate", "replace", "validate"])
    # runs done once (export's check, simulate, validate's capture) load unpacked weights; the
    # timed ones (prefill and step, each segment many times) prepacked
    assert runs.count((False, False)) == 3 and runs.count((True, True)) == 2 and len(runs) == 5, runs
    results = {r.name: r for r in summary.results}
    for name in ("export", "simulate", "replace", "validate"):
        assert results[name].status is Status.OK, (name, results[name].message)
    assert results["validate"].metrics["argmax_agreement"] >= 0.99
    assert results["validate"].metrics["float_prefill_ms"] > 0
    report = Artifacts.of(cfg).performance_report.read_text(encoding="utf-8")
    assert "通过 passed" in report
    assert "the float graph (" in report and "segments of ≤" in report
    assert "its time is the sum of the segments' medians" in report
    assert "the float graph in " in report and "segments, each segment's median of 2 and 10 runs on its own, summed" in report
    compile_log = Artifacts.of(cfg).compile_log.read_text(encoding="utf-8")
    assert "ran in" in compile_log and "segments of at most" in compile_log
    log = (Artifacts.of(cfg).logs / "runs" / "export.log").read_text(encoding="utf-8")
    assert "ran the graph in" in log and "segments" in log
