"""tdpu: the Phase 3 workbench for the TDPU ternary BitLinear accelerator."""

__version__ = "0.1.0"
