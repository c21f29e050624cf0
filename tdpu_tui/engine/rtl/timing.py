"""The core's timing, measured on the built harness (never assumed).

- latency: edges from the one that accepts an input (the edge ending the cycle it is presented
  in, counted as 1) to the one after which `o_data_ready` is high with its result;
- initiation interval: the smallest gap (cycles) between inputs at which every input gets its
  pulse and its exact result, with fresh weights every input and with weights loaded once;
  when no gap up to MAX_GAP is exact, the smallest at which every input is answered. Each
  tile's weights load in the cycle of the previous input; only when no gap gets every input
  answered that way (a core that takes no input in a load cycle) are the loads moved to a
  cycle of their own, one before each input. With weights loaded once, the first input comes
  MAX_GAP cycles after the load (the interval, not the weights' settling time, is measured);
- bubbles: inputs at that interval with random idle cycles (valid low, garbage on `i_data`);
- reset: asserted while results are in flight, then new inputs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tdpu_tui.engine.core.errors import StageFailed
from tdpu_tui.engine.rtl.harness import FLAG_LOAD, FLAG_VALID, Cycles, concat, reset_cycles, run_harness
from tdpu_tui.engine.rtl.tiles import RESET_CYCLES, fresh_schedule, reused_schedule

MAX_GAP = 8


class Unanswered(StageFailed):
    """The core does not give one o_data_ready pulse per input: nothing to compare."""
PROBE_TILES = 64


@dataclass
class Timing:
    latency: int
    ii_fresh: int
    ii_reused: int
    fresh_exact: bool           # exact at ii_fresh (else: only answered)
    reused_exact: bool
    bubbles: str
    reset: str
    notes: list[str] = field(default_factory=list)
    lead: int | None = None     # None: loads with the previous input; d: d cycles before the input

    @property
    def weight_load(self) -> str:
        return ("in the cycle of the previous input" if self.lead is None
                else f"{self.lead} cycle(s) before its input, in a cycle of its own")

    def as_dict(self) -> dict:
        return {"latency_cycles": self.latency, "initiation_interval": self.ii_fresh,
                "initiation_interval_reused": self.ii_reused, "weight_load": self.weight_load,
                "bubbles": self.bubbles, "reset": self.reset}


def _random_tiles(rng: np.random.Generator, count: int, lanes: int) -> tuple[np.ndarray, np.ndarray]:
    return (rng.integers(-128, 128, (count, lanes)).astype(np.int8),
            rng.integers(-1, 2, (count, lanes)).astype(np.int8))


@dataclass
class Answer:
    answered: int
    exact: bool
    latencies: np.ndarray


def match(results: np.ndarray, at: np.ndarray, expected: np.ndarray) -> Answer:
    """Pulses taken in order as the inputs' results."""
    n = min(len(results), len(at))
    lat = results["cycle"][:n].astype(np.int64) - at[:n] + 1
    exact = len(results) == len(at) and np.array_equal(results["result"].astype(np.int64), expected)
    return Answer(len(results), bool(exact), lat)


