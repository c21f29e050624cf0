"""The patterns a projection matches, and the check of its weight values."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper

from tdpu_tui.engine.graph.external import tensor_array
from tdpu_tui.engine.graph.index import GraphIndex
from tdpu_tui.engine.graph.index import attr


@dataclass
class Projection:
    """A matched `M` with everything the replacement needs (the pattern step's output)."""

    node: onnx.NodeProto
    x: str                          # BitLinear input (before activation quantization)
    y: str                          # the tensor the replaced chain produced
    weight: str                     # initializer name
    weight_nk: bool                 # stored [N, K] (Transpose or Gemm transB=1) rather than [K, N]
    folded_scale: float = 1.0       # constant scalar rescale folded from after M
    act_quant: bool = False
    absorbed: list[onnx.NodeProto] = field(default_factory=list)  # replaced along with M



class NoMatch(Exception):
    """The node is not a replaceable projection; the message is the reason."""



def _close(value: float | None, target: float, rel: float = 1e-6) -> bool:
    return value is not None and abs(value - target) <= rel * max(1.0, abs(target))



def _match_act_quant(g: GraphIndex, a: str) -> tuple[str, str, list[onnx.NodeProto]] | None:
    """(x, s, nodes) if `a` is §4's in-graph quantization of x; None if `a` is a plain tensor.

    Raises NoMatch when `a` looks quantized (Clip/Round) but differs from §4.
    """
    clip = g.producer.get(a)
    if clip is None or clip.op_type not in ("Clip", "Round"):
        return None
    if clip.op_type != "Clip":
        raise NoMatch("activation quantization differs from §4: Round without Clip(-128, 127)")
    lo = g.scalar(clip.input[1]) if len(clip.input) > 1 and clip.input[1] else None
    hi = g.scalar(clip.input[2]) if len(clip.input) > 2 and clip.input[2] else None
    if not (_close(lo, -128.0) and _close(hi, 127.0)):
        raise NoMatch(f"activation quantization differs from §4: Clip({lo}, {hi}), expected Clip(-128, 127)")
    rnd = g.producer.get(clip.input[0])
    if rnd is None or rnd.op_type != "Round":
        raise NoMatch("activation quantization differs from §4: Clip without Round")
    mul = g.producer.get(rnd.input[0])
    if mul is None or mul.op_type != "Mul":
        raise NoMatch("activation quantization differs from §4: Round of something other than x·s")
    for x, s in ((mul.input[0], mul.input[1]), (mul.input[1], mul.input[0])):
        div = g.producer.get(s)
        if div is None or div.op_type != "Div" or not _close(g.scalar(div.input[0]), 127.0):
            continue
        mx = g.producer.get(div.input[1])
        if mx is None or mx.op_type != "Max" or len(mx.input) != 2:
            continue
        eps_in = [i for i in mx.input if g.scalar(i) is not None]
        if len(eps_in) != 1 or not _close(g.scalar(eps_in[0]), 1e-5, 1e-3):
            raise NoMatch("activation quantization differs from §4: scale clamp is not max(·, 1e-5)")
        red = g.producer.get(next(i for i in mx.input if i != eps_in[0]))
        if red is None or red.op_type != "ReduceMax":
            continue
        axes = attr(red, "axes")
        if axes is None and len(red.input) > 1 and red.input[1]:
            axes_t = g.inits.get(red.input[1]) or g.constants.get(red.input[1])
            axes = tensor_array(axes_t, g.base_dir).tolist() if axes_t is not None else None
        if attr(red, "keepdims", 1) != 1 or list(axes or []) != [-1]:
            raise NoMatch("activation quantization differs from §4: ReduceMax is not over the last axis with keepdims")
        ab = g.producer.get(red.input[0])
        if ab is None or ab.op_type != "Abs" or ab.input[0] != x:
            continue
        return x, s, [clip, rnd, mul, div, mx, red, ab]
    raise NoMatch("activation quantization differs from §4: scale is not 127 / max(max|x|, 1e-5) of the same x")



def match_projection(g: GraphIndex, node: onnx.NodeProto) -> Projection:
    """The pattern step: raise NoMatch(reason) unless `node` is x·Wᵀ with a constant 2-D weight."""
    if node.op_type == "Gemm":
        if len(node.input) > 2 and node.input[2]:
            raise NoMatch("Gemm with bias")
        if attr(node, "transA", 0) or not _close(attr(node, "alpha", 1.0), 1.0):
            raise NoMatch("Gemm with transA or alpha ≠ 1")
    a, b = node.input[0], node.input[1]
    transpose = None
    if b in g.inits:
        weight = b
        weight_nk = node.op_type == "Gemm" and bool(attr(node, "transB", 0))
    elif (p := g.producer.get(b)) is not None and p.op_type == "Transpose" and p.input[0] in g.inits:
        if node.op_type == "Gemm" and attr(node, "transB", 0):
            raise NoMatch("Gemm with transB of a transposed weight")
        if list(attr(p, "perm", [1, 0])) != [1, 0]:
            raise NoMatch(f"weight transposed with perm {list(attr(p, 'perm'))}")
        if g.sole_consumer(b) is not node:
            raise NoMatch(f"transposed weight {b!r} has other consumers")
        weight, weight_nk, transpose = p.input[0], True, p
    elif a in g.inits or (a in g.constants):
        raise NoMatch("constant on the left (weight × activation)")
    else:
        raise NoMatch("activation × activation")
    t = g.inits[weight]
    if len(t.dims) != 2:
        raise NoMatch(f"weight {weight!r} is {len(t.dims)}-D {list(t.dims)}")
    if t.data_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16,
                           onnx.TensorProto.DOUBLE):
        raise NoMatch(f"weight {weight!r} is {helper.tensor_dtype_to_string(t.data_type)}, not float")
    own = {node.name} | ({transpose.name} if transpose is not None else set())
    others = [c for c in g.consumers.get(weight, []) if c.name not in own]
    if others:
        if any(c.op_type == "Gather" for c in others):
            raise NoMatch("tied embedding")
        raise NoMatch(f"weight shared with {others[0].name or others[0].op_type}")

    proj = Projection(node=node, x=a, y=node.output[0], weight=weight, weight_nk=weight_nk)
    if transpose is not None:
        proj.absorbed.append(transpose)
    quant = _match_act_quant(g, a)
    if quant is not None:
        x, s, _nodes = quant
        div = g.sole_consumer(node.output[0])
        if div is None or div.op_type != "Div" or div.input[0] != node.output[0] or div.input[1] != s:
            raise NoMatch("quantized MatMul is not followed by Div(·, s) with its activation scale")
        proj.x, proj.y, proj.act_quant = x, div.output[0], True
        proj.absorbed.append(div)
    rescale = g.sole_consumer(proj.y)
    if rescale is not None and rescale.op_type in ("Mul", "Div"):
        other = [i for i in rescale.input if i != proj.y]
        value = g.scalar(other[0]) if len(other) == 1 else None
        if value is not None and (rescale.op_type == "Mul" or rescale.input[0] == proj.y) and value != 0:
            proj.folded_scale = value if rescale.op_type == "Mul" else 1.0 / value
            proj.y = rescale.output[0]
            proj.absorbed.append(rescale)
    return proj



