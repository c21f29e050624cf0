"""Every MatMul/Gemm of an exported graph: what it computes, and whether it can become BitLinear.

The app's node browser, `tdpu --batch --stage replace` and the replacement pass read the graph
through this module. The graph is loaded without its external data; each weight is read from
the `.onnx.data` file on demand through a memory map and scanned in chunks, so listing a
2B-parameter graph never holds more than one chunk of one weight in memory.

Patterns recognised around a node `M = MatMul(A, B)` (CONTRACTS.md "Export"):

- weight `B`: an initializer `[K, N]`; or `Transpose(perm=[1, 0])` of an initializer `[N, K]`;
  or, for `Gemm(A, B, transB=1)`, an initializer `[N, K]`.
- activation `A`: the reference profile's in-graph quantization
  `s = Div(127, Max(ReduceMax(Abs(x)), 1e-5))`, `A = Clip(Round(Mul(x, s)), -128, 127)`, with
  `M` followed by `Div(., s)`; or any float tensor (icraft profile).
- rescale: one `Mul` (or `Div`) by a constant scalar after `M` (after the `Div(., s)` when
  activations are quantized) is folded into the weight scale.
- values: the weight holds {-s, 0, +s}; s = 1 with a folded `Mul(., weight_scale)` is the
  exporter's form.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from tdpu_tui.engine.core.errors import TdpuError
from tdpu_tui.engine.osutil.files import atomic_write_text

TERNARY = "ternary"
ALREADY = "already BitLinear"
BITLINEAR_DOMAIN = "ai.tdpu"
# Elements scanned at once when classifying a weight (16 MiB of float32).
CHUNK_ELEMENTS = 1 << 22
# Above this many elements the distinct-value count of a float weight covers only the first chunk.
DISTINCT_FULL_LIMIT = 1 << 24


class InventoryError(TdpuError):
    """The graph cannot be read, or a selection is impossible (names the node or file)."""


@dataclass
class MatMulNode:
    name: str
    op_type: str
    layer: int | None
    projection: str | None
    k: int | None
    n: int | None
    weight: str | None
    status: str
    zeros: float | None = None      # share of zero weights (ternary nodes)
    scale: float | None = None      # effective weight scale (multiply convention)
    module: str | None = None       # checkpoint module path, e.g. model.layers.0.self_attn.q_proj
    act_quant: bool = False         # the reference profile's in-graph activation quantization
    layout: str | None = None       # only for nodes that already are BitLinear

    @property
    def ternary(self) -> bool:
        return self.status == TERNARY

    def as_json(self) -> dict:
        return asdict(self)


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


class GraphIndex:
    """Producers, consumers, initializers and constants of one graph (weights not loaded)."""

    def __init__(self, model: onnx.ModelProto, base_dir: Path):
        self.model = model
        self.graph = model.graph
        self.base_dir = base_dir
        self.inits = {t.name: t for t in self.graph.initializer}
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        self.constants: dict[str, onnx.TensorProto] = {}
        for node in self.graph.node:
            for o in node.output:
                self.producer[o] = node
            for i in node.input:
                if i:
                    self.consumers.setdefault(i, []).append(node)
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
                for a in node.attribute:
                    if a.name == "value":
                        self.constants[node.output[0]] = a.t
        self.graph_outputs = {o.name for o in self.graph.output}

    @classmethod
    def load(cls, path: str | Path) -> GraphIndex:
        path = Path(path)
        try:
            model = onnx.load(str(path), load_external_data=False)
        except FileNotFoundError:
            raise InventoryError(f"{path}: graph not found (run the export stage first)") from None
        except Exception as exc:
            raise InventoryError(f"{path}: not a readable ONNX model: {exc}") from None
        return cls(model, path.parent)

    def array(self, name: str) -> np.ndarray:
        """The initializer's values: a read-only memory map for external data, else in memory."""
        return tensor_array(self.inits[name], self.base_dir)

    def scalar(self, name: str) -> float | None:
        """The value of a constant scalar (initializer or Constant node), else None."""
        t = self.inits.get(name) or self.constants.get(name)
        if t is None:
            return None
        if int(np.prod(t.dims, dtype=np.int64)) != 1:
            return None
        return float(np.asarray(tensor_array(t, self.base_dir)).reshape(-1)[0])

    def sole_consumer(self, tensor: str) -> onnx.NodeProto | None:
        users = self.consumers.get(tensor, [])
        if len(users) != 1 or tensor in self.graph_outputs:
            return None
        return users[0]


