"""Reading a hand-off bundle that comes back from the Icraft host (`tdpu icraft import`).

A zip is unpacked inside the project first, every member checked to stay inside the folder it
is unpacked to (no absolute names, drives, `..`, links). Each command's outcome is read the way
a local run's is (`driver.ErrorScan` over its lines), from what the bundle's scripts keep in
`logs/` (`<command>.console.log`, `<command>.exit`) and from Icraft's own log files there.
Logs may be UTF-8 or GBK (Icraft on Windows), with CRLF line ends, or UTF-16 with a byte-order
mark (what Windows PowerShell's Tee-Object writes).
"""

from __future__ import annotations

import codecs
import collections
import json
import shutil
import stat
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath

from tdpu_tui.engine.icraft import bundle as bd
from tdpu_tui.engine.icraft import driver as ic

READ_CHUNK = 1 << 16
TAIL_LINES = 30


class BundleError(Exception):
    """A bundle that cannot be imported; the message names the file and what is wrong."""


# --- unpacking --------------------------------------------------------------------------------

def _member_problem(name: str) -> str | None:
    if not name or "\x00" in name:
        return "an empty name"
    if name.startswith(("/", "\\")) or PureWindowsPath(name).drive or PurePosixPath(name).is_absolute():
        return "an absolute path or drive"
    parts = name.replace("\\", "/").split("/")
    if ".." in parts:
        return "'..'"
    return None


def member_name(info: zipfile.ZipInfo) -> str:
    """A member's name with `/` between its parts. A name stored without the UTF-8 flag is in
    the code page of the machine that zipped it: on the team's Chinese Windows GBK (cp936),
    which Python reads as cp437. It is decoded as GBK where that works, before `\\` is taken
    for a separator (the second byte of a GBK character can be 0x5C)."""
    name = info.orig_filename
    if not info.flag_bits & 0x800:
        try:
            raw = name.encode("cp437")
        except UnicodeEncodeError:
            raw = b""
        if any(b > 0x7F for b in raw):
            try:
                name = raw.decode("gbk")
            except UnicodeDecodeError:
                pass
    return name.replace("\\", "/")


def safe_extract(archive: Path, dest: Path) -> Path:
    """Unpack `archive` into the fresh folder `dest`, refusing members that would land
    outside it; returns `dest`."""
    try:
        zf = zipfile.ZipFile(archive)
    except (OSError, zipfile.BadZipFile) as exc:
        raise BundleError(f"{archive}: not a readable zip file ({exc})") from None
    with zf:
        root = dest.resolve()
        plan = []
        for info in zf.infolist():
            # Windows tools (PowerShell 5.1's Compress-Archive, older Explorer) write `\`
            # between the parts of a name, a folder's entry included.
            name = member_name(info)
            problem = _member_problem(name)
            mode = info.external_attr >> 16
            if problem is None and stat.S_ISLNK(mode):
                problem = "a symbolic link"
            target = (root / name).resolve()
            if problem is None and not (target == root or target.is_relative_to(root)):
                problem = "a path outside the folder it is unpacked to"
            if problem is not None:
                raise BundleError(f"{archive}: member {name!r} has {problem}: "
                                  "refused (nothing was unpacked)")
            plan.append((info, name.endswith("/"), target))
        if dest.exists():
            shutil.rmtree(dest)
        dest.mkdir(parents=True)
        for info, is_dir, target in plan:
            if is_dir:
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, open(target, "wb") as out:
                shutil.copyfileobj(src, out, READ_CHUNK)
    return dest


def find_root(folder: Path) -> Path:
    """The folder holding `bundle.json`: `folder` itself or its only sub-folder."""
    if (folder / bd.BUNDLE_JSON).is_file():
        return folder
    subs = [p for p in folder.iterdir() if p.is_dir()] if folder.is_dir() else []
    hits = [p for p in subs if (p / bd.BUNDLE_JSON).is_file()]
    if len(hits) == 1:
        return hits[0]
    raise BundleError(f"{folder}: no {bd.BUNDLE_JSON} (expected the folder `tdpu icraft bundle` "
                      "wrote, or a zip of it)")


def read_manifest(root: Path) -> dict:
    path = root / bd.BUNDLE_JSON
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise BundleError(f"{path}: cannot read it ({exc})") from None
    if not isinstance(doc, dict) or doc.get("format") != bd.FORMAT:
        raise BundleError(f"{path}: expected format {bd.FORMAT!r}, found "
                          f"{doc.get('format') if isinstance(doc, dict) else doc!r}")
    for key in ("net_name", "export", "toml"):
        if key not in doc:
            raise BundleError(f"{path}: no '{key}' entry")
    return doc


