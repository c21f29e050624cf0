"""The integer core on AMX-INT8 tiles: `tdpbusd`, 16 x 16 x 64 unsigned x signed bytes per instruction.

Same contract as `kernels.bitlinear.ternary_matmul_int` (int8 [M, K] x packed [N/4, K] in
either layout -> int32 [M, N], exact), for the prefill regime on CPUs with AMX (Intel Sapphire
Rapids and later). One `tdpbusd` multiplies a 16 x 64 tile of unsigned bytes by a 64 x 16 tile
of signed bytes into 16 x 16 int32 sums: 16,384 multiply-adds, against 64 for a 512-bit
`vpdpbusd`.

    A (unsigned, tile 4)  the masked codes of 16 packed rows, 64 k:  b & 0x03, b & 0x0C,
                          b & 0x30, b & 0xC0  = c_i << 2i  (each <= 128, code 3 is refused)
    B (signed,   tile 5)  the activations of 16 rows m, 64 k, in the tile's pair-of-four
                          layout B[k/4][4 m + k % 4] = q[m, k] (`_activation_tiles`, once
                          per product)
    C (int32, tiles 0-3)  one per code i: sum_k A_i[r, k] q[m, k], over all K

Then `acc[m, row_of(r, i)] = (C_i[r, m] >> 2i) - sum_k q[m, k]` (exact: every term of C_i is a
multiple of 4^i; w = c - 1), as in the vector paths. Sums stay below 192 * 128 * K (checked
by the caller: K <= MAX_K), and `tdpbusd` accumulates in int32 without saturation.

Work: groups of 16 packed rows (64 outputs), claimed by the caller and `kernels.pool`'s helpers.
A thread unpacks its group's codes once into a 4 x 16 x K scratch (160 KB at K = 2560, in L2)
and runs every 16-row block of activations past it. M, K and the number of packed rows need not
be multiples of 16 / 64: the scratch and the activation tiles are zero-padded, and padded
outputs are not written.

Linux gives a process the AMX register state only on request (`arch_prctl(ARCH_REQ_XCOMP_PERM,
XFEATURE_XTILEDATA)`, kernel 5.16+); `enable()` asks once. Without it (older kernel, another
system) the path is not offered: running a tile instruction then would be SIGILL.
"""

from __future__ import annotations

import ctypes
import functools
import platform
import sys

import numpy as np
from llvmlite import ir
from numba.core import cgutils, types
from numba.extending import intrinsic

from kernels import pool
from kernels.bitlinear import _jit
from kernels.simd import announce, atomic_add

ROWS = 16        # tile rows: packed rows per group, activation rows per block
STEP = 64        # bytes of K per tile row
CODE_MASKS = (0x03, 0x0C, 0x30, 0xC0)

_ARCH_REQ_XCOMP_PERM = 0x1023
_XFEATURE_XTILEDATA = 18
_SYS_ARCH_PRCTL = 158     # x86-64


@functools.cache
def enable() -> bool:
    """Ask the OS for this process's AMX tile state (once); True when granted."""
    # The system call number is arch_prctl's on x86-64 Linux only.
    if not sys.platform.startswith("linux") or platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.syscall.restype = ctypes.c_long
        return libc.syscall(ctypes.c_long(_SYS_ARCH_PRCTL), ctypes.c_long(_ARCH_REQ_XCOMP_PERM),
                            ctypes.c_long(_XFEATURE_XTILEDATA)) == 0
    except (OSError, AttributeError):
        return False


def _call(builder, name: str, args: list) -> None:
    fnty = ir.FunctionType(ir.VoidType(), [a.type for a in args])
    builder.call(cgutils.get_or_insert_function(builder.module, fnty, name), args)


def _byte_ptr(context, builder, aty, aval, off, offty):
    ary = context.make_array(aty)(context, builder, value=aval)
    base = builder.bitcast(ary.data, ir.IntType(8).as_pointer())
    return builder.gep(base, [context.cast(builder, off, offty, types.intp)])


def _tile_id(t) -> int | None:
    return t.literal_value if isinstance(t, types.IntegerLiteral) and 0 <= t.literal_value < 8 else None


@intrinsic
def tile_config(typingctx, cfg):
    """Load the 64-byte tile configuration `cfg` (uint8 array)."""
    def codegen(context, builder, sig, args):
        zero = context.get_constant(types.intp, 0)
        _call(builder, "llvm.x86.ldtilecfg", [_byte_ptr(context, builder, sig.args[0], args[0], zero, types.intp)])
        return context.get_dummy_value()
    return types.none(cfg), codegen


def _tile_memory(llvm_name: str, doc: str):
    """An intrinsic (tile, arr, offset, stride) moving one tile between a tile register (a
    constant) and arr's bytes from byte `offset`, rows `stride` bytes apart."""
    def typer(typingctx, tile, arr, offset, stride):
        if _tile_id(tile) is None:
            return None

        def codegen(context, builder, sig, args):
            ptr = _byte_ptr(context, builder, sig.args[1], args[1], args[2], sig.args[2])
            _call(builder, llvm_name, [ir.Constant(ir.IntType(8), _tile_id(sig.args[0])), ptr,
                                       context.cast(builder, args[3], sig.args[3], types.int64)])
            return context.get_dummy_value()
        return types.none(tile, arr, offset, stride), codegen
    typer.__doc__ = doc
    return intrinsic(typer)


tile_load = _tile_memory("llvm.x86.tileloadd64", "Tile <- rows of arr's bytes.")
tile_store = _tile_memory("llvm.x86.tilestored64", "Rows of the tile -> arr's bytes.")


