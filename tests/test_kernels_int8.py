"""Every integer-core path (kernels/int8.py, kernels/simd.py) bit-identical to the reference, and
the per-machine choice of path (kernels/select.py)."""

import json
import os
import platform
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels import packing, select
from kernels.bitlinear import bitlinear, ternary_matmul_int

REPO = Path(__file__).resolve().parent.parent
LAYOUTS = ("tdpu", "hf")
PATHS = select.available_paths()            # every path this CPU can run, each tested explicitly
FAST = [p for p in PATHS if p != select.REFERENCE]
# numba's LLVM targets the host's architecture only: x86 code is not compiled elsewhere.
X86_ONLY = pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"),
                              reason="compiles x86 code, which this host's LLVM does not target")


def ternary(rng, n, k):
    return rng.integers(-1, 2, size=(n, k)).astype(np.int8)


def int_reference(q, w):
    return q.astype(np.int64) @ w.astype(np.int64).T


def check_exact(q, w, layout, path):
    p = packing.pack(w, layout)
    out = ternary_matmul_int(q, p, layout, path=path)
    ref = int_reference(q, w)
    assert out.dtype == np.int32 and out.shape == ref.shape
    bad = np.argwhere(out != ref)
    if bad.size:
        m, n = bad[0]
        pytest.fail(f"{path} {layout}: {len(bad)} of {ref.size} outputs wrong; first [m={m}, n={n}]: "
                    f"expected {ref[m, n]}, got {out[m, n]} (q row {q[m].tolist()[:16]}..., "
                    f"W row {w[n].tolist()[:16]}...)")
    np.testing.assert_array_equal(out, ternary_matmul_int(q, p, layout, path=select.REFERENCE))


def test_this_machine_runs_the_reference_and_an_8_bit_path_where_it_has_avx2():
    assert PATHS[0] == select.REFERENCE
    if "avx2" in select.machine()["features"]:
        assert "numba-avx2" in PATHS


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("m, k, n", [(1, 1, 4), (1, 31, 8), (1, 32, 8), (2, 33, 12), (3, 64, 4),
                                     (5, 129, 36), (2, 513, 8), (7, 1031, 20), (4, 2560, 64),
                                     (1, 2560, 640), (6, 6912, 8), (1, 2560, 1644), (3, 2560, 1644),
                                     (2, 2560, 2048)])
def test_every_path_equals_the_int64_reference(path, layout, m, k, n):
    rng = np.random.default_rng(m * 100_000 + k * 10 + n)
    check_exact(rng.integers(-128, 128, size=(m, k)).astype(np.int8), ternary(rng, n, k), layout, path)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("k", [1024, 1031, 6912])
def test_every_path_is_exact_at_the_int16_bounds(path, layout, k):
    """All -128 against all -1 (the most negative int16 group sum), all 127 against +1, mixed."""
    n = 12
    w = np.full((n, k), -1, np.int8)
    w[1] = 1
    w[2] = 0
    w[3, ::2] = 1
    w[4:] = np.where(np.arange(k) % 3 == 0, 1, -1)
    q = np.stack([np.full(k, -128), np.full(k, 127), np.where(np.arange(k) % 2, 127, -128),
                  np.full(k, -128), np.zeros(k), np.full(k, 1)]).astype(np.int8)
    check_exact(q, w, layout, path)
    out = ternary_matmul_int(q, packing.pack(w, layout), layout, path=path)
    assert out[0, 0] == 128 * k and out[0, 1] == -128 * k and out[1, 0] == -127 * k


