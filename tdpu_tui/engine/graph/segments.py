"""A graph cut into consecutive segments by the bytes of the weights they use.

A float graph at full 2B4T shapes holds 9 GiB of float32 weights, and one ONNX Runtime session
over it keeps all of them resident. Cut into segments, it runs one segment's session at a time
(`model.segmented.SegmentedSession`): only the tensors crossing from one segment to the next
stay in memory between them.

Where to cut: the nodes are taken in their (topological) order and a cut goes between two of
them, where as few computed tensors as possible cross it. In the BitNet graphs these are the
points just after a residual addition, where only the hidden state (and the tensors every layer
shares) crosses; no chain of operators ONNX Runtime fuses (MatMul → Mul by a scalar into
FusedMatMul, a MatMul's transposed input) spans such a cut, so every segment computes exactly
what the whole graph's session does and the results are the same bit for bit. Among those
points the cuts are placed so that the segments' weight bytes are balanced and each one's load
stays within the budget; only when no such cut keeps a segment within it are cuts with more
crossing tensors considered. A segment's load is its weights plus a second copy of the largest
(ONNX Runtime packs a MatMul's weight into a new buffer before it frees the original: loading
the 2B4T lm_head, 1.2 GiB, takes 2.4 GiB for a moment), so one initializer larger than half the
budget makes a segment of its own, larger than the budget.

Initializers read by several segments (the tied embedding and lm_head of the reference
profile) are loaded by each of them; Constant nodes are copied into every segment that reads
them; a node with subgraphs (If, Loop, Scan) reads the outer-scope names its subgraphs use, and
those become inputs (or initializers) of its segment like any other.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper

from tdpu_tui.engine.core.errors import GraphError


def tensor_nbytes(t: onnx.TensorProto) -> int:
    """Bytes of an initializer's values (external data included; nothing is read)."""
    count = int(np.prod([int(d) for d in t.dims], dtype=np.int64))
    try:
        itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
    except (KeyError, TypeError, ValueError):
        return t.ByteSize()
    if t.data_type == onnx.TensorProto.STRING:
        return t.ByteSize()
    return count * itemsize


def data_bytes(model: onnx.ModelProto) -> int:
    """Bytes of every initializer of `model` (what one session over it holds)."""
    return sum(tensor_nbytes(t) for t in model.graph.initializer)


def _subgraphs(node: onnx.NodeProto) -> Iterable[onnx.GraphProto]:
    for a in node.attribute:
        if a.type == onnx.AttributeProto.GRAPH:
            yield a.g
        elif a.type == onnx.AttributeProto.GRAPHS:
            yield from a.graphs


def outer_references(graph: onnx.GraphProto) -> set[str]:
    """Names `graph` (a subgraph) reads that it does not define: its enclosing scopes' tensors."""
    defined = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    defined |= {t.name for t in graph.sparse_initializer}
    for node in graph.node:
        defined.update(o for o in node.output if o)
    reads: set[str] = set()
    for node in graph.node:
        reads.update(node_reads(node))
    return reads - defined


def node_reads(node: onnx.NodeProto) -> list[str]:
    """The tensors `node` reads: its inputs and what its subgraphs take from outside them."""
    names = [i for i in node.input if i]
    for g in _subgraphs(node):
        names += sorted(outer_references(g) - set(names))
    return names


def _is_constant(node: onnx.NodeProto) -> bool:
    return node.op_type == "Constant" and node.domain in ("", "ai.onnx")


@dataclass
class Segment:
    """Nodes `start`…`stop - 1` of the graph, what they take and what they hand on."""
    index: int
    start: int
    stop: int
    nbytes: int                      # bytes of the initializers it loads
    load_bytes: int                  # memory loading them takes: nbytes + the largest again
    initializers: list[str]
    inputs: list[str]                # from the graph's inputs or earlier segments
    outputs: list[str]               # for later segments or the caller
    constants: list[int] = field(default_factory=list)   # Constant nodes copied in from elsewhere


