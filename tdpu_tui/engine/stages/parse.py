"""Stage `parse`: the hand-off bundle, then `icraft parse` on the exported graph; skipped
without the CLI (the bundle is there to take to the Icraft host)."""

from __future__ import annotations

from tdpu_tui.engine.core.stage import Stage, StageContext
from tdpu_tui.engine.icraft import driver as ic
from tdpu_tui.engine.records.compile_log import StageRecord
from tdpu_tui.engine.stages.common import exported_graph, graph_inputs
from tdpu_tui.engine.stages.handoff import handoff_hint, write_handoff
from tdpu_tui.engine.stages.icraft_run import (
    prepare_log_dir,
    require_cli,
    run_component,
)


class ParseStage(Stage):
    name = "parse"
    title = "icraft parse"
    needs = ("precheck",)
    bug_stage = "编译"
    log_section = "parse"

    def run(self, ctx: StageContext) -> str:
        cfg = ctx.config
        bundle = write_handoff(ctx)     # before the CLI is looked for: it is the way without it
        placed = [f"hand-off bundle: {f.describe()}" for f in bundle.files]
        exe = require_cli(ctx, handoff_hint(bundle), placed)
        onnx_path = exported_graph(ctx)
        inputs = graph_inputs(onnx_path, cfg.export.seq_len)
        toml_path = bundle.toml
        jr = ctx.paths.icraft_dir
        log_dir = prepare_log_dir(ctx.paths.icraft_logs / "parse")
        outputs = list(ic.parsed_files(jr, cfg.icraft.net_name, "parsed"))
        for stale in ic.parsed_files(jr, cfg.icraft.net_name, "optimized"):
            stale.unlink(missing_ok=True)   # it came from the parsed graph being replaced
        argv = ic.parse_argv(exe, cfg, onnx_path, [s for _, s, _ in inputs], jr, log_dir)
        record = StageRecord("parse", "running", notes=[f"same run by hand: `{toml_path}`", *placed])
        res = run_component(ctx, exe, argv, outputs, log_dir, record)
        for p in outputs:
            ctx.artifact(f"icraft_{p.suffix[1:]}_parsed", p)
        return f"{outputs[0].name} + .raw in {res.seconds:.1f} s"
