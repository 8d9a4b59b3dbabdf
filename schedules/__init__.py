"""Hand-written schedules: the fallback used for every workload without a tuning record, and the
expert baseline the auto-scheduler must beat.

Installed as ``tvm_dcn.schedules``. Each schedule is a function ``schedule(sch, workload, target)``
that transforms a :class:`tvm.s_tir.Schedule` of the operator's PrimFunc in place (blocks are
addressed by the stage names of the operator's TE definition in ``tvm_dcn/ops``).
"""
from __future__ import annotations

import functools
import importlib
import inspect
from typing import Callable, Optional

# (operator, target kind) -> "module" (its function ``schedule``) or "module:function" in this package.
_SCHEDULES = {
    ("deform_conv2d", "llvm"): "cpu_deform_conv2d",
    ("deform_conv2d_backward_data", "llvm"): "cpu_deform_conv2d:schedule_backward_data",
    ("deform_conv2d_backward_weight", "llvm"): "cpu_deform_conv2d:schedule_backward_weight",
    ("roi_align", "llvm"): "cpu_roi_align:schedule_roi_align",
    ("roi_align_backward", "llvm"): "cpu_roi_align:schedule_backward",
    ("ps_roi_align", "llvm"): "cpu_roi_align:schedule_ps_roi_align",
    ("ps_roi_align_backward", "llvm"): "cpu_roi_align:schedule_backward",
    ("roi_pool", "llvm"): "cpu_roi_align:schedule_roi_pool",
    ("roi_pool_backward", "llvm"): "cpu_roi_align:schedule_backward",
    ("ps_roi_pool", "llvm"): "cpu_roi_align:schedule_ps_roi_pool",
    ("ps_roi_pool_backward", "llvm"): "cpu_roi_align:schedule_backward",
    ("deform_roi_pool", "llvm"): "cpu_roi_align:schedule_deform_roi_pool",
    ("deform_roi_pool_backward", "llvm"): "cpu_roi_align:schedule_backward",
    ("deform_roi_pool_backward_params", "llvm"): "cpu_roi_align:schedule_params_backward",
    ("deform_psroi_pool", "llvm"): "cpu_roi_align:schedule_deform_psroi_pool",
    ("deform_psroi_pool_backward", "llvm"): "cpu_roi_align:schedule_backward",
    ("deform_psroi_pool_backward_params", "llvm"): "cpu_roi_align:schedule_params_backward",
    ("deform_conv2d", "cuda"): "cuda_deform_conv2d",
    ("deform_conv2d_backward_data", "cuda"): "cuda_deform_conv2d:schedule_backward_data",
    ("deform_conv2d_backward_weight", "cuda"): "cuda_deform_conv2d:schedule_backward_weight",
    ("roi_align", "cuda"): "cuda_roi_align",
    ("roi_align_backward", "cuda"): "cuda_roi_align",
    ("ps_roi_align", "cuda"): "cuda_roi_align",
    ("ps_roi_align_backward", "cuda"): "cuda_roi_align",
    ("roi_pool", "cuda"): "cuda_roi_align",
    ("roi_pool_backward", "cuda"): "cuda_roi_align",
    ("ps_roi_pool", "cuda"): "cuda_roi_align",
    ("ps_roi_pool_backward", "cuda"): "cuda_roi_align",
    ("deform_roi_pool", "cuda"): "cuda_roi_align",
    ("deform_roi_pool_backward", "cuda"): "cuda_roi_align",
    ("deform_roi_pool_backward_params", "cuda"): "cuda_roi_align",
    ("deform_psroi_pool", "cuda"): "cuda_roi_align",
    ("deform_psroi_pool_backward", "cuda"): "cuda_roi_align",
    ("deform_psroi_pool_backward_params", "cuda"): "cuda_roi_align",
}


def register_intrinsics() -> None:
    """Register the tensor intrinsics the hand schedules use (``Schedule.tensorize``): a tuning
    record's trace names them, so replaying one needs them registered first."""
    from . import cpu_transpose

    cpu_transpose.register()


def _entry(op: str, target_kind: str) -> Optional[tuple[str, str]]:
    spec = _SCHEDULES.get((op, target_kind))
    if spec is None:
        return None
    module, _, function = spec.partition(":")
    return module, function or "schedule"


def find(op: str, target_kind: str) -> Optional[Callable]:
    """The hand schedule of ``op`` for ``target_kind`` ('llvm', 'cuda'), or None."""
    entry = _entry(op, target_kind)
    if entry is None:
        return None
    return getattr(importlib.import_module(f"{__name__}.{entry[0]}"), entry[1])


def find_template(op: str, target_kind: str) -> Optional[Callable]:
    """The hand schedule of ``op`` as a tuning design space: ``template(sch, workload, target)``
    with its tile sizes sampled (schedules that take ``sampled=True``), or None."""
    hand = find(op, target_kind)
    if hand is None or "sampled" not in inspect.signature(hand).parameters:
        return None
    return functools.partial(hand, sampled=True)


def source_file(op: str, target_kind: str) -> Optional[str]:
    """Path of the module holding the hand schedule (its bytes fingerprint cached kernels)."""
    entry = _entry(op, target_kind)
    if entry is None:
        return None
    return importlib.import_module(f"{__name__}.{entry[0]}").__file__
