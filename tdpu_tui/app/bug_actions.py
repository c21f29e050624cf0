"""The app's bug actions: drafts from failed stages, and the form that adds and edits records.

A mixin of `TdpuApp`. Drafts follow the bug book's one rule (`records.bugbook.drafts`): the run
thread drafts a failed stage's record as `--batch` does; `d` opens it, or, if there is none,
the form pre-filled by the same rule and carrying the failure's signature, so a later automatic
draft of the same failure finds the saved record. Usage mistakes (a stage run out of order, a
missing file the user named) are reported and never drafted.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

from tdpu_tui.app.bugs_panel import BugsTable
from tdpu_tui.app.pipeline_panel import StagesTable
from tdpu_tui.app.screens import BugForm, now_minutes
from tdpu_tui.engine.core.config import Config
from tdpu_tui.engine.core.events import Event, StageResult, Status

FORM_FIELDS = ("title", "time", "stage", "status", "error", "cause", "fix")


@dataclass(frozen=True)
class BugRecorded(Event):
    """A failed stage's bug record, drafted now (`created`) or found from an earlier run."""

    number: int
    created: bool


@dataclass(frozen=True)
class BugNotFiled(Event):
    """A stage failed through a usage mistake: reported, not drafted."""


class BugActions:
    """Bug drafting and the bug form, for `TdpuApp` (which provides paths, panels, `say`)."""

    def _init_bug_actions(self) -> None:
        # Failures this app drafted into the bug book (run thread), shared with the Bugs tab.
        self._own_signatures: set[str] = set()
        # Stage -> message of its last failure that was a usage mistake (not a bug).
        self._usage_mistakes: dict[str, str] = {}

    def bug_stage_map(self) -> dict[str, str]:
        """Stage name -> 发现阶段: the registry's, and what the stages run here say."""
        from tdpu_tui.engine.stages import bug_stages
        mapping = bug_stages()
        pipeline = getattr(self, "pipeline", None)
        for stage in (pipeline.stages if pipeline is not None else ()):
            if stage.bug_stage:
                mapping[stage.name] = stage.bug_stage
        return mapping

    def prepare_bug_book(self) -> None:
        """A run starts the bug book (the template's title line) when there is none."""
        from tdpu_tui.engine.records.bugbook import ensure_book
        try:
            ensure_book(self.paths.bugs)
        except Exception as exc:  # the stages report an unusable [paths].logs themselves
            self.say(f"cannot create {self.paths.bugs}: {exc}", severity="warning")

    # -- the run thread -------------------------------------------------------------------------
    def _record_failure(self, result: StageResult, config: Config) -> None:
        """Draft the failed stage's bug record (worker thread), as `--batch` does."""
        from tdpu_tui.engine.records.bugbook import failure_signature, is_filed, record_failure
        if not is_filed(result):
            self._usage_mistakes[result.name] = result.message
            self._post_event(BugNotFiled(result.name))
            return
        self._usage_mistakes.pop(result.name, None)
        # Before the write, so the Bugs tab never reports this draft as someone else's.
        self._own_signatures.add(failure_signature(result.name, result.message))
        record, created = record_failure(self.paths.bugs, result.name, result.message,
                                         result.log_tail, bug_stages=self.bug_stage_map())
        self._post_event(BugRecorded(result.name, record.number, created))

    def show_bug_event(self, ev: Event) -> None:
        """A BugRecorded or BugNotFiled event, on the UI thread."""
        if isinstance(ev, BugNotFiled):
            self.say(f"{ev.stage}: a usage mistake, not a bug: not filed in {self.paths.bugs.name} "
                     f"· 使用错误，不记为 bug", title="bug records")
            return
        row = self.pipeline_panel.rows.get(ev.stage)
        if row is not None:
            row.bug_number = ev.number
        verb = "drafted" if ev.created else "already recorded as"
        self.say(f"{ev.stage}: {verb} Bug #{ev.number} in {self.paths.bugs.name} (d edits it)",
                 title="bug records")
        self.bugs_panel.check_disk()

    # -- the form -------------------------------------------------------------------------------
    def open_bug_form(self, heading: str, values: dict[str, str], number: int | None,
                      base=None, signature: str = "") -> None:
        """The form; `base` is the record being edited as shown (changes made to the file while
        the form is open are merged against it, not overwritten); `signature` the failure a
        new record is drafted from."""
        from tdpu_tui.engine.records.bugbook import STAGE_VALUES, STATUS_VALUES, field_problems
        form = BugForm(heading, values, STAGE_VALUES, STATUS_VALUES,
                       partial(field_problems, base=base))
        self.push_screen(form, partial(self._bug_saved, number, heading, base, signature))

    def _bug_saved(self, number: int | None, heading: str, base, signature: str,
                   values: dict[str, str] | None) -> None:
        if values is None:
            return
        panel = self.bugs_panel
        book = panel.book
        try:
            if book is None:
                raise RuntimeError(panel.error or "the bug book is not open")
            seen = len(book.messages)
            if number is None:
                if signature:
                    self._own_signatures.add(signature)
                record = book.add(values["title"], values["stage"], values["error"], values["cause"],
                                  values["fix"], values["status"], values["time"], signature=signature)
            else:
                record = book.update(number, base=base, **values)
        except Exception as exc:
            self.say(f"未保存 not saved: {exc}", severity="error", title="bug record")
            # Reopen with what was typed so nothing is lost.
            self.call_later(self.open_bug_form, heading, values, number, base, signature)
            return
        for message in book.messages[seen:]:
            self.say(message, title="bug records", severity="warning", timeout=10)
        panel.rebuild()
        self.say(f"Bug #{record.number} 已保存 saved to {self.paths.bugs.name}")

    def action_add_bug(self) -> None:
        self.open_bug_form("新建 Bug 记录 · New bug record",
                           {"time": now_minutes(), "status": "未解决"}, None)

    def on_bugs_table_edit(self, msg: BugsTable.Edit) -> None:
        record = self.bugs_panel.record(msg.number)
        if record is None:
            return
        values = {f: getattr(record, f, "") or "" for f in FORM_FIELDS}
        self.open_bug_form(f"编辑 Bug #{msg.number} · Edit Bug #{msg.number}", values, msg.number,
                           record)

    def on_stages_table_draft_bug(self, msg: StagesTable.DraftBug) -> None:
        from tdpu_tui.engine.records.bugbook import (
            BugValidationError, draft_error, draft_title, failure_signature, stage_label,
        )
        row = self.pipeline_panel.rows.get(msg.name)
        if row is None or row.status is not Status.FAILED:
            state = row.status.value if row is not None else "unknown"
            self.say(f"{msg.name} is {state}: only a failed stage drafts a bug record")
            return
        if row.bug_number is not None and self.bugs_panel.record(row.bug_number) is not None:
            self.on_bugs_table_edit(BugsTable.Edit(row.bug_number))
            return
        if self._usage_mistakes.get(msg.name) == row.message:
            self.say(f"{msg.name} failed through a usage mistake, not a bug: {row.message}\n"
                     f"(b adds a record by hand if it is one) · 使用错误，不记为 bug",
                     severity="warning", title="bug records")
            return
        try:
            label = stage_label(msg.name, self.bug_stage_map())
        except BugValidationError:  # a stage the registry does not know: the form asks
            label = ""
        message = row.message or "failed"
        self.open_bug_form(f"根据失败的阶段 {msg.name} 新建 · New bug record from the failed stage", {
            "title": draft_title(msg.name, message), "time": now_minutes(), "stage": label,
            "status": "未解决", "error": draft_error(message, list(row.log_tail)),
            "cause": "", "fix": "",
        }, None, signature=failure_signature(msg.name, message))