def tensor_array(t: onnx.TensorProto, base_dir: Path) -> np.ndarray:
    """An initializer's values: a read-only memory map for external data, else in memory.

    This is the one reader of external data for inventory, replace and validate.
    """
    dtype = np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type))
    shape = tuple(int(d) for d in t.dims)
    if t.data_location == onnx.TensorProto.EXTERNAL:
        info = {e.key: e.value for e in t.external_data}
        if "location" not in info:
            raise InventoryError(f"tensor {t.name!r}: external data without a 'location'")
        path = base_dir / info["location"]
        offset = int(info.get("offset", 0))
        count = int(np.prod(shape, dtype=np.int64))
        if "length" in info and int(info["length"]) != count * dtype.itemsize:
            raise InventoryError(f"{path}: tensor {t.name!r} {dtype} {list(shape)} needs "
                                 f"{count * dtype.itemsize} bytes, its external data gives length {info['length']}")
        if count == 0:
            return np.zeros(shape, dtype)
        try:
            flat = np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=(count,))
        except (OSError, ValueError) as exc:
            raise InventoryError(f"{path}: cannot read tensor {t.name!r} at offset {offset}: {exc}") from None
        return flat.reshape(shape)
    return numpy_helper.to_array(t)


def tensor_bytes(t: onnx.TensorProto, base_dir: Path) -> np.ndarray:
    """The tensor's stored little-endian bytes, flat uint8 (memory-mapped when external)."""
    return np.ascontiguousarray(tensor_array(t, base_dir)).reshape(-1).view(np.uint8)


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _str_attr(node: onnx.NodeProto, name: str, default: str) -> str:
    value = _attr(node, name, default)
    return value.decode() if isinstance(value, bytes) else value


def bitlinear_attrs(node: onnx.NodeProto) -> tuple[int, int, str]:
    """(in_features K, out_features N, layout) of a BitLinear node; layout defaults to tdpu."""
    k, n = _attr(node, "in_features"), _attr(node, "out_features")
    if k is None or n is None:
        raise InventoryError(f"BitLinear node {node.name!r}: missing in_features or out_features")
    return int(k), int(n), _str_attr(node, "layout", "tdpu")


def _parse_module(node_name: str, weight: str | None) -> tuple[int | None, str | None, str | None]:
    if weight and weight.endswith(".weight") and ".layers." in weight:
        module = weight[: -len(".weight")]
    else:
        parts = [p for p in node_name.split("/") if p]
        module = ".".join(parts[:-1]) if len(parts) > 1 else None
    text = f"{node_name} {weight or ''}"
    layer = re.search(r"layers\.(\d+)", text)
    proj = re.search(r"\b(\w+_proj|lm_head)\b", text.replace("/", " ").replace(".", " "))
    return (int(layer.group(1)) if layer else None, proj.group(1) if proj else None, module)


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
        axes = _attr(red, "axes")
        if axes is None and len(red.input) > 1 and red.input[1]:
            axes_t = g.inits.get(red.input[1]) or g.constants.get(red.input[1])
            axes = tensor_array(axes_t, g.base_dir).tolist() if axes_t is not None else None
        if _attr(red, "keepdims", 1) != 1 or list(axes or []) != [-1]:
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
        if _attr(node, "transA", 0) or not _close(_attr(node, "alpha", 1.0), 1.0):
            raise NoMatch("Gemm with transA or alpha ≠ 1")
    a, b = node.input[0], node.input[1]
    transpose = None
    if b in g.inits:
        weight = b
        weight_nk = node.op_type == "Gemm" and bool(_attr(node, "transB", 0))
    elif (p := g.producer.get(b)) is not None and p.op_type == "Transpose" and p.input[0] in g.inits:
        if node.op_type == "Gemm" and _attr(node, "transB", 0):
            raise NoMatch("Gemm with transB of a transposed weight")
        if list(_attr(p, "perm", [1, 0])) != [1, 0]:
            raise NoMatch(f"weight transposed with perm {list(_attr(p, 'perm'))}")
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
        nz = np.abs(chunk[chunk != 0])
        zeros += chunk.size - nz.size
        if nz.size == 0:
            continue
        if s is None:
            s = float(nz[0])
        if not np.all(nz == s) or not np.all(np.isfinite(chunk)):
            if total <= DISTINCT_FULL_LIMIT:
                distinct = np.unique(np.asarray(flat, dtype=np.float32)).size
                return f"float weights: {distinct} distinct values", None, None
            distinct = np.unique(chunk).size
            return (f"float weights: {distinct} distinct values in the first "
                    f"{min(total, start + CHUNK_ELEMENTS)} of {total}"), None, None
    return TERNARY, zeros / max(total, 1), (s if s is not None else 1.0)


