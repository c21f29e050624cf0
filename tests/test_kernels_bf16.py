"""The bfloat16 linear layer (kernels/bf16.py) and its ONNX Runtime operator `ai.tdpu::LinearBF16`
(kernels/ort.py): exact bf16 <-> float32 conversion, every code path of `linear_bf16` against a
float64 reference, and the graph rewrite of `create_session`."""

from __future__ import annotations

import gc
import re

import ml_dtypes
import numpy as np
import onnx
import onnxruntime
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

import bitlinear_graphs as bg
import kernels.bf16 as kbf16
from kernels import ort as kort
from kernels import packing
from kernels.bf16 import Bf16Error, bf16_bits, bf16_to_float32, linear_bf16
from kernels.bitlinear import bitlinear

NODE = "/lm_head/LinearBF16"


@pytest.fixture
def rng():
    return np.random.default_rng(20240611)


def random_bits(rng, shape, spread: int = 6) -> np.ndarray:
    """bf16 bit patterns of finite values of both signs over a few binades (truncated normals)."""
    v = rng.standard_normal(shape) * np.exp2(rng.integers(-spread, spread + 1, size=shape))
    return (v.astype(np.float32).view(np.uint32) >> np.uint32(16)).astype(np.uint16)


def reference(x: np.ndarray, bits: np.ndarray):
    """float64 x @ W.T and the float32 summation error bound K * 2**-23 * |x| @ |W|.T + K * 2**-149."""
    w = bf16_to_float32(bits).astype(np.float64)
    x64 = np.asarray(x, np.float32).astype(np.float64)
    k = w.shape[1]
    ref = x64 @ w.T
    bound = k * 2.0**-23 * (np.abs(x64) @ np.abs(w).T) + k * 2.0**-149
    return ref, bound


def assert_close(y: np.ndarray, x: np.ndarray, bits: np.ndarray) -> None:
    ref, bound = reference(x, bits)
    assert y.dtype == np.float32 and y.shape == ref.shape
    err = np.abs(y.astype(np.float64) - ref)
    worst = np.unravel_index(int(np.argmax(err - bound)), err.shape) if err.size else None
    assert (err <= bound).all(), f"error {err[worst]} > bound {bound[worst]} at {worst}"


def _spy(calls: list[str]):
    real = kbf16._launch

    def spy(kernel, *args):
        calls.append(getattr(kernel, "py_func", kernel).__name__)
        return real(kernel, *args)

    return spy


@pytest.fixture
def launches(monkeypatch):
    """Record which numba kernels linear_bf16 launches, by name."""
    calls: list[str] = []
    monkeypatch.setattr(kbf16, "_launch", _spy(calls))
    return calls


def expected_path(m: int, n: int, k: int = 1) -> list[str]:
    """M == 1: one pass over W (_gemv_one); M >= 2: the 2 x 8 register blocks (_gemm)."""
    if m == 0 or n == 0 or k == 0:
        return []
    return ["_gemv_one"] if m == 1 else ["_gemm"]


# ============================================================================ bf16 <-> float32

def test_every_bit_pattern_round_trips_exactly():
    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    f = bf16_to_float32(bits)
    assert f.dtype == np.float32 and f.shape == bits.shape
    # bf16 is the top half of a float32: the low half is zero, the top half is the pattern
    np.testing.assert_array_equal(f.view(np.uint32) >> 16, bits)
    np.testing.assert_array_equal(f.view(np.uint32) & 0xFFFF, 0)
    # ... and agrees with an independent bfloat16 implementation (NaNs compared as bits)
    np.testing.assert_array_equal(bits.view(ml_dtypes.bfloat16).astype(np.float32).view(np.uint32),
                                  f.view(np.uint32))
    back = bf16_bits(f)
    assert back.dtype == np.uint16 and back.flags.c_contiguous
    np.testing.assert_array_equal(back, bits)       # incl. +-0, +-inf, NaN payloads, subnormals


@pytest.mark.parametrize("pattern, value", [
    (0x0000, 0.0), (0x3F80, 1.0), (0xBF80, -1.0), (0x4049, 3.140625),
    (0x7F80, np.inf), (0xFF80, -np.inf),
    (0x0080, 2.0**-126),                             # smallest normal
    (0x0001, 2.0**-133),                             # smallest subnormal
    (0x807F, -(2.0**-126 - 2.0**-133)),              # largest negative subnormal
    (0x7F7F, (2 - 2.0**-7) * 2.0**127),              # largest finite
])
def test_special_values(pattern, value):
    f = bf16_to_float32(np.array([pattern], np.uint16))
    assert f[0] == value
    assert bf16_bits(np.array([value], np.float32))[0] == pattern


def test_negative_zero_and_nan_keep_their_bits():
    f = bf16_to_float32(np.array([0x8000, 0x7FC0, 0xFFC1, 0x7F81], np.uint16))
    assert f[0] == 0 and np.signbit(f[0])
    assert np.isnan(f[1:]).all()
    np.testing.assert_array_equal(bf16_bits(f), [0x8000, 0x7FC0, 0xFFC1, 0x7F81])
    assert bf16_bits(np.array([-0.0], np.float32))[0] == 0x8000


