"""The graph rewrite of `create_session`: check every BitLinear / LinearBF16 node and move its
W into the registry, the node becoming `BitLinearBound(X, key)` (a constant weight_scale: the
node's whole description under its key), `BitLinearPrepacked(X, key, weight_scale)` (a scale fed
at run time) or `LinearBF16Prepacked(X, key)`.

Then bound nodes that read the same X are fused (`_fuse_shared_inputs`): a decoder layer's
q, k and v projections read one normalized hidden state, gate and up another. Each group
becomes one `BitLinearBound` over the group's weights stacked in the tdpu layout, then a
`Split` into the nodes' outputs. Where the nodes' weight_scales differ, the kernel runs with
scale 1 and the operator multiplies each output column by its own node's scale (float32), inside
the operator rather than as graph `Mul` nodes, which ONNX Runtime's optimizer would fold into a
following MatMul's alpha (a different rounding). `float32(acc) / s * 1` is exact, so every output
is bit-identical to the unfused graph's; what changes is one bridge crossing and one kernel call
per group instead of one per node.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from kernels import packing
from kernels.bitlinear import check_packed
from kernels.ort.ops import (
    BF16_OP_TYPE,
    BF16_PREPACKED_OP_TYPE,
    BOUND_OP_TYPE,
    DOMAIN,
    KEY_SUFFIX,
    OP_TYPE,
    PREPACKED_OP_TYPE,
    BitLinearError,
)
from kernels.ort.registry import _acquire, _bind, _bound, _entries, _release

_DTYPE_NAMES = {v: k for k, v in TensorProto.DataType.items()}


def _attr(node: onnx.NodeProto, name: str, kind: str, where: str):
    for a in node.attribute:
        if a.name == name:
            if kind == "int" and a.type == onnx.AttributeProto.INT:
                return int(a.i)
            if kind == "string" and a.type == onnx.AttributeProto.STRING:
                return a.s.decode()
            raise BitLinearError(f"{where}: attribute {name!r} must be {kind}, found "
                                 f"{onnx.AttributeProto.AttributeType.Name(a.type)}")
    raise BitLinearError(f"{where}: missing attribute {name!r} ({kind})")


def _static_last_dims(graph: onnx.GraphProto) -> dict[str, int]:
    dims: dict[str, int] = {}
    for vi in list(graph.input) + list(graph.value_info):
        if vi.type.HasField("tensor_type"):
            shape = vi.type.tensor_type.shape.dim
            if shape and shape[-1].HasField("dim_value"):
                dims[vi.name] = int(shape[-1].dim_value)
    return dims


def _rewrite_bf16(node: onnx.NodeProto, index: int, inits: dict, last_dims: dict,
                  base_dir: str | None, keys: list[int], graph: onnx.GraphProto) -> str:
    """Check one LinearBF16 node and move its W into the registry; return W's name if moved."""
    where = f"LinearBF16 node {node.name or f'#{index}'!r}"
    k = _attr(node, "in_features", "int", where)
    n = _attr(node, "out_features", "int", where)
    if len(node.input) != 2:
        raise BitLinearError(f"{where}: expected 2 inputs (X, W), found {len(node.input)}")
    x_name, w_name = node.input
    last = last_dims.get(x_name)
    if last is not None and last != k:
        raise BitLinearError(f"{where}: X {x_name!r} has last dimension {last}, in_features is {k}")
    w_init = inits.get(w_name)
    if w_init is None:
        raise BitLinearError(f"{where}: W {w_name!r} must be an initializer (a bfloat16 weight "
                             "cannot be passed through the Python operator bridge)")
    if w_init.data_type != TensorProto.BFLOAT16:
        raise BitLinearError(f"{where}: W {w_name!r} is {_DTYPE_NAMES.get(w_init.data_type)}, "
                             "expected BFLOAT16")
    if tuple(w_init.dims) != (n, k):
        raise BitLinearError(f"{where}: W {w_name!r} has shape {list(w_init.dims)}, expected "
                             f"[out_features, in_features] = [{n}, {k}]")
    w = np.ascontiguousarray(numpy_helper.to_array(w_init, base_dir or "")).view(np.uint16)
    key = _acquire(w)
    keys.append(key)
    _use_key(graph, node, index, w_name, key, BF16_PREPACKED_OP_TYPE)
    return w_name


