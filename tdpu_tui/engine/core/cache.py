"""The run cache: what several stages of one run load — a graph's index, an ONNX Runtime session,
the PyTorch reference — loaded once and handed to each of them.

Entries are keyed by what they were loaded from (the file's path, size and modification time),
so a file a later stage rewrites (an export run again) is never served from an older load. Large
entries say how many bytes they hold. What is held stays within a budget (a quarter of the
machine's memory by default): an entry larger than that is loaded for its caller and not kept,
and before something large is loaded, `make_room` drops held entries (largest first) until it
fits; a load larger than the budget runs alone (the reference goes, its logits stay), so sharing
never raises a run's peak memory above its largest single load or the budget. At the full 2B4T
shapes the float graph (9 GiB of float32 weights) is too large for one session: it runs in
segments (`model.segmented`), and what is held of it is the plan; each segment calls `make_room`
before its weights are loaded, so a segment and what is held stay within the budget together.
The PyTorch reference (3.4 GiB) and its logits are shared.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import psutil

from tdpu_tui.engine.osutil.platform import release_free_memory

T = TypeVar("T")


def free_memory() -> None:
    """Collect what is no longer referenced and hand the freed memory back to the system (glibc
    keeps gigabytes of a dropped reference or session resident otherwise)."""
    gc.collect()
    release_free_memory()


def file_key(path: str | Path) -> tuple[str, int, int]:
    """(resolved path, size, mtime in ns) of `path`; a rewritten file gets a new key."""
    p = Path(path).resolve()
    st = p.stat()
    return str(p), st.st_size, st.st_mtime_ns


@dataclass
class _Entry:
    value: Any
    nbytes: int


class RunCache:
    """Loads shared by the stages of one pipeline run (`ctx.cache`)."""

    def __init__(self, budget: float = 0.25, headroom: float = 0.15):
        total = psutil.virtual_memory().total
        # Bytes the cache may hold, and bytes kept free when making room for a large load.
        self.budget = int(budget * total)
        self.headroom = int(headroom * total)
        self._entries: dict[tuple, _Entry] = {}
        self._lock = threading.RLock()
        self.loads: dict[str, int] = {}     # kind -> times actually loaded (for tests and logs)

    def get(self, kind: str, key: tuple, load: Callable[[], T], nbytes: int = 0) -> T:
        """The entry (`kind`, `key`), loaded with `load()` the first time. `nbytes` is what it
        holds in memory (0 for small things): room is made for it first."""
        full = (kind, *key)
        with self._lock:
            entry = self._entries.get(full)
            if entry is not None:
                return entry.value
            if nbytes:
                self.make_room(nbytes)
            value = load()
            self.loads[kind] = self.loads.get(kind, 0) + 1
            if nbytes <= self.budget:
                self._entries[full] = _Entry(value, nbytes)
            return value

    def for_file(self, kind: str, path: str | Path, load: Callable[[], T], *extra: Any,
                 nbytes: int = 0) -> T:
        """`get` keyed by the file `path` (path, size, mtime) plus `extra`."""
        return self.get(kind, (*file_key(path), *extra), load, nbytes)

    def put(self, kind: str, key: tuple, value: Any, nbytes: int = 0) -> None:
        """Hand an entry loaded elsewhere (e.g. a session made before its file got its final name)."""
        if nbytes > self.budget:
            return
        with self._lock:
            self.make_room(nbytes)
            self._entries[(kind, *key)] = _Entry(value, nbytes)

    def drop(self, kind: str | None = None) -> int:
        """Forget entries (of `kind`, or all); returns the bytes they held."""
        with self._lock:
            gone = [k for k in self._entries if kind is None or k[0] == kind]
            freed = sum(self._entries.pop(k).nbytes for k in gone)
        if gone:
            free_memory()
        return freed

    def held_bytes(self) -> int:
        with self._lock:
            return sum(e.nbytes for e in self._entries.values())

    def make_room(self, nbytes: int) -> None:
        """Drop large entries, largest first, until `nbytes` more fit: within the budget (when
        they are to be held) and with the headroom kept free on the machine. A load too large to
        be held runs alone: every large entry goes first, so the run's peak is that load, not
        that load plus what the cache holds."""
        with self._lock:
            large = self.budget // 8
            while (psutil.virtual_memory().available < nbytes + self.headroom
                   or (nbytes <= self.budget and self.held_bytes() + nbytes > self.budget)
                   or (nbytes > self.budget
                       and any(e.nbytes > large for e in self._entries.values()))):
                big = [k for k, e in self._entries.items() if e.nbytes]
                if not big:
                    return
                victim = max(big, key=lambda k: self._entries[k].nbytes)
                del self._entries[victim]
                free_memory()

    def clear(self) -> None:
        self.drop()
