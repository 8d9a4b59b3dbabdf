"""Helpers shared by the CPU hand schedules."""
from __future__ import annotations

from typing import Optional

from .._utils import dtype_bytes, largest_divisor


def vector_lanes(dtype: str, target) -> int:
    """SIMD lanes of ``dtype`` on ``target`` (256-bit vectors unless the CPU has AVX-512)."""
    bits = 512 if "avx512" in str(target.attrs.get("mcpu", "")) or _has_avx512(target) else 256
    return max(1, bits // (8 * dtype_bytes(dtype)))


def _has_avx512(target) -> bool:
    try:
        import tvm

        return bool(tvm.get_global_func("target.llvm_cpu_has_feature")("avx512f", target))
    except Exception:
        return False


def parallel_vectorize(sch, block: str, parallel_axes: int, lanes: int) -> None:
    """Fuse the first ``parallel_axes`` loops into a parallel loop and vectorise the innermost loop
    by ``lanes`` (its extent must be a multiple of ``lanes``)."""
    loops = sch.get_loops(sch.get_sblock(block))
    outer = sch.fuse(*loops[:parallel_axes]) if parallel_axes > 1 else loops[0]
    sch.parallel(outer)
    _, inner = sch.split(loops[-1], [None, lanes])
    sch.vectorize(inner)


# A (rows x lanes) accumulator tile must fit the 16 vector registers of AVX2 with room for loads.
ACCUMULATOR_VECTORS = 8
# Output rows (channels) per parallel task of a GEMM: its weight slice stays in L2.
ROW_BLOCK = 64


def core_count(target) -> int:
    return int(target.attrs.get("num-cores", 1) or 1)


def vector_registers(target) -> int:
    """Architectural vector registers: 32 with AVX-512, 16 with AVX2 (and other CPUs assumed so)."""
    return 32 if _has_avx512(target) else 16


def blocked_gemm(sch, block: str, *, group_rows: int, batch_rows: int, pixel_vectors: int, lanes: int,
                 cores: int, sampled: bool = False, registers: int = 16, epilogue: Optional[str] = None) -> None:
    """Register-blocked micro-kernel for a GEMM block with loops (batch, row, pixel, reduction...).

    Each (rows x vectors*lanes) output tile stays in vector registers across the whole reduction,
    fed per reduction step by one broadcast per row and ``vectors`` vector loads; tiles are grouped
    into blocks of rows x pixels distributed over cores. Half the ``registers`` hold accumulators:
    two pixel vectors per tile where the pixels allow (4 x 2 with AVX2's 16 registers: 6 loads per
    8 FMAs, where 8 x 1 needs 9), else one. Tiles never straddle a group of ``group_rows`` rows (a
    convolution group reads another slice of its operands). ``batch_rows``: batch x rows, the
    number of rows over all parallel tasks. ``epilogue``: an elementwise consumer of the GEMM
    (e.g. the bias addition) computed per tile from the registers, so the GEMM's own buffer
    never reaches memory (one pass less over the output, which is cold after other work).

    ``sampled``: the tile sizes become MetaSchedule decisions (``sample_perfect_tile``), making
    this a design space for the tuner; the fixed choices above are one point of it.
    """
    vectors = 2 if pixel_vectors % 2 == 0 else 1
    rows = largest_divisor(group_rows, max(1, registers // 2 // vectors))
    block_rows = largest_divisor(group_rows, ROW_BLOCK, multiple_of=rows)
    if block_rows % rows:
        block_rows = rows
    # Enough parallel tasks for every core: split pixels only when row blocks are too few.
    row_blocks = batch_rows // block_rows
    tile_columns = pixel_vectors // vectors
    pixel_blocks = 1
    while row_blocks * pixel_blocks < 4 * cores and tile_columns % (pixel_blocks * 2) == 0:
        pixel_blocks *= 2

    gemm = sch.get_sblock(block)
    loops = sch.get_loops(gemm)
    n, row, p, reduction = loops[0], loops[1], loops[2], loops[3:]
    if sampled:
        row_factors = sch.sample_perfect_tile(row, n=3, max_innermost_factor=2 * ACCUMULATOR_VECTORS)
        row_outer, row_mid, row_inner = sch.split(row, row_factors)
        p_vectors, p_inner = sch.split(p, [None, lanes])
        p_outer, p_mid, p_vector = sch.split(p_vectors, sch.sample_perfect_tile(p_vectors, n=3, max_innermost_factor=4))
        tile = [row_inner, p_vector, p_inner]
    else:
        row_outer, row_mid, row_inner = sch.split(row, [None, block_rows // rows, rows])
        p_outer, p_mid, p_vector, p_inner = sch.split(p, [pixel_blocks, None, vectors, lanes])
        tile = [row_inner, p_vector, p_inner]
    # With two-vector tiles, pixel stripes outside and row tiles inside: a stripe of the columns
    # (reduction x 16 pixels) is read from memory once and reused from L2 by every row tile of
    # the block, where the other order streams all the columns once per row tile. Measured here:
    # the 128-channel forward and backward-data kernels 9-12% faster; with one-vector tiles
    # (narrower stripes, more weight traffic) it was 6-9% slower, so those keep rows outside.
    middle = (p_mid, row_mid) if pixel_vectors % 2 == 0 else (row_mid, p_mid)
    sch.reorder(n, row_outer, p_outer, *middle, *reduction, *tile)
    sch.parallel(sch.fuse(n, row_outer, p_outer))
    if epilogue is None:
        accumulator = sch.cache_write(gemm, 0, "local")
    else:
        sch.set_scope(gemm, 0, "local")
        accumulator = sch.get_sblock(epilogue)
    sch.reverse_compute_at(accumulator, middle[-1])
    for loop in tile[:-1]:
        sch.unroll(loop)
    sch.vectorize(p_inner)  # before decompose_reduction: it needs the complete reduction block
    sch.decompose_reduction(gemm, reduction[0])
    if not sampled:
        # The write-back's loops exist only for tiles wider than one: with sampled tiles their
        # number would depend on the decisions, which a replayed (mutated) trace must not.
        acc_loops = sch.get_loops(accumulator)
        for loop in acc_loops[-len(tile):-1]:
            sch.unroll(loop)
        sch.vectorize(acc_loops[-1])


def parallel_rows(sch, block: str, parallel_axes: int = 2) -> None:
    """Fuse the first ``parallel_axes`` loops into one parallel loop (for small, unaligned stages)."""
    loops = sch.get_loops(sch.get_sblock(block))
    sch.parallel(sch.fuse(*loops[:parallel_axes]) if parallel_axes > 1 else loops[0])
