"""The hand-off bundle: `models/output/icraft_output/` as a folder to copy to the Windows host.

The compile-capable Icraft runs on Windows; the host tdpu runs on often has only the runtime
build. The bundle holds everything `icraft parse → optimize → run` needs there, by paths
relative to the folder (see `docs/icraft.md`):

    {net}.toml            [parse], [optimize], [run] (the run dumps the output feature map)
    graph/                the exported graph and its external data (hard links, else copies)
    inputs/{input}.ftmp   the seeded input, raw float32
    run_icraft.ps1        PowerShell: parse → optimize → run, stops at the first failure
    run_icraft.sh         the same for a POSIX shell; the command from $ICRAFT, else `icraft`
    bundle.json           the export it was made from, tdpu's version, the input
    logs/                 Icraft's logs and each command's console output, once it has run

`bundle.json` is what `tdpu icraft import` checks a bundle against when it comes back.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tdpu_tui.engine.core.config import Config
from tdpu_tui.engine.core.errors import StageFailed
from tdpu_tui.engine.core.manifests import export_identity
from tdpu_tui.engine.icraft import driver as ic
from tdpu_tui.engine.osutil.files import atomic_write_bytes, human_bytes

FORMAT = "tdpu-icraft-bundle/1"
BUNDLE_JSON = "bundle.json"
GRAPH_DIR = "graph"
INPUT_DIR = "inputs"
COMMANDS = ("parse", "optimize", "run")
# The log folder of each command as the TOML names it (the run is tdpu's `simulate`).
LOG_DIRS = {"parse": "logs/parse", "optimize": "logs/optimize", "run": "logs/simulate"}
# A failure line as `driver.is_failure_line` reads it (case-insensitive: `[F]`, `[E]`, `[error]`,
# `[fatal]`, `[critical]`, bare or after a timestamp and a logger name; or an error code line),
# for grep -Ei (POSIX ERE) and for PowerShell's Select-String (.NET).
# In the shell script $ESC and $CR stand for the escape and carriage-return characters: a line
# may start with terminal colour codes, or after a progress bar redrawn with CR.
FAILURE_PATTERN = (r"(^|$CR)[[:space:]]*($ESC\[[0-9;]*[A-Za-z])*"
                   r"(\[[^][]*\][[:space:]]*-?[[:space:]]*($ESC\[[0-9;]*[A-Za-z])*){0,2}"
                   r"\[(f|e|error|fatal|critical)\]|错误码")
FAILURE_PATTERN_PS = (r"(^|\r)[\s\ufeff]*(\x1b\[[0-9;]*[A-Za-z])*"
                      r"(\[[^\]\[]*\]\s*-?\s*(\x1b\[[0-9;]*[A-Za-z])*){0,2}"
                      r"\[(f|e|error|fatal|critical)\]|错误码")


@dataclass
class PlacedFile:
    path: Path
    bytes: int
    how: str            # "hard link" | "copy" | "written"

    def describe(self) -> str:
        return f"{self.path.name}: {self.how}, {human_bytes(self.bytes)} ({self.bytes} bytes)"


@dataclass
class Bundle:
    folder: Path
    toml: Path
    graph: Path
    files: list[PlacedFile] = field(default_factory=list)
    input_file: Path | None = None
    input_missing: str = ""

    def scripts(self) -> tuple[Path, Path]:
        return self.folder / "run_icraft.ps1", self.folder / "run_icraft.sh"


def describe_identity(ident: dict) -> str:
    parts = [f"exported {ident.get('exported_at') or 'at an unknown time'}"]
    if ident.get("profile"):
        parts.append(f"profile {ident['profile']}")
    if ident.get("checkpoint"):
        parts.append(f"from {ident['checkpoint']}")
    sizes = [f"{k.removesuffix(' bytes')} {v} B" for k, v in ident.items() if k.endswith(" bytes")]
    return ", ".join(parts + sizes)


def external_locations(graph: Path) -> list[str]:
    """The external-data files the graph names, each confined to the graph's folder."""
    import onnx
    from onnx.external_data_helper import _get_all_tensors

    model = onnx.load(str(graph), load_external_data=False)
    found: list[str] = []
    for t in _get_all_tensors(model):
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue
        loc = next((e.value for e in t.external_data if e.key == "location"), "")
        if not loc:
            continue
        target = (graph.parent / loc).resolve()
        if (Path(loc).is_absolute() or ":" in loc
                or not target.is_relative_to(graph.parent.resolve())):
            raise StageFailed(f"{graph}: tensor '{t.name}' keeps its data at {loc!r}, outside the "
                              f"graph's folder: the bundle cannot carry it")
        if loc not in found:
            found.append(loc)
    return found