def _use_key(graph: onnx.GraphProto, node: onnx.NodeProto, index: int, w_name: str, key: int,
             op_type: str) -> None:
    """Point `node` at registry entry `key` instead of initializer `w_name`."""
    key_name = f"{w_name}{KEY_SUFFIX}/{index}"
    graph.initializer.append(numpy_helper.from_array(np.array([key], np.int64), key_name))
    node.op_type = op_type
    node.input[1] = key_name
    node.attribute.append(onnx.helper.make_attribute("node_name", node.name or f"#{index}"))


def _constant_scale(init: onnx.TensorProto | None, base_dir: str | None, where: str) -> float | None:
    """The value of a one-element float weight_scale initializer, else None (fed per call).
    An initializer also listed as a graph input is a default the caller may feed: not constant."""
    if init is None or init.data_type != TensorProto.FLOAT:
        return None
    try:
        value = numpy_helper.to_array(init, base_dir or "")
    except Exception as exc:  # noqa: BLE001  (external data missing or unreadable: any error)
        raise BitLinearError(f"{where}: weight_scale {init.name!r} cannot be read: {exc}") from None
    return float(value.reshape(-1)[0]) if value.size == 1 else None


def _bind_node(graph: onnx.GraphProto, node: onnx.NodeProto, index: int, w_name: str, key: int) -> None:
    """`node` becomes `BitLinearBound(X, key)`: everything else lives under `key` in the registry."""
    key_name = f"{w_name}{KEY_SUFFIX}/{index}"
    graph.initializer.append(numpy_helper.from_array(np.array([key], np.int64), key_name))
    x_name = node.input[0]
    del node.input[:]
    node.input.extend([x_name, key_name])
    del node.attribute[:]
    node.op_type = BOUND_OP_TYPE


def _free_name(taken: set[str], stem: str) -> str:
    name, i = stem, 1
    while any(t == name or t.startswith(name + "/") for t in taken):
        name, i = f"{stem}_{i}", i + 1
    taken.add(name)
    return name


def _graph_names(graph: onnx.GraphProto) -> set[str]:
    names = {t.name for t in graph.initializer} | {v.name for v in graph.input}
    for node in graph.node:
        names.update(node.input)
        names.update(node.output)
        names.add(node.name)
        names |= _subgraph_reads(node)
    return names


def _stack(group: list[tuple[onnx.NodeProto, int]]) -> int:
    """A bound registry key over the weights of `group` (nodes with their bound keys) stacked in
    the tdpu layout, with the scale they share or, where theirs differ, scale 1 and each node's
    scale per output column."""
    entries = [_bound[key] for _, key in group]
    stacked = np.concatenate([e.packed if e.layout == "tdpu" else packing.repack(e.packed, e.layout, "tdpu")
                              for e in entries])
    scales = {e.scale for e in entries}
    columns = None if len(scales) == 1 else np.concatenate(
        [np.full(e.out_features, e.scale, np.float32) for e in entries])
    weight_key = _acquire(stacked)
    try:
        return _bind(weight_key, scales.pop() if columns is None else 1.0, entries[0].in_features,
                     4 * stacked.shape[0], "tdpu", " + ".join(e.name for e in entries), columns)
    except BaseException:
        _release([weight_key])
        raise