@settings(max_examples=40, deadline=None)
@given(m=st.integers(1, 6), k=st.integers(1, 300), r=st.integers(1, 6), layout=st.sampled_from(LAYOUTS),
       path=st.sampled_from(PATHS), extreme=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_every_path_random_shapes(m, k, r, layout, path, extreme, seed):
    rng = np.random.default_rng(seed)
    w = ternary(rng, 4 * r, k)
    q = (rng.choice(np.array([-128, 127, -127, 0], np.int8), size=(m, k)) if extreme
         else rng.integers(-128, 128, size=(m, k)).astype(np.int8))
    check_exact(q, w, layout, path)


@pytest.mark.parametrize("path", FAST)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_bitlinear_is_bit_identical_on_every_path(path, layout):
    rng = np.random.default_rng(7)
    w = ternary(rng, 64, 2560)
    p = packing.pack(w, layout)
    for m in (1, 2, 3, 8):
        x = (rng.standard_normal((m, 2560)) * 3).astype(np.float32)
        np.testing.assert_array_equal(bitlinear(x, p, 0.031, layout, path=path),
                                      bitlinear(x, p, 0.031, layout, path=select.REFERENCE))


@pytest.mark.parametrize("path", [p for p in FAST if p in select.VECTOR_PATHS])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_one_row_on_a_large_weight_is_one_shared_kernel_call_and_bit_identical(path, layout):
    """M = 1 on weights over 1 MB: quantize, the core shared with the pool's helpers and the
    rescale run in one kernel call (`bitlinear_one_row_shared`); odd packed rows, two callers."""
    from concurrent.futures import ThreadPoolExecutor

    rng = np.random.default_rng(5)
    w = ternary(rng, 1644, 2560)                    # 411 packed rows: 1.05 MB, odd
    p = packing.pack(w, layout)
    xs = [(rng.standard_normal(2560) * (1 + i)).astype(np.float32) for i in range(6)]
    want = [bitlinear(x, p, 0.031, layout, path=select.REFERENCE) for x in xs]
    for x, ref in zip(xs, want):
        np.testing.assert_array_equal(bitlinear(x, p, 0.031, layout, path=path), ref)
        np.testing.assert_array_equal(bitlinear(x[None, None], p, 0.031, layout, path=path)[0, 0], ref)
    with ThreadPoolExecutor(max_workers=3) as ex:
        got = list(ex.map(lambda x: bitlinear(x[None], p, 0.031, layout, path=path)[0], xs * 4))
    for y, ref in zip(got, want * 4):
        np.testing.assert_array_equal(y, ref)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("n, k", [(1644, 2560), (12, 33), (64, 2560)])   # over 1 MB (odd rows), small
def test_a_prepared_weight_is_bit_identical_to_bitlinear_on_every_path_and_follows_set_path(
        layout, n, k):
    """`Prepared` (the operator's bound nodes) keeps its one-row plan per path: each path the
    CPU has, set in turn, gives bitlinear's result; other shapes of x go to bitlinear."""
    from kernels.bitlinear import Prepared

    rng = np.random.default_rng(11)
    p = packing.pack(ternary(rng, n, k), layout)
    prepared = Prepared(p, np.float32(0.027), layout)
    xs = [(rng.standard_normal(shape) * 4).astype(np.float32)
          for shape in [(k,), (1, k), (1, 1, k), (3, k), (2, 2, k), (0, k)]]
    xs.append(xs[1].astype(np.float64))                          # cast, as bitlinear does
    xs.append(np.asfortranarray(np.tile(xs[1], (2, 1)))[:1])     # a view, not C-contiguous
    want = [bitlinear(x, p, 0.027, layout, path=select.REFERENCE) for x in xs]
    try:
        for path in PATHS:
            select.set_path(path)
            for x, ref in zip(xs, want):
                got = prepared(x)
                assert got.dtype == np.float32 and got.shape == ref.shape, (path, x.shape)
                np.testing.assert_array_equal(got, ref, err_msg=f"{path} x {x.shape}")
    finally:
        select.set_path(None)
    with pytest.raises(ValueError, match="K = 5"):
        prepared(np.zeros((1, 5), np.float32))


def test_a_path_this_cpu_lacks_or_an_unknown_one_is_refused():
    missing = [p for p in select.PATHS if p not in PATHS]
    q = np.zeros((1, 8), np.int8)
    p = packing.pack(np.zeros((4, 8), np.int8), "tdpu")
    for name in missing:
        with pytest.raises(ValueError, match="lacks"):
            ternary_matmul_int(q, p, "tdpu", path=name)
        with pytest.raises(ValueError, match="lacks"):
            select.set_path(name)
    with pytest.raises(ValueError, match="unknown kernel path 'numba-sse'"):
        select.set_path("numba-sse")


def test_set_path_overrides_the_choice_and_auto_returns_to_it():
    try:
        select.set_path(select.REFERENCE)
        assert select.chosen_path(1) == select.chosen_path(128) == select.REFERENCE
        assert select.selection()["source"] == "set_path"
        select.set_path("auto")
        assert select.chosen_path(1) in PATHS and select.chosen_path(128) in PATHS
        assert select.selection()["source"] in ("measured", "cached measurement", "only path")
    finally:
        select.set_path(None)


CHILD = textwrap.dedent("""
    import json, numpy as np
    from kernels import packing, select
    from kernels.bitlinear import ternary_matmul_int
    w = np.array([[1, 0, -1], [0, 1, 1], [-1, -1, 0], [1, 1, 1]], np.int8)
    q = np.array([[3, -2, 5]], np.int8)
    assert ternary_matmul_int(q, packing.pack(w, "tdpu"), "tdpu").tolist() == (q.astype(np.int64) @ w.T).tolist()
    print(json.dumps(select.selection()))
""")


def _child(tmp_path, **env_updates):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NUMBA_", "TDPU_"))}
    env.update({"PYTHONPATH": str(REPO), "NUMBA_CACHE_DIR": str(tmp_path / "numba"), **env_updates})
    proc = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True,
                          timeout=600, cwd=str(REPO))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.splitlines()[-1])


