"""Driver for FMSH's Icraft CLI: find it, build its argument lists, run it, read its logs.

Argument lists follow the Icraft v3.33 manuals (copies in `reference/icraft/docs/`):
- `icraft <command> [config.toml] [--key value]…`; `icraft X` runs `icraft-X`
  (2_Interface_CLI.md §1, 3_Component_CLI.md §1.1);
- parse: 3_Component_parse.md table 1 (`net_name, network, jr_path, log_path, framework,
  inputs, inputs_layout, pre_method, pre_mean, pre_scale, channel_swap, target`);
- optimize: 3_Component_adapt.md §2.1 (`json, raw, jr_path, log_path, pass_on`; §2.1.2 lists
  `--target` as required);
- run: 3_Component_run.md §1 (`json, raw, input, log_path, backends, dump_output, dump_format`).

Failure is read from the output, not only from the exit status: Icraft's error codes have five
digits and a POSIX exit status keeps only `code & 0xFF`, and the CLI has been seen to exit 0
after a component failed. A run fails on a `[F] …` line, an `错误码<code>` line, a non-zero
exit status, a timeout or a cancellation; the `[F]`/`[E]` marks count with or without the
timestamp prefix (a bare `[F] 21002` is a failure). The child runs in its own process group
(`proc.py`), without a shell and with stdin closed; on timeout, cancellation or Ctrl-C the whole
tree is ended. Whatever the child prints, memory and time stay bounded: lines are cut at
`MAX_LINE_BYTES`, display waits in a bounded queue, and the record keeps a bounded tail.
"""

from __future__ import annotations

import collections
import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tdpu_tui.engine.core.config import Config
from tdpu_tui.engine.icraft import proc as proc_tree
from tdpu_tui.engine.osutil.tail import EchoFilter
from tdpu_tui.engine.osutil.tail import decode_line as _decode

# Icraft's error codes, as the manuals document them. Only icraft-run (XRun) publishes a table
# (3_Component_run.md §3.1); the Adapter's "错误码说明" table (3_Component_adapt.md §2.3) is
# announced but empty in the v3.33 copy. 21002 is not in any manual: it is the code
# icraft-quantize printed (`[F] 21002`, then `[E] 执行以下命令时捕获到错误码21002:`) when an
# input file did not exist, as recorded in the project's own notes.
ERROR_CODES: dict[int, str] = {
    26000: "缺少必须参数: a required argument is missing (3_Component_run.md §3.1)",
    26001: "文件或路径不存在: a file or path does not exist (3_Component_run.md §3.1)",
    26002: "参数超出范围、格式错误: an argument is out of range or malformed "
           "(3_Component_run.md §3.1)",
    26003: "网络加载失败: the network could not be loaded (3_Component_run.md §3.1)",
    26010: "读取、检查Input时报错: reading or checking an input failed (3_Component_run.md §3.1)",
    26011: "运行超时: the run timed out (3_Component_run.md §3.1)",
    21002: "not in the manuals; seen from icraft-quantize when an input file did not exist "
           "(\"File … does not exist\") — look for an 'Exception info' line above it",
}
RESERVED_CODES = range(26004, 26010)   # "预留错误码" (3_Component_run.md §3.1)


def explain_code(code: int | None) -> str:
    if code is None:
        return ""
    if code in ERROR_CODES:
        return ERROR_CODES[code]
    if code in RESERVED_CODES:
        return "预留错误码: reserved by icraft-run (3_Component_run.md §3.1)"
    if code < 256:
        return ("exit status of the failed component as the CLI reported it "
                "(the component's own message is above it)")
    return "not in the Icraft manuals' error tables; see the log lines"


# A level mark at the start of the line: bare (`[F] 21002`, SPEC §6), after Icraft's timestamp
# (`[MM/DD/YY hh:mm:ss.ms] [F] …`, `[YYYY-MM-DD hh:mm:ss.ms] [error] …`), or after a timestamp
# and a logger name as a custom pattern writes it (`[%D %T] [%n]-[%L] %v`,
# 3_Component_Utils.md §3.1); a byte-order mark on a file's first line is ignored.
LEVEL_MARK_RE = re.compile(r"^[\s\ufeff]*(?:\[[^\]\[]*\]\s*-?\s*){0,2}?\[(?P<level>[DIWEF]|debug|"
                           r"info|warning|warn|error|critical|fatal|trace)\]", re.I)
