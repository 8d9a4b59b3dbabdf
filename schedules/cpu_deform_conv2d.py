"""CPU hand schedules for the deformable convolution, forward and backward
(``tvm_dcn/ops/deform_conv.py``; blocks are addressed by its stage names).

- Sampling stages (coordinates, corner indices/weights): with channels-last columns computed per
  pixel stripe by the task that samples the stripe (no parallel loop of their own); else, and in
  the backward, parallel over (batch, offset group, tap); vectorised along output pixels.
- Forward im2col (channels-last): the input is transposed to channels-last, then each
  (lanes x lanes) tile of (channels at one tap) x pixels is computed with vector loads along the
  channels (the four corners of a sample are contiguous there) into registers and stored
  transposed, pixels contiguous, as the GEMM reads them (float32: 8 x 8 blocks by the shuffles of
  ``cpu_transpose``; AVX-512's 16 x 16 tiles take four), in stripes of one pixel vector.
- Vector widths and register tiles follow the target (``tvm_dcn.cpu_isa.vector_unit``): 16
  float32 lanes and 32 registers with AVX-512 (whose forward workloads pad the pixels to whole
  16-lane vectors: ``pixel_align``), 8 and 16 with AVX2, 4 and 32 on AArch64.
- Backward im2col (channel-major rows): parallel over (batch, channel*tap) rows, vectorised
  along pixels (the four corner reads are gathers; their indices and weights are contiguous).
- GEMMs (forward output, column gradient, weight gradient): register-blocked micro-kernels
  (``cpu_common.blocked_gemm``): a (rows x pixels) output tile stays in vector registers across
  the reduction.
- Input gradient: the scatter stage parallelises itself over (batch, channel) planes.
"""
from __future__ import annotations

from typing import Optional

from tvm import DataType
from tvm.s_tir import Schedule

from .._utils import largest_divisor
from ..cpu_isa import vector_unit
from . import cpu_bf16, cpu_transpose
from .cpu_common import (ACCUMULATOR_VECTORS, balanced_tasks, blocked_gemm, core_count, hand_decision,
                         parallel_rows, parallel_vectorize, register_tile, vector_lanes, vector_registers)
from .registry import register


def geometry(workload, target):
    """(ConvGeometry, lanes): the workload's shapes and the vector width of its pixel axis on
    ``target``: the target's lanes, at most the workload's pixel alignment (P' holds whole
    vectors: 16 float32 lanes on AVX-512 where ``ops.for_target`` gave the workload
    ``pixel_align=16``, else at most 8)."""
    from tvm_dcn.ops.deform_conv import ConvGeometry

    geo = ConvGeometry(workload)
    return geo, min(vector_lanes(geo.compute_dtype, target), geo.pixel_align)


def _sampling(sch: Schedule, lanes: int, *, weights: bool = True, sampled: bool | str = False) -> None:
    blocks = ("sample_coord", "corner_index") + (("corner_weight",) if weights else ())
    for block in blocks:
        parallel_vectorize(sch, block, parallel_axes=3, lanes=lanes, sampled=sampled)


def _columns(sch: Schedule, lanes: int, sampled: bool | str = False) -> None:
    _sampling(sch, lanes, sampled=sampled)
    parallel_vectorize(sch, "deform_col", parallel_axes=2, lanes=lanes, sampled=sampled)


