"""Small hand-built graphs in the exported form of docs/CONTRACTS.md, for the replacement tests.

They follow the exporter's node names, initializer names and patterns (reference profile with
in-graph activation quantization, icraft profile with `MatMul · weight_scale`), but the layer
is simplified (no norms, no RoPE): the pass only cares about the projections around it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

PROJECTIONS = (("self_attn", "q_proj"), ("self_attn", "k_proj"), ("self_attn", "v_proj"),
               ("self_attn", "o_proj"), ("mlp", "gate_proj"), ("mlp", "up_proj"), ("mlp", "down_proj"))


class Builder:
    def __init__(self, rng: np.random.Generator):
        self.rng = rng
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._consts: dict[float, str] = {}

    def init(self, name: str, value: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def const(self, value: float) -> str:
        if value not in self._consts:
            self._consts[value] = self.init(f"const_{len(self._consts)}", np.array(value, np.float32))
        return self._consts[value]

    def node(self, op: str, inputs: list[str], name: str, **attrs) -> str:
        out = f"{name}_output_0"
        self.nodes.append(helper.make_node(op, inputs, [out], name=name, **attrs))
        return out

    def ternary(self, n: int, k: int) -> np.ndarray:
        return self.rng.choice(np.array([-1, 0, 1], np.int8), size=(n, k), p=[0.3, 0.4, 0.3])

    def projection(self, x: str, prefix: str, module: str, n: int, k: int, profile: str,
                   form: str = "scale_mul") -> str:
        """One projection in the exporter's form; `form` varies how the weight is stored."""
        w = self.ternary(n, k).astype(np.float32)
        ws = np.float32(self.rng.uniform(0.5, 2.0))
        a = x
        if profile == "reference":
            ab = self.node("Abs", [x], f"{prefix}/act_quant/Abs")
            mx = self.node("ReduceMax", [ab], f"{prefix}/act_quant/ReduceMax", axes=[-1], keepdims=1)
            mx = self.node("Max", [mx, self.const(1e-5)], f"{prefix}/act_quant/Max")
            s = self.node("Div", [self.const(127.0), mx], f"{prefix}/act_quant/Div")
            m = self.node("Mul", [x, s], f"{prefix}/act_quant/Mul")
            r = self.node("Round", [m], f"{prefix}/act_quant/Round")
            a = self.node("Clip", [r, self.const(-128.0), self.const(127.0)], f"{prefix}/act_quant/Clip")
        if form == "transpose":
            wt = self.init(f"{module}.weight", w)                     # stored [N, K]
            b = self.node("Transpose", [wt], f"{prefix}/Transpose", perm=[1, 0])
        elif form == "values":
            b = self.init(f"{module}.weight", (w * ws).T.copy())      # {-s, 0, +s}, no Mul
        else:
            b = self.init(f"{module}.weight", w.T.copy())             # [K, N]
        y = self.node("MatMul", [a, b], f"{prefix}/MatMul")
        if profile == "reference":
            y = self.node("Div", [y, s], f"{prefix}/Div")
        if form != "values":
            y = self.node("Mul", [y, self.init(f"{module}.weight_scale", np.array([ws], np.float32))],
                          f"{prefix}/Mul")
        return y


def build(profile: str = "reference", layers: int = 2, hidden: int = 32, inter: int = 48,
          vocab: int = 64, form: str = "scale_mul", seed: int = 0, seq_len: int = 8) -> onnx.ModelProto:
    b = Builder(np.random.default_rng(seed))
    embed = (b.rng.standard_normal((vocab, hidden)) * 0.5).astype(np.float32)
    if profile == "reference":
        inp = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])
        b.init("model.embed_tokens.weight", embed)
        h = b.node("Gather", ["model.embed_tokens.weight", "input_ids"], "/model/embed_tokens/Gather")
        out_shape = ["batch", "seq", vocab]
    else:
        inp = helper.make_tensor_value_info("inputs_embeds", TensorProto.FLOAT, [1, seq_len, hidden])
        h = "inputs_embeds"
        out_shape = [1, seq_len, vocab]
    for i in range(layers):
        L = f"/model/layers.{i}"
        M = f"model.layers.{i}"
        q = b.projection(h, f"{L}/self_attn/q_proj", f"{M}.self_attn.q_proj", hidden, hidden, profile, form)
        k = b.projection(h, f"{L}/self_attn/k_proj", f"{M}.self_attn.k_proj", hidden, hidden, profile, form)
        v = b.projection(h, f"{L}/self_attn/v_proj", f"{M}.self_attn.v_proj", hidden, hidden, profile, form)
        kt = b.node("Transpose", [k], f"{L}/self_attn/Transpose", perm=[0, 2, 1])
        sc = b.node("MatMul", [q, kt], f"{L}/self_attn/MatMul")
        sc = b.node("Mul", [sc, b.const(float(hidden) ** -0.5)], f"{L}/self_attn/Mul")
        p = b.node("Softmax", [sc], f"{L}/self_attn/Softmax", axis=-1)
        att = b.node("MatMul", [p, v], f"{L}/self_attn/MatMul_1")
        o = b.projection(att, f"{L}/self_attn/o_proj", f"{M}.self_attn.o_proj", hidden, hidden, profile, form)
        h = b.node("Add", [h, o], f"{L}/Add")
        # A norm keeps the residual stream bounded across layers, as in the real model.
        h = b.node("LayerNormalization", [h, b.init(f"{M}.ln", np.ones(hidden, np.float32))],
                   f"{L}/LayerNormalization", axis=-1)
        g = b.projection(h, f"{L}/mlp/gate_proj", f"{M}.mlp.gate_proj", inter, hidden, profile, form)
        u = b.projection(h, f"{L}/mlp/up_proj", f"{M}.mlp.up_proj", inter, hidden, profile, form)
        g = b.node("Relu", [g], f"{L}/mlp/Relu")
        g = b.node("Mul", [g, g], f"{L}/mlp/Mul")
        m = b.node("Mul", [g, u], f"{L}/mlp/Mul_1")
        d = b.projection(m, f"{L}/mlp/down_proj", f"{M}.mlp.down_proj", hidden, inter, profile, form)
        h = b.node("Add", [h, d], f"{L}/Add_1")
        h = b.node("LayerNormalization", [h, b.init(f"{M}.ln2", np.ones(hidden, np.float32))],
                   f"{L}/LayerNormalization_1", axis=-1)
    if profile == "reference":
        h2 = b.node("Reshape", [h, b.init("shape_2d", np.array([-1, hidden], np.int64))], "/lm_head/Reshape")
        lg = b.node("Gemm", [h2, "model.embed_tokens.weight"], "/lm_head/Gemm", transB=1)
        sh = b.node("Shape", ["input_ids"], "/lm_head/Shape")
        sh = b.node("Concat", [sh, b.init("vocab_dim", np.array([vocab], np.int64))], "/lm_head/Concat", axis=0)
        b.nodes.append(helper.make_node("Reshape", [lg, sh], ["logits"], name="/lm_head/Reshape_1"))
    else:
        b.init("lm_head.weight", embed.T.copy())
        b.nodes.append(helper.make_node("MatMul", [h, "lm_head.weight"], ["logits"], name="/lm_head/MatMul"))
    out = helper.make_tensor_value_info("logits", TensorProto.FLOAT, out_shape)
    graph = helper.make_graph(b.nodes, "bitnet", [inp], [out], initializer=b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="tests")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def save(model: onnx.ModelProto, path: Path) -> Path:
    """Save with external data, as the exporter does."""
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
              location=path.name + ".data", size_threshold=256)
    return path