FATAL_CODE_RE = re.compile(r"\[(?:F|fatal|critical)\]\s*(?:error\s*(?:code)?\s*[:：=]?\s*)?(\d{5})\b",
                           re.I)
CAUGHT_CODE_RE = re.compile(r"错误码\s*(\d+)")
ANSI_RE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_LEVELS = {"d": "debug", "debug": "debug", "trace": "debug", "i": "info", "info": "info", "w": "warning",
           "warning": "warning", "warn": "warning", "e": "error", "error": "error",
           "f": "error", "fatal": "error", "critical": "error"}


def decode_line(raw: bytes) -> str:
    """UTF-8, else GBK (logs written on Windows), else UTF-8 with replacement characters;
    without terminal colour codes."""
    return _clean(_decode(raw.rstrip(b"\r\n")))


def _clean(text: str) -> str:
    text = ANSI_RE.sub("", text)
    if "\r" in text:   # a progress bar redrawn in place: keep what the terminal would show
        text = next((part for part in reversed(text.split("\r")) if part.strip()), "")
    return text


def line_level(line: str) -> str:
    m = LEVEL_MARK_RE.match(line)
    if m:
        return _LEVELS.get(m.group("level").lower(), "info")
    if "错误码" in line or line.lstrip().startswith(("Exception", "Error", "error:")):
        return "error"
    return "info"


def is_failure_line(line: str) -> bool:
    m = LEVEL_MARK_RE.match(line)
    return (bool(m and m.group("level").lower() in ("f", "fatal", "critical", "e", "error"))
            or "错误码" in line)


@dataclass
class ErrorScan:
    code: int | None = None
    line: str = ""
    failed: bool = False

    def feed(self, line: str) -> None:
        if not is_failure_line(line):
            return
        self.failed = True
        m = FATAL_CODE_RE.search(line) or CAUGHT_CODE_RE.search(line)
        if m is None:
            if not self.line:
                self.line = line.strip()
            return
        code = int(m.group(1))
        # A five-digit code beats the truncated exit status the CLI echoes ("错误码1").
        if self.code is None or (self.code < 10000 <= code):
            self.code, self.line = code, line.strip()

    def reason(self) -> str | None:
        """What the failure lines say, or None when there were none."""
        if self.code is not None:
            return f"Icraft error {self.code}: {explain_code(self.code)}"
        if self.failed:
            return f"Icraft reported a fatal error: {self.line}"
        return None


# --- finding the CLI ------------------------------------------------------------------------

def _looks_like_path(value: str) -> bool:
    return os.sep in value or "/" in value or value.startswith((".", "~"))


def _windows_name(value: str) -> str | None:
    """Under WSL, the Windows program a bare name also stands for (`icraft` → `icraft.exe`,
    as PowerShell resolves it; WSL appends the Windows PATH), else None."""
    if value.lower().endswith(".exe"):
        return None
    from tdpu_tui.engine.icraft import wsl
    return f"{value}.exe" if wsl.under_wsl() else None


def find_cli(cfg: Config) -> Path | None:
    """`[icraft].bin` as a path (relative to the config file) or a name on PATH; under WSL a
    bare name not found as such is also looked for as the Windows program `NAME.exe`."""
    value = cfg.icraft.bin
    if _looks_like_path(value):
        p = cfg.resolve(value)
        return p if p.is_file() and os.access(p, os.X_OK) else None
    found = shutil.which(value)
    if found is None and (windows := _windows_name(value)) is not None:
        found = shutil.which(windows)
    return Path(found) if found else None


def missing_cli_reason(cfg: Config) -> str:
    value = cfg.icraft.bin
    if _looks_like_path(value):
        return (f"Icraft CLI '{cfg.resolve(value)}' not found or not executable "
                f"(from [icraft].bin in {cfg.file or 'the configuration'})")
    windows = _windows_name(value)
    also = f" (nor '{windows}' on the Windows PATH)" if windows else ""
    return f"Icraft CLI '{value}' not found on PATH{also}; set [icraft].bin"


