"""Command line (docs/spec.md §2): the interactive session, `--batch`, and `tdpu bugs …`."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

from tdpu_tui.engine.core.errors import ConfigError, ExitCode


# Commands after the global options: name -> (module with `main(argv)`, one line of help).
SUBCOMMANDS = {
    "bugs": ("tdpu_tui.bugs_cli", "bug records in phase3_logs/bugs_found.md (tdpu bugs {list,add,set} --help)"),
    "icraft": ("tdpu_tui.icraft_cli", "Icraft on another machine: the hand-off bundle and its results "
               "(tdpu icraft {bundle,import} --help)"),
}
# Options of the pipeline; before a command only --config applies.
GLOBAL_OPTIONS = ("--config",)
EXIT_CODES = {
    ExitCode.OK: "every stage ok or skipped",
    ExitCode.FAILURE: "a stage failed",
    ExitCode.USAGE: "usage or configuration error (the message names the key and the file)",
    ExitCode.INTERRUPT: "interrupted (Ctrl-C); no half-written artifact is left",
}


def _epilog() -> str:
    from tdpu_tui.engine.stages import NAMES

    width = max(len(name) for name in SUBCOMMANDS)
    lines = ["commands (global options such as --config go before the command):"]
    lines += [f"  tdpu [--config PATH] {name:<{width}}  {about}" for name, (_, about) in SUBCOMMANDS.items()]
    lines += ["", "stages, in run order (--stage NAME):", "  " + ", ".join(NAMES), "", "exit status:"]
    lines += [f"  {int(code):<3}  {why}" for code, why in EXIT_CODES.items()]
    return "\n".join(lines)


class _Parser(argparse.ArgumentParser):
    def format_help(self) -> str:
        # The stage registry is imported only when help is shown, not on every start.
        self.epilog = _epilog()
        return super().format_help()


def _parser() -> argparse.ArgumentParser:
    from tdpu_tui import __version__

    p = _Parser(
        prog="tdpu",
        description="BitNet b1.58 -> ONNX -> Icraft, MatMul -> BitLinear: the TDPU Phase 3 workbench. "
                    "Without --batch: the interactive session.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        # Abbreviated options would make `tdpu --conf P bugs` ambiguous to split.
        allow_abbrev=False,
    )
    p.add_argument("--version", action="version", version=f"tdpu {__version__}")
    p.add_argument("--config", default=None, metavar="PATH",
                   help="configuration file (default: ./tdpu.toml)")
    p.add_argument("--batch", action="store_true", help="run the pipeline headless")
    p.add_argument("--stage", action="append", metavar="NAME",
                   help="run this stage (repeatable; default: every stage in order, names below)")
    p.add_argument("--model", metavar="PATH",
                   help="checkpoint directory (overrides [model].source), or 'synthetic'")
    p.add_argument("--json", metavar="PATH", help="write a JSON summary of the run")
    p.add_argument("--no-bug-drafts", action="store_true",
                   help="do not draft a record in bugs_found.md when a stage fails")
    return p


def split_command(argv: list[str], parser: argparse.ArgumentParser) -> tuple[list[str], str | None, list[str]]:
    """(global options, command or None, the command's own arguments).

    The command is the first word that is not an option or an option's value, so
    `tdpu --config P bugs list` and `tdpu bugs list --config P` both reach `tdpu bugs`.
    """
    takes_value = {opt for action in parser._actions if action.nargs != 0
                   for opt in action.option_strings}
    i = 0
    while i < len(argv):
        word = argv[i]
        if word == "--":
            break
        if word in SUBCOMMANDS:
            return argv[:i], word, argv[i + 1:]
        if not word.startswith("-"):
            break
        i += 2 if word in takes_value else 1
    return argv, None, []


def _run_command(parser: argparse.ArgumentParser, pre: list[str], command: str, rest: list[str]) -> int:
    args = parser.parse_args(pre)
    given = [f"--{k.replace('_', '-')}" for k, v in vars(args).items()
             if v not in (None, False) and f"--{k.replace('_', '-')}" not in GLOBAL_OPTIONS]
    if given:
        print(f"tdpu: error: {given[0]} applies to the pipeline, not to `tdpu {command}` "
              f"(before a command only {', '.join(GLOBAL_OPTIONS)} applies)", file=sys.stderr)
        return ExitCode.USAGE
    forwarded = (["--config", args.config] if args.config is not None else []) + rest
    module = importlib.import_module(SUBCOMMANDS[command][0])
    return module.main(forwarded)


def _writable_dir(directory: Path) -> bool:
    """True when `directory` exists and is writable, or could be created (checked before a
    long run rather than after it)."""
    while not directory.exists():
        if directory.parent == directory:
            return False
        directory = directory.parent
    return directory.is_dir() and os.access(directory, os.W_OK | os.X_OK)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    pre, command, rest = split_command(argv, parser)
    try:
        if command is not None:
            return _run_command(parser, pre, command, rest)
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits 2 on usage errors, 0 on --help and --version
        return int(exc.code or 0)
    if not args.batch:
        for flag in ("stage", "json", "no_bug_drafts"):
            if getattr(args, flag):
                parser.print_usage(sys.stderr)
                print(f"tdpu: error: --{flag.replace('_', '-')} needs --batch", file=sys.stderr)
                return ExitCode.USAGE
    if args.model and args.model != "synthetic":
        model = Path(args.model)
        missing = [] if not model.is_dir() else [
            n for n, ok in (("config.json", (model / "config.json").is_file()),
                            ("model.safetensors (or model.safetensors.index.json)",
                             (model / "model.safetensors").is_file()
                             or (model / "model.safetensors.index.json").is_file())) if not ok]
        if not model.is_dir() or missing:
            why = "no such checkpoint directory" if not model.is_dir() else f"no {' and no '.join(missing)} in it"
            print(f"tdpu: error: --model {args.model}: {why} (expected a Hugging Face checkpoint "
                  "directory: config.json + model.safetensors, or 'synthetic')", file=sys.stderr)
            return ExitCode.USAGE
    if args.json and Path(args.json).is_dir():
        print(f"tdpu: error: --json {args.json}: is a directory (expected a file name)",
              file=sys.stderr)
        return ExitCode.USAGE
    if args.json and not _writable_dir(Path(args.json).resolve().parent):
        print(f"tdpu: error: --json {args.json}: cannot write in {Path(args.json).resolve().parent}",
              file=sys.stderr)
        return ExitCode.USAGE
    try:
        from tdpu_tui.engine.core.config import load_config
        cfg = load_config(args.config if args.config is not None else "tdpu.toml")
        if args.model:
            cfg.model.source = "synthetic" if args.model == "synthetic" else str(Path(args.model).resolve())
    except ConfigError as exc:
        print(f"tdpu: configuration error: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    if args.batch:
        from tdpu_tui.batch import run_batch
        return run_batch(cfg, args.stage, json_path=args.json, bug_drafts=not args.no_bug_drafts)
    from tdpu_tui.app import run_app
    return run_app(cfg)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
