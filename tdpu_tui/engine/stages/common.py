"""What several stages read: the exported graph, its facts, its fixed-shape inputs, and the
seeded validation inputs built from them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from tdpu_tui.engine.core.errors import StageFailed
from tdpu_tui.engine.core.manifests import ExportMeta
from tdpu_tui.engine.core.stage import StageContext

ELEM_DTYPES = {1: np.float32, 6: np.int32, 7: np.int64, 10: np.float16, 11: np.float64}


def read_export_meta(ctx: StageContext) -> ExportMeta:
    """The export's facts (`core.manifests`: a missing file is a usage error naming it)."""
    return ExportMeta.load(ctx.paths.export_meta)


def exported_graph(ctx: StageContext) -> Path:
    from tdpu_tui.engine.model.compare import require_graph
    return require_graph(ctx.paths.full_onnx, "export")


def graph_inputs(onnx_path: Path, seq_len: int) -> list[tuple[str, list[int], Any]]:
    """(name, fixed shape, numpy dtype) of each graph input.

    Icraft parses fixed shapes only: a dynamic first axis becomes the batch 1, any other
    dynamic axis the sequence length `seq_len`.
    """
    from tdpu_tui.engine.icraft.rules import load_graph

    graph = load_graph(onnx_path).graph
    inits = {t.name for t in graph.initializer}
    out = []
    for vi in graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        shape = []
        for axis, d in enumerate(tt.shape.dim):
            if d.HasField("dim_value") and d.dim_value > 0:
                shape.append(int(d.dim_value))
            else:
                shape.append(1 if axis == 0 else seq_len)
        out.append((vi.name, shape, ELEM_DTYPES.get(tt.elem_type, np.float32)))
    return out



def validation_inputs(ctx: StageContext, meta: ExportMeta, onnx_path: Path, ckpt):
    """Seeded token ids, and the graph's inputs built from them (embeddings for `icraft`)."""
    from tdpu_tui.engine.model.compare import seeded_inputs

    inputs = graph_inputs(onnx_path, ctx.config.export.seq_len)
    if len(inputs) != 1:
        raise StageFailed(f"{onnx_path}: expected one graph input, found {len(inputs)}")
    name, shape, dtype = inputs[0]
    seeded = seeded_inputs(ckpt, meta.profile, shape[0], shape[1],
                           ctx.config.validate.seed)
    # Icraft's .ftmp inputs carry token ids as float32 too.
    feed = seeded.get("inputs_embeds", seeded["input_ids"]).astype(dtype, copy=False)
    if list(feed.shape) != shape:
        raise StageFailed(f"{onnx_path}: input '{name}' expects shape {shape}, "
                          f"the validation input has {list(feed.shape)}")
    return seeded["input_ids"], name, feed
