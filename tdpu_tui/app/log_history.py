"""The log lines of earlier runs, for the Log tab at start: in run order, each run headed.

The stage logs of runs this app did not start (`phase3_logs/runs/<stage>.log`, a `--batch`
elsewhere or an earlier session) and Icraft's log files are shown oldest run first, each file
under a separator naming it and the time of its run — the stage's start recorded in
`runs/status.json`, else the file's last write — not in file-name order. Only the end of a
large file is read (`TAIL_BYTES`); the separator says when earlier lines are left out. New
lines are the tailer's from then on.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from tdpu_tui.engine.osutil.tail import decode_line
from tdpu_tui.engine.records.style import fmt_time

TAIL_BYTES = 256 * 1024


@dataclass
class EarlierRun:
    label: str
    path: Path
    when: float            # epoch seconds: the run's start, or the file's last write
    started: bool          # `when` is the recorded start (else the last write)
    lines: list[str]
    cut: bool              # the file's start was left out

    def header(self) -> str:
        what = "run of" if self.started else "last written"
        cut = " · its earlier lines not shown" if self.cut else ""
        return f"{self.path.name} · {what} {fmt_time(self.when)}{cut}"


def read_tail(path: Path, limit: int = TAIL_BYTES) -> tuple[list[str], bool]:
    """The file's last lines, at most `limit` bytes of them (whole lines), and whether cut."""
    with open(path, "rb") as fh:
        size = fh.seek(0, os.SEEK_END)
        start = max(0, size - limit)
        fh.seek(start)
        data = fh.read(size - start)
    if start:   # from the first whole line
        data = data.split(b"\n", 1)[1] if b"\n" in data else b""
    chunks = data.split(b"\n")
    if chunks[-1] == b"":
        chunks.pop()
    return [decode_line(c.rstrip(b"\r")) for c in chunks], bool(start)


Source = tuple[Path, str, bool, Callable[[Path], str], dict[str, float]]


def earlier_runs(sources: Iterable[Source]) -> list[EarlierRun]:
    """`sources`: (directory, pattern, recursive, label, started) with `started` the recorded
    start of a label's run (stage logs) or empty. The runs found, oldest first; files that
    cannot be read are left out."""
    runs = []
    for directory, pattern, recursive, label, started in sources:
        if not directory.is_dir():
            continue
        for path in sorted(directory.rglob(pattern) if recursive else directory.glob(pattern)):
            try:
                if not path.is_file():
                    continue
                mtime = path.stat().st_mtime
                lines, cut = read_tail(path)
            except OSError:
                continue
            if not lines:
                continue
            name = label(path)
            start = started.get(name)
            runs.append(EarlierRun(name, path, start if start else mtime, bool(start), lines, cut))
    runs.sort(key=lambda r: r.when)
    return runs
