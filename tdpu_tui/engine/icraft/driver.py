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
exit status, a timeout or a cancellation. The child runs in its own process group, without a
shell and with stdin closed; on timeout, cancellation or Ctrl-C the whole group is killed.
"""

from __future__ import annotations

import collections
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tdpu_tui.engine.core.config import Config
from tdpu_tui.engine.core.events import LEVEL_MARK_RE
from tdpu_tui.engine.osutil.tail import EchoFilter, Tailer
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


# Levels as LEVEL_MARK_RE finds them in Icraft's log lines.
FATAL_CODE_RE = re.compile(r"\[F\]\s*(\d{5})\b")
CAUGHT_CODE_RE = re.compile(r"错误码\s*(\d+)")
ANSI_RE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_LEVELS = {"d": "debug", "debug": "debug", "i": "info", "info": "info", "w": "warning",
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
    return bool(m and m.group("level").upper() == "F") or "错误码" in line


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


# --- finding the CLI ------------------------------------------------------------------------

def _looks_like_path(value: str) -> bool:
    return os.sep in value or "/" in value or value.startswith((".", "~"))


def find_cli(cfg: Config) -> Path | None:
    """`[icraft].bin` as a path (relative to the config file) or a name on PATH."""
    value = cfg.icraft.bin
    if _looks_like_path(value):
        p = cfg.resolve(value)
        return p if p.is_file() and os.access(p, os.X_OK) else None
    found = shutil.which(value)
    return Path(found) if found else None


def missing_cli_reason(cfg: Config) -> str:
    value = cfg.icraft.bin
    if _looks_like_path(value):
        return (f"Icraft CLI '{cfg.resolve(value)}' not found or not executable "
                f"(from [icraft].bin in {cfg.file or 'the configuration'})")
    return f"Icraft CLI '{value}' not found on PATH; set [icraft].bin"


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
        "inputs = " + _toml_str(";".join(",".join(map(str, s)) for s in inputs)),
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

    @property
    def ok(self) -> bool:
        return (self.returncode == 0 and not self.timed_out and not self.cancelled
                and not self.error.failed)

    @property
    def error_code(self) -> int | None:
        return self.error.code

    def reason(self) -> str:
        if self.timed_out:
            return f"timed out after {self.seconds:.0f} s (process group killed)"
        if self.cancelled:
            return "cancelled (process group killed)"
        if self.error.code is not None:
            return f"Icraft error {self.error.code}: {explain_code(self.error.code)}"
        if self.error.failed:
            return f"Icraft reported a fatal error: {self.error.line}"
        if self.returncode not in (0, None):
            return f"exit status {self.returncode}"
        return "ok"


LineSink = Callable[[str, str, str], None]   # (line, level, source)


def _reader(stream, source: str, q: queue.Queue) -> None:
    try:
        for raw in iter(stream.readline, b""):
            q.put((source, raw))
    finally:
        stream.close()


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def kill_group(proc: subprocess.Popen, grace: float) -> None:
    """SIGTERM the child's process group, then SIGKILL whatever is left after `grace` s."""
    pgid = proc.pid
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass


def run_icraft(argv: Sequence[str], *, cwd: Path, log_dirs: Sequence[Path], timeout_s: float,
               on_line: LineSink, cancelled: Callable[[], bool] = lambda: False,
               env: dict[str, str] | None = None, term_grace: float = 3.0,
               tail_lines: int = 30, poll_s: float = 0.1) -> RunResult:
    """Run one Icraft command to completion, streaming its output and its log files."""
    cwd = Path(cwd)
    cwd.mkdir(parents=True, exist_ok=True)
    # Read synchronously (poll, then drain) between reads of the child's output; nothing is
    # held back (no queue limit: this loop is the only consumer, and a last line without its
    # newline is handed over when Icraft has finished).
    tailer = Tailer(max_pending=sys.maxsize, partial_flush_s=float("inf"))
    for d in log_dirs:
        tailer.follow_dir(Path(d), "*.log")
    # Where Icraft logs when --log_path is ignored; the logs of earlier runs there do not count.
    tailer.follow_dir(cwd / ".icraft" / "logs", "*.log", history=False)
    result = RunResult([str(a) for a in argv], cwd)
    tail: collections.deque[str] = collections.deque(maxlen=tail_lines)
    failures: list[str] = []

    echo = EchoFilter()

    def take(line: str, source: str) -> None:
        # Icraft prints each line to stdout and to its log file: pass one copy on.
        if not echo.fresh("output" if source.startswith("icraft ") else source, [line]):
            return
        level = line_level(line)
        result.error.feed(line)
        if is_failure_line(line) or level == "error":
            failures.append(line)
        if line.strip() and line not in tail:
            tail.append(line)
        on_line(line, level, source)

    start = time.monotonic()
    proc = subprocess.Popen(
        result.argv, cwd=str(cwd), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, start_new_session=True, env=env,
    )
    q: queue.Queue = queue.Queue()
    readers = [threading.Thread(target=_reader, args=(proc.stdout, "icraft stdout", q), daemon=True),
               threading.Thread(target=_reader, args=(proc.stderr, "icraft stderr", q), daemon=True)]
    for t in readers:
        t.start()

    def drain(block_s: float) -> None:
        try:
            source, raw = q.get(timeout=block_s)
        except queue.Empty:
            return
        take(decode_line(raw), source)
        while True:
            try:
                source, raw = q.get_nowait()
            except queue.Empty:
                return
            take(decode_line(raw), source)

    def follow_logs(final: bool = False) -> None:
        tailer.poll()
        if final:
            tailer.flush()
        for _label, path, lines in tailer.drain_files():
            for line in lines:
                take(_clean(line), str(path))

    try:
        while proc.poll() is None:
            drain(poll_s)
            follow_logs()
            if time.monotonic() - start > timeout_s:
                result.timed_out = True
                kill_group(proc, term_grace)
                break
            if cancelled():
                result.cancelled = True
                kill_group(proc, term_grace)
                break
    except BaseException:  # Ctrl-C (KeyboardInterrupt) or anything else: leave nothing behind
        kill_group(proc, term_grace)
        raise
    finally:
        result.returncode = proc.poll()
        for t in readers:
            t.join(timeout=2.0)
        if _group_alive(proc.pid):
            # Something the CLI started outlived it (or holds its pipes): do not leave it behind.
            result.stray_killed = not (result.timed_out or result.cancelled)
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            for t in readers:
                t.join(timeout=2.0)
        drain(0)
        try:
            follow_logs(final=True)
        finally:
            tailer.stop()
        result.seconds = time.monotonic() - start
        result.log_files = sorted(tailer.paths)
    seen = set(tail)
    result.tail = [f for f in failures[-10:] if f not in seen] + list(tail)
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