def test_shapes_layouts_and_input_types_are_accepted():
    bits = np.arange(24, dtype=np.uint16).reshape(2, 3, 4) + 0x3F00
    f = bf16_to_float32(bits)
    assert f.shape == (2, 3, 4)
    np.testing.assert_array_equal(bf16_bits(f), bits)
    np.testing.assert_array_equal(bf16_to_float32(bits.transpose(2, 0, 1)), f.transpose(2, 0, 1))
    np.testing.assert_array_equal(bf16_bits(f.transpose(2, 0, 1)), bits.transpose(2, 0, 1))
    np.testing.assert_array_equal(bf16_to_float32([0x3F80, 0x4000]), [1.0, 2.0])
    assert bf16_to_float32(np.uint16(0x3F80)).tolist() == 1.0           # 0-d stays 0-d
    assert bf16_bits(np.float32(-2.0)).tolist() == 0xC000
    assert bf16_bits(np.zeros((0, 5), np.float32)).shape == (0, 5)
    # float16 values widen exactly; bf16 values of a wider dtype convert exactly
    np.testing.assert_array_equal(bf16_bits(np.array([0.5, -3.0], np.float16)), [0x3F00, 0xC040])
    np.testing.assert_array_equal(bf16_bits(np.array([0.5, -3.0], np.float64)), [0x3F00, 0xC040])


def test_non_bf16_value_is_rejected_naming_where_the_count_and_the_first_value():
    w = np.array([[1.0, 2.0, 3.0], [4.0, 1.1, 0.1]], np.float32)
    with pytest.raises(Bf16Error) as info:
        bf16_bits(w, "model.embed_tokens.weight")
    msg = str(info.value)
    assert msg.startswith("model.embed_tokens.weight: 2 of 6 values are not bfloat16 values")
    assert repr(float(np.float32(1.1))) in msg and "at [1, 1]" in msg
    assert "0.1" not in msg                                   # only the first offender
    assert isinstance(info.value, ValueError)
    one_one = re.escape(repr(float(np.float32(1.1))))      # '1.100000023841858'
    with pytest.raises(Bf16Error, match=rf"^weights: 1 of 1 values .*\(the first, {one_one} at \[0\], "):
        bf16_bits(np.array([1.1], np.float32))
    # one bit below bf16's mantissa is enough; so is a NaN whose payload sits in the low half
    with pytest.raises(Bf16Error, match=r"lm_head: 1 of 3 .*at \[2\]"):
        bf16_bits(np.array([1.0, -0.0, 1.0 + 2.0**-23], np.float32), "lm_head")
    with pytest.raises(Bf16Error, match=r"1 of 1 .*nan at \[0\]"):
        bf16_bits(np.array([0x7FC00001], np.uint32).view(np.float32))
    with pytest.raises(Bf16Error, match=r"1 of 1 .*at \[\], has mantissa bits"):
        bf16_bits(np.float32(0.1))


def test_zero_dimensional_input_keeps_its_shape():
    f = bf16_to_float32(np.array(0x3F80, np.uint16))
    assert f.shape == () and f.dtype == np.float32 and f == 1.0
    b = bf16_bits(np.array(-2.0, np.float32))
    assert b.shape == () and b.dtype == np.uint16 and b == 0xC000
    assert bf16_bits(np.array(0.5, np.float64)).shape == ()
    np.testing.assert_array_equal(bf16_bits(bf16_to_float32(np.array(0x807F, np.uint16))), 0x807F)


@pytest.mark.parametrize("value, dtype, shown", [
    (1.0 + 2.0**-30, np.float64, repr(1.0 + 2.0**-30)),          # rounds to 1.0 in float32
    (2.0**-160, np.float64, repr(2.0**-160)),                     # rounds to 0 in float32
    (1.0 + 2.0**-30, np.longdouble, None),
    (2**24 + 1, np.int64, "16777217.0"),                          # rounds to 2**24 in float32
])
def test_wider_input_that_is_not_a_float32_is_rejected(value, dtype, shown):
    with pytest.raises(Bf16Error, match=r"^lm_head: 1 of 2 values are not bfloat16 values \(the first, "
                       r".* at \[1\], is not even a float32\); storing them as bf16 would round them$") as info:
        bf16_bits(np.array([1, value], dtype), "lm_head")
    if shown is not None:
        assert f"the first, {shown} at [1]" in str(info.value)
    with pytest.raises(Bf16Error, match=r"1 of 1 .* at \[\], is not even a float32"):
        bf16_bits(np.array(value, dtype))                         # 0-d


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
def test_float64_beyond_the_float32_range_is_rejected():
    with pytest.raises(Bf16Error, match=r"1 of 1 .*1e\+300 at \[0\], is not even a float32"):
        bf16_bits(np.array([1e300]))


def test_wider_input_that_is_exactly_bf16_converts():
    v = np.array([0.5, -3.0, 2.0**-133, -(2.0**127), np.inf, -0.0, np.nan], np.float64)
    expected = [0x3F00, 0xC040, 0x0001, 0xFF00, 0x7F80, 0x8000, 0x7FC0]
    np.testing.assert_array_equal(bf16_bits(v), expected)
    np.testing.assert_array_equal(bf16_bits(v.astype(np.longdouble)), expected)
    np.testing.assert_array_equal(bf16_bits(np.array([[3, -256], [0, 1 << 20]], np.int64)),
                                  [[0x4040, 0xC380], [0x0000, 0x4980]])
    # a float64 that is a float32 but not a bfloat16 gets the float32 message
    with pytest.raises(Bf16Error, match=r"at \[0\], has mantissa bits below bfloat16's"):
        bf16_bits(np.array([1.0 + 2.0**-23], np.float64))


