"""CUDA hand schedules for the deformable convolution, forward and backward
(``tvm_dcn/ops/deform_conv.py``; blocks are addressed by its stage names).

- Sampling (coordinates, corner indices and weights): one thread per element.
- Deformable im2col (``deform_col``): one thread per vector of pixels of one (channel, tap) row:
  contiguous, vectorised loads of the corner indices and weights and stores of the columns,
  four gathers per element from the input (cached in L1/L2: neighbouring pixels sample
  neighbouring positions).
- GEMMs (forward output, column gradient, weight gradient): ``cuda_common.tiled_gemm``, operand
  tiles staged in shared memory with vector loads where aligned, a 4 x 4 register tile per
  thread. The forward GEMM writes the output (and adds the bias) from its registers.
- Input gradient: the atomic scatter stage binds its own threads.
- Corner sums (offset and mask gradients): one thread per (tap, pixel) accumulating the four
  corners over the offset group's channels in registers; the offset and mask gradients are
  elementwise. Bias gradient: a block-wide reduction per output channel.
"""
from __future__ import annotations

from .cuda_common import (bind_elementwise, bind_reduction, existing_blocks, gemm_tiles, split_threads, tiled_gemm,
                          vector_width)
from .registry import register


def _geometry(workload):
    from tvm_dcn.ops.deform_conv import ConvGeometry

    geo = ConvGeometry(workload)
    # The intermediates (columns, sums) are in the arithmetic's dtype: float32 for half workloads.
    return geo, vector_width(geo.compute_dtype)


def _aligned(vector: int, *extents: int) -> int:
    """``vector`` if it divides every extent (tile widths and row strides), else 1 (scalar loads)."""
    return vector if all(e % vector == 0 for e in extents) else 1


def _sampling(sch) -> None:
    """Coordinates, corner indices and weights: one thread per element. (Inlining the
    coordinates into their consumers repeats their validity test in every corner's expression;
    vectorising them serialises the per-pixel branches.)"""
    for block in existing_blocks(sch, ("sample_coord", "corner_index", "corner_weight")):
        bind_elementwise(sch, block)


def _columns(sch, vector: int) -> None:
    _sampling(sch)
    bind_elementwise(sch, sch.get_sblock("deform_col"), vector=vector)


@register("cuda", "deform_conv2d")
def schedule(sch, workload, target) -> None:
    """deform_conv2d: sampling, deformable im2col, then output = weight x columns (+ bias)."""
    geo, vector = _geometry(workload)
    _columns(sch, vector)
    # A half weight is widened where the GEMM stages it (the CPU's separate widening pass would
    # otherwise run unbound, on the host).
    for block in existing_blocks(sch, ("weight_widened",)):
        sch.compute_inline(block)
    tiles = gemm_tiles(group_rows=geo.group_out_channels, cols=geo.padded_pixels, reduction=geo.reduction,
                       dtype=geo.dtype)
    # The weight in its own dtype (16-byte loads: 8 half values), the columns in the arithmetic's.
    weight_vector = _aligned(vector_width(geo.dtype), geo.reduction, tiles.bk)
    tiled_gemm(sch, sch.get_sblock("gemm"), tiles, vector_operands=(weight_vector, _aligned(vector, tiles.block_cols)),
               epilogue="output")


def _refuse_half_gradients(workload) -> None:
    from tvm_dcn.ops.deform_conv import HALF_DTYPES

    if workload.dtype in HALF_DTYPES:
        raise ValueError(f"workload {workload.op}: half-precision gradient kernels are CPU kernels, got {workload.dtype} "
                         "for CUDA (the PyTorch bridge runs CUDA half gradients through the float32 kernels)")


@register("cuda", "deform_conv2d_backward_data")
def schedule_backward_data(sch, workload, target) -> None:
    """deform_conv2d_backward_data: column gradient = weight^T x grad_output (per group), then
    the atomic input scatter and/or the corner sums of the offset and mask gradients."""
    _refuse_half_gradients(workload)
    geo, vector = _geometry(workload)
    _sampling(sch)
    bind_elementwise(sch, sch.get_sblock("grad_output_padded"))
    tiles = gemm_tiles(group_rows=geo.reduction, cols=geo.padded_pixels, reduction=geo.group_out_channels,
                       dtype=geo.dtype)
    weight_vector = _aligned(vector, geo.reduction, tiles.block_rows)
    tiled_gemm(sch, sch.get_sblock("grad_col"), tiles,
               vector_operands=(weight_vector, _aligned(vector, tiles.block_cols)))
    if workload["need_sampling"]:
        _corner_sums(sch)
        for block in existing_blocks(sch, ("grad_offset", "grad_mask")):
            bind_elementwise(sch, block)


def _corner_sums(sch) -> None:
    """corner_sum (n, g, k, q, p; ci): a thread per (n, g, k, p) sums all four corners over the
    channels in registers, reading each column gradient once."""
    block = sch.get_sblock("corner_sum")
    n, g, k, q, p, ci = sch.get_loops(block)
    sch.reorder(n, g, k, p, ci, q)
    extent = 1
    for loop in (n, g, k, p):
        extent *= int(sch.get(loop).extent)
    _, tx, exact = split_threads(sch, sch.fuse(n, g, k, p), extent, threads=128)
    if exact:  # else the four sums accumulate in place (see split_threads)
        accumulator = sch.cache_write(block, 0, "local")
        sch.reverse_compute_at(accumulator, tx)
    sch.unroll(q)
    sch.decompose_reduction(block, ci)


@register("cuda", "deform_conv2d_backward_weight")
def schedule_backward_weight(sch, workload, target) -> None:
    """deform_conv2d_backward_weight: the deformable columns again, then grad_weight =
    grad_output x columns^T (a GEMM reducing over batch and pixels); grad_bias."""
    _refuse_half_gradients(workload)
    geo, vector = _geometry(workload)
    if workload["need_weight"]:
        _columns(sch, vector)
        bind_elementwise(sch, sch.get_sblock("grad_output_padded"))
        tiles = gemm_tiles(group_rows=geo.group_out_channels, cols=geo.reduction,
                           reduction=geo.batch * geo.padded_pixels, dtype=geo.dtype,
                           reduction_align=geo.padded_pixels)
        operand_vector = _aligned(vector, tiles.bk)
        tiled_gemm(sch, sch.get_sblock("grad_weight"), tiles, vector_operands=(operand_vector, operand_vector))
    if workload["with_bias"]:
        bind_reduction(sch, sch.get_sblock("grad_bias"))
