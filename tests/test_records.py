"""The records people read: performance report (charts, ratios, verdict), export log, compile log
and the `--json` summary, each following the rules of `records/style.py`."""

from __future__ import annotations

import json
import re
import shutil
import types
from pathlib import Path

import numpy as np
import pytest

from tdpu_tui.batch import json_summary
from tdpu_tui.engine.core.config import load_config
from tdpu_tui.engine.core.events import RunSummary, StageResult, Status
from tdpu_tui.engine.model.agreement import Verdict
from tdpu_tui.engine.records import charts
from tdpu_tui.engine.records.compile_log import StageRecord, read_section
from tdpu_tui.engine.records.export_log import write_export_log
from tdpu_tui.engine.records.perf_report import (
    CHART_FILES, GraphTiming, PerfResult, ProjectionTiming, update_section, write_performance_report,
)
from tdpu_tui.engine.records.style import has_nested_parens
from tests.conftest import write_config

TIME_ZONE_RE = r"\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2} UTC[+-]\d{2}:\d{2}"


def _perf(root: Path, *, step=(0.24, 1.53, 0.22), why: str = "") -> PerfResult:
    out = root / "models" / "output"
    out.mkdir(parents=True, exist_ok=True)
    for name in ("bitnet_b1.58_full.onnx", "bitnet_b1.58_bitlinear.onnx"):
        (out / name).write_bytes(b"")
    graphs = [GraphTiming("float", str(out / "bitnet_b1.58_full.onnx"), 294968, 3.73, step[0]),
              GraphTiming("bitlinear", str(out / "bitnet_b1.58_bitlinear.onnx"), 18488, 16.94, step[1]),
              GraphTiming("matmulnbits", str(root / "gone" / "bitnet_b1.58_matmulnbits.onnx"), 22528, 5.47,
                          step[2])]
    pt = ProjectionTiming(0, 7, 128, step_ms={"float": 0.06, "bitlinear": 0.026, "matmulnbits": 0.05},
                          prefill_ms={"float": 0.31, "bitlinear": 4.4, "matmulnbits": 0.82})
    return PerfResult(graphs, 128, 14, ["machine: 2 CPUs"], pt, why_slower=why)


ACCURACY = {"compared": "BitLinear graph vs the exported graph",
            "logits": {"max_abs": 0.0247, "mean_abs": 6.0e-05, "cosine": 0.99999, "argmax_agreement": 1.0,
                       "positions": 128}}
NODES = [{"name": "/model/layers.0/self_attn/q_proj/MatMul", "k": 64, "n": 64, "int_exact": True,
          "max_err": 0.03, "bound": 0.07, "result": "ok", "layout": "tdpu"}]


def _write(root: Path, perf: PerfResult | None, verdict: str = "通过 passed") -> tuple[str, dict]:
    report = root / "phase3_logs" / "performance_report.md"
    meta = {"profile": "reference", "num_layers": 2, "hidden_size": 64, "vocab_size": 256,
            "checkpoint": str(root / "models" / "output" / "synthetic" / "tiny-seed0")}
    drawn = write_performance_report(report, meta, ACCURACY, perf, NODES, verdict, ["a note"],
                                     {"generated": "2026-12-02 07:22:49 UTC+00:00"}, root=root)
    return report.read_text(encoding="utf-8"), drawn


# performance report -------------------------------------------------------------------------

def test_the_report_embeds_png_charts_written_beside_it(tmp_path):
    text, drawn = _write(tmp_path, _perf(tmp_path))
    logs = tmp_path / "phase3_logs"
    assert set(drawn) == {"prefill", "step", "weights"}
    links = re.findall(r"!\[[^\]]+\]\(([^)]+)\)", text)
    assert links == [CHART_FILES["prefill"], CHART_FILES["step"], CHART_FILES["weights"]]
    for name in links:
        png = logs / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert charts.png_size(png) == (charts.WIDTH_PX, charts.HEIGHT_PX) == (800, 360)
        assert png.stat().st_size > 5000          # drawn, not an empty canvas


def test_a_report_without_timings_links_no_chart_and_leaves_none_from_before(tmp_path):
    _write(tmp_path, _perf(tmp_path))
    text, drawn = _write(tmp_path, None, "未通过 failed: integer core differs")
    assert drawn == {} and "![" not in text
    assert not [p for p in (tmp_path / "phase3_logs").iterdir() if p.suffix == ".png"]