# ============================================================================ linear_bf16

MS = [0, 1, 2, 3, 5, 8, 9, 17]          # 1: _gemv_one; even / odd M >= 2: _gemm (pairs + last row)
NS = [1, 7, 8, 9, 37]                   # N < 8 (leftover task only), N % 8 == 0, N % 8 != 0


@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("m", MS)
def test_every_path_is_exact_on_small_integers(m, n, launches):
    # Integers below 2**24 in every partial sum: any order of float32 sums is exact.
    rng = np.random.default_rng(100 * m + n)
    k = 33
    w = rng.integers(-8, 9, size=(n, k)).astype(np.float32)
    x = rng.integers(-16, 17, size=(m, k)).astype(np.float32)
    y = linear_bf16(x, bf16_bits(w))
    assert y.shape == (m, n) and y.dtype == np.float32
    np.testing.assert_array_equal(y, (x.astype(np.int64) @ w.astype(np.int64).T).astype(np.float32))
    assert launches == expected_path(m, n)


@pytest.mark.parametrize("m", MS[1:])
@pytest.mark.parametrize("n, k", [(37, 67), (8, 1), (3, 130), (1, 67), (7, 5), (9, 130), (16, 2)])
def test_every_path_matches_the_float64_reference(rng, launches, m, n, k):
    bits = random_bits(rng, (n, k))
    x = (rng.standard_normal((m, k)) * 3).astype(np.float32)
    y = linear_bf16(x, bits)
    assert_close(y, x, bits)
    assert launches == expected_path(m, n)


@pytest.mark.parametrize("m", [1, 2, 3, 5, 8, 9, 17])
@pytest.mark.parametrize("n", [1, 7, 8, 9, 37])
def test_the_kernels_write_every_output(rng, m, n):
    # Called directly on an output full of NaNs: every block, the N % 8 leftover rows of W
    # (the extra last prange task) and the last odd row of x must each be written.
    k = 11
    bits = random_bits(rng, (n, k))
    x = rng.standard_normal((m, k)).astype(np.float32)
    out = np.full((m, n), np.nan, np.float32)
    kbf16._launch(kbf16._gemv_one if m == 1 else kbf16._gemm, x, bits, out)
    assert not np.isnan(out).any()
    assert_close(out, x, bits)


def test_many_blocks_and_a_partial_last_one(rng, launches):
    n, k = 8 * 37 + 5, 45
    bits = random_bits(rng, (n, k))
    for m in (1, 2, 7):
        x = rng.standard_normal((m, k)).astype(np.float32)
        assert_close(linear_bf16(x, bits), x, bits)
    assert launches == ["_gemv_one", "_gemm", "_gemm"]


@pytest.mark.parametrize("lead", [(1, 1), (2, 3), (3, 5), (1,), (4, 1, 2)])
def test_batch_dimensions(rng, lead):
    n, k = 13, 19
    bits = random_bits(rng, (n, k))
    x = rng.standard_normal(lead + (k,)).astype(np.float32)
    y = linear_bf16(x, bits)
    assert y.shape == lead + (n,)
    assert_close(y, x, bits)
    # the same rows as one 2-D call (same M, so the same path): bit for bit
    np.testing.assert_array_equal(y.reshape(-1, n), linear_bf16(x.reshape(-1, k), bits))


def test_one_dimensional_x(rng):
    bits = random_bits(rng, (6, 5))
    x = rng.standard_normal(5).astype(np.float32)
    y = linear_bf16(x, bits)
    assert y.shape == (6,)
    np.testing.assert_array_equal(y, linear_bf16(x[None], bits)[0])


@pytest.mark.parametrize("x_shape, n, y_shape", [
    ((0, 7), 5, (0, 5)), ((2, 0, 7), 5, (2, 0, 5)), ((0, 0, 7), 3, (0, 0, 3)),
    ((1, 7), 0, (1, 0)), ((3, 7), 0, (3, 0)), ((10, 7), 0, (10, 0)), ((2, 3, 7), 0, (2, 3, 0)),
])
def test_empty_inputs_and_outputs(x_shape, n, y_shape, launches):
    y = linear_bf16(np.ones(x_shape, np.float32), np.full((n, 7), 0x3F80, np.uint16))
    assert y.shape == y_shape and y.dtype == np.float32
    assert launches == []


@pytest.mark.parametrize("x_shape, n", [
    ((1, 0), 4), ((2, 0), 4), ((3, 0), 9), ((9, 0), 1), ((0,), 5), ((2, 3, 0), 7), ((0, 0), 4), ((3, 0), 0),
])
def test_zero_features_give_zeros(x_shape, n, launches):
    y = linear_bf16(np.ones(x_shape, np.float32), np.zeros((n, 0), np.uint16))
    assert y.dtype == np.float32
    np.testing.assert_array_equal(y, np.zeros(x_shape[:-1] + (n,), np.float32))
    assert launches == []


