"""Helpers shared by the CUDA hand schedules.

- :func:`bind_elementwise`: one thread per element (or per short vector along the last axis).
- :func:`tiled_gemm`: a GEMM block (loops: batch..., row, column, reduction...) tiled for
  shared memory: a block of ``BM x BN`` outputs per thread block, ``TM x TN`` per thread in
  registers, the reduction walked in steps of ``BK`` with both operand tiles staged in shared
  memory by all threads of the block (vector loads along their contiguous axis where aligned).
- :func:`bind_reduction`: a reduction per output element across the threads of a block.

Stages whose blocks bind their own threads (the atomic scatters, ``tvm_dcn.ops.gpu_scatter``)
are left alone: :func:`is_self_threaded`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .._utils import dtype_bytes, largest_divisor

# Threads per block of elementwise stages.
ELEMENTWISE_THREADS = 256
# Output elements per thread along the row and column axes of a GEMM tile (registers: TM x TN).
THREAD_TILE = 4
# Threads along each axis of a GEMM thread block (at most 16 x 16 = 256 threads).
BLOCK_THREADS = 16
# Reduction step of a GEMM: BK elements of each operand row/column per shared-memory stage.
REDUCTION_STEP = 16
# Threads of a block-wide reduction (bind_reduction).
REDUCTION_THREADS = 256


def vector_width(dtype: str) -> int:
    """Elements of a 128-bit load (float4, double2)."""
    return max(1, 16 // dtype_bytes(dtype))


def split_threads(sch, loop, extent: int, threads: int = ELEMENTWISE_THREADS, min_threads: int = 32):
    """Split ``loop`` (of ``extent``) into (blockIdx.x, threadIdx.x) loops, bound; returns
    (block loop, thread loop, exact). The thread count divides the extent when a divisor of at
    least ``min_threads`` (or the whole extent) fits in ``threads``: then no thread is idle and
    no bounds predicate is needed. Only an exact split may carry a cache that is written back
    per thread (``reverse_compute_at``): TVM drops the predicate of such a write-back when its
    region is one element, and the idle threads of an inexact split would write out of bounds."""
    divisor = largest_divisor(extent, threads)
    exact = divisor == extent or divisor >= min_threads
    bx, tx = sch.split(loop, [None, divisor if exact else threads])
    sch.bind(bx, "blockIdx.x")
    sch.bind(tx, "threadIdx.x")
    return bx, tx, exact


def is_self_threaded(sch, block) -> bool:
    """Whether ``block`` launches its own threads (an extern stage with thread-bound loops)."""
    import tvm_ffi  # noqa: PLC0415
    from tvm import tirx  # noqa: PLC0415

    found = []

    def visit(node):
        if node.kind == tirx.ForKind.THREAD_BINDING:
            found.append(node)

    tvm_ffi.structural_walk(sch.get(block).body, [(tirx.For, visit)], order="post")
    return bool(found)


def existing_blocks(sch, names) -> list:
    """The blocks of ``names`` that exist in this PrimFunc (stages depend on the workload)."""
    found = []
    for name in names:
        try:
            found.append(sch.get_sblock(name))
        except Exception:  # noqa: BLE001  (the stage does not exist in this operator)
            continue
    return found


def spatial_then_reductions(sch, block) -> tuple[list, list, int]:
    """(spatial loops, reduction loops, product of the spatial extents) of an unscheduled block,
    with its loops reordered so that the reductions are innermost."""
    loops = sch.get_loops(block)
    kinds = iter_kinds(sch, block)
    spatial = [loop for loop, kind in zip(loops, kinds) if kind == "S"]
    reductions = [loop for loop, kind in zip(loops, kinds) if kind == "R"]
    if reductions and loops[-len(reductions):] != reductions:
        sch.reorder(*spatial, *reductions)
    extent = 1
    for loop in spatial:
        extent *= int(sch.get(loop).extent)
    return spatial, reductions, extent


def fused(sch, loops):
    """``loops`` fused into one (the loop itself if there is one)."""
    return sch.fuse(*loops) if len(loops) > 1 else loops[0]


def bind_elementwise(sch, block, *, vector: int = 1, threads: int = ELEMENTWISE_THREADS) -> None:
    """One thread per element of ``block``'s spatial loops (all its loops, or the spatial loops
    outside its reductions, which each thread then runs serially). ``vector`` > 1: each thread
    handles that many consecutive elements of the innermost loop, vectorised (its extent must be
    a multiple of ``vector``), so its loads and stores along that axis are 128-bit."""
    spatial, _, _ = spatial_then_reductions(sch, block)
    inner = None
    if vector > 1:
        spatial[-1], inner = sch.split(spatial[-1], [None, vector])
    bx, tx = sch.split(fused(sch, spatial), [None, threads])
    sch.bind(bx, "blockIdx.x")
    sch.bind(tx, "threadIdx.x")
    if inner is not None:
        sch.vectorize(inner)


def iter_kinds(sch, block) -> list[str]:
    """'S' (spatial) or 'R' (reduction) per loop of an unscheduled ``block`` (TE gives each block
    one loop per iterator, in order)."""
    from tvm import tirx  # noqa: PLC0415

    loops = sch.get_loops(block)
    iter_vars = sch.get(block).iter_vars
    if len(loops) != len(iter_vars):
        raise ValueError(f"{sch.get(block).name_hint}: expected an unscheduled block (one loop per iterator)")
    return ["R" if iv.iter_type == tirx.IterVar.CommReduce else "S" for iv in iter_vars]


@dataclass(frozen=True)
class GemmTiles:
    """Tile sizes of :func:`tiled_gemm`: per thread ``tm x tn`` outputs, ``ty x tx`` threads, so
    a thread block computes ``(ty * tm) x (tx * tn)`` outputs; the reduction steps by ``bk``."""

    tm: int
    ty: int
    tn: int
    tx: int
    bk: int

    @property
    def block_rows(self) -> int:
        return self.ty * self.tm

    @property
    def block_cols(self) -> int:
        return self.tx * self.tn

    @property
    def threads(self) -> int:
        return self.ty * self.tx


def gemm_tiles(*, group_rows: int, cols: int, reduction: int, dtype: str,
               reduction_align: Optional[int] = None) -> GemmTiles:
    """Tiles for a GEMM whose rows come in groups of ``group_rows`` (a row tile never straddles
    two groups: each group reads its own slice of an operand), with ``cols`` columns and a
    reduction of ``reduction``; ``reduction_align``: a number the reduction step must divide
    (e.g. the pixel padding, so that a step never straddles two images).

    Every tile divides its extent: no thread block has idle threads or needs bounds predicates,
    and the per-thread write-back of the register tile is exact (see :func:`split_threads`).
    Extents with few small divisors get small tiles (correct, slower)."""
    tm = largest_divisor(group_rows, THREAD_TILE)
    ty = largest_divisor(group_rows // tm, BLOCK_THREADS)
    tn = largest_divisor(cols, THREAD_TILE)
    tx = largest_divisor(cols // tn, BLOCK_THREADS)
    limit = REDUCTION_STEP if reduction_align is None else largest_divisor(reduction_align, REDUCTION_STEP)
    bk = largest_divisor(reduction, limit)
    return GemmTiles(tm=tm, ty=ty, tn=tn, tx=tx, bk=bk)


def tiled_gemm(sch, block, tiles: GemmTiles, *, vector_operands: tuple = (), epilogue: Optional[str] = None,
               unroll: int = 64) -> dict:
    """Tile GEMM ``block`` (loops: batch..., row, column, reduction...; reductions are fused).

    Grid: (column tiles, row tiles, batch) on blockIdx.(x, y, z); block: ``ty x tx`` threads,
    each accumulating ``tm x tn`` outputs in registers over the whole reduction. Per reduction
    step, every operand is staged in shared memory by all threads (its loads vectorised by
    ``vector_operands[i]`` elements when that is > 1; the caller guarantees alignment). The result is
    written from registers by the thread that computed it; ``epilogue``: a consumer block (e.g.
    bias addition) computed there instead, reading the registers, so the GEMM's own buffer
    never reaches global memory. Returns the loop handles (for tests and callers)."""
    spatial, reductions, _ = spatial_then_reductions(sch, block)
    batch, row, col = spatial[:-2], spatial[-2], spatial[-1]
    red = fused(sch, reductions)

    row_b, row_t, row_i = sch.split(row, [None, tiles.ty, tiles.tm])
    col_b, col_t, col_i = sch.split(col, [None, tiles.tx, tiles.tn])
    red_o, red_i = sch.split(red, [None, tiles.bk])
    sch.reorder(*batch, row_b, col_b, row_t, col_t, red_o, red_i, row_i, col_i)
    sch.bind(col_b, "blockIdx.x")
    sch.bind(row_b, "blockIdx.y")
    if batch:
        sch.bind(fused(sch, batch), "blockIdx.z")
    sch.bind(row_t, "threadIdx.y")
    sch.bind(col_t, "threadIdx.x")

    reads = [region.source.name for region in sch.get(block).reads]
    vector_operands = tuple(vector_operands) + (1,) * (len(reads) - len(vector_operands))
    for index, vector in enumerate(vector_operands):
        shared = sch.cache_read(block, index, "shared")
        sch.compute_at(shared, red_o)
        _cooperative_fetch(sch, shared, red_o, tiles, vector)

    if epilogue is None:
        accumulator = sch.cache_write(block, 0, "local")
        sch.reverse_compute_at(accumulator, col_t)
    else:
        sch.set_scope(block, 0, "local")
        sch.reverse_compute_at(sch.get_sblock(epilogue), col_t)
    sch.annotate(red_i, "pragma_auto_unroll_max_step", unroll)
    sch.annotate(red_i, "pragma_unroll_explicit", 1)
    sch.decompose_reduction(block, red_o)
    return {"red_outer": red_o, "red_inner": red_i, "col_thread": col_t, "row_thread": row_t}


def _cooperative_fetch(sch, block, outer, tiles: GemmTiles, vector: int) -> None:
    """All ``ty x tx`` threads copy the tile of ``block`` (a cache read computed at loop
    ``outer``), ``vector`` consecutive elements of its innermost axis each (vectorised when > 1)."""
    loops = sch.get_loops(block)
    outer_stmt = sch.get(outer)
    position = next(i for i, loop in enumerate(loops) if sch.get(loop).same_as(outer_stmt))
    tile_loops = loops[position + 1:]
    inner = sch.get(tile_loops[-1]).extent
    if vector > 1 and (not hasattr(inner, "value") or inner.value % vector):
        vector = 1
    copy = fused(sch, tile_loops)
    if vector > 1:
        _, ty, tx, vec = sch.split(copy, [None, tiles.ty, tiles.tx, vector])
        sch.vectorize(vec)
    else:
        _, ty, tx = sch.split(copy, [None, tiles.ty, tiles.tx])
    sch.bind(ty, "threadIdx.y")
    sch.bind(tx, "threadIdx.x")


def bind_reduction(sch, block, *, threads: int = REDUCTION_THREADS) -> None:
    """One thread block per output element of ``block``, its reduction (loops fused) spread over
    ``threads`` threads and combined across them (warp shuffles and shared memory)."""
    spatial, reductions, _ = spatial_then_reductions(sch, block)
    sch.bind(fused(sch, spatial), "blockIdx.x")
    _, tx = sch.split(fused(sch, reductions), [None, threads])
    sch.bind(tx, "threadIdx.x")
