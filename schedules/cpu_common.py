"""Helpers shared by the CPU hand schedules."""
from __future__ import annotations


def vector_lanes(dtype: str, target) -> int:
    """SIMD lanes of ``dtype`` on ``target`` (256-bit vectors unless the CPU has AVX-512)."""
    bits = 512 if "avx512" in str(target.attrs.get("mcpu", "")) or _has_avx512(target) else 256
    return max(1, bits // (8 * _dtype_bytes(dtype)))


def _dtype_bytes(dtype: str) -> int:
    return {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}.get(dtype, 4)


def _has_avx512(target) -> bool:
    try:
        import tvm

        return bool(tvm.get_global_func("target.llvm_cpu_has_feature")("avx512f", target))
    except Exception:
        return False


def largest_divisor(n: int, limit: int, multiple_of: int = 1) -> int:
    """The largest d <= limit dividing n with d % multiple_of == 0 (at least ``multiple_of`` if it divides n, else 1)."""
    for d in range(min(n, limit), 0, -1):
        if n % d == 0 and d % multiple_of == 0:
            return d
    return 1


def parallel_vectorize(sch, block: str, parallel_axes: int, lanes: int) -> None:
    """Fuse the first ``parallel_axes`` loops into a parallel loop and vectorise the innermost loop
    by ``lanes`` (its extent must be a multiple of ``lanes``)."""
    loops = sch.get_loops(sch.get_sblock(block))
    outer = sch.fuse(*loops[:parallel_axes]) if parallel_axes > 1 else loops[0]
    sch.parallel(outer)
    _, inner = sch.split(loops[-1], [None, lanes])
    sch.vectorize(inner)
