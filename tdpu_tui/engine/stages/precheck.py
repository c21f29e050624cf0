"""Stage `precheck`: every node of the exported graph against Icraft's op-support table.

It fails only for a graph exported for Icraft (`[export] profile = "icraft"`) that still
holds something unsupported; the findings go to `{net}_precheck.csv` and the compile log."""

from __future__ import annotations

import time

from tdpu_tui.engine.core.errors import StageFailed
from tdpu_tui.engine.core.stage import Stage, StageContext
from tdpu_tui.engine.records.compile_log import StageRecord
from tdpu_tui.engine.stages.common import exported_graph, read_export_meta

class PrecheckStage(Stage):
    name = "precheck"
    title = "Icraft op precheck"
    needs = ("export",)
    bug_stage = "编译"
    log_section = "precheck"

    def run(self, ctx: StageContext) -> str:
        from tdpu_tui.engine.icraft.optable import table_for
        from tdpu_tui.engine.icraft.rules import (
            precheck_model,
            summary_markdown,
            write_precheck_csv,
        )

        started = time.time()
        onnx_path = exported_graph(ctx)
        meta = read_export_meta(ctx)
        profile = meta.profile
        table = table_for(ctx.config)
        ctx.log(f"op table: {table.origin} ({len(table)} ops)")
        ctx.progress(0, 2, "reading the graph (without weights)")
        report = precheck_model(onnx_path, table)
        ctx.progress(1, 2, "writing the results")
        net = ctx.config.icraft.net_name
        csv_path = ctx.paths.icraft_dir / f"{net}_precheck.csv"
        write_precheck_csv(csv_path, report)
        ctx.artifact("icraft_precheck_csv", csv_path)
        ctx.artifact("icraft_compile_log", ctx.paths.compile_log)

        counts = report.counts
        for cat, n in counts.items():
            ctx.metric(cat, n)
        ctx.metric("nodes", report.node_count)
        ctx.metric("blocking", len(report.blocking))
        for (op, cat), n in list(report.by_op().items())[:30]:
            ctx.log(f"{cat:12s} {op:20s} {n} node(s)", "warning" if cat != "advisory" else "info")

        blocking = len(report.blocking)
        found = ", ".join(f"{n} {cat}" for cat, n in counts.items() if n) or "no findings"
        notes = [f"export profile: `{profile}`"]
        failed = profile == "icraft" and blocking > 0
        if blocking and profile != "icraft":
            where = ctx.config.file.name if ctx.config.file else "tdpu.toml"
            hint = ('the reference profile is not meant for Icraft; export with '
                    f'[export] profile = "icraft" in {where}')
            notes.append(hint)
            ctx.log(hint, "warning")
        summary = f"{report.node_count} nodes checked: {found}"
        StageRecord(
            "precheck", "failed" if failed else "ok", summary=summary, started=started,
            seconds=time.time() - started, files=[csv_path], notes=notes,
            extra=summary_markdown(report, csv_path), root=ctx.config.base_dir,
        ).write(ctx.paths.compile_log)
        ctx.progress(2, 2, "done")
        if failed:
            raise StageFailed(f"{blocking} node(s) Icraft does not support in the icraft-profile "
                              f"graph ({found}); see {csv_path}")
        return summary + (f"; {blocking} blocking for Icraft (reference profile: not failed)"
                          if blocking else "")
