"""The whole pipeline at full 2B4T shapes: wall time and peak RSS, this checkout against another.

Runs `tdpu --batch` on the synthetic `2b4t` preset (30 layers unless `--layers`) once per
checkout, each in a fresh process and a fresh project directory, and prints each stage's
seconds, the whole run's wall time and the process's peak RSS, with the ratios of this checkout
to the baseline checkout measured in the same run.

    python benchmarks/bench_pipeline.py [--baseline PATH] [--layers N] [--profile icraft]
                                        [--workdir DIR] [--json OUT]

`--baseline` is another checkout of tdpu (e.g. `git worktree add /tmp/before <commit>`); without
it only this checkout is measured. Needs ~12 GiB of disk per checkout (the float graph's external
data) and ~8 GiB of memory (~10.5 GiB for a checkout from before the float graph ran in segments,
22e286e and earlier). Target (issue 11): ≤ 0.6 × the baseline's wall time, ≤ 8 GiB peak.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import psutil

from tdpu_tui.engine.osutil.platform import cpu_model, load_average

REPO = Path(__file__).resolve().parent.parent
GIB = 1024 ** 3


def config(profile: str, layers: int | None) -> str:
    extra = f"layers = {layers}\n" if layers else ""
    return textwrap.dedent("""\
        [model]
        source = "synthetic"
        [model.synthetic]
        preset = "2b4t"
        seed = 0
        """) + extra + textwrap.dedent(f"""\
        [export]
        profile = "{profile}"
        [paths]
        output = "models/output"
        logs = "phase3_logs"
        """)


class PeakRss:
    """Peak resident memory of a process tree, sampled (psutil works on every system)."""

    def __init__(self, pid: int, every: float = 0.2):
        self.peak = 0
        self.series: list[tuple[float, int]] = []     # (epoch seconds, bytes)
        self._proc = psutil.Process(pid)
        self._stop = threading.Event()
        self._every = every
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                procs = [self._proc, *self._proc.children(recursive=True)]
                rss = sum(p.memory_info().rss for p in procs if p.is_running())
                self.peak = max(self.peak, rss)
                self.series.append((time.time(), rss))
            except psutil.Error:
                pass
            self._stop.wait(self._every)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def run_once(checkout: Path, workdir: Path, profile: str, layers: int | None) -> dict:
    project = workdir / checkout.name
    shutil.rmtree(project, ignore_errors=True)
    project.mkdir(parents=True)
    (project / "tdpu.toml").write_text(config(profile, layers), encoding="utf-8")
    env = dict(os.environ, PYTHONPATH=str(checkout))
    summary = project / "run.json"
    cmd = [sys.executable, "-m", "tdpu_tui", "--batch", "--config", str(project / "tdpu.toml"),
           "--json", str(summary), "--no-bug-drafts"]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=project, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    sampler = PeakRss(proc.pid)
    out, _ = proc.communicate()
    wall = time.perf_counter() - start
    peak = sampler.stop()
    if proc.returncode not in (0, 1):
        sys.stderr.write(out[-4000:])
        raise SystemExit(f"{checkout}: tdpu --batch exited {proc.returncode}")
    doc = json.loads(summary.read_text(encoding="utf-8"))
    stages = {s["name"]: (s["status"], s["seconds"]) for s in doc["stages"]}
    stage_peaks = peaks_by_stage(project / "phase3_logs" / "runs" / "status.json", sampler.series)
    failed = {s["name"]: s["message"] for s in doc["stages"] if s["status"] == "failed"}
    if failed:      # keep the project to look at; a failed run's figures are no result
        (project / "output.txt").write_text(out, encoding="utf-8")
        print(f"{checkout}: failed — kept {project}", file=sys.stderr)
        for name, message in failed.items():
            print(f"  {name}: {message}", file=sys.stderr)
    else:           # keep the --json summary (every stage's metrics) beside the project
        shutil.copy2(summary, workdir / f"{checkout.name}.run.json")
        shutil.rmtree(project, ignore_errors=True)
    return {"checkout": str(checkout), "wall_s": wall, "peak_rss": peak, "stages": stages,
            "stage_peak_rss": stage_peaks, "failed": failed, "exit": proc.returncode}


def peaks_by_stage(status: Path, series: list[tuple[float, int]]) -> dict[str, int]:
    """The sampled peak within each stage's run: from its start to the next stage's start
    (`phase3_logs/runs/status.json` holds each stage's start time)."""
    try:
        rows = json.loads(status.read_text(encoding="utf-8"))["stages"]
        starts = sorted((float(r["started_ts"]), name) for name, r in rows.items() if r.get("started_ts"))
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    out = {}
    for i, (start, name) in enumerate(starts):
        end = starts[i + 1][0] if i + 1 < len(starts) else float("inf")
        out[name] = max((rss for t, rss in series if start <= t < end), default=0)
    return out


def machine() -> str:
    try:
        import llvmlite.binding as llvm
        cpu = llvm.get_host_cpu_name()
    except Exception:  # noqa: BLE001 (no llvmlite, or one that cannot name the CPU: the line says "?")
        cpu = "?"
    mem = psutil.virtual_memory().total / GIB
    return f"{cpu_model()} (LLVM: {cpu}), {psutil.cpu_count()} logical cores, {mem:.0f} GiB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", default=None, help="another tdpu checkout to compare with")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--profile", default="icraft", choices=["icraft", "reference"])
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="tdpu-bench-pipeline-"))
    print(f"machine: {machine()}; load before: {load_average()}")
    runs = []
    for checkout in ([Path(args.baseline).resolve()] if args.baseline else []) + [REPO]:
        r = run_once(checkout, workdir, args.profile, args.layers)
        runs.append(r)
        print(f"{checkout}: wall {r['wall_s']:.1f} s, peak RSS {r['peak_rss'] / GIB:.2f} GiB, exit {r['exit']}")
        for name, (status, secs) in r["stages"].items():
            peak = r["stage_peak_rss"].get(name)
            print(f"    {name:10s} {status:8s} {secs:8.1f} s"
                  + (f"   peak RSS {peak / GIB:5.2f} GiB" if peak else ""))
    if len(runs) == 2:
        base, new = runs
        print(f"this checkout / baseline: wall {new['wall_s'] / base['wall_s']:.2f} ×, "
              f"peak RSS {new['peak_rss'] / base['peak_rss']:.2f} ×")
        for name, (_, secs) in new["stages"].items():
            before = base["stages"].get(name, (None, 0.0))[1]
            # a stage that took under a second (a skip, precheck) has no ratio worth printing
            print(f"    {name:10s} " + (f"{secs / before:.2f} ×" if min(secs, before) >= 1.0 else "–"))
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine(), "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