# --- reading logs -----------------------------------------------------------------------------

def log_lines(path: Path) -> Iterator[str]:
    """The lines of a log file, decoded (UTF-16 with BOM, else UTF-8 or GBK per line), CRLF
    handled, each cut at the driver's line limit, read in bounded pieces."""
    with open(path, "rb") as fh:
        head = fh.read(4)
        fh.seek(0)
        if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
            dec = codecs.getincrementaldecoder("utf-16")(errors="replace")
            buf = ""
            while data := fh.read(READ_CHUNK):
                buf += dec.decode(data)
                *lines, buf = buf.split("\n")
                for line in lines:
                    yield _fit(line)
                if len(buf) > ic.MAX_LINE_BYTES:
                    yield _fit(buf)
                    buf = ""
            buf += dec.decode(b"", final=True)
            if buf:
                yield _fit(buf)
            return
        if head.startswith(codecs.BOM_UTF8):
            fh.seek(3)
        cutter = ic.LineCutter()
        while data := fh.read(READ_CHUNK):
            for line in cutter.feed(data):
                yield ic._clean(line)
        for line in cutter.flush():
            yield ic._clean(line)


def _fit(line: str) -> str:
    line = ic._clean(line.rstrip("\r"))
    if len(line) > ic.MAX_LINE_BYTES:
        line = line[:ic.MAX_LINE_BYTES] + ic.cut_note(len(line) - ic.MAX_LINE_BYTES)
    return line


@dataclass
class CommandOutcome:
    command: str                   # parse | optimize | run
    ran: bool = False
    exit_status: int | None = None
    error: ic.ErrorScan = field(default_factory=ic.ErrorScan)
    tail: list[str] = field(default_factory=list)
    log_files: list[Path] = field(default_factory=list)
    missing: list[Path] = field(default_factory=list)
    seconds: float | None = None

    @property
    def ok(self) -> bool:
        return self.ran and not self.error.failed and self.exit_status in (0, None) and not self.missing

    def reason(self) -> str:
        if not self.ran:
            return "not run on the Icraft host (no logs of it in the bundle)"
        if self.error.reason():
            return self.error.reason()
        if self.exit_status not in (0, None):
            return f"exit status {self.exit_status}"
        if self.missing:
            return ("Icraft reported success but did not write "
                    + ", ".join(p.name for p in self.missing))
        return "ok"


def _outputs(root: Path, net: str, command: str) -> list[Path]:
    if command == "parse":
        return list(ic.parsed_files(root, net, "parsed"))
    if command == "optimize":
        return list(ic.parsed_files(root, net, "optimized"))
    return []


def find_dump(root: Path, nbytes: int | None) -> Path | None:
    """The output feature map the run dumped (`driver.find_dump`), in the run's log folder or
    Icraft's default one (the scripts clear both before they run)."""
    return ic.find_dump([root / bd.LOG_DIRS["run"], root / ".icraft" / "logs", root / "logs"],
                        nbytes)


def read_command(root: Path, net: str, command: str) -> CommandOutcome:
    out = CommandOutcome(command)
    logs = root / "logs"
    console = logs / f"{command}.console.log"
    exit_file = logs / f"{command}.exit"
    files = [console] if console.is_file() else []
    comp_dir = root / bd.LOG_DIRS[command]
    if comp_dir.is_dir():
        files += sorted(p for p in comp_dir.rglob("*.log") if p.is_file())
    default = root / ".icraft" / "logs"
    if default.is_dir():
        files += sorted(p for p in default.rglob(f"*_{command}*.log") if p.is_file())
    tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
    failures: collections.deque[str] = collections.deque(maxlen=ic.FAILURE_LINES)
    for f in files:
        for line in log_lines(f):
            out.error.feed(line)
            if ic.is_failure_line(line) and line not in failures:
                failures.append(line)
            if line.strip() and line not in tail:
                tail.append(line)
    out.log_files = files
    if exit_file.is_file():
        text = exit_file.read_bytes().decode("utf-8", "replace").strip().lstrip("\ufeff")
        try:
            out.exit_status = int(text.split()[0]) if text else None
        except ValueError:
            out.exit_status = None
    out.ran = bool(files) or exit_file.is_file()
    seen = set(tail)
    out.tail = [f for f in failures if f not in seen] + list(tail)
    if out.ran:
        out.missing = [p for p in _outputs(root, net, command) if not p.exists()]
    return out