def place(src: Path, dst: Path) -> PlacedFile:
    """`dst` as a hard link to `src` where the file system allows, else a copy."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    size = src.stat().st_size
    try:
        if dst.exists():
            if os.path.samefile(src, dst):
                return PlacedFile(dst, size, "hard link")
            st, sst = dst.stat(), src.stat()
            # A copy made after the source last changed is still that source (a 2B4T graph is
            # not copied again on every parse).
            if st.st_size == size and st.st_mtime >= sst.st_mtime:
                return PlacedFile(dst, size, "copy")
    except OSError:
        pass
    dst.unlink(missing_ok=True)
    try:
        os.link(src, dst)
        return PlacedFile(dst, size, "hard link")
    except OSError:       # another file system, or one without hard links
        import shutil
        tmp = dst.with_name(f".{dst.name}.part")
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
        return PlacedFile(dst, size, "copy")


def _stale(net: str) -> list[str]:
    """What an earlier run in the folder left that this run would be taken for: the outputs
    of parse and optimize (the later command would run on them after a failure)."""
    return [p.name for st in ("parsed", "optimized") for p in ic.parsed_files(Path("."), net, st)]


def _sh_script(net: str) -> str:
    toml = f"{net}.toml"
    stale = " ".join(_stale(net))
    return f"""#!/bin/sh
# Written by tdpu: icraft parse -> optimize -> run with {toml}, from this script's folder.
# The Icraft command is $ICRAFT when set, else `icraft` on PATH. Stops at the first failure
# (a non-zero exit status, or an [F]/[E] line or error code in its output or its log files:
# Icraft has been seen to exit 0 after a component failed). Each command's output and exit
# status are kept in logs/ beside Icraft's own logs (the logs and outputs of an earlier run
# here are removed first); bring the folder back with `tdpu icraft import`.
ICRAFT="${{ICRAFT:-icraft}}"
case "$ICRAFT" in          # a relative path names a file from where the script was called
    /*) ;;
    */*) if [ -e "$ICRAFT" ]; then ICRAFT="$(pwd)/$ICRAFT"; fi ;;