def test_the_choice_is_measured_once_per_machine_and_cached_beside_the_numba_cache(tmp_path):
    first = _child(tmp_path)
    expected = "only path" if len(PATHS) == 1 else "measured"
    assert first["source"] == expected and first["cpu"] == select.machine()["cpu"]
    if len(PATHS) == 1:
        return
    cached = json.loads((tmp_path / "numba" / select.CACHE_NAME).read_text())
    entry = cached[first["key"]]
    assert set(entry["timings_ms"]["decode"]) == set(PATHS)
    assert entry["decode"] == min(entry["timings_ms"]["decode"], key=entry["timings_ms"]["decode"].get)
    second = _child(tmp_path)
    assert second["source"] == "cached measurement"
    assert (second["decode"], second["prefill"]) == (first["decode"], first["prefill"])


def test_the_environment_variable_overrides_the_measurement(tmp_path):
    chosen = _child(tmp_path, TDPU_KERNEL_PATH=select.REFERENCE)
    assert (chosen["decode"], chosen["prefill"], chosen["source"]) == (
        select.REFERENCE, select.REFERENCE, "$TDPU_KERNEL_PATH")
    assert not (tmp_path / "numba" / select.CACHE_NAME).exists()


ASM = textwrap.dedent("""
    import re, sys
    from numba import types
    from kernels import int8, simd
    A = lambda dt, nd: types.Array(dt, nd, "C")
    sig = (simd.IsaType(sys.argv[1]), A(types.int8, 2), A(types.int32, 1), A(types.uint8, 2),
           A(types.int32, 2), types.int64, types.int64)
    for fn, extra in ((int8.rows_m1_claimed, (types.int64,)), (int8.rows_m2_claimed, ())):
        fn.compile(sig + extra + (A(types.int64, 1), A(types.int64, 1)))
        asm = "\\n".join(fn.inspect_asm().values())
        print(fn.__name__, *(len(re.findall(op, asm)) for op in ("vpmaddubsw", "vpdpbusd", "zmm", "vpsrlw")))
""")


