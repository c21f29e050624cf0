"""`phase3_logs/icraft_compile_log.md`: one section per stage (precheck, parse, optimize, simulate).

Each stage rewrites only its own section, found by its markers
`<!-- tdpu:section NAME -->` … `<!-- tdpu:end NAME -->`; everything else in the file (other
sections, the user's notes) is kept byte for byte. Writes are atomic, and each read-modify-write
runs under an advisory lock (`.icraft_compile_log.md.lock`), so two processes writing their
sections at once (a `--batch` run and the app) both keep theirs.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tdpu_tui.engine.osutil.files import atomic_write_bytes, human_bytes, lock_for
from tdpu_tui.engine.records.style import code_path, fmt_time, relative_text, seconds

TITLE = "# Icraft 编译记录 (icraft compile log)"
INTRO = ("Written by `tdpu`: each stage rewrites its own section (between the `tdpu:section` "
         "markers). Text outside the sections is yours and is kept.")
SECTION_ORDER = ("precheck", "parse", "optimize", "simulate")


def _begin(name: str) -> str:
    return f"<!-- tdpu:section {name} -->"


def _end(name: str) -> str:
    return f"<!-- tdpu:end {name} -->"


def _section_re(name: str) -> re.Pattern[str]:
    return re.compile(re.escape(_begin(name)) + r".*?" + re.escape(_end(name)), re.S)


def update_section(path: str | Path, name: str, body: str) -> None:
    """Replace (or add) the section `name` of the file at `path` with `body`."""
    path = Path(path)
    block = f"{_begin(name)}\n{body.rstrip()}\n{_end(name)}"
    with lock_for(path):
        _update_locked(path, name, block)


def _update_locked(path: Path, name: str, block: str) -> None:
    try:
        # Bytes, not read_text: CRLF line ends and bytes that are not UTF-8 in the user's
        # text outside the sections come back out unchanged.
        text = path.read_bytes().decode("utf-8", "surrogateescape")
    except FileNotFoundError:
        text = f"{TITLE}\n\n{INTRO}\n"
    pattern = _section_re(name)
    if pattern.search(text):
        text = pattern.sub(lambda _m: block, text, count=1)
    else:
        text = _insert(text, name, block)
    atomic_write_bytes(path, text.encode("utf-8", "surrogateescape"))


def _insert(text: str, name: str, block: str) -> str:
    """Put a new section before the first later section in pipeline order, else at the end."""
    rank = SECTION_ORDER.index(name) if name in SECTION_ORDER else len(SECTION_ORDER)
    for later in SECTION_ORDER[rank + 1:]:
        pos = text.find(_begin(later))
        if pos >= 0:
            return text[:pos] + block + "\n\n" + text[pos:]
    return text.rstrip("\n") + "\n\n" + block + "\n"


def read_section(path: str | Path, name: str) -> str | None:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    m = _section_re(name).search(text)
    return None if m is None else m.group(0)


def shell_command(argv: Sequence[str]) -> str:
    """The command as one copy-pasteable POSIX shell line."""
    return shlex.join(str(a) for a in argv)


def windows_command(argv: Sequence[str]) -> str:
    """The command line as a Windows program receives it (its quoting rules)."""
    import subprocess
    return subprocess.list2cmdline([str(a) for a in argv])


def _fence(text: str, lang: str = "") -> str:
    ticks = "```"
    while ticks in text:
        ticks += "`"
    return f"{ticks}{lang}\n{text.rstrip()}\n{ticks}"


@dataclass
class StageRecord:
    """What one Icraft stage did, for its section of the compile log."""

    stage: str
    status: str                         # ok | failed | skipped | cancelled
    summary: str = ""
    command: Sequence[str] | None = None
    cwd: Path | None = None
    started: float | None = None
    seconds: float | None = None
    exit_status: int | None = None
    error_code: int | None = None
    error_text: str = ""
    log_tail: list[str] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    extra: str = ""                     # more markdown (precheck tables, comparisons)
    # The project root (tdpu.toml's directory): paths are shown relative to it. Commands and
    # log lines stay verbatim, so a command can be pasted from any directory.
    root: Path | None = None
    windows: bool = False               # the command ran on Windows (WSL interop): its quoting

    def markdown(self) -> str:
        out = [f"## {self.stage} — {self.status}", "",
               f"- time: {fmt_time(self.started, zone=True)}"]
        if self.seconds is not None:
            out.append(f"- duration: {seconds(self.seconds)}")
        out.append(f"- status: **{self.status}**" + (f" — {self.summary}" if self.summary else ""))
        if self.cwd is not None:
            out.append(f"- working directory: {code_path(self.cwd, self.root)}")
        if self.exit_status is not None:
            out.append(f"- exit status: {self.exit_status}")
        if self.error_code is not None:
            out.append(f"- error code: **{self.error_code}** — {self.error_text}")
        out += [f"- {n}" for n in self.notes]
        if self.command:
            if self.windows:
                out += ["", "Command (as Windows saw it):", "",
                        _fence(windows_command(self.command), "text")]
            else:
                out += ["", "Command:", "", _fence(shell_command(self.command), "bash")]
        if self.extra:
            out += ["", self.extra.rstrip()]
        if self.files:
            out += ["", "Files:", "", "| file | size |", "|---|---|"]
            for f in self.files:
                size = human_bytes(f.stat().st_size) if f.exists() else "missing"
                out.append(f"| {code_path(f, self.root)} | {size} |")
        if self.log_tail:
            out += ["", "Last log lines:", "", _fence("\n".join(self.log_tail), "text")]
        return relative_text("\n".join(out), self.root)

    def write(self, path: str | Path) -> None:
        update_section(path, self.stage, self.markdown())
