"""BitNet b1.58 as an ONNX graph, built node by node from the checkpoint.

Like ONNX Runtime GenAI's model builder, the graph is written directly rather than traced:
each weight is read from the checkpoint, converted, and streamed to the external-data file
at once, so exporting the 2B model needs little more memory than its largest tensor.

Two profiles (docs/spec.md §3, §6):
- `reference`: `input_ids` int64 [batch, seq] (dynamic) -> `logits`; BitNet's per-token int8
  activation quantization is in the graph, so the graph computes what the checkpoint means.
- `icraft`: `inputs_embeds` float32 [1, seq_len, hidden] (fixed) -> `logits`, built only from
  ops that Icraft's ONNX table documents as supported: RMSNorm through LayerNormalization,
  RoPE as x*cos + (x@R)*sin with constant tables, a constant causal mask, no Pow/Div by a
  tensor/Gather/Where/Range/Shape/Round. Activation quantization is left to Icraft's quantizer.

Every projection is the same chain (docs/CONTRACTS.md), so the MatMul -> BitLinear pass can
find it: [act_quant] -> MatMul(x, W[K, N] in {-1, 0, 1}) -> [Div(s)] -> Mul(weight_scale).
"""

from __future__ import annotations

import collections
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from tdpu_tui.engine.graph.external import EXTERNAL_THRESHOLD, ExternalData, set_external, tensor_array


# Side of the square tiles `transposed` copies: 256 × 256 float32 (256 KiB) stays in L2.
TILE = 256


def transposed(a: np.ndarray, dtype=np.float32) -> np.ndarray:
    """`a.T` [C, R] as a new C-contiguous `dtype` array, copied tile by tile: a plain strided
    copy of a large matrix misses the cache on every element (~3 × slower at 6912 × 2560)."""
    a = np.asarray(a)
    r, c = a.shape
    out = np.empty((c, r), dtype)
    for i in range(0, c, TILE):
        for j in range(0, r, TILE):
            out[i:i + TILE, j:j + TILE] = a[j:j + TILE, i:i + TILE].T
    return out


@dataclass
class GraphBuilder:
    data: ExternalData
    nodes: list = field(default_factory=list)
    initializers: list = field(default_factory=list)
    op_counts: collections.Counter = field(default_factory=collections.Counter)
    _names: set = field(default_factory=set)

    def _add(self, t: TensorProto, doc: str) -> str:
        if t.name in self._names:
            raise ValueError(f"duplicate initializer {t.name}")
        self._names.add(t.name)
        if doc:
            t.doc_string = doc
        self.initializers.append(t)
        return t.name

    def initializer(self, name: str, array: np.ndarray, doc: str = "") -> str:
        array = np.asarray(array)
        if array.nbytes <= EXTERNAL_THRESHOLD:
            return self._add(numpy_helper.from_array(array, name), doc)
        return self.streamed(name, array.dtype, array.shape, [array], doc)

    def streamed(self, name: str, dtype: np.dtype, shape: tuple[int, ...], chunks: Iterable[np.ndarray],
                 doc: str = "") -> str:
        """An external initializer whose bytes come in consecutive `chunks` (never all in memory)."""
        t = TensorProto()
        t.name = name
        t.data_type = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
        t.dims.extend(shape)
        offset, length = self.data.write(chunks)
        expected = math.prod(shape) * np.dtype(dtype).itemsize
        if length != expected:
            raise ValueError(f"initializer {name}: wrote {length} bytes, {list(shape)} {np.dtype(dtype)} needs {expected}")
        set_external(t, self.data.location, offset, length)
        return self._add(t, doc)

    def const(self, name: str, value, dtype=np.float32) -> str:
        if name in self._names:
            return name
        return self.initializer(name, np.asarray(value, dtype=dtype))

    def op(self, op_type: str, inputs: list[str], name: str, n_out: int = 1, **attrs) -> str:
        outputs = [f"{name}_output_{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outputs, name=name, **attrs))
        self.op_counts[op_type] += 1
        return outputs[0]


def with_sequence_length(model: onnx.ModelProto, seq_len: int, base_dir: str | Path) -> onnx.ModelProto:
    """A copy of an icraft-profile graph for a shorter fixed sequence length (e.g. 1, a decode step).

    The graph's sequence length lives in its input/output shapes, the RoPE tables, the causal
    mask and the two attention Reshape shapes; the weights are untouched (they stay external
    data under `base_dir`, so save the copy beside the original).
    """
    shape = model.graph.input[0].type.tensor_type.shape.dim
    if model.graph.input[0].name != "inputs_embeds":
        raise ValueError("with_sequence_length applies to icraft-profile graphs (input inputs_embeds)")
    old = shape[1].dim_value
    if not 1 <= seq_len <= old:
        raise ValueError(f"sequence length {seq_len} outside 1..{old} (the exported length)")
    out = onnx.ModelProto()
    out.CopyFrom(model)
    out.graph.ClearField("value_info")
    out.graph.input[0].type.tensor_type.shape.dim[1].dim_value = seq_len
    out.graph.output[0].type.tensor_type.shape.dim[1].dim_value = seq_len
    for i, t in enumerate(out.graph.initializer):
        if t.name in ("rope.cos", "rope.sin", "attention.causal_mask", f"const_shape_q5_{old}",
                      f"const_shape_ctx_{old}"):
            # tdpu's own reader: onnx's refuses a data file with several hard links, and the
            # hand-off bundle hard-links the exported graph's data.
            a = np.array(tensor_array(t, Path(base_dir)))
            if t.name.startswith("rope."):
                a = a[:seq_len]
            elif t.name == "attention.causal_mask":
                a = a[:seq_len, :seq_len]
            else:  # [0, nkv, groups, S, hd] and [0, nh, S, hd]
                a = a.copy()
                a[3 if "q5" in t.name else 2] = seq_len
            out.graph.initializer[i].CopyFrom(numpy_helper.from_array(np.ascontiguousarray(a), t.name))
    return out