def test_speed_ratios_are_said_in_words_with_the_reason_when_slower(tmp_path):
    text, _ = _write(tmp_path, _perf(tmp_path, why="tiny shapes: the operator bridge's fixed cost"))
    assert ("| step: BitLinear / float | BitLinear step 6.4 × slower than float "
            "(tiny shapes: the operator bridge's fixed cost) |") in text
    assert "| weights: BitLinear / float | BitLinear weights 0.063 × float (16 × smaller) |" in text
    # projections alone: BitLinear 0.026 ms against float 0.06 ms
    assert "| step: BitLinear / float | BitLinear step 0.43 × float (2.3 × faster) |" in text
    assert not re.search(r"\d×", text)        # no bare "6.258×" left


def test_the_report_shows_paths_relative_to_the_project_and_the_zone_in_its_header(tmp_path):
    text, _ = _write(tmp_path, _perf(tmp_path))
    assert str(tmp_path) not in text
    assert "- **检查点 Checkpoint**: `models/output/synthetic/tiny-seed0`" in text
    assert "| `models/output/bitnet_b1.58_full.onnx` |" in text
    assert "`bitnet_b1.58_matmulnbits.onnx` (built for timing, not kept)" in text
    assert re.search(r"\*\*生成时间 Generated\*\*: " + TIME_ZONE_RE, text)
    assert "| argmax agreement | 100.00% of 128 positions |" in text


def test_sections_written_by_another_stage_are_kept_when_the_report_is_rewritten(tmp_path):
    report = tmp_path / "phase3_logs" / "performance_report.md"
    update_section(report, "tdpu", "## TDPU cost model\n\n| lanes | cores |\n|---|---|\n| 32 | 1 |")
    _write(tmp_path, _perf(tmp_path))
    update_section(report, "tdpu", "## TDPU cost model\n\nsecond run")
    text, _ = _write(tmp_path, _perf(tmp_path))
    assert text.count("<!-- tdpu:section tdpu -->") == 1 and text.count("<!-- /tdpu:section tdpu -->") == 1
    assert "second run" in text and "| 32 | 1 |" not in text
    assert text.index("## 性能 Performance") < text.index("<!-- tdpu:section tdpu -->")


# export log ---------------------------------------------------------------------------------

def _export_log(tmp_path: Path, verdict: Verdict) -> str:
    cfg = load_config(write_config(tmp_path))
    from tdpu_tui.engine.core.artifacts import Artifacts

    paths = Artifacts.of(cfg)
    c = types.SimpleNamespace(num_hidden_layers=2, hidden_size=64, intermediate_size=128,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=256,
                              rms_norm_eps=1e-5, rope_theta=500000.0)
    meta = {"profile": "reference", "checkpoint": str(tmp_path / "out" / "synthetic" / "tiny-seed0"),
            "exported_at": "2026-12-02T07:22:09"}
    write_export_log(paths, cfg, meta, c, {"embedding": 1}, {"x.onnx": 10}, {"MatMul": 14}, verdict,
                     {"total": 1.0}, 1 << 20, 1 << 20, 14, "autobitlinear")
    return paths.export_log.read_text(encoding="utf-8")


def test_the_export_log_reads_like_the_other_records(tmp_path):
    m = {"max_abs": 1.1e-05, "mean_abs": 1.3e-06, "cosine": 1.0, "argmax_agreement": 1.0, "positions": 32}
    text = _export_log(tmp_path, Verdict(m, None, True, "", np.zeros(1)))
    assert "- **结论 Verdict**: 通过 passed\n" in text
    assert "- **时间 Time**: 2026-12-02 07:22:09 UTC" in text
    assert "- **检查点 checkpoint**: `out/synthetic/tiny-seed0`" in text
    assert "| argmax agreement | 100.00% of 32 positions |" in text
    assert str(tmp_path) not in text


def test_an_export_that_passes_on_the_rounding_floor_says_so_in_its_verdict(tmp_path):
    m = {"max_abs": 0.3, "mean_abs": 0.01, "cosine": 0.999, "argmax_agreement": 0.97, "positions": 32}
    floor = {"argmax_agreement": 0.96, "mean_abs": 0.01}
    why = ("argmax agreement 97.00% is below 99%, but the PyTorch reference itself agrees on 96.00% of "
           "positions with its input moved by one ulp (mean |Δ| 0.01): activation-rounding flips")
    text = _export_log(tmp_path, Verdict(m, floor, True, why, np.zeros(1)))
    line = next(x for x in text.splitlines() if x.startswith("- **结论 Verdict**"))
    assert "通过 passed within tolerance: argmax agreement 97.00% is below 99%" in line
    assert not has_nested_parens(line)
    assert "Below the 99.00% bar" in text