@pytest.mark.parametrize("isa, cpu, features, instruction, zmm", [
    # An AVX2-only CPU named: on an AVX-512 host the host's own code would use zmm registers.
    ("avx2", "haswell", "+avx2,+fma,+bmi2", "vpmaddubsw", False),
    ("avxvnni", "alderlake", "+avx2,+fma,+bmi2,+avxvnni", "vpdpbusd", False),
    ("avx512vnni", "icelake-server", "+avx2,+fma,+bmi2,+avx512f,+avx512bw,+avx512vl,+avx512dq,+avx512vnni",
     "vpdpbusd", True),
])
@X86_ONLY
def test_each_path_compiles_to_its_8_bit_dot_product(tmp_path, isa, cpu, features, instruction, zmm):
    """Only compiled and inspected (never run) for CPUs this machine may not be."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NUMBA_")}
    env.update({"PYTHONPATH": str(REPO), "NUMBA_CACHE_DIR": str(tmp_path / "numba")})
    if cpu:
        env.update({"NUMBA_CPU_NAME": cpu, "NUMBA_CPU_FEATURES": features})
    proc = subprocess.run([sys.executable, "-c", ASM, isa], env=env, capture_output=True, text=True,
                          timeout=600, cwd=str(REPO))
    assert proc.returncode == 0, proc.stderr[-3000:]
    for line in proc.stdout.splitlines():
        name, maddubs, dpbusd, zmms, shifts = line.split()
        count = int(maddubs if instruction == "vpmaddubsw" else dpbusd)
        assert count >= 8, f"{name} for {isa}: {instruction} x {count}"
        assert (int(zmms) > 0) == zmm, line
        if instruction == "vpmaddubsw":
            assert int(dpbusd) == 0 and int(shifts) > 0     # AVX2 shifts the high codes down
        else:
            assert int(shifts) == 0, line                     # VNNI masks them in place


AMX_ASM = textwrap.dedent("""
    import re
    from numba import types
    from kernels import amx
    A = lambda dt, nd: types.Array(dt, nd, "C")
    amx.rows_claimed.compile((A(types.uint8, 1), A(types.int8, 3), A(types.int32, 1), A(types.uint8, 2),
                              A(types.int32, 2), types.int64, types.int64, A(types.int64, 1),
                              A(types.int64, 1)))
    asm = "\\n".join(amx.rows_claimed.inspect_asm().values())
    print(*(len(re.findall(op, asm)) for op in ("tdpbusd", "tileloadd", "ldtilecfg", "tilerelease")))
""")


@X86_ONLY
def test_the_amx_path_compiles_to_tile_dot_products(tmp_path):
    """Compiled for a Sapphire Rapids CPU and inspected, never run (this machine may lack AMX)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NUMBA_")}
    env.update({"PYTHONPATH": str(REPO), "NUMBA_CACHE_DIR": str(tmp_path / "numba"),
                "NUMBA_CPU_NAME": "sapphirerapids",
                "NUMBA_CPU_FEATURES": "+avx2,+fma,+bmi2,+avx512f,+avx512bw,+avx512vl,+avx512dq,"
                                      "+avx512vnni,+amx-tile,+amx-int8,+amx-bf16"})
    proc = subprocess.run([sys.executable, "-c", AMX_ASM], env=env, capture_output=True, text=True,
                          timeout=600, cwd=str(REPO))
    assert proc.returncode == 0, proc.stderr[-3000:]
    dots, loads, configs, releases = map(int, proc.stdout.split())
    assert dots >= 4 and loads >= 5 and configs >= 1 and releases >= 1, proc.stdout