class Probe:
    def __init__(self, binary: Path, lanes: int, codes: tuple[int, int, int], *, timeout_s: float,
                 cancelled: Callable[[], bool] | None = None, workdir: Path | None = None, seed: int = 1):
        self.binary, self.lanes, self.timeout_s, self.cancelled, self.workdir = (
            binary, lanes, timeout_s, cancelled, workdir)
        self.table = np.array(codes, np.uint8)
        self.rng = np.random.default_rng(seed)

    def run(self, cycles: Cycles) -> np.ndarray:
        return run_harness(self.binary, cycles, timeout_s=self.timeout_s, cancelled=self.cancelled,
                           workdir=self.workdir)

    def codes(self, w: np.ndarray) -> np.ndarray:
        return self.table[w.astype(np.int64) + 1]

    def latency(self) -> int:
        x, w = _random_tiles(self.rng, 1, self.lanes)
        cycles, at = fresh_schedule(x, self.codes(w))
        res = self.run(cycles)
        if len(res) == 0:
            raise Unanswered("the core gave no o_data_ready pulse within "
                              f"{len(cycles) - at[0]} cycles of one input (ready port wrong, or reset polarity?)")
        return int(res["cycle"][0] - at[0] + 1)

    def interval(self, fresh: bool) -> tuple[int, bool, list[str], int | None]:
        """(gap, exact at it, notes, lead of the weight loads): see the module's docstring."""
        which = "fresh" if fresh else "reused"
        notes: list[str] = []
        lead = None
        exact, gap = self._first(fresh, [(g, None) for g in range(1, MAX_GAP + 1)])
        if gap is None and fresh:
            exact, gap = self._first(fresh, [(g, 1) for g in range(2, MAX_GAP + 1)])
            if gap is not None:
                lead = 1
                notes.append("inputs presented in the cycle of a weight load get no o_data_ready pulse: "
                             "each tile's weights are loaded 1 cycle before its input, in a cycle of its own")
        if gap is None:
            raise Unanswered(f"the core does not answer every input at any interval up to {MAX_GAP} cycles "
                              f"({which} weights): one o_data_ready pulse per input expected")
        if not exact:
            notes.append(f"with {which} weights no interval up to {MAX_GAP} cycles gave exact results; "
                         f"every input is answered from {gap} cycle(s) apart")
        return gap, exact, notes, lead

    def _first(self, fresh: bool, tries: list[tuple[int, int | None]]) -> tuple[bool, int | None]:
        """(True, gap) at the first exact try; else (False, the first gap answering every input or None)."""
        answered_at = None
        for gap, lead in tries:
            x, w = _random_tiles(self.rng, PROBE_TILES, self.lanes)
            if fresh:
                cycles, at = fresh_schedule(x, self.codes(w), gap, lead)
            else:
                w[:] = w[0]
                cycles, at = reused_schedule(x, self.codes(w[0]), gap, settle=MAX_GAP)
            exp = np.einsum("tl,tl->t", x.astype(np.int64), w.astype(np.int64))
            a = match(self.run(cycles), at, exp)
            if a.exact:
                return True, gap
            if a.answered == PROBE_TILES and answered_at is None:
                answered_at = gap
        return False, answered_at

    def bubbles(self, gap: int, latency: int, count: int = 256, lead: int | None = None) -> str:
        x, w = _random_tiles(self.rng, count, self.lanes)
        exp = np.einsum("tl,tl->t", x.astype(np.int64), w.astype(np.int64))
        idle = self.rng.integers(0, 4, count)
        slots = gap + idle
        first = gap if lead is None else lead
        at = np.concatenate([[first], first + np.cumsum(slots[:-1])])
        total = int(at[-1]) + gap + 256
        c = Cycles.empty(total, self.lanes)
        c.data[:] = self.rng.integers(-128, 128, c.data.shape).astype(np.int8)   # garbage while not valid
        # tile i+1's weights with input i (tile 0's `gap` ahead), or each `lead` cycles before its input
        loads = np.concatenate([[0], at[:-1]]) if lead is None else at - lead
        c.flags[loads] = FLAG_LOAD
        c.codes[loads] = self.codes(w)
        c.flags[at] |= FLAG_VALID
        c.data[at] = x
        at = at + RESET_CYCLES
        a = match(self.run(concat([reset_cycles(self.lanes, RESET_CYCLES), c])), at, exp)
        fixed = len(a.latencies) and bool((a.latencies == latency).all())
        return (f"{count} inputs with 0–3 idle cycles between them (valid low, other data on i_data): "
                f"{a.answered} answered, {'all exact' if a.exact else 'NOT all exact'}, latency "
                + ("unchanged" if fixed else "varies"))

    def reset(self, gap: int, latency: int, lead: int | None = None) -> str:
        before, after = 16, 16
        x1, w1 = _random_tiles(self.rng, before, self.lanes)
        x2, w2 = _random_tiles(self.rng, after, self.lanes)
        exp2 = np.einsum("tl,tl->t", x2.astype(np.int64), w2.astype(np.int64))
        c1, at1 = fresh_schedule(x1, self.codes(w1), gap, lead)
        cut = int(at1[-1]) + 1                       # reset the cycle after the last input
        c1 = Cycles(c1.flags[:cut], c1.data[:cut], c1.codes[:cut])
        c2, at2 = fresh_schedule(x2, self.codes(w2), gap, lead)
        res = self.run(concat([c1, c2]))
        in_flight = min(before, max(0, latency - 1))
        answered = int((res["cycle"] < cut).sum())
        stale = int(((res["cycle"] >= cut) & (res["cycle"] < cut + at2[0])).sum())
        a = match(res[res["cycle"] >= cut + at2[0]], at2 + cut, exp2)
        return (f"asserted with up to {in_flight} result(s) in flight: {answered} of {before} inputs "
                f"answered before it, {stale} pulse(s) during or right after it; the next {after} inputs "
                + ("all exact" if a.exact else f"{a.answered} answered, NOT all exact"))


def measure(binary: Path, lanes: int, codes: tuple[int, int, int], *, timeout_s: float,
            cancelled: Callable[[], bool] | None = None, workdir: Path | None = None) -> Timing:
    p = Probe(binary, lanes, codes, timeout_s=timeout_s, cancelled=cancelled, workdir=workdir)
    latency = p.latency()
    ii_fresh, fresh_exact, notes, lead = p.interval(True)
    ii_reused, reused_exact, more, _ = p.interval(False)
    return Timing(latency, ii_fresh, ii_reused, fresh_exact, reused_exact,
                  p.bubbles(ii_fresh, latency, lead=lead), p.reset(ii_fresh, latency, lead), notes + more, lead)
