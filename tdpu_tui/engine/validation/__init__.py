"""Validation of the replaced graph: node checks against the kernel, timing of the graphs."""
