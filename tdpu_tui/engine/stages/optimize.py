"""Stage `optimize`: `icraft optimize` on the parsed graph, with `[icraft].pass_on`; skipped without the CLI."""

from __future__ import annotations

from tdpu_tui.engine.core.errors import UsageError
from tdpu_tui.engine.core.stage import Stage, StageContext
from tdpu_tui.engine.icraft import driver as ic
from tdpu_tui.engine.stages.icraft_run import prepare_log_dir, require_cli, run_component
from tdpu_tui.engine.records.compile_log import StageRecord

class OptimizeStage(Stage):
    name = "optimize"
    title = "icraft optimize"
    needs = ("parse",)
    bug_stage = "编译"
    log_section = "optimize"

    def run(self, ctx: StageContext) -> str:
        exe = require_cli(ctx, f"the hand-off bundle in {ctx.paths.icraft_dir} runs it on the "
                               "Icraft host (see the parse section of the compile log)")
        cfg = ctx.config
        jr = ctx.paths.icraft_dir
        pj, pr = ic.parsed_files(jr, cfg.icraft.net_name, "parsed")
        missing = [p for p in (pj, pr) if not p.exists()]
        if missing:
            raise UsageError(f"{missing[0]} not found: run the parse stage first")
        log_dir = prepare_log_dir(ctx.paths.icraft_logs / "optimize")
        outputs = list(ic.parsed_files(jr, cfg.icraft.net_name, "optimized"))
        argv = ic.optimize_argv(exe, cfg, pj, pr, jr, log_dir)
        notes = [f"passes switched on: {', '.join(cfg.icraft.pass_on) or 'none'}"]
        res = run_component(ctx, exe, argv, outputs, log_dir,
                            StageRecord("optimize", "running", notes=notes))
        for p in outputs:
            ctx.artifact(f"icraft_{p.suffix[1:]}_optimized", p)
        return f"{outputs[0].name} + .raw in {res.seconds:.1f} s"
