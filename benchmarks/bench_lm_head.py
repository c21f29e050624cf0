"""The tied lm_head in bf16 (`[replace].lm_head = "bf16"`) against ONNX Runtime's float32 Gemm.

    python benchmarks/bench_lm_head.py [--vocab 128256] [--hidden 2560] [--repeats 15]

Times, in the same run, y = x @ W.T for the 2B4T lm_head (W 128256 × 2560) at M = 1 (one
token) and M = 128 (prefill):
- `kernels.bf16.linear_bf16` on the bf16 table (0.66 GB),
- the same through ONNX Runtime (`ai.tdpu::LinearBF16` in a session from `create_session`),
- ONNX Runtime's float32 Gemm (transB=1, constant B prepacked) on the float32 table (1.31 GB):
  what the exported graph runs,
and prints the ratios against that Gemm. The weights are random bf16 values; the check at the
end compares the outputs (they differ only by the order of float32 sums).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import onnx  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from kernels.bf16 import bf16_to_float32, linear_bf16  # noqa: E402
from kernels.ort import create_session  # noqa: E402
from tdpu_tui.engine.osutil.platform import load_average


def median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--hidden", type=int, default=2560)
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args()
    n, k = args.vocab, args.hidden
    rng = np.random.default_rng(0)
    bits = (rng.standard_normal((n, k), dtype=np.float32) * 0.02).view(np.uint32) >> 16
    bits = bits.astype(np.uint16)
    w = bf16_to_float32(bits)
    with tempfile.TemporaryDirectory(prefix="tdpu-bench-lm-head-") as tmp:
        x_info = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, k])
        y_info = helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, n])
        gemm = helper.make_model(helper.make_graph(
            [helper.make_node("Gemm", ["x", "W"], ["y"], transB=1)], "float_lm_head", [x_info], [y_info],
            [numpy_helper.from_array(w, "W")]), opset_imports=[helper.make_opsetid("", 17)])
        gemm_path = Path(tmp) / "gemm.onnx"
        onnx.save(gemm, str(gemm_path), save_as_external_data=True, location="gemm.onnx.data")
        del gemm
        bf = helper.make_tensor("W", TensorProto.BFLOAT16, [n, k], bits.tobytes(), raw=True)
        lin = helper.make_model(helper.make_graph(
            [helper.make_node("LinearBF16", ["x", "W"], ["y"], domain="ai.tdpu", name="/lm_head/LinearBF16",
                              in_features=k, out_features=n)], "bf16_lm_head", [x_info], [y_info], [bf]),
            opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.tdpu", 1)])
        lin_path = Path(tmp) / "bf16.onnx"
        onnx.save(lin, str(lin_path), save_as_external_data=True, location="bf16.onnx.data")
        del lin, bf

        from tdpu_tui.engine.model.compare import ort_session
        s_gemm = ort_session(str(gemm_path))
        s_lin = create_session(lin_path)
        del w
        print(f"lm_head {n} × {k}: bf16 table {n * k * 2 / 2**30:.2f} GiB, float32 table "
              f"{n * k * 4 / 2**30:.2f} GiB; {os.cpu_count()} CPUs, load {(load_average() or 0.0):.2f}")
        print(f"{'M':>4} {'ORT f32 Gemm':>13} {'bf16 kernel':>12} {'bf16 in ORT':>12} "
              f"{'kernel/Gemm':>12} {'ORT bf16/Gemm':>14}")
        for m in (1, 128):
            x = rng.standard_normal((m, k), dtype=np.float32)
            t_gemm = median_ms(lambda: s_gemm.run(None, {"x": x}), args.repeats)
            t_kernel = median_ms(lambda: linear_bf16(x, bits), args.repeats)
            t_lin = median_ms(lambda: s_lin.run(None, {"x": x}), args.repeats)
            diff = float(np.abs(s_gemm.run(None, {"x": x})[0] - s_lin.run(None, {"x": x})[0]).max())
            print(f"{m:>4} {t_gemm:>10.2f} ms {t_kernel:>9.2f} ms {t_lin:>9.2f} ms "
                  f"{t_kernel / t_gemm:>11.2f}× {t_lin / t_gemm:>13.2f}×   (max |Δ| {diff:.2g})")
        del s_gemm, s_lin
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
