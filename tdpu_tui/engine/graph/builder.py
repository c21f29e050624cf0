"""BitNet b1.58 as an ONNX graph, built node by node from the checkpoint.

Like ONNX Runtime GenAI's model builder, the graph is written directly rather than traced:
each weight is read from the checkpoint, converted, and streamed to the external-data file
at once, so exporting the 2B model needs little more memory than its largest tensor.

Two profiles (SPEC §3, §6):
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
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from tdpu_tui.engine.model.checkpoint import Checkpoint

# Tensors above this size go to the external-data file; smaller ones stay in the .onnx.
EXTERNAL_THRESHOLD = 1024
# Page-aligned offsets let ONNX Runtime memory-map the external data.
ALIGN = 4096
# Elements of a large float tensor converted and written at once (64 MiB of float32).
STREAM_ELEMENTS = 1 << 24
MASK_VALUE = -1e9


def rope_tables(head_dim: int, theta: float, positions: int) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin [positions, head_dim] in the HF convention (emb = cat(freqs, freqs))."""
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / head_dim))
    freqs = np.outer(np.arange(positions, dtype=np.float32), inv_freq.astype(np.float32))
    emb = np.concatenate([freqs, freqs], axis=-1)
    return np.cos(emb).astype(np.float32), np.sin(emb).astype(np.float32)


def rotate_half_matrix(head_dim: int) -> np.ndarray:
    """R with x @ R == rotate_half(x) == cat(-x[d/2:], x[:d/2])."""
    half = head_dim // 2
    r = np.zeros((head_dim, head_dim), dtype=np.float32)
    for j in range(half):
        r[j + half, j] = -1.0      # out[j] = -x[j + half]
        r[j, j + half] = 1.0       # out[j + half] = x[j]
    return r


def causal_mask(n: int) -> np.ndarray:
    return np.triu(np.full((n, n), MASK_VALUE, dtype=np.float32), k=1)


def set_external(t: TensorProto, location: str, offset: int, length: int) -> None:
    """Point `t` at `length` bytes at `offset` of the external-data file `location`."""
    t.data_location = TensorProto.EXTERNAL
    del t.external_data[:]
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = t.external_data.add()
        entry.key, entry.value = key, value


class ExternalData:
    """The external-data file being written; every tensor starts at a page-aligned offset."""

    def __init__(self, path: Path, location: str):
        self.path = Path(path)
        self.location = location
        self.offset = 0
        self._fh = open(self.path, "wb")  # noqa: SIM115 (closed by close())

    def write(self, chunks: Iterable[np.ndarray]) -> tuple[int, int]:
        """Append one tensor, given as consecutive pieces; returns (offset, length) of its bytes."""
        pad = (-self.offset) % ALIGN
        if pad:
            self._fh.write(b"\0" * pad)
            self.offset += pad
        start = self.offset
        for chunk in chunks:
            chunk = np.ascontiguousarray(chunk)
            self._fh.write(memoryview(chunk.reshape(-1)).cast("B"))
            self.offset += chunk.nbytes
        return start, self.offset - start

    def close(self) -> None:
        if self._fh is not None:
            self._fh.flush()
            self._fh.close()
            self._fh = None


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


