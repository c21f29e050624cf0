"""Process trees that can be ended as a whole, on POSIX and on Windows.

A child is started in a new session (POSIX: its own process group) or a new process group
(Windows: `CREATE_NEW_PROCESS_GROUP`), so a Ctrl-C meant for tdpu does not reach it and it can
be ended on tdpu's terms. Ending it walks the tree with psutil (`children(recursive=True)`),
terminates every member, waits a grace period and kills what is left. Descendants seen while
the child ran are remembered: on Windows an orphan is no longer anyone's child, and on POSIX
one that left the group would be missed by the group kill.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Sequence

import psutil

IS_WINDOWS = os.name == "nt"


def popen_kwargs() -> dict:
    """What `subprocess.Popen` needs to start a child that can be ended as a whole."""
    if IS_WINDOWS:
        return {"creationflags": getattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0x200)}
    return {"start_new_session": True}


class Tree:
    """The descendants of one child process, as far as they have been seen."""

    MAX_REMEMBERED = 4096

    def __init__(self, pid: int):
        self.pid = pid
        self._seen: dict[int, psutil.Process] = {}
        try:
            self.root: psutil.Process | None = psutil.Process(pid)
        except psutil.Error:
            self.root = None

    def refresh(self) -> None:
        """Remember the descendants the child has now."""
        if self.root is None:
            return
        try:
            kids = self.root.children(recursive=True)
        except psutil.Error:
            return
        for k in kids:
            if len(self._seen) >= self.MAX_REMEMBERED:
                break
            self._seen.setdefault(k.pid, k)

    def members(self) -> list[psutil.Process]:
        """The child (while it runs) and every descendant still running, seen now or before."""
        self.refresh()
        out = []
        if self.root is not None and _running(self.root):
            out.append(self.root)
        out += [p for p in self._seen.values() if _running(p)]
        out += [p for p in _group_members(self.pid) if p.pid not in {q.pid for q in out}]
        return out

    def alive(self) -> bool:
        """Whether any descendant (or the child) still runs."""
        return bool(self.members())

    def end(self, grace: float) -> None:
        """Terminate every member, wait up to `grace` s, kill what is left.

        The members already known (the child, the descendants seen while it ran) are ended
        first, before any scan: walking the process table can take a second on a busy machine
        while the child floods its pipes, and the deadline is the child's, not the scan's.
        Then whatever a fresh walk finds is ended the same way."""
        known = [p for p in ([self.root] if self.root is not None else []) + list(self._seen.values())
                 if _running(p)]
        _end_all(known, grace)
        _end_all([p for p in self.members() if p.pid not in {q.pid for q in known}], grace)


def _end_all(procs: list[psutil.Process], grace: float) -> None:
    for p in procs:
        try:
            p.terminate()
        except psutil.Error:
            pass
    _gone, left = psutil.wait_procs(procs, timeout=max(grace, 0.0))
    for p in left:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(left, timeout=2.0)


def _running(p: psutil.Process) -> bool:
    try:
        # is_running() also checks the creation time: a reused pid is not ours.
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _group_members(pgid: int) -> Sequence[psutil.Process]:
    """POSIX: processes still in the child's process group (its session's own group)."""
    getpgid = getattr(os, "getpgid", None)
    if IS_WINDOWS or getpgid is None:
        return []
    out = []
    for p in psutil.process_iter():
        try:
            if p.pid != os.getpid() and getpgid(p.pid) == pgid and _running(p):
                out.append(p)
        except (OSError, psutil.Error):
            continue
    return out
