"""The PyTorch reference model: names equal checkpoint keys, numerics equal transformers'."""

import json
import shutil

import numpy as np
import pytest
import torch

from hf_fixtures import hf_logits, hf_saved_checkpoint
from tdpu_tui.engine.model.checkpoint import open_checkpoint
from tdpu_tui.engine.core.errors import CheckpointError
from tdpu_tui.engine.model.reference import BitLinear, BitNetForCausalLM, RMSNorm
from tdpu_tui.engine.model.synthetic import write_synthetic


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_synthetic(tmp_path_factory.mktemp("ref") / "tiny", "tiny", seed=0)


@pytest.fixture(scope="module")
def model(tiny):
    with open_checkpoint(tiny) as ckpt:
        return BitNetForCausalLM.from_checkpoint(ckpt)


def ids(batch=3, seq=48, vocab=256, seed=0):
    return np.random.default_rng(seed).integers(0, vocab, (batch, seq))


def test_state_dict_keys_are_the_checkpoint_names(tiny, model):
    with open_checkpoint(tiny) as ckpt:
        assert sorted(model.state_dict()) == ckpt.names()
        for name in ckpt.projection_names():
            w, scale_mul = ckpt.ternary(name)
            assert model.get_submodule(name).weight.dtype == torch.int8
            np.testing.assert_array_equal(model.get_submodule(name).weight.numpy(), w)
            assert model.get_submodule(name).weight_scale.item() == np.float32(scale_mul)
        np.testing.assert_array_equal(model.model.embed_tokens.weight.numpy(), ckpt.embedding())


def test_logits_shape_dtype_and_input_forms_agree(tiny, model):
    x = ids()
    logits = model(input_ids=torch.from_numpy(x))
    assert logits.dtype == torch.float32 and tuple(logits.shape) == (3, 48, 256)
    with open_checkpoint(tiny) as ckpt:
        embeds = torch.from_numpy(ckpt.embedding()[x])
    torch.testing.assert_close(model(inputs_embeds=embeds), logits, rtol=0, atol=0)
    with pytest.raises(ValueError, match="exactly one"):
        model()


def test_logits_are_well_conditioned(model):
    logits = model(input_ids=torch.from_numpy(ids())).numpy()
    assert np.isfinite(logits).all()
    assert len(np.unique(logits.argmax(-1))) > 30
    assert 0.5 < logits.std() < 10
    top2 = np.sort(logits, -1)[..., -2:]
    assert np.median(top2[..., 1] - top2[..., 0]) > 0.05


def test_thirty_layers_stay_finite_and_varied(tmp_path):
    d = write_synthetic(tmp_path / "deep", "tiny", seed=1, overrides={"layers": 30})
    with open_checkpoint(d) as ckpt:
        m = BitNetForCausalLM.from_checkpoint(ckpt)
    logits = m(input_ids=torch.from_numpy(ids(2, 64))).numpy()
    assert np.isfinite(logits).all() and np.abs(logits).max() < 100
    assert len(np.unique(logits.argmax(-1))) > 20


def test_causal_and_batch_independent(model):
    x = ids(2, 32)
    base = model(input_ids=torch.from_numpy(x))
    y = x.copy()
    y[0, 20:] = (y[0, 20:] + 1) % 256
    changed = model(input_ids=torch.from_numpy(y))
    torch.testing.assert_close(changed[0, :20], base[0, :20], rtol=0, atol=0)
    assert not torch.equal(changed[0, 20:], base[0, 20:])
    torch.testing.assert_close(changed[1], base[1], rtol=0, atol=0)
    torch.testing.assert_close(model(input_ids=torch.from_numpy(x[1:])), base[1:], rtol=0, atol=1e-5)


def test_quantize_activations_switch(model):
    x = torch.from_numpy(ids())
    assert model.quantize_activations
    quantized = model(input_ids=x)
    model.quantize_activations = False
    try:
        assert not model.quantize_activations
        floats = model(input_ids=x)
    finally:
        model.quantize_activations = True
    assert not torch.equal(floats, quantized)
    assert (floats.argmax(-1) == quantized.argmax(-1)).float().mean() > 0.8


