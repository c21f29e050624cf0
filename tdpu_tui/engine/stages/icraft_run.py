"""One Icraft command run from a stage: its log folder, the hand-run TOML, the run itself,
and its record in the compile log (parse, optimize and simulate share this)."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from tdpu_tui.engine.core.errors import Cancelled, StageFailed, TdpuError
from tdpu_tui.engine.core.stage import Skip, StageContext
from tdpu_tui.engine.icraft import driver as ic
from tdpu_tui.engine.icraft import wsl
from tdpu_tui.engine.records.compile_log import StageRecord


def _files(*paths: Path) -> list[Path]:
    return [p for p in paths if p.exists()]



def prepare_log_dir(path: Path) -> Path:
    """A fresh log folder for this run (Icraft rewrites its logs; old ones would mislead)."""
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def run_component(ctx: StageContext, exe: Path, argv: list[str], outputs: list[Path],
                  log_dir: Path, record: StageRecord) -> ic.RunResult:
    """Run one Icraft command, record it, and fail the stage if Icraft failed."""
    cfg = ctx.config
    cwd = ctx.paths.icraft_dir
    windows = None
    shown = argv
    if wsl.uses_interop(exe):   # Icraft's Windows build from WSL: paths as Windows sees them
        argv = wsl.windows_argv(argv)
        windows = wsl.InteropTree(exe, argv)
        shown = wsl.shown_argv(argv)
        record.notes.append(f"run through WSL interop from `{exe}`; the command as Windows "
                            "saw it is below")
    ctx.log("$ " + " ".join(shown))
    for out in outputs:     # so a stale output from an earlier run is never taken for this one's
        out.unlink(missing_ok=True)
    record.command, record.cwd, record.started = shown, cwd, time.time()
    record.windows = windows is not None
    record.root = cfg.base_dir
    lines = 0

    def on_line(line: str, level: str, source: str) -> None:
        nonlocal lines
        lines += 1
        ctx.log(line, level, source)
        if lines % 50 == 0 and not ctx.cancelled:   # cancellation is the driver's to handle
            ctx.progress(lines, None, f"{lines} log lines")

    try:
        res = ic.run_icraft(argv, cwd=cwd, log_dirs=[log_dir], timeout_s=cfg.icraft.timeout_s,
                            on_line=on_line, cancelled=lambda: ctx.cancelled, windows=windows)
    except KeyboardInterrupt:
        record.status = "cancelled"
        record.summary = "interrupted (Ctrl-C); the icraft process tree was ended"
        record.seconds = time.time() - record.started
        record.write(ctx.paths.compile_log)
        raise
    except OSError as exc:  # found but cannot be started (bad interpreter line, no permission)
        record.status, record.summary = "failed", f"cannot start {argv[0]}: {exc}"
        record.write(ctx.paths.compile_log)
        where = cfg.file or "the configuration"
        raise StageFailed(f"cannot start the Icraft CLI {argv[0]} ([icraft].bin in {where}): "
                          f"{exc}") from None
    copied = ic.copy_logs(res.log_files, log_dir)
    copied += sorted(log_dir.rglob("*_precheck.csv"))   # icraft parse's own precheck
    if res.stray_killed:
        ctx.log("Icraft left processes behind; they were killed", "warning")
    missing = [p for p in outputs if not p.exists()]
    ok = res.ok and not missing
    record.seconds = res.seconds
    record.exit_status = res.returncode
    record.error_code = res.error_code
    record.error_text = ic.explain_code(res.error_code)
    record.log_tail = res.tail
    record.status = "ok" if ok else "cancelled" if res.cancelled else "failed"
    record.files = _files(*outputs) + copied
    if res.ok and missing:
        record.summary = ("Icraft reported success but did not write "
                          + ", ".join(p.name for p in missing))
    elif not res.ok:
        record.summary = res.reason()
    record.write(ctx.paths.compile_log)
    ctx.artifact("icraft_compile_log", ctx.paths.compile_log)
    ctx.metric("seconds", round(res.seconds, 3))
    ctx.metric("exit_status", res.returncode)
    if res.error_code is not None:
        ctx.metric("error_code", res.error_code)
    if res.cancelled:
        raise Cancelled(f"stage '{ctx.stage}' cancelled (icraft stopped)")
    if not ok:
        raise StageFailed(f"icraft {argv[1]} failed: {record.summary} "
                          f"(command and log in {ctx.paths.compile_log})")
    return res


def ftmp_path(ctx: StageContext, input_name: str) -> Path:
    return ctx.paths.icraft_dir / "inputs" / f"{input_name}.ftmp"


def require_cli(ctx: StageContext, hint: str = "", notes: list[str] | None = None) -> Path:
    """The Icraft CLI, else `Skip` with the reason (and `hint`: what to do instead), recorded
    in the stage's section of the compile log (with `notes` below it)."""
    exe = ic.find_cli(ctx.config)
    if exe is None:
        reason = ic.missing_cli_reason(ctx.config) + (f"; {hint}" if hint else "")
        try:
            StageRecord(ctx.stage, "skipped", summary=reason,
                        notes=list(notes or []), root=ctx.config.base_dir).write(ctx.paths.compile_log)
        except (OSError, TdpuError) as exc:  # a log that cannot be written does not turn a skip
            ctx.log(f"{ctx.paths.compile_log}: not updated ({getattr(exc, 'strerror', None) or exc})",
                    "warning")
        raise Skip(reason)
    return exe
