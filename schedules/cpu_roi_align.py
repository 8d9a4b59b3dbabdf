"""CPU hand schedules for the RoI pooling family (``tvm_dcn/ops/roi_align.py``, ``deform_roi_pool.py``).

Gathers (the forward ``output`` stage of RoI Align, PS RoI Align, deformable RoI pooling and
deformable PS RoI pooling; the max and average reductions of RoI Pool and PS RoI Pool):

- The input is copied channels-last, (N, H*W, C) (position-sensitive operators: (N, groups, H*W,
  C / groups), so that the channels one group of bins reads are contiguous): a cached read with
  a layout transformation, done once per call, in parallel.
- Loops become (RoI, bin row, bin column, channel block, samples..., channel vector): the
  interpolation weights of a sample are computed once per channel block, and each of its four
  corners is one vector load and FMA per vector of channels. A block of ``2 x lanes`` channels
  accumulates in registers (a local cache of the output) across the samples of a bin.
- RoIs are distributed over the cores.

RoI Pool's max reduction also yields the argmax: both outputs get a local cache (the reduction
combines them with selects, which vectorise; TVM's vectoriser miscompiles ``if_then_else`` there).

Interpolation tables and the other per-RoI stages are small: parallel over RoIs. The backward
scatters are TVMScript stages that carry their own parallel loops; the offset/mask/trans
gradients reduce over channels in vector lanes (``rfactor``) from the channels-last input.
"""
from __future__ import annotations

from tvm.s_tir import Schedule

from .._utils import largest_divisor
from .cpu_common import vector_lanes
from .registry import register

# Stages indexed by RoI (or table row) first: parallel over it.
_ROW_STAGES = ("roi_batch", "roi_geometry", "roi_grid", "roi_inv_count", "y_position", "x_position", "y_index",
               "y_weight", "x_index", "x_weight", "y_count", "x_count", "y_inv_count", "x_inv_count", "y_slope",
               "x_slope", "y_weight_unmasked", "row_bins", "col_bins", "sample_grad", "grad_offset", "grad_mask",
               "grad_trans", "bin_scale", "bin_share", "output", "argmax")


def _blocks(sch: Schedule, names) -> list:
    found = []
    for name in names:
        try:
            found.append(sch.get_sblock(name))
        except Exception:  # the stage does not exist in this operator  # noqa: BLE001
            continue
    return found


def parallel_rows(sch: Schedule, names=_ROW_STAGES) -> None:
    """Parallelise the outermost loop of each existing stage in ``names``."""
    for block in _blocks(sch, names):
        sch.parallel(sch.get_loops(block)[0])


def _read_index(sch: Schedule, block, buffer_name: str) -> int:
    for i, region in enumerate(sch.get(block).reads):
        if region.source.name == buffer_name:
            return i
    raise LookupError(f"block does not read {buffer_name}")


