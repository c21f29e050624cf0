"""Icraft's Windows build run from WSL through interop (see `docs/icraft.md`).

tdpu runs under WSL when `WSL_DISTRO_NAME` or `WSL_INTEROP` is set, or the kernel's
`osrelease` says "microsoft". There a `[icraft].bin` that is a Windows program (a name ending
in `.exe`, or a path under `/mnt/<drive>/`) gets every path argument converted with
`wslpath -w`; Icraft's logs and outputs are read back through the Linux paths.

Ending it: the Linux process tdpu starts is only the interop relay, and a signal to it does
not end what the Windows program started. The Windows process is found by its command line
(the converted arguments hold the stage's own log folder, so the line is unique to this run)
with `powershell.exe … Get-CimInstance Win32_Process`, and its tree is ended with
`taskkill.exe /T /F /PID <pid>`; when powershell.exe cannot tell, `taskkill.exe /T /F /IM
<program>` ends every process of that program's name.
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import subprocess
import threading
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

from tdpu_tui.engine.core.errors import StageFailed
from tdpu_tui.engine.icraft.driver import WindowsTree

OSRELEASE = Path("/proc/sys/kernel/osrelease")
PROC_VERSION = Path("/proc/version")
# Registered by WSL for running Windows programs (present only where interop works).
INTEROP_BINFMT = Path("/proc/sys/fs/binfmt_misc/WSLInterop")
# The argument keys of parse/optimize/run whose values are paths (`;` between several).
PATH_KEYS = {"--network", "--jr_path", "--log_path", "--json", "--raw", "--input"}
_MNT_RE = re.compile(r"^/mnt/[A-Za-z](/|$)")
TOOL_TIMEOUT_S = 10


def under_wsl(env: dict[str, str] | None = None, osrelease: Path | None = None) -> bool:
    env = os.environ if env is None else env
    if env.get("WSL_DISTRO_NAME") or env.get("WSL_INTEROP"):
        return True
    # SPEC §10 names osrelease; /proc/version says the same ("…-microsoft-standard-WSL2 …")
    # and is what many WSL checks read, so either counts.
    if osrelease is None and INTEROP_BINFMT.exists():
        return True
    files = [osrelease] if osrelease is not None else [OSRELEASE, PROC_VERSION]
    for f in files:
        try:
            if "microsoft" in f.read_text(errors="replace").lower():
                return True
        except OSError:
            continue
    return False


def is_windows_program(exe: str | Path) -> bool:
    text = str(exe)
    return text.lower().endswith(".exe") or bool(_MNT_RE.match(text))


def uses_interop(exe: str | Path) -> bool:
    return is_windows_program(exe) and under_wsl()


def _tool(name: str) -> str:
    return shutil.which(name) or name


def to_windows(path: str | Path) -> str:
    """`wslpath -w PATH`: the path as Windows programs see it."""
    try:
        proc = subprocess.run([_tool("wslpath"), "-w", str(path)], capture_output=True,
                              check=False, timeout=TOOL_TIMEOUT_S, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise StageFailed(f"cannot convert {path} for Windows: wslpath failed ({exc})") from None
    out = proc.stdout.decode("utf-8", "replace").strip()
    if proc.returncode != 0 or not out:
        err = proc.stderr.decode("utf-8", "replace").strip()
        raise StageFailed(f"cannot convert {path} for Windows: wslpath -w exited "
                          f"{proc.returncode} ({err or 'no output'})")
    return out


def _convert_one(value: str) -> str:
    """One path for Windows. A folder keeps its trailing separator (Icraft joins names onto
    `--jr_path`/`--log_path`), but where the path holds white space it is `/`: WSL wraps such an
    argument in quotes without escaping (microsoft/WSL#1625, #2411), and a `\\` before that
    closing quote would escape it — the argument would swallow the ones after it."""
    trailing = value.endswith(("/", os.sep)) and len(value) > 1
    out = to_windows(value.rstrip("/") if trailing else value)
    if not trailing:
        return out
    return out.rstrip("\\/") + ("/" if any(c.isspace() for c in out) else "\\")


def _is_path(value: str) -> bool:
    return PurePosixPath(value).is_absolute() or value.startswith(("./", "../"))


def windows_argv(argv: Sequence[str]) -> list[str]:
    """`argv` with every path argument converted; argv[0] stays the Linux path interop runs."""
    out = [str(argv[0])]
    prev = ""
    for arg in map(str, argv[1:]):
        if prev in PATH_KEYS:
            out.append(";".join(_convert_one(v) if v else v for v in arg.split(";")))
        elif not arg.startswith("--") and arg.endswith(".toml") and _is_path(arg):
            out.append(_convert_one(arg))
        else:
            out.append(arg)
        prev = arg
    return out


def _drive_form(path: str) -> str | None:
    """`/mnt/c/x/y` as `C:\\x\\y` (WSL's default drive mounts), else None."""
    m = re.match(r"^/mnt/([A-Za-z])(?:/(.*))?$", path)
    if m is None:
        return None
    return f"{m.group(1).upper()}:\\" + (m.group(2) or "").replace("/", "\\")


def shown_argv(argv: Sequence[str]) -> list[str]:
    """The command as Windows sees it (the program by its Windows path too)."""
    first = str(argv[0])
    try:
        exe = to_windows(first) if PurePosixPath(first).is_absolute() else first
    except StageFailed:
        exe = _drive_form(first) or first
    return [exe, *map(str, argv[1:])]


def find_windows_pid(program: str, marker: str) -> int | None:
    """The Windows PID of `program` whose command line holds `marker`, or None."""
    ps = shutil.which("powershell.exe")
    if ps is None or not marker:
        return None
    name = program.replace("'", "''")
    # No double quotes in the script: WSL passes an argument with spaces in quotes without
    # escaping the quotes inside it (microsoft/WSL#2411), and Windows would drop them.
    script = (f"Get-CimInstance Win32_Process | Where-Object {{ $_.Name -eq '{name}' }} | "
              "ForEach-Object { [string]$_.ProcessId + ' ' + $_.CommandLine }")
    try:
        proc = subprocess.run([ps, "-NoProfile", "-NonInteractive", "-Command", script],
                              capture_output=True, check=False, timeout=TOOL_TIMEOUT_S,
                              stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return None
    from tdpu_tui.engine.osutil.tail import decode_line
    for raw in proc.stdout.splitlines():
        line = decode_line(raw.rstrip(b"\r"))
        pid, _, cmdline = line.strip().partition(" ")
        if pid.isdigit() and marker.lower() in cmdline.lower():
            return int(pid)
    return None


class InteropTree(WindowsTree):
    """Ends the Windows side of one interop run with taskkill.exe."""

    def __init__(self, exe: str | Path, win_argv: Sequence[str]):
        name = PurePosixPath(str(exe)).name
        # The image name Windows knows (a program under /mnt/c/ may be named without .exe).
        self.program = name if name.lower().endswith(".exe") else f"{name}.exe"
        self.marker = next((v for k, v in itertools.pairwise(win_argv) if k == "--log_path"), "")
        self.calls: list[list[str]] = []
        self.pid: int | None = None
        self._stop = threading.Event()

    # While the program runs its Windows PID is looked up in the background, so a timeout or
    # cancel ends it at once (powershell.exe takes a second or more to start).
    LOOKUP_DELAYS = (0.3, 0.7, 1.5, 3.0, 6.0)

    def started(self) -> None:
        if self.marker and shutil.which("powershell.exe"):
            threading.Thread(target=self._lookup, daemon=True, name="windows-pid").start()

    def _lookup(self) -> None:
        for delay in self.LOOKUP_DELAYS:
            if self._stop.wait(delay):
                return
            pid = find_windows_pid(self.program, self.marker)
            if pid is not None and not self._stop.is_set():
                self.pid = pid
                return

    def end(self) -> str:
        self._stop.set()
        # The interop relay lives as long as the Windows program, and end() is only called
        # while the relay runs: a PID found earlier is still that program's.
        pid = self.pid if self.pid is not None else find_windows_pid(self.program, self.marker)
        target = ["/PID", str(pid)] if pid is not None else ["/IM", self.program]
        argv = [_tool("taskkill.exe"), "/T", "/F", *target]
        self.calls.append(argv)
        try:
            proc = subprocess.run(argv, capture_output=True, check=False,
                                  timeout=TOOL_TIMEOUT_S, stdin=subprocess.DEVNULL)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"[W] taskkill.exe could not end the Windows process tree: {exc}"
        what = f"PID {pid}" if pid is not None else f"every {self.program} (its PID was not found)"
        return (f"[W] Windows process tree of {what} ended with taskkill.exe /T /F "
                f"(exit status {proc.returncode})")
