"""One 2560 × 2560 projection for one token (204,800 tiles at LEN 32) through the RTL core.

    python benchmarks/bench_rtl.py [--sources FILE.sv ...] [--lanes 32] [--k 2560] [--n 2560]
                                   [--build-dir DIR]

The core defaults to the reference core of the tests (`tests/fixtures/rtl/vec_multi_core.sv`);
its Verilator build is cached in `--build-dir` (by the sources' hash), so the second run
measures the co-simulation alone. Timed, in the same run: the build (or its reuse), the timing
probe, and the check itself — tiles built in stream order, the cycle file, the harness, every
result against its tile sum and every row against `ternary_matmul_int`. Printed: the machine,
each phase, tiles/s, and ratios against the same check done in NumPy alone (no RTL) and
against the 5 s target. Nothing is asserted on time.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

TARGET_S = 5.0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sources", nargs="+", default=[str(REPO / "tests/fixtures/rtl/vec_multi_core.sv")])
    ap.add_argument("--lanes", type=int, default=32)
    ap.add_argument("--k", type=int, default=2560)
    ap.add_argument("--n", type=int, default=2560)
    ap.add_argument("--build-dir", default=str(Path(tempfile.gettempdir()) / "tdpu-bench-rtl"))
    args = ap.parse_args(argv)

    from kernels.bitlinear import quantize_activations, ternary_matmul_int
    from kernels.packing import pack, unpack
    from tdpu_tui.engine.core.config import Config
    from tdpu_tui.engine.rtl import build, tiles
    from tdpu_tui.engine.rtl.harness import run_harness
    from tdpu_tui.engine.osutil.platform import machine_summary
    from tdpu_tui.engine.rtl.timing import match, measure

    print(f"machine: {machine_summary()}")
    verilator = build.find_verilator()
    if verilator is None:
        print(f"Verilator not found: {build.INSTALL_HINT}")
        return 1
    cfg = Config()
    cfg.rtl.sources = [str(Path(s).resolve()) for s in args.sources]
    cfg.rtl.lanes = args.lanes
    core = build.Core.of(cfg)
    t0 = time.perf_counter()
    b = build.build(core, verilator, Path(args.build_dir), timeout_s=600)
    t_build = time.perf_counter() - t0
    print(f"verilator: {verilator.version} ({verilator.origin})")
    print(f"build: {'cached' if b.cached else 'built'} in {t_build:.2f} s ({b.directory})")

    t0 = time.perf_counter()
    timing = measure(b.binary, args.lanes, (0, 1, 2), timeout_s=600)
    t_probe = time.perf_counter() - t0
    print(f"timing probe: latency {timing.latency}, II fresh {timing.ii_fresh}, reused {timing.ii_reused} "
          f"({t_probe:.2f} s)")

    rng = np.random.default_rng(0)
    w = rng.integers(-1, 2, (args.n, args.k)).astype(np.int8)
    p = pack(w, "tdpu")
    x = rng.standard_normal((1, args.k)).astype(np.float32)
    q, _ = quantize_activations(x)
    ternary_matmul_int(q, p, "tdpu")          # the kernel's compile, outside the timing

    t0 = time.perf_counter()
    ts = tiles.node_tiles("bench", q, unpack(p, "tdpu"), args.lanes, [0], args.n)
    codes = tiles.codes_of(ts.weights, 0, 1, 2)
    cycles, at = tiles.fresh_schedule(ts.data, codes, timing.ii_fresh, timing.lead)
    t_prep = time.perf_counter() - t0
    t1 = time.perf_counter()
    res = run_harness(b.binary, cycles, timeout_s=600)
    t_sim = time.perf_counter() - t1
    t2 = time.perf_counter()
    a = match(res, at, ts.expected)
    rows = res["result"].astype(np.int64).reshape(args.n, -1).sum(axis=1)
    kernel = ternary_matmul_int(q, p, "tdpu")[0]
    rows_ok = np.array_equal(rows, kernel)
    t_check = time.perf_counter() - t2
    wall = time.perf_counter() - t0

    t0 = time.perf_counter()                  # the baseline: the same tiles summed in NumPy alone
    ref = tiles.node_tiles("bench", q, unpack(p, "tdpu"), args.lanes, [0], args.n).expected
    ref_rows = ref.reshape(args.n, -1).sum(axis=1)
    t_numpy = time.perf_counter() - t0
    assert np.array_equal(ref_rows, kernel)

    n_tiles = len(ts)
    print(f"projection {args.k} × {args.n}, one token: {n_tiles:,} tiles, {len(cycles):,} cycles")
    print(f"  tiles + cycle file {t_prep:.3f} s, harness {t_sim:.3f} s, check {t_check:.3f} s; "
          f"wall {wall:.3f} s")
    print(f"  result: {'exact' if a.exact and rows_ok else 'NOT exact'} ({a.answered} answered)")
    print(f"  co-simulation {n_tiles / wall:,.0f} tiles/s end to end, harness alone {n_tiles / t_sim:,.0f} tiles/s")
    print(f"ratios: wall / {TARGET_S:g} s target = {wall / TARGET_S:.3f}; "
          f"co-simulated check / NumPy-only tile sums = {wall / t_numpy:.1f}×; "
          f"harness share of the wall = {t_sim / wall:.0%}")
    return 0 if a.exact and rows_ok else 1


if __name__ == "__main__":
    sys.exit(main())
