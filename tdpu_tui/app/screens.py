"""Modal screens: the bug form, the quit confirmation, the key help."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

from rich.markup import escape
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, Select, Static, TextArea

from tdpu_tui.app.keys import KEY_MAP, LEFT_COLUMN
from tdpu_tui.engine.records.bugbook import FIELD_LABELS, TIME_FORMAT

FIELDS = ("title", "time", "stage", "status", "error", "cause", "fix")


class ConfirmScreen(ModalScreen[bool]):
    """A yes/no question; `y` / `n` (or escape) answer it."""

    BINDINGS = [
        Binding("y", "answer(True)", "Yes"),
        Binding("n", "answer(False)", "No"),
        Binding("escape", "answer(False)", "No", show=False),
    ]

    def __init__(self, question: str):
        super().__init__()
        self.question = question

    def compose(self) -> ComposeResult:
        with Vertical(id="confirm", classes="dialog"):
            yield Static(self.question, id="confirm-question")
            yield Static("[b]y[/b] 是 yes    [b]n[/b] 否 no", id="confirm-keys")

    def action_answer(self, yes: bool) -> None:
        self.dismiss(yes)


class HelpScreen(ModalScreen[None]):
    """Every key in two columns, sized for 80×24; how to close it is the first line."""

    BINDINGS = [
        Binding("escape", "close", "Close"),
        Binding("question_mark", "close", "Close", show=False),
        Binding("q", "close", "Close", show=False),
    ]

    @staticmethod
    def column(sections) -> str:
        """The keys padded to this column's longest, so no line runs into the next column."""
        width = max((len(k) for _, keys in sections for k, _ in keys), default=0)
        lines = []
        for section, keys in sections:
            lines.append(f"[b]{escape(section)}[/b]")
            lines += [f"[b]{escape(k):<{width}}[/b] {escape(what)}" for k, what in keys]
        return "\n".join(lines)

    def compose(self) -> ComposeResult:
        left = [(s, k) for s, k in KEY_MAP if s in LEFT_COLUMN]
        right = [(s, k) for s, k in KEY_MAP if s not in LEFT_COLUMN]
        with Vertical(id="help", classes="dialog"):
            yield Static("[b]escape[/b] or [b]?[/b] closes this help · "
                         "[b]ctrl+p[/b] finds any action by name", id="help-close", classes="hint")
            with Horizontal(id="help-columns"):
                yield Static(self.column(left), id="help-text", classes="help-column")
                yield Static(self.column(right), id="help-text-right", classes="help-column")

    def action_close(self) -> None:
        self.dismiss(None)