def test_bitlinear_is_int8_activations_times_ternary_exactly():
    rng = np.random.default_rng(0)
    k, n = 96, 40
    w = rng.integers(-1, 2, (n, k)).astype(np.int8)
    x = rng.normal(0, 3, (5, k)).astype(np.float32)
    layer = BitLinear(k, n)
    layer.weight.copy_(torch.from_numpy(w))
    layer.weight_scale.fill_(0.37)
    y = layer(torch.from_numpy(x)).numpy()
    s = np.float32(127) / np.maximum(np.abs(x).max(-1, keepdims=True), np.float32(1e-5))
    q = np.clip(np.rint(x * s), -128, 127).astype(np.int32)       # round half to even
    acc = q @ w.T.astype(np.int32)
    np.testing.assert_array_equal(y, (acc.astype(np.float32) / s) * np.float32(0.37))
    layer.quantize_activations = False
    np.testing.assert_allclose(layer(torch.from_numpy(x)).numpy(), (x @ w.T) * 0.37, rtol=1e-5, atol=1e-4)


def test_rms_norm_order_of_operations():
    x = torch.randn(2, 7, 16)
    norm = RMSNorm(16, 1e-5)
    norm.weight.copy_(torch.linspace(0.5, 1.5, 16))
    var = (x * x).mean(-1, keepdim=True)
    torch.testing.assert_close(norm(x), x / torch.sqrt(var + 1e-5) * norm.weight, rtol=0, atol=0)


def test_own_synthetic_checkpoint_matches_transformers(tiny, model):
    """transformers loads the synthetic directory as it is (packed, autobitlinear)."""
    x = ids()
    want = hf_logits(tiny, x)
    got = model(input_ids=torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)


@pytest.mark.parametrize("linear_class", ["autobitlinear", "bitlinear"])
def test_matches_transformers_on_checkpoints_it_saved(tmp_path, linear_class):
    path = hf_saved_checkpoint(tmp_path, linear_class)
    x = ids(4, 64)
    want = hf_logits(path, x)
    with open_checkpoint(path) as ckpt:
        assert ckpt.config.linear_class == linear_class
        m = BitNetForCausalLM.from_checkpoint(ckpt)
        assert sorted(m.state_dict()) == ckpt.names()
    got = m(input_ids=torch.from_numpy(x)).numpy()
    diff = np.abs(got - want)
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.99
    if linear_class == "autobitlinear":
        assert diff.max() < 1e-4
    else:
        # transformers divides by weight_scale, the reference multiplies by its float32
        # reciprocal: an ulp apart, which now and then moves an activation across a rounding
        # boundary of the int8 quantizer. Most positions stay exact; none drift far.
        assert np.median(diff) < 1e-5
        assert (diff.max(-1) > 1e-4).mean() < 0.15
        assert diff.max() < 0.5


def test_bitlinear_scale_convention_is_not_inverted(tmp_path):
    """Reading a bitlinear checkpoint as autobitlinear would be far off: the test above can tell."""
    path = hf_saved_checkpoint(tmp_path, "bitlinear")
    with open_checkpoint(path) as ckpt:
        ws = ckpt.tensor("model.layers.0.self_attn.q_proj.weight_scale")[0]
        assert ckpt.ternary("model.layers.0.self_attn.q_proj")[1] == pytest.approx(1 / ws)
        assert abs(ws - 1 / ws) > 1


def test_other_activation_is_refused(tiny, tmp_path):
    d = tmp_path / "silu"
    shutil.copytree(tiny, d)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "hidden_act": "silu"}))
    with open_checkpoint(d) as ckpt, pytest.raises(CheckpointError, match="relu2"):
        BitNetForCausalLM.from_checkpoint(ckpt)
