"""Helpers shared by the CPU hand schedules."""
from __future__ import annotations

from typing import Optional

from .._utils import largest_divisor
from ..cpu_isa import vector_unit
from .registry import HAND_DECISIONS


def vector_lanes(dtype: str, target) -> int:
    """SIMD lanes of ``dtype`` in one vector register of ``target`` (``tvm_dcn.cpu_isa.vector_unit``:
    16 float32 lanes with AVX-512, 8 with AVX2, 4 with NEON)."""
    return vector_unit(target).lanes(dtype)


def hand_decision(sampled, choice):
    """``choice`` (a decision: split factors, a categorical index) where ``sampled`` asks for the
    hand schedule's decisions, else None (MetaSchedule samples one)."""
    return choice if sampled == HAND_DECISIONS else None


def parallel_vectorize(sch, block: str, parallel_axes: int, lanes: int, sampled: bool | str = False) -> None:
    """Fuse the first ``parallel_axes`` loops into a parallel loop and vectorise the innermost loop
    by ``lanes`` (its extent must be a multiple of ``lanes``).

    ``sampled``: the vector width (half, once or twice ``lanes``, where it divides the loop) and
    the parallel split (the fused loop's outer factor runs in parallel, the inner one serially
    inside each task) are MetaSchedule decisions."""
    loops = sch.get_loops(sch.get_sblock(block))
    outer = sch.fuse(*loops[:parallel_axes]) if parallel_axes > 1 else loops[0]
    if sampled:
        # Hand: every iteration a parallel task, ``lanes`` wide.
        outer_extent = int(sch.get(outer).extent)
        outer = sch.split(outer, sch.sample_perfect_tile(
            outer, n=2, decision=hand_decision(sampled, [outer_extent, 1])))[0]
        extent = int(sch.get(loops[-1]).extent)
        widths = [w for w in (lanes // 2, lanes, 2 * lanes) if w >= 1 and extent % w == 0]
        if len(widths) > 1:
            hand_width = hand_decision(sampled, widths.index(lanes) if lanes in widths else None)
            lanes = sch.sample_categorical(widths, [1 / len(widths)] * len(widths), decision=hand_width)
        else:
            lanes = widths[0]
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
    """Architectural vector registers of ``target``: 32 with AVX-512 and on AArch64, 16 with AVX2."""
    return vector_unit(target).registers


def register_tile(group_rows: int, pixel_vectors: int, registers: int) -> tuple[int, int]:
    """(rows, pixel vectors) of the GEMM's register tile: the accumulators that stay in registers
    across the reduction. Half the registers accumulate, in tiles of two pixel vectors where the
    pixels pair up, else of one.

    16 registers (AVX2): 4 x 2 (6 loads per 8 FMAs, where 8 x 1 needs 9), else 8 x 1. 32
    registers (AVX-512, AArch64): 8 x 2, else 16 x 1; on AVX-512 each row's weight is an embedded
    broadcast (a memory operand of its FMA). Measured on Zen 5 (2 cores, the forward GEMMs alone,
    interleaved): with 16 lanes, 16 x 1 1.7-2.0x the throughput of the 8-lane 8 x 2 tile on all
    six ResNet-50 DCN layers, and faster than 8 x 1 and 2 x 7 at 784 pixels (49 vectors) and
    than 8 x 1 at 208 (13); at 64 pixels (4 vectors) 8 x 2 was 20% faster than 16 x 1 and 4 x 4.
    """
    vectors = 2 if pixel_vectors % 2 == 0 else 1
    return largest_divisor(group_rows, max(1, registers // 2 // vectors)), vectors


def blocked_gemm(sch, block: str, *, group_rows: int, batch_rows: int, pixel_vectors: int, lanes: int,
                 cores: int, sampled: bool | str = False, registers: int = 16, epilogue: Optional[str] = None,
                 dot: Optional[str] = None, consumer: Optional[str] = None, pixel_tasks: bool = False):
    """Register-blocked micro-kernel for a GEMM block with loops (batch, row, pixel, reduction...).

    Each (rows x vectors*lanes) output tile stays in vector registers across the whole reduction,
    fed per reduction step by one broadcast per row and ``vectors`` vector loads (the tile:
    ``register_tile`` for the target's ``registers``); tiles are grouped into blocks of rows x
    pixels distributed over cores. Tiles never straddle a group of ``group_rows`` rows (a
    convolution group reads another slice of its operands). ``batch_rows``: batch x rows, the
    number of rows over all parallel tasks. ``epilogue``: an elementwise consumer of the GEMM
    (e.g. the bias addition) computed per tile from the registers, so the GEMM's own buffer
    never reaches memory (one pass less over the output, which is cold after other work).

    ``sampled``: a design space for the tuner (``tvm_dcn.tune``), the fixed choices one point of
    it: the tile (rows, pixel vectors), the vector width (``lanes`` or half of it), the rows and
    pixels of a parallel task, and the loop order inside a task (row tiles inside or outside the
    pixel stripes: the rows' middle loop is split in two, one on either side of the pixels'
    middle loop, so the order is a tile-size decision too, which a replayed trace re-evaluates).

    ``dot``: a tensor intrinsic computing one vector of ``lanes`` pixels over the block's innermost
    reduction loop (``cpu_bf16``: a bfloat16 pair per step), which then runs inside the tile
    instead of a vectorised FMA; the vector width is not sampled.

    ``consumer``: an elementwise consumer of the GEMM that cannot be an ``epilogue`` (it drops
    pixel padding a tile reaches into), computed by each parallel task for its own rows and
    pixels right after its tiles: in the GEMM's parallel region, not one of its own.

    ``pixel_tasks``: each parallel task computes all rows of its pixel tiles (one tile column per
    task in the hand schedule), pixel tiles outside row tiles, so that a producer of the
    right-hand operand can be computed per pixel tile by the task that consumes it.

    Returns the loop over a task's pixel tiles (outside its row tiles where ``pixel_tasks``).
    """
    gemm = sch.get_sblock(block)
    loops = sch.get_loops(gemm)
    n, row, p, reduction = loops[0], loops[1], loops[2], loops[3:]
    # With a dot product the innermost reduction loop belongs to the intrinsic, inside the tile.
    inner_reduction = [reduction[-1]] if dot else []
    reduction = reduction[:-1] if dot else reduction
    row_extent = int(sch.get(row).extent)
    if pixel_tasks:
        rows, vectors = register_tile(group_rows, pixel_vectors, registers)
        hand_tiles = rows, vectors, row_extent, pixel_vectors // vectors
    else:
        hand_tiles = _hand_tiles(group_rows, batch_rows, pixel_vectors, cores, registers)
    # With multi-vector tiles, or where each task computes its own operand, pixel tiles outside
    # and row tiles inside: a stripe of the right-hand operand (reduction x vectors*lanes pixels)
    # is read once and reused from L2 by every row tile of the block, where the other order
    # streams it once per row tile. Measured (AVX2): the 128-channel forward and backward-data
    # kernels 9-12% faster; with one-vector tiles (narrower stripes, more weight traffic) it was
    # 6-9% slower, so those keep rows outside.
    pixels_outside = hand_tiles[1] > 1 or pixel_tasks
    if sampled:
        # The hand point: its task shape and register tile, and its loop order as the rows'
        # middle factor on one side or the other of the pixels' middle loop.
        rows, vectors, block_rows, pixel_blocks = hand_tiles
        mid = block_rows // rows
        hand_rows = [row_extent // block_rows] + ([1, mid] if pixels_outside else [mid, 1]) + [rows]
        hand_pixels = [pixel_blocks, pixel_vectors // (pixel_blocks * vectors), vectors]
        row_outer, row_before, row_after, row_inner = sch.split(
            row, sch.sample_perfect_tile(row, n=4, max_innermost_factor=2 * ACCUMULATOR_VECTORS,
                                         decision=hand_decision(sampled, hand_rows)))
        p_vectors, p_lanes = sch.split(p, [None, lanes])
        p_outer, p_mid, p_vector = sch.split(p_vectors, sch.sample_perfect_tile(
            p_vectors, n=3, max_innermost_factor=8, decision=hand_decision(sampled, hand_pixels)))
        # The vector width: lanes, or half of it with twice the vectors (a decision, not a branch).
        width = sch.sample_categorical([1, 2], [0.5, 0.5], decision=hand_decision(sampled, 0)) \
            if lanes % 2 == 0 and not dot else 1
        p_half, p_inner = sch.split(p_lanes, [width, None])
        tile = [row_inner, p_vector, p_half, p_inner]
        sch.reorder(n, row_outer, p_outer, row_before, p_mid, row_after, *reduction, *tile, *inner_reduction)
        middle = row_after
    else:
        rows, vectors, block_rows, pixel_blocks = hand_tiles
        row_outer, row_mid, row_inner = sch.split(row, [None, block_rows // rows, rows])
        p_outer, p_mid, p_vector, p_inner = sch.split(p, [pixel_blocks, None, vectors, lanes])
        tile = [row_inner, p_vector, p_inner]
        order = (p_mid, row_mid) if pixels_outside else (row_mid, p_mid)
        sch.reorder(n, row_outer, p_outer, *order, *reduction, *tile, *inner_reduction)
        middle = order[-1]
    task = sch.fuse(n, row_outer, p_outer)
    sch.parallel(task)
    if consumer is not None:
        sch.reverse_compute_at(sch.get_sblock(consumer), task)
    if epilogue is None:
        accumulator = sch.cache_write(gemm, 0, "local")
    else:
        sch.set_scope(gemm, 0, "local")
        accumulator = sch.get_sblock(epilogue)
    sch.reverse_compute_at(accumulator, middle)
    for loop in tile[:-1]:
        sch.unroll(loop)
    if dot:
        init = sch.decompose_reduction(gemm, reduction[0])
        sch.vectorize(sch.get_loops(init)[-1])
        sch.tensorize(tile[-1], dot)
    else:
        sch.vectorize(tile[-1])  # before decompose_reduction: it needs the complete reduction block
        sch.decompose_reduction(gemm, reduction[0])
    if not sampled:
        # The write-back's loops exist only for tiles wider than one: with sampled tiles their
        # number would depend on the decisions, which a replayed (mutated) trace must not.
        acc_loops = sch.get_loops(accumulator)
        for loop in acc_loops[-len(tile):-1]:
            sch.unroll(loop)
        sch.vectorize(acc_loops[-1])
    return p_mid


def _hand_tiles(group_rows: int, batch_rows: int, pixel_vectors: int, cores: int,
                registers: int) -> tuple[int, int, int, int]:
    """The hand schedule's GEMM tiling: (register tile rows, its pixel vectors, rows of a
    parallel task's block, pixel blocks)."""
    rows, vectors = register_tile(group_rows, pixel_vectors, registers)
    block_rows = largest_divisor(group_rows, ROW_BLOCK, multiple_of=rows)
    if block_rows % rows:
        block_rows = rows
    # Enough parallel tasks for every core: split pixels only when row blocks are too few.
    row_blocks = batch_rows // block_rows
    tile_columns = pixel_vectors // vectors
    pixel_blocks = 1
    while row_blocks * pixel_blocks < 4 * cores and tile_columns % (pixel_blocks * 2) == 0:
        pixel_blocks *= 2
    # Tasks the cores share evenly: a count neither a multiple of the cores nor several times
    # their number leaves cores idle at the end: then smaller row blocks (192 channels x 608
    # pixels on 2 cores: 3 tasks of 64 rows became 4 of 48, forward 1.41 -> 1.12 ms).
    while not balanced_tasks(row_blocks * pixel_blocks, cores) and block_rows > rows:
        smaller = largest_divisor(group_rows, block_rows - 1, multiple_of=rows)
        if smaller % rows:
            break
        block_rows, row_blocks = smaller, batch_rows // smaller
    return rows, vectors, block_rows, pixel_blocks


def balanced_tasks(tasks: int, cores: int) -> bool:
    """Whether ``tasks`` equal tasks keep ``cores`` busy to the end: a multiple of the cores, or at
    least four per core (at most a quarter of a task's time idle per core)."""
    return tasks % cores == 0 or tasks >= 4 * cores


def parallel_rows(sch, block: str, parallel_axes: int = 2) -> None:
    """Fuse the first ``parallel_axes`` loops into one parallel loop (for small, unaligned stages)."""
    loops = sch.get_loops(sch.get_sblock(block))
    sch.parallel(sch.fuse(*loops[:parallel_axes]) if parallel_axes > 1 else loops[0])