class BitNetOnnx:
    """Writes the graph of one checkpoint in one profile."""

    def __init__(self, ckpt: Checkpoint, profile: str, seq_len: int, opset: int,
                 data: ExternalData, on_layer: Callable[[int, int], None] | None = None):
        self.ckpt = ckpt
        self.c = ckpt.config
        self.profile = profile
        self.seq_len = seq_len
        self.opset = opset
        self.g = GraphBuilder(data)
        self.on_layer = on_layer or (lambda i, n: None)
        self.icraft = profile == "icraft"

    # -- building blocks ------------------------------------------------------------------
    def rms_norm(self, x: str, weight_name: str, scope: str) -> str:
        g, c = self.g, self.c
        weight = self.ckpt.tensor(weight_name)
        w = g.initializer(weight_name, weight)
        if self.icraft:
            # LayerNorm of [x, -x] has mean 0 and variance mean(x^2): its first half is
            # x / sqrt(mean(x^2) + eps), an RMSNorm from documented ops only.
            h = weight.shape[-1]
            neg = g.op("Mul", [x, g.const("const_minus_one", -1.0)], f"{scope}/Neg")
            cat = g.op("Concat", [x, neg], f"{scope}/Concat", axis=-1)
            ones = g.const(f"const_ones_{2 * h}", np.ones(2 * h, np.float32))
            ln = g.op("LayerNormalization", [cat, ones], f"{scope}/LayerNormalization",
                      axis=-1, epsilon=float(c.rms_norm_eps))
            half = g.op("Slice", [ln, g.const("const_0", [0], np.int64), g.const(f"const_{h}", [h], np.int64),
                                  g.const("const_minus1_axis", [-1], np.int64)], f"{scope}/Slice")
            return g.op("Mul", [half, w], f"{scope}/Mul")
        sq = g.op("Mul", [x, x], f"{scope}/Square")
        var = g.op("ReduceMean", [sq], f"{scope}/ReduceMean", axes=[-1], keepdims=1)
        eps = g.op("Add", [var, g.const("const_rms_eps", float(c.rms_norm_eps))], f"{scope}/AddEps")
        rms = g.op("Sqrt", [eps], f"{scope}/Sqrt")
        y = g.op("Div", [x, rms], f"{scope}/Div")
        return g.op("Mul", [y, w], f"{scope}/Mul")

    def bitlinear(self, x: str, module: str) -> str:
        """One ternary projection (the chain the replacement pass looks for)."""
        g = self.g
        scope = "/" + module.replace("model.layers.", "model/layers.").replace(".self_attn.", "/self_attn/") \
            .replace(".mlp.", "/mlp/")
        w, scale = self.ckpt.ternary(module)
        n, k = w.shape
        w_name = g.initializer(
            f"{module}.weight", np.ascontiguousarray(w.T, dtype=np.float32),
            doc=f"ternary {{-1,0,1}} weight of {module}, transposed to [in={k}, out={n}]")
        ws = g.initializer(f"{module}.weight_scale", np.array([scale], np.float32),
                           doc="per-tensor scale, multiply convention: y = acc / s * weight_scale")
        del w
        if self.icraft:
            acc = g.op("MatMul", [x, w_name], f"{scope}/MatMul")
            return g.op("Mul", [acc, ws], f"{scope}/Mul")
        q_scope = f"{scope}/act_quant"
        a = g.op("Abs", [x], f"{q_scope}/Abs")
        amax = g.op("ReduceMax", [a], f"{q_scope}/ReduceMax", axes=[-1], keepdims=1)
        clamped = g.op("Max", [amax, g.const("const_act_eps", 1e-5)], f"{q_scope}/Max")
        s = g.op("Div", [g.const("const_127", 127.0), clamped], f"{q_scope}/Div")
        xs = g.op("Mul", [x, s], f"{q_scope}/Mul")
        r = g.op("Round", [xs], f"{q_scope}/Round")
        q = g.op("Clip", [r, g.const("const_minus_128", -128.0), g.const("const_127", 127.0)],
                 f"{q_scope}/Clip")
        acc = g.op("MatMul", [q, w_name], f"{scope}/MatMul")
        y = g.op("Div", [acc, s], f"{scope}/Div")
        return g.op("Mul", [y, ws], f"{scope}/Mul")

    def attention(self, x: str, i: int, cos: str, sin: str, mask: str) -> str:
        g, c = self.g, self.c
        scope = f"/model/layers.{i}/self_attn"
        m = f"model.layers.{i}.self_attn"
        nh, nkv, hd = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        groups = nh // nkv
        q = self.bitlinear(x, f"{m}.q_proj")
        k = self.bitlinear(x, f"{m}.k_proj")
        v = self.bitlinear(x, f"{m}.v_proj")
        s = -1 if not self.icraft else self.seq_len

        def heads(t: str, n: int, name: str) -> str:
            r = g.op("Reshape", [t, g.const(f"const_shape_heads_{n}", [0, 0, n, hd], np.int64)],
                     f"{scope}/{name}/Reshape")
            return g.op("Transpose", [r], f"{scope}/{name}/Transpose", perm=[0, 2, 1, 3])

        def rope(t: str, name: str) -> str:
            rot = g.op("MatMul", [t, g.const("const_rotate_half", rotate_half_matrix(hd))],
                       f"{scope}/{name}/rotate_half")
            a = g.op("Mul", [t, cos], f"{scope}/{name}/MulCos")
            b = g.op("Mul", [rot, sin], f"{scope}/{name}/MulSin")
            return g.op("Add", [a, b], f"{scope}/{name}/Add")

        qh = rope(heads(q, nh, "q"), "q_rope")                       # [B, nh, S, hd]
        kh = rope(heads(k, nkv, "k"), "k_rope")                      # [B, nkv, S, hd]
        vh = heads(v, nkv, "v")
        # GQA without repeat_kv: query heads grouped as [B, nkv, groups, S, hd] broadcast
        # against keys [B, nkv, 1, S, hd] in MatMul (head h uses kv head h // groups).
        q5 = g.op("Reshape", [qh, g.const(f"const_shape_q5_{s}", [0, nkv, groups, s, hd], np.int64)],
                  f"{scope}/q_group/Reshape")
        k5 = g.op("Unsqueeze", [kh, g.const("const_axis_2", [2], np.int64)], f"{scope}/k_group/Unsqueeze")
        v5 = g.op("Unsqueeze", [vh, g.const("const_axis_2", [2], np.int64)], f"{scope}/v_group/Unsqueeze")
        kt = g.op("Transpose", [k5], f"{scope}/k_group/Transpose", perm=[0, 1, 2, 4, 3])
        scores = g.op("MatMul", [q5, kt], f"{scope}/scores/MatMul")
        scaled = g.op("Mul", [scores, g.const("const_attn_scale", hd ** -0.5)], f"{scope}/scores/Mul")
        masked = g.op("Add", [scaled, mask], f"{scope}/scores/AddMask")
        probs = g.op("Softmax", [masked], f"{scope}/Softmax", axis=-1)
        ctx = g.op("MatMul", [probs, v5], f"{scope}/context/MatMul")   # [B, nkv, g, S, hd]
        ctx4 = g.op("Reshape", [ctx, g.const(f"const_shape_ctx_{s}", [0, nh, s, hd], np.int64)],
                    f"{scope}/context/Reshape")
        ctxt = g.op("Transpose", [ctx4], f"{scope}/context/Transpose", perm=[0, 2, 1, 3])
        flat = g.op("Reshape", [ctxt, g.const("const_shape_flat_attn", [0, 0, nh * hd], np.int64)],
                    f"{scope}/context/Flatten")
        normed = self.rms_norm(flat, f"{m}.attn_sub_norm.weight", f"{scope}/attn_sub_norm")
        return self.bitlinear(normed, f"{m}.o_proj")

    def mlp(self, x: str, i: int) -> str:
        g = self.g
        scope = f"/model/layers.{i}/mlp"
        m = f"model.layers.{i}.mlp"
        gate = self.bitlinear(x, f"{m}.gate_proj")
        up = self.bitlinear(x, f"{m}.up_proj")
        r = g.op("Relu", [gate], f"{scope}/act/Relu")
        r2 = g.op("Mul", [r, r], f"{scope}/act/Square")
        h = g.op("Mul", [r2, up], f"{scope}/Mul")
        normed = self.rms_norm(h, f"{m}.ffn_sub_norm.weight", f"{scope}/ffn_sub_norm")
        return self.bitlinear(normed, f"{m}.down_proj")

    def rows(self, name: str) -> Iterator[np.ndarray]:
        """Checkpoint tensor `name` [R, C] as float32, a block of rows at a time."""
        r, c = self.ckpt.shape(name)
        step = max(1, STREAM_ELEMENTS // c)
        for start in range(0, r, step):
            yield self.ckpt.read(name, slice(start, start + step))

    def transposed_rows(self, name: str) -> Iterator[np.ndarray]:
        """Checkpoint tensor `name` [R, C] transposed to [C, R] as float32, a block of rows at a time."""
        r, c = self.ckpt.shape(name)
        step = max(1, STREAM_ELEMENTS // r)
        for start in range(0, c, step):
            yield self.ckpt.read(name, (slice(None), slice(start, start + step))).T

    # -- the model --------------------------------------------------------------------------
    def build(self) -> onnx.ModelProto:
        g, c = self.g, self.c
        hd = c.head_dim
        if self.icraft:
            inputs = [helper.make_tensor_value_info(
                "inputs_embeds", TensorProto.FLOAT, [1, self.seq_len, c.hidden_size])]
            x = "inputs_embeds"
            cos_np, sin_np = rope_tables(hd, c.rope_theta, self.seq_len)
            cos = g.initializer("rope.cos", cos_np)
            sin = g.initializer("rope.sin", sin_np)
            mask = g.initializer("attention.causal_mask", causal_mask(self.seq_len))
        else:
            inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])]
            emb = g.streamed("model.embed_tokens.weight", np.float32, (c.vocab_size, c.hidden_size),
                             self.rows("model.embed_tokens.weight"))
            x = g.op("Gather", [emb, "input_ids"], "/model/embed_tokens/Gather", axis=0)
            shape = g.op("Shape", ["input_ids"], "/model/rotary/Shape")
            seq = g.op("Slice", [shape, g.const("const_1", [1], np.int64), g.const("const_2", [2], np.int64)],
                       "/model/rotary/SeqLen")
            zero = g.const("const_0", [0], np.int64)
            cos_np, sin_np = rope_tables(hd, c.rope_theta, c.max_position_embeddings)
            cos = g.op("Slice", [g.initializer("rope.cos", cos_np), zero, seq, zero], "/model/rotary/cos/Slice")
            sin = g.op("Slice", [g.initializer("rope.sin", sin_np), zero, seq, zero], "/model/rotary/sin/Slice")
            seq2 = g.op("Concat", [seq, seq], "/model/mask/Concat", axis=0)
            mask = g.op("Slice", [g.initializer("attention.causal_mask", causal_mask(c.max_position_embeddings)),
                                  g.const("const_00", [0, 0], np.int64), seq2,
                                  g.const("const_axes_01", [0, 1], np.int64)], "/model/mask/Slice")
        n = c.num_hidden_layers
        for i in range(n):
            scope = f"/model/layers.{i}"
            m = f"model.layers.{i}"
            h = self.rms_norm(x, f"{m}.input_layernorm.weight", f"{scope}/input_layernorm")
            a = self.attention(h, i, cos, sin, mask)
            x = g.op("Add", [x, a], f"{scope}/attn_residual/Add")
            h = self.rms_norm(x, f"{m}.post_attention_layernorm.weight", f"{scope}/post_attention_layernorm")
            d = self.mlp(h, i)
            x = g.op("Add", [x, d], f"{scope}/mlp_residual/Add")
            self.on_layer(i + 1, n)
        x = self.rms_norm(x, "model.norm.weight", "/model/norm")
        head_src = "model.embed_tokens.weight" if c.tie_word_embeddings else "lm_head.weight"
        if self.icraft:
            head = g.streamed("lm_head.weight", np.float32, (c.hidden_size, c.vocab_size),
                              self.transposed_rows(head_src),
                              doc=f"lm_head ({head_src}), transposed to [hidden, vocab]")
            logits = g.op("MatMul", [x, head], "/lm_head/MatMul")
            out_shape = [1, self.seq_len, c.vocab_size]
        else:
            if not c.tie_word_embeddings:
                g.streamed(head_src, np.float32, (c.vocab_size, c.hidden_size), self.rows(head_src))
            flat = g.op("Reshape", [x, g.const("const_shape_rows", [-1, c.hidden_size], np.int64)],
                        "/lm_head/Reshape")
            gemm = g.op("Gemm", [flat, head_src], "/lm_head/Gemm", transB=1)
            out = g.op("Concat", [shape, g.const("const_vocab", [c.vocab_size], np.int64)],
                       "/lm_head/OutShape", axis=0)
            logits = g.op("Reshape", [gemm, out], "/lm_head/Unflatten")
            out_shape = ["batch", "seq", c.vocab_size]
        assert g.nodes[-1].output[0] == logits
        g.nodes[-1].output[0] = "logits"  # name the graph output without an extra node
        outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, out_shape)]
        graph = helper.make_graph(g.nodes, "bitnet_b1.58", inputs, outputs, g.initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)],
                                  producer_name="tdpu", producer_version="0.1.0")
        model.ir_version = 8  # Icraft's tutorials ask for ir_version <= 8 (unconfirmed); ORT reads 8
        model.doc_string = (f"BitNet b1.58 ({self.profile} profile) exported by tdpu from "
                            f"{self.ckpt.path}")
        return model


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
            a = numpy_helper.to_array(t, base_dir=str(base_dir))
            if t.name.startswith("rope."):
                a = a[:seq_len]
            elif t.name == "attention.causal_mask":
                a = a[:seq_len, :seq_len]
            else:  # [0, nkv, groups, S, hd] and [0, nh, S, hd]
                a = a.copy()
                a[3 if "q5" in t.name else 2] = seq_len
            out.graph.initializer[i].CopyFrom(numpy_helper.from_array(np.ascontiguousarray(a), t.name))
    return out
