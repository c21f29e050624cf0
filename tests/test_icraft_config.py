"""[icraft] and [export] keys whose bad values used to pass the config check."""

from __future__ import annotations

import subprocess
import sys

import onnx.defs
import pytest

from tdpu_tui.engine.core.config import parse_config
from tdpu_tui.engine.core.errors import ConfigError


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "1e300"])
def test_a_non_finite_or_huge_timeout_is_an_error_naming_the_key(value):
    with pytest.raises(ConfigError) as err:
        parse_config(f"[icraft]\ntimeout_s = {value}\n")
    assert err.value.key == "icraft.timeout_s"
    assert "finite" in str(err.value) or "at most" in str(err.value)


def test_an_ordinary_timeout_still_loads():
    assert parse_config("[icraft]\ntimeout_s = 5\n").icraft.timeout_s == 5.0


def test_an_opset_the_installed_onnx_does_not_know_is_an_error():
    newest = onnx.defs.onnx_opset_version()
    with pytest.raises(ConfigError) as err:
        parse_config("[export]\nopset = 999\n")
    assert err.value.key == "export.opset" and f"17..{newest}" in str(err.value)
    assert parse_config(f"[export]\nopset = {newest}\n").export.opset == newest


@pytest.mark.parametrize("name", ["../../../outside/victim", "a/b", "a\\\\b", "/abs", "C:victim",
                                  "..", "x..y", "", " pad"])
def test_a_net_name_that_is_a_path_is_an_error(name):
    with pytest.raises(ConfigError) as err:
        parse_config(f'[icraft]\nnet_name = "{name}"\n')
    assert err.value.key == "icraft.net_name"


def test_batch_exits_2_naming_the_file_and_key(tmp_path):
    cfg = tmp_path / "tdpu.toml"
    cfg.write_text('[icraft]\nnet_name = "../../../outside/victim"\n', encoding="utf-8")
    proc = subprocess.run([sys.executable, "-m", "tdpu_tui", "--batch", "--config", str(cfg)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert str(cfg) in proc.stderr and "icraft.net_name" in proc.stderr
    assert not (tmp_path.parent / "outside").exists()
