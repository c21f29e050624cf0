"""The MatMul node browser: the export's inventory, and which nodes `replace` will swap.

Toggles are per-node overrides saved to `Artifacts.replace_selection` (inventory.save_selection),
the file `replace` reads, so the next replace (here or in --batch) honours them.
"""

from __future__ import annotations

import os
from pathlib import Path

from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.message import Message
from textual.widgets import DataTable, Input, Static

from tdpu_tui.engine.core.artifacts import Artifacts
from tdpu_tui.engine.core.config import Config

WIDE = 110  # columns from which the table shows layer and projection


def _shown_path(path: Path, base: Path) -> str:
    try:
        return str(path.relative_to(base))
    except ValueError:
        return str(path)


class NodesTable(DataTable):
    BINDINGS = [
        Binding("space", "toggle", "Pick"),
        Binding("a", "select_all", "All"),
        Binding("n", "select_none", "None"),
        Binding("slash", "filter", "Filter"),
    ]

    class Command(Message):
        def __init__(self, what: str, row: str | None):
            super().__init__()
            self.what = what
            self.row = row

    def _current(self) -> str | None:
        if not self.row_count:
            return None
        return self.coordinate_to_cell_key(self.cursor_coordinate).row_key.value

    def action_toggle(self) -> None:
        self.post_message(self.Command("toggle", self._current()))

    def action_select_all(self) -> None:
        self.post_message(self.Command("all", None))

    def action_select_none(self) -> None:
        self.post_message(self.Command("none", None))

    def action_filter(self) -> None:
        self.post_message(self.Command("filter", None))


