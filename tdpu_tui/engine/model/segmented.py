"""A float graph too large for one ONNX Runtime session, run as consecutive segments.

`SegmentedSession(path)` answers `run(output_names, feed)` as an `InferenceSession` over the
whole graph does, bit for bit, while holding one segment's weights at a time: it loads segment
1's session (its initializers read from the graph's external data), runs it, frees it, loads
segment 2 on the tensors segment 1 handed on, and so on (`graph.segments` says where it cuts).
Only the tensors crossing a boundary, and the outputs asked for, stay in memory between loads.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from tdpu_tui.engine.core.cache import free_memory
from tdpu_tui.engine.graph.segments import Segment, SegmentPlan, data_bytes, plan


@dataclass(frozen=True)
class ValueArg:
    """What `get_inputs()` / `get_outputs()` of an InferenceSession give: a name (and a type)."""
    name: str
    type: str = ""


def _tensor_type(vi: onnx.ValueInfoProto) -> str:
    tt = vi.type.tensor_type
    if not vi.type.HasField("tensor_type") or not tt.elem_type:
        return ""
    return f"tensor({onnx.helper.tensor_dtype_to_string(tt.elem_type).removeprefix('TensorProto.').lower()})"


class SegmentedSession:
    """`run(output_names, feed)` over a graph loaded one segment at a time.

    `model`: a graph's path, or a ModelProto loaded without its external data together with
    `external_dir`, the folder that data is read from. `budget`: bytes loading one segment may
    take (its weights and the largest of them again, `graph.segments`).
    `extra_outputs`: tensors to return besides the graph's outputs (like extra graph outputs on
    an in-memory copy). `factory(model_bytes, external_dir)` makes each segment's session
    (default `compare.ort_session`); `make_room(nbytes)` is called with what loading a segment
    takes (`Segment.load_bytes`) before it is loaded: the run cache's, so that what it holds
    and the segment fit within its budget together. `prepack`: whether the default factory's
    sessions prepack their MatMul weights (`compare.ort_session`): worth it only when a loaded
    segment runs many times (`visit`).
    """

    def __init__(self, model: str | Path | onnx.ModelProto, external_dir: str | Path | None = None, *,
                 budget: int, extra_outputs: Sequence[str] = (),
                 factory: Callable | None = None, make_room: Callable[[int], None] | None = None,
                 prepack: bool = False):
        if not isinstance(model, onnx.ModelProto):
            path = Path(model)
            model = onnx.load(str(path), load_external_data=False)
            external_dir = path.parent if external_dir is None else external_dir
        self.external_dir = Path(external_dir) if external_dir is not None else None
        graph = model.graph
        inits = {t.name for t in graph.initializer}
        self._inputs = [ValueArg(i.name, _tensor_type(i)) for i in graph.input if i.name not in inits]
        names = [o.name for o in graph.output] + [e for e in extra_outputs]
        self._outputs = [ValueArg(n) for n in dict.fromkeys(names)]
        self.plan: SegmentPlan = plan(model, budget, [o.name for o in self._outputs])
        self.nbytes = data_bytes(model)
        self._factory = factory
        self._make_room = make_room
        self.prepack = prepack

    @property
    def segments(self) -> list[Segment]:
        return self.plan.segments

    def largest_segment_bytes(self) -> int:
        return max(s.nbytes for s in self.segments)

    def get_inputs(self) -> list[ValueArg]:
        return list(self._inputs)

    def get_outputs(self) -> list[ValueArg]:
        return list(self._outputs)

    def load(self, seg: Segment, values: dict[str, np.ndarray], outputs: Sequence[str]):
        """The session of `seg` computing `outputs`, typed for `values` (what it will be fed)."""
        from tdpu_tui.engine.model.compare import ort_session

        if self._make_room is not None and seg.load_bytes:
            self._make_room(seg.load_bytes)
        model = self.plan.segment_model(seg, values, outputs)
        if self._factory is not None:
            return self._factory(model.SerializeToString(), self.external_dir)
        return ort_session(model.SerializeToString(), self.external_dir, prepack=self.prepack)

    def run(self, output_names: Sequence[str] | None, feed: dict[str, np.ndarray],
            visit: Callable[[Segment, object, dict[str, np.ndarray], list[str]], None] | None = None
            ) -> list[np.ndarray]:
        """The `output_names` (None: every output) computed on `feed`, segment by segment.

        `visit(segment, session, segment_feed, segment_outputs)` is called with each segment's
        session after it ran and before it is freed (validate times the segments there)."""
        known = {o.name for o in self._outputs}
        wanted = list(output_names) if output_names else [o.name for o in self._outputs]
        unknown = [n for n in wanted if n not in known]
        if unknown:
            raise ValueError(f"invalid output name(s) {unknown}: this session computes {sorted(known)}")
        want = set(wanted)
        segs = self.segments
        needed_after = [set() for _ in segs]       # tensors read by the segments after each one
        later: set[str] = set()
        for k in range(len(segs) - 1, -1, -1):
            needed_after[k] = set(later)
            later |= set(segs[k].inputs)
        values: dict[str, np.ndarray] = {k: v for k, v in feed.items()}
        for k, seg in enumerate(segs):
            seg_feed = {n: values[n] for n in seg.inputs if n in values}
            missing = [n for n in seg.inputs if n not in seg_feed and n not in self.plan.inits]
            if missing:
                raise ValueError(f"segment {k + 1} of {len(segs)} needs {missing}, which the feed lacks")
            outs = [o for o in seg.outputs if o in want or o in needed_after[k]]
            if not outs:
                continue
            session = self.load(seg, seg_feed, outs)
            try:
                result = session.run(outs, seg_feed)
                if visit is not None:
                    visit(seg, session, seg_feed, outs)
            finally:
                del session
                free_memory()
            values.update(zip(outs, result, strict=True))
            del result, seg_feed
            for name in [n for n in values if n not in want and n not in needed_after[k]]:
                del values[name]
        return [values[n] for n in wanted]