def _fused_nodes(opset: int, group: list[tuple[onnx.NodeProto, int]], key: int, base: str
                 ) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """BitLinearBound(X, key) over the stacked weights, then a Split into the group's outputs."""
    x_name = group[0][0].input[0]
    inits = [numpy_helper.from_array(np.array([key], np.int64), f"{base}{KEY_SUFFIX}")]
    bound = onnx.helper.make_node(BOUND_OP_TYPE, [x_name, inits[0].name], [f"{base}/stacked"],
                                  name=f"{base}/BitLinear", domain=DOMAIN)
    sizes = [_bound[own].out_features for _, own in group]
    outputs = [node.output[0] for node, _ in group]
    if opset >= 13:         # Split's sizes: an input from opset 13, an attribute before
        inits.append(numpy_helper.from_array(np.array(sizes, np.int64), f"{base}/sizes"))
        split = onnx.helper.make_node("Split", [f"{base}/stacked", inits[-1].name], outputs, axis=-1)
    else:
        split = onnx.helper.make_node("Split", [f"{base}/stacked"], outputs, axis=-1, split=sizes)
    split.name = f"{base}/Split"
    return [bound, split], inits


def _default_opset(model: onnx.ModelProto) -> int:
    """The model's ONNX opset; one is imported (17) if it has none (a graph of BitLinear alone)."""
    found = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if found is None:
        model.opset_import.append(onnx.helper.make_opsetid("", 17))
        found = 17
    return found


def _fuse_shared_inputs(model: onnx.ModelProto, bound: list[tuple[int, int]], keys: list[int]) -> None:
    """Fuse the bound nodes (graph position, key) that read the same X with the same K (module
    doc). `keys`, the session's registry keys, gets each fused key in place of its nodes' own."""
    graph = model.graph
    groups: dict[tuple[str, int], list[tuple[int, int]]] = {}
    for position, key in bound:
        groups.setdefault((graph.node[position].input[0], _bound[key].in_features), []).append((position, key))
    groups = {g: members for g, members in groups.items() if len(members) > 1}
    if not groups:
        return
    taken = _graph_names(graph)
    opset = _default_opset(model)
    fused: dict[int, list[onnx.NodeProto]] = {}     # first member's position -> the fused nodes
    gone: set[int] = set()
    dead_inits: set[str] = set()
    for (x_name, _), members in groups.items():
        group = [(graph.node[p], k) for p, k in members]
        key = _stack(group)
        keys.append(key)
        nodes, inits = _fused_nodes(opset, group, key, _free_name(taken, f"{x_name}/tdpu_fused"))
        graph.initializer.extend(inits)
        fused[members[0][0]] = nodes
        gone.update(p for p, _ in members)
        dead_inits.update(node.input[1] for node, _ in group)
        own = [k for _, k in members]
        _release(own)           # before leaving `keys`: a second release of a bound key is a no-op
        for k in own:
            keys.remove(k)
    kept: list[onnx.NodeProto] = []
    for position, node in enumerate(graph.node):
        if position in fused:       # X is there already: every member reads only X
            kept.extend(fused[position])
        elif position not in gone:
            kept.append(node)
    del graph.node[:]
    graph.node.extend(kept)
    inits_kept = [t for t in graph.initializer if t.name not in dead_inits]
    del graph.initializer[:]
    graph.initializer.extend(inits_kept)


def _subgraph_reads(node: onnx.NodeProto) -> set[str]:
    """Names the subgraphs of `node` (If/Loop/Scan bodies) read from the outer scope."""
    names: set[str] = set()
    for attr in node.attribute:
        for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
            for inner in sub.node:
                names.update(i for i in inner.input if i)
                names |= _subgraph_reads(inner)
    return names


