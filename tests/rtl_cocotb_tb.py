"""cocotb 2.x directed tests of a docs/spec.md §8 BitLinear core (run by tests/test_rtl_cocotb.py).

Reset, one input (latency), back-to-back inputs with fresh weights and with reused weights
(initiation interval), bubbles, reset with results in flight; every result checked against
the tile's sum. The figures go to the JSON file named by TDPU_TB_OUT, for the test to compare
with what the stage's C++ harness measures on the same core.

Cycle c is the one whose inputs the rising edge c samples; outputs read just after edge c
belong to cycle c, and latency = c(ready) - c(input) + 1, as in engine/rtl/timing.py.
"""

import json
import os
import random

import cocotb
from cocotb.clock import Clock
from cocotb.triggers import FallingEdge, ReadOnly, RisingEdge

CODES = {-1: 0, 0: 1, 1: 2}


def pack(xs, ws):
    data = sum((x & 0xFF) << (8 * i) for i, x in enumerate(xs))
    weight = sum(CODES[w] << (2 * i) for i, w in enumerate(ws))
    return data, weight


async def run(dut, cycles):
    """cycles: list of (valid, load, reset, xs, ws); the (cycle, result) of every ready pulse."""
    out = []
    lanes = len(cycles[0][3])
    for c, (valid, load, reset, xs, ws) in enumerate(cycles):
        await FallingEdge(dut.clk)
        data, weight = pack(xs or [0] * lanes, ws or [0] * lanes)
        dut.rst_n.value = 0 if reset else 1
        dut.i_data_valid.value = int(valid)
        dut.i_load_weight.value = int(load)
        dut.i_data.value = data
        dut.i_weight.value = weight
        await RisingEdge(dut.clk)
        await ReadOnly()
        if int(dut.o_data_ready.value):
            out.append((c, dut.o_result.value.to_signed()))
    return out


def tiles(rng, count, lanes, same_weights=False):
    w0 = [rng.choice((-1, 0, 1)) for _ in range(lanes)]
    out = []
    for _ in range(count):
        xs = [rng.randrange(-128, 128) for _ in range(lanes)]
        ws = w0 if same_weights else [rng.choice((-1, 0, 1)) for _ in range(lanes)]
        out.append((xs, ws))
    return out


def fresh(ts, gaps, lanes, reset=4):
    """Reset, tile 0's weights (gaps[0] cycles ahead of input 0), then input i with the load of
    tile i+1's weights."""
    zero = [0] * lanes
    cyc = [(0, 0, 1, zero, zero)] * reset + [(0, 1, 0, zero, ts[0][1])] + [(0, 0, 0, zero, zero)] * (gaps[0] - 1)
    at = []
    for i, (xs, _) in enumerate(ts):
        nxt = ts[i + 1][1] if i + 1 < len(ts) else None
        at.append(len(cyc))
        cyc.append((1, nxt is not None, 0, xs, nxt or zero))
        cyc += [(0, 0, 0, xs, zero)] * (gaps[i] - 1)   # valid low, the same data left on the bus
    return cyc, at


def reused(ts, gap, lanes, reset=4, settle=8):
    """Reset, one load, the first input `settle` cycles later, then every input `gap` apart."""
    zero = [0] * lanes
    cyc = [(0, 0, 1, zero, zero)] * reset + [(0, 1, 0, zero, ts[0][1])] + [(0, 0, 0, zero, zero)] * (settle - 1)
    at = []
    for xs, _ in ts:
        at.append(len(cyc))
        cyc.append((1, 0, 0, xs, zero))
        cyc += [(0, 0, 0, zero, zero)] * (gap - 1)
    return cyc, at


def expected(ts):
    return [sum(x * w for x, w in zip(xs, ws)) for xs, ws in ts]


def exact(out, ts):
    return len(out) == len(ts) and [r for _, r in out] == expected(ts)


@cocotb.test()
async def timing(dut):
    lanes = len(dut.i_weight.value) // 2
    rng = random.Random(3)
    cocotb.start_soon(Clock(dut.clk, 10, unit="ns").start())
    drain = [(0, 0, 0, [0] * lanes, [0] * lanes)] * 24
    found = {}

    one = tiles(rng, 1, lanes)
    cyc, at = fresh(one, [1], lanes)
    out = await run(dut, cyc + drain)
    assert len(out) == 1, f"one input: {len(out)} ready pulses"
    assert exact(out, one), f"one input: expected {expected(one)}, got {out}"
    found["latency"] = out[0][0] - at[0] + 1

    for name, schedule in (("ii_fresh", lambda ts, g: fresh(ts, [g] * len(ts), lanes)),
                           ("ii_reused", lambda ts, g: reused(ts, g, lanes))):
        for gap in range(1, 5):
            ts = tiles(rng, 24, lanes, same_weights=name == "ii_reused")
            cyc, at = schedule(ts, gap)
            out = await run(dut, cyc + drain)
            if exact(out, ts):
                found[name] = gap
                assert [c - a + 1 for (c, _), a in zip(out, at)] == [found["latency"]] * len(ts), \
                    f"{name}: latency not fixed"
                break
        else:
            raise AssertionError(f"{name}: no interval up to 4 cycles gave exact results")

    ts = tiles(rng, 48, lanes)
    gaps = [found["ii_fresh"] + rng.randrange(0, 4) for _ in ts]
    cyc, at = fresh(ts, gaps, lanes)
    out = await run(dut, cyc + drain)
    found["bubbles_exact"] = exact(out, ts)
    found["bubbles_latency_fixed"] = [c - a + 1 for (c, _), a in zip(out, at)] == [found["latency"]] * len(out)

    first = tiles(rng, 8, lanes)
    cyc1, at1 = fresh(first, [found["ii_fresh"]] * 8, lanes)
    cut = at1[-1] + 1
    second = tiles(rng, 8, lanes)
    cyc2, at2 = fresh(second, [found["ii_fresh"]] * 8, lanes)
    out = await run(dut, cyc1[:cut] + cyc2 + drain)
    found["reset_stale_pulses"] = sum(1 for c, _ in out if cut <= c < cut + at2[0])
    found["reset_then_exact"] = exact([(c, r) for c, r in out if c >= cut + at2[0]], second)

    with open(os.environ["TDPU_TB_OUT"], "w") as fh:
        json.dump(found, fh)