@pytest.mark.parametrize("m", [1, 2, 3, 9])
def test_layouts_and_dtypes_of_the_arguments(rng, m):
    bits = random_bits(rng, (10, 12))
    x = rng.standard_normal((m, 12)).astype(np.float32)
    expected = linear_bf16(x, bits)
    np.testing.assert_array_equal(linear_bf16(x, bits), expected)              # deterministic
    np.testing.assert_array_equal(linear_bf16(np.asfortranarray(x), np.asfortranarray(bits)), expected)
    wide = np.zeros((10, 24), np.uint16)
    wide[:, ::2] = bits
    np.testing.assert_array_equal(linear_bf16(x, wide[:, ::2]), expected)      # strided W
    xt = np.ascontiguousarray(x.T).T
    np.testing.assert_array_equal(linear_bf16(xt, bits), expected)             # transposed view
    np.testing.assert_array_equal(linear_bf16(x.astype(np.float64), bits), expected)
    np.testing.assert_array_equal(linear_bf16(x.tolist(), bits), expected)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")   # sgemm's 0 * inf
@pytest.mark.parametrize("n", [4, 12])                       # leftover rows only / a block and leftovers
@pytest.mark.parametrize("m", [1, 2, 4, 5, 9])
def test_infinities_and_nans_propagate_on_every_path(m, n):
    w = np.full((n, 3), 0x3F80, np.uint16)                   # ones
    for r in (0, n - 4):
        w[r, 1], w[r + 1, 2], w[r + 2, 0] = 0x7F80, 0xFF80, 0x7FC0   # +inf, -inf, nan
    y = linear_bf16(np.ones((m, 3), np.float32), w)
    for r in (0, n - 4):
        assert (y[:, r] == np.inf).all() and (y[:, r + 1] == -np.inf).all()
        assert np.isnan(y[:, r + 2]).all() and (y[:, r + 3] == 3).all()
    y0 = linear_bf16(np.zeros((m, 3), np.float32), w)        # 0 * inf = nan
    for r in (0, n - 4):
        assert np.isnan(y0[:, r:r + 3]).all() and (y0[:, r + 3] == 0).all()


@pytest.mark.parametrize("rows", [1, 5])                     # 2 rows of W / 10 (a block and 2 left over)
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 9])
def test_subnormal_weights_are_not_flushed(m, rows):
    w = np.tile(np.array([[0x0001, 0x0040, 0x8003], [0x807F, 0x0001, 0x0000]], np.uint16), (rows, 1))
    x = np.full((m, 3), 0.5, np.float32)
    x[:, 1] = 4.0
    y = linear_bf16(x, w)
    ref = (x.astype(np.float64) @ bf16_to_float32(w).astype(np.float64).T).astype(np.float32)
    assert (ref != 0).all()
    np.testing.assert_array_equal(y, ref)        # exact: every product and sum is representable


def test_wrong_weights_are_rejected():
    x = np.ones((2, 3), np.float32)
    with pytest.raises(Bf16Error, match=r"^expected bf16 weights as uint16 \[N, K\], found float32 \[4, 3\]$"):
        linear_bf16(x, np.ones((4, 3), np.float32))
    with pytest.raises(Bf16Error, match=r"found int16 \[4, 3\]"):
        linear_bf16(x, np.ones((4, 3), np.int16))
    with pytest.raises(Bf16Error, match=r"found uint16 \[3\]"):
        linear_bf16(x, np.ones(3, np.uint16))
    with pytest.raises(Bf16Error, match=r"found uint16 \[1, 4, 3\]"):
        linear_bf16(x, np.ones((1, 4, 3), np.uint16))


@pytest.mark.parametrize("x_shape", [(1, 6), (3, 6), (9, 6), (2, 2, 6), (5,), (1, 8)])
def test_wrong_number_of_features_is_rejected(x_shape, launches):
    with pytest.raises(Bf16Error, match=r"^activations have shape \[" + ", ".join(map(str, x_shape))
                       + r"\], their last dimension must equal the weights' K = 7$"):
        linear_bf16(np.ones(x_shape, np.float32), np.ones((4, 7), np.uint16))
    assert launches == []


def test_scalar_activations_are_rejected():
    with pytest.raises(Bf16Error, match=r"activations have shape \[\].*K = 1"):
        linear_bf16(np.float32(1.0), np.ones((2, 1), np.uint16))


@settings(max_examples=60, deadline=None, derandomize=True)
@given(m=st.integers(0, 20), n=st.integers(0, 40), k=st.integers(0, 48), seed=st.integers(0, 2**32 - 1))
def test_property_linear_bf16_matches_the_reference(m, n, k, seed):
    rng = np.random.default_rng(seed)
    bits = random_bits(rng, (n, k), spread=10)
    x = (rng.standard_normal((m, k)) * np.exp2(rng.integers(-10, 11, size=(m, 1)))).astype(np.float32)
    calls: list[str] = []
    real = kbf16._launch
    kbf16._launch = _spy(calls)       # hypothesis does not mix with function-scoped monkeypatch
    try:
        y = linear_bf16(x, bits)
    finally:
        kbf16._launch = real
    assert_close(y, x, bits)
    assert calls == expected_path(m, n, k)


# ============================================================================ ai.tdpu::LinearBF16