class SegmentPlan:
    """The segments of one graph (`plan(model, budget, outputs)`), and each one's ModelProto."""

    def __init__(self, model: onnx.ModelProto, budget: int, outputs: Sequence[str]):
        graph = model.graph
        if graph.sparse_initializer:
            raise GraphError(f"graph {graph.name!r}: sparse initializers cannot be run in segments")
        self.model = model
        self.budget = int(budget)
        self.inits = {t.name: t for t in graph.initializer}
        self.graph_inputs = {i.name: i for i in graph.input}
        self.declared = {v.name: v for v in (*graph.value_info, *graph.output)}
        nodes = list(graph.node)
        self.nodes = nodes
        producer: dict[str, int] = {}
        for i, node in enumerate(nodes):
            for o in node.output:
                if o:
                    producer[o] = i
        self.producer = producer
        self.reads = [node_reads(n) for n in nodes]
        for i, names in enumerate(self.reads):
            for name in names:
                p = producer.get(name)
                if p is not None and p >= i:
                    raise GraphError(f"graph {graph.name!r}: node {nodes[i].name or nodes[i].op_type!r} reads "
                                     f"{name!r} before it is computed: the nodes are not in topological order")
                if p is None and name not in self.inits and name not in self.graph_inputs:
                    raise GraphError(f"graph {graph.name!r}: node {nodes[i].name or nodes[i].op_type!r} reads "
                                     f"{name!r}, which no node, input or initializer provides")
        self.outputs = list(dict.fromkeys(outputs))
        for name in self.outputs:
            if name not in producer and name not in self.graph_inputs:
                raise GraphError(f"graph {graph.name!r}: output {name!r} is not computed by a node "
                                 "(an initializer as a graph output cannot be run in segments)")
        self.bounds = self._cut()
        self.segments = self._segments()

    # where to cut ------------------------------------------------------------------------------

    def crossing(self) -> list[int]:
        """For each cut position p (before node p), how many computed tensors cross it, not
        counting those that live across more than half of the graph (the attention mask and
        rotary tables every layer reads): they cross nearly every cut, and where they end the
        counts would drop for every cut alike."""
        n = len(self.nodes)
        last: dict[str, int] = {}
        for i, names in enumerate(self.reads):
            for name in names:
                last[name] = i
        diff = [0] * (n + 2)
        for name, end in last.items():
            p = self.producer.get(name)
            if p is None or _is_constant(self.nodes[p]) or end - p > n // 2:
                continue
            diff[p + 1] += 1
            diff[end + 1] -= 1
        out, run = [], 0
        for p in range(n + 1):
            run += diff[p]
            out.append(run)
        return out

    def _init_reads(self) -> list[list[str]]:
        return [[r for r in names if r in self.inits] for names in self.reads]

    def _greedy(self, cap: int, cands: set[int], init_reads: list[list[str]], size: dict[str, int]
                ) -> list[int]:
        """Segment bounds: each segment ends at the farthest allowed cut keeping it within `cap`
        (or at the first allowed cut when none does)."""
        n = len(self.nodes)
        bounds, a = [0], 0
        while a < n:
            seen: set[str] = set()
            weights, largest, best = 0, 0, None
            for j in range(a, n):
                for name in init_reads[j]:
                    if name not in seen:
                        seen.add(name)
                        weights += size[name]
                        largest = max(largest, size[name])
                total = weights + largest
                pos = j + 1
                if pos == n:
                    if total <= cap or best is None:
                        best = n
                    break
                if pos in cands:
                    if total <= cap:
                        best = pos
                    else:
                        if best is None:
                            best = pos
                        break
            bounds.append(best)
            a = best
        return bounds

    def _balanced(self, cands: set[int], init_reads, size) -> list[int]:
        bounds = self._greedy(self.budget, cands, init_reads, size)
        count = len(bounds)
        lo, hi = 0, self.budget         # the smallest cap that needs no more segments
        while lo < hi:
            mid = (lo + hi) // 2
            if len(self._greedy(mid, cands, init_reads, size)) <= count:
                hi = mid
            else:
                lo = mid + 1
        return self._greedy(lo, cands, init_reads, size)

    def _seg_bytes(self, a: int, b: int, init_reads, size) -> int:
        return sum(size[name] for name in {r for j in range(a, b) for r in init_reads[j]})

    def _seg_cost(self, a: int, b: int, init_reads, size) -> int:
        """What loading nodes a…b-1 takes: their weights, and a second copy of the largest
        (ONNX Runtime packs a MatMul's weight into a copy before it frees the original)."""
        names = {r for j in range(a, b) for r in init_reads[j]}
        return sum(size[name] for name in names) + max((size[name] for name in names), default=0)

    def _cut(self) -> list[int]:
        n = len(self.nodes)
        init_reads = self._init_reads()
        size = {name: tensor_nbytes(t) for name, t in self.inits.items()}
        if n <= 1 or self._seg_cost(0, n, init_reads, size) <= self.budget:
            return [0, n]
        crossing = self.crossing()
        levels = sorted({crossing[p] for p in range(1, n)})
        cands = {p for p in range(1, n) if crossing[p] <= levels[0]}
        for level in [*levels[1:], None]:
            bounds = self._merge_weightless(self._balanced(cands, init_reads, size), init_reads, size)
            over = [(a, b) for a, b in itertools.pairwise(bounds)
                    if self._seg_cost(a, b, init_reads, size) > self.budget]
            if not over or level is None:
                return bounds
            # Within a segment no clean cut keeps within the budget, allow the next cleanest
            # cuts (a single initializer larger than the budget stays larger, whatever the cuts).
            cands |= {p for a, b in over for p in range(a + 1, b) if crossing[p] <= level}
        return bounds

    def _merge_weightless(self, bounds: list[int], init_reads, size) -> list[int]:
        """A segment that loads no weights (the nodes before an initializer larger than the
        budget, say) is no load worth its own session: it joins the segment after it (the last
        one joins the one before)."""
        out = list(bounds)
        k = 0
        while len(out) > 2 and k < len(out) - 1:
            if self._seg_bytes(out[k], out[k + 1], init_reads, size) == 0:
                del out[k + 1 if k + 1 < len(out) - 1 else k]
            else:
                k += 1
        return out

    # what each segment takes and hands on -----------------------------------------------------

    def _segments(self) -> list[Segment]:
        spans = list(itertools.pairwise(self.bounds))
        wanted = set(self.outputs)
        segs = []
        reads_of = []
        for a, b in spans:
            produced = {o for j in range(a, b) for o in self.nodes[j].output if o}
            reads = list(dict.fromkeys(r for j in range(a, b) for r in self.reads[j]))
            reads_of.append((produced, reads))
        for k, ((a, b), (produced, reads)) in enumerate(zip(spans, reads_of)):
            later: set[str] = set()
            for produced2, reads2 in reads_of[k + 1:]:
                later.update(reads2)
            outside = [r for r in reads if r not in produced]
            inits = [r for r in outside if r in self.inits]
            constants = sorted({self.producer[r] for r in outside
                                if r in self.producer and _is_constant(self.nodes[self.producer[r]])})
            copied = {o for c in constants for o in self.nodes[c].output}
            inputs = [r for r in outside if r not in self.inits and r not in copied]
            inputs += [r for r in inits if r in self.graph_inputs]   # an input with a default
            outputs = [o for j in range(a, b) for o in self.nodes[j].output
                       if o and (o in wanted or (o in later and not _is_constant(self.nodes[j])))]
            sizes = [tensor_nbytes(self.inits[r]) for r in inits]
            segs.append(Segment(k, a, b, sum(sizes), sum(sizes) + max(sizes, default=0), inits, inputs,
                                list(dict.fromkeys(outputs)), constants))
        return segs

    def segment_model(self, seg: Segment, values: dict[str, np.ndarray], outputs: Sequence[str]
                      ) -> onnx.ModelProto:
        """`seg` as a model of its own: its nodes (and the Constant nodes it reads), its
        initializers (external-data references kept: ONNX Runtime reads them from the graph's
        folder), inputs typed as the graph declares them or as `values` (the arrays it will be
        fed) are, and `outputs` (a subset of `seg.outputs`) as its outputs."""
        graph = self.model.graph
        inputs = []
        for name in seg.inputs:
            if name in self.graph_inputs:
                inputs.append(self.graph_inputs[name])
            elif name in self.declared and self.declared[name].type.HasField("tensor_type"):
                inputs.append(self.declared[name])
            else:
                v = values.get(name)
                if not isinstance(v, np.ndarray):
                    raise GraphError(f"graph {graph.name!r}: tensor {name!r} crosses a segment boundary "
                                     f"but is not a tensor ({type(v).__name__}): not run in segments")
                inputs.append(helper.make_tensor_value_info(
                    name, helper.np_dtype_to_tensor_dtype(v.dtype), list(v.shape)))
        outs = [self.declared[o] if o in self.declared else helper.make_empty_tensor_value_info(o)
                for o in outputs]
        nodes = [self.nodes[c] for c in seg.constants] + self.nodes[seg.start:seg.stop]
        inside = {o for n in nodes for o in n.output} | set(seg.inputs) | set(seg.initializers)
        value_info = [v for v in graph.value_info if v.name in inside and v.name not in set(seg.inputs)]
        g = helper.make_graph(nodes, f"{graph.name}_segment{seg.index}", inputs, outs,
                              initializer=[self.inits[r] for r in seg.initializers], value_info=value_info)
        m = helper.make_model(g, opset_imports=list(self.model.opset_import),
                              producer_name=self.model.producer_name or "tdpu")
        m.ir_version = self.model.ir_version
        m.functions.extend(self.model.functions)
        return m


def plan(model: onnx.ModelProto, budget: int, outputs: Sequence[str] | None = None) -> SegmentPlan:
    """`model` (loaded without its external data) cut into segments whose loads (weights plus
    the largest again) take at most `budget` bytes each, computing `outputs` (default: the
    graph's outputs)."""
    names = list(outputs) if outputs is not None else [o.name for o in model.graph.output]
    return SegmentPlan(model, budget, names)
