"""The process-wide registry of prepacked weights: small integer keys, shared by digest.

`create_session` moves each W here; a prepacked node carries only the key, so the weight
never crosses the Python bridge's per-call input copy. Entries are reference-counted by the
sessions that hold them.
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass

import numpy as np


@dataclass
class _Entry:
    packed: np.ndarray
    digest: str
    refs: int = 0


_lock = threading.RLock()
_entries: dict[int, _Entry] = {}
_by_digest: dict[str, int] = {}
_next_key = 1


def _acquire(packed: np.ndarray) -> int:
    global _next_key
    packed = np.ascontiguousarray(packed)
    h = hashlib.blake2b(repr((packed.dtype.str, packed.shape)).encode(), digest_size=16)
    h.update(packed)
    digest = h.hexdigest()
    with _lock:
        key = _by_digest.get(digest)
        if key is None:
            key = _next_key
            _next_key += 1
            _entries[key] = _Entry(packed, digest)
            _by_digest[digest] = key
        _entries[key].refs += 1
        return key


def _release(keys: list[int]) -> None:
    with _lock:
        for key in keys:
            entry = _entries.get(key)
            if entry is None:
                continue
            entry.refs -= 1
            if entry.refs <= 0:
                del _entries[key]
                _by_digest.pop(entry.digest, None)


def cache_info() -> dict:
    """Prepacked weights held for live sessions: {"entries", "bytes"}."""
    with _lock:
        return {"entries": len(_entries),
                "bytes": int(sum(e.packed.nbytes for e in _entries.values()))}
