"""Import Icraft's results from the Pipeline tab: `i` asks for a bundle folder or zip and
runs the same import as `tdpu icraft import PATH` (see `docs/icraft.md`)."""

from __future__ import annotations

import threading
from pathlib import Path

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Input, Static

from tdpu_tui.engine.core.events import RunFinished, RunSummary


class ImportScreen(ModalScreen[str | None]):
    """Asks for the path of a bundle that came back from the Icraft host."""

    BINDINGS = [Binding("escape", "close", "Cancel")]

    def __init__(self, default: str = ""):
        super().__init__()
        self.default = default

    def compose(self) -> ComposeResult:
        with Vertical(id="confirm", classes="dialog"):
            yield Static("Import Icraft results: the bundle folder or zip after Icraft ran in it",
                         id="confirm-question")
            yield Input(self.default, id="import-path", placeholder="path/to/icraft_output or .zip")
            yield Static("[b]enter[/b] import    [b]escape[/b] cancel", id="confirm-keys")

    def on_mount(self) -> None:
        self.query_one(Input).focus()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.dismiss(event.value.strip() or None)

    def action_close(self) -> None:
        self.dismiss(None)


class ImportAction:
    """The app's `import_bundle` action (mixed into the app)."""

    def action_import_bundle(self) -> None:
        if self.running:
            self.say("a run is in progress (c cancels it)", severity="warning")
            return
        self.push_screen(ImportScreen(str(self.paths.icraft_dir)), self._import_chosen)

    def _import_chosen(self, path: str | None) -> None:
        if not path or self.running:
            return
        # As for a run started here (`start_run`): the import's lines come as events, so the
        # stage logs it writes are not also tailed; `RunFinished` follows them again.
        self.tailer.unfollow_dir(self.paths.run_logs.resolve())
        self.tailer.unfollow_dir(self.paths.icraft_dir.resolve())
        self.import_cancel = cancel = threading.Event()
        # The app's worker while it lasts: `r`, `f` and `i` wait for it, `c` and `q` stop it.
        self.worker = self.run_worker(lambda: self._import_in_thread(Path(path).expanduser(), cancel),
                                      name="icraft-import", group="pipeline", thread=True,
                                      exit_on_error=False)
        self.refresh_bindings()

    def _import_in_thread(self, path: Path, cancel: threading.Event) -> None:
        from tdpu_tui.engine.stages.handoff import import_bundle

        report = None
        try:
            report = import_bundle(self.config, path, self._post_event, cancel=cancel)
        finally:
            if report is None or report.refused:
                self.call_from_thread(self._follow_other_runs, history=False)
        if report.refused:
            self.call_from_thread(self.say, f"import refused: {report.refused}",
                                  severity="error", title="icraft import", timeout=12)
            return
        self._post_event(RunFinished(None, RunSummary(results=report.results)))
        extra = f"; {', '.join(report.drafted)}" if report.drafted else ""
        self.call_from_thread(self.say, f"imported {report.root}{extra}", title="icraft import")
