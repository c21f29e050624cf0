"""The bug panel: the records of bugs_found.md, edited through the engine's BugBook."""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.message import Message
from textual.widgets import DataTable, Static

from tdpu_tui.engine.core.artifacts import Artifacts
from tdpu_tui.engine.core.config import Config

_STATUS_STYLE = {"未解决": "bold red", "已解决": "green", "待验证": "yellow"}


class BugsTable(DataTable):
    BINDINGS = [
        Binding("enter", "edit", "Edit bug"),
        Binding("e", "open_editor", "$EDITOR"),
    ]

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        """`enter` edits, and the footer shows it, only with a record to edit."""
        if action == "edit":
            return self.row_count > 0
        return True

    class Edit(Message):
        def __init__(self, number: int):
            super().__init__()
            self.number = number

    def action_edit(self) -> None:
        if self.row_count:
            key = self.coordinate_to_cell_key(self.cursor_coordinate).row_key.value
            self.post_message(self.Edit(int(key)))

    def action_open_editor(self) -> None:
        panel = self.parent
        if isinstance(panel, BugsPanel):
            panel.open_in_editor()


class BugsPanel(Vertical):
    """Lists the records; the app opens the form. Polls the file so outside edits show up."""

    def __init__(self, config: Config, own_signatures: set[str] | None = None, **kwargs):
        super().__init__(**kwargs)
        self.config = config
        self.path: Path = Artifacts.of(config).bugs
        self.book = None
        self.error = ""
        # Signatures of the failures the app's run thread drafted (shared with the book).
        self.own_signatures = own_signatures if own_signatures is not None else set()

    def compose(self) -> ComposeResult:
        yield Static("", id="bugs-status")
        yield BugsTable(id="bugs", cursor_type="row")
        yield Static("", id="bug-detail")

    def on_mount(self) -> None:
        table = self.query_one(BugsTable)
        for key, label, width in (("number", "#", 3), ("time", "Time", 16), ("stage", "Stage", 5),
                                  ("status", "Status", 7), ("title", "Title", 40)):
            table.add_column(label, key=key, width=width)
        self.open_book()
        self.set_interval(1.0, self.check_disk)

    @property
    def table(self) -> BugsTable:
        return self.query_one(BugsTable)

    def open_book(self) -> None:
        try:
            from tdpu_tui.engine.records.bugbook import BugBook
            book = BugBook(self.path)
            book.own_signatures = self.own_signatures
            book.load()
            self.book = book
            self.error = ""
        except Exception as exc:
            self.error = f"cannot read the bug records: {exc}"
        self.rebuild()

    def check_disk(self) -> None:
        """Notice edits made outside the app (an editor, `tdpu bugs`, a --batch draft)."""
        if self.book is None:
            self.open_book()
            return
        try:
            if not self.book.changed_on_disk():
                return
            messages = self.book.reload()
        except Exception as exc:
            self.error = f"cannot reload the bug records: {exc}"
            self.rebuild()
            return
        self.error = ""
        for line in messages:  # none when the change was this session's own draft
            self.app.say(str(line), title="bug records")
        self.rebuild()

    def open_in_editor(self) -> None:
        """The whole file in $VISUAL / $EDITOR (free text, hand edits); reloaded afterwards."""
        editor = os.environ.get("VISUAL") or os.environ.get("EDITOR") or "vi"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with self.app.suspend():
                subprocess.run([*shlex.split(editor), str(self.path)], check=False)
        except Exception as exc:  # headless, or no such editor
            self.app.say(f"cannot open an editor ({editor}): {exc}", severity="error")
            return
        self.check_disk()

    def record(self, number: int):
        if self.book is None:
            return None
        return next((r for r in self.book.records if r.number == number), None)

    def rebuild(self) -> None:
        table = self.table
        keep = table.cursor_row
        table.clear()
        records = list(self.book.records) if self.book is not None else []
        for r in records:
            # Text cells: a str cell is markup, and titles hold [brackets] ("[icraft].bin").
            table.add_row(str(r.number), Text(r.time or ""), Text(r.stage or ""),
                          Text(r.status or "", style=_STATUS_STYLE.get(r.status, "")),
                          Text(r.title or "", no_wrap=True, overflow="ellipsis"),
                          key=str(r.number))
        if table.row_count:
            table.move_cursor(row=min(keep, table.row_count - 1))
        table.refresh_bindings()
        base = self.config.base_dir
        try:
            shown = self.path.relative_to(base)
        except ValueError:
            shown = self.path
        status = Text(str(shown), style="bold")
        if self.error:
            status.append(f": {self.error}", style="yellow")
        else:
            open_count = sum(1 for r in records if r.status != "已解决")
            noun = "record" if len(records) == 1 else "records"
            status.append(f" · {len(records)} {noun}, {open_count} open")
        self.query_one("#bugs-status", Static).update(status)
        self.refresh_detail()

    def on_data_table_row_highlighted(self, _event: DataTable.RowHighlighted) -> None:
        self.refresh_detail()

    def refresh_detail(self) -> None:
        detail = self.query_one("#bug-detail", Static)
        table = self.table
        if not table.row_count:
            detail.update(Text("no records yet: b adds one", style="dim"))
            return
        key = table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value
        r = self.record(int(key))
        if r is None:
            detail.update("")
            return
        text = Text()
        text.append(f"Bug #{r.number}: {r.title}\n", style="bold")
        error = [line for line in (r.error or "").strip().splitlines() if line.strip()]
        if error:
            text.append("错误信息: ", style="bold")
            text.append("\n".join(error[:4]) + (" …" if len(error) > 4 else "") + "\n")
        if r.cause:
            text.append("根本原因: ", style="bold")
            text.append(r.cause.strip().splitlines()[0] + "\n")
        if r.fix:
            text.append("解决方案: ", style="bold")
            text.append(r.fix.strip().splitlines()[0] + "\n")
        text.append("enter", style="bold reverse")
        text.append(" edit   ")
        text.append("b", style="bold reverse")
        text.append(" add")
        detail.update(text)
