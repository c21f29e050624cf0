"""The numba BitLinear kernels (kernels/bitlinear.py): exactness, docs/spec.md §4 numerics, threads, cache."""

import os
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels import packing
from kernels.bitlinear import bitlinear, quantize_activations, ternary_matmul_int

REPO = Path(__file__).resolve().parent.parent
LAYOUTS = ("tdpu", "hf")


def ternary(rng, n, k):
    return rng.integers(-1, 2, size=(n, k)).astype(np.int8)


def int_reference(q, w):
    return q.astype(np.int64) @ w.astype(np.int64).T


def torch_quantize(x, s=None):
    """transformers' activation quantization `(x * s).round().clamp(-128, 127)`, in float32.

    transformers writes s = 127 / amax, which torch evaluates as 127 * (1 / amax); the ONNX
    graph (and the kernel) divide, which can differ by one ulp. Pass `s` to use the kernel's.
    """
    t = torch.from_numpy(x)
    if s is None:
        s = 127 / t.abs().max(dim=-1, keepdim=True).values.clamp(min=1e-5)
    else:
        s = torch.from_numpy(s)
    return (t * s).round().clamp(-128, 127).to(torch.int8).numpy(), s.numpy()


def onnx_scale(x):
    """s as the ONNX reference graph computes it: Div(127, Max(ReduceMax(Abs(x)), 1e-5))."""
    amax = np.maximum(np.abs(x).max(axis=-1, keepdims=True), np.float32(1e-5))
    return (np.float32(127) / amax).astype(np.float32)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("m, k, n", [(1, 1, 4), (1, 37, 12), (3, 129, 8), (2, 64, 4), (7, 250, 36), (1, 2560, 640)])
def test_ternary_matmul_equals_int64_reference(layout, m, k, n):
    rng = np.random.default_rng(m * 1000 + k + n)
    w = ternary(rng, n, k)
    q = rng.integers(-128, 128, size=(m, k)).astype(np.int8)
    out = ternary_matmul_int(q, packing.pack(w, layout), layout)
    assert out.dtype == np.int32 and out.shape == (m, n)
    np.testing.assert_array_equal(out, int_reference(q, w))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_ternary_matmul_extremes(layout):
    k, n = 1031, 20                                      # prime K, odd number of packed rows
    w = np.ones((n, k), np.int8)
    w[1::2] = -1
    w[2] = 0
    q = np.stack([np.full(k, -128), np.full(k, 127), np.zeros(k), (-1) ** np.arange(k) * 128 - 1 + (np.arange(k) % 2) * 2,
                  np.full(k, -128)]).astype(np.int8)
    out = ternary_matmul_int(q, packing.pack(w, layout), layout)
    np.testing.assert_array_equal(out, int_reference(q, w))
    assert out[0, 0] == -128 * k and out[1, 1] == -127 * k and not out[2].any()


@settings(max_examples=20, deadline=None)
@given(m=st.integers(1, 5), k=st.integers(1, 70), r=st.integers(1, 5), layout=st.sampled_from(LAYOUTS),
       seed=st.integers(0, 2**32 - 1))
def test_ternary_matmul_random_shapes(m, k, r, layout, seed):
    rng = np.random.default_rng(seed)
    w = ternary(rng, 4 * r, k)
    q = rng.integers(-128, 128, size=(m, k)).astype(np.int8)
    np.testing.assert_array_equal(ternary_matmul_int(q, packing.pack(w, layout), layout), int_reference(q, w))


def test_layouts_give_the_same_product_for_the_same_weights():
    rng = np.random.default_rng(3)
    w = ternary(rng, 24, 50)
    q = rng.integers(-128, 128, size=(3, 50)).astype(np.int8)
    np.testing.assert_array_equal(ternary_matmul_int(q, packing.pack(w, "tdpu"), "tdpu"),
                                  ternary_matmul_int(q, packing.pack(w, "hf"), "hf"))


def test_reserved_code_in_weights_is_reported():
    p = packing.pack(np.zeros((8, 16), np.int8), "tdpu")
    p[1, 3] = 0xFF
    with pytest.raises(packing.PackingError, match=r"byte \[1, 3\]"):
        ternary_matmul_int(np.zeros((1, 16), np.int8), p, "tdpu")


def test_mismatched_shapes_and_dtypes_are_errors():
    p = packing.pack(np.zeros((4, 8), np.int8), "tdpu")
    with pytest.raises(ValueError, match="K = 7"):
        ternary_matmul_int(np.zeros((1, 7), np.int8), p, "tdpu")
    with pytest.raises(ValueError, match="int8"):
        ternary_matmul_int(np.zeros((1, 8), np.float32), p, "tdpu")
    with pytest.raises(packing.PackingError, match="uint8"):
        bitlinear(np.zeros((1, 8), np.float32), p.astype(np.int8), 1.0, "tdpu")