def classify_values(arr: np.ndarray) -> tuple[str, float | None, float | None]:
    """(status, zero share, s) of a weight, scanning it in chunks (a memmap stays on disk)."""
    flat = arr.reshape(-1)
    total = flat.size
    s: float | None = None
    zeros = 0
    for start in range(0, total, CHUNK_ELEMENTS):
        chunk = np.asarray(flat[start:start + CHUNK_ELEMENTS], dtype=np.float32)
        # ternary: every |value| is 0 or s (a NaN or inf is neither: s must be finite)
        a = np.abs(chunk)
        z = int(np.count_nonzero(a == 0))
        zeros += z
        if z == a.size:
            continue
        if s is None:
            s = float(a[np.flatnonzero(a)[0]])
        if not math.isfinite(s) or z + int(np.count_nonzero(a == s)) != a.size:
            if total <= DISTINCT_FULL_LIMIT:
                distinct = np.unique(np.asarray(flat, dtype=np.float32)).size
                return f"float weights: {distinct} distinct values", None, None
            distinct = np.unique(chunk).size
            return (f"float weights: {distinct} distinct values in the first "
                    f"{min(total, start + CHUNK_ELEMENTS)} of {total}"), None, None
    return TERNARY, zeros / max(total, 1), (s if s is not None else 1.0)



PERMUTATION = "signed permutation (a constant like RoPE's rotate_half), not a projection"



def _is_signed_permutation(g: GraphIndex, weight: str | None) -> bool:
    """A square {-1, 0, 1} matrix with one non-zero per row and column (cheap on projections:
    it is decided by the first row that has more than one non-zero)."""
    if weight not in g.inits or len(g.inits[weight].dims) != 2:
        return False
    rows, cols = g.inits[weight].dims
    if rows != cols or rows == 0:
        return False
    a = g.array(weight)
    seen = np.zeros(cols, dtype=bool)
    for start in range(0, rows, 256):
        block = np.asarray(a[start:start + 256], dtype=np.float32)
        nz = block != 0
        if not (nz.sum(axis=1) == 1).all() or not np.isin(block[nz], (-1.0, 1.0)).all():
            return False
        seen |= nz.any(axis=0)
    return bool(seen.all())


TERNARY = "ternary"



# Elements scanned at once when classifying a weight (16 MiB of float32).
CHUNK_ELEMENTS = 1 << 22



# Above this many elements the distinct-value count of a float weight covers only the first chunk.
DISTINCT_FULL_LIMIT = 1 << 24
