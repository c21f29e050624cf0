"""x86 8-bit dot-product primitives for numba kernels, one source for every instruction set.

LLVM's loop vectorizer does not form 8-bit dot products (`vpmaddubsw`, `vpdpbusd`) from
scalar loops: the saturating or four-way semantics have to be asked for. These intrinsics
do that and nothing more. A kernel is written once against them and takes an `Isa` tag as
its first argument; numba compiles one specialization per tag (and caches each), so the
tag picks the instructions:

    tag          vector    dot(acc, u, x)                         flush(acc32, acc)
    AVX2         256 bit   acc16 + vpmaddubsw(u, x)    (int16)    acc32 + vpmaddwd(acc, 1)
    AVXVNNI      256 bit   vpdpbusd(acc, u, x)         (int32)    acc32 + acc
    AVX512VNNI   512 bit   vpdpbusd(acc, u, x)         (int32)    acc32 + acc

`u` holds unsigned bytes (here masked 2-bit codes), `x` signed bytes (activations).
`vpmaddubsw` saturates each int16 pair sum; the caller keeps |u| small enough that no pair
sum and no sum of GROUP dots in one int16 lane leaves [-32768, 32767] (`kernels.int8`).
A kernel compiled for a tag whose instructions the CPU lacks fails with SIGILL when it
runs, so only run tags that `available()` lists (compiling and inspecting the assembly
under NUMBA_CPU_NAME / NUMBA_CPU_FEATURES is safe).
"""

from __future__ import annotations

import platform

from llvmlite import ir
from numba.core import cgutils, types
from numba.extending import (
    NativeValue,
    intrinsic,
    models,
    register_model,
    typeof_impl,
    unbox,
)


class Isa:
    """An instruction-set tag handed to a kernel: its numba type selects the instructions."""

    def __init__(self, name: str, bits: int, vnni: bool):
        self.name, self.bits, self.vnni = name, bits, vnni

    @property
    def width(self) -> int:
        """Bytes per vector."""
        return self.bits // 8

    def __repr__(self) -> str:
        return f"Isa({self.name!r})"


AVX2 = Isa("avx2", 256, False)
AVXVNNI = Isa("avxvnni", 256, True)
AVX512VNNI = Isa("avx512vnni", 512, True)
ISAS = {isa.name: isa for isa in (AVX2, AVXVNNI, AVX512VNNI)}


def available(features: set[str]) -> list[Isa]:
    """The tags a CPU with these LLVM features (`avx2`, `avx512vnni`, ...) can run."""
    out = []
    if "avx2" in features:
        out.append(AVX2)
        if "avxvnni" in features or {"avx512vnni", "avx512vl"} <= features:
            out.append(AVXVNNI)
    if {"avx512f", "avx512bw", "avx512vnni"} <= features:
        out.append(AVX512VNNI)
    return out


class IsaType(types.Type):
    def __init__(self, name: str):
        self.isa = ISAS[name]
        super().__init__(name=f"Isa({name})")

    def __reduce__(self):          # picklable for numba's cache index
        return IsaType, (self.isa.name,)


class VecType(types.Type):
    """A vector register of `bits` bits (LLVM <bits/8 x i8>; each op reinterprets the lanes)."""

    def __init__(self, bits: int):
        self.bits = bits
        super().__init__(name=f"Vec{bits}")

    def __reduce__(self):
        return VecType, (self.bits,)


@typeof_impl.register(Isa)
def _typeof_isa(val, c):
    return IsaType(val.name)


register_model(IsaType)(models.OpaqueModel)


