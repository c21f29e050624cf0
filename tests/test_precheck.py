"""The precheck stage: every node of the exported graph against Icraft's op-support table."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).parent / "fixtures" / "icraft"))
import helpers  # noqa: E402

from tdpu_tui.engine.core.artifacts import Artifacts  # noqa: E402
from tdpu_tui.engine.records.compile_log import read_section  # noqa: E402
from tdpu_tui.engine.core.config import load_config  # noqa: E402
from tdpu_tui.engine.core.errors import ConfigError  # noqa: E402
from tdpu_tui.engine.core.events import Status  # noqa: E402
from tdpu_tui.engine.stages.precheck import PrecheckStage  # noqa: E402
from tdpu_tui.engine.icraft.optable import load_op_table, table_for  # noqa: E402
from tdpu_tui.engine.core.pipeline import Pipeline  # noqa: E402
from tdpu_tui.engine.icraft.rules import precheck_model  # noqa: E402

TABLE = load_op_table()


def run_precheck(tmp_path: Path, model: onnx.ModelProto, profile: str, **cfg_kw):
    cfg = load_config(helpers.write_config(tmp_path, **cfg_kw))
    paths = Artifacts.of(cfg)
    helpers.save_export(paths.output, model, profile)
    summary = Pipeline(cfg, stages=[PrecheckStage()]).run(["precheck"])
    result = summary.results[0]
    csv_path = paths.icraft_dir / "tiny_net_precheck.csv"
    rows = list(csv.DictReader(csv_path.open(encoding="utf-8"))) if csv_path.exists() else None
    return result, rows, paths


def _model(nodes, inputs, outputs, inits=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(inits))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _x(shape=(1, 8, 16), name="x"):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape))


def _y(name="y"):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, None)


def _const(name, value, dtype=np.float32):
    return numpy_helper.from_array(np.asarray(value, dtype=dtype), name)


def notes_of(model, op_type=None):
    report = precheck_model(model, TABLE)
    return [(f.category, f.note) for f in report.findings if op_type in (None, f.node_type)]


def test_llama_like_graph_is_reported_node_by_node(tmp_path):
    result, rows, paths = run_precheck(tmp_path, helpers.llama_like_graph(), "reference")
    by_type = {r["node_type"]: r for r in rows}
    assert set(by_type) == {"Input", "Gather", "Pow", "Div", "Sin", "Cos", "Where"}
    assert by_type["Sin"]["note"].startswith("unsupported:")
    assert by_type["Cos"]["node_output"] == "cos"
    assert by_type["Div"]["note"].startswith("constraint: divisor 'rms' is a tensor")
    assert "single-index select" in by_type["Gather"]["note"]
    assert by_type["Pow"]["note"].startswith("undocumented:")
    assert by_type["Where"]["note"].startswith("undocumented:")
    assert by_type["Input"]["note"].startswith("dynamic:") and by_type["Input"]["index"] == "-"
    assert by_type["Gather"]["index"] == "0" and by_type["Where"]["index"] == "10"
    assert result.metrics["unsupported"] == 2 and result.metrics["undocumented"] == 2
    assert result.metrics["constraint"] == 2 and result.metrics["dynamic"] == 1


def test_reference_profile_passes_with_findings_and_suggests_the_icraft_profile(tmp_path):
    result, rows, paths = run_precheck(tmp_path, helpers.llama_like_graph(), "reference")
    assert result.status is Status.OK, result.message
    assert "7 blocking for Icraft" in result.message
    assert any('profile = "icraft"' in line for line in result.log_tail)
    section = read_section(paths.compile_log, "precheck")
    assert "## precheck — ok" in section and 'profile = "icraft"' in section
    assert "| Sin | unsupported | 1 |" in section


def test_icraft_profile_fails_while_something_unsupported_remains(tmp_path):
    result, rows, paths = run_precheck(tmp_path, helpers.llama_like_graph(), "icraft")
    assert result.status is Status.FAILED
    assert "7 node(s) Icraft does not support" in result.message
    assert "tiny_net_precheck.csv" in result.message
    assert "## precheck — failed" in read_section(paths.compile_log, "precheck")


def test_clean_graph_has_zero_findings(tmp_path):
    result, rows, paths = run_precheck(tmp_path, helpers.clean_graph(), "icraft")
    assert result.status is Status.OK, result.message
    assert rows == []
    assert all(result.metrics[c] == 0 for c in ("unsupported", "undocumented", "constraint",
                                                 "dynamic", "advisory", "custom"))
    assert result.metrics["nodes"] == 5


def test_missing_export_fails_with_the_stage_to_run(tmp_path):
    cfg = load_config(helpers.write_config(tmp_path))
    result = Pipeline(cfg, stages=[PrecheckStage()]).run(["precheck"]).results[0]
    assert result.status is Status.FAILED and "run the export stage first" in result.message


def test_div_needs_a_constant_scalar_divisor():
    scalar = _model([helper.make_node("Div", ["x", "c"], ["y"])], [_x()], [_y()],
                    [_const("c", 127.0)])
    vector = _model([helper.make_node("Div", ["x", "c"], ["y"])], [_x()], [_y()],
                    [_const("c", np.ones(16))])
    constant_node = _model([
        helper.make_node("Constant", [], ["c"], value_float=2.0),
        helper.make_node("Div", ["x", "c"], ["y"])], [_x()], [_y()])
    assert notes_of(scalar) == []
    assert notes_of(vector, "Div")[0][1] == ("constraint: divisor 'c' is a constant of 16 "
                                             "elements; Icraft's DivideScalar needs a scalar")
    assert notes_of(constant_node, "Div") == []
    assert notes_of(constant_node, "Constant")[0][0] == "advisory"


def test_gather_only_as_a_single_index_select():
    def gather(indices):
        return _model([helper.make_node("Gather", ["x", "i"], ["y"], axis=1)], [_x()], [_y()],
                      [_const("i", indices, np.int64)])
    assert notes_of(gather(3)) == []
    assert "hold 2 values" in notes_of(gather([1, 2]))[0][1]


def test_clip_slice_squeeze_pad_expand_limits():
    clip = _model([helper.make_node("Clip", ["x", "lo", ""], ["y"])],
                  [_x(), _x((), "lo")], [_y()])
    assert "min 'lo' is a tensor" in notes_of(clip, "Clip")[0][1]

    slc = _model([helper.make_node("Slice", ["x", "s", "e", "a", "st"], ["y"])], [_x()], [_y()],
                 [_const(n, v, np.int64) for n, v in
                  (("s", [-1]), ("e", [-100]), ("a", [2]), ("st", [-1]))])
    assert "negative step [-1]" in notes_of(slc, "Slice")[0][1]

    sq = _model([helper.make_node("Squeeze", ["x", "ax"], ["y"])], [_x((1, 1, 16))], [_y()],
                [_const("ax", [0, 1], np.int64)])
    assert "squeezes 2 axes" in notes_of(sq, "Squeeze")[0][1]
    sq_all = _model([helper.make_node("Squeeze", ["x"], ["y"])], [_x((1, 1, 16))], [_y()])
    assert "removes 2 dims" in notes_of(sq_all, "Squeeze")[0][1]

    pad3 = _model([helper.make_node("Pad", ["x", "p"], ["y"])], [_x()], [_y()],
                  [_const("p", [0, 0, 1, 0, 0, 1], np.int64)])
    assert "3-D" in notes_of(pad3, "Pad")[0][1]
    pad_nc = _model([helper.make_node("Pad", ["x", "p"], ["y"])], [_x((1, 3, 8, 8))], [_y()],
                    [_const("p", [0, 1, 1, 1, 0, 0, 1, 1], np.int64)])
    assert "pad the N or C dim" in notes_of(pad_nc, "Pad")[0][1]
    pad_ok = _model([helper.make_node("Pad", ["x", "p"], ["y"])], [_x((1, 3, 8, 8))], [_y()],
                    [_const("p", [0, 0, 1, 1, 0, 0, 1, 1], np.int64)])
    assert notes_of(pad_ok) == []

    shape = helper.make_tensor_value_info("shape", TensorProto.INT64, [3])
    expand = _model([helper.make_node("Expand", ["x", "shape"], ["y"])], [_x(), shape], [_y()])
    assert "not constant" in notes_of(expand, "Expand")[0][1]


def test_both_inputs_constant_and_reducemax_via_maxpool():
    mm = _model([helper.make_node("MatMul", ["a", "b"], ["c"]),
                 helper.make_node("Add", ["x", "c"], ["y"])], [_x((16, 16))], [_y()],
                [_const("a", np.eye(16)), _const("b", np.eye(16))])
    assert notes_of(mm, "MatMul")[0][0] == "constraint"
    assert notes_of(mm, "Add") == []

    rmax = _model([helper.make_node("ReduceMax", ["x"], ["y"], axes=[-1], keepdims=1)],
                  [_x()], [_y()])
    assert notes_of(rmax)[0][0] == "advisory"
    rmax2 = _model([helper.make_node("ReduceMax", ["x"], ["y"], axes=[-1], keepdims=1)],
                   [_x((8, 16))], [_y()])
    assert "lowers ReduceMax to MaxPool" in notes_of(rmax2)[0][1]


def test_custom_domain_op_needs_an_icraft_custom_operator():
    model = _model([helper.make_node("BitLinear", ["x"], ["y"], domain="ai.tdpu")], [_x()], [_y()])
    model.opset_import.append(helper.make_opsetid("ai.tdpu", 1))
    (category, note), = notes_of(model)
    assert category == "custom" and "ai.tdpu::BitLinear" in note


def test_small_constants_are_read_from_external_data(tmp_path):
    steps = np.full(64, -1, np.int64)      # big enough to be stored externally below
    model = _model([helper.make_node("Slice", ["x", "s", "e", "a", "st"], ["y"])],
                   [_x((1, 8, 64))], [_y()],
                   [_const("s", [0], np.int64), _const("e", [8], np.int64),
                    _const("a", [2], np.int64), numpy_helper.from_array(steps, "st")])
    path = tmp_path / "m.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, location="m.data",
                    size_threshold=64)
    assert onnx.load(str(path), load_external_data=False).graph.initializer[3].data_location == 1
    (category, note), = [(f.category, f.note) for f in precheck_model(path, TABLE).findings]
    assert category == "constraint" and "negative step" in note


def test_user_op_table_relative_to_the_config_file(tmp_path):
    own = tmp_path / "tables" / "my_icraft.csv"
    own.parent.mkdir()
    text = helpers.HERE.parent.parent.parent.joinpath(
        "tdpu_tui", "data", "onnx_op_support.csv").read_text(encoding="utf-8")
    own.write_text(text.replace("\nSin,no,", "\nSin,yes,") + "Where,yes,unspecified,,mine\n",
                   encoding="utf-8")
    result, rows, _ = run_precheck(tmp_path, helpers.llama_like_graph(), "reference",
                                   op_table="tables/my_icraft.csv")
    kinds = {r["node_type"] for r in rows}
    assert "Sin" not in kinds and "Where" not in kinds and "Cos" in kinds
    assert "my_icraft.csv" in "\n".join(result.log_tail)


def test_missing_or_broken_op_table_names_the_key(tmp_path):
    cfg = load_config(helpers.write_config(tmp_path, op_table="nope.csv"))
    with pytest.raises(ConfigError, match=r"icraft\.op_table.*not found"):
        table_for(cfg)
    (tmp_path / "bad.csv").write_text("onnx_op,supported\nAbs,maybe\n", encoding="utf-8")
    cfg = load_config(helpers.write_config(tmp_path, op_table="bad.csv"))
    with pytest.raises(ConfigError, match=r"icraft\.op_table.*lacks column"):
        table_for(cfg)


def test_packaged_table_matches_the_reference_counts():
    assert len(TABLE) == 57
    assert TABLE.counts() == {"yes": 42, "partial": 13, "no": 2}