def bf16_tensor(name: str, bits: np.ndarray) -> onnx.TensorProto:
    return helper.make_tensor(name, TensorProto.BFLOAT16, list(bits.shape), bits.tobytes(), raw=True)


def bf16_model(bits, *, node=NODE, x_dims=("batch", "seq", None), attrs=None, w_tensor=None,
               w_input=False) -> onnx.ModelProto:
    """X float32 [..., K] -> LinearBF16(X, W bf16 [N, K]) -> Y; `x_dims` None = K."""
    n, k = bits.shape
    attributes = {"in_features": k, "out_features": n}
    attributes.update(attrs or {})
    lin = helper.make_node("LinearBF16", ["X", "lm_head.weight"], ["Y"], domain="ai.tdpu", name=node,
                           **{a: v for a, v in attributes.items() if v is not None})
    inputs = [helper.make_tensor_value_info("X", TensorProto.FLOAT, [d if d is not None else k for d in x_dims])]
    inits = []
    if w_input:
        inputs.append(helper.make_tensor_value_info("lm_head.weight", TensorProto.BFLOAT16, [n, k]))
    else:
        inits.append(bf16_tensor("lm_head.weight", bits) if w_tensor is None else w_tensor)
    graph = helper.make_graph([lin], "linear_bf16", inputs,
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.tdpu", 1)])


def mixed_model(rng, *, k=24, hidden=32, vocab=37, layout="tdpu"):
    """X [.., K] -> BitLinear (K -> hidden) -> Relu -> LinearBF16 (hidden -> vocab)."""
    b = bg.Builder(rng)
    w = b.ternary(hidden, k)
    packed = packing.pack(w, layout)
    bits = random_bits(rng, (vocab, hidden))
    h = b.node("BitLinear", ["X", b.init("model.layers.0.mlp.down_proj.weight", packed),
                             b.init("model.layers.0.mlp.down_proj.weight_scale", np.array([0.625], np.float32))],
               "/model/layers.0/mlp/down_proj/BitLinear", domain="ai.tdpu", in_features=k,
               out_features=hidden, layout=layout)
    h = b.node("Relu", [h], "/model/Relu")
    b.inits.append(bf16_tensor("lm_head.weight", bits))
    b.nodes.append(helper.make_node("LinearBF16", [h, "lm_head.weight"], ["logits"], domain="ai.tdpu",
                                    name=NODE, in_features=hidden, out_features=vocab))
    graph = helper.make_graph(b.nodes, "mixed", [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["b", "s", k])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)], b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.tdpu", 1)])

    def expected(x):
        return linear_bf16(np.maximum(bitlinear(x, packed, np.float32(0.625), layout), 0), bits)

    return model, expected


@pytest.mark.parametrize("shape", [(1, 1, 19), (1, 5, 19), (2, 7, 19), (1, 0, 19)])
def test_session_matches_the_reference(rng, shape):
    bits = random_bits(rng, (37, 19))
    session = kort.create_session(bf16_model(bits))
    x = (rng.standard_normal(shape) * 2).astype(np.float32)
    (y,) = session.run(None, {"X": x})
    assert y.shape == shape[:-1] + (37,)
    assert_close(y, x, bits)
    np.testing.assert_array_equal(y, linear_bf16(x, bits))      # the operator is linear_bf16


def test_rewrite_moves_w_out_of_the_graph(rng):
    bits = random_bits(rng, (12, 5))
    model = bf16_model(bits)
    keys = kort._rewrite(model, None)
    try:
        assert len(keys) == 1
        assert [t.name for t in model.graph.initializer] == [f"lm_head.weight{kort.KEY_SUFFIX}/0"]
        key_init = numpy_helper.to_array(model.graph.initializer[0])
        assert key_init.dtype == np.int64 and key_init.tolist() == keys
        (node,) = model.graph.node
        assert (node.domain, node.op_type) == ("ai.tdpu", "LinearBF16Prepacked")
        assert list(node.input) == ["X", f"lm_head.weight{kort.KEY_SUFFIX}/0"]
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        assert attrs == {"in_features": 5, "out_features": 12, "node_name": NODE.encode()}
        np.testing.assert_array_equal(kort._entries[keys[0]].packed, bits)
    finally:
        kort._release(keys)


def test_weights_live_in_the_registry_while_the_session_lives(rng):
    n, k = 40, 23
    bits = random_bits(rng, (n, k))
    model = bf16_model(bits)
    gc.collect()
    start = kort.cache_info()
    first = kort.create_session(model)
    after = kort.cache_info()
    assert after == {"entries": start["entries"] + 1, "bytes": start["bytes"] + n * k * 2}
    assert [i.name for i in first.get_inputs()] == ["X"]
    second = kort.create_session(model.SerializeToString())   # same weights: one shared entry
    assert kort.cache_info() == after
    assert [nd.op_type for nd in model.graph.node] == ["LinearBF16"]            # caller's model intact
    assert [t.name for t in model.graph.initializer] == ["lm_head.weight"]
    del first
    gc.collect()
    assert kort.cache_info() == after
    x = rng.standard_normal((1, 2, k)).astype(np.float32)
    np.testing.assert_array_equal(second.run(None, {"X": x})[0], linear_bf16(x, bits))
    del second
    gc.collect()
    assert kort.cache_info() == start


