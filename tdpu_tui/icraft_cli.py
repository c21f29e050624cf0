"""`tdpu icraft bundle [--zip PATH]` and `tdpu icraft import PATH` (see `docs/icraft.md`).

Progress goes to stderr, results to stdout; exit status as `--batch`: 0 ok, 1 a command failed
on the Icraft host, 2 a usage or configuration error (or a bundle that cannot be imported),
130 interrupted.
"""

from __future__ import annotations

import argparse
import sys
import threading
from pathlib import Path

from tdpu_tui.engine.core.errors import ConfigError, ExitCode, TdpuError


def _parser() -> argparse.ArgumentParser:
    # --config before or after the command (`tdpu --config P icraft import X` forwards it
    # first); SUPPRESS so the subcommand's default does not overwrite the one given before it.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", default=argparse.SUPPRESS, metavar="PATH",
                        help="configuration file (default: ./tdpu.toml)")
    p = argparse.ArgumentParser(prog="tdpu icraft", parents=[common],
                                description="Icraft on another machine: the hand-off bundle and "
                                            "its results.")
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("bundle", parents=[common],
                       help="write the hand-off folder for the Icraft host (or a zip)")
    b.add_argument("--zip", metavar="PATH", help="also write the bundle as this zip file")
    i = sub.add_parser("import", parents=[common],
                       help="read a bundle folder or zip after Icraft ran in it")
    i.add_argument("path", metavar="PATH")
    i.add_argument("--no-bug-drafts", action="store_true",
                   help="do not draft a record in bugs_found.md for a failure")
    return p


def _printer():
    from tdpu_tui.batch import ProgressPrinter
    return ProgressPrinter()


def _bundle(cfg, zip_path: str | None) -> int:
    from tdpu_tui.engine.core.stage import StageContext
    from tdpu_tui.engine.icraft import bundle as bd
    from tdpu_tui.engine.osutil.files import human_bytes
    from tdpu_tui.engine.stages.handoff import handoff_hint, write_handoff

    ctx = StageContext(cfg, "bundle", _printer(), threading.Event())
    try:
        bundle = write_handoff(ctx)
        if zip_path:
            dest = Path(zip_path).expanduser().resolve()
            size = bd.write_zip(bundle.folder, dest)
            print(f"{dest}: {human_bytes(size)} zip of {bundle.folder}")
    except TdpuError as exc:
        print(f"tdpu icraft bundle: {exc}", file=sys.stderr)
        return ExitCode.FAILURE
    except OSError as exc:
        print(f"tdpu icraft bundle: {exc.filename or ''}: {exc.strerror or exc}", file=sys.stderr)
        return ExitCode.FAILURE
    finally:
        ctx.close()
    print(f"{bundle.folder}")
    for f in bundle.files:
        print(f"  {f.describe()}")
    if bundle.input_missing:
        print(f"  no input: {bundle.input_missing}")
    print(handoff_hint(bundle))
    return ExitCode.OK


def _import(cfg, path: str, bug_drafts: bool) -> int:
    from tdpu_tui.batch import summary_table
    from tdpu_tui.engine.stages.handoff import import_bundle

    report = import_bundle(cfg, path, _printer(), bug_drafts=bug_drafts)
    if report.refused:
        print(f"tdpu icraft import: refused: {report.refused}", file=sys.stderr)
        return report.exit_code
    print(f"imported {report.root}")
    print(summary_table(report.results))
    return report.exit_code


def main(argv: list[str]) -> int:
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    try:
        from tdpu_tui.engine.core.config import load_config
        cfg = load_config(getattr(args, "config", "tdpu.toml"))
    except ConfigError as exc:
        print(f"tdpu: configuration error: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    try:
        if args.command == "bundle":
            return _bundle(cfg, args.zip)
        return _import(cfg, args.path, not args.no_bug_drafts)
    except KeyboardInterrupt:
        print("tdpu: interrupted", file=sys.stderr)
        return ExitCode.INTERRUPT
