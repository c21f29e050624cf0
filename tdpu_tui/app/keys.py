"""The key map, in one place: the help screen shows it and docs/app.md repeats it at length.

Two columns of it fit 80×24 (the help screen), so each line is short; the footer and the
command palette (ctrl+p) say the rest.
"""

KEY_MAP: list[tuple[str, list[tuple[str, str]]]] = [
    ("Everywhere", [
        ("1 2 3", "Pipeline / Log / Nodes tab"),
        ("4 5", "Bugs / Report tab"),
        ("r", "run every stage"),
        ("f", "rerun failed + cancelled"),
        ("c", "cancel the run"),
        ("b", "new bug record"),
        ("ctrl+p", "command palette"),
        ("?", "this help"),
        ("q ctrl+q", "quit (asks while running)"),
    ]),
    ("Pipeline", [
        ("up/down", "choose a stage"),
        ("enter", "run the highlighted stage"),
        ("d", "draft a bug from a failure"),
        ("i", "import Icraft results"),
    ]),
    ("Log", [
        ("end", "follow new lines"),
        ("home", "jump to the start"),
        ("left/right", "scroll sideways"),
        ("/", "filter (escape clears)"),
    ]),
    ("Nodes", [
        ("space", "toggle the node"),
        ("a / n", "all / none (as filtered)"),
        ("/", "filter (escape clears)"),
    ]),
    ("Bugs", [
        ("enter", "edit the record"),
        ("b", "add a record"),
        ("e", "open in $VISUAL/$EDITOR"),
    ]),
    ("Bug form", [
        ("tab", "next field"),
        ("ctrl+s", "save"),
        ("escape", "cancel"),
    ]),
]
# The help screen's columns: these sections on the left, the rest on the right.
LEFT_COLUMN = ("Everywhere", "Pipeline")
