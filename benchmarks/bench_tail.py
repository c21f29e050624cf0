"""Tail a log growing at 20,000 lines/s for 10 s in the app; count lines, time keys, watch RSS.

    python benchmarks/bench_tail.py [--rate 20000] [--seconds 10] [--source file|events]
                                    [--terminal] [--out PATH]

A separate process appends Icraft-like lines (like Icraft does) to a file the app follows;
the app runs headless (layout and line rendering, no terminal output) or, with --terminal,
drawing on the real terminal it is started in. Every 100 ms a key is
posted the way the terminal driver posts one; its latency is the time until the app's action
runs. The baseline is the same key latency with the app idle, measured first in the same run.
Pass: every line reaches the log panel, keys answer in < 250 ms, memory stays bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import psutil
from textual import events
from textual.binding import Binding

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tdpu_tui.app.app import TdpuApp  # noqa: E402
from tdpu_tui.engine.core.config import parse_config  # noqa: E402
from tdpu_tui.engine.core.stage import Stage  # noqa: E402

WRITER = textwrap.dedent("""\
    import sys, time
    path, rate, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    tick = 0.01
    per_tick = max(1, int(rate * tick))
    total = int(rate * seconds)
    start = time.perf_counter()
    n = 0
    with open(path, "a", encoding="utf-8") as fh:
        while n < total:
            chunk = []
            for i in range(n, min(total, n + per_tick)):
                level = "E" if i % 1000 == 999 else "I"
                chunk.append(f"[11/26/26 09:00:{(i // rate) % 60:02d}.{i % 1000:03d}] [{level}] "
                             f"seq {i:07d} optimize pass tdpu.ReplaceMatMulWithBitLinear node {i % 211}\\n")
            fh.write("".join(chunk))
            fh.flush()
            n += len(chunk)
            delay = start + n / rate - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
    print(f"{n} {time.perf_counter() - start:.3f}")
""")


class FloodStage(Stage):
    """A stage that logs `rate` lines/s through its context: the pipeline's event path."""

    name = "flood"
    title = "log flood"

    def __init__(self, rate: int, seconds: float):
        self.rate, self.seconds = rate, seconds
        self.written, self.elapsed = 0, 0.0

    def run(self, ctx) -> str:
        total = int(self.rate * self.seconds)
        start = time.perf_counter()
        for i in range(total):
            ctx.log(f"[I] seq {i:07d} optimize pass tdpu.ReplaceMatMulWithBitLinear node {i % 211}")
            if i % 200 == 199:
                delay = start + (i + 1) / self.rate - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
        self.written, self.elapsed = total, time.perf_counter() - start
        return f"{total} lines"


class FileSource:
    """A separate process appending to a file the app follows (like Icraft)."""

    label = "a file appended by another process (the tailer)"

    def __init__(self, log: Path, rate: int, seconds: float):
        self.proc = subprocess.Popen([sys.executable, "-c", WRITER, str(log), str(rate), str(seconds)],
                                     stdout=subprocess.PIPE, text=True)

    def done(self) -> bool:
        return self.proc.poll() is not None

    def result(self) -> tuple[int, float]:
        written, seconds = self.proc.communicate()[0].split()
        return int(written), float(seconds)


class EventSource:
    label = "a stage logging through the pipeline's events (the worker thread)"

    def __init__(self, app: TdpuApp, stage: FloodStage):
        self.app, self.stage = app, stage
        app.start_run(None)

    def done(self) -> bool:
        return self.app.run_done is not None and self.app.run_done.is_set()

    def result(self) -> tuple[int, float]:
        return self.stage.written, self.stage.elapsed


class BenchApp(TdpuApp):
    BINDINGS = [Binding("z", "ping", "ping", show=False)]

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.pinged: list[float] = []

    def action_ping(self) -> None:
        self.pinged.append(time.perf_counter())


async def key_latencies(app: BenchApp, duration: float, until=None) -> list[float]:
    """Post a key every 100 ms; return each key's latency in seconds."""
    out: list[float] = []
    end = time.monotonic() + duration
    while time.monotonic() < end and (until is None or not until()):
        before = len(app.pinged)
        t0 = time.perf_counter()
        app.post_message(events.Key("z", "z"))
        while len(app.pinged) == before:
            await asyncio.sleep(0.001)
            if time.perf_counter() - t0 > 5:
                raise RuntimeError("a key went unanswered for 5 s")
        out.append(app.pinged[-1] - t0)
        await asyncio.sleep(max(0.0, 0.1 - (time.perf_counter() - t0)))
    return out


