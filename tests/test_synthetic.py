"""The synthetic checkpoint: a real HF-layout directory, deterministic, read by the same loader."""

import json
import math

import numpy as np
import pytest

from kernels import packing
from tdpu_tui.engine.model.checkpoint import open_checkpoint
from tdpu_tui.engine.core.config import parse_config
from tdpu_tui.engine.core.errors import ConfigError
from tdpu_tui.engine.model.synthetic import STAMP_FILE, ensure_synthetic, write_synthetic


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_synthetic(tmp_path_factory.mktemp("syn") / "tiny", "tiny", seed=0)


def test_config_json_has_the_real_checkpoint_keys(tiny):
    cfg = json.loads((tiny / "config.json").read_text())
    assert cfg["quantization_config"] == {"quant_method": "bitnet", "linear_class": "autobitlinear",
                                          "quantization_mode": "offline"}
    assert cfg["model_type"] == "bitnet" and cfg["architectures"] == ["BitNetForCausalLM"]
    assert cfg["hidden_act"] == "relu2" and cfg["rope_theta"] == 500000.0
    assert cfg["tie_word_embeddings"] is True and cfg["torch_dtype"] == "bfloat16"
    assert cfg["rms_norm_eps"] == 1e-5
    assert {"bos_token_id", "eos_token_id", "max_position_embeddings", "num_key_value_heads"} <= set(cfg)


def test_tensors_have_the_real_dtypes_and_shapes(tiny):
    with open_checkpoint(tiny) as ckpt:
        assert ckpt.warnings == []
        for name in ckpt.projection_names():
            n, k = ckpt.config.projection_shape(name)
            assert ckpt.dtype(f"{name}.weight") == "U8" and ckpt.shape(f"{name}.weight") == (n // 4, k)
            assert ckpt.dtype(f"{name}.weight_scale") == "BF16" and ckpt.shape(f"{name}.weight_scale") == (1,)
        assert ckpt.dtype("model.embed_tokens.weight") == "BF16"
        assert "lm_head.weight" not in ckpt.names()


def test_same_seed_same_bytes_other_seed_other_bytes(tiny, tmp_path):
    again = write_synthetic(tmp_path / "again", "tiny", seed=0)
    other = write_synthetic(tmp_path / "other", "tiny", seed=1)
    data = (tiny / "model.safetensors").read_bytes()
    assert (again / "model.safetensors").read_bytes() == data
    assert (again / "config.json").read_bytes() == (tiny / "config.json").read_bytes()
    assert (other / "model.safetensors").read_bytes() != data


def test_ternary_mix_is_a_quarter_half_quarter(tiny):
    with open_checkpoint(tiny) as ckpt:
        w = np.concatenate([ckpt.ternary(n)[0].ravel() for n in ckpt.projection_names()])
    frac = np.bincount(w + 1, minlength=3) / w.size
    np.testing.assert_allclose(frac, [0.25, 0.5, 0.25], atol=0.02)


def test_no_reserved_codes(tiny):
    with open_checkpoint(tiny) as ckpt:
        for name in ckpt.projection_names():
            assert packing.find_reserved(ckpt.packed(name, "hf")[0]) is None


def test_weight_scales_differ_and_keep_activations_sane(tiny):
    with open_checkpoint(tiny) as ckpt:
        scales = [ckpt.ternary(n)[1] for n in ckpt.projection_names()]
        assert len(set(scales)) == len(scales)
        for name, s in zip(ckpt.projection_names(), scales):
            k = ckpt.config.projection_shape(name)[1]
            assert 0.1 < s / math.sqrt(2 / k) < 3, name


def test_norms_near_one_embeddings_small(tiny):
    with open_checkpoint(tiny) as ckpt:
        for name in ckpt.config.norm_names():
            w = ckpt.tensor(name)
            assert abs(w.mean() - 1) < 0.05 and 0.01 < w.std() < 0.1
        emb = ckpt.embedding()
        assert abs(emb.std() - 2 / math.sqrt(64)) < 0.02 and np.isfinite(emb).all()


def test_existing_checkpoint_with_same_stamp_is_reused(tiny):
    before = (tiny / "model.safetensors").stat().st_mtime_ns
    calls = []
    assert write_synthetic(tiny, "tiny", seed=0, on_progress=lambda *a: calls.append(a)) == tiny
    assert (tiny / "model.safetensors").stat().st_mtime_ns == before and calls == []


def test_different_stamp_or_damage_rewrites_atomically(tmp_path):
    d = write_synthetic(tmp_path / "x", "tiny", seed=0)
    write_synthetic(d, "tiny", seed=5)
    assert json.loads((d / STAMP_FILE).read_text())["seed"] == 5
    with (d / "model.safetensors").open("r+b") as fh:
        fh.truncate(100)
    write_synthetic(d, "tiny", seed=5)
    open_checkpoint(d).close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x"]  # no temp dirs left behind


def test_progress_reports_bytes_up_to_the_total(tmp_path):
    calls = []
    write_synthetic(tmp_path / "p", "tiny", seed=0, on_progress=lambda d, t, note: calls.append((d, t, note)))
    assert calls[-1][0] == calls[-1][1] and calls[-1][2] == "model.norm.weight"
    assert all(a[0] <= b[0] for a, b in zip(calls, calls[1:]))


def test_overrides_change_shapes(tmp_path):
    d = write_synthetic(tmp_path / "o", "tiny", seed=0,
                        overrides={"layers": 3, "hidden_size": 32, "num_heads": 2, "num_kv_heads": 1,
                                   "intermediate_size": 48, "vocab_size": 100})
    with open_checkpoint(d) as ckpt:
        c = ckpt.config
        assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads) == (3, 32, 2, 1)
        assert (c.intermediate_size, c.vocab_size, c.head_dim) == (48, 100, 16)


