"""The key map, in one place: the help screen shows it and docs/app.md repeats it."""

KEY_MAP: list[tuple[str, list[tuple[str, str]]]] = [
    ("Everywhere", [
        ("1 2 3 4 5", "Pipeline / Log / Nodes / Bugs / Report tab"),
        ("r", "run every stage"),
        ("f", "rerun the failed stages (and those they blocked)"),
        ("c", "cancel the run (stops at the next check; Icraft is killed)"),
        ("b", "new bug record"),
        ("ctrl+p", "command palette: every action by name"),
        ("?", "this help"),
        ("q ctrl+q", "quit (asks first while a stage runs)"),
    ]),
    ("Pipeline", [
        ("up/down", "choose a stage"),
        ("enter", "run the highlighted stage"),
        ("d", "draft a bug record from the highlighted failed stage"),
    ]),
    ("Log", [
        ("end", "jump to the end and follow new lines"),
        ("home", "jump to the start (stops following)"),
        ("left/right", "scroll long lines sideways"),
        ("/", "filter lines (escape clears)"),
    ]),
    ("Nodes", [
        ("space", "toggle replacement of the highlighted node"),
        ("a / n", "select all / none of the ternary nodes shown"),
        ("/", "filter nodes (escape clears)"),
    ]),
    ("Bugs", [
        ("enter", "edit the highlighted record"),
        ("b", "add a record"),
        ("e", "open bugs_found.md in $VISUAL / $EDITOR (reloaded afterwards)"),
    ]),
    ("Bug form", [
        ("tab", "next field"),
        ("ctrl+s", "save"),
        ("escape", "cancel (asks first if you typed something)"),
    ]),
]