esac
cd "$(dirname "$0")" || exit 1
ESC=$(printf '\\033')
CR=$(printf '\\r')
PATTERN="{FAILURE_PATTERN}"
rm -rf {' '.join(LOG_DIRS.values())} .icraft/logs
rm -f logs/*.exit logs/*.console.log {stale}
mkdir -p logs
for cmd in {' '.join(COMMANDS)}; do
    case "$cmd" in run) dir={LOG_DIRS["run"]} ;; *) dir="logs/$cmd" ;; esac
    echo "== $ICRAFT $cmd {toml}"
    {{
        # a program's path (spaces and all), else a command line (quotes in it honoured)
        if [ -f "$ICRAFT" ] && [ -x "$ICRAFT" ]; then "$ICRAFT" "$cmd" "{toml}" 2>&1
        else eval "$ICRAFT \\"\\$cmd\\" \\"{toml}\\"" 2>&1; fi
        echo $? > "logs/$cmd.exit"
    }} < /dev/null | tee "logs/$cmd.console.log"
    status=$(cat "logs/$cmd.exit" 2>/dev/null || echo 1)
    failed=$(find "$dir" .icraft/logs -type f -name '*.log' -exec grep -Eil "$PATTERN" {{}} + 2>/dev/null)
    if [ "$status" != 0 ] || grep -Eiq "$PATTERN" "logs/$cmd.console.log" || [ -n "$failed" ]; then
        echo "icraft $cmd failed (exit status $status); see logs/" >&2
        exit 1
    fi
done
echo "done: bring this folder back and run: tdpu icraft import <this folder>"
"""


def _ps1_script(net: str) -> str:
    toml = f"{net}.toml"
    stale = ", ".join(f"'{n}'" for n in _stale(net))
    dirs = ", ".join(f"'{d}'" for d in (*(v.replace("/", "\\") for v in LOG_DIRS.values()),
                                         ".icraft\\logs"))
    lines = [
        f"# Written by tdpu: icraft parse -> optimize -> run with {toml}, from this script's folder.",
        "# Run: powershell -ExecutionPolicy Bypass -File run_icraft.ps1",
        "# The Icraft command is $env:ICRAFT when set, else `icraft` on PATH. Stops at the first",
        "# failure (a non-zero exit status, or an [F]/[E] line or error code in its output or its",
        "# log files). Each command's output and exit status are kept in logs\\ beside Icraft's",
        "# own logs (those of an earlier run here are removed first); bring the folder back with",
        "# `tdpu icraft import`.",
        "$icraft = if ($env:ICRAFT) { $env:ICRAFT } else { 'icraft' }",
        "# A relative path names a file from where the script was called.",
        "if ($icraft -match '[\\\\/]' -and (Test-Path -LiteralPath $icraft)) {",
        "    $icraft = (Resolve-Path -LiteralPath $icraft).Path",
        "}",
        "Set-Location -LiteralPath $PSScriptRoot",
        f"$pattern = '{FAILURE_PATTERN_PS}'",
        f"foreach ($d in @({dirs})) {{",
        "    if (Test-Path -LiteralPath $d) { Remove-Item -LiteralPath $d -Recurse -Force }",
        "}",
        "Remove-Item -Path 'logs\\*.exit', 'logs\\*.console.log' -ErrorAction SilentlyContinue",
        f"foreach ($f in @({stale})) {{ Remove-Item -LiteralPath $f -ErrorAction SilentlyContinue }}",
        "New-Item -ItemType Directory -Force -Path logs | Out-Null",
        "foreach ($cmd in @(" + ", ".join(f"'{c}'" for c in COMMANDS) + ")) {",
        f"    $dir = if ($cmd -eq 'run') {{ '{LOG_DIRS['run'].replace('/', chr(92))}' }} else {{ \"logs\\$cmd\" }}",
        f"    Write-Host \"== $icraft $cmd {toml}\"",
        "    $out = \"logs\\$cmd.console.log\"",
        f"    & $icraft $cmd '{toml}' 2>&1 | ForEach-Object {{ \"$_\" }} | Tee-Object -FilePath $out",
        "    $code = $LASTEXITCODE",
        "    Set-Content -Path \"logs\\$cmd.exit\" -Value $code -Encoding ascii",
        "    $failed = [bool](Select-String -LiteralPath $out -Pattern $pattern -List)",
        "    foreach ($d in @($dir, '.icraft\\logs')) {",
        "        if (-not $failed -and (Test-Path -LiteralPath $d)) {",
        "            $logs = @(Get-ChildItem -LiteralPath $d -Recurse -Filter '*.log' -File)",
        "            if ($logs.Count) { $failed = [bool]($logs | Select-String -Pattern $pattern -List) }",
        "        }",
        "    }",
        "    if ($code -ne 0 -or $failed) {",
        "        Write-Host \"icraft $cmd failed (exit status $code); see logs\\\"",
        "        exit 1",
        "    }",
        "}",
        "Write-Host 'done: bring this folder back and run: tdpu icraft import <this folder>'",
        "",
    ]
    # A byte-order mark: Windows PowerShell 5.1 reads a script without one in the ANSI code page.
    return "\ufeff" + "\r\n".join(lines)


def write_bundle(cfg: Config, folder: Path, graph: Path, meta: dict,
                 inputs: Sequence[tuple[str, list[int], object]],
                 input_data: dict[str, bytes] | None, input_missing: str,
                 seed: int, output_shape: list[int] | None, tdpu_version: str) -> Bundle:
    """Write the bundle into `folder` (the Icraft output folder) and describe what it holds."""
    net = cfg.icraft.net_name
    folder.mkdir(parents=True, exist_ok=True)
    gdir = folder / GRAPH_DIR
    locations = external_locations(graph)
    keep = {graph.name, *locations}
    if gdir.is_dir():      # files of an earlier export that the graph no longer names
        for old in gdir.rglob("*"):
            if old.is_file() and old.relative_to(gdir).as_posix() not in keep:
                old.unlink()
    placed = [place(graph, gdir / graph.name)]
    for loc in locations:
        placed.append(place(graph.parent / loc, gdir / loc))
    bundle = Bundle(folder, folder / f"{net}.toml", gdir / graph.name, list(placed))

    ftmps = [folder / INPUT_DIR / f"{name}.ftmp" for name, _s, _d in inputs]
    input_rows = []
    for (name, shape, _dtype), path in zip(inputs, ftmps):
        row = {"name": name, "file": path.relative_to(folder).as_posix(), "shape": shape,
               "dtype": "float32", "seed": seed, "profile": meta.get("profile", "reference")}
        if input_data is not None and name in input_data:
            data = input_data[name]
            atomic_write_bytes(path, data)
            row["bytes"] = len(data)
            row["sha256"] = hashlib.sha256(data).hexdigest()
            bundle.files.append(PlacedFile(path, len(data), "written"))
            bundle.input_file = path
        input_rows.append(row)
    bundle.input_missing = input_missing if input_data is None else ""

    text = ic.compile_toml(cfg, folder, bundle.graph, [s for _, s, _ in inputs], ftmps)
    atomic_write_bytes(bundle.toml, text.encode("utf-8"))
    ps1, sh = bundle.scripts()
    atomic_write_bytes(ps1, _ps1_script(net).encode("utf-8"))
    atomic_write_bytes(sh, _sh_script(net).encode("utf-8"))
    os.chmod(sh, 0o755)
    doc = {
        "format": FORMAT,
        "net_name": net,
        "made_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "tdpu_version": tdpu_version,
        "export": export_identity(graph, meta),
        "graph": {"file": bundle.graph.relative_to(folder).as_posix(),
                  "files": [{"file": p.path.relative_to(folder).as_posix(), "bytes": p.bytes,
                             "how": p.how} for p in placed]},
        "toml": bundle.toml.name,
        "commands": list(COMMANDS),
        "log_dirs": LOG_DIRS,
        "inputs": input_rows,
        "input_missing": bundle.input_missing,
        "output": ({"shape": output_shape, "dtype": "float32",
                    "bytes": 4 * _prod(output_shape)} if output_shape else None),
        "dump": {"format": ic.DUMP_FORMAT, "under": LOG_DIRS["run"]},
    }
    atomic_write_bytes(folder / BUNDLE_JSON,
                       (json.dumps(doc, indent=1, ensure_ascii=False) + "\n").encode("utf-8"))
    return bundle


def _prod(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def bundle_members(folder: Path) -> list[Path]:
    """The files that make the bundle (what is copied or zipped): not the results of a local
    run, nor logs."""
    doc = json.loads((folder / BUNDLE_JSON).read_text(encoding="utf-8"))
    names = [BUNDLE_JSON, doc["toml"], "run_icraft.ps1", "run_icraft.sh"]
    names += [f["file"] for f in doc["graph"]["files"]]
    names += [row["file"] for row in doc["inputs"] if "sha256" in row]
    return [folder / n for n in names]


ZIP_STORE_ABOVE = 64 << 20     # big weight files barely compress; storing them is far faster


def write_zip(folder: Path, dest: Path) -> int:
    """Zip the bundle's files under one top folder named like `folder`; returns the bytes."""
    top = folder.name
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.part")
    try:
        with zipfile.ZipFile(tmp, "w", allowZip64=True) as zf:
            for p in bundle_members(folder):
                if not p.exists():
                    continue
                big = p.stat().st_size > ZIP_STORE_ABOVE
                zf.write(p, f"{top}/{p.relative_to(folder).as_posix()}",
                         compress_type=zipfile.ZIP_STORED if big else zipfile.ZIP_DEFLATED)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest.stat().st_size
