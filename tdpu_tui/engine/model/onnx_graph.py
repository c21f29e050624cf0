"""The BitNet b1.58 graph, built node by node from the checkpoint (both export profiles)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import onnx
from onnx import TensorProto, helper

from tdpu_tui.engine.graph.builder import GraphBuilder, transposed
from tdpu_tui.engine.graph.external import ExternalData
from tdpu_tui.engine.model.checkpoint import Checkpoint


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
            f"{module}.weight", transposed(w),
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
            yield transposed(self.ckpt.read(name, (slice(None), slice(start, start + step))))

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
