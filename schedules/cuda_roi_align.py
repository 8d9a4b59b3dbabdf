"""CUDA schedule for the RoI pooling family (``tvm_dcn/ops/roi_align.py``, ``deform_roi_pool.py``):
a simple one, the same for every operator of the family.

Every stage gets one thread per output element (its spatial loops fused, 256 threads a block),
in the stage's own layout: for the gathers (RoI, channel, bin row, bin column), bins fastest, as
torchvision's CUDA kernels do. A reduction (the samples of a bin, the pixels of a pooling bin,
the channels of a corner sum) runs serially in its thread, accumulating in a register. The
small per-RoI stages (geometry, interpolation tables) are kernels of their own: inlining them
into the gathers (what dlight's fallback does) recomputes them per channel and makes the
expressions so large that TVM takes a minute to lower one kernel. The input-gradient scatters
bind their own threads (atomic adds, ``tvm_dcn.ops.gpu_scatter``).

What this leaves on the table: the gathers read the input planes (N, C, H*W) at scattered
positions, with neighbouring threads on neighbouring bins of one channel; a channels-last copy of
the input, or a thread per channel with a bin's samples shared through shared memory, would
coalesce better. MetaSchedule tuning can find such layouts; this schedule is the baseline.
"""
from __future__ import annotations

from .cuda_common import bind_elementwise, fused, is_self_threaded, iter_kinds, spatial_then_reductions, split_threads
from .registry import register


@register("cuda", "roi_align", "roi_align_backward", "ps_roi_align", "ps_roi_align_backward", "roi_pool",
          "roi_pool_backward", "ps_roi_pool", "ps_roi_pool_backward", "deform_roi_pool", "deform_roi_pool_backward",
          "deform_roi_pool_backward_params", "deform_psroi_pool", "deform_psroi_pool_backward",
          "deform_psroi_pool_backward_params")
def schedule(sch, workload, target) -> None:
    """All stages of a RoI operator (forward, input gradient or parameter gradients)."""
    for block in sch.get_child_blocks(sch.get_sblock("root")):
        if is_self_threaded(sch, block):
            continue
        if "R" in iter_kinds(sch, block):
            _thread_per_output(sch, block)
        else:
            bind_elementwise(sch, block)


def _thread_per_output(sch, block) -> None:
    """A reduction stage: a thread per output element; its reduction serial, in a register
    (in place when the thread split is not exact, see ``split_threads``, and for stages with two
    outputs, RoI Pool's max and argmax)."""
    spatial, reductions, extent = spatial_then_reductions(sch, block)
    _, tx, exact = split_threads(sch, fused(sch, spatial), extent)
    if exact and len(sch.get(block).writes) == 1:
        accumulator = sch.cache_write(block, 0, "local")
        sch.reverse_compute_at(accumulator, tx)
    sch.decompose_reduction(block, reductions[0])
