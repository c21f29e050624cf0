"""`tdpu bugs list | add | set` (docs/spec.md §2): the bug book from the shell, same rules as the app.

The book is `<[paths].logs>/bugs_found.md` of `--config PATH` or ./tdpu.toml, as for `tdpu`
itself. Without either, `add` and `set` refuse (they would create or edit a stray book);
`list` still reads ./phase3_logs/bugs_found.md when one is there.

`--stage` takes a 发现阶段 value or a pipeline stage name (`export` -> 导出, from the stage
registry); `--status` a 状态 value or its English alias (`resolved` -> 已解决). The record holds
the template's values.

`set` reads and writes the record under the book's lock (`BugBook.set`), so two `set`s at the
same time apply one after the other. `list --json` is UTF-8 whatever the terminal's encoding;
bytes of the file that are not UTF-8 come out as JSON escapes (`\\udcXX`, the byte plus 0xDC00).

Exit status: 0 ok, 2 usage, configuration or validation error (the message names the field
and the value), 1 anything else (e.g. the file cannot be written).
"""

from __future__ import annotations

import argparse
import io
import json
import re
import sys
import unicodedata
from collections.abc import Mapping
from pathlib import Path
from typing import BinaryIO

from tdpu_tui.engine.core.artifacts import Artifacts
from tdpu_tui.engine.records.bugbook import (
    STAGE_VALUES, STATUS_ALIASES, STATUS_VALUES, BugBook, BugRecord, BugValidationError,
    parse_stage, parse_status,
)
from tdpu_tui.engine.core.config import load_config
from tdpu_tui.engine.core.errors import ConfigError, ExitCode, TdpuError
from tdpu_tui.engine.osutil.tail import decode_line

