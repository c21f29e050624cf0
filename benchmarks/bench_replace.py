"""MatMul → BitLinear on 2B4T shapes (2 layers): speed and size against the float graph and the
MatMulNBits peer, all measured in the same run.

    python benchmarks/bench_replace.py [--workdir DIR] [--layers 2] [--repeats 7]

Runs the pipeline's own stages (export → replace → validate) on the synthetic checkpoint with
`[model.synthetic] preset = "2b4t"`, `layers = N`, then prints the figures and the ratios
against the targets: single-token step of the BitLinear graph ≤ 0.5× the float graph and
≤ 1.5× the MatMulNBits graph; projection weight bytes ≤ 1/12 of the float graph's.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tdpu_tui.engine.config import parse_config  # noqa: E402
from tdpu_tui.engine.events import StageFinished, StageLog, Status  # noqa: E402
from tdpu_tui.engine.pipeline import Pipeline  # noqa: E402

TARGETS = (("ratio_step_vs_float", 0.5, "whole graph, step: BitLinear / float"),
           ("ratio_step_vs_matmulnbits", 1.5, "whole graph, step: BitLinear / MatMulNBits"),
           ("ratio_projections_step_vs_float", 0.5, "projections alone, step: BitLinear / float"),
           ("ratio_projections_step_vs_matmulnbits", 1.5, "projections alone, step: BitLinear / MatMulNBits"),
           ("ratio_weight_bytes_vs_float", 1 / 12, "projection weight bytes: BitLinear / float"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=None,
                    help="where the checkpoint and graphs go (default: a temporary directory)")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--omp-wait-policy", default="PASSIVE", metavar="POLICY",
                    help="OMP_WAIT_POLICY for the numba kernel's OpenMP threads (default PASSIVE; "
                         "'' leaves the environment as it is)")
    ap.add_argument("--reuse", action="store_true",
                    help="keep an exported graph already in --workdir (skip the export stage)")
    args = ap.parse_args()
    # numba's OpenMP workers spin-wait after each BitLinear call by default. On a 2-core machine
    # they then compete with the ONNX Runtime operators that follow, and in a whole graph the
    # BitLinear nodes took ~17 ms each instead of ~0.15 ms (ORT profiler). Passive waiting
    # must be chosen before the OpenMP runtime starts, i.e. before the first kernel call.
    if args.omp_wait_policy:
        os.environ["OMP_WAIT_POLICY"] = args.omp_wait_policy
    tmp = None
    if args.workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="tdpu-bench-")
        args.workdir = Path(tmp.name)
    root = args.workdir.resolve()
    cfg = parse_config(f"""
[model.synthetic]
preset = "2b4t"
layers = {args.layers}
[export]
seq_len = {args.seq_len}
verify_batch = 1
verify_tokens = 8
[validate]
repeats = {args.repeats}
[paths]
output = "{root / 'models' / 'output'}"
logs = "{root / 'phase3_logs'}"
""", root / "tdpu.toml")

    def on_event(e) -> None:
        if isinstance(e, StageLog) and e.level != "debug" and not e.line.startswith(("replace ", "keep ")):
            print(f"[{e.stage}] {e.line}", file=sys.stderr)
        elif isinstance(e, StageFinished):
            r = e.result
            print(f"[{r.name}] {r.status.value} in {r.seconds:.1f}s: {r.message}", file=sys.stderr)

    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    stages = ["export", "replace", "validate"]
    if args.reuse and (root / "models" / "output" / "bitnet_b1.58_full.onnx").exists():
        stages.remove("export")
    summary = Pipeline(cfg, on_event=on_event).run(stages)
    results = {r.name: r for r in summary.results}
    if any(r.status is not Status.OK for r in results.values()):
        print("benchmark did not complete: " + "; ".join(f"{r.name} {r.status.value}: {r.message}"
                                                         for r in results.values()))
        return 1
    m = results["validate"].metrics
    print(f"\n2b4t shapes, {args.layers} layers, {m['replaced']} BitLinear nodes, "
          f"prefill {m['prefill_tokens']} tokens, median of {args.repeats}+ runs "
          f"(total {time.perf_counter() - t0:.0f}s)")
    # The numba kernel splits each call over both cores; anything else running on this
    # 2-core machine stalls it far more than ONNX Runtime's own operators. Say how busy it was.
    print(f"load average (1 min) before {load_before:.2f}, after {os.getloadavg()[0]:.2f} "
          f"on {os.cpu_count()} CPUs; OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}\n")
    print(f"{'graph':<12} {'prefill ms':>11} {'step ms':>9} {'proj. weights':>15}")
    for label in ("float", "bitlinear", "matmulnbits"):
        print(f"{label:<12} {m[f'{label}_prefill_ms']:>11.2f} {m[f'{label}_step_ms']:>9.2f} "
              f"{m[f'{label}_weight_bytes'] / 2**20:>11.2f} MiB")
    print(f"\nlayer {m['projections_layer']} projections alone (7 nodes; no attention, norms, lm_head):")
    for label in ("float", "bitlinear", "matmulnbits"):
        print(f"{label:<12} {m[f'projections_{label}_prefill_ms']:>11.2f} "
              f"{m[f'projections_{label}_step_ms']:>9.3f}")
    print(f"\nprefill: BitLinear / float {m['ratio_prefill_vs_float']:.3f}×, "
          f"BitLinear / MatMulNBits {m['ratio_prefill_vs_matmulnbits']:.3f}×")
    outside = m["float_step_ms"] - args.layers * m["projections_float_step_ms"]
    print(f"float step outside the projections (lm_head, attention, norms): ≈ {outside:.2f} ms, so even "
          f"free projections give at best {max(outside, 0) / m['float_step_ms']:.2f}× the float step")
    met = True
    for key, limit, label in TARGETS:
        value = m[key]
        ok = value is not None and value <= limit
        met &= ok
        print(f"{label:<50} {value:.3f}×  (target ≤ {limit:.3f}×)  {'met' if ok else 'MISSED'}")
    print(f"\nreport: {results['validate'].artifacts.get('performance_report')}")
    if tmp is not None:
        tmp.cleanup()
    return 0 if met else 1


if __name__ == "__main__":
    raise SystemExit(main())
