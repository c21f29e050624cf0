"""ONNX graphs: building them node by node, external data, running them."""