def test_model_file_with_external_data_loaded_by_path(tmp_path, rng):
    model, expected = mixed_model(rng)
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
              location="m.onnx.data", size_threshold=0)
    on_disk = onnx.load(str(path), load_external_data=False)
    assert all(t.data_location == TensorProto.EXTERNAL for t in on_disk.graph.initializer)
    before = path.read_bytes(), (tmp_path / "m.onnx.data").read_bytes()
    gc.collect()
    start = kort.cache_info()["entries"]
    session = kort.create_session(path, threads=1)
    assert kort.cache_info()["entries"] == start + 2
    for shape in [(1, 1, 24), (3, 4, 24)]:
        x = rng.standard_normal(shape).astype(np.float32)
        (y,) = session.run(None, {"X": x})
        np.testing.assert_array_equal(y, expected(x))
    assert (path.read_bytes(), (tmp_path / "m.onnx.data").read_bytes()) == before
    del session
    gc.collect()
    assert kort.cache_info()["entries"] == start


def test_a_graph_mixing_bitlinear_and_linear_bf16(rng):
    model, expected = mixed_model(rng, layout="hf")
    session = kort.create_session(model)
    for shape in [(1, 1, 24), (1, 6, 24), (2, 9, 24)]:
        x = (rng.standard_normal(shape) * 3).astype(np.float32)
        (y,) = session.run(None, {"X": x})
        assert y.shape == shape[:-1] + (37,)
        np.testing.assert_array_equal(y, expected(x))


def tied_model(bits, *, embeddings_out=False, w_as_input=False) -> onnx.ModelProto:
    """lm_head.py's tied form: Cast(Gather(W_bf16, ids)) -> ... -> LinearBF16(., W_bf16)."""
    n, k = bits.shape
    nodes = [helper.make_node("Gather", ["W", "ids"], ["e16"], name="/model/embed_tokens/Gather"),
             helper.make_node("Cast", ["e16"], ["e"], to=TensorProto.FLOAT, name="/model/embed_tokens/Cast"),
             helper.make_node("LinearBF16", ["e", "W"], ["logits"], domain="ai.tdpu", name=NODE,
                              in_features=k, out_features=n)]
    inputs = [helper.make_tensor_value_info("ids", TensorProto.INT64, ["b", "s"])]
    if w_as_input:
        inputs.append(helper.make_tensor_value_info("W", TensorProto.BFLOAT16, [n, k]))
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)]
    if embeddings_out:
        outputs.append(helper.make_tensor_value_info("e", TensorProto.FLOAT, None))
    graph = helper.make_graph(nodes, "tied", inputs, outputs, [bf16_tensor("W", bits)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.tdpu", 1)])


def save_external(model: onnx.ModelProto, path) -> None:
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
              location=path.name + ".data", size_threshold=0)


def test_a_tied_table_read_by_gather_stays_in_the_graph(rng):
    n, k = 29, 16
    bits = random_bits(rng, (n, k), spread=2)
    model = tied_model(bits)
    rewritten = onnx.ModelProto()
    rewritten.CopyFrom(model)
    shared: dict = {}
    keys = kort._rewrite(rewritten, None, shared)
    kort._release(keys)
    assert {t.name for t in rewritten.graph.initializer} == {"W", f"W{kort.KEY_SUFFIX}/2"}
    assert shared == {}                          # inline data: ONNX Runtime keeps its own W
    session = kort.create_session(model)
    assert session._tdpu_shared == []
    ids = np.array([[0, 5, 28], [3, 3, 1]], np.int64)
    (y,) = session.run(None, {"ids": ids})
    table = bf16_to_float32(bits)
    np.testing.assert_array_equal(y, linear_bf16(table[ids], bits))


def test_a_tied_table_in_external_data_is_held_once(tmp_path, rng):
    n, k = 37, 24
    bits = random_bits(rng, (n, k), spread=3)
    path = tmp_path / "tied.onnx"
    save_external(tied_model(bits, embeddings_out=True), path)
    on_disk = onnx.load(str(path), load_external_data=False)
    assert on_disk.graph.initializer[0].data_location == TensorProto.EXTERNAL
    before = path.read_bytes(), (tmp_path / "tied.onnx.data").read_bytes()

    # the rewrite hands over the registry's own array for the Gather's W
    shared: dict = {}
    keys = kort._rewrite(on_disk, str(tmp_path), shared)
    try:
        assert list(shared) == ["W"] and len(keys) == 1
        assert shared["W"] is kort._entries[keys[0]].packed
        assert shared["W"].dtype == np.uint16 and shared["W"].flags.c_contiguous
        np.testing.assert_array_equal(shared["W"], bits)
        assert {t.name for t in on_disk.graph.initializer} == {"W", f"W{kort.KEY_SUFFIX}/2"}
    finally:
        kort._release(keys)

    gc.collect()
    start = kort.cache_info()
    session = kort.create_session(path)
    assert kort.cache_info() == {"entries": start["entries"] + 1, "bytes": start["bytes"] + n * k * 2}
    (value,) = session._tdpu_shared
    assert isinstance(value, onnxruntime.OrtValue)
    assert value.data_type() == "tensor(bfloat16)" and value.shape() == [n, k]
    entry = next(e for e in kort._entries.values() if e.packed.shape == (n, k) and np.array_equal(e.packed, bits))
    assert value.data_ptr() == entry.packed.ctypes.data        # the OrtValue wraps the registry's array

    table = bf16_to_float32(bits)
    ids = np.array([[0, 36, 5, 5], [17, 1, 2, 36]], np.int64)
    first = session.run(None, {"ids": ids})
    logits, emb = first
    np.testing.assert_array_equal(emb, table[ids])
    assert_close(logits, table[ids], bits)
    np.testing.assert_array_equal(logits, linear_bf16(table[ids], bits))
    for one in (np.array([[7]], np.int64), ids):               # decode step, then the batch again
        again = session.run(None, {"ids": one})
        np.testing.assert_array_equal(again[1], table[one])
        np.testing.assert_array_equal(again[0], linear_bf16(table[one], bits))
    gc.collect()
    for a, b in zip(first, session.run(None, {"ids": ids})):   # stable: the shared memory stays alive
        np.testing.assert_array_equal(a, b)
    assert (path.read_bytes(), (tmp_path / "tied.onnx.data").read_bytes()) == before
    del session, value
    gc.collect()
    assert kort.cache_info() == start


def test_a_weight_read_only_by_linear_bf16_nodes_is_not_shared(tmp_path, rng):
    # Two LinearBF16 nodes on one external W: the first sees another use, but the second
    # drops W, so nothing is left to share.
    n = k = 16
    bits = random_bits(rng, (n, k))
    nodes = [helper.make_node("LinearBF16", ["X", "W"], ["H"], domain="ai.tdpu", name="/a",
                              in_features=k, out_features=n),
             helper.make_node("LinearBF16", ["H", "W"], ["Y"], domain="ai.tdpu", name="/b",
                              in_features=k, out_features=n)]
    graph = helper.make_graph(nodes, "two", [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["b", k])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)], [bf16_tensor("W", bits)])
    path = tmp_path / "two.onnx"
    save_external(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                          helper.make_opsetid("ai.tdpu", 1)]), path)
    model = onnx.load(str(path), load_external_data=False)
    shared: dict = {}
    keys = kort._rewrite(model, str(tmp_path), shared)
    kort._release(keys)
    assert shared == {} and len(keys) == 2 and keys[0] == keys[1]
    assert "W" not in {t.name for t in model.graph.initializer}
    session = kort.create_session(path)
    assert session._tdpu_shared == []
    x = rng.standard_normal((3, k)).astype(np.float32)
    np.testing.assert_array_equal(session.run(None, {"X": x})[0], linear_bf16(linear_bf16(x, bits), bits))