# --- argument lists --------------------------------------------------------------------------

def parsed_files(jr_path: Path, net: str, stage: str) -> tuple[Path, Path]:
    """`{net}_{stage}.json/.raw` (1_Start_Compilation.md §3.3)."""
    return jr_path / f"{net}_{stage}.json", jr_path / f"{net}_{stage}.raw"


def _per_input(value: str, n: int) -> str:
    return ";".join([value] * n)


def parse_argv(exe: str | Path, cfg: Config, network: Path, inputs: Sequence[Sequence[int]],
               jr_path: Path, log_path: Path) -> list[str]:
    """icraft parse (3_Component_parse.md table 1). Non-image inputs: layout FD, no preprocessing."""
    n = len(inputs)
    return [
        str(exe), "parse",
        "--net_name", cfg.icraft.net_name,
        "--framework", "Onnx",
        "--network", str(network),
        "--jr_path", f"{jr_path}{os.sep}",
        "--log_path", f"{log_path}{os.sep}",
        "--inputs", ";".join(",".join(str(d) for d in shape) for shape in inputs),
        "--inputs_layout", _per_input("FD", n),
        "--pre_method", _per_input("nop", n),
        "--pre_mean", _per_input("nop", n),
        "--pre_scale", _per_input("nop", n),
        "--channel_swap", _per_input("nop", n),
        "--target", cfg.icraft.target,
    ]


def optimize_argv(exe: str | Path, cfg: Config, json: Path, raw: Path, jr_path: Path,
                  log_path: Path) -> list[str]:
    """icraft optimize (3_Component_adapt.md §2.1, §2.2: `pass_on a;b`)."""
    argv = [
        str(exe), "optimize",
        "--json", str(json),
        "--raw", str(raw),
        "--jr_path", f"{jr_path}{os.sep}",
        "--log_path", f"{log_path}{os.sep}",
        "--target", cfg.icraft.target,
    ]
    if cfg.icraft.pass_on:
        argv += ["--pass_on", ";".join(cfg.icraft.pass_on)]
    return argv


DUMP_FORMAT = "SFB"   # software layout, float values, binary (1_Start_Running.md §1)


def run_argv(exe: str | Path, json: Path, raw: Path, inputs: Sequence[Path],
             log_path: Path) -> list[str]:
    """icraft run on the Host backend, dumping only the network outputs (3_Component_run.md §1)."""
    return [
        str(exe), "run",
        "--json", str(json),
        "--raw", str(raw),
        "--input", ";".join(str(p) for p in inputs),
        "--backends", "Host",
        "--log_path", f"{log_path}{os.sep}",
        "--dump_output",
        "--dump_format", DUMP_FORMAT,
    ]


def find_dump(roots: Sequence[Path], nbytes: int | None,
              newer_than: float | None = None) -> Path | None:
    """The output feature map icraft run dumped under one of `roots`.

    The run dumps into a folder named after the format under its log folder
    (`<log_path>/<network>/ftmp<format>/`, 1_Start_Running.md §1; 3_Component_run.md §2.6 says
    "ftmp+dump_format"), with names the manuals do not give: a `.ftmp` of the logits' byte size
    is taken, one in a folder whose name holds the format first, the newest first. Without a
    known size only files in such a folder count; `newer_than` leaves out earlier runs' files.
    """
    fmt = DUMP_FORMAT.lower()
    found = []
    for root in roots:
        if not root.is_dir():
            continue
        for p in root.rglob("*.ftmp"):
            try:
                st = p.stat()
            except OSError:
                continue
            if (nbytes is not None and st.st_size != nbytes) or \
                    (newer_than is not None and st.st_mtime < newer_than):
                continue
            in_dump = any(fmt in part.lower() for part in p.relative_to(root).parts[:-1])
            if nbytes is None and not in_dump:
                continue
            found.append((in_dump, st.st_mtime, str(p), p))
    return max(found)[3] if found else None


