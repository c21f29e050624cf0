"""The app in a real terminal after real runs: key latency per tab switch and RSS growth.

    python benchmarks/bench_tui.py [--runs 3] [--switches 200] [--out PATH]

Starts `tdpu` on a tiny synthetic project (outputs in a temporary folder) inside tmux, on its
own tmux server socket (120×40), runs the whole pipeline `--runs` times with `r`, then presses
the tab digits `--switches` times. Each key's latency is measured from `send-keys` until
`capture-pane` shows that tab (polled): what a person at the terminal waits for, repaint
included. RSS is the app process's, read from /proc before and after the switches (and once
more after 10 s idle, with keys timed meanwhile: idle stalls show up there). The baseline is
the same switches before any run, in the same session.

Figures are printed with the machine they were measured on; nothing is asserted on time.
Needs tmux (`apt-get install tmux`) and Linux (/proc).
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

CONFIG = textwrap.dedent("""\
    [model]
    source = "synthetic"
    [model.synthetic]
    preset = "tiny"
    seed = 0
    [export]
    profile = "reference"
    seq_len = 16
    verify_batch = 2
    verify_tokens = 16
    [paths]
    output = "out"
    logs = "logs"
    """)

# What only that tab shows: a table header, or a key its panel puts in the footer.
TABS = {"1": "Progress", "2": "end Follow", "3": "space Pick", "4": "$EDITOR"}


class Tmux:
    def __init__(self, socket: str):
        self.socket = socket

    def __call__(self, *args: str) -> str:
        return subprocess.run(["tmux", "-L", self.socket, *args], capture_output=True, text=True,
                              check=True, timeout=30).stdout

    def screen(self) -> str:
        return self("capture-pane", "-p", "-t", "t")

    def wait(self, test, timeout: float, poll: float = 0.005) -> float:
        """Seconds until `test(screen)` holds (polling capture-pane)."""
        start = time.perf_counter()
        while True:
            text = self.screen()
            if test(text):
                return time.perf_counter() - start
            if time.perf_counter() - start > timeout:
                raise TimeoutError(f"not on screen after {timeout}s:\n{text}")
            time.sleep(poll)


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def app_pid(tmux: Tmux) -> int:
    return int(tmux("display-message", "-p", "-t", "t", "#{pane_pid}").strip())


def switch(tmux: Tmux, key: str) -> float:
    tmux("send-keys", "-t", "t", key)
    return tmux.wait(lambda s: TABS[key] in s, timeout=30)


def switches(tmux: Tmux, n: int) -> list[float]:
    """`n` presses, each of the digit of the tab after the one on screen (the screen changes)."""
    keys = list(TABS)
    out = []
    for _ in range(n):
        on = next((k for k in keys if TABS[k] in tmux.screen()), keys[-1])
        out.append(switch(tmux, keys[(keys.index(on) + 1) % len(keys)]))
    return out


def run_all(tmux: Tmux, number: int) -> float:
    start = time.perf_counter()
    tmux("send-keys", "-t", "t", "1")
    tmux.wait(lambda s: TABS["1"] in s, timeout=30)
    tmux("send-keys", "-t", "t", "r")
    tmux.wait(lambda s: "· running" in s, timeout=60, poll=0.05)
    tmux.wait(lambda s: "last run:" in s and "· running" not in s, timeout=900, poll=0.2)
    return time.perf_counter() - start


def figures(name: str, lat: list[float]) -> str:
    ms = sorted(x * 1000 for x in lat)
    p99 = ms[min(len(ms) - 1, int(len(ms) * 0.99))]
    return (f"{name}: {len(ms)} keys, median {statistics.median(ms):.0f} ms, p99 {p99:.0f} ms, "
            f"max {ms[-1]:.0f} ms, over 250 ms: {sum(1 for x in ms if x > 250)}")


def machine() -> str:
    from tdpu_tui.engine.osutil.platform import load_average, machine_summary

    load = load_average()
    return f"{machine_summary()}; load average {'?' if load is None else f'{load:.1f}'} at the end"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--switches", type=int, default=200)
    p.add_argument("--out", type=Path, help="also write the figures to this file")
    args = p.parse_args()
    tmux = Tmux(f"tdpu-bench-{os.getpid()}")
    with tempfile.TemporaryDirectory(prefix="bench_tui_") as tmp:
        project = Path(tmp)
        (project / "tdpu.toml").write_text(CONFIG)
        command = (f"cd {shlex.quote(str(REPO))} && exec env TERM=xterm-256color "
                   f"{shlex.quote(sys.executable)} -m tdpu_tui --config {shlex.quote(str(project / 'tdpu.toml'))}")
        tmux("new-session", "-d", "-s", "t", "-x", "120", "-y", "40", command)
        lines = []
        try:
            tmux.wait(lambda s: TABS["1"] in s, timeout=60, poll=0.1)
            pid = app_pid(tmux)
            base = switches(tmux, min(40, args.switches))
            lines.append(figures("before any run, tab switches", base))
            for i in range(args.runs):
                lines.append(f"run {i + 1}: {run_all(tmux, i):.1f} s")
            time.sleep(2)
            before = rss_mib(pid)
            lat = switches(tmux, args.switches)
            after = rss_mib(pid)
            lines.append(figures(f"after {args.runs} runs, {args.switches} tab switches", lat))
            lines.append(f"RSS before the switches {before:.1f} MiB, after {after:.1f} MiB: "
                         f"growth {after - before:+.1f} MiB "
                         f"({(after - before) * 1024 / max(1, args.switches):+.1f} KiB per switch)")
            idle, deadline = [], time.monotonic() + 10
            while time.monotonic() < deadline:     # idle, a key every 0.5 s
                time.sleep(0.5)
                idle.extend(switches(tmux, 1))
            lines.append(figures("idle 10 s afterwards, a key every 0.5 s", idle))
            lines.append(f"RSS after the idle keys {rss_mib(pid):.1f} MiB")
            polls = []
            for _ in range(50):     # what one poll costs: the resolution of the figures above
                start = time.perf_counter()
                tmux.screen()
                polls.append(time.perf_counter() - start)
            lines.append(f"one capture-pane poll: median {statistics.median(polls) * 1000:.1f} ms")
        finally:
            subprocess.run(["tmux", "-L", tmux.socket, "kill-server"], capture_output=True, check=False)
    lines.append(f"machine: {machine()}")
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
