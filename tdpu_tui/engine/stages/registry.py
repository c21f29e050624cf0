"""The registry: every stage, in pipeline order (SPEC §1)."""

from __future__ import annotations

from tdpu_tui.engine.core.pipeline import Stage

ORDER = ("export", "precheck", "parse", "optimize", "simulate", "replace", "validate")


def all_stages() -> list[Stage]:
    from tdpu_tui.engine.stages.export import ExportStage
    from tdpu_tui.engine.stages.icraft import OptimizeStage, ParseStage, PrecheckStage, SimulateStage
    from tdpu_tui.engine.stages.replace import ReplaceStage
    from tdpu_tui.engine.stages.validate import ValidateStage

    stages: list[Stage] = [ExportStage(), PrecheckStage(), ParseStage(), OptimizeStage(),
                           SimulateStage(), ReplaceStage(), ValidateStage()]
    return sorted(stages, key=lambda s: ORDER.index(s.name))