DEFAULT_CONFIG = Path("tdpu.toml")
# 错误信息 is an excerpt for a reader, not the log itself (the log stays where it is).
ERROR_FILE_CAP = 64 * 1024
DEFAULT_BUGS = Path("phase3_logs") / "bugs_found.md"
_OPTIONS = {"title": "--title", "stage": "--stage", "status": "--status", "error": "--error",
            "cause": "--cause", "fix": "--fix", "time": "--time", "number": "N"}


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    """Raises instead of exiting, so `main` returns the status."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise _UsageError(f"{self.format_usage().rstrip()}\n{self.prog}: error: {message}")


def _bug_stages() -> dict[str, str]:
    """Stage name -> 发现阶段, from the registry (imported only when a name is to be resolved:
    loading the stages takes a while)."""
    from tdpu_tui.engine.stages import bug_stages
    return bug_stages()


def _parser(bug_stages: Mapping[str, str] | None = None) -> _Parser:
    """The parser; `bug_stages` only for `--help`, which lists the stage names."""
    names = ", ".join(bug_stages) if bug_stages else "export, precheck, …"
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", metavar="PATH", default=argparse.SUPPRESS,
                        help="tdpu.toml to take the bug file's location from (default ./tdpu.toml)")

    def fields(p: argparse.ArgumentParser, required: bool) -> None:
        p.add_argument("--title", required=required, help="one line")
        p.add_argument("--stage", required=required, metavar="STAGE",
                       help=f"发现阶段: {' | '.join(STAGE_VALUES)}, or a pipeline stage name "
                            f"({names})")
        p.add_argument("--status", default="未解决" if required else None, metavar="STATUS",
                       help=f"状态: {' | '.join(STATUS_VALUES)}, or in English "
                            f"{' | '.join(STATUS_ALIASES)}" + (" (default 未解决)" if required else ""))
        err = p.add_mutually_exclusive_group()
        err.add_argument("--error", help="错误信息 (multi-line text is kept as a code block)")
        err.add_argument("--error-file", metavar="F", help="read 错误信息 from file F ('-' = stdin)")
        p.add_argument("--cause", help="根本原因")
        p.add_argument("--fix", help="解决方案")

    parser = _Parser(prog="tdpu bugs", parents=[common],
                     description="Bug records in phase3_logs/bugs_found.md.")
    sub = parser.add_subparsers(dest="command", metavar="{list,add,set}", parser_class=_Parser)
    p_list = sub.add_parser("list", parents=[common], help="show the records")
    p_list.add_argument("--json", action="store_true", help="print the records as JSON")
    fields(sub.add_parser("add", parents=[common], help="append a record"), required=True)
    p_set = sub.add_parser("set", parents=[common], help="change fields of record N")
    p_set.add_argument("number", type=int, metavar="N",
                       help="the record to change: its number, the N of '## Bug #N' (see tdpu bugs list)")
    fields(p_set, required=False)
    return parser


def bug_path(config: str | None, *, writing: bool = True) -> Path:
    """The bug file of the given config, or of ./tdpu.toml.

    Without a config file, a reader (`writing=False`) gets ./phase3_logs/bugs_found.md if that
    file exists; otherwise ConfigError names the config looked for and how to give one.
    """
    if config is None:
        if not DEFAULT_CONFIG.exists():
            fallback = DEFAULT_BUGS.resolve()
            if not writing and fallback.is_file():
                return fallback
            raise ConfigError(
                "configuration file not found; tdpu bugs takes the bug book's location from it "
                "(<[paths].logs>/bugs_found.md). Run it in the project directory or give "
                "--config PATH", file=DEFAULT_CONFIG.resolve())
        config = str(DEFAULT_CONFIG)
    return Artifacts.of(load_config(config)).bugs


def _width(text: str) -> int:
    return sum(2 if unicodedata.east_asian_width(ch) in "WF" else 1 for ch in text)


def _pad(text: str, width: int) -> str:
    return text + " " * (width - _width(text))


def format_table(records: list[BugRecord]) -> str:
    headers = ["#", "状态", "阶段", "发现时间", "标题"]
    rows = [[str(r.number), r.status, r.stage, r.time, r.title] for r in records]
    widths = [max(_width(row[i]) for row in [headers, *rows]) for i in range(len(headers))]
    lines = []
    for row in [headers, *rows]:
        cells = [_pad(c, w) for c, w in zip(row[:-1], widths)] + [row[-1]]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def _read_capped(fh: BinaryIO, cap: int) -> tuple[bytes, bool]:
    """At most `cap` bytes of `fh` (a pipe or /dev/zero never ends), and whether there was more."""
    data = fh.read(cap + 1)
    if len(data) <= cap:
        return data, False
    data = data[:cap]
    cut = data.rfind(b"\n")
    return (data[:cut] if cut > 0 else data), True


# Control characters other than tab and newline (NUL from /dev/zero or a binary file, a
# terminal's escape sequences) would make the user's markdown a binary file: shown as \xNN,
# a long run of one as `\xNN×count`.
_CONTROL_RE = re.compile("([\x00-\x08\x0b-\x1f\x7f])\\1*")


def _visible(text: str) -> str:
    def escape(m: re.Match[str]) -> str:
        code = f"\\x{ord(m.group(1)):02x}"
        n = len(m.group(0))
        return code * n if n <= 4 else f"{code}×{n}"
    return _CONTROL_RE.sub(escape, text.replace("\r\n", "\n"))


def _read_error(args: argparse.Namespace) -> str | None:
    if getattr(args, "error_file", None) is None:
        return None if args.error is None else _visible(args.error)
    name = "stdin" if args.error_file == "-" else args.error_file
    try:
        if args.error_file == "-":
            stdin = getattr(sys.stdin, "buffer", None)
            if stdin is None:    # a text-only stream stands in for stdin (an embedding program)
                stdin = io.BytesIO(sys.stdin.read(ERROR_FILE_CAP + 1).encode("utf-8", "surrogateescape"))
            data, cut = _read_capped(stdin, ERROR_FILE_CAP)
        else:
            with open(args.error_file, "rb") as fh:
                data, cut = _read_capped(fh, ERROR_FILE_CAP)
    except OSError as exc:
        raise _UsageError(f"tdpu bugs: --error-file: cannot read {name}: {exc.strerror or exc}") from None
    # Icraft logs from the Windows host are GBK, in part: decoded line by line as the app does.
    text = _visible("\n".join(decode_line(line.rstrip(b"\r"))
                               for line in data.split(b"\n")).strip("\r\n"))
    if cut:
        note = (f"[cut: {name} holds more than {ERROR_FILE_CAP // 1024} KiB; the first "
                f"{len(data)} bytes are kept]")
        print(f"tdpu bugs: --error-file: {note}", file=sys.stderr)
        text = f"{text}\n{note}"
    return text


_SURROGATE_RE = re.compile("[\\ud800-\\udfff]")


def _write_out(text: str) -> None:
    """`text` + newline on stdout as UTF-8, whatever the stream's encoding. Bytes of the file
    that are not UTF-8 (held as lone surrogates) must already be escaped."""
    data = (text + "\n").encode("utf-8")
    buffer = getattr(sys.stdout, "buffer", None)
    if buffer is None:  # a text-only stream (tests, embedding)
        sys.stdout.write(data.decode("utf-8"))
        return
    sys.stdout.flush()
    buffer.write(data)
    buffer.flush()


def records_json(records: list[BugRecord]) -> str:
    """The records as JSON text: Chinese as is, undecodable bytes as `\\udcXX` escapes."""
    text = json.dumps([r.to_dict() for r in records], ensure_ascii=False, indent=2)
    return _SURROGATE_RE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def _print_table(text: str) -> None:
    """The table in the terminal's encoding; what it cannot show is escaped, never an error."""
    text = _SURROGATE_RE.sub(lambda m: f"\\x{ord(m.group()) - 0xDC00:02x}", text)
    encoding = getattr(sys.stdout, "encoding", None) or "utf-8"
    print(text.encode(encoding, "backslashreplace").decode(encoding, "replace"))