class NodesPanel(Vertical):
    BINDINGS = [Binding("escape", "clear_filter", "Clear filter", show=False)]

    class Loaded(Message):
        def __init__(self, nodes: list | None, overrides: dict, error: str, mtime: float | None):
            super().__init__()
            self.nodes = nodes
            self.overrides = overrides
            self.error = error
            self.mtime = mtime

    def __init__(self, config: Config, **kwargs):
        super().__init__(**kwargs)
        self.config = config
        self.paths = Artifacts.of(config)
        self.nodes: list = []
        self.overrides: dict[str, bool] = {}
        self.selection: dict[str, bool] = {}
        self.filter_text = ""
        self.error = ""
        self.loaded_mtime: float | None = None
        self.loading = False
        self._columns: list[tuple[str, str, int]] = []
        self._short_names = False

    def compose(self) -> ComposeResult:
        yield Static("", id="nodes-status")
        yield NodesTable(id="nodes", cursor_type="row")
        yield Static("", id="node-detail")
        yield Input(placeholder="filter nodes (substring); enter keeps it, escape clears",
                    id="nodes-filter", compact=True)

    def on_mount(self) -> None:
        self.query_one("#nodes-filter", Input).display = False
        self.reload()
        self.set_interval(1.0, self.check_export)

    def on_resize(self) -> None:
        self.set_columns(self.size.width)

    def set_columns(self, width: int) -> None:
        """Layer and projection columns only when there is room (they repeat the node name)."""
        wide = width >= WIDE
        self._short_names = not wide
        longest = max((len(self._shown_name(n)) for n in self.nodes), default=30)
        fixed = [("replace", "Repl", 4), ("shape", "K×N", 9), ("zeros", "Zeros", 6)]
        if wide:
            fixed[1:1] = [("layer", "Layer", 5), ("proj", "Projection", 10)]
        used = sum(w for _, _, w in fixed) + 2 * (len(fixed) + 2) + 2
        node_w = max(20, min(longest, width - used - 12))
        status_w = max(10, width - used - node_w)
        columns = [fixed[0], ("node", "Node", node_w), *fixed[1:], ("status", "Status", status_w)]
        if columns == self._columns:
            return
        self._columns = columns
        table = self.table
        table.clear(columns=True)
        for key, label, w in columns:
            table.add_column(label, key=key, width=w)
        self.rebuild()

    @property
    def table(self) -> NodesTable:
        return self.query_one(NodesTable)

    # -- loading ----------------------------------------------------------------------------
    def export_mtime(self) -> float | None:
        try:
            return os.stat(self.paths.full_onnx).st_mtime_ns / 1e9
        except OSError:
            return None

    def check_export(self) -> None:
        """Reload when the export changed on disk (a run here, or --batch elsewhere)."""
        if not self.loading and self.export_mtime() != self.loaded_mtime:
            self.reload()

    def reload(self) -> None:
        self.loading = True
        onnx = _shown_path(self.paths.full_onnx, self.config.base_dir)
        self.query_one("#nodes-status", Static).update(Text(f"{onnx}: reading the nodes…", style="dim"))
        self._load()

    @work(thread=True, exclusive=True, group="inventory")
    def _load(self) -> None:
        mtime = self.export_mtime()
        nodes, overrides, error = None, {}, ""
        if mtime is None:
            error = "no export yet: run the export stage (r runs every stage)"
        else:
            try:
                from tdpu_tui.engine.rewrite.inventory import inventory
                from tdpu_tui.engine.rewrite.selection import load_selection
                nodes = inventory(self.paths.full_onnx)
                overrides = load_selection(self.paths.replace_selection)
            except Exception as exc:  # shown in the panel; the app stays usable
                error = f"cannot list the nodes: {exc}"
        self.post_message(self.Loaded(nodes, overrides, error, mtime))

    def on_nodes_panel_loaded(self, msg: Loaded) -> None:
        self.loading = False
        self.loaded_mtime = msg.mtime
        self.error = msg.error
        self.nodes = msg.nodes or []
        self.overrides = dict(msg.overrides)
        self.resolve()
        self._columns = []
        self.set_columns(self.size.width)

    def resolve(self) -> None:
        from tdpu_tui.engine.rewrite.selection import resolve_selection
        try:
            self.selection = resolve_selection(self.nodes, self.config, self.overrides)
        except Exception as exc:
            self.error = f"selection file {self.paths.replace_selection.name}: {exc}"
            valid = {n.name for n in self.nodes if n.ternary}
            self.overrides = {k: v for k, v in self.overrides.items() if not v or k in valid}
            self.selection = resolve_selection(self.nodes, self.config, self.overrides)

    # -- rendering --------------------------------------------------------------------------
    def visible(self) -> list:
        if not self.filter_text:
            return self.nodes
        f = self.filter_text
        return [n for n in self.nodes
                if f in f"{n.name} {n.projection or ''} layer{n.layer} {n.status}".lower()]

    def _shown_name(self, node) -> str:
        """Narrow terminals drop the common /model/ prefix and the op suffix (the detail line
        below the table shows the full name)."""
        if not self._short_names:
            return node.name
        return node.name.removeprefix("/model/").removesuffix(f"/{node.op_type}")

    def _cells(self, node) -> list:
        if node.ternary:
            mark = Text("[x]", style="bold green") if self.selection.get(node.name) else Text("[ ]")
        elif node.projection == "lm_head" and self.config.replace.lm_head == "bf16":
            mark = Text("bf16", style="cyan")      # held in bf16 by [replace].lm_head
        else:
            mark = Text(" — ", style="dim")
        shape = f"{node.k}×{node.n}" if node.k and node.n else ""
        zeros = f"{node.zeros * 100:.1f}%" if node.zeros is not None else ""
        # A cell cut at the column's edge ends with "…" (the line below shows it whole).
        status = Text(node.status, style="green" if node.ternary else "yellow", no_wrap=True,
                      overflow="ellipsis")
        cells = {"replace": mark, "node": Text(self._shown_name(node), no_wrap=True,
                                               overflow="ellipsis"),
                 "layer": "" if node.layer is None else str(node.layer),
                 "proj": node.projection or "", "shape": shape, "zeros": zeros, "status": status}
        return [cells[key] for key, _, _ in self._columns]

    def rebuild(self) -> None:
        table = self.table
        keep = table.cursor_row
        table.clear()
        for node in self.visible():
            table.add_row(*self._cells(node), key=node.name)
        if table.row_count:
            table.move_cursor(row=min(keep, table.row_count - 1))
        self.update_status()
        self.refresh_detail()

    def on_data_table_row_highlighted(self, _event: DataTable.RowHighlighted) -> None:
        self.refresh_detail()

    def refresh_detail(self) -> None:
        """The highlighted node's full name and why it will (not) be replaced."""
        table = self.table
        detail = self.query_one("#node-detail", Static)
        if not table.row_count:
            detail.update("")
            return
        name = table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value
        node = next((n for n in self.nodes if n.name == name), None)
        if node is None:
            detail.update("")
            return
        from tdpu_tui.engine.rewrite.selection import selection_reason
        try:
            why = selection_reason(node, self.config, self.overrides)
        except Exception as exc:
            why = str(exc)
        # Wrapped, never cut: the full node name, its status and why it is (not) selected.
        text = Text(node.name, style="bold")
        text.append(f"  {node.status}", style="green" if node.ternary else "yellow")
        if why != node.status:     # a node that is not ternary: its status is the reason, said once
            text.append(f"  · {why}", style="green" if self.selection.get(node.name) else "dim")
        if node.projection == "lm_head" and self.config.replace.lm_head == "bf16" \
                and not self.selection.get(node.name):
            text.append("  · held in bf16 as LinearBF16 ([replace].lm_head)", style="cyan")
        detail.update(text)

    def update_status(self) -> None:
        base = self.config.base_dir
        onnx = _shown_path(self.paths.full_onnx, base)
        if self.error:
            text = Text(f"{onnx}: ", style="bold")
            text.append(self.error, style="yellow")
        else:
            ternary = sum(1 for n in self.nodes if n.ternary)
            chosen = sum(1 for n in self.nodes if self.selection.get(n.name))
            text = Text(onnx, style="bold")
            text.append(f" · {len(self.nodes)} nodes, {ternary} ternary, {chosen} to replace")
            if self.filter_text:
                text.append(f" · filter {self.filter_text!r}")
            text.append(f"\nselection: {_shown_path(self.paths.replace_selection, base)}"
                        " (read by the replace stage)", style="dim")
        self.query_one("#nodes-status", Static).update(text)

    # -- commands ---------------------------------------------------------------------------
    def on_nodes_table_command(self, msg: NodesTable.Command) -> None:
        msg.stop()
        if msg.what == "filter":
            box = self.query_one("#nodes-filter", Input)
            box.display = True
            box.value = self.filter_text
            box.focus()
            return
        if not self.nodes:
            self.app.say(self.error or "no nodes to select", severity="warning")
            return
        if msg.what == "toggle":
            node = next((n for n in self.nodes if n.name == msg.row), None)
            if node is None:
                return
            if not node.ternary:
                self.app.say(f"{node.name} cannot be replaced: {node.status}",
                             title="not ternary", severity="warning")
                return
            self.set_selected([node.name], not self.selection.get(node.name, False))
        else:
            # With a filter on, all / none act on the nodes shown, as the status line counts them.
            names = [n.name for n in self.visible() if n.ternary]
            if not names:
                self.app.say(f"no ternary node matches the filter {self.filter_text!r}",
                             severity="warning")
                return
            self.set_selected(names, msg.what == "all")

    def set_selected(self, names: list[str], value: bool) -> None:
        from tdpu_tui.engine.rewrite.selection import save_selection
        for name in names:
            self.overrides[name] = value
        try:
            save_selection(self.paths.replace_selection, self.overrides)
        except OSError as exc:
            self.app.say(f"cannot save the selection: {exc}", severity="error")
            return
        self.resolve()
        table = self.table
        shown = {n.name for n in self.visible()}
        for node in self.nodes:
            if node.name in names and node.name in shown:
                table.update_cell(node.name, "replace", self._cells(node)[0])
        self.update_status()
        self.refresh_detail()

    def on_input_changed(self, event: Input.Changed) -> None:
        if event.input.id == "nodes-filter":
            event.stop()
            self.filter_text = event.value.strip().lower()
            self.rebuild()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        if event.input.id == "nodes-filter":
            event.stop()
            event.input.display = bool(self.filter_text)
            self.table.focus()

    def action_clear_filter(self) -> None:
        box = self.query_one("#nodes-filter", Input)
        box.value = ""
        box.display = False
        self.filter_text = ""
        self.rebuild()
        self.table.focus()