def test_the_gather_reads_the_registry_memory(tmp_path, rng):
    """The tied table is held once: ONNX Runtime's Gather reads the registry's array (given with
    SessionOptions.add_initializer; add_external_initializers would copy it)."""
    import ctypes

    n, k = 21, 8
    bits = random_bits(rng, (n, k))
    path = tmp_path / "tied.onnx"
    save_external(tied_model(bits, embeddings_out=True), path)
    session = kort.create_session(path)
    (value,) = session._tdpu_shared
    # a writable alias of the (read-only) registry array, restored below
    alias = np.ctypeslib.as_array((ctypes.c_uint16 * (n * k)).from_address(value.data_ptr())).reshape(n, k)
    ids = np.array([[0, 1]], np.int64)
    saved = alias[0].copy()
    try:
        alias[0] = 0x3F80
        logits, emb = session.run(None, {"ids": ids})
    finally:
        alias[0] = saved
    assert (logits[0, 0, 0] != linear_bf16(bf16_to_float32(bits)[ids], bits)[0, 0, 0])   # LinearBF16 does
    assert (emb[0, 0] == 1.0).all()                                                      # the Gather should


def test_plain_session_options_do_not_run_linear_bf16(rng):
    # LinearBF16 is deliberately not registered (the bridge cannot take a bfloat16 input):
    # a plain session fails to build instead of aborting the process.
    model = bf16_model(random_bits(rng, (4, 3)))
    with pytest.raises(Exception, match="LinearBF16"):
        onnxruntime.InferenceSession(model.SerializeToString(), kort.session_options(),
                                     providers=["CPUExecutionProvider"])


def _float_w(bits):
    return numpy_helper.from_array(bf16_to_float32(bits), "lm_head.weight")


def _float16_w(bits):
    return numpy_helper.from_array(bf16_to_float32(bits).astype(np.float16), "lm_head.weight")


def _transposed_w(bits):
    return bf16_tensor("lm_head.weight", np.ascontiguousarray(bits.T))


