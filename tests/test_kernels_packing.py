"""Packings of ternary weights (kernels/packing.py): both layouts, round trips, errors."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from kernels import packing
from kernels.packing import PackingError, pack, repack, unpack

LAYOUTS = ("tdpu", "hf")


def ternary(rng, n, k):
    return rng.integers(-1, 2, size=(n, k)).astype(np.int8)


@st.composite
def ternary_weights(draw):
    n = 4 * draw(st.integers(1, 6))
    k = draw(st.integers(1, 9))
    return draw(arrays(np.int8, (n, k), elements=st.integers(-1, 1)))


@settings(max_examples=25, deadline=None)
@given(w=ternary_weights(), layout=st.sampled_from(LAYOUTS))
def test_unpack_inverts_pack(w, layout):
    p = pack(w, layout)
    assert p.dtype == np.uint8 and p.shape == (w.shape[0] // 4, w.shape[1])
    np.testing.assert_array_equal(unpack(p, layout), w)


@settings(max_examples=15, deadline=None)
@given(w=ternary_weights(), src=st.sampled_from(LAYOUTS), dst=st.sampled_from(LAYOUTS))
def test_repack_equals_packing_in_the_target_layout(w, src, dst):
    np.testing.assert_array_equal(repack(pack(w, src), src, dst), pack(w, dst))


def test_tdpu_layout_puts_four_adjacent_rows_in_one_byte():
    w = np.array([[-1], [0], [1], [0]], np.int8)        # codes 0, 1, 2, 1
    assert pack(w, "tdpu")[0, 0] == 0b01_10_01_00


def test_hf_layout_puts_four_row_blocks_in_one_byte():
    w = np.zeros((8, 1), np.int8)                       # rows r + i * 2
    w[[0, 2, 4, 6], 0] = [-1, 0, 1, 0]
    assert pack(w, "hf")[0, 0] == 0b01_10_01_00
    assert pack(w, "hf")[1, 0] == 0b01_01_01_01


def test_hf_layout_matches_transformers_pack_and_unpack():
    from transformers.integrations import bitnet

    rng = np.random.default_rng(1)
    w = ternary(rng, 24, 13)
    theirs = bitnet.pack_weights(torch.from_numpy(w.astype(np.int32)).clone()).numpy()
    np.testing.assert_array_equal(pack(w, "hf"), theirs)
    # unpack_weights is wrapped in torch.compile; the eager function is enough here.
    eager = getattr(bitnet.unpack_weights, "_torchdynamo_orig_callable", bitnet.unpack_weights)
    back = eager(torch.from_numpy(pack(w, "hf")), dtype=torch.float32).numpy()
    np.testing.assert_array_equal(back, w.astype(np.float32))
    np.testing.assert_array_equal(unpack(theirs.astype(np.uint8), "hf"), w)


def test_reading_hf_bytes_as_tdpu_permutes_rows():
    rng = np.random.default_rng(2)
    w = ternary(rng, 16, 5)
    wrong = unpack(pack(w, "hf"), "tdpu")
    assert not np.array_equal(wrong, w)
    assert sorted(map(bytes, wrong)) == sorted(map(bytes, w))


def test_n_not_multiple_of_four_is_an_error():
    with pytest.raises(PackingError, match=r"N = 6 is not a multiple of 4"):
        pack(np.zeros((6, 3), np.int8), "tdpu")


def test_values_outside_ternary_are_reported_with_position():
    w = np.zeros((4, 3), np.int8)
    w[2, 1] = 2
    with pytest.raises(PackingError, match=r"W\[2, 1\] = 2"):
        pack(w, "hf")
    with pytest.raises(PackingError, match="outside"):
        pack(np.full((4, 2), 0.5), "tdpu")


def test_reserved_code_is_reported_with_byte_bits_and_row():
    p = pack(np.zeros((8, 4), np.int8), "tdpu")
    p[1, 2] |= 0b11 << 4                                 # code i = 2 of byte [1, 2]
    assert packing.find_reserved(p) == (1, 2, 2)
    with pytest.raises(PackingError, match=r"byte \[1, 2\] bits 4..5 \(W\[6, 2\] in the tdpu layout\)"):
        unpack(p, "tdpu")
    with pytest.raises(PackingError, match=r"W\[5, 2\] in the hf layout"):
        unpack(p, "hf")
    assert packing.find_reserved(pack(np.ones((4, 4), np.int8), "hf")) is None


def test_unknown_layout_is_an_error():
    with pytest.raises(PackingError, match="unknown layout 'i2s'"):
        pack(np.zeros((4, 1), np.int8), "i2s")


def test_row_of_maps_codes_to_weight_rows():
    assert [packing.row_of(1, i, 16, "tdpu") for i in range(4)] == [4, 5, 6, 7]
    assert [packing.row_of(1, i, 16, "hf") for i in range(4)] == [1, 5, 9, 13]
