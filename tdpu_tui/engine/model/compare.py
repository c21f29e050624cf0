"""Inputs, ONNX Runtime sessions and numerical comparison shared by export verification,
simulation and validation."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import onnx

# Share of positions whose argmax must agree for export verification and validation to pass.
MIN_ARGMAX_AGREEMENT = 0.99


def require_graph(path: str | Path, made_by: str) -> Path:
    """`path` and every external-data file it names must exist; else a StageFailed naming the
    missing file and the stage that writes it."""
    import onnx

    from tdpu_tui.engine.core.errors import StageFailed, UsageError

    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: not found; run the {made_by} stage first")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 (protobuf's DecodeError, OSError, ValueError, …: all "unreadable")
        raise StageFailed(f"{path}: not a readable ONNX model ({exc}); run the {made_by} stage again") from None
    from tdpu_tui.engine.core.errors import GraphError
    from tdpu_tui.engine.graph.external import data_file

    needed: dict[Path, int] = {}       # data file -> bytes the initializers reach
    for t in model.graph.initializer:
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in t.external_data}
        end = int(info.get("offset", 0) or 0) + int(info.get("length", 0) or 0)
        try:        # confined to the graph's directory, as every reader of the data is
            data = data_file(path.parent, t.name, info.get("location", ""))
        except GraphError as exc:
            raise StageFailed(f"{path}: {exc}") from None
        needed[data] = max(needed.get(data, 0), end)
    for data, end in sorted(needed.items()):
        if not data.is_file():
            raise StageFailed(f"{data}: not found (the weights of {path.name}); run the "
                              f"{made_by} stage again")
        if data.stat().st_size < end:
            raise StageFailed(f"{data}: {data.stat().st_size} bytes, but {path.name} reads up to byte "
                              f"{end}: truncated; run the {made_by} stage again")
    return path


def ort_session(model: str | Path | bytes, external_dir: str | Path | None = None, *, prepack: bool = True):
    """A quiet CPU InferenceSession for a graph without custom operators.

    `model` is a path or serialized bytes; for bytes whose initializers are external data,
    `external_dir` is the directory that data is read from. Graphs holding `ai.tdpu::BitLinear`
    need `kernels.ort.create_session` instead.

    `prepack=False` for a session that runs once: ONNX Runtime then reads the weights where
    they lie (the external data mapped) instead of copying every MatMul weight into its packed
    layout while it loads, and packs panels as it multiplies. At 2B4T a 1.55 GiB segment of the
    float graph loads in 0.02 s instead of ~2.3 s, and its one run takes ~0.2 s longer; repeated
    runs (the timing) keep the packed weights, which make each run faster. The two differ in
    float32 summation order only (~1e-6 relative).
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    if external_dir is not None:
        so.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                    str(external_dir))
    if not prepack:
        so.add_session_config_entry("session.disable_prepacking", "1")
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, so, providers=["CPUExecutionProvider"])


def graph_bytes(path: str | Path) -> int:
    """Bytes of a graph file and its `<name>.data` external data (what a session loads)."""
    path = Path(path)
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


# One ONNX Runtime session keeps every weight of its graph resident (the full 2B4T float graph:
# 9.0 GiB). A graph whose weights exceed WHOLE_SESSION_LIMIT runs in segments of at most
# SEGMENT_BYTES of weights each (`model.segmented.SegmentedSession`), one loaded at a time, so
# no run of it holds more. 6 GiB is a quarter of a 24 GiB machine (the run cache's budget
# there) and keeps a whole session plus the run's other working memory under the pipeline's
# 8 GiB peak (issue 11); 2 GiB segments leave room beside one for what the run cache may hold
# (the PyTorch reference: 3.4 GiB at 2B4T). Every tiny graph, and the BitLinear and MatMulNBits
# graphs at 2B4T (2-bit weights), stay whole. Module constants, so tests can lower them.
WHOLE_SESSION_LIMIT = 6 << 30
SEGMENT_BYTES = 2 << 30


def weight_bytes(model: str | Path | onnx.ModelProto) -> int:
    """Bytes of a graph's initializers (external data included, nothing read): what one
    session over it holds. A graph saved beside another's data file counts that data too."""
    import onnx

    from tdpu_tui.engine.graph.segments import data_bytes

    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model), load_external_data=False)
    return data_bytes(model)


def runs_in_segments(model: str | Path | onnx.ModelProto) -> bool:
    """Whether `graph_session` runs this graph in segments (its weights exceed the limit)."""
    return weight_bytes(model) > WHOLE_SESSION_LIMIT