def _bitlinear_entry(g: GraphIndex, node: onnx.NodeProto) -> MatMulNode:
    weight = node.input[1] if len(node.input) > 1 else None
    scale = g.scalar(node.input[2]) if len(node.input) > 2 else None
    layer, proj, module = _parse_module(node.name, weight)
    zeros = None
    if weight in g.inits:
        from kernels.packing import codes_of
        codes = codes_of(np.asarray(g.array(weight)))
        zeros = float((codes == 1).mean())
    return MatMulNode(node.name, node.op_type, layer, proj, _attr(node, "in_features"),
                      _attr(node, "out_features"), weight, ALREADY, zeros, scale, module,
                      layout=_str_attr(node, "layout", "tdpu"))


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


def free_name(preferred: str, taken: set[str], suffix: str = "") -> str:
    """`preferred`, else `preferred + suffix`, `preferred + suffix + "2"`, … : the first name not
    in `taken` (for tensors a graph rewrite adds)."""
    name, i = preferred, 1
    while name in taken:
        name, i = f"{preferred}{suffix}{'' if i == 1 else i}", i + 1
    return name


def candidate_nodes(g: GraphIndex) -> Iterator[onnx.NodeProto]:
    """The nodes `iter_nodes` reports, in the same order: MatMul, Gemm and BitLinear."""
    for node in g.graph.node:
        if node.op_type == "BitLinear" and node.domain == BITLINEAR_DOMAIN:
            yield node
        elif node.op_type in ("MatMul", "Gemm") and node.domain in ("", "ai.onnx"):
            yield node


def iter_nodes(g: GraphIndex) -> Iterator[tuple[MatMulNode, Projection | None]]:
    """Every MatMul/Gemm/BitLinear in graph order with its match (None when not replaceable)."""
    for node in candidate_nodes(g):
        if node.op_type == "BitLinear":
            yield _bitlinear_entry(g, node), None
            continue
        try:
            proj = match_projection(g, node)
        except NoMatch as why:
            weight = node.input[1] if node.input[1] in g.inits else None
            layer, pname, module = _parse_module(node.name, weight)
            status = PERMUTATION if _is_signed_permutation(g, weight) else str(why)
            yield MatMulNode(node.name, node.op_type, layer, pname, None, None, weight, status,
                             module=module), None
            continue
        t = g.inits[proj.weight]
        n, k = (t.dims[0], t.dims[1]) if proj.weight_nk else (t.dims[1], t.dims[0])
        status, zeros, s = classify_values(g.array(proj.weight))
        if status == TERNARY and zeros == 1 - 1 / n and _is_signed_permutation(g, proj.weight):
            status = PERMUTATION
        if status == TERNARY and n % 4:
            status = f"N = {n} is not a multiple of 4 (packing needs four rows per byte)"
        layer, pname, module = _parse_module(node.name, proj.weight)
        scale = s * proj.folded_scale if s is not None else None
        entry = MatMulNode(node.name, node.op_type, layer, pname, int(k), int(n), proj.weight, status,
                           zeros, scale, module, proj.act_quant)
        yield entry, (proj if status == TERNARY else None)