@pytest.mark.parametrize("kwargs, message", [
    ({"w_tensor": _float_w}, r"W 'lm_head.weight' is FLOAT, expected BFLOAT16"),
    ({"w_tensor": _float16_w}, r"W 'lm_head.weight' is FLOAT16, expected BFLOAT16"),
    ({"w_tensor": _transposed_w},
     r"W 'lm_head.weight' has shape \[16, 12\], expected \[out_features, in_features\] = \[12, 16\]"),
    ({"attrs": {"out_features": 13}},
     r"W 'lm_head.weight' has shape \[12, 16\], expected \[out_features, in_features\] = \[13, 16\]"),
    ({"w_input": True}, r"W 'lm_head.weight' must be an initializer"),
    ({"attrs": {"in_features": None}}, r"missing attribute 'in_features' \(int\)"),
    ({"attrs": {"out_features": None}}, r"missing attribute 'out_features' \(int\)"),
    ({"attrs": {"in_features": 16.0}}, r"attribute 'in_features' must be int, found FLOAT"),
    ({"attrs": {"in_features": 15}}, r"X 'X' has last dimension 16, in_features is 15"),
    ({"x_dims": (1, 17)}, r"X 'X' has last dimension 17, in_features is 16"),
])
def test_contract_violations_are_rejected_naming_the_node(rng, kwargs, message):
    bits = random_bits(rng, (12, 16))
    if "w_tensor" in kwargs:
        kwargs = {**kwargs, "w_tensor": kwargs["w_tensor"](bits)}
    model = bf16_model(bits, **kwargs)
    gc.collect()
    start = kort.cache_info()
    with pytest.raises(kort.BitLinearError, match=f"^LinearBF16 node '{NODE}': {message}"):
        kort.create_session(model)
    assert kort.cache_info() == start


def test_wrong_number_of_inputs_is_rejected(rng):
    model = bf16_model(random_bits(rng, (4, 3)))
    model.graph.node[0].input.append("X")
    with pytest.raises(kort.BitLinearError, match=f"'{NODE}': expected 2 inputs \\(X, W\\), found 3"):
        kort.create_session(model)


def test_a_failing_node_releases_the_weights_of_the_nodes_before_it(rng):
    model, _ = mixed_model(rng)
    w = next(t for t in model.graph.initializer if t.name == "lm_head.weight")
    w.CopyFrom(numpy_helper.from_array(np.zeros((37, 32), np.float32), "lm_head.weight"))
    gc.collect()
    start = kort.cache_info()
    with pytest.raises(kort.BitLinearError, match=f"LinearBF16 node '{NODE}'.*FLOAT, expected BFLOAT16"):
        kort.create_session(model)       # the BitLinear node before it was already prepacked
    assert kort.cache_info() == start


def test_unnamed_node_is_named_by_its_index(rng):
    model, _ = mixed_model(rng)
    model.graph.node[2].name = ""
    model.graph.node[2].attribute[0].i += 1                  # in_features
    with pytest.raises(kort.BitLinearError, match=r"^LinearBF16 node '#2': W 'lm_head.weight' has shape \[37, 32\], expected "
                       r"\[out_features, in_features\] = \[37, 33\]"):
        kort.create_session(model)


def test_run_time_shape_mismatch_names_the_node_and_the_session_stays_usable(rng):
    bits = random_bits(rng, (9, 16))
    session = kort.create_session(bf16_model(bits, x_dims=("batch", "k")))
    with pytest.raises(kort.BitLinearError,
                       match=f"^LinearBF16 node '{NODE}': X has shape \\[2, 15\\], its last dimension "
                             "must equal in_features = 16"):
        session.run(None, {"X": np.ones((2, 15), np.float32)})
    x = rng.standard_normal((2, 16)).astype(np.float32)
    (y,) = session.run(None, {"X": x})
    np.testing.assert_array_equal(y, linear_bf16(x, bits))


def test_initializer_also_listed_as_graph_input(rng):
    # legal ONNX (keep_initializers_as_inputs): the dropped W leaves graph.input too
    bits = random_bits(rng, (6, 4))
    model = bf16_model(bits)
    model.graph.input.append(helper.make_tensor_value_info("lm_head.weight", TensorProto.BFLOAT16, [6, 4]))
    rewritten = onnx.ModelProto()
    rewritten.CopyFrom(model)
    kort._release(kort._rewrite(rewritten, None))
    assert [v.name for v in rewritten.graph.input] == ["X"]
    session = kort.create_session(model)
    assert [i.name for i in session.get_inputs()] == ["X"]
    x = rng.standard_normal((1, 1, 4)).astype(np.float32)
    np.testing.assert_array_equal(session.run(None, {"X": x})[0], linear_bf16(x, bits))
    assert [v.name for v in model.graph.input] == ["X", "lm_head.weight"]       # caller's model intact


def test_tied_initializer_also_listed_as_graph_input_stays_an_input(tmp_path, rng):
    # Still read by the Gather, W is neither dropped nor removed from graph.input.
    bits = random_bits(rng, (11, 8))
    path = tmp_path / "tied.onnx"
    save_external(tied_model(bits, w_as_input=True), path)
    rewritten = onnx.load(str(path), load_external_data=False)
    kort._release(kort._rewrite(rewritten, str(tmp_path)))
    assert [v.name for v in rewritten.graph.input] == ["ids", "W"]
    assert "W" in {t.name for t in rewritten.graph.initializer}
    session = kort.create_session(path)
    assert session.get_inputs()[0].name == "ids"              # (ORT lists W or not: 1.32 does not)
    assert len(session._tdpu_shared) == 1
    ids = np.array([[3, 10]], np.int64)
    (y,) = session.run(None, {"ids": ids})                    # W is not fed: the initializer is used
    np.testing.assert_array_equal(y, linear_bf16(bf16_to_float32(bits)[ids], bits))