class BugForm(ModalScreen[dict | None]):
    """Every field of the bugs_found.md template. Dismisses with the values, or None.

    Its words are in Chinese and English, as the team is; the problems it lists are the bug
    book's own (`field_problems`), in both languages too.
    """

    BINDINGS = [
        Binding("ctrl+s", "save", "Save", priority=True),
        Binding("escape", "cancel", "Cancel"),  # not priority: escape first closes a Select list
    ]

    def __init__(self, heading: str, values: dict[str, str], stages: tuple[str, ...],
                 statuses: tuple[str, ...], check: Callable[[dict[str, str]], dict[str, str]]):
        """`check(values)` -> field: what is wrong (the bug book's own rules)."""
        super().__init__()
        self.heading = heading
        self.values = {f: values.get(f, "") or "" for f in FIELDS}
        self.stages = stages
        self.statuses = statuses
        self.check = check

    def compose(self) -> ComposeResult:
        v = self.values
        with Vertical(id="bug-form", classes="dialog"):
            yield Static(self.heading, id="bug-form-heading")
            with Vertical(id="bug-form-fields"):
                with Horizontal(classes="field"):
                    yield Label("标题 title", classes="field-label")
                    yield Input(v["title"], id="f-title", compact=True, placeholder="一行 one line")
                with Horizontal(classes="field"):
                    yield Label("发现时间 time", classes="field-label")
                    yield Input(v["time"], id="f-time", compact=True, placeholder="YYYY-MM-DD HH:MM")
                with Horizontal(classes="field"):
                    yield Label("发现阶段 stage", classes="field-label")
                    yield Select([(s, s) for s in self.stages], id="f-stage", compact=True,
                                 value=v["stage"] if v["stage"] in self.stages else Select.NULL,
                                 prompt="请选择 choose")
                with Horizontal(classes="field"):
                    yield Label("状态 status", classes="field-label")
                    yield Select([(s, s) for s in self.statuses], id="f-status", compact=True,
                                 value=v["status"] if v["status"] in self.statuses else Select.NULL,
                                 prompt="请选择 choose")
                yield Label("错误信息 error message", classes="area-label")
                yield TextArea(v["error"], id="f-error", compact=True, soft_wrap=True,
                               classes="area-error")
                yield Label("根本原因 cause", classes="area-label")
                yield TextArea(v["cause"], id="f-cause", compact=True, soft_wrap=True, classes="area")
                yield Label("解决方案 fix", classes="area-label")
                yield TextArea(v["fix"], id="f-fix", compact=True, soft_wrap=True, classes="area")
            yield Static("", id="bug-form-problems")
            with Horizontal(id="bug-form-bottom"):
                yield Static("[b]ctrl+s[/b] 保存 save  [b]escape[/b] 取消 cancel  "
                             "[b]tab[/b] 下一项 next", classes="hint")
                with Horizontal(id="bug-form-buttons"):
                    yield Button("保存 Save", id="save", variant="primary", compact=True)
                    yield Button("取消 Cancel", id="cancel", compact=True)

    def on_mount(self) -> None:
        self.current_at_open = self.current()
        self.query_one("#f-title", Input).focus()

    def current(self) -> dict[str, str]:
        def sel(widget_id: str) -> str:
            value = self.query_one(widget_id, Select).value
            return value if isinstance(value, str) else ""
        return {
            "title": self.query_one("#f-title", Input).value.strip(),
            "time": self.query_one("#f-time", Input).value.strip(),
            "stage": sel("#f-stage"),
            "status": sel("#f-status"),
            "error": self.query_one("#f-error", TextArea).text.rstrip(),
            "cause": self.query_one("#f-cause", TextArea).text.strip(),
            "fix": self.query_one("#f-fix", TextArea).text.strip(),
        }

    def action_save(self) -> None:
        values = self.current()
        problems = self.check(values)
        out = self.query_one("#bug-form-problems", Static)
        if problems:
            out.update(self._problem_text(problems))
            out.add_class("error")
            self.query_one(f"#f-{next(iter(problems))}").focus()
            return
        self.dismiss(values)

    @staticmethod
    def _problem_text(problems: dict[str, str]) -> str:
        return "\n".join(f"[b]{escape(FIELD_LABELS.get(k, k))}[/b]: {escape(why)}"
                         for k, why in problems.items())

    def _recheck(self) -> None:
        """Once problems are shown, keep them in step with the fields (fixed ones disappear)."""
        out = self.query_one("#bug-form-problems", Static)
        if not out.has_class("error"):
            return
        problems = self.check(self.current())
        if problems:
            out.update(self._problem_text(problems))
        else:
            out.update("")
            out.remove_class("error")

    def on_input_changed(self, _event) -> None:
        self._recheck()

    def on_text_area_changed(self, _event) -> None:
        self._recheck()

    def on_select_changed(self, _event) -> None:
        self._recheck()

    def action_cancel(self) -> None:
        """Leave the form; what was typed is only thrown away after a yes."""
        if self.current() == self.current_at_open:
            self.dismiss(None)
            return
        self.app.push_screen(ConfirmScreen("放弃在这条记录中输入的内容？\n"
                                           "Discard what you typed in this bug record?"),
                             lambda yes: self.dismiss(None) if yes else None)

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "save":
            self.action_save()
        else:
            self.action_cancel()


def now_minutes() -> str:
    return datetime.now().strftime(TIME_FORMAT)
