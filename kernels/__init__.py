"""Ternary BitLinear kernels: weight packings, numba kernels, and the ONNX Runtime operator."""