def summary(lat: list[float]) -> str:
    ms = sorted(x * 1000 for x in lat)
    p99 = ms[min(len(ms) - 1, int(len(ms) * 0.99))]
    return (f"n={len(ms)} median {statistics.median(ms):.1f} ms, p99 {p99:.1f} ms, "
            f"max {ms[-1]:.1f} ms")


async def bench(rate: int, seconds: float, terminal: bool, source: str) -> list[str]:
    tmp = Path(tempfile.mkdtemp(prefix="bench_tail."))
    cfg = parse_config('[paths]\noutput = "out"\nlogs = "logs"\n', tmp / "tdpu.toml")
    log = tmp / "icraft_optimize.log"
    log.write_text("")
    proc = psutil.Process()
    flood = FloodStage(rate, seconds)
    app = BenchApp(cfg, stages=[flood], follow=[log])
    async with app.run_test(size=None if terminal else (120, 40), headless=not terminal) as pilot:
        await pilot.press("2")  # the log panel is on screen: lines are rendered as they come
        await pilot.pause(0.5)
        idle = await key_latencies(app, 2.0)
        rss0 = proc.memory_info().rss
        writer = FileSource(log, rate, seconds) if source == "file" else EventSource(app, flood)
        samples: list[int] = []

        async def sample_rss() -> None:
            while not writer.done() or app.log_panel.received < rate * seconds:
                samples.append(proc.memory_info().rss)
                await asyncio.sleep(0.25)

        sampler = asyncio.create_task(sample_rss())
        t0 = time.perf_counter()
        loaded = await key_latencies(app, seconds + 30, until=writer.done)
        written, write_s = writer.result()
        deadline = time.monotonic() + 30
        while app.log_panel.received < written and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        caught_up = time.perf_counter() - t0
        sampler.cancel()
        received = app.log_panel.received
        ring = app.log_panel.ring
        last = ring[-1] if ring else ""
        view_lines = app.log_panel.view.line_count
        peak_pending = app.tailer.max_pending

    peak = max(samples) if samples else rss0
    out: list[str] = []
    print = out.append  # noqa: A001 - the report is printed after the app left the terminal
    mode = "a real terminal (Linux driver)" if terminal else "headless (no terminal output)"
    print(f"app: {mode}, log panel on screen; source: {writer.label}")
    print(f"writer: {written:,} lines in {write_s:.2f} s ({written / write_s:,.0f} lines/s)")
    print(f"panel:  {received:,} lines received ({received / caught_up:,.0f} lines/s), all caught up "
          f"{caught_up - write_s:.2f} s after the writer stopped")
    print(f"        last line: {last.split('│', 1)[-1].strip()[:60]}")
    print(f"keys idle (baseline): {summary(idle)}")
    print(f"keys under load:      {summary(loaded)}")
    p99_ratio = (sorted(loaded)[int(len(loaded) * 0.99)] / max(1e-6, sorted(idle)[int(len(idle) * 0.99)]))
    print(f"        p99 ratio load/idle: {p99_ratio:.1f}x")
    print(f"memory: RSS {rss0 / 2**20:.0f} MiB before, peak {peak / 2**20:.0f} MiB "
          f"(+{(peak - rss0) / 2**20:.0f} MiB); ring {len(ring):,} lines, view {view_lines:,} lines, "
          f"tail queue cap {peak_pending:,} lines")
    ok = received == written and f"seq {written - 1:07d}" in last and max(loaded) < 0.25
    print("PASS" if ok else "FAIL")
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rate", type=int, default=20_000, help="lines per second")
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--terminal", action="store_true",
                   help="draw on this terminal (run it in tmux or over SSH) instead of headless")
    p.add_argument("--source", choices=("file", "events"), default="file",
                   help="file: another process appends to a followed file; events: a stage logs")
    p.add_argument("--out", metavar="PATH", help="also write the report here")
    args = p.parse_args()
    report = "\n".join(asyncio.run(bench(args.rate, args.seconds, args.terminal, args.source)))
    sys.stdout.write(report + "\n")
    if args.out:
        Path(args.out).write_text(report + "\n")
    return 0 if report.endswith("PASS") else 1


if __name__ == "__main__":
    raise SystemExit(main())
