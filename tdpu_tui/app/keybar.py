"""The footer: Textual's `Footer`, without the leak its recompose has (issue #13.15).

`Footer` recomposes on every change of the active bindings (each tab switch, each focus
change) and binds each new `FooterKey`'s `compact` to its own with `data_bind`. That adds a
watcher on the footer per key, and Textual drops a watcher of a removed widget only when the
watched reactive is set again — the footer's `compact` never is — so every recompose kept
its ~10 removed keys alive with their styles: ~0.35 MB per tab switch, never returned, and a
heap that grows until the collector's full passes stall keys.

Here the keys get the footer's `compact` once, as a plain value, and no binding is made; a
change of `compact` (not done by this app) is passed on by `watch_compact`. And a tab switch
signals a bindings change several times (focus out, focus in, the tab's activation): the bar
is rebuilt once after them, and only when the keys it would show differ from those it shows.
"""

from __future__ import annotations

from textual.app import ComposeResult
from textual.screen import Screen
from textual.widgets import Footer
from textual.widgets._footer import FooterKey


class KeyBar(Footer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._queued = False
        self._shown: tuple | None = None

    def bindings_changed(self, screen: Screen) -> None:
        self._bindings_ready = True
        if not screen.app.app_focus or not self.is_attached or screen is not self.screen:
            return
        if not self._queued:
            self._queued = True
            self.call_after_refresh(self._rebuild)

    def _keys(self) -> tuple:
        return tuple((b.key, b.description, enabled) for _, b, enabled, _ in
                     self.screen.active_bindings.values() if b.show)

    async def _rebuild(self) -> None:
        self._queued = False
        keys = self._keys()
        if keys != self._shown:
            await self.recompose()

    def compose(self) -> ComposeResult:
        if self._bindings_ready:
            self._shown = self._keys()
        for widget in super().compose():
            if isinstance(widget, FooterKey):
                widget._reactive_connect = None   # the data_bind, undone before it is made
                widget.compact = self.compact
            yield widget

    def watch_compact(self, compact: bool) -> None:
        for key in self.query(FooterKey):
            key.compact = compact