@settings(max_examples=20, deadline=None)
@given(rows=st.integers(1, 4), k=st.integers(1, 40), seed=st.integers(0, 2**32 - 1),
       scale=st.sampled_from([1e-8, 1e-3, 1.0, 37.5, 1e4]))
def test_quantize_activations_equals_torch_rounding_and_onnx_scale(rows, k, seed, scale):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((rows, k)) * scale).astype(np.float32)
    x[0, 0] = np.float32(0.5) * x[0, -1]                 # encourages exact .5 products
    q, s = quantize_activations(x)
    np.testing.assert_array_equal(s, onnx_scale(x))
    np.testing.assert_array_max_ulp(s, torch_quantize(x)[1], maxulp=1)
    np.testing.assert_array_equal(q, torch_quantize(x, s)[0])


def test_quantize_rounds_half_to_even_and_handles_zero_rows():
    x = np.array([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5], [0, 0, 0, 0, 0, 0]], np.float32)
    q, s = quantize_activations(x)
    np.testing.assert_array_equal(q[0], [127, 0, 2, 2, 0, -2])
    assert not q[1].any() and s[1, 0] == np.float32(127) / np.float32(1e-5)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_bitlinear_matches_float64_reference(layout):
    rng = np.random.default_rng(4)
    k, n = 300, 40
    w = ternary(rng, n, k)
    x = (rng.standard_normal((2, 3, k)) * 3).astype(np.float32)
    ws = np.float32(0.8125)
    y = bitlinear(x, packing.pack(w, layout), ws, layout)
    assert y.shape == (2, 3, n) and y.dtype == np.float32
    q, s = torch_quantize(x, onnx_scale(x))
    ref = (q.astype(np.float64) @ w.T.astype(np.float64)) / s.astype(np.float64) * np.float64(ws)
    np.testing.assert_allclose(y, ref, rtol=2e-7, atol=1e-30)


def test_bitlinear_rescales_as_div_then_mul_in_float32():
    rng = np.random.default_rng(5)
    w = ternary(rng, 8, 33)
    x = rng.standard_normal((4, 33)).astype(np.float32)
    ws = np.float32(1.1)
    q, s = torch_quantize(x, onnx_scale(x))
    acc = int_reference(q, w).astype(np.float32)
    expected = (acc / s.astype(np.float32)).astype(np.float32) * ws
    np.testing.assert_array_equal(bitlinear(x, packing.pack(w, "tdpu"), np.array([ws]), "tdpu"), expected)


def test_two_threads_calling_the_kernel_at_once_get_correct_results():
    rng = np.random.default_rng(6)
    k, n = 512, 256
    w = ternary(rng, n, k)
    p = packing.pack(w, "tdpu")
    inputs = [rng.integers(-128, 128, size=(1 + i % 3, k)).astype(np.int8) for i in range(16)]

    def work(q):
        return ternary_matmul_int(q, p, "tdpu")

    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(work, inputs))
    for q, out in zip(inputs, results):
        np.testing.assert_array_equal(out, int_reference(q, w))


def _unwritable_dir(tmp_path: Path) -> Path:
    """A directory nobody can create (below a regular file): read-only even for root."""
    blocker = tmp_path / "blocker"
    blocker.write_text("not a directory")
    return blocker / "cache"


CHILD = textwrap.dedent("""
    import numpy as np, numba
    from kernels import packing
    from kernels.bitlinear import _ternary_rows1, ternary_matmul_int
    w = np.array([[1, 0, -1], [0, 1, 1], [-1, -1, 0], [1, 1, 1]], np.int8)
    q = np.array([[3, -2, 5]], np.int8)
    out = ternary_matmul_int(q, packing.pack(w, "tdpu"), "tdpu")
    assert out.tolist() == (q.astype(np.int64) @ w.T).tolist(), out
    print("ok", numba.config.CACHE_DIR, type(_ternary_rows1._cache).__name__)
""")


def _run_child(env_updates: dict) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NUMBA_")}
    env.update(env_updates)
    env["PYTHONPATH"] = str(REPO)
    return subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True,
                          timeout=300, cwd=str(REPO))


def test_kernels_run_when_the_numba_cache_dir_is_read_only(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    readonly = ro if not os.access(ro, os.W_OK) else _unwritable_dir(tmp_path)
    proc = _run_child({"NUMBA_CACHE_DIR": str(readonly)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("ok")


def test_default_cache_dir_falls_back_to_temp_when_home_is_read_only(tmp_path):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    proc = _run_child({"HOME": str(_unwritable_dir(tmp_path)), "TMPDIR": str(tmp)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split()[1].startswith(str(tmp / "tdpu-numba-"))


def test_kernels_compile_without_cache_when_nothing_is_writable(tmp_path):
    proc = _run_child({"NUMBA_CACHE_DIR": str(_unwritable_dir(tmp_path)),
                       "NUMBA_CACHE_LOCATOR_CLASSES": "numba.core.caching.UserProvidedCacheLocator"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split()[-1] == "NullCache"
