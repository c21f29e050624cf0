"""The run cache: each artifact loaded once per run, never served stale, within its budget."""

import os

import pytest

from tdpu_tui.engine.core.cache import RunCache
from tdpu_tui.engine.core.config import load_config
from tdpu_tui.engine.core.events import Status
from tdpu_tui.engine.core.pipeline import Pipeline
from tdpu_tui.engine.stages import all_stages

from conftest import write_config


def test_a_file_is_loaded_once_and_again_after_it_changes(tmp_path):
    cache = RunCache()
    f = tmp_path / "g.onnx"
    f.write_text("one")
    loads = []

    def load():
        loads.append(f.read_text())
        return loads[-1]

    assert cache.for_file("graph", f, load) == "one"
    assert cache.for_file("graph", f, load) == "one"
    assert loads == ["one"]
    f.write_text("two!")                      # rewritten by a later stage: a new size and mtime
    os.utime(f, ns=(1, 1))
    assert cache.for_file("graph", f, load) == "two!"
    assert loads == ["one", "two!"] and cache.loads == {"graph": 2}


def test_entries_beyond_the_budget_are_loaded_but_not_held(tmp_path):
    cache = RunCache()
    big = cache.budget + 1
    calls = []
    for _ in range(2):
        cache.get("session", ("float",), lambda: calls.append(1) or object(), nbytes=big)
    assert len(calls) == 2 and cache.held_bytes() == 0
    cache.get("ref", ("r",), object, nbytes=cache.budget // 2)
    cache.get("ref", ("s",), object, nbytes=cache.budget // 2 + 1)   # the first makes room
    assert cache.held_bytes() == cache.budget // 2 + 1


def test_a_load_too_large_to_hold_runs_alone(tmp_path):
    # The run's peak is the largest single load, not that load plus the held reference.
    cache = RunCache()
    cache.get("reference", ("r",), object, nbytes=cache.budget // 2)
    cache.get("logits", ("r",), lambda: "small")                 # small: never dropped for room
    cache.get("index", ("g",), object, nbytes=cache.budget // 16)  # below an eighth: may stay
    cache.get("session", ("float",), object, nbytes=cache.budget + 1)
    assert cache.held_bytes() == cache.budget // 16
    assert cache.get("logits", ("r",), lambda: "again") == "small"


def test_drop_forgets_one_kind(tmp_path):
    cache = RunCache()
    cache.get("a", (1,), lambda: "x", nbytes=10)
    cache.get("b", (1,), lambda: "y", nbytes=20)
    assert cache.drop("a") == 10 and cache.held_bytes() == 20


@pytest.mark.slow
def test_one_pipeline_run_builds_the_reference_once(tmp_path):
    """export, simulate and validate (icraft profile) all compare with the PyTorch reference."""
    cfg = load_config(write_config(tmp_path, profile="icraft"))
    assert cfg.export.profile == "icraft"
    pipe = Pipeline(cfg, all_stages())
    summary = pipe.run(["export", "simulate", "replace", "validate"])
    assert all(r.status is Status.OK for r in summary.results), [r.message for r in summary.results]
    assert pipe.cache.loads["reference"] == 1
    # export (its own verify seed), simulate (float activations) and validate (int8
    # activations) each ask the reference something different: three runs of it, one model.
    assert pipe.cache.loads["reference-logits"] == 3
    assert pipe.cache.loads["graph-index"] == 2          # the exported graph and the BitLinear one
    # The float graph's session: made by export, shared with simulate; validate makes its own,
    # with the sampled nodes' tensors as outputs, and times prefill on it.
    assert pipe.cache.loads.get("ort-session", 0) <= 1
    assert pipe.cache.loads["ort-capture"] == 1


def test_the_reference_runs_once_per_input(tmp_path):
    import numpy as np

    from tdpu_tui.engine.model.agreement import reference_logits
    from tdpu_tui.engine.model.checkpoint import open_checkpoint
    from tdpu_tui.engine.model.synthetic import write_synthetic

    cache = RunCache()
    with open_checkpoint(write_synthetic(tmp_path / "ckpt", "tiny", seed=1)) as ckpt:
        ids = {"input_ids": np.arange(8, dtype=np.int64).reshape(1, 8)}
        first = reference_logits(ckpt, ids, True, cache)
        again = reference_logits(ckpt, {"input_ids": ids["input_ids"].copy()}, True, cache)
        other = reference_logits(ckpt, {"input_ids": ids["input_ids"][:, ::-1].copy()}, True, cache)
        float_acts = reference_logits(ckpt, ids, False, cache)
    assert again is first and other.shape == first.shape
    assert cache.loads == {"reference": 1, "reference-logits": 3}
    assert float_acts is not first            # float activations: an entry of its own
