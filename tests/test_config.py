import pytest

from tdpu_tui.engine.core.config import load_config, parse_config
from tdpu_tui.engine.core.errors import ConfigError
from tests.conftest import REPO, run_tdpu


def test_shipped_config_loads_with_the_synthetic_model():
    cfg = load_config(REPO / "tdpu.toml")
    assert cfg.model.source == "synthetic"
    assert cfg.export.opset == 17
    assert cfg.output_dir == (REPO / "models" / "output").resolve()


@pytest.mark.parametrize("text, key, expected", [
    ("[model]\nsorce = 'x'\n", "model.sorce", "unknown key"),
    ("[export]\nseq_len = 'long'\n", "export.seq_len", "expected an integer"),
    ("[replace]\nlayout = 'diagonal'\n", "replace.layout", "expected one of"),
    ("[icraft]\npass_on = 'a'\n", "icraft.pass_on", "list of strings"),
    ("[export]\nseq_len = 0\n", "export.seq_len", "positive"),
    ("[model.synthetic]\npreset = 'huge'\n", "model.synthetic.preset", "expected one of"),
    ("[nonsense]\n", "nonsense", "unknown key"),
    ("[validate]\nseed = -1\n", "validate.seed", "expected 0 or more"),
])
def test_bad_config_names_the_key_and_the_file(tmp_path, text, key, expected):
    path = tmp_path / "tdpu.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert f"'{key}'" in str(err.value) and str(path) in str(err.value)
    assert expected in str(err.value)


def test_relative_paths_resolve_against_the_config_file(tmp_path):
    (tmp_path / "sub").mkdir()
    path = tmp_path / "sub" / "tdpu.toml"
    path.write_text("[paths]\noutput = 'o'\nlogs = '../l'\n")
    cfg = load_config(path)
    assert cfg.output_dir == (tmp_path / "sub" / "o").resolve()
    assert cfg.logs_dir == (tmp_path / "l").resolve()


def test_int_accepted_for_float_key():
    assert parse_config("[icraft]\ntimeout_s = 5\n").icraft.timeout_s == 5.0


@pytest.mark.parametrize("args", [
    ["--batch", "--config", "missing.toml"],
])
def test_missing_config_file_is_exit_2(tmp_path, args):
    proc = run_tdpu(*args, cwd=tmp_path)
    assert proc.returncode == 2
    assert "missing.toml" in proc.stderr and "not found" in proc.stderr


def test_bad_key_is_exit_2_with_key_and_file(tmp_path):
    (tmp_path / "tdpu.toml").write_text("[export]\nprofil = 'icraft'\n")
    proc = run_tdpu("--batch", cwd=tmp_path)
    assert proc.returncode == 2
    assert "export.profil" in proc.stderr and "tdpu.toml" in proc.stderr


def test_unknown_stage_is_exit_2(tmp_path, tmp_config):
    proc = run_tdpu("--batch", "--config", str(tmp_config), "--stage", "nope", cwd=tmp_path)
    assert proc.returncode == 2
    assert "nope" in proc.stderr


def test_kernel_paths_of_the_config_are_the_kernels_own(tmp_path):
    from kernels.select import PATHS
    from tdpu_tui.engine.core.config import KERNEL_PATHS

    assert KERNEL_PATHS == ("auto", *PATHS)
    cfg_path = tmp_path / "tdpu.toml"
    cfg_path.write_text('[kernels]\npath = "numba-avx9"\n')
    with pytest.raises(ConfigError) as err:
        load_config(cfg_path)
    assert "kernels.path" in str(err.value) and "numba-avx2" in str(err.value)
