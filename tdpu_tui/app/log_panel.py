"""The log panel: stage log lines (from events) and Icraft's log files (tailed), one view.

Memory is bounded by a ring buffer of formatted lines; the view (`Log`) holds at most as many.
Lines arrive in batches from the app's pump (a bounded refresh rate), never one message each.
"""

from __future__ import annotations

import collections
import re
from collections.abc import Iterable

from rich.highlighter import Highlighter
from rich.segment import Segment
from rich.style import Style
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.message import Message
from textual.strip import Strip
from textual.widgets import Input, Log, Static

MAX_LINES = 20_000
LABEL_WIDTH = 10
LABEL_CELLS = LABEL_WIDTH + 2   # the label, "│" and a space: the column that never scrolls
CUT_STYLE = Style(dim=True, bold=True)

_ERROR = re.compile(r"\[(E|F|error|fatal|critical)\]", re.IGNORECASE)
_WARNING = re.compile(r"\[(W|warning|warn)\]", re.IGNORECASE)


class LevelHighlighter(Highlighter):
    """Icraft's `[E]`/`[F]` lines (and stage errors) in red, `[W]` in yellow; bold survives NO_COLOR."""

    def highlight(self, text: Text) -> None:
        plain = text.plain
        if _ERROR.search(plain):
            text.stylize("bold red")
        elif _WARNING.search(plain):
            text.stylize("bold yellow")


class LogView(Log):
    BINDINGS = [
        Binding("end", "follow", "Follow"),
        Binding("home", "top", "Top", show=False),
        Binding("slash", "filter", "Filter"),
    ]

    def __init__(self, **kwargs):
        super().__init__(highlight=True, max_lines=MAX_LINES, auto_scroll=True, **kwargs)
        self.highlighter = LevelHighlighter()

    def _render_line(self, y: int, scroll_x: int, width: int) -> Strip:
        """The label column stays put while the text scrolls sideways; a line cut at an edge
        shows it with `…` there (right: more to see; left: scrolled past its start)."""
        rich_style = self.rich_style
        # Without the scrollbars, which are drawn over the last columns.
        shown = min(width, self.scrollable_content_region.width)
        if y >= len(self._lines) or shown <= LABEL_CELLS + 2:
            return super()._render_line(y, scroll_x, width)
        line = self._render_line_strip(y, rich_style)
        length = line.cell_length
        body_w = shown - LABEL_CELLS
        label = line.crop_extend(0, LABEL_CELLS, rich_style)
        start = LABEL_CELLS + scroll_x
        body = line.crop_extend(start, start + body_w, rich_style)
        cut_right = length > start + body_w
        cut_left = scroll_x > 0 and length > LABEL_CELLS
        if cut_right or cut_left:
            mark = Strip([Segment("…", rich_style + CUT_STYLE)], 1)
            parts = [mark] if cut_left else []
            parts.append(body.crop(1 if cut_left else 0, body_w - (1 if cut_right else 0)))
            if cut_right:
                parts.append(mark)
            body = Strip.join(parts)
        strip = Strip.join([label, body]).crop_extend(0, width, rich_style)
        return strip.apply_offsets(scroll_x, y)

    def action_follow(self) -> None:
        self.scroll_end(animate=False, immediate=True)
        self.post_message(LogPanel.FollowChanged())

    def action_top(self) -> None:
        self.scroll_home(animate=False, immediate=True)
        self.post_message(LogPanel.FollowChanged())

    def action_filter(self) -> None:
        panel = self.parent
        if isinstance(panel, LogPanel):
            panel.open_filter()


def format_line(label: str, line: str) -> str:
    return f"{label[:LABEL_WIDTH]:<{LABEL_WIDTH}}│ {line}"


class LogPanel(Vertical):
    """All log lines of the session; `add_lines` appends a batch."""

    class FollowChanged(Message):
        pass

    BINDINGS = [Binding("escape", "clear_filter", "Clear filter", show=False)]

    def __init__(self, max_lines: int = MAX_LINES, **kwargs):
        super().__init__(**kwargs)
        self.ring: collections.deque[str] = collections.deque(maxlen=max_lines)
        self.max_lines = max_lines
        self.received = 0
        self.filter_text = ""

    def compose(self) -> ComposeResult:
        yield Static("", id="log-status")
        yield LogView(id="log-view")
        yield Input(placeholder="filter (substring, case-insensitive); enter keeps it, escape clears",
                    id="log-filter", compact=True)

    def on_mount(self) -> None:
        self.query_one("#log-filter", Input).display = False
        self.query_one(LogView).max_lines = self.max_lines
        self.update_status()

    @property
    def view(self) -> LogView:
        return self.query_one(LogView)

    @property
    def following(self) -> bool:
        view = self.view
        return view.is_vertical_scroll_end or view.max_scroll_y == 0

    def add_lines(self, label: str, lines: Iterable[str]) -> None:
        formatted = [format_line(label, line) for line in lines]
        if not formatted:
            return
        self.received += len(formatted)
        self.ring.extend(formatted)
        if self.filter_text:
            needle = self.filter_text
            formatted = [s for s in formatted if needle in s.lower()]
        if formatted:
            self.view.write_lines(formatted[-self.max_lines:])

    def add_marker(self, label: str, text: str) -> None:
        """A line of the panel's own (truncation notices): shown, not counted as received."""
        line = format_line(label, f"── {text} ──")
        self.ring.append(line)
        if not self.filter_text or self.filter_text in line.lower():
            self.view.write_line(line)

    def update_status(self) -> None:
        text = Text(f"{self.received:,} lines · ")
        if self.following:
            text.append("following")
        else:
            text.append("paused: ")
            text.append("end", style="bold")
            text.append(" follows")
        if self.filter_text:
            text.append(f" · filter: {self.filter_text!r}")
        self.query_one("#log-status", Static).update(text)

    def on_log_panel_follow_changed(self, _msg: FollowChanged) -> None:
        self.update_status()

    # -- filter ---------------------------------------------------------------------------
    def open_filter(self) -> None:
        box = self.query_one("#log-filter", Input)
        box.display = True
        box.value = self.filter_text
        box.focus()

    def set_filter(self, text: str) -> None:
        self.filter_text = text.strip().lower()
        view = self.view
        view.clear()
        needle = self.filter_text
        view.write_lines([s for s in self.ring if needle in s.lower()] if needle else list(self.ring),
                         scroll_end=True)
        self.update_status()

    def on_input_changed(self, event: Input.Changed) -> None:
        if event.input.id == "log-filter":
            event.stop()
            self.set_filter(event.value)

    def on_input_submitted(self, event: Input.Submitted) -> None:
        if event.input.id == "log-filter":
            event.stop()
            event.input.display = bool(self.filter_text)
            self.view.focus()

    def action_clear_filter(self) -> None:
        box = self.query_one("#log-filter", Input)
        box.value = ""
        box.display = False
        self.set_filter("")
        self.view.focus()
