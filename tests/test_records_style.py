"""The record rules of `records/style.py`: paths, times, percentages, ratios and verdict lines."""

from __future__ import annotations

import datetime as dt
import re
import time

import pytest

from tdpu_tui.engine.records.style import (
    fmt_time, flat_parens, has_nested_parens, metric_rows, pct, ratio_words, rel_path,
    relative_text, verdict_line, zone_name,
)

TIME_RE = re.compile(r"^\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}$")


@pytest.fixture
def shanghai(monkeypatch):
    """Local time is the team's: UTC+08:00."""
    monkeypatch.setenv("TZ", "Asia/Shanghai")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


# paths --------------------------------------------------------------------------------------

def test_paths_inside_the_project_are_relative_to_its_root(tmp_path):
    assert rel_path(tmp_path / "models" / "output" / "a.onnx", tmp_path) == "models/output/a.onnx"
    assert rel_path(tmp_path, tmp_path) == "."


def test_paths_outside_the_project_stay_absolute(tmp_path):
    root = tmp_path / "proj"
    sibling = tmp_path / "proj2" / "ckpt"      # a name that only starts like the root
    assert rel_path(sibling, root) == str(sibling)
    assert rel_path("/etc/hosts", root) == "/etc/hosts"


def test_a_path_through_a_symlinked_root_is_still_inside(tmp_path):
    real = tmp_path / "real"
    (real / "logs").mkdir(parents=True)
    link = tmp_path / "link"
    link.symlink_to(real)
    assert rel_path(real / "logs" / "x.md", link) == "logs/x.md"


def test_relative_text_rewrites_prose_and_tables_but_not_commands(tmp_path):
    root = str(tmp_path)
    md = (f"- graph: `{root}/models/g.onnx` and `{root}2/other`\n"
          f"| `{root}/logs/a.csv` | 33 B |\n"
          "```bash\n"
          f"icraft parse --network {root}/models/g.onnx\n"
          "```\n"
          f"after the fence: {root}/x\n")
    out = relative_text(md, tmp_path)
    assert "- graph: `models/g.onnx`" in out
    assert f"`{root}2/other`" in out                      # not under the root
    assert "| `logs/a.csv` | 33 B |" in out
    assert f"icraft parse --network {root}/models/g.onnx" in out    # copy-pasteable as it ran
    assert "after the fence: x" in out


# times --------------------------------------------------------------------------------------

def test_one_time_format_in_local_time_with_the_zone_as_an_offset(shanghai):
    epoch = dt.datetime(2026, 12, 2, 0, 30, 5, tzinfo=dt.timezone.utc).timestamp()
    assert fmt_time(epoch) == "2026-12-02 08:30:05"
    assert fmt_time(epoch, zone=True) == "2026-12-02 08:30:05 UTC+08:00"
    assert zone_name(epoch) == "UTC+08:00"
    # ISO strings (the export's meta.json) come out the same way
    assert fmt_time("2026-12-02T08:30:05") == "2026-12-02 08:30:05"
    assert fmt_time("2026-12-02T00:30:05+00:00") == "2026-12-02 08:30:05"
    assert TIME_RE.match(fmt_time())


# percentages --------------------------------------------------------------------------------

def test_percentages_have_two_decimals_for_values_and_thresholds():
    assert pct(1) == "100.00%"
    assert pct(0.9921875) == "99.22%"
    assert pct(0.99) == "99.00%"
    rows = metric_rows({"max_abs": 1.7e-05, "cosine": 1.0, "argmax_agreement": 1.0, "positions": 128})
    assert rows == ["| max abs diff | 1.7e-05 |", "| cosine | 1.000000 |",
                    "| argmax agreement | 100.00% of 128 positions |"]


# ratios -------------------------------------------------------------------------------------

def test_a_slower_ratio_says_slower_than_and_why():
    assert (ratio_words("BitLinear step", 5.0, "float", why="tiny shapes: the operator bridge's fixed cost")
            == "BitLinear step 5.0 × slower than float (tiny shapes: the operator bridge's fixed cost)")


def test_a_faster_ratio_says_the_fraction_and_how_many_times_faster():
    assert ratio_words("BitLinear step", 0.43, "float") == "BitLinear step 0.43 × float (2.3 × faster)"
    assert (ratio_words("BitLinear step", 0.43, "float", why="big shapes (2B4T)")
            == "BitLinear step 0.43 × float (2.3 × faster; big shapes, 2B4T)")


def test_sizes_say_smaller_and_larger():
    assert (ratio_words("BitLinear weights", 18488 / 294968, "float", kind="size")
            == "BitLinear weights 0.063 × float (16 × smaller)")
    assert ratio_words("X", 2.0, "float", kind="size") == "X 2.0 × larger than float"


def test_a_ratio_near_one_says_about_the_same_and_a_missing_one_says_not_measured():
    assert ratio_words("BitLinear step", 1.02, "float") == "BitLinear step about as fast as float (1.02 ×)"
    assert ratio_words("BitLinear step", None, "float") == "BitLinear step: not measured against float"


# verdict lines ------------------------------------------------------------------------------

def test_verdict_lines_never_nest_parentheses():
    problem = ("argmax agreement 97.66% is below 99.00%: 3 of 128 positions pick a different token; at 3 "
               "of them the target's top two logits are within 0.01 (twice the max |Δ|) of each other "
               "(largest such margin 0.004 (tiny))")
    line = verdict_line([problem, "integer core differs (first /a/MatMul)"])
    assert line.startswith("未通过 failed: argmax agreement 97.66% is below 99.00%")
    assert not has_nested_parens(line)
    assert "(largest such margin 0.004, tiny)" in line


def test_a_pass_on_a_tolerance_says_so_in_the_verdict_line():
    why = ("argmax agreement 98.44% is below 99%, but the PyTorch reference itself agrees on 97.66% of "
           "positions with its input moved by one ulp (mean |Δ| 0.0012): activation-rounding flips "
           "cascading through the layers, not a defect")
    line = verdict_line([], why)
    assert line.startswith("通过 passed within tolerance: argmax agreement 98.44% is below 99%")
    assert not has_nested_parens(line)
    assert verdict_line([]) == "通过 passed"


def test_flat_parens_turns_inner_parentheses_into_commas():
    assert flat_parens("a (b (c) d) e") == "a (b, c, d) e"
    assert flat_parens("x (y (z)).") == "x (y, z)."
    assert flat_parens("plain (one level)") == "plain (one level)"


def test_the_zone_of_a_process_without_tz_is_an_offset_too(monkeypatch):
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    try:
        assert zone_name() == "UTC+00:00"
    finally:
        monkeypatch.undo()
        time.tzset()
