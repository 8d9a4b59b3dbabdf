"""CPU hand schedule for the deformable convolution forward (``tvm_dcn/ops/deform_conv.py``).

- Sampling stages (coordinates, corner indices/weights): parallel over (batch, offset group, tap),
  vectorised along output pixels.
- Deformable im2col: parallel over (batch, channel*tap) rows, vectorised along pixels (the four
  corner reads are gathers; their indices and weights are contiguous vectors).
- GEMM: a register-blocked micro-kernel. Each (co_inner x lanes) tile of the output stays in
  vector registers across the whole reduction, fed by one broadcast weight per row and one vector
  of columns per reduction step (8 FMAs per 9 loads on AVX2); tiles are grouped into blocks of
  output channels x pixels, distributed over cores.
"""
from __future__ import annotations

from tvm.s_tir import Schedule

from .cpu_common import largest_divisor, parallel_vectorize, vector_lanes

# A (rows x lanes) accumulator tile must fit the 16 vector registers of AVX2 with room for loads.
_ACCUMULATOR_VECTORS = 8
_CHANNEL_BLOCK = 64


def schedule(sch: Schedule, workload, target) -> None:
    from tvm_dcn.ops.deform_conv import SPATIAL_ALIGN, ConvGeometry

    geo = ConvGeometry(workload)
    lanes = min(vector_lanes(geo.dtype, target), SPATIAL_ALIGN)

    for block in ("sample_coord", "corner_index", "corner_weight"):
        parallel_vectorize(sch, block, parallel_axes=3, lanes=lanes)
    parallel_vectorize(sch, "deform_col", parallel_axes=2, lanes=lanes)

    # GEMM micro-kernel: one pixel vector wide, `rows` output channels tall. Tiles never straddle
    # a convolution group (its columns come from another slice of deform_col).
    rows = largest_divisor(geo.group_out_channels, _ACCUMULATOR_VECTORS)
    block_rows = largest_divisor(geo.group_out_channels, _CHANNEL_BLOCK, multiple_of=rows)
    if block_rows % rows:
        block_rows = rows
    pixel_vectors = geo.padded_pixels // lanes
    # Enough parallel tasks for every core: split pixels only when channel blocks are too few.
    cores = int(target.attrs.get("num-cores", 1) or 1)
    channel_blocks = geo.batch * geo.out_channels // block_rows
    pixel_blocks = 1
    while channel_blocks * pixel_blocks < 4 * cores and pixel_vectors % (pixel_blocks * 2) == 0:
        pixel_blocks *= 2

    gemm = sch.get_sblock("gemm")
    n, co, p, r = sch.get_loops(gemm)
    co_outer, co_mid, co_inner = sch.split(co, [None, block_rows // rows, rows])
    p_outer, p_mid, p_inner = sch.split(p, [pixel_blocks, None, lanes])
    sch.reorder(n, co_outer, p_outer, co_mid, p_mid, r, co_inner, p_inner)
    sch.parallel(sch.fuse(n, co_outer, p_outer))
    accumulator = sch.cache_write(gemm, 0, "local")
    sch.reverse_compute_at(accumulator, p_mid)
    sch.unroll(co_inner)
    sch.vectorize(p_inner)  # before decompose_reduction: it needs the complete reduction block
    sch.decompose_reduction(gemm, r)
    acc_loops = sch.get_loops(accumulator)
    sch.unroll(acc_loops[-2])
    sch.vectorize(acc_loops[-1])

    out_loops = sch.get_loops(sch.get_sblock("output"))
    sch.parallel(sch.fuse(out_loops[0], out_loops[1]))