def _toml_str(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _rel(p: Path, base: Path) -> str:
    return Path(os.path.relpath(p, base)).as_posix()


def compile_toml(cfg: Config, base: Path, network: Path, inputs: Sequence[Sequence[int]],
                 ftmp_inputs: Sequence[Path]) -> str:
    """The same parse/optimize/run as an `icraft` config file (2_Interface_CLI.md §2).

    Paths are relative to the file's directory with forward slashes, so the file runs as is
    from that directory on the Windows host (backslashes in TOML strings are escapes).
    """
    net = cfg.icraft.net_name
    pj, pr = parsed_files(base, net, "parsed")
    oj, orw = parsed_files(base, net, "optimized")
    n = len(inputs)
    lines = [
        f"# Icraft configuration written by tdpu for '{net}'. Run from this directory:",
        f"#   icraft parse {net}.toml && icraft optimize {net}.toml && icraft run {net}.toml",
        "# The [run] input is the float32 .ftmp that tdpu's simulate stage writes.",
        "",
        "[parse]",
        f"net_name = {_toml_str(net)}",
        'framework = "Onnx"',
        f"network = {_toml_str(_rel(network, base))}",
        'jr_path = "./"',
        'log_path = "./logs/parse/"',
        # One input as the manuals write it (`inputs = [ 1, 640, 640, 3,]`, 2_Interface_CLI.md
        # §2); several as on the command line (`;` between inputs).
        ("inputs = [" + ", ".join(map(str, inputs[0])) + "]" if n == 1 else
         "inputs = " + _toml_str(";".join(",".join(map(str, s)) for s in inputs))),
        f"inputs_layout = {_toml_str(_per_input('FD', n))}",
        f"pre_method = {_toml_str(_per_input('nop', n))}",
        f"pre_mean = {_toml_str(_per_input('nop', n))}",
        f"pre_scale = {_toml_str(_per_input('nop', n))}",
        f"channel_swap = {_toml_str(_per_input('nop', n))}",
        f"target = {_toml_str(cfg.icraft.target)}",
        "",
        "[optimize]",
        f"json = {_toml_str(_rel(pj, base))}",
        f"raw = {_toml_str(_rel(pr, base))}",
        'jr_path = "./"',
        'log_path = "./logs/optimize/"',
        f"target = {_toml_str(cfg.icraft.target)}",
    ]
    if cfg.icraft.pass_on:
        lines.append(f"pass_on = {_toml_str(';'.join(cfg.icraft.pass_on))}")
    lines += [
        "",
        "[run]",
        f"json = {_toml_str(_rel(oj, base))}",
        f"raw = {_toml_str(_rel(orw, base))}",
        "input = " + _toml_str(";".join(_rel(p, base) for p in ftmp_inputs)),
        'backends = "Host"',
        'log_path = "./logs/simulate/"',
        "dump_output = true",
        f'dump_format = "{DUMP_FORMAT}"',
        "",
    ]
    return "\n".join(lines)


# --- running ---------------------------------------------------------------------------------

@dataclass
class RunResult:
    argv: list[str]
    cwd: Path
    returncode: int | None = None
    seconds: float = 0.0
    timed_out: bool = False
    cancelled: bool = False
    error: ErrorScan = field(default_factory=ErrorScan)
    log_files: list[Path] = field(default_factory=list)
    tail: list[str] = field(default_factory=list)
    stray_killed: bool = False
    timeout_s: float = 0.0

    @property
    def ok(self) -> bool:
        return (self.returncode == 0 and not self.timed_out and not self.cancelled
                and not self.error.failed)

    @property
    def error_code(self) -> int | None:
        return self.error.code

    def reason(self) -> str:
        if self.timed_out:
            return f"timed out after {self.timeout_s:g} s (process tree ended)"
        if self.cancelled:
            return "cancelled (process tree ended)"
        if self.error.reason():
            return self.error.reason()
        if self.returncode not in (0, None):
            return f"exit status {self.returncode}"
        return "ok"


LineSink = Callable[[str, str, str], None]   # (line, level, source)

# Bounds that hold whatever the child prints: one line is cut at MAX_LINE_BYTES, at most
# QUEUE_LINES lines wait for display (more are counted, not kept: the child is never slowed
# down by tdpu), and each loop turn spends at most TURN_S on them before the deadline is
# looked at again.
MAX_LINE_BYTES = 4096
QUEUE_LINES = 2000
TURN_S = 0.1
READ_CHUNK = 64 * 1024
LOG_READ_PER_TURN = 256 * 1024
# After the child's exit what is left of a log is read whole up to this size, else its end.
FINAL_READ_MAX = 64 << 20
FINAL_READ_TAIL = 8 << 20
FAILURE_LINES = 10


def cut_note(dropped: int) -> str:
    return f" … [line cut: {dropped} more bytes]"


class LineCutter:
    """Splits a byte stream into lines of at most `limit` bytes; the rest of a longer line is
    counted and dropped, never held."""

    def __init__(self, limit: int = MAX_LINE_BYTES):
        self.limit = limit
        self._buf = bytearray()
        self._dropped = 0

    def feed(self, data: bytes) -> list[str]:
        parts = data.split(b"\n")
        self._add(parts[0])
        if len(parts) == 1:
            return []
        out = [self._take()]
        if len(parts) > 2:
            out += self._whole(parts[1:-1])
        self._add(parts[-1])
        return out

    def _add(self, piece: bytes) -> None:
        room = self.limit - len(self._buf)
        if room > 0:
            self._buf += piece[:room]
        self._dropped += max(0, len(piece) - max(room, 0))

    def _whole(self, pieces: list[bytes]) -> list[str]:
        """Complete lines, decoded together where they can be (a flood of short lines)."""
        if max(map(len, pieces)) > self.limit:
            out = []
            for p in pieces:
                self._add(p)
                out.append(self._take())
            return out
        try:
            text = b"\n".join(pieces).decode("utf-8")
        except UnicodeDecodeError:
            return [decode_line(p) for p in pieces]
        if "\x1b" in text:
            text = ANSI_RE.sub("", text)
        lines = text.split("\n")
        if "\r" in text:
            lines = [_clean(line.rstrip("\r")) for line in lines]
        return lines

    def flush(self) -> list[str]:
        return [self._take()] if self._buf or self._dropped else []

    def _take(self) -> str:
        line = decode_line(bytes(self._buf))
        if self._dropped:
            line += cut_note(self._dropped)
        self._buf.clear()
        self._dropped = 0
        return line


# Lines worth a closer look (levels E/F, error codes, exceptions): a batch without any is
# only cut to its tail, so a flood of ordinary lines costs little per line.
_NOTABLE = ("[f]", "[e]", "[fatal]", "[critical]", "error", "exception", "错误码")


def _notable(text: str) -> bool:
    low = text.lower()
    return any(k in low for k in _NOTABLE)


class _Collector:
    """What is kept of a run's lines, whatever their number: the error scan, the failure
    lines and a bounded tail (shared by the pipe readers and the log follower). Lines for
    display wait in a bounded queue of batches; what does not fit is counted, not kept, so
    the child never waits for tdpu."""

    def __init__(self, tail_lines: int):
        self.lock = threading.Lock()
        self.error = ErrorScan()
        self.tail: collections.deque[str] = collections.deque(maxlen=tail_lines)
        self.failures: collections.deque[str] = collections.deque(maxlen=FAILURE_LINES)
        self.display: collections.deque[tuple[list[str], str]] = collections.deque()
        self.queued = 0
        self.not_shown = 0

    def take(self, lines: list[str], source: str, show: bool = True) -> None:
        if not lines:
            return
        notable = [ln for ln in lines if _notable(ln)] if _notable("\n".join(lines)) else []
        with self.lock:
            for line in notable:
                self.error.feed(line)
                if (is_failure_line(line) or line_level(line) == "error") and line not in self.failures:
                    self.failures.append(line)
            for line in lines[-self.tail.maxlen:]:
                if line.strip() and line not in self.tail:
                    self.tail.append(line)
            if not show:
                return
            room = QUEUE_LINES - self.queued
            if room < len(lines):
                self.not_shown += len(lines) - max(room, 0)
                lines = lines[:max(room, 0)]
            if lines:
                self.display.append((lines, source))
                self.queued += len(lines)

    def next_batch(self) -> tuple[list[str], str] | None:
        with self.lock:
            if not self.display:
                return None
            lines, source = self.display.popleft()
            self.queued -= len(lines)
            return lines, source

    def lines_for_record(self) -> list[str]:
        with self.lock:
            seen = set(self.tail)
            return [f for f in self.failures if f not in seen] + list(self.tail)


def _reader(stream, source: str, sink: _Collector) -> None:
    cutter = LineCutter()
    try:
        read = getattr(stream, "read1", stream.read)
        while True:
            data = read(READ_CHUNK)
            if not data:
                break
            sink.take(cutter.feed(data), source)
        sink.take(cutter.flush(), source)
    except (OSError, ValueError):
        pass
    finally:
        stream.close()


class _LogFollower:
    """Icraft's log files, read by offset in bounded pieces, lines cut like the pipes'.
    Files already present in a folder followed with `history=False` are read from their end."""

    def __init__(self):
        self._dirs: list[tuple[Path, bool]] = []
        self._files: dict[Path, list] = {}       # path -> [offset, LineCutter]

    def follow_dir(self, directory: Path, history: bool = True) -> None:
        self._dirs.append((directory, history))
        if not history:
            for p in self._matching(directory):
                try:
                    self._files[p] = [p.stat().st_size, LineCutter()]
                except OSError:
                    continue

    @staticmethod
    def _matching(directory: Path) -> list[Path]:
        try:
            return sorted(p for p in directory.rglob("*.log") if p.is_file())
        except OSError:
            return []

    @property
    def paths(self) -> list[Path]:
        return list(self._files)

    def poll(self, sink: _Collector, budget: int | None, show: bool = True) -> None:
        for directory, _history in self._dirs:
            for p in self._matching(directory):
                self._files.setdefault(p, [0, LineCutter()])
        for path, state in self._files.items():
            left = budget
            try:
                size = path.stat().st_size
                if size < state[0]:          # rewritten from its start
                    state[0], state[1] = 0, LineCutter()
                if size == state[0]:
                    continue
                if budget is None and size - state[0] > FINAL_READ_MAX:
                    # After the exit: the end of a huge log is what tells how it ended.
                    skipped = size - FINAL_READ_TAIL - state[0]
                    sink.take([f"… {skipped} bytes of {path.name} not read here (the file "
                               "keeps them)"], "tdpu", show)
                    state[0], state[1] = size - FINAL_READ_TAIL, LineCutter()
                with open(path, "rb") as fh:
                    fh.seek(state[0])
                    while left is None or left > 0:
                        data = fh.read(READ_CHUNK if left is None else min(READ_CHUNK, left))
                        if not data:
                            break
                        state[0] += len(data)
                        if left is not None:
                            left -= len(data)
                        sink.take([_clean(ln) for ln in state[1].feed(data)], str(path), show)
            except OSError:
                continue

    def flush(self, sink: _Collector, show: bool) -> None:
        for path, state in self._files.items():
            sink.take([_clean(ln) for ln in state[1].flush()], str(path), show)


class WindowsTree:
    """How a Windows program run through WSL interop is ended: the Linux-side interop process
    does not take the Windows tree with it (see `wsl.py`)."""

    def started(self) -> None:
        """The program has just been started (the Windows side may be looked up now)."""

    def end(self) -> str:  # pragma: no cover - interface
        raise NotImplementedError


def run_icraft(argv: Sequence[str], *, cwd: Path, log_dirs: Sequence[Path], timeout_s: float,
               on_line: LineSink, cancelled: Callable[[], bool] = lambda: False,
               env: dict[str, str] | None = None, term_grace: float = 0.5,
               tail_lines: int = 30, poll_s: float = 0.1,
               windows: WindowsTree | None = None) -> RunResult:
    """Run one Icraft command to completion, streaming its output and its log files.

    The deadline counts the child's own time: its exit is noted by a waiter thread the moment
    it happens, and tdpu's handling of the lines (bounded per turn) never delays that verdict
    or the kill."""
    cwd = Path(cwd)
    cwd.mkdir(parents=True, exist_ok=True)
    follower = _LogFollower()
    for d in log_dirs:
        follower.follow_dir(Path(d))
    # Where Icraft logs when --log_path is ignored; the logs of earlier runs there do not count.
    follower.follow_dir(cwd / ".icraft" / "logs", history=False)
    result = RunResult([str(a) for a in argv], cwd, timeout_s=timeout_s)
    sink = _Collector(tail_lines)
    echo = EchoFilter()

    def show(line: str, level: str, source: str) -> None:
        # Icraft prints each line to stdout and to its log file: pass one copy on.
        if echo.fresh("output" if source.startswith("icraft ") else source, [line]):
            on_line(line, level, source)

    pending: collections.deque[tuple[str, str]] = collections.deque()

    def show_queued(budget_s: float) -> None:
        until = time.monotonic() + budget_s
        while time.monotonic() < until:
            if not pending:
                batch = sink.next_batch()
                if batch is None:
                    return
                pending.extend((line, batch[1]) for line in batch[0])
            line, source = pending.popleft()
            show(line, line_level(line), source)

    start = time.monotonic()
    proc = subprocess.Popen(
        result.argv, cwd=str(cwd), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, env=env, **proc_tree.popen_kwargs(),
    )
    tree = proc_tree.Tree(proc.pid)
    if windows is not None:
        windows.started()
    exited = threading.Event()
    exit_at: list[float] = []

    def waiter() -> None:
        proc.wait()
        exit_at.append(time.monotonic())
        exited.set()

    watching = threading.Event()

    def watch_tree() -> None:
        # Remember the child's descendants as they come. A walk of the process table can take
        # a second while the child floods its pipes (the readers hold the GIL between its
        # reads), so it runs beside the loop that keeps the deadline, never in it.
        while not watching.wait(0.5):
            tree.refresh()

    threads = [threading.Thread(target=_reader, args=(proc.stdout, "icraft stdout", sink), daemon=True),
               threading.Thread(target=_reader, args=(proc.stderr, "icraft stderr", sink), daemon=True),
               threading.Thread(target=waiter, daemon=True),
               threading.Thread(target=watch_tree, daemon=True)]
    for t in threads:
        t.start()
    deadline = start + timeout_s

    def end_tree() -> None:
        if windows is not None:
            note = windows.end()
            if note:
                sink.take([note], "tdpu", True)
        tree.end(term_grace)

    try:
        while not exited.wait(min(poll_s, max(0.0, deadline - time.monotonic()))):
            if time.monotonic() >= deadline:
                result.timed_out = True
                end_tree()
                break
            if cancelled():
                result.cancelled = True
                end_tree()
                break
            # Never past the deadline on tdpu's own work: it is checked again right after.
            show_queued(min(TURN_S, max(0.0, deadline - time.monotonic())))
            follower.poll(sink, LOG_READ_PER_TURN)
    except BaseException:  # Ctrl-C (KeyboardInterrupt) or anything else: leave nothing behind
        end_tree()
        raise
    finally:
        watching.set()
        exited.wait(5.0)
        result.returncode = proc.poll()
        end = exit_at[0] if exit_at else time.monotonic()
        result.seconds = end - start
        if result.timed_out and exit_at and exit_at[0] < deadline:
            result.timed_out = False   # it had finished; tdpu only noticed late
        for t in threads[:2]:
            t.join(timeout=2.0)
        if tree.alive():
            # Something the CLI started outlived it (or holds its pipes): do not leave it behind.
            result.stray_killed = not (result.timed_out or result.cancelled)
            tree.end(0.5)
            for t in threads[:2]:
                t.join(timeout=2.0)
        # What is left after the exit is read whole (for the error scan and the tail) but shown
        # only up to a bounded number of lines.
        show_queued(1.0)
        follower.poll(sink, None, show=True)
        follower.flush(sink, show=True)
        show_queued(1.0)
        left = len(pending) + sink.queued + sink.not_shown
        if left:
            on_line(f"… {left} more lines not shown here (output flood); "
                    "the log files keep them", "warning", "tdpu")
        result.log_files = sorted(follower.paths)
    result.error = sink.error
    result.tail = sink.lines_for_record()
    return result


def copy_logs(files: Sequence[Path], dest: Path) -> list[Path]:
    """Copy log files that live outside `dest` into it (Icraft's default log folder)."""
    out = []
    dest.mkdir(parents=True, exist_ok=True)
    for f in files:
        try:
            f.relative_to(dest)
            out.append(f)
            continue
        except ValueError:
            pass
        target = dest / f.name
        shutil.copy2(f, target)
        out.append(target)
    return out