# compile log --------------------------------------------------------------------------------

def test_compile_log_sections_show_paths_relative_and_commands_verbatim(tmp_path):
    log = tmp_path / "logs" / "icraft_compile_log.md"
    cwd = tmp_path / "out" / "icraft_output"
    csv = cwd / "net_precheck.csv"
    cwd.mkdir(parents=True)
    csv.write_text("x")
    StageRecord("parse", "ok", summary=f"wrote {cwd}/net_parsed.json", command=["icraft", "parse", str(csv)],
                cwd=cwd, started=0.0, seconds=1.5, files=[csv], notes=[f"graph: `{tmp_path}/out/g.onnx`"],
                root=tmp_path).write(log)
    section = read_section(log, "parse")
    assert "- working directory: `out/icraft_output`" in section
    assert "wrote out/icraft_output/net_parsed.json" in section
    assert "- graph: `out/g.onnx`" in section
    assert "| `out/icraft_output/net_precheck.csv` | 1 B |" in section
    assert f"icraft parse {csv}" in section             # the command pastes from anywhere
    assert re.search(r"- time: " + TIME_ZONE_RE, section)
    assert "- duration: 1.50 s" in section


def test_simulate_and_export_show_argmax_agreement_the_same_way(exported_tiny, tmp_path):
    from tdpu_tui.engine.core.artifacts import Artifacts
    from tdpu_tui.engine.core.pipeline import Pipeline
    from tdpu_tui.engine.stages import all_stages

    shutil.copytree(exported_tiny.base_dir, tmp_path / "p")
    cfg = load_config(tmp_path / "p" / "tdpu.toml")
    summary = Pipeline(cfg, all_stages()).run(["simulate"])
    assert summary.results[0].status is Status.OK, summary.results[0].message
    paths = Artifacts.of(cfg)
    export_row = next(x for x in paths.export_log.read_text().splitlines() if x.startswith("| argmax agreement"))
    simulate_row = next(x for x in read_section(paths.compile_log, "simulate").splitlines()
                        if x.startswith("| argmax agreement"))
    assert re.fullmatch(r"\| argmax agreement \| \d+\.\d\d% of \d+ positions \|", simulate_row)
    assert re.fullmatch(r"\| argmax agreement \| \d+\.\d\d% of \d+ positions \|", export_row)
    assert str(tmp_path) not in read_section(paths.compile_log, "simulate")


# --json -------------------------------------------------------------------------------------

def _cfg(tmp_path: Path):
    return load_config(write_config(tmp_path))


def test_json_summary_carries_the_runs_outcome_first(tmp_path):
    cfg = _cfg(tmp_path)
    results = [StageResult("export", Status.OK, 1.0, "ok",
                           artifacts={"onnx": str(tmp_path / "out" / "full.onnx"), "outside": "/etc/hosts"}),
               StageResult("precheck", Status.FAILED, 0.2, "boom"),
               StageResult("replace", Status.SKIPPED, 0.0, "not run: precheck failed", blocked_by="precheck")]
    doc = json_summary(RunSummary(results), cfg, code=1, started=1_700_000_000.0, finished=1_700_000_012.5,
                       selected=["export", "precheck", "replace"])
    assert list(doc)[:4] == ["status", "interrupted", "exit_code", "started"]
    assert (doc["status"], doc["interrupted"], doc["exit_code"]) == ("failed", False, 1)
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}", doc["started"])
    assert re.fullmatch(r"UTC[+-]\d{2}:\d{2}", doc["time_zone"]) and doc["seconds"] == 12.5
    assert doc["config"] == "tdpu.toml" and doc["project"] == str(tmp_path.resolve())
    from tdpu_tui import __version__
    assert doc["tdpu_version"] == __version__
    assert doc["artifacts"] == {"onnx": "out/full.onnx", "outside": "/etc/hosts"}
    assert [s["cancelled"] for s in doc["stages"]] == [False, False, False]
    assert doc["stages"][2]["blocked_by"] == "precheck"
    assert "not_run" not in doc


