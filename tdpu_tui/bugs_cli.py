"""`tdpu bugs list | add | set` (SPEC §2): the bug book from the shell, same rules as the app.

The book is `<[paths].logs>/bugs_found.md` of `--config PATH` or ./tdpu.toml, as for `tdpu`
itself. Without either, `add` and `set` refuse (they would create or edit a stray book);
`list` still reads ./phase3_logs/bugs_found.md when one is there.

`--stage` takes a 发现阶段 value or a pipeline stage name (`export` -> 导出, see
`bugbook.parse_stage`); the record holds the 发现阶段 value.

Exit status: 0 ok, 2 usage, configuration or validation error (the message names the field
and the value), 1 anything else (e.g. the file cannot be written).
"""

from __future__ import annotations

import argparse
import json
import sys
import unicodedata
from pathlib import Path

from tdpu_tui.engine.core.artifacts import Artifacts
from tdpu_tui.engine.records.bugbook import (
    STAGE_LABELS, STAGE_VALUES, STATUS_VALUES, BugBook, BugRecord, BugValidationError, parse_stage,
)
from tdpu_tui.engine.core.config import load_config
from tdpu_tui.engine.core.errors import ConfigError, ExitCode, TdpuError
from tdpu_tui.engine.osutil.tail import decode_line

DEFAULT_CONFIG = Path("tdpu.toml")
DEFAULT_BUGS = Path("phase3_logs") / "bugs_found.md"
_OPTIONS = {"title": "--title", "stage": "--stage", "status": "--status", "error": "--error",
            "cause": "--cause", "fix": "--fix", "time": "--time", "number": "N"}


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    """Raises instead of exiting, so `main` returns the status."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise _UsageError(f"{self.format_usage().rstrip()}\n{self.prog}: error: {message}")


def _parser() -> _Parser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", metavar="PATH", default=argparse.SUPPRESS,
                        help="tdpu.toml to take the bug file's location from (default ./tdpu.toml)")

    def fields(p: argparse.ArgumentParser, required: bool) -> None:
        p.add_argument("--title", required=required, help="one line")
        p.add_argument("--stage", required=required, metavar="STAGE",
                       help=f"发现阶段: {' | '.join(STAGE_VALUES)}, or a pipeline stage name "
                            f"({', '.join(STAGE_LABELS)})")
        p.add_argument("--status", default="未解决" if required else None, metavar="STATUS",
                       help=f"状态: {' | '.join(STATUS_VALUES)}" + (" (default 未解决)" if required else ""))
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


def _read_error(args: argparse.Namespace) -> str | None:
    if getattr(args, "error_file", None) is None:
        return args.error
    if args.error_file == "-":
        text = sys.stdin.read()
    else:
        try:
            data = Path(args.error_file).read_bytes()
        except OSError as exc:
            raise _UsageError(f"tdpu bugs: --error-file: cannot read {args.error_file}: {exc.strerror}") from None
        # Icraft logs from the Windows host are GBK, in part: decoded line by line as the app does.
        text = "\n".join(decode_line(line.rstrip(b"\r")) for line in data.split(b"\n"))
    return text.strip("\r\n")


def _say(messages: list[str]) -> None:
    for m in messages:
        print(f"tdpu bugs: {m}", file=sys.stderr)


def _run(args: argparse.Namespace, path: Path) -> int:
    book = BugBook(path)
    if args.command == "list":
        records = book.load()
        if args.json:
            print(json.dumps([r.to_dict() for r in records], ensure_ascii=False, indent=2))
        elif records:
            print(format_table(records))
        else:
            print(f"no bug records in {path}")
        return ExitCode.OK
    error = _read_error(args)
    stage = None if args.stage is None else parse_stage(args.stage)
    if args.command == "add":
        rec = book.add(args.title, stage, error=error or "", cause=args.cause or "",
                       fix=args.fix or "", status=args.status)
        _say(book.messages)
        print(f"Bug #{rec.number} added to {path}")
        return ExitCode.OK
    changes = {"title": args.title, "stage": stage, "status": args.status, "error": error,
               "cause": args.cause, "fix": args.fix}
    changes = {k: v for k, v in changes.items() if v is not None}
    if not changes:
        raise _UsageError("tdpu bugs set: nothing to change (give --title, --stage, --status, "
                          "--error, --error-file, --cause or --fix)")
    book.load()
    rec = book.update(args.number, **changes)
    _say(book.messages)
    print(f"Bug #{rec.number} updated in {path}")
    return ExitCode.OK


def main(argv: list[str]) -> int:
    """`tdpu bugs ...`; `argv` is everything after `bugs`."""
    parser = _parser()
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

