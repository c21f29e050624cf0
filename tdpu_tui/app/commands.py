"""The command palette (ctrl+p): the app's actions by name, offered only where they can act.

The stage commands are made from the stages the Pipeline tab shows (the registry's), so a
stage added to the registry gets its "run" (and, once failed, its "draft") command here.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from textual.command import DiscoveryHit, Hit, Hits, Provider

from tdpu_tui.app import run_control
from tdpu_tui.engine.core.events import Status

Command = tuple[str, str, Callable[[], object]]


def app_commands(app) -> list[Command]:
    """(name, help, callback) of every action that can act now, in the order shown."""
    act = app.run_action
    out: list[Command] = []

    def add(name: str, help_text: str, action: str) -> None:
        if run_control.can_act(app, action.split("(")[0]):
            out.append((name, help_text, partial(act, action)))

    add("Run every stage", "r · the whole pipeline, in the registry's order", "run_all")
    add("Rerun the failed and cancelled stages", "f · with the stages they blocked", "rerun_failed")
    add("Cancel the run", "c · the stage stops at its next check", "cancel")
    rows = app.pipeline_panel.rows
    if not app.running:
        for name, row in rows.items():
            out.append((f"Run stage {name}", f"{row.title} only (enter on its row)",
                        partial(app.start_run, [name])))
    for name, row in rows.items():
        if row.status is Status.FAILED:
            out.append((f"Draft a bug record from {name}",
                        f"d · {name} failed: {row.result_line()[:60]}",
                        partial(app.draft_bug_from, name)))
    for tab, digit in app.tab_keys().items():
        add(f"Show the {tab.capitalize()} tab", f"{digit}", f"show_tab('{tab}')")
    add("New bug record", "b · the bug form", "add_bug")
    add("Import Icraft results", "i · a bundle that came back from the Icraft host", "import_bundle")
    add("Help: every key", "?", "help")
    add("Quit", "q · asks first while a stage runs", "quit")
    return out


class TdpuCommands(Provider):
    async def discover(self) -> Hits:
        for name, help_text, callback in app_commands(self.app):
            yield DiscoveryHit(name, callback, help=help_text)

    async def search(self, query: str) -> Hits:
        matcher = self.matcher(query)
        for name, help_text, callback in app_commands(self.app):
            score = matcher.match(name)
            if score > 0:
                yield Hit(score, matcher.highlight(name), callback, text=name, help=help_text)
