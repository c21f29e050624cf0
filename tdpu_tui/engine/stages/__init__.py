"""One module per pipeline stage, named after it, and the registry that orders them.

The registry is data: the faces (`tdpu --batch`, the app, `tdpu bugs`) build the stage list
from it and hand it to the pipeline. To add a stage, write `stages/<name>.py` with a `Stage`
subclass and put it in `REGISTRY` at its place in the run order.
"""

from __future__ import annotations

from tdpu_tui.engine.core.stage import Stage
from tdpu_tui.engine.stages.export import ExportStage
from tdpu_tui.engine.stages.optimize import OptimizeStage
from tdpu_tui.engine.stages.parse import ParseStage
from tdpu_tui.engine.stages.precheck import PrecheckStage
from tdpu_tui.engine.stages.replace import ReplaceStage
from tdpu_tui.engine.stages.rtl import RtlStage
from tdpu_tui.engine.stages.simulate import SimulateStage
from tdpu_tui.engine.stages.validate import ValidateStage

# The run order (docs/spec.md §1).
REGISTRY: tuple[type[Stage], ...] = (
    ExportStage, PrecheckStage, ParseStage, OptimizeStage, SimulateStage, ReplaceStage,
    ValidateStage, RtlStage,
)
NAMES: tuple[str, ...] = tuple(cls.name for cls in REGISTRY)


def all_stages() -> list[Stage]:
    """A fresh instance of every stage, in run order."""
    return [cls() for cls in REGISTRY]


def bug_stages() -> dict[str, str]:
    """Stage name -> the bug book's 发现阶段 (docs/spec.md §7) its failures are filed under."""
    return {cls.name: cls.bug_stage for cls in REGISTRY}


def log_sections() -> tuple[str, ...]:
    """The compile log's sections, in run order."""
    return tuple(cls.log_section for cls in REGISTRY if cls.log_section)