def test_the_amx_path_is_exact_at_the_extremes_and_odd_sizes():
    """All -128 against all +1 / all -1 codes, M, K and packed rows off the tile grid."""
    if select.AMX not in PATHS:
        pytest.skip("this CPU or OS offers no AMX tiles (the codegen test above still ran)")
    for m, k, n in ((1, 1, 4), (15, 63, 60), (16, 64, 64), (17, 65, 68), (33, 2560, 6912 // 8)):
        for value in (-128, 127):
            q = np.full((m, k), value, np.int8)
            for wv in (-1, 1):
                check_exact(q, np.full((n, k), wv, np.int8), "tdpu", select.AMX)


@pytest.mark.parametrize("path", FAST or [select.REFERENCE])
def test_two_threads_sharing_the_helpers_get_exact_results(path):
    """Products big enough for the helper threads (kernels.pool), from two callers at once."""
    from concurrent.futures import ThreadPoolExecutor

    rng = np.random.default_rng(11)
    w = ternary(rng, 1644, 2560)                   # 1.05 MB packed, odd number of packed rows
    p = packing.pack(w, "hf")
    inputs = [rng.integers(-128, 128, size=(1 + i % 4, 2560)).astype(np.int8) for i in range(12)]
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda q: ternary_matmul_int(q, p, "hf", path=path), inputs))
    for q, out in zip(inputs, results):
        np.testing.assert_array_equal(out, int_reference(q, w))


VECTOR = [p for p in FAST if p in select.VECTOR_PATHS]


@pytest.mark.parametrize("path", VECTOR)
def test_a_stuck_helper_is_given_up_on_and_the_caller_redoes_the_core_alone(path):
    """bitlinear_one_row_shared with a chunk claimed that no one will finish (a helper preempted
    for good): after `stall` cycles the caller redoes the whole core; the result is exact."""
    from kernels import int8, pool, simd
    from kernels.bitlinear import _strides

    rng = np.random.default_rng(3)
    w = ternary(rng, 1644, 2560)
    for layout in LAYOUTS:
        p = packing.pack(w, layout)
        x = rng.standard_normal((1, 2560)).astype(np.float32)
        y = np.empty((1, 1644), np.float32)
        acc = np.empty((1, 1644), np.int32)
        ctrl = np.zeros(3, np.int64)
        ctrl[0] = 1                                      # chunk 0: claimed, never done
        int8.bitlinear_one_row_shared(simd.ISAS[path.removeprefix("numba-")], x, p, np.float32(0.031), y,
                                      *_strides(layout, p.shape[0]), 4, np.empty((1, 2560), np.int8),
                                      np.empty((1, 1), np.float32), np.empty(1, np.int32), acc, ctrl,
                                      np.zeros(1, np.int64), pool.cycles(0.01))
        np.testing.assert_array_equal(y, bitlinear(x, p, 0.031, layout, path=select.REFERENCE))


@pytest.mark.parametrize("path", VECTOR)
def test_a_helper_whose_caller_never_quantizes_gives_up_and_writes_nothing(path):
    from kernels import int8, pool, simd

    p = packing.pack(np.ones((64, 256), np.int8), "tdpu")
    q = np.ones((1, 256), np.int8)
    out = np.full((1, 64), -7, np.int32)
    ctrl = np.zeros(3, np.int64)                         # ctrl[2] (ready) never set
    int8.rows_m1_gated(simd.ISAS[path.removeprefix("numba-")], q, q.sum(1, dtype=np.int32), p, out, 4, 1, 2,
                       pool.cycles(0.02), ctrl, np.zeros(1, np.int64))
    assert ctrl[0] == 0 and (out == -7).all()
    ctrl[2] = 1                                          # ready: it claims and computes everything
    int8.rows_m1_gated(simd.ISAS[path.removeprefix("numba-")], q, q.sum(1, dtype=np.int32), p, out, 4, 1, 2,
                       pool.cycles(0.02), ctrl, np.zeros(1, np.int64))
    np.testing.assert_array_equal(out, int_reference(q, np.ones((64, 256), np.int8)))