def channels_last_input(sch: Schedule, block, groups: int = 1):
    """Cache ``input`` (N, C, H*W) for ``block`` as (N, groups, H*W, C / groups): channel
    ``c`` at [c % groups, ..., c // groups]. The copy is parallel over (batch, group, pixel) and
    writes contiguous channel runs."""
    cached = sch.cache_read(block, _read_index(sch, block, "input"), "global")
    if groups == 1:
        sch.transform_layout(cached, ("write", 0), lambda n, c, p: (n, p, c))
        n, c, p = sch.get_loops(cached)
        sch.reorder(n, p, c)
        sch.parallel(sch.fuse(n, p))
    else:
        sch.transform_layout(cached, ("write", 0), lambda n, c, p: (n, c % groups, p, c // groups))
        n, c, p = sch.get_loops(cached)
        c_hi, c_lo = sch.split(c, [None, groups])
        sch.reorder(n, c_lo, p, c_hi)
        sch.parallel(sch.fuse(n, c_lo, p))
    return cached


def vector_gather(sch: Schedule, name: str, channels: int, dtype: str, target, reductions: int = 2) -> None:
    """Schedule a gather stage with loops (RoI, channel, ph, pw, reduction x ``reductions``):
    channel vectors innermost, accumulated in registers across the reduction, RoIs in parallel."""
    block = sch.get_sblock(name)
    loops = sch.get_loops(block)
    k, c, ph, pw = loops[:4]
    reduction = loops[4:4 + reductions]
    lanes = largest_divisor(channels, vector_lanes(dtype, target))
    vectors = 2 if channels % (2 * lanes) == 0 else 1
    c_block, c_vec, c_lane = sch.split(c, [None, vectors, lanes])
    sch.reorder(k, ph, pw, c_block, *reduction, c_vec, c_lane)
    caches = [sch.cache_write(block, i, "local") for i in range(len(sch.get(block).writes))]  # RoI Pool: 2
    for cache in caches:
        sch.reverse_compute_at(cache, c_block)
    sch.unroll(c_vec)
    if lanes > 1:
        sch.vectorize(c_lane)
    sch.parallel(k)
    sch.decompose_reduction(block, reduction[0])


def _schedule_forward(sch: Schedule, workload, target, groups: int, channels: int, reduce_block: str = "output",
                      reductions: int = 2) -> None:
    channels_last_input(sch, sch.get_sblock(reduce_block), groups)
    vector_gather(sch, reduce_block, channels, workload.dtype, target, reductions)
    parallel_rows(sch, [n for n in _ROW_STAGES if n != reduce_block])


@register("llvm", "roi_align")
def schedule_roi_align(sch: Schedule, workload, target) -> None:
    _schedule_forward(sch, workload, target, 1, workload["channels"])


@register("llvm", "ps_roi_align")
def schedule_ps_roi_align(sch: Schedule, workload, target) -> None:
    ph, pw = workload["output_size"]
    _schedule_forward(sch, workload, target, ph * pw, workload["channels"] // (ph * pw))


@register("llvm", "deform_roi_pool")
def schedule_deform_roi_pool(sch: Schedule, workload, target) -> None:
    _schedule_forward(sch, workload, target, 1, workload["channels"])


@register("llvm", "deform_psroi_pool")
def schedule_deform_psroi_pool(sch: Schedule, workload, target) -> None:
    group = workload["group_size"]
    _schedule_forward(sch, workload, target, group * group, workload["output_dim"])


@register("llvm", "roi_pool")
def schedule_roi_pool(sch: Schedule, workload, target) -> None:
    _schedule_forward(sch, workload, target, 1, workload["channels"], reduce_block="pool_max")


@register("llvm", "ps_roi_pool")
def schedule_ps_roi_pool(sch: Schedule, workload, target) -> None:
    ph, pw = workload["output_size"]
    _schedule_forward(sch, workload, target, ph * pw, workload["channels"] // (ph * pw))


@register("llvm", "roi_align_backward", "ps_roi_align_backward", "roi_pool_backward", "ps_roi_pool_backward",
          "deform_roi_pool_backward", "deform_psroi_pool_backward")
def schedule_backward(sch: Schedule, workload, target) -> None:
    """Backward scatters: the TVMScript stage is parallel already; the tables feeding it too."""
    parallel_rows(sch)


@register("llvm", "deform_roi_pool_backward_params", "deform_psroi_pool_backward_params")
def schedule_params_backward(sch: Schedule, workload, target) -> None:
    """Offset/mask/trans gradients. ``corner_grad`` (rows, bins, samples, corner; reduction over
    channels) reads the input channels-last; its channel reduction is split into vector lanes
    (``rfactor``): each lane accumulates a strided slice of the channels for all of a bin's
    sample corners in registers, the lanes are summed at the end. Parallel over table rows; the
    weighting stages are small."""
    corner = sch.get_sblock("corner_grad")
    group = workload.as_dict()["params"].get("group_size", 1)
    channels_last_input(sch, corner, group * group)
    *spatial, j = sch.get_loops(corner)
    lanes = largest_divisor(int(sch.get(j).extent), vector_lanes(workload.dtype, target))
    if lanes > 1:
        j_outer, j_lane = sch.split(j, [None, lanes])
        partial = sch.rfactor(j_lane, len(spatial))
        r, ph, pw, iy, ix, q, j_outer, j_lane = sch.get_loops(partial)
        sch.reorder(r, ph, pw, j_outer, iy, ix, q, j_lane)
        sch.reverse_compute_at(sch.cache_write(partial, 0, "local"), pw)
        sch.vectorize(j_lane)
        sch.parallel(r)
        sch.decompose_reduction(partial, j_outer)
        corner = sch.get_sblock("corner_grad")
    sch.parallel(sch.get_loops(corner)[0])
    parallel_rows(sch)
