"""The registry: every stage, in pipeline order (SPEC §1)."""

from __future__ import annotations

from tdpu_tui.engine.pipeline import Stage

ORDER = ("export", "precheck", "parse", "optimize", "simulate", "replace", "validate")


def all_stages() -> list[Stage]:
    from tdpu_tui.engine.export import ExportStage

    stages: list[Stage] = [ExportStage()]
    return sorted(stages, key=lambda s: ORDER.index(s.name))
