"""One index over an ONNX graph: nodes by name, producers and consumers of each value,
initializers and constants, and one attribute reader."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from typing import Any

import onnx
from onnx import helper

from tdpu_tui.engine.core.errors import GraphError
from tdpu_tui.engine.graph.external import tensor_array


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
            raise GraphError(f"{path}: graph not found (run the export stage first)") from None
        except Exception as exc:
            raise GraphError(f"{path}: not a readable ONNX model: {exc}") from None
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



def attr(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
    """The value of attribute `name` of `node` (strings decoded), or `default`."""
    for a in node.attribute:
        if a.name == name:
            value = helper.get_attribute_value(a)
            return value.decode() if isinstance(value, bytes) else value
    return default