def _rewrite(model: onnx.ModelProto, base_dir: str | None,
             shared: dict[str, np.ndarray] | None = None, fuse: bool = True) -> list[int]:
    """Check every BitLinear node, prepack W, rewrite in place; return the registry keys taken.
    `fuse`: bound nodes reading the same X become one (`_fuse_shared_inputs`).

    `shared` (when given) receives the external-data weights that other nodes still read (a
    tied bf16 table: LinearBF16 and the embedding Gather): the caller hands ONNX Runtime the
    registry's array for them instead of a second copy read from disk.
    """
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    uses: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
        for name in _subgraph_reads(node):     # an If/Loop body reading W keeps it alive
            uses[name] = uses.get(name, 0) + 1
    for out in graph.output:
        uses[out.name] = uses.get(out.name, 0) + 1
    last_dims = _static_last_dims(graph)
    graph_inputs = {v.name for v in graph.input}
    keys: list[int] = []
    bound: list[tuple[int, int]] = []      # (graph position, key) of the bound nodes
    drop: set[str] = set()
    try:
        for index, node in enumerate(graph.node):
            if node.domain == DOMAIN and node.op_type == BF16_OP_TYPE:
                w_name = _rewrite_bf16(node, index, inits, last_dims, base_dir, keys, graph)
                uses[w_name] -= 1
                if uses[w_name] == 0:
                    drop.add(w_name)
                elif shared is not None and inits[w_name].data_location == TensorProto.EXTERNAL:
                    shared[w_name] = _entries[keys[-1]].packed
                continue
            if node.domain != DOMAIN or node.op_type != OP_TYPE:
                continue
            where = f"BitLinear node {node.name or f'#{index}'!r}"
            k = _attr(node, "in_features", "int", where)
            n = _attr(node, "out_features", "int", where)
            layout = _attr(node, "layout", "string", where)
            if layout not in packing.LAYOUTS:
                raise BitLinearError(f"{where}: unknown layout {layout!r}, expected one of {packing.LAYOUTS}")
            if len(node.input) != 3:
                raise BitLinearError(f"{where}: expected 3 inputs (X, W, weight_scale), found {len(node.input)}")
            x_name, w_name, s_name = node.input
            last = last_dims.get(x_name)
            if last is not None and last != k:
                raise BitLinearError(f"{where}: X {x_name!r} has last dimension {last}, "
                                     f"in_features is {k}")
            if s_name in inits:
                st = inits[s_name]
                if st.data_type != TensorProto.FLOAT:
                    raise BitLinearError(f"{where}: weight_scale {s_name!r} is "
                                         f"{_DTYPE_NAMES.get(st.data_type)}, expected FLOAT")
            w_init = inits.get(w_name)
            if w_init is None:
                continue  # W computed or fed at run time: the plain operator checks it per call
            if w_init.data_type != TensorProto.UINT8:
                raise BitLinearError(f"{where}: W {w_name!r} is {_DTYPE_NAMES.get(w_init.data_type)}, "
                                     "expected UINT8 packed ternary codes")
            dims = tuple(w_init.dims)
            if n % 4 or dims != (n // 4, k):
                raise BitLinearError(f"{where}: W {w_name!r} has shape {list(dims)}, expected "
                                     f"[out_features/4, in_features] = [{n / 4:g}, {k}]")
            w = numpy_helper.to_array(w_init, base_dir or "")
            try:
                check_packed(w, layout, f"{where}: W {w_name!r}")
            except packing.PackingError as exc:
                raise BitLinearError(str(exc)) from exc
            scale = None if s_name in graph_inputs else _constant_scale(inits.get(s_name), base_dir, where)
            key = _acquire(w)
            if scale is None:
                keys.append(key)
                _use_key(graph, node, index, w_name, key, PREPACKED_OP_TYPE)
            else:
                key = _bind(key, scale, k, n, layout, node.name or f"#{index}")
                keys.append(key)
                bound.append((index, key))
                _bind_node(graph, node, index, w_name, key)
                uses[s_name] -= 1
                if uses[s_name] == 0:
                    drop.add(s_name)
            uses[w_name] -= 1
            if uses[w_name] == 0:
                drop.add(w_name)
        if fuse:
            _fuse_shared_inputs(model, bound, keys)
    except BaseException:
        _release(keys)
        raise
    if drop:
        kept = [t for t in graph.initializer if t.name not in drop]
        del graph.initializer[:]
        graph.initializer.extend(kept)
        # An initializer may also be listed as a graph input (keep_initializers_as_inputs).
        inputs = [v for v in graph.input if v.name not in drop]
        del graph.input[:]
        graph.input.extend(inputs)
    if shared:
        for name in [n for n in shared if n in drop]:
            del shared[name]
    return keys