def _say(messages: list[str]) -> None:
    for m in messages:
        print(f"tdpu bugs: {m}", file=sys.stderr)


def _stage(value: str) -> str:
    if value.strip() in STAGE_VALUES:
        return value.strip()
    return parse_stage(value, _bug_stages())


def _run(args: argparse.Namespace, path: Path) -> int:
    book = BugBook(path)
    if args.command == "list":
        records = book.load()
        if args.json:
            _write_out(records_json(records))
        elif records:
            _print_table(format_table(records))
        else:
            print(f"no bug records in {path}")
        return ExitCode.OK
    error = _read_error(args)
    stage = None if args.stage is None else _stage(args.stage)
    status = None if args.status is None else parse_status(args.status)
    if args.command == "add":
        rec = book.add(args.title, stage, error=error or "", cause=args.cause or "",
                       fix=args.fix or "", status=status)
        _say(book.messages)
        print(f"Bug #{rec.number} added to {path}")
        return ExitCode.OK
    changes = {"title": args.title, "stage": stage, "status": status, "error": error,
               "cause": args.cause, "fix": args.fix}
    changes = {k: v for k, v in changes.items() if v is not None}
    if not changes:
        raise _UsageError("tdpu bugs set: nothing to change (give --title, --stage, --status, "
                          "--error, --error-file, --cause or --fix)")
    rec = book.set(args.number, **changes)
    _say(book.messages)
    print(f"Bug #{rec.number} updated in {path}")
    return ExitCode.OK


def main(argv: list[str]) -> int:
    """`tdpu bugs ...`; `argv` is everything after `bugs`."""
    wants_help = any(a in ("-h", "--help") for a in argv)
    parser = _parser(_bug_stages() if wants_help else None)
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            raise _UsageError(f"{parser.format_usage().rstrip()}\n"
                              "tdpu bugs: error: expected a command: list, add or set")
        config = getattr(args, "config", None)
        path = bug_path(config, writing=args.command != "list")
        if config is None and not DEFAULT_CONFIG.exists():
            print(f"tdpu bugs: no {DEFAULT_CONFIG} here; reading {path}", file=sys.stderr)
        return _run(args, path)
    except SystemExit as exc:  # --help
        return int(exc.code or 0)
    except _UsageError as exc:
        print(exc, file=sys.stderr)
        return ExitCode.USAGE
    except BugValidationError as exc:
        option = _OPTIONS.get(exc.field)
        print(f"tdpu bugs: {exc}" + (f" (option {option})" if option else ""), file=sys.stderr)
        return ExitCode.USAGE
    except ConfigError as exc:
        print(f"tdpu bugs: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    except (TdpuError, OSError) as exc:
        print(f"tdpu bugs: {exc}", file=sys.stderr)
        return ExitCode.FAILURE