def graph_session(model: str | Path | onnx.ModelProto, external_dir: str | Path | None = None, *,
                  extra_outputs: tuple[str, ...] | list[str] = (), make_room=None,
                  segments_prepack: bool = False):
    """A session over a graph without custom operators, computing its outputs and
    `extra_outputs`: one `ort_session` when its weights are within WHOLE_SESSION_LIMIT, else a
    `SegmentedSession` (same `run(output_names, feed)`, same results bit for bit as a whole
    session with the same prepacking) that loads SEGMENT_BYTES of weights at a time, calling
    `make_room(nbytes)` (the run cache's) first.

    A segment is loaded for one run, so by default its weights are not prepacked (`ort_session`);
    `segments_prepack=True` where each loaded segment runs many times (validate's timing).

    `model` is a path, or a ModelProto loaded without its external data with `external_dir`
    the folder that data is read from."""
    import onnx

    path = None
    if not isinstance(model, onnx.ModelProto):
        path = Path(model)
        model = onnx.load(str(path), load_external_data=False)
        external_dir = path.parent
    if weight_bytes(model) > WHOLE_SESSION_LIMIT:
        from tdpu_tui.engine.model.segmented import SegmentedSession

        return SegmentedSession(model, external_dir, budget=SEGMENT_BYTES, extra_outputs=extra_outputs,
                                make_room=make_room, prepack=segments_prepack)
    if path is not None and not set(extra_outputs) - {o.name for o in model.graph.output}:
        return ort_session(path)
    return whole_session(model, external_dir, extra_outputs)


def whole_session(model: onnx.ModelProto, external_dir: str | Path | None,
                  extra_outputs: tuple[str, ...] | list[str] = (), *, prepack: bool = True):
    """One `ort_session` over `model` (loaded without its external data, read from
    `external_dir`) with `extra_outputs` added as graph outputs (the model is changed)."""
    import onnx

    have = {o.name for o in model.graph.output}
    for name in dict.fromkeys(extra_outputs):
        if name not in have:
            model.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    return ort_session(model.SerializeToString(), external_dir, prepack=prepack)


def shared_session(cache, path: str | Path, factory=None):
    """The run's one session over the graph at `path` (`cache`: the run cache), made by
    `factory(path)` the first time, kept while memory allows. The default factory is
    `graph_session`: a graph too large for one session runs in segments, and what the cache
    keeps of it is the plan (the weights are loaded while it runs, never held)."""
    if factory is None:
        segmented = runs_in_segments(path)
        return cache.for_file("ort-session", path,
                              lambda: graph_session(path, make_room=cache.make_room), ort_session.__name__,
                              nbytes=0 if segmented else graph_bytes(path))
    return cache.for_file("ort-session", path, lambda: factory(path), factory.__name__,
                          nbytes=graph_bytes(path))


def onnx_logits(model: str | Path, inputs: dict[str, np.ndarray], session=None) -> np.ndarray:
    """The `logits` of a graph, fed those of `inputs` that it takes (on `session` if given)."""
    sess = session if session is not None else ort_session(model)
    names = {i.name for i in sess.get_inputs()}
    return sess.run(["logits"], {k: v for k, v in inputs.items() if k in names})[0]


def make_input_ids(vocab_size: int, batch: int, tokens: int, seed: int) -> np.ndarray:
    """Seeded token ids, int64 [batch, tokens]."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, vocab_size, size=(batch, tokens), dtype=np.int64)


def seeded_inputs(ckpt, profile: str, batch: int, tokens: int, seed: int) -> dict[str, np.ndarray]:
    """Seeded `input_ids` and, for the icraft profile, their embeddings (the graph's input)."""
    ids = make_input_ids(ckpt.config.vocab_size, batch, tokens, seed)
    if profile == "icraft":
        return {"input_ids": ids, "inputs_embeds": np.ascontiguousarray(ckpt.embed(ids), dtype=np.float32)}
    return {"input_ids": ids}


def compare_logits(got: np.ndarray, want: np.ndarray) -> dict[str, float]:
    """Max/mean absolute difference, cosine similarity and argmax agreement over positions."""
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    if got.shape != want.shape:
        raise ValueError(f"logits shapes differ: {got.shape} vs {want.shape}")
    diff = np.abs(got - want)
    a, b = got.ravel(), want.ravel()
    denom = np.linalg.norm(a) * np.linalg.norm(b)
    cosine = float(a @ b / denom) if denom else float("nan")
    agree = got.argmax(-1) == want.argmax(-1)
    return {
        "max_abs": float(diff.max()) if diff.size else 0.0,
        "mean_abs": float(diff.mean()) if diff.size else 0.0,
        "cosine": cosine,
        "argmax_agreement": float(agree.mean()) if agree.size else 1.0,
        "positions": int(agree.size),
        "finite": bool(np.isfinite(got).all()),
    }


def format_comparison(m: dict[str, float]) -> str:
    return (f"max |Δ| {m['max_abs']:.3g}, mean |Δ| {m['mean_abs']:.3g}, cosine {m['cosine']:.6f}, "
            f"argmax agreement {m['argmax_agreement']:.2%} of {m['positions']} positions")