@intrinsic
def tile_zero(typingctx, tile):
    if _tile_id(tile) is None:
        return None

    def codegen(context, builder, sig, args):
        _call(builder, "llvm.x86.tilezero", [ir.Constant(ir.IntType(8), _tile_id(sig.args[0]))])
        return context.get_dummy_value()
    return types.none(tile), codegen


@intrinsic
def tile_dot(typingctx, c, a, b):
    """c += a (unsigned bytes) . b (signed bytes), int32 sums (`tdpbusd`)."""
    if None in (_tile_id(c), _tile_id(a), _tile_id(b)):
        return None

    def codegen(context, builder, sig, args):
        _call(builder, "llvm.x86.tdpbusd", [ir.Constant(ir.IntType(8), _tile_id(t)) for t in sig.args])
        return context.get_dummy_value()
    return types.none(c, a, b), codegen


@intrinsic
def tile_release(typingctx):
    def codegen(context, builder, sig, args):
        _call(builder, "llvm.x86.tilerelease", [])
        return context.get_dummy_value()
    return types.none(), codegen


def _config() -> np.ndarray:
    """Palette 1; tiles 0-5 all 16 rows x 64 bytes."""
    cfg = np.zeros(64, np.uint8)
    cfg[0] = 1
    cfg[16:32].view(np.uint16)[:6] = STEP
    cfg[48:54] = ROWS
    return cfg


CONFIG = _config()


@_jit()
def _activation_tiles(q, k_pad):
    """q [M, K] -> B tiles [M/16, K/4, 64] (zero-padded): B[mb, j, 4 m + t] = q[16 mb + m, 4 j + t]."""
    m_rows, k_dim = q.shape
    blocks = (m_rows + ROWS - 1) // ROWS
    qv = np.zeros((blocks, k_pad // 4, 4 * ROWS), np.int8)
    for m in range(m_rows):
        mb = m // ROWS
        col = 4 * (m % ROWS)
        for k in range(k_dim):
            qv[mb, k >> 2, col + (k & 3)] = q[m, k]
    return qv


@_jit()
def _unpack_group(p, r0, u):
    """u[i, rr, k] = p[r0 + rr, k] & CODE_MASKS[i] for the group's packed rows (others stay 0)."""
    rows = min(ROWS, p.shape[0] - r0)
    k_dim = p.shape[1]
    for rr in range(rows):
        for k in range(k_dim):
            b = p[r0 + rr, k]
            u[0, rr, k] = b & 0x03
            u[1, rr, k] = b & 0x0C
            u[2, rr, k] = b & 0x30
            u[3, rr, k] = b & 0xC0
    for rr in range(rows, ROWS):
        for i in range(4):
            for k in range(k_dim):
                u[i, rr, k] = 0


@_jit()
def rows_claimed(cfg, qv, sumq, p, out, row_stride, code_stride, ctrl, signal):
    """Groups of 16 packed rows x every activation block, claimed from ctrl[0] (`kernels.pool`)."""
    announce(signal)
    m_rows = out.shape[0]
    blocks = qv.shape[0]
    k_pad = qv.shape[1] * 4
    steps = k_pad // STEP
    b_block = qv.shape[1] * qv.shape[2]          # bytes of one activation block
    a_code = ROWS * k_pad                         # bytes of one code's rows in the scratch
    groups = (p.shape[0] + ROWS - 1) // ROWS
    u = np.zeros((4, ROWS, k_pad), np.uint8)
    c = np.empty((4, ROWS, ROWS), np.int32)
    tile_config(cfg)
    while True:
        g = atomic_add(ctrl, 0, 1)
        if g >= groups:
            break
        r0 = g * ROWS
        rows = min(ROWS, p.shape[0] - r0)
        _unpack_group(p, r0, u)
        for mb in range(blocks):
            tile_zero(0)
            tile_zero(1)
            tile_zero(2)
            tile_zero(3)
            for s in range(steps):
                tile_load(5, qv, mb * b_block + s * ROWS * 4 * ROWS, 4 * ROWS)
                tile_load(4, u, 0 * a_code + s * STEP, k_pad)
                tile_dot(0, 4, 5)
                tile_load(4, u, 1 * a_code + s * STEP, k_pad)
                tile_dot(1, 4, 5)
                tile_load(4, u, 2 * a_code + s * STEP, k_pad)
                tile_dot(2, 4, 5)
                tile_load(4, u, 3 * a_code + s * STEP, k_pad)
                tile_dot(3, 4, 5)
            tile_store(0, c, 0 * 4 * ROWS * ROWS, 4 * ROWS)
            tile_store(1, c, 1 * 4 * ROWS * ROWS, 4 * ROWS)
            tile_store(2, c, 2 * 4 * ROWS * ROWS, 4 * ROWS)
            tile_store(3, c, 3 * 4 * ROWS * ROWS, 4 * ROWS)
            m_end = min(ROWS, m_rows - mb * ROWS)
            for i in range(4):
                for rr in range(rows):
                    n = (r0 + rr) * row_stride + i * code_stride
                    for mm in range(m_end):
                        m = mb * ROWS + mm
                        out[m, n] = (c[i, rr, mm] >> (2 * i)) - sumq[m]
        atomic_add(ctrl, 1, 1)
    tile_release()


def rows_shared(q, sumq, p, out, row_stride, code_stride):
    """The whole product (any M) on the caller and `kernels.pool`'s helpers."""
    if not enable():
        raise RuntimeError("the OS did not grant this process the AMX tile state "
                           "(arch_prctl ARCH_REQ_XCOMP_PERM); use another kernel path")
    k_pad = -(-p.shape[1] // STEP) * STEP
    qv = _activation_tiles(q, k_pad)
    groups = -(-p.shape[0] // ROWS)
    pool.run_claimed(rows_claimed, (CONFIG, qv, sumq, p, out, row_stride, code_stride), groups)
