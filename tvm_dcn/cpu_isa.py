"""The SIMD unit an LLVM target generates code for: what the operators' CPU formulations (pixel
padding) and the CPU schedules (vector widths, register tiles) are sized by. Read from the
target alone (its triple, CPU and attributes, through LLVM), so that a workload and its schedule
are the same on every machine that builds for that target."""
from __future__ import annotations

import platform
from dataclasses import dataclass

import tvm

# x86 ISA classes, widest first, with the LLVM features each needs (the target tag's ``isa``).
X86_ISA_ORDER = (("avx512", ("avx512f", "avx512bw", "avx512vl")), ("avx2", ("avx2", "fma")),
                 ("avx", ("avx",)), ("sse4", ("sse4.2",)))


@dataclass(frozen=True)
class CpuVectorUnit:
    """The SIMD unit an LLVM target generates code for, as the CPU schedules size their tiles by:
    ``isa`` (as in target tags), ``vector_bits`` (width of one vector register), ``registers``
    (architectural vector registers) and ``bf16_dot`` (AVX512-BF16's ``vdpbf16ps``: pairs of
    bfloat16 products summed into float32 lanes)."""

    isa: str
    vector_bits: int
    registers: int
    bf16_dot: bool = False

    def lanes(self, dtype: str) -> int:
        """Elements of ``dtype`` in one vector register."""
        return max(1, self.vector_bits // tvm.DataType(dtype).bits)


# isa -> (vector bits, vector registers). SVE is treated as 128-bit NEON: its width is a run-time
# property (128-2048 bits) that fixed-width TIR vectors cannot follow, and 128 bits is its minimum.
_VECTOR_UNITS = {"avx512": (512, 32), "avx2": (256, 16), "avx": (256, 16), "sse4": (128, 16),
                 "neon": (128, 32), "sve": (128, 32), "generic": (128, 16)}
_vector_units: dict[int, tuple[tvm.target.Target, CpuVectorUnit]] = {}


def vector_unit(target: tvm.target.Target) -> CpuVectorUnit:
    """The SIMD unit of an LLVM ``target`` from its triple, CPU and attributes (``mtriple``,
    ``mcpu``, ``mattr``; no triple: this host's architecture): AVX-512 (avx512f): 512-bit x 32
    registers (with ``bf16_dot`` where it has avx512bf16); AVX2 / AVX: 256 x 16; SSE: 128 x 16;
    AArch64 NEON and SVE: 128 x 32."""
    entry = _vector_units.get(id(target))
    if entry is not None and entry[0] is target:
        return entry[1]
    if target.kind.name != "llvm":
        raise ValueError(f"target: {target.kind.name!r} is not a CPU (llvm) target")
    isa = _target_isa(target)
    bf16_dot = isa == "avx512" and bool(tvm.get_global_func("target.llvm_cpu_has_feature")("avx512bf16", target))
    unit = CpuVectorUnit(isa, *_VECTOR_UNITS[isa], bf16_dot=bf16_dot)
    if len(_vector_units) > 64:
        _vector_units.clear()
    _vector_units[id(target)] = (target, unit)
    return unit


def _target_isa(target: tvm.target.Target) -> str:
    """ISA class of an LLVM target, from LLVM's view of its features (attributes included)."""
    arch = str(target.attrs.get("mtriple", "")).split("-")[0] or platform.machine().lower()
    has = tvm.get_global_func("target.llvm_cpu_has_feature")
    if arch in ("aarch64", "arm64"):
        return "sve" if bool(has("sve", target)) else "neon"
    if arch in ("x86_64", "amd64", "i686", "i386"):
        # avx512f alone gives 512-bit float vectors (the tag's avx512 also asks for bw and vl).
        for isa, required in (("avx512", ("avx512f",)),) + X86_ISA_ORDER[1:]:
            if all(bool(has(f, target)) for f in required):
                return isa
    return "generic"
