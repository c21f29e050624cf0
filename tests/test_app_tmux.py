"""The real app in a real terminal (tmux): start `tdpu`, press r, wait for the run, quit.

Runs on its own tmux server socket so it never touches a user's sessions. Skipped only
when tmux is not installed (CI: `apt-get install tmux`).
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import time

import pytest
from conftest import REPO, write_config

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed"),
]


class Tmux:
    def __init__(self, socket: str):
        self.socket = socket

    def __call__(self, *args: str, check: bool = True) -> str:
        proc = subprocess.run(["tmux", "-L", self.socket, *args], capture_output=True, text=True,
                              timeout=30)
        if check and proc.returncode != 0:
            raise AssertionError(f"tmux {' '.join(args)}: {proc.stderr}")
        return proc.stdout

    def screen(self) -> str:
        return self("capture-pane", "-p", "-t", "tdpu")

    def wait_screen(self, needle: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        text = ""
        while time.monotonic() < deadline:
            text = self.screen()
            if needle in text:
                return text
            time.sleep(0.2)
        raise AssertionError(f"{needle!r} not on screen after {timeout}s:\n{text}")


@pytest.fixture
def tmux():
    t = Tmux(f"tdpu-test-{os.getpid()}")
    yield t
    t("kill-server", check=False)


def test_tdpu_in_a_real_terminal_runs_the_pipeline_and_quits(tmp_path, tmux):
    config = write_config(tmp_path)
    exit_file = tmp_path / "exit_status"
    command = (f"cd {shlex.quote(str(REPO))} && {shlex.quote(sys.executable)} -m tdpu_tui "
               f"--config {shlex.quote(str(config))}; echo $? > {shlex.quote(str(exit_file))}")
    env = {"TERM": "xterm-256color", "TEXTUAL_ANIMATIONS": "none"}
    tmux("new-session", "-d", "-s", "tdpu", "-x", "80", "-y", "24",
         *[a for k, v in env.items() for a in ("-e", f"{k}={v}")], command)
    screen = tmux.wait_screen("1 Pipeline", timeout=60)
    assert "export" in screen and "pending" in screen
    tmux("send-keys", "-t", "tdpu", "r")
    screen = tmux.wait_screen("last run:", timeout=300)
    (tmp_path / "screen.txt").write_text(screen)
    rows: dict[str, str] = {}
    for line in screen.splitlines():  # the table comes first, the detail of a stage below it
        if line.split() and line.split()[0] in ("export", "precheck", "simulate"):
            rows.setdefault(line.split()[0], line)
    assert "✔ ok" in rows["export"] and "✔ ok" in rows["simulate"], screen
    assert "failed" not in screen.split("last run:")[1].splitlines()[0], screen
    tmux("send-keys", "-t", "tdpu", "q")
    deadline = time.monotonic() + 30
    while not exit_file.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert exit_file.read_text().strip() == "0"
