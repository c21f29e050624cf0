"""The collector after a run: what the engine leaves loaded is frozen, not walked again.

A run imports torch, ONNX and ONNX Runtime and leaves ~570,000 long-lived Python objects
behind (the modules, their registries, caches). CPython's full collection walks all of them:
on the 2-core development machine each pass took up to 1.2 s, and the app's own allocations
(each tab switch, each repaint) set one off every few seconds — the idle key stalls of
issue #13.15. After each run the heap is collected once (the run's own cyclic garbage is
freed) and what survives is moved to the permanent generation (`gc.freeze`), so later passes
walk only what the app made since. The next run unfreezes first, so nothing frozen
outlives the collection that follows it.
"""

from __future__ import annotations

import gc


def before_run() -> None:
    """Give the frozen objects back to the collector: the run may drop them."""
    gc.unfreeze()


def after_run() -> None:
    """Collect the run's garbage once and freeze the survivors (runs in the run's thread)."""
    gc.collect()
    gc.freeze()
