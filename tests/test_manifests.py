"""The export meta file and the replace report: typed, one error policy (core/manifests.py)."""

from __future__ import annotations

import json

import pytest

from tdpu_tui.engine.core.errors import StageFailed, UsageError
from tdpu_tui.engine.core.manifests import ExportMeta, ReplaceReport


def meta_doc(**over):
    doc = {"profile": "reference", "checkpoint": "/ckpt", "seq_len": 32, "input_name": "input_ids",
           "hidden_size": 64, "vocab_size": 256, "num_layers": 2, "linear_class": "autobitlinear",
           "opset": 18, "max_position_embeddings": 128, "exported_at": "2026-12-02T10:00:00"}
    doc.update(over)
    return doc


def test_export_meta_round_trips_and_keeps_unknown_keys(tmp_path):
    path = tmp_path / "m.json"
    path.write_text(json.dumps(meta_doc(export_id="abc", future={"x": 1})), encoding="utf-8")
    meta = ExportMeta.load(path)
    assert (meta.profile, meta.seq_len, meta.exported_at) == ("reference", 32, "2026-12-02T10:00:00")
    assert meta.extra == {"export_id": "abc", "future": {"x": 1}}
    again = tmp_path / "again.json"
    meta.dump(again)
    assert json.loads(again.read_text(encoding="utf-8")) == json.loads(path.read_text(encoding="utf-8"))


def test_a_missing_file_is_a_usage_error_naming_it_and_the_stage_that_writes_it(tmp_path):
    with pytest.raises(UsageError, match=r"m\.json: not found; run the export stage first"):
        ExportMeta.load(tmp_path / "m.json")
    with pytest.raises(UsageError, match=r"r\.json: not found; run the replace stage first"):
        ReplaceReport.load(tmp_path / "r.json")


@pytest.mark.parametrize("text, says", [
    ("{truncated", "not JSON"),
    ("[1, 2]", "expected a JSON object, found list"),
    (json.dumps({k: v for k, v in meta_doc().items() if k != "checkpoint"}), "key 'checkpoint' missing"),
    (json.dumps(meta_doc(seq_len="32")), "key 'seq_len': expected int, found \"32\""),
    (json.dumps(meta_doc(seq_len=True)), "key 'seq_len': expected int, found true"),
])
def test_a_broken_meta_fails_naming_the_file_and_the_key(tmp_path, text, says):
    path = tmp_path / "m.json"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(StageFailed) as info:
        ExportMeta.load(path)
    assert not isinstance(info.value, UsageError)
    assert str(path) in str(info.value) and says in str(info.value)
    assert "run the export stage again" in str(info.value)


def test_optional_keys_may_be_null_or_absent(tmp_path):
    path = tmp_path / "m.json"
    doc = meta_doc(max_position_embeddings=None)
    del doc["hidden_size"]
    path.write_text(json.dumps(doc), encoding="utf-8")
    meta = ExportMeta.load(path)
    assert meta.max_position_embeddings is None and meta.hidden_size is None


def test_replace_report_checks_each_node(tmp_path):
    path = tmp_path / "r.json"
    good = {"source": "a.onnx", "output": "b.onnx", "layout": "tdpu",
            "nodes": [{"name": "/m/MatMul", "action": "replaced"}, {"name": "/n/MatMul", "action": "kept"}]}
    path.write_text(json.dumps(good), encoding="utf-8")
    report = ReplaceReport.load(path)
    assert [d["name"] for d in report.with_action("replaced")] == ["/m/MatMul"]
    good["nodes"].append({"name": "/o/MatMul", "action": "deleted"})
    path.write_text(json.dumps(good), encoding="utf-8")
    with pytest.raises(StageFailed, match=r"nodes\[2\]: expected an object with a name and an action"):
        ReplaceReport.load(path)