def column_stripes(lanes: int):
    """Index map of the channels-last columns (N, C, K, P') to the layout the hand schedule stores
    them in where it computes them in tiles (``has_column_stripes``): (N, P'/lanes, C, K, lanes),
    stripes of one pixel vector."""
    return lambda n, c, k, p: (n, p // lanes, c, k, p % lanes)


def column_tile(geo, lanes: int) -> int:
    """Channels of one tile of the channels-last columns (a tile: these channels x ``lanes``
    pixels of one tap): ``lanes`` where they divide the channels of an offset group, else 8
    (float32, where 8 divides both), else ``lanes``."""
    group = geo.channels_per_offset_group
    if group % lanes and geo.compute_dtype == "float32" and lanes % cpu_transpose.TILE == 0 and group % cpu_transpose.TILE == 0:
        return cpu_transpose.TILE
    return lanes


def has_column_stripes(geo, lanes: int) -> bool:
    return geo.channels_per_offset_group % column_tile(geo, lanes) == 0


def _channels_last_columns(sch: Schedule, geo, lanes: int, sampled: bool | str = False,
                           per_stripe: Optional[str] = None, at=None) -> bool:
    """input_channels_last and the (N, C, K, P') deform_col (``ops.deform_conv.channel_major_columns``):
    each (tile channels x tile pixels) tile of one tap is computed with vector loads along the
    channels into registers and stored transposed (pixels contiguous, as the GEMM reads them).

    ``sampled``: the stripes of a parallel task and the loop order of taps and channel tiles (the
    channel tiles' loop split in two, one on either side of the taps' loop) are decisions (the
    sampling stages, computed per stripe, have none; where channels straddle offset groups they
    are as in ``parallel_vectorize``).

    ``per_stripe``: a consumer block of the columns computed per stripe, by the task that computed
    the stripe, right after it. Returns whether it was.

    ``at``: the GEMM's loop over a task's pixel tiles (``blocked_gemm(pixel_tasks=True)``): the
    stripes (with their sampling stages) are then computed there, by the task that consumes them,
    in the GEMM's parallel region."""
    paired = per_stripe is not None
    transpose = sch.get_sblock("input_channels_last")
    n, i, c = sch.get_loops(transpose)
    sch.parallel(sch.fuse(n, i))
    if geo.in_channels % lanes == 0:
        sch.vectorize(sch.split(c, [None, lanes])[1])
    block = sch.get_sblock("deform_col")
    if at is not None:
        sch.compute_at(block, at)
    n, c, k, p = sch.get_loops(block)[-4:]
    if not has_column_stripes(geo, lanes):
        # A tile of channels would straddle two offset groups (other corners): per row.
        _sampling(sch, lanes, sampled=sampled)
        sch.parallel(sch.fuse(n, c, k))
        sch.vectorize(sch.split(p, [None, lanes])[1])
        return False
    tile = column_tile(geo, lanes)
    c_outer, c_inner = sch.split(c, [None, tile])
    p_outer, p_inner = sch.split(p, [None, lanes])
    if sampled:
        # Hand: every stripe a task; taps outside all channel tiles.
        stripes, channel_tiles = int(sch.get(p_outer).extent), int(sch.get(c_outer).extent)
        c_before, c_after = sch.split(c_outer, sch.sample_perfect_tile(
            c_outer, n=2, decision=hand_decision(sampled, [1, channel_tiles])))
        if at is None:
            p_tasks, stripe = sch.split(p_outer, sch.sample_perfect_tile(
                p_outer, n=2, decision=hand_decision(sampled, [stripes, 1])))
            sch.reorder(n, p_tasks, stripe, c_before, k, c_after, p_inner, c_inner)
            sch.parallel(sch.fuse(n, p_tasks))
        else:
            stripe = p_outer
            sch.reorder(stripe, c_before, k, c_after, p_inner, c_inner)
        c_outer = c_after
    elif at is not None:
        sch.reorder(p_outer, k, c_outer, p_inner, c_inner)
        stripe = p_outer
    else:
        # Taps outside channel tiles: the corner indices and weights of a tap's pixels are read
        # for every channel tile in a row (measured: sampling 5-20% faster than channel tiles
        # outside).
        sch.reorder(n, p_outer, k, c_outer, p_inner, c_inner)
        stripe = sch.fuse(n, p_outer)
        sch.parallel(stripe)
    _sampling_per_stripe(sch, stripe)
    tile_block = sch.cache_write(block, 0, "local")
    sch.reverse_compute_at(tile_block, c_outer)
    # Columns stored in stripes of one pixel vector, (N, P'/lanes, C, K, lanes): the GEMM then
    # streams each stripe contiguously, where (N, C, K, P') puts every step of its reduction in
    # another cache line, half of it used. Measured here (GEMMs alone, interleaved): 9% faster at
    # 512 channels x 56 pixels, 7-8% at 128 x 784, equal at 256 x 208.
    sch.transform_layout(tile_block, ("write", 0), column_stripes(lanes))
    if paired:
        sch.reverse_compute_at(sch.get_sblock(per_stripe), stripe)
    sch.unroll(p_inner)
    sch.vectorize(c_inner)  # along channels: the corner reads are vector loads
    tile_rows, tile_pixels = sch.get_loops(tile_block)[-2:]
    if geo.compute_dtype == "float32" and tile % cpu_transpose.TILE == 0 and lanes % cpu_transpose.TILE == 0:
        # The tile pixel-major (each vector over channels a row), stored transposed by shuffles,
        # 8 x 8 at a time (a 16 x 16 tile of AVX-512: four, on the 256-bit halves of its rows):
        # left to itself, LLVM moves the tile through the stack element by element.
        sch.transform_layout(block, ("write", 0), lambda n, c, k, p: (n, k, p, c))
        if tile > cpu_transpose.TILE or lanes > cpu_transpose.TILE:
            row_blocks, tile_rows = sch.split(tile_rows, [None, cpu_transpose.TILE])
            pixel_blocks, tile_pixels = sch.split(tile_pixels, [None, cpu_transpose.TILE])
            sch.reorder(row_blocks, pixel_blocks, tile_rows)
        sch.tensorize(tile_rows, cpu_transpose.register())
        return paired
    sch.unroll(tile_rows)
    sch.vectorize(tile_pixels)  # stored along pixels: LLVM's own transposition
    return paired


def _sampling_per_stripe(sch: Schedule, stripe) -> None:
    """The sampling stages computed per pixel stripe of the columns, by the task that samples
    it: (offset groups x taps) rows of one pixel vector each, inside the columns' parallel loop
    rather than three parallel loops of their own (on 2 cores each parallel region costs ~15 us
    of waking the other worker, ~10% of a 256-channel forward)."""
    for name in ("corner_weight", "corner_index", "sample_coord"):
        block = sch.get_sblock(name)
        sch.compute_at(block, stripe)
        sch.vectorize(sch.get_loops(block)[-1])


def forward_columns(sch: Schedule, workload, geo, lanes: int, sampled: bool | str = False,
                    per_stripe: Optional[str] = None, at=None) -> bool:
    """The forward's sampling and im2col stages, in the workload's column formulation;
    ``per_stripe`` and ``at`` as in ``_channels_last_columns`` (returns whether ``per_stripe``
    was computed so)."""
    from tvm_dcn.ops.deform_conv import COLUMNS_GATHER, columns_formulation

    if columns_formulation(workload) == COLUMNS_GATHER:
        _columns(sch, lanes, sampled=sampled)
        return False
    return _channels_last_columns(sch, geo, lanes, sampled=sampled, per_stripe=per_stripe, at=at)


def task_weight_bytes(target) -> int:
    """The largest weight a forward task reads whole (``columns_in_gemm_tasks``): three quarters of
    a per-core L2, beside a stripe of columns. The target names no cache sizes, so a typical L2 of
    the CPUs with its vector unit: AVX-512 server and desktop parts have 1-2 MB (Skylake-X, Ice
    Lake-SP, Sapphire Rapids, Zen 4 and 5; Ice Lake client cores 512 KB); for the others the
    smallest common one, 256 KB (Haswell to Skylake client cores; Zen 2 and 3 have 512 KB)."""
    return (1 << 20 if vector_unit(target).isa == "avx512" else 1 << 18) * 3 // 4


def columns_in_gemm_tasks(workload, geo, lanes: int, target) -> bool:
    """Whether the forward computes its columns inside the GEMM's parallel tasks: channels-last
    columns in stripes (not the bfloat16 pairs), a weight that stays in L2 beside a stripe
    (``task_weight_bytes``: each task reads all of it), and one task per GEMM tile column (all
    output channels of its pixels) giving tasks the cores share evenly
    (``cpu_common.balanced_tasks``).

    Each task then samples the stripes it multiplies, and every row tile reads them from L2 right
    after, where a columns region of their own writes them all out (3.6 MB for 128 channels x 784
    pixels) and the GEMM's row-block tasks read them back, half from the other core's cache; the
    forward runs in two parallel regions (transposition; columns and GEMM) instead of three.
    Measured on Zen 5 (2 cores, alternated in one process, each call after the layer's offset
    convolution, three runs): the 128-channel ResNet-50 layers (a 576 KB weight) 0-14% faster; the
    256-channel ones (2.25 MB, 13 tasks) from 14% faster to 10% slower, the 512-channel ones
    (9 MB, one task per core) within 4%."""
    from tvm_dcn.ops.deform_conv import COLUMNS_GATHER, GEMM_BF16_DOT, columns_formulation

    if columns_formulation(workload) == COLUMNS_GATHER or geo.gemm == GEMM_BF16_DOT:
        return False
    if not has_column_stripes(geo, lanes):
        return False
    if geo.out_channels * geo.reduction * DataType(geo.compute_dtype).bits // 8 > task_weight_bytes(target):
        return False
    pixel_vectors = geo.padded_pixels // lanes
    _, vectors = register_tile(geo.group_out_channels, pixel_vectors, vector_registers(target))
    return balanced_tasks(geo.batch * pixel_vectors // vectors, core_count(target))


@register("llvm", "deform_conv2d")
def schedule(sch: Schedule, workload, target, sampled: bool | str = False) -> None:
    """deform_conv2d: sampling, deformable im2col, output GEMM, bias.

    ``sampled`` (all schedules here): tile sizes are MetaSchedule decisions: the schedule is then
    a design space the tuner searches (``tvm_dcn.tune``); ``HAND_DECISIONS``: its sampling
    instructions with the hand choices as decisions (the tuner's starting point, the same tiles
    and loop order as the hand schedule; write-back loops left to LLVM, as in every point). In the
    forward: the columns' stripes per task and tap / channel-tile order (with gather columns the
    sampling stages' vector width and parallel split), the GEMM's register tile, vector width,
    task shape and loop order (``blocked_gemm``)."""
    from tvm_dcn.ops.deform_conv import GEMM_BF16_DOT

    geo, lanes = geometry(workload, target)
    # Output (and bias) from the GEMM's registers where no tile reaches into the pixel padding.
    epilogue = "output" if geo.padded_pixels == geo.pixels else None
    dot = None
    if geo.gemm == GEMM_BF16_DOT:
        cpu_bf16.require_dot(workload, target)
        _pair_columns(sch, workload, geo, lanes, sampled=sampled)
        dot = cpu_bf16.register()
    fused = columns_in_gemm_tasks(workload, geo, lanes, target)  # never with the dot product
    if dot is None and not fused:
        forward_columns(sch, workload, geo, lanes, sampled=sampled)
    if dot is None and geo.dtype != geo.compute_dtype:
        parallel_vectorize(sch, "weight_widened", parallel_axes=1, lanes=lanes)
    pixel_tiles = blocked_gemm(sch, "gemm", group_rows=geo.group_out_channels,
                               batch_rows=geo.batch * geo.out_channels, pixel_vectors=geo.padded_pixels // lanes,
                               lanes=lanes, cores=core_count(target), sampled=sampled,
                               registers=vector_registers(target), epilogue=epilogue, dot=dot,
                               consumer=None if epilogue else "output", pixel_tasks=fused)
    if fused:
        forward_columns(sch, workload, geo, lanes, sampled=sampled, at=pixel_tiles)


def _pair_columns(sch: Schedule, workload, geo, lanes: int, sampled: bool | str = False) -> None:
    """The float32 columns as in the float32 forward, then rounded to bfloat16 into their pairs
    (``ops.deform_conv.pair_columns``), one vector of 16 pixels per row. Where the columns are
    computed in stripes of one pixel vector, each stripe is paired right after it is computed, by
    the same task (while it is in cache); else parallel over pixel vectors and pairs of rows."""
    per_stripe = forward_columns(sch, workload, geo, lanes, sampled=sampled, per_stripe="deform_col_pairs")
    _pairs_stage(sch, "deform_col_pairs", parallel=not per_stripe)


def _pairs_stage(sch: Schedule, block: str, parallel: bool = True) -> None:
    """A stage of bfloat16 pairs for the dot product, loops (..., pair element, lane): its leading
    loops fused into a parallel loop (``parallel``; else it is computed inside another stage's
    task), the pair unrolled, the lanes vectorised. The stage also links the dot product's LLVM
    function into the kernel (once per kernel)."""
    loops = sch.get_loops(sch.get_sblock(block))
    t, lane = loops[-2:]
    if parallel:
        rows = sch.fuse(*loops[:-2])
        sch.parallel(rows)
    else:
        rows = loops[-3]
    cpu_bf16.import_into(sch, rows)
    sch.unroll(t)
    sch.vectorize(lane)


@register("llvm", "deform_conv2d_backward_data")
def schedule_backward_data(sch: Schedule, workload, target, sampled: bool | str = False) -> None:
    """deform_conv2d_backward_data: column-gradient GEMM, then the input scatter and/or the corner
    sums that give the offset and mask gradients.

    Half dtypes: everything in float32, each gradient rounded once (the input gradient's in a
    parallel stage after its scatter); with ``gemm=GEMM_BF16_DOT`` the column gradient is
    AVX512-BF16's dot product of the transposed weight in pairs of output channels
    (``weight_pairs``, one 32-bit broadcast per row) and the output gradient's pairs
    (``grad_output_pairs``, 16 pixels a vector)."""
    from tvm_dcn.ops.deform_conv import GEMM_BF16_DOT

    geo, lanes = geometry(workload, target)
    half = geo.dtype != geo.compute_dtype
    _sampling(sch, lanes, weights=workload["need_input"])
    dot = None
    if geo.gemm == GEMM_BF16_DOT:
        cpu_bf16.require_dot(workload, target)
        # A transposition: tiles of 32 rows (a 64-byte line of each weight row) x all output
        # channels, read along the rows and written along the channels, in L1.
        row, o2, t = sch.get_loops(sch.get_sblock("weight_pairs"))
        rows_outer, rows_inner = sch.split(row, [None, largest_divisor(geo.in_channels * geo.taps, 32)])
        sch.reorder(rows_outer, o2, t, rows_inner)
        sch.parallel(rows_outer)
        _pairs_stage(sch, "grad_output_pairs")
        dot = cpu_bf16.register(cpu_bf16.DOT_16X2_BF16_BITS)
    else:
        parallel_vectorize(sch, "grad_output_padded", parallel_axes=2, lanes=lanes)
        if half:
            parallel_rows(sch, "weight_widened", parallel_axes=1)
    blocked_gemm(sch, "grad_col", group_rows=geo.reduction, batch_rows=geo.batch * geo.in_channels * geo.taps,
                 pixel_vectors=geo.padded_pixels // lanes, lanes=lanes, cores=core_count(target), sampled=sampled,
                 registers=vector_registers(target), dot=dot)
    if workload["need_input"] and half:
        parallel_rows(sch, "grad_input")
    if workload["need_sampling"]:
        # Loops (n, g, k, q, p, ci): one task per (n, g, k, q); each lanes-wide pixel vector
        # accumulates over the channels in registers.
        block = sch.get_sblock("corner_sum")
        n, g, k, q, p, ci = sch.get_loops(block)
        p_outer, p_inner = sch.split(p, [None, lanes])
        sch.reorder(n, g, k, q, p_outer, ci, p_inner)
        sch.parallel(sch.fuse(n, g, k, q))
        accumulator = sch.cache_write(block, 0, "local")
        sch.reverse_compute_at(accumulator, p_outer)
        sch.vectorize(p_inner)
        sch.decompose_reduction(block, ci)
        sch.vectorize(sch.get_loops(accumulator)[-1])
        parallel_rows(sch, "grad_offset")
        if geo.with_mask:
            parallel_rows(sch, "grad_mask")


@register("llvm", "deform_conv2d_backward_weight")
def schedule_backward_weight(sch: Schedule, workload, target, sampled: bool | str = False) -> None:
    """deform_conv2d_backward_weight: the deformable columns (stored pixel-major), then
    grad_weight = grad_output x columns^T as a blocked GEMM over (batch, pixel); grad_bias.

    Half dtypes: the GEMM accumulates in float32 (``grad_weight_sum``) and each task rounds its
    tile once, from the registers; with ``gemm=GEMM_BF16_DOT`` the columns are rounded to bfloat16
    pixel pairs (``deform_col_pixel_pairs``, 16 columns a vector) and the GEMM is AVX512-BF16's dot
    product: per step a pair of output-gradient pixels (one 32-bit broadcast per row) times the
    pairs of 16 columns, 32 products per instruction."""
    from tvm_dcn.ops.deform_conv import GEMM_BF16_DOT

    geo, lanes = geometry(workload, target)
    half = geo.dtype != geo.compute_dtype
    if workload["need_weight"]:
        _columns(sch, lanes)
        if geo.gemm == GEMM_BF16_DOT:
            cpu_bf16.require_dot(workload, target)
            parallel_vectorize(sch, "grad_output_bits", parallel_axes=2, lanes=lanes)
            _pairs_stage(sch, "deform_col_pixel_pairs")
            _weight_gradient_gemm(sch, geo, lanes, cpu_bf16.LANES, sampled, half,
                                  dot=cpu_bf16.register(cpu_bf16.DOT_16X2_BF16_BITS))
        else:
            parallel_vectorize(sch, "grad_output_padded", parallel_axes=2, lanes=lanes)
            # Pixel-major columns: the GEMM then reads lanes consecutive rows of one pixel per step.
            sch.transform_layout(sch.get_sblock("deform_col"), ("write", 0), lambda n, row, p: (n, p, row))
            _weight_gradient_gemm(sch, geo, lanes, largest_divisor(geo.reduction, lanes), sampled, half)
    if workload["with_bias"]:
        block = "grad_bias_sum" if half else "grad_bias"
        sch.parallel(sch.get_loops(sch.get_sblock(block))[0])
        if half:
            sch.reverse_compute_at(sch.get_sblock("grad_bias"), sch.get_loops(sch.get_sblock(block))[0])


def _weight_gradient_gemm(sch: Schedule, geo, lanes: int, r_lanes: int, sampled: bool | str, half: bool,
                          dot: Optional[str] = None) -> None:
    """The weight gradient's GEMM: one parallel task per (rows x r_lanes) tile of grad_weight, its
    accumulators in registers across the whole (batch, pixel) reduction; ``half``: the float32
    sums rounded into the half gradient from the registers. ``dot``: the tensor intrinsic of one
    vector over the innermost reduction loop (the pixel pair). ``lanes``: the target's vector
    width, which bounds the sampled tile of weight columns."""
    rows = largest_divisor(geo.group_out_channels, ACCUMULATOR_VECTORS)
    block = sch.get_sblock("grad_weight_sum" if half else "grad_weight")
    co, r, *reduction = sch.get_loops(block)
    inner_reduction = [reduction[-1]] if dot else []
    reduction = reduction[:-1] if dot else reduction
    if sampled:
        co_extent, r_extent = int(sch.get(co).extent), int(sch.get(r).extent)
        co_outer, co_inner = sch.split(co, sch.sample_perfect_tile(
            co, n=2, max_innermost_factor=16, decision=hand_decision(sampled, [co_extent // rows, rows])))
        if dot:  # the intrinsic's vector: r_lanes columns
            r_outer, r_inner = sch.split(r, [None, r_lanes])
        else:
            r_hand = hand_decision(sampled, [r_extent // r_lanes, r_lanes])
            r_outer, r_inner = sch.split(r, sch.sample_perfect_tile(r, n=2, max_innermost_factor=2 * lanes,
                                                                    decision=r_hand))
    else:
        co_outer, co_inner = sch.split(co, [None, rows])
        r_outer, r_inner = sch.split(r, [None, r_lanes])
    sch.reorder(co_outer, r_outer, *reduction, co_inner, r_inner, *inner_reduction)
    tasks = sch.fuse(co_outer, r_outer)
    sch.parallel(tasks)
    if half:
        sch.set_scope(block, 0, "local")
        accumulator = sch.get_sblock("grad_weight")
    else:
        accumulator = sch.cache_write(block, 0, "local")
    sch.reverse_compute_at(accumulator, tasks)
    sch.unroll(co_inner)
    if dot:
        init = sch.decompose_reduction(block, reduction[0])
        sch.vectorize(sch.get_loops(init)[-1])
        sch.tensorize(r_inner, dot)
    else:
        sch.vectorize(r_inner)
        sch.decompose_reduction(block, reduction[0])
    # The accumulator's (co_inner, r_inner) loops; a unit extent (1x1 depthwise) leaves none.
    # With sampled tiles their number depends on the decisions, so not even asked for: a
    # trace whose GetLoops returns another number of loops on replay (a mutated decision)
    # stops MetaSchedule's search with an error.
    acc_loops = sch.get_loops(accumulator)[1:] if not sampled else []
    if len(acc_loops) == 2:
        sch.unroll(acc_loops[0])
        sch.vectorize(acc_loops[1])
