"""Command line (SPEC §2): the interactive session, `--batch`, and `tdpu bugs …`."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from tdpu_tui.engine.core.errors import ConfigError, ExitCode


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tdpu",
        description="BitNet b1.58 -> ONNX -> Icraft, MatMul -> BitLinear: the TDPU Phase 3 workbench.",
        epilog="Bug records: tdpu bugs {list,add,set} --help",
    )
    p.add_argument("--config", default="tdpu.toml", metavar="PATH",
                   help="configuration file (default: ./tdpu.toml)")
    p.add_argument("--batch", action="store_true", help="run the pipeline headless")
    p.add_argument("--stage", action="append", metavar="NAME",
                   help="run this stage (repeatable; default: every stage in order)")
    p.add_argument("--model", metavar="PATH",
                   help="checkpoint directory (overrides [model].source), or 'synthetic'")
    p.add_argument("--json", metavar="PATH", help="write a JSON summary of the run")
    p.add_argument("--no-bug-drafts", action="store_true",
                   help="do not draft a record in bugs_found.md when a stage fails")
    return p


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
    if argv and argv[0] == "bugs":
        from tdpu_tui.bugs_cli import main as bugs_main
        return bugs_main(argv[1:])
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits 2 on usage errors, 0 on --help
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
    if args.json and not _writable_dir(Path(args.json).resolve().parent):
        print(f"tdpu: error: --json {args.json}: cannot write in {Path(args.json).resolve().parent}",
              file=sys.stderr)
        return ExitCode.USAGE
    try:
        from tdpu_tui.engine.core.config import load_config
        cfg = load_config(args.config)
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
