"""Which results on the Pipeline tab are old: a stage they need ran again since, or failed, or
was cancelled — in this session or in another process (`runs/status.json`).

Plain data in, plain data out (no widgets), so the rule is tested on its own. The stage order
and the `needs` come from the rows, which come from the registry.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from tdpu_tui.engine.core.events import Status


class RowLike(Protocol):
    name: str
    needs: tuple[str, ...]
    status: Status
    ran_at: float | None
    blocked_by: str | None


@dataclass(frozen=True)
class Stale:
    cause: str      # the stage, upstream, whose newer run (or failure, or cancel) made this old
    what: str       # what happened to it: "ran", "failed", "was cancelled", "is running", …

    def label(self) -> str:
        if self.what in ("is running", "runs again"):
            return f"old ({self.cause} {self.what})"
        return f"old ({self.cause} {self.what} since)"


_WHAT = {Status.OK: "ran", Status.SKIPPED: "ran", Status.FAILED: "failed",
         Status.CANCELLED: "was cancelled", Status.RUNNING: "is running",
         Status.PENDING: "runs again"}


def stale_rows(rows: Mapping[str, RowLike]) -> dict[str, Stale]:
    """Stage -> why its shown result is old. `rows` in run order (a stage after what it needs).

    A result is old when a stage it needs has a run that started after its own (ok, failed,
    cancelled, or running now), or when that stage's own result is old. A stage skipped on its
    own (nothing to do) wrote nothing, so it makes nothing old; one skipped because a stage it
    needs failed passes that failure on.
    """
    out: dict[str, Stale] = {}
    for row in rows.values():
        if row.status in (Status.PENDING, Status.RUNNING) or row.ran_at is None:
            continue
        for need in row.needs:
            up = rows.get(need)
            if up is None:
                continue
            if need in out:
                out[row.name] = out[need]
                break
            if up.ran_at is None or up.ran_at <= row.ran_at:
                continue
            if up.status is Status.SKIPPED and up.blocked_by is None:
                continue
            if up.status is Status.SKIPPED:     # not run because its root failed: that is the news
                out[row.name] = Stale(up.blocked_by or need, "failed")
            else:
                out[row.name] = Stale(need, _WHAT[up.status])
            break
    return out