_CACHE: dict[tuple, list[MatMulNode]] = {}


def _stamp(path: Path) -> tuple:
    files = [path, path.with_name(path.name + ".data")]
    return tuple((str(f.resolve()), f.stat().st_mtime_ns, f.stat().st_size) for f in files if f.exists())


def inventory(model_path: str | Path) -> list[MatMulNode]:
    """Every MatMul/Gemm (and BitLinear) node of the graph, with its replaceability.

    Scanning the weights of a 2B graph reads gigabytes, so the answer is remembered for as
    long as the graph and its data file are unchanged (size and modification time).
    """
    path = Path(model_path)
    try:
        key = _stamp(path)
    except OSError:
        key = None
    if key and key in _CACHE:
        return [dataclasses.replace(n) for n in _CACHE[key]]
    nodes = [entry for entry, _ in iter_nodes(GraphIndex.load(path))]
    if key:
        _CACHE.clear()
        _CACHE[key] = nodes
    return [dataclasses.replace(n) for n in nodes]


# Selection -------------------------------------------------------------------------------


def load_selection(path: str | Path) -> dict[str, bool]:
    """The app's per-node overrides (node name -> selected); {} when the file does not exist."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InventoryError(f"{path}: not a readable selection file: {exc}") from None
    if isinstance(data, dict) and "nodes" in data and isinstance(data["nodes"], dict):
        data = data["nodes"]
    if not isinstance(data, dict) or not all(isinstance(v, bool) for v in data.values()):
        raise InventoryError(f"{path}: expected a JSON object of node name -> true/false")
    return {str(k): v for k, v in data.items()}


def save_selection(path: str | Path, mapping: Mapping[str, bool]) -> None:
    clean = {str(k): bool(v) for k, v in mapping.items()}
    atomic_write_text(path, json.dumps(clean, indent=2, ensure_ascii=False, sort_keys=True) + "\n")


def glob_reason(name: str, include: list[str], exclude: list[str]) -> tuple[bool, str]:
    hit = next((p for p in include if fnmatch.fnmatchcase(name, p)), None)
    if hit is None:
        return False, f"not selected: matches no [replace].include glob {include}"
    ex = next((p for p in exclude if fnmatch.fnmatchcase(name, p)), None)
    if ex is not None:
        return False, f"not selected: excluded by [replace].exclude {ex!r}"
    return True, f"selected by [replace].include {hit!r}"


def resolve_selection(nodes: list[MatMulNode], cfg, overrides: Mapping[str, bool] | None = None
                      ) -> dict[str, bool]:
    """Node name -> replace it? Globs from `[replace]`, then the per-node overrides.

    A non-ternary node picked by a glob is simply kept (its reason is reported); picking one
    explicitly in the overrides is an error naming the node and why it cannot be replaced.
    """
    rc = cfg.replace if hasattr(cfg, "replace") else cfg
    overrides = dict(overrides or {})
    out: dict[str, bool] = {}
    for node in nodes:
        if node.status == ALREADY:
            out[node.name] = False
            continue
        if node.name in overrides:
            want = overrides[node.name]
            if want and not node.ternary:
                raise InventoryError(
                    f"node {node.name!r} is selected for replacement but is not ternary: {node.status}")
            out[node.name] = want
            continue
        selected, _ = glob_reason(node.name, rc.include, rc.exclude)
        out[node.name] = selected and node.ternary
    return out


def selection_reason(node: MatMulNode, cfg, overrides: Mapping[str, bool] | None) -> str:
    """Why `resolve_selection` decided as it did for one node (for the per-node report)."""
    rc = cfg.replace if hasattr(cfg, "replace") else cfg
    if node.status == ALREADY:
        return ALREADY
    if overrides and node.name in overrides:
        return "selected in the selection file" if overrides[node.name] else "deselected in the selection file"
    selected, why = glob_reason(node.name, rc.include, rc.exclude)
    if selected and not node.ternary:
        return node.status
    return why