@register_model(VecType)
class _VecModel(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, ir.VectorType(ir.IntType(8), fe_type.bits // 8))


@unbox(IsaType)
def _unbox_isa(typ, obj, c):
    return NativeValue(c.context.get_dummy_value())


def _lanes(bits: int, lane: int) -> ir.VectorType:
    return ir.VectorType(ir.IntType(lane), bits // lane)


def _call(builder, name: str, ret: ir.Type, args: list):
    fnty = ir.FunctionType(ret, [a.type for a in args])
    fn = cgutils.get_or_insert_function(builder.module, fnty, name)
    return builder.call(fn, args)


def _splat(builder, vty: ir.VectorType, value):
    vec = builder.insert_element(ir.Constant(vty, ir.Undefined), value, ir.Constant(ir.IntType(32), 0))
    mask = ir.Constant(ir.VectorType(ir.IntType(32), vty.count), [0] * vty.count)
    return builder.shuffle_vector(vec, ir.Constant(vty, ir.Undefined), mask)


@intrinsic
def vzero(typingctx, isa):
    """An all-zero vector."""
    vt = VecType(isa.isa.bits)

    def codegen(context, builder, sig, args):
        return ir.Constant(_lanes(vt.bits, 8), None)
    return vt(isa), codegen


@intrinsic
def vsplat(typingctx, isa, byte):
    """Every byte = `byte` (an integer 0..255)."""
    vt = VecType(isa.isa.bits)

    def codegen(context, builder, sig, args):
        return _splat(builder, _lanes(vt.bits, 8), builder.trunc(args[1], ir.IntType(8)))
    return vt(isa, byte), codegen


@intrinsic
def vload(typingctx, isa, arr, offset):
    """The vector of bytes arr.flat[offset : offset + width] (C-contiguous int8/uint8 array)."""
    if not (isinstance(arr, types.Array) and arr.dtype in (types.int8, types.uint8)):
        return None
    vt = VecType(isa.isa.bits)

    def codegen(context, builder, sig, args):
        ary = context.make_array(sig.args[1])(context, builder, value=args[1])
        off = context.cast(builder, args[2], sig.args[2], types.intp)
        ptr = builder.gep(ary.data, [off])
        vty = _lanes(vt.bits, 8)
        return builder.load(builder.bitcast(ptr, vty.as_pointer()), align=1)
    return vt(isa, arr, offset), codegen


@intrinsic
def vand(typingctx, a, b):
    def codegen(context, builder, sig, args):
        return builder.and_(args[0], args[1])
    return a(a, b), codegen


@intrinsic
def vsrl16(typingctx, a, n):
    """Logical right shift of each 16-bit lane by n (bits cross from the upper byte: mask after)."""
    def codegen(context, builder, sig, args):
        w16 = _lanes(a.bits, 16)
        v = builder.bitcast(args[0], w16)
        s = _splat(builder, w16, builder.trunc(args[1], ir.IntType(16)))
        return builder.bitcast(builder.lshr(v, s), _lanes(a.bits, 8))
    return a(a, n), codegen


@intrinsic
def vdot(typingctx, isa, acc, u, x):
    """acc + the 8-bit dot product of unsigned u and signed x (int16 pairs or int32 quads)."""
    spec = isa.isa

    def codegen(context, builder, sig, args):
        _, acc_v, u_v, x_v = args
        b8 = _lanes(spec.bits, 8)
        if spec.vnni:
            w32 = _lanes(spec.bits, 32)
            name = f"llvm.x86.avx512.vpdpbusd.{spec.bits}"
            r = _call(builder, name, w32, [builder.bitcast(acc_v, w32), builder.bitcast(u_v, w32),
                                           builder.bitcast(x_v, w32)])
            return builder.bitcast(r, b8)
        w16 = _lanes(spec.bits, 16)
        name = "llvm.x86.avx2.pmadd.ub.sw" if spec.bits == 256 else "llvm.x86.avx512.pmaddubs.w.512"
        pairs = _call(builder, name, w16, [u_v, x_v])
        return builder.bitcast(builder.add(builder.bitcast(acc_v, w16), pairs), b8)
    return acc(isa, acc, u, x), codegen


@intrinsic
def vflush(typingctx, isa, acc32, acc):
    """acc32 (int32 lanes) + acc widened to int32 lanes (int16 pairs summed, or as is)."""
    spec = isa.isa

    def codegen(context, builder, sig, args):
        _, a32, a = args
        w32 = _lanes(spec.bits, 32)
        if spec.vnni:
            wide = builder.bitcast(a, w32)
        else:
            w16 = _lanes(spec.bits, 16)
            ones = ir.Constant(w16, [1] * w16.count)
            name = "llvm.x86.avx2.pmadd.wd" if spec.bits == 256 else "llvm.x86.avx512.pmaddw.d.512"
            wide = _call(builder, name, w32, [builder.bitcast(a, w16), ones])
        return builder.bitcast(builder.add(builder.bitcast(a32, w32), wide), _lanes(spec.bits, 8))
    return acc32(isa, acc32, acc), codegen


@intrinsic
def vhsum(typingctx, acc32):
    """The sum of the int32 lanes (wrapping in int32), as an int32."""
    def codegen(context, builder, sig, args):
        w32 = _lanes(acc32.bits, 32)
        return _call(builder, f"llvm.vector.reduce.add.v{w32.count}i32", ir.IntType(32),
                     [builder.bitcast(args[0], w32)])
    return types.int32(acc32), codegen


@intrinsic
def isa_width(typingctx, isa):
    """Bytes per vector of the tag (a compile-time constant)."""
    width = isa.isa.width

    def codegen(context, builder, sig, args):
        return ir.Constant(ir.IntType(64), width)
    return types.int64(isa), codegen


@intrinsic
def isa_vnni(typingctx, isa):
    """True for a tag whose dot products sum in int32 (`vpdpbusd`), a compile-time constant:
    a kernel branching on it keeps only the branch of its tag."""
    vnni = isa.isa.vnni

    def codegen(context, builder, sig, args):
        return ir.Constant(ir.IntType(1), int(vnni))
    return types.boolean(isa), codegen


@intrinsic
def atomic_add(typingctx, arr, index, value):
    """arr[index] += value atomically (sequentially consistent); returns the old value (int64 array)."""
    if not (isinstance(arr, types.Array) and arr.dtype == types.int64):
        return None

    def codegen(context, builder, sig, args):
        ary = context.make_array(sig.args[0])(context, builder, value=args[0])
        i = context.cast(builder, args[1], sig.args[1], types.intp)
        v = context.cast(builder, args[2], sig.args[2], types.int64)
        return builder.atomic_rmw("add", builder.gep(ary.data, [i]), v, "seq_cst")
    return types.int64(arr, index, value), codegen


_X86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686", "x86")
X86 = _X86      # where `cycle_counter` is the TSC (elsewhere LLVM may read a trapping register)


@intrinsic
def announce(typingctx, signal):
    """signal[0] += 1, atomically: the first statement of every kernel run through
    `kernels.pool` (the helpers watching `pool.SIGNAL` start on it; a helper's own copy of
    the kernel gets a private counter)."""
    if not (isinstance(signal, types.Array) and signal.dtype == types.int64):
        return None

    def codegen(context, builder, sig, args):
        ary = context.make_array(sig.args[0])(context, builder, value=args[0])
        builder.atomic_rmw("add", ary.data, ir.Constant(ir.IntType(64), 1), "seq_cst")
        return context.get_dummy_value()
    return types.none(signal), codegen


@intrinsic
def atomic_load(typingctx, arr, index):
    """arr[index] read atomically (acquire), so a loop re-reads it (int64 array)."""
    if not (isinstance(arr, types.Array) and arr.dtype == types.int64):
        return None

    def codegen(context, builder, sig, args):
        ary = context.make_array(sig.args[0])(context, builder, value=args[0])
        i = context.cast(builder, args[1], sig.args[1], types.intp)
        return builder.load_atomic(builder.gep(ary.data, [i]), "acquire", 8)
    return types.int64(arr, index), codegen


@intrinsic
def cpu_relax(typingctx):
    """The spin-wait hint (`pause` on x86; nothing elsewhere)."""
    def codegen(context, builder, sig, args):
        if _X86:
            _call(builder, "llvm.x86.sse2.pause", ir.VoidType(), [])
        return context.get_dummy_value()
    return types.none(), codegen


_LINUX_X86_64 = _X86 and platform.system() == "Linux" and platform.machine().lower() in ("x86_64", "amd64")
if _LINUX_X86_64:
    # numba's JIT parses no inline assembly until the native asm parser is registered.
    from llvmlite import binding as _llvm

    _llvm.initialize_native_asmparser()


@intrinsic
def os_yield(typingctx):
    """Let another runnable thread have this core (`sched_yield`, as a raw system call on
    Linux x86-64, so a numba function using it stays cacheable; nothing elsewhere)."""
    def codegen(context, builder, sig, args):
        if _LINUX_X86_64:
            fnty = ir.FunctionType(ir.IntType(64), [ir.IntType(64)])
            asm = ir.InlineAsm(fnty, "syscall", "={rax},{rax},~{rcx},~{r11},~{memory}",
                               side_effect=True)
            builder.call(asm, [ir.Constant(ir.IntType(64), 24)])      # SYS_sched_yield
        return context.get_dummy_value()
    return types.none(), codegen


@intrinsic
def cycle_counter(typingctx):
    """The CPU's cycle counter (`rdtsc` on x86), for a spin deadline (`kernels.pool`)."""
    def codegen(context, builder, sig, args):
        return _call(builder, "llvm.readcyclecounter", ir.IntType(64), [])
    return types.int64(), codegen