def test_an_interrupted_run_says_so_at_the_top_and_names_what_did_not_run(tmp_path):
    cfg = _cfg(tmp_path)
    stopped = StageResult("export", Status.CANCELLED, 3.0, "interrupted (Ctrl-C)")  # Ctrl-C
    doc = json_summary(RunSummary([stopped], interrupted=True), cfg, code=130, started=0.0, finished=3.0,
                       selected=["export", "precheck"])
    assert list(doc)[:3] == ["status", "interrupted", "exit_code"]
    assert (doc["status"], doc["interrupted"], doc["exit_code"]) == ("interrupted", True, 130)
    assert doc["stages"][0]["cancelled"] is True and doc["stages"][0]["status"] == "cancelled"
    assert doc["not_run"] == ["precheck"]


def test_batch_json_from_the_command_line(tmp_path):
    from tests.conftest import run_tdpu

    write_config(tmp_path)
    proc = run_tdpu("--batch", "--stage", "rtl", "--json", "run.json", cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads((tmp_path / "run.json").read_text(encoding="utf-8"))
    assert doc["status"] == "ok" and doc["exit_code"] == 0 and doc["config"] == "tdpu.toml"
    assert doc["stages"][0]["name"] == "rtl" and doc["stages"][0]["status"] == "skipped"
    assert doc["stages"][0]["cancelled"] is False


def test_matplotlib_is_not_imported_with_the_stages_or_the_charts_module():
    import subprocess
    import sys

    code = ("import sys; from tdpu_tui.engine.stages import all_stages; all_stages(); "
            "import tdpu_tui.engine.records.charts; "
            "sys.exit(1 if 'matplotlib' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_the_validate_stage_writes_the_charts_and_links_them(exported_tiny, tmp_path):
    from tdpu_tui.engine.core.artifacts import Artifacts
    from tdpu_tui.engine.core.pipeline import Pipeline
    from tdpu_tui.engine.stages import all_stages

    shutil.copytree(exported_tiny.base_dir, tmp_path / "p")
    config = tmp_path / "p" / "tdpu.toml"
    config.write_text(config.read_text() + "[validate]\nrepeats = 1\nsample_nodes = 2\n")
    cfg = load_config(config)
    results = {r.name: r for r in Pipeline(cfg, all_stages()).run(["replace", "validate"]).results}
    validate = results["validate"]
    assert validate.status is Status.OK, validate.message
    assert re.search(r"BitLinear step [\d.]+ × (slower than|float \()", validate.message)
    report = Artifacts.of(cfg).performance_report
    text = report.read_text(encoding="utf-8")
    for key, name in CHART_FILES.items():
        assert f"]({name})" in text
        assert charts.png_size(report.parent / name) == (charts.WIDTH_PX, charts.HEIGHT_PX)
        assert validate.artifacts[f"performance_chart_{key}"] == str(report.parent / name)
    verdict = next(x for x in text.splitlines() if x.startswith("- **结论 Verdict**"))
    assert verdict == "- **结论 Verdict**: 通过 passed"
    assert str(tmp_path) not in text


def test_a_validate_pass_below_99_percent_says_it_rests_on_the_tolerance(tmp_path, monkeypatch):
    """icraft profile: 98 % argmax agreement with the reference, whose own rounding floor is 97 %."""
    from tdpu_tui.engine.core.artifacts import Artifacts
    from tdpu_tui.engine.core.pipeline import Pipeline
    from tdpu_tui.engine.stages import all_stages
    from tdpu_tui.engine.stages import validate as validate_stage

    def near_tie(self, inputs, got):
        m = {"max_abs": 0.02, "mean_abs": 0.001, "cosine": 0.9999, "argmax_agreement": 0.98,
             "positions": 128, "finite": True}
        floor = {"argmax_agreement": 0.97, "mean_abs": 0.001}
        why = ("argmax agreement 98.00% is below 99.00%, but the PyTorch reference itself agrees on 97.00% "
               "of positions with its input moved by one ulp (mean |Δ| 0.001): activation-rounding flips "
               "cascading through the layers, not a defect")
        return Verdict(m, floor, True, why, got)

    monkeypatch.setattr(validate_stage.Validation, "versus_reference", near_tie)
    config = write_config(tmp_path, "[validate]\nrepeats = 1\nsample_nodes = 2\n", profile="icraft")
    cfg = load_config(config)
    results = {r.name: r for r in Pipeline(cfg, all_stages()).run(["export", "replace", "validate"]).results}
    assert results["validate"].status is Status.OK, results["validate"].message
    assert "argmax agreement 98.00% within tolerance" in results["validate"].message
    text = Artifacts.of(cfg).performance_report.read_text(encoding="utf-8")
    verdict = next(x for x in text.splitlines() if x.startswith("- **结论 Verdict**"))
    assert verdict.startswith("- **结论 Verdict**: 通过 passed within tolerance: argmax agreement 98.00% "
                              "is below 99.00%, but the PyTorch reference itself agrees on 97.00%")
    assert not has_nested_parens(verdict)


# a whole run on a fresh project, as a new user makes it -----------------------------------

@pytest.fixture(scope="module")
def fresh_run(tmp_path_factory):
    """`tdpu --batch --json run.json` on the shipped tdpu.toml (its default paths), without Icraft:
    parse and optimize skipped with the hand-off hint, rtl skipped naming tdpu.toml."""
    from tests.conftest import REPO, run_tdpu

    root = tmp_path_factory.mktemp("fresh_run").resolve()
    shipped = (REPO / "tdpu.toml").read_text(encoding="utf-8")
    assert 'bin = "icraft"' in shipped
    (root / "tdpu.toml").write_text(
        shipped.replace('bin = "icraft"', 'bin = "tdpu-test-no-such-icraft"')
        + "\n[validate]\nrepeats = 1\nsample_nodes = 2\n", encoding="utf-8")
    proc = run_tdpu("--batch", "--json", "run.json", cwd=root, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root, json.loads((root / "run.json").read_text(encoding="utf-8"))


@pytest.mark.slow
def test_no_record_and_no_json_field_of_a_fresh_run_names_the_project_absolutely(fresh_run):
    root, doc = fresh_run
    records = sorted((root / "phase3_logs").glob("*.md"))
    assert {"export_log.md", "icraft_compile_log.md", "performance_report.md"} <= {p.name for p in records}
    for record in records:
        assert str(root) not in record.read_text(encoding="utf-8"), record.name
    skipped = read_section(root / "phase3_logs" / "icraft_compile_log.md", "parse")
    assert "copy models/output/icraft_output to the Windows host" in skipped
    assert doc["project"] == str(root)
    rest = {k: v for k, v in doc.items() if k != "project"}
    assert str(root) not in json.dumps(rest, ensure_ascii=False)
    messages = {s["name"]: s["message"] for s in doc["stages"]}
    assert "set [rtl].sources in tdpu.toml" in messages["rtl"]
    assert re.search(r"\(\d+ × smaller\)", messages["replace"]), messages["replace"]


def _readme_artifacts() -> list[str]:
    """The file patterns of the README's artifact table (its first column), as globs.

    A name without a top folder is beside the row's first path (`+ .onnx.data` replaces its
    suffix); `{a,b}` lists names; `{net}`, `<stage>` and `*` stand for any name; a trailing `/`
    is a folder and everything in it."""
    from tests.conftest import REPO

    text = (REPO / "README.md").read_text(encoding="utf-8")
    table = text.split("## Artifacts", 1)[1].split("\n\n", 2)[1]
    patterns: list[str] = []
    for row in table.splitlines()[2:]:
        first: str | None = None
        for token in re.findall(r"`([^`]+)`", row.split(" | ")[0]):
            token = re.sub(r"\{[^},]+\}|<[^>]+>", "*", token)
            if " " in token:       # `--json PATH`: a file the user names
                continue
            if token.startswith(("models/", "phase3_logs/")):
                path = first = token
            elif first is None:
                continue
            elif token.startswith("."):
                head, name = first.rsplit("/", 1)
                cut = name.rfind("." + token[1:].split(".")[0])
                path = f"{head}/{name[:cut] if cut > 0 else name}{token}"
            else:
                path = (first if first.endswith("/") else first.rsplit("/", 1)[0] + "/") + token
            m = re.search(r"\{([^}]*,[^}]*)\}", path)
            options = [path[:m.start()] + o + path[m.end():] for o in m.group(1).split(",")] if m else [path]
            for option in options:
                patterns.append(option + "*" if option.endswith("/") else option)
    return patterns


@pytest.mark.slow
def test_the_readme_artifact_table_lists_every_file_a_fresh_run_writes(fresh_run):
    import fnmatch

    root, _ = fresh_run
    patterns = _readme_artifacts()
    assert "models/output/bitnet_b1.58_full.onnx.data" in patterns
    assert "phase3_logs/performance_step.png" in patterns
    written = [p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()]
    unlisted = [w for w in written if w not in ("tdpu.toml", "run.json")
                and not any(fnmatch.fnmatchcase(w, p) for p in patterns)]
    assert not unlisted, f"written by the run but not in the README's artifact table: {unlisted}"
