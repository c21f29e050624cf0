"""The Hugging Face BitNet checkpoint loader (docs/spec.md §4): layouts, conventions, and its errors."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from safetensors.torch import load_file, save_file

from kernels import packing
from tdpu_tui.engine.model.checkpoint import BitNetConfig, absmean_ternarize, open_checkpoint
from tdpu_tui.engine.core.errors import CheckpointError
from tdpu_tui.engine.model.synthetic import write_synthetic

Q0 = "model.layers.0.self_attn.q_proj"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_synthetic(tmp_path_factory.mktemp("ckpt") / "tiny", "tiny", seed=3)


def copy_of(src, dst):
    shutil.copytree(src, dst)
    return dst


def rewrite(directory, edit):
    """Load model.safetensors as torch tensors, let `edit` change the dict, save it back."""
    f = directory / "model.safetensors"
    tensors = load_file(f)
    edit(tensors)
    save_file(tensors, f, metadata={"format": "pt"})


def edit_config(directory, edit):
    f = directory / "config.json"
    cfg = json.loads(f.read_text())
    edit(cfg)
    f.write_text(json.dumps(cfg))


def test_config_matches_the_tiny_preset(tiny):
    with open_checkpoint(tiny) as ckpt:
        c = ckpt.config
        assert (c.hidden_size, c.intermediate_size, c.num_hidden_layers) == (64, 128, 2)
        assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.vocab_size) == (4, 2, 16, 256)
        assert c.linear_class == "autobitlinear" and c.quantized and c.tie_word_embeddings
        assert c.rope_theta == 500000.0 and c.hidden_act == "relu2"
        assert ckpt.warnings == []
        assert ckpt.nbytes == (tiny / "model.safetensors").stat().st_size


def test_projection_names_are_in_layer_order(tiny):
    with open_checkpoint(tiny) as ckpt:
        names = ckpt.projection_names()
    assert names[:7] == [f"model.layers.0.{p}" for p in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    assert len(names) == 14 and names[7] == "model.layers.1.self_attn.q_proj"


def test_ternary_is_hf_unpack_of_stored_bytes(tiny):
    with open_checkpoint(tiny) as ckpt:
        stored = load_file(tiny / "model.safetensors")
        for name in ckpt.projection_names():
            w, scale_mul = ckpt.ternary(name)
            assert w.dtype == np.int8 and w.shape == ckpt.config.projection_shape(name)
            np.testing.assert_array_equal(w, packing.unpack(stored[f"{name}.weight"].numpy(), "hf"))
            assert scale_mul == stored[f"{name}.weight_scale"].float().item()


def test_packed_hf_returns_stored_bytes_and_tdpu_repacks(tiny):
    with open_checkpoint(tiny) as ckpt:
        p_hf, s1 = ckpt.packed(Q0, "hf")
        p_tdpu, s2 = ckpt.packed(Q0, "tdpu")
        w, s3 = ckpt.ternary(Q0)
    np.testing.assert_array_equal(p_hf, load_file(tiny / "model.safetensors")[f"{Q0}.weight"].numpy())
    np.testing.assert_array_equal(packing.unpack(p_tdpu, "tdpu"), w)
    assert s1 == s2 == s3


def test_tensor_widens_bf16_exactly(tiny):
    with open_checkpoint(tiny) as ckpt:
        emb = ckpt.embedding()
        norm = ckpt.tensor("model.norm.weight")
    stored = load_file(tiny / "model.safetensors")
    assert emb.dtype == np.float32 and emb.shape == (256, 64)
    np.testing.assert_array_equal(emb, stored["model.embed_tokens.weight"].float().numpy())
    np.testing.assert_array_equal(norm, stored["model.norm.weight"].float().numpy())


def test_bitlinear_convention_is_normalised_to_multiply(tiny, tmp_path):
    d = copy_of(tiny, tmp_path / "bitlinear")
    edit_config(d, lambda c: c["quantization_config"].update(linear_class="bitlinear"))
    with open_checkpoint(tiny) as auto, open_checkpoint(d) as bit:
        assert bit.config.linear_class == "bitlinear"
        ws = bit.tensor(f"{Q0}.weight_scale")[0]
        assert bit.ternary(Q0)[1] == pytest.approx(1.0 / ws, rel=1e-12)
        assert auto.ternary(Q0)[1] == ws


def test_missing_linear_class_means_bitlinear(tiny, tmp_path):
    d = copy_of(tiny, tmp_path / "nolc")
    edit_config(d, lambda c: c["quantization_config"].pop("linear_class"))
    with open_checkpoint(d) as ckpt:
        assert ckpt.config.linear_class == "bitlinear"


def test_rope_theta_from_rope_parameters(tiny, tmp_path):
    d = copy_of(tiny, tmp_path / "rope")

    def to_rope_parameters(c):
        c["rope_parameters"] = {"rope_theta": 10000.0, "rope_type": "default"}
        del c["rope_theta"]
    edit_config(d, to_rope_parameters)
    with open_checkpoint(d) as ckpt:
        assert ckpt.config.rope_theta == 10000.0


def test_no_rope_base_is_an_error(tiny, tmp_path):
    d = copy_of(tiny, tmp_path / "norope")
    edit_config(d, lambda c: c.pop("rope_theta"))
    with pytest.raises(CheckpointError, match="rope_theta"):
        open_checkpoint(d)


def test_bf16_variant_is_ternarized_by_absmean(tiny, tmp_path):
    d = copy_of(tiny, tmp_path / "bf16")
    rng = np.random.default_rng(0)
    floats = {}

    def unquantize(t):
        with open_checkpoint(tiny) as ckpt:
            for name in ckpt.projection_names():
                n, k = ckpt.config.projection_shape(name)
                w = torch.from_numpy(rng.normal(0, 0.02, (n, k)).astype(np.float32)).to(torch.bfloat16)
                floats[name] = w.float().numpy()
                t[f"{name}.weight"] = w
                del t[f"{name}.weight_scale"]
    rewrite(d, unquantize)
    edit_config(d, lambda c: c.pop("quantization_config"))
    with open_checkpoint(d) as ckpt:
        assert not ckpt.config.quantized
        assert any("absmean" in w for w in ckpt.warnings)
        w, scale_mul = ckpt.ternary(Q0)
    ref = torch.from_numpy(floats[Q0])
    scale = 1.0 / ref.abs().mean().clamp(min=1e-5)
    np.testing.assert_array_equal(w, (ref * scale).round().clamp(-1, 1).to(torch.int8).numpy())
    assert scale_mul == pytest.approx(1.0 / scale.item(), rel=1e-6)
    counts = np.bincount(w.ravel() + 1, minlength=3)
    assert counts.min() > 0.1 * w.size


def test_absmean_of_all_zero_weight_is_clamped():
    w, scale_mul = absmean_ternarize(np.zeros((4, 8), np.float32))
    assert not w.any() and scale_mul == pytest.approx(1e-5)


def test_unpacked_ternary_with_weight_scale_is_taken_as_is(tiny, tmp_path):
    d = copy_of(tiny, tmp_path / "unpacked")
    with open_checkpoint(tiny) as ckpt:
        w, scale_mul = ckpt.ternary(Q0)
    rewrite(d, lambda t: t.update({f"{Q0}.weight": torch.from_numpy(w.astype(np.float32))}))
    with open_checkpoint(d) as ckpt:
        w2, s2 = ckpt.ternary(Q0)
        np.testing.assert_array_equal(w2, w)
        assert s2 == scale_mul
        np.testing.assert_array_equal(ckpt.packed(Q0, "hf")[0], packing.pack(w, "hf"))


def test_non_ternary_values_beside_a_weight_scale_are_an_error(tiny, tmp_path):
    d = copy_of(tiny, tmp_path / "nonternary")
    rewrite(d, lambda t: t.update({f"{Q0}.weight": torch.full((64, 64), 0.5)}))
    with open_checkpoint(d) as ckpt, pytest.raises(CheckpointError, match=rf"{Q0}\.weight.*4096"):
        ckpt.ternary(Q0)


def test_truncated_file_names_file_and_tensor(tiny, tmp_path):
    d = copy_of(tiny, tmp_path / "trunc")
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*truncated.*'model\.") as e:
        open_checkpoint(d)
    assert "tensor" in str(e.value)


def test_file_truncated_inside_its_header(tiny, tmp_path):
    d = copy_of(tiny, tmp_path / "trunc_header")
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:50])
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*truncated"):
        open_checkpoint(d)


def test_missing_tensor_is_named(tiny, tmp_path):
    d = copy_of(tiny, tmp_path / "missing")
    rewrite(d, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: missing tensor 'model\.layers\.1\.mlp\.up_proj\.weight'"):
        open_checkpoint(d)


def test_missing_weight_scale_of_packed_weight_is_named(tiny, tmp_path):
    d = copy_of(tiny, tmp_path / "noscale")
    rewrite(d, lambda t: t.pop(f"{Q0}.weight_scale"))
    with pytest.raises(CheckpointError, match=rf"missing tensor '{Q0}\.weight_scale'"):
        open_checkpoint(d)


def test_wrong_shape_says_expected_and_found(tiny, tmp_path):
    d = copy_of(tiny, tmp_path / "shape")
    rewrite(d, lambda t: t.update({"model.layers.0.mlp.down_proj.weight": torch.zeros((32, 128), dtype=torch.uint8)}))
    with pytest.raises(CheckpointError,
                       match=r"'model\.layers\.0\.mlp\.down_proj\.weight': expected shape \[16, 128\], found \[32, 128\]"):
        open_checkpoint(d)


def test_reserved_code_3_is_reported_with_tensor_and_count(tiny, tmp_path):
    d = copy_of(tiny, tmp_path / "reserved")

    def corrupt(t):
        p = t[f"{Q0}.weight"].clone()
        p[2, 5] = 0b11_01_01_01   # code 3 in bits 6..7
        p[3, 0] = 0b01_01_11_11   # two more
        t[f"{Q0}.weight"] = p
    rewrite(d, corrupt)
    with open_checkpoint(d) as ckpt:
        for read in (lambda: ckpt.ternary(Q0), lambda: ckpt.packed(Q0, "hf"), lambda: ckpt.packed(Q0, "tdpu")):
            with pytest.raises(CheckpointError, match=rf"'{Q0}\.weight': reserved 2-bit code 3 in 3 places.*\[2, 5\]"):
                read()
        ckpt.ternary("model.layers.0.self_attn.k_proj")  # the other tensors stay readable


def test_not_a_directory(tiny, tmp_path):
    with pytest.raises(CheckpointError, match="not a directory"):
        open_checkpoint(tiny / "config.json")
    with pytest.raises(CheckpointError, match="no such checkpoint directory"):
        open_checkpoint(tmp_path / "nowhere")


def test_missing_config_json(tiny, tmp_path):
    d = copy_of(tiny, tmp_path / "nocfg")
    (d / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"config\.json: missing"):
        open_checkpoint(d)


def test_missing_safetensors(tiny, tmp_path):
    d = copy_of(tiny, tmp_path / "nost")
    (d / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"missing model\.safetensors"):
        open_checkpoint(d)


def test_bad_config_value_names_the_key(tiny, tmp_path):
    d = copy_of(tiny, tmp_path / "badcfg")
    edit_config(d, lambda c: c.update(hidden_size="64"))
    with pytest.raises(CheckpointError, match=r"config\.json: key 'hidden_size': expected int"):
        open_checkpoint(d)


def test_sharded_index_reads_like_one_file(tiny, tmp_path):
    d = tmp_path / "sharded"
    d.mkdir()
    shutil.copy(tiny / "config.json", d / "config.json")
    tensors = load_file(tiny / "model.safetensors")
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for fname, part in shards.items():
        save_file({n: tensors[n] for n in part}, d / fname, metadata={"format": "pt"})
        weight_map.update({n: fname for n in part})
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    with open_checkpoint(tiny) as one, open_checkpoint(d) as two:
        assert len(two.files) == 2 and two.nbytes > 0
        for name in one.projection_names():
            np.testing.assert_array_equal(one.ternary(name)[0], two.ternary(name)[0])
            assert one.ternary(name)[1] == two.ternary(name)[1]
        np.testing.assert_array_equal(one.embedding(), two.embedding())


def test_missing_shard_is_named(tiny, tmp_path):
    d = copy_of(tiny, tmp_path / "badindex")
    (d / "model.safetensors").rename(d / "model-00001-of-00002.safetensors")
    weight_map = {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match=r"model-00002-of-00002\.safetensors: missing"):
        open_checkpoint(d)


def test_projection_shape_of_every_projection():
    cfg = BitNetConfig(hidden_size=2560, intermediate_size=6912, num_hidden_layers=30, num_attention_heads=20,
                       num_key_value_heads=5, head_dim=128, vocab_size=128256, rms_norm_eps=1e-5,
                       rope_theta=5e5, max_position_embeddings=4096, tie_word_embeddings=True,
                       hidden_act="relu2", linear_class="autobitlinear", quantized=True)
    assert cfg.projection_shape("model.layers.3.self_attn.k_proj") == (640, 2560)
    assert cfg.projection_shape("o_proj") == (2560, 2560)
    assert cfg.projection_shape("model.layers.0.mlp.down_proj") == (2560, 6912)
    assert len(cfg.projection_names()) == 210


@pytest.mark.parametrize("edit, message", [
    (lambda c: c["quantization_config"].update(use_rms_norm=True), "use_rms_norm"),
    (lambda c: c["quantization_config"].update(quant_method="gptq"), r"quant_method.*'bitnet'.*'gptq'"),
    (lambda c: c["quantization_config"].update(linear_class="fancy"), r"linear_class.*'fancy'"),
    (lambda c: c.update(num_key_value_heads=3), "not a multiple of num_key_value_heads"),
    (lambda c: c.update(rms_norm_eps="small"), r"key 'rms_norm_eps': expected float"),
    (lambda c: c.pop("vocab_size"), r"missing key 'vocab_size'"),
])
def test_unsupported_config_is_an_error_naming_the_key(tiny, tmp_path, edit, message):
    d = copy_of(tiny, tmp_path / "cfg")
    edit_config(d, edit)
    with pytest.raises(CheckpointError, match=message):
        open_checkpoint(d)


def test_unknown_activation_and_extra_tensors_are_warnings(tiny, tmp_path):
    d = copy_of(tiny, tmp_path / "warn")
    edit_config(d, lambda c: c.update(hidden_act="silu"))
    rewrite(d, lambda t: t.update({"model.rotary_emb.inv_freq": torch.ones(8)}))
    with open_checkpoint(d) as ckpt:
        assert any("hidden_act = 'silu'" in w for w in ckpt.warnings)
        assert any("model.rotary_emb.inv_freq" in w for w in ckpt.warnings)


@pytest.mark.parametrize("content", [
    b"\x80\x04\x95" + bytes(200),                      # a pickle is not read, let alone unpickled
    (20).to_bytes(8, "little") + b'{"a": {"dtype": 1}}' + b" ",
    (1 << 40).to_bytes(8, "little") + b"{}",
])
def test_garbage_file_is_a_checkpoint_error(tiny, tmp_path, content):
    d = copy_of(tiny, tmp_path / "garbage")
    (d / "model.safetensors").write_bytes(content)
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        open_checkpoint(d)


@settings(max_examples=40, deadline=None)
@given(arrays(np.float32, st.tuples(st.integers(1, 12), st.integers(1, 12)),
              elements=st.floats(-4, 4, width=32)))
def test_absmean_equals_bitnets_weight_quant(w):
    q, scale_mul = absmean_ternarize(w)
    t = torch.from_numpy(w)
    scale = 1.0 / t.abs().mean().clamp(min=1e-5)
    np.testing.assert_array_equal(q, (t * scale).round().clamp(-1, 1).numpy())
    assert scale_mul == pytest.approx(1.0 / scale.item(), rel=1e-6)


@pytest.mark.parametrize("module", ["tdpu_tui.engine.model.checkpoint", "tdpu_tui.engine.model.synthetic",
                                    "tdpu_tui.engine.model.reference"])
def test_imports_neither_textual_nor_rich(module):
    code = (f"import importlib, sys; importlib.import_module({module!r}); "
            "sys.exit(any(m in sys.modules for m in ('textual', 'rich')))")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_embed_reads_only_the_asked_rows_and_widens_bf16_exactly(tiny):
    with open_checkpoint(tiny) as ckpt:
        ids = np.array([[3, 255, 3], [0, 17, 128]])
        full = ckpt.embedding()
        got = ckpt.embed(ids)
        assert got.dtype == np.float32 and got.shape == (2, 3, 64)
        np.testing.assert_array_equal(got, full[ids])
        cols = ckpt.read("model.embed_tokens.weight", (slice(None), slice(8, 24)))
        np.testing.assert_array_equal(cols, full[:, 8:24])
