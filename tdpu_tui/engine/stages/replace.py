"""MatMul → BitLinear, as pattern → check → replacement (docs/spec.md §5).

pattern      `inventory.match_projection`: `M = MatMul(A, W)` (or `Gemm(A, W, transB=1)`, or
             `MatMul(A, Transpose(W))`) with a constant 2-D weight; around it optionally the
             reference profile's activation quantization of `x` (`A = Clip(Round(x·s))`,
             `M` followed by `Div(·, s)`) and one rescale by a constant scalar.
check        `inventory.classify_values`: W holds {-s, 0, +s} (zero share and s reported),
             N is a multiple of 4, the weight is not shared (tied embedding), and the node is
             selected (`[replace].include/exclude` globs, then the app's selection file).
replacement  the whole chain becomes `ai.tdpu::BitLinear(x, P, weight_scale)`, P = sign(W)
             packed in `[replace].layout` order, weight_scale = s · (folded scalar). BitLinear
             quantizes its activations itself, so the in-graph quantization around M goes too.
             Nodes and initializers left without consumers are removed.

Every MatMul/Gemm visited is reported with the reason it was or was not replaced. The output
graph is written with its weights streamed one tensor at a time to `<name>.onnx.data`, in a
staging directory renamed into place at the end: an interrupted run leaves the previous
artifacts as they were. The output is a function of the input bytes and the settings only, so
running the pass twice gives the same bytes, and a graph that is already replaced passes
through unchanged ("already BitLinear").
"""

from __future__ import annotations



from tdpu_tui.engine.core.errors import StageFailed
from tdpu_tui.engine.osutil.files import human_bytes
from tdpu_tui.engine.records.style import factor
from tdpu_tui.engine.rewrite.inventory import ALREADY
from tdpu_tui.engine.rewrite.selection import load_selection
from tdpu_tui.engine.core.stage import Stage, StageContext
from tdpu_tui.engine.model.compare import require_graph
from tdpu_tui.engine.rewrite.bitlinear import Decision, replace_model
from tdpu_tui.engine.core.errors import GraphError


class ReplaceStage(Stage):
    name = "replace"
    title = "MatMul → BitLinear"
    needs = ("export",)
    bug_stage = "替换"

    def run(self, ctx: StageContext) -> str:
        paths, rc = ctx.paths, ctx.config.replace
        require_graph(paths.full_onnx, "export")
        try:
            overrides = load_selection(paths.replace_selection)
        except GraphError as exc:
            raise StageFailed(str(exc)) from None
        if overrides:
            ctx.log(f"selection file {paths.replace_selection}: {len(overrides)} per-node override(s)")

        def decided(d: Decision) -> None:
            ctx.check_cancelled()
            if d.action == "replaced":
                ctx.log(f"replace {d.name} -> {d.bitlinear}  K={d.k} N={d.n} scale={d.scale:.6g} "
                        f"zeros={d.zeros:.1%}  ({d.reason})")
            elif d.action == "bf16":
                ctx.log(f"bf16    {d.name} -> {d.bitlinear}  K={d.k} N={d.n}  ({d.reason})")
            else:
                ctx.log(f"keep    {d.name}  ({d.reason})")

        shown = [-1]

        def progress(done: int, total: int, note: str) -> None:
            step = done * 20 // max(total, 1)   # at most 20 progress lines, however many tensors
            if step != shown[0]:
                shown[0] = step
                ctx.progress(done, total, f"writing {note}")
            else:
                ctx.check_cancelled()

        try:
            report = replace_model(paths.full_onnx, paths.bitlinear_onnx, layout=rc.layout,
                                   include=rc.include, exclude=rc.exclude, overrides=overrides,
                                   report_path=paths.replace_report, lm_head=rc.lm_head,
                                   on_decision=decided,
                                   on_progress=progress)
        except GraphError as exc:
            raise StageFailed(str(exc)) from None
        known = {d.name for d in report.decisions}
        for name in sorted(set(overrides) - known):
            ctx.log(f"selection file names {name!r}, which is not a MatMul of this graph; ignored",
                    "warning")
        ctx.artifact("bitlinear_onnx", paths.bitlinear_onnx)
        ctx.artifact("replace_report", paths.replace_report)
        ctx.metric("replaced", len(report.replaced))
        ctx.metric("kept", len(report.kept))
        ctx.metric("weight_bytes_before", report.bytes_before)
        ctx.metric("weight_bytes_after", report.bytes_after)
        ctx.metric("layout", rc.layout)
        ctx.metric("lm_head", rc.lm_head)
        ctx.metric("lm_head_bf16", len(report.bf16))
        if rc.lm_head == "bf16" and not report.bf16:
            ctx.log("[replace].lm_head = \"bf16\" but no MatMul/Gemm named lm_head is left to hold in "
                    "bf16 (none in this graph, or it is already LinearBF16): the lm_head is as it was",
                    "warning")
        if not report.replaced and not any(d.reason == ALREADY for d in report.decisions):
            raise StageFailed("no MatMul was replaced: every node was kept (see "
                              f"{paths.replace_report} for the reasons)")
        ratio = report.bytes_before / report.bytes_after if report.bytes_after else 0.0
        return (f"{len(report.replaced)} MatMul → BitLinear ({rc.layout} layout), {len(report.kept)} kept; "
                f"projection weights {human_bytes(report.bytes_before)} → {human_bytes(report.bytes_after)}"
                + (f" ({factor(ratio)} × smaller)" if ratio else "")
                + "".join(f"; {d.name} → {d.bitlinear} (bf16, {human_bytes(d.bytes_before)} → "
                          f"{human_bytes(d.bytes_after)})" for d in report.bf16))
