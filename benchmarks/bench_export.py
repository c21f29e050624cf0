"""Export at scale: the synthetic `2b4t` preset (2.4 B parameters), wall time and peak RSS.

Each step runs in a fresh process so its peak RSS is its own. The baseline, measured in the
same run, is the I/O floor: writing the same number of bytes to the same disk.

    python benchmarks/bench_export.py [--preset 2b4t] [--layers N] [--profile icraft] [--workdir DIR]

Targets (issue 2): the export itself (graph + external data, without ORT verification) in
≤ 10 min with peak RSS ≤ 4 GiB; the whole stage, verification included, without running out
of memory.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
GIB = 1024 ** 3


def child(code: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"step failed: {code[:80]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def io_floor(directory: Path, nbytes: int) -> float:
    chunk = bytes(64 * 1024 * 1024)
    path = directory / "io_floor.bin"
    t = time.perf_counter()
    with open(path, "wb") as fh:
        left = nbytes
        while left > 0:
            fh.write(chunk[: min(left, len(chunk))])
            left -= len(chunk)
        fh.flush()
        os.fsync(fh.fileno())
    seconds = time.perf_counter() - t
    path.unlink()
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="2b4t")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--profile", default="icraft", choices=["icraft", "reference"])
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="tdpu-bench-export-"))
    work.mkdir(parents=True, exist_ok=True)
    layers = f"layers = {args.layers}\n" if args.layers else ""
    (work / "tdpu.toml").write_text(textwrap.dedent(f"""\
        [model]
        source = "synthetic"
        [model.synthetic]
        preset = "{args.preset}"
        seed = 0
        """) + layers + textwrap.dedent(f"""\
        [export]
        profile = "{args.profile}"
        seq_len = {args.seq_len}
        verify_batch = 1
        verify_tokens = 16
        [paths]
        output = "out"
        logs = "logs"
        """))
    cfg_path = work / "tdpu.toml"
    print(f"workdir {work}", file=sys.stderr)

    synth = child(textwrap.dedent(f"""\
        import json, time
        from tdpu_tui.engine.core.config import load_config
        from tdpu_tui.engine.osutil.platform import peak_rss_bytes
        from tdpu_tui.engine.model.synthetic import ensure_synthetic
        t = time.perf_counter()
        p = ensure_synthetic(load_config({str(cfg_path)!r}))
        print(json.dumps({{"seconds": time.perf_counter() - t, "path": str(p),
              "peak_rss": peak_rss_bytes()}}))
        """))
    print(f"synthetic checkpoint: {synth['seconds']:.1f} s, peak RSS {synth['peak_rss'] / GIB:.2f} GiB",
          file=sys.stderr)

    export = child(textwrap.dedent(f"""\
        import json
        from tdpu_tui.engine.core.config import load_config
        from tdpu_tui.engine.stages.export import ExportStage
        from tdpu_tui.engine.core.pipeline import Pipeline
        r = Pipeline(load_config({str(cfg_path)!r}), [ExportStage()]).run().results[0]
        print(json.dumps({{"status": r.status.value, "message": r.message, "seconds": r.seconds,
                           "metrics": r.metrics, "artifacts": r.artifacts}}))
        """))
    m = export["metrics"]
    steps = m.get("seconds_by_step", {})
    data_bytes = Path(export["artifacts"]["onnx_data"]).stat().st_size if "onnx_data" in export["artifacts"] else 0
    floor = io_floor(work, data_bytes) if data_bytes else float("nan")
    build_s = steps.get("build ONNX", float("nan"))
    result = {
        "preset": args.preset, "layers": args.layers, "profile": args.profile,
        "status": export["status"], "message": export["message"],
        "synthetic_seconds": synth["seconds"], "synthetic_peak_rss": synth["peak_rss"],
        "export_seconds": build_s, "export_peak_rss": m.get("export_peak_rss_bytes"),
        "stage_seconds": export["seconds"], "stage_peak_rss": m.get("peak_rss_bytes"),
        "external_data_bytes": data_bytes, "io_floor_seconds": floor, "steps": steps,
    }
    print(f"\nexport ({args.preset}, {args.profile} profile): {export['status']} — {export['message']}")
    print(f"{'measure':<44}{'value':>12}{'ratio':>22}")
    print(f"{'export (graph + external data), seconds':<44}{build_s:>12.1f}"
          f"{build_s / 600:>10.2f} × 10 min target")
    print(f"{'  same bytes written raw (I/O floor), seconds':<44}{floor:>12.1f}"
          f"{build_s / floor:>10.2f} × floor (export / floor)")
    print(f"{'export peak RSS, GiB':<44}{m['export_peak_rss_bytes'] / GIB:>12.2f}"
          f"{m['export_peak_rss_bytes'] / (4 * GIB):>10.2f} × 4 GiB target")
    print(f"{'whole stage incl. verification, seconds':<44}{export['seconds']:>12.1f}")
    print(f"{'whole stage peak RSS, GiB':<44}{m['peak_rss_bytes'] / GIB:>12.2f}"
          f"{m['peak_rss_bytes'] / (24 * GIB):>10.2f} × machine memory")
    for k, v in steps.items():
        print(f"  {k:<42}{v:>12.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
