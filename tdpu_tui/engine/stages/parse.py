"""Stage `parse`: `icraft parse` on the exported graph; skipped without the CLI."""

from __future__ import annotations

from tdpu_tui.engine.core.stage import Stage, StageContext
from tdpu_tui.engine.icraft import driver as ic
from tdpu_tui.engine.stages.icraft_run import prepare_log_dir, require_cli, run_component, write_toml
from tdpu_tui.engine.records.compile_log import StageRecord
from tdpu_tui.engine.stages.common import exported_graph, graph_inputs

class ParseStage(Stage):
    name = "parse"
    title = "icraft parse"
    needs = ("precheck",)
    bug_stage = "编译"
    log_section = "parse"

    def run(self, ctx: StageContext) -> str:
        exe = require_cli(ctx)
        cfg = ctx.config
        onnx_path = exported_graph(ctx)
        inputs = graph_inputs(onnx_path, cfg.export.seq_len)
        toml_path = write_toml(ctx, onnx_path, inputs)
        jr = ctx.paths.icraft_dir
        log_dir = prepare_log_dir(ctx.paths.icraft_logs / "parse")
        outputs = list(ic.parsed_files(jr, cfg.icraft.net_name, "parsed"))
        for stale in ic.parsed_files(jr, cfg.icraft.net_name, "optimized"):
            stale.unlink(missing_ok=True)   # it came from the parsed graph being replaced
        argv = ic.parse_argv(exe, cfg, onnx_path, [s for _, s, _ in inputs], jr, log_dir)
        record = StageRecord("parse", "running", notes=[f"same run by hand: `{toml_path}`"])
        res = run_component(ctx, exe, argv, outputs, log_dir, record)
        for p in outputs:
            ctx.artifact(f"icraft_{p.suffix[1:]}_parsed", p)
        return f"{outputs[0].name} + .raw in {res.seconds:.1f} s"
