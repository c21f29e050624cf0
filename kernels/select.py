"""Which integer core runs: chosen by measurement once per machine, overridable, reported.

    available_paths() -> ["numba-int16", "numba-avx2", ...]    what this CPU can run
    chosen_path(m) -> str             the path a product with M activation rows takes
    selection() -> dict               both choices, where they came from, the machine key
    set_path("auto" | name | None)    override in this process (None: back to the environment)

Paths (every one bit-identical to the reference, `kernels.bitlinear`):

    numba-int16        the reference body: 16-bit products, any CPU (`kernels.bitlinear`)
    numba-avx2         vpmaddubsw 8-bit pairs (`kernels.int8`)
    numba-avxvnni      vpdpbusd, 256 bit (AVX-VNNI, or AVX-512 VNNI with VL)
    numba-avx512vnni   vpdpbusd, 512 bit
    numba-amx          tdpbusd on AMX-INT8 tiles (`kernels.amx`), where the OS grants them

Two regimes are chosen apart: decode (M = 1) and prefill (M >= 2). Under "auto" (the
default) the first product measures every available path (`bitlinear` whole: decode M = 1 on
2560 -> 6912, prefill M = 32 on 2560 -> 2560; interleaved, medians) and stores the winners in `tdpu-kernel-paths.json` in the numba
cache directory, keyed by the CPU name and features numba compiles for, the library
versions and the kernels' source; later processes on the same machine read it.
`$TDPU_KERNEL_PATH` (a path name, or "auto") or `set_path` override the measurement; asking
for a path the CPU cannot run is an error (it would die of SIGILL).
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from pathlib import Path

REFERENCE = "numba-int16"
VECTOR_PATHS = ("numba-avx2", "numba-avxvnni", "numba-avx512vnni")
AMX = "numba-amx"
PATHS = (REFERENCE, *VECTOR_PATHS, AMX)
ENV = "TDPU_KERNEL_PATH"
CACHE_NAME = "tdpu-kernel-paths.json"
REGIMES = ("decode", "prefill")

_lock = threading.RLock()
_override: str | None = None
_chosen: dict | None = None


def regime(m: int) -> str:
    return "decode" if m <= 1 else "prefill"


def machine() -> dict:
    """The CPU numba compiles for (name, LLVM features) and the library versions."""
    import llvmlite
    import llvmlite.binding as llb
    import numba
    import numpy

    name = numba.config.CPU_NAME or llb.get_host_cpu_name()
    features = numba.config.CPU_FEATURES or llb.get_host_cpu_features().flatten()
    on = sorted(f[1:] for f in features.split(",") if f.startswith("+"))
    return {"cpu": name, "features": on, "numba": numba.__version__,
            "llvmlite": llvmlite.__version__, "numpy": numpy.__version__}


def available_paths() -> list[str]:
    from kernels import simd

    features = set(machine()["features"])
    paths = [REFERENCE] + [f"numba-{isa.name}" for isa in simd.available(features)]
    if {"amx-int8", "amx-tile"} <= features:
        from kernels import amx

        if amx.enable():        # the OS grants the tile state (Linux 5.16+), else SIGILL
            paths.append(AMX)
    return paths


def _check(name: str, where: str) -> str:
    if name == "auto":
        return name
    if name not in PATHS:
        raise ValueError(f"{where}: unknown kernel path {name!r}, expected 'auto' or one of {PATHS}")
    avail = available_paths()
    if name not in avail:
        raise ValueError(f"{where}: kernel path {name!r} needs instructions this CPU "
                         f"({machine()['cpu']}) lacks; available: {avail}")
    return name


def check_path(name: str) -> str:
    """`name` if this CPU can run that path, else ValueError (naming the available ones)."""
    if name == "auto":
        raise ValueError("expected a kernel path name, found 'auto'")
    return _check(name, "kernel path")


def set_path(name: str | None) -> None:
    """Force a path for both regimes in this process ("auto": measure; None: use $TDPU_KERNEL_PATH)."""
    global _override, _chosen
    with _lock:
        _override = None if name is None else _check(name, "set_path")
        _chosen = None


def _source_digest() -> str:
    here = Path(__file__).resolve().parent
    h = hashlib.blake2b(digest_size=8)
    for mod in ("bitlinear.py", "int8.py", "simd.py", "select.py", "pool.py", "amx.py"):
        h.update((here / mod).read_bytes())
    return h.hexdigest()


def machine_key() -> str:
    info = machine()
    # The paths offered too: the same CPU without the OS's AMX grant is another machine here.
    text = json.dumps([info, _source_digest(), available_paths()], sort_keys=True)
    return hashlib.blake2b(text.encode(), digest_size=12).hexdigest()


def _cache_file() -> Path | None:
    import numba

    base = numba.config.CACHE_DIR or os.environ.get("NUMBA_CACHE_DIR")
    return Path(base) / CACHE_NAME if base else None


def _read_cache(key: str) -> dict | None:
    path = _cache_file()
    try:
        entry = json.loads(path.read_text()).get(key) if path else None
    except (OSError, ValueError, AttributeError):
        return None
    avail = available_paths()
    if isinstance(entry, dict) and all(entry.get(r) in avail for r in REGIMES):
        return entry
    return None


def _write_cache(key: str, entry: dict) -> None:
    path = _cache_file()
    if path is None:
        return
    try:
        try:
            data = json.loads(path.read_text())
            if not isinstance(data, dict):
                data = {}
        except (OSError, ValueError):
            data = {}
        data[key] = entry
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        os.replace(tmp, path)
    except OSError:
        pass        # an unwritable cache only costs a re-measurement in the next process


# What the measurement runs: decode on the shape that holds most of a 2B4T layer's weight bytes
# (the MLP's 2560 -> 6912: 4.4 MB packed, more than a core's L2 on every machine seen, so it
# streams as a real decode step does), quantization and rescale included; prefill on
# 2560 x 2560 at M = 32 (compute-bound there).
DECODE_SHAPE = (2560, 6912)
PREFILL_SHAPE = (2560, 2560)


def measure(paths: list[str] | None = None, rounds: int = 5) -> dict:
    """Median seconds per product of each path, per regime: {"decode": {path: s}, "prefill": ...}."""
    import numpy as np

    from kernels import bitlinear, packing

    paths = paths or available_paths()
    rng = np.random.default_rng(0)
    out = {}
    for reg, m, reps, (k, n) in (("decode", 1, 20, DECODE_SHAPE), ("prefill", 32, 3, PREFILL_SHAPE)):
        p = packing.pack(rng.integers(-1, 2, size=(n, k)).astype(np.int8), "tdpu")
        x = rng.standard_normal((m, k)).astype(np.float32)
        samples = {name: [] for name in paths}
        for name in paths:                      # compile (or load from cache) and warm up
            for _ in range(3):
                bitlinear.bitlinear(x, p, 1.0, "tdpu", path=name)
        for _ in range(rounds):
            for name in paths:
                for _ in range(reps):
                    t = time.perf_counter()
                    bitlinear.bitlinear(x, p, 1.0, "tdpu", path=name)
                    samples[name].append(time.perf_counter() - t)
        out[reg] = {name: float(np.median(v)) for name, v in samples.items()}
    return out


def _resolve() -> dict:
    global _chosen
    with _lock:
        if _chosen is not None:
            return _chosen
        name = _override
        source = "set_path"
        if name is None:
            name = os.environ.get(ENV, "").strip() or "auto"
            source = f"${ENV}"
            name = _check(name, f"${ENV}")
        info = machine()
        if name != "auto":
            _chosen = {"decode": name, "prefill": name, "source": source, "cpu": info["cpu"]}
            return _chosen
        avail = available_paths()
        key = machine_key()
        if len(avail) == 1:
            entry = {"decode": avail[0], "prefill": avail[0], "source": "only path"}
        else:
            entry = _read_cache(key)
            if entry is not None:
                entry = {**entry, "source": "cached measurement"}
            else:
                timings = measure(avail)
                entry = {r: min(timings[r], key=timings[r].get) for r in REGIMES}
                entry["timings_ms"] = {r: {p: round(t * 1e3, 4) for p, t in timings[r].items()}
                                       for r in REGIMES}
                entry["measured_at"] = time.strftime("%Y-%m-%d %H:%M:%S")
                _write_cache(key, entry)
                entry = {**entry, "source": "measured"}
        _chosen = {**entry, "cpu": info["cpu"], "key": key}
        return _chosen


def chosen_path(m: int = 1, k: int | None = None, n: int | None = None) -> str:
    """The path a product with `m` activation rows runs on this machine (k, n: not used yet)."""
    chosen = _chosen        # once resolved, read without the lock (every decode call asks)
    return (chosen if chosen is not None else _resolve())[regime(m)]


def selection() -> dict:
    """{"decode", "prefill", "source", "cpu", ...}: what runs here and why (for reports)."""
    return dict(_resolve())