@pytest.mark.parametrize("overrides, key", [
    ({"intermediate_size": 130}, "intermediate_size"),
    ({"num_heads": 5}, "num_heads"),
    ({"num_kv_heads": 3}, "num_kv_heads"),
    ({"depth": 3}, "depth"),
])
def test_impossible_overrides_name_the_key(tmp_path, overrides, key):
    with pytest.raises(ConfigError, match=rf"model\.synthetic\.{key}"):
        write_synthetic(tmp_path / "bad", "tiny", seed=0, overrides=overrides)
    assert not any(tmp_path.iterdir())


def test_ensure_synthetic_places_it_under_the_output_dir(tmp_path):
    toml = tmp_path / "tdpu.toml"
    toml.write_text('[model.synthetic]\npreset = "tiny"\nseed = 2\nlayers = 1\n[paths]\noutput = "out"\n')
    cfg = parse_config(toml.read_text(), toml)
    d = ensure_synthetic(cfg)
    assert d == tmp_path / "out" / "synthetic" / "tiny-seed2-L1"
    with open_checkpoint(d) as ckpt:
        assert ckpt.config.num_hidden_layers == 1
    assert ensure_synthetic(cfg) == d


def test_2b4t_preset_has_the_real_shapes():
    """The header only: the 1.2 GB write itself is measured in benchmarks/bench_synthetic.py."""
    from tdpu_tui.engine.model import synthetic
    shapes = synthetic.resolve_shapes("2b4t")
    plan = synthetic._plan(shapes, "autobitlinear")
    assert len(plan) == 542
    assert sum(t.nbytes for t in plan) == pytest.approx(1.18e9, rel=0.02)
    cfg = synthetic.hf_config(shapes)
    assert (cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]) == (2560, 6912, 30)
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (20, 5) and "head_dim" not in cfg
    assert (cfg["vocab_size"], cfg["max_position_embeddings"]) == (128256, 4096)
    assert (cfg["bos_token_id"], cfg["eos_token_id"]) == (128000, 128001)


def test_shapes_each_in_bounds_whose_model_is_too_large_are_refused_before_the_plan(tmp_path):
    """Issue #13.4: a shape over its bound, or bounded shapes making more than 4 × 2B4T's
    parameters, is a ConfigError naming the key; nothing is planned or written."""
    from tdpu_tui.engine.model import synthetic
    with pytest.raises(ConfigError, match=r"model\.synthetic\.layers.*at most 256"):
        synthetic.resolve_shapes("tiny", {"layers": 10**9})
    with pytest.raises(ConfigError, match=r"model\.synthetic\.layers.*parameters"):
        write_synthetic(tmp_path / "big", "2b4t", seed=0, overrides={"layers": 256})
    assert not any(tmp_path.iterdir())
    shapes = synthetic.resolve_shapes("2b4t")
    assert synthetic.parameter_count(shapes) == pytest.approx(2.41e9, rel=0.01)
