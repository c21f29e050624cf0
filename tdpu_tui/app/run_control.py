"""When the app's run keys can act (`TdpuApp.check_action`): the footer shows a key only then.

`r` and `enter` start a run only while none runs; `c` cancels only while one runs; `f` reruns
only when a stage failed or was cancelled. Everything else is always available.
"""

from __future__ import annotations

from textual.css.query import NoMatches

from tdpu_tui.engine.core.events import Status

RERUN = (Status.FAILED, Status.CANCELLED)


def can_act(app, action: str) -> bool:
    if action == "cancel":
        return app.running
    if action == "run_all":
        return not app.running
    if action == "rerun_failed":
        if app.running:
            return False
        try:
            rows = app.pipeline_panel.rows
        except NoMatches:   # starting or shutting down: no panel yet
            return False
        return any(r.status in RERUN for r in rows.values())
    return True
