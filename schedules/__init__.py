"""Hand-written schedules: the fallback used for every workload without a tuning record, and the
expert baseline the auto-scheduler must beat.

Installed as ``tvm_dcn.schedules``. Each schedule is a function ``schedule(sch, workload, target)``
that transforms a :class:`tvm.s_tir.Schedule` of the operator's PrimFunc in place (blocks are
addressed by the stage names of the operator's TE definition in ``tvm_dcn/ops``), registered for
its operators and target kind by ``@register(target_kind, *ops)`` beside its code.
"""
from __future__ import annotations

from .registry import HAND_DECISIONS, find, find_hand_point, find_template, register  # noqa: F401

from . import cpu_bf16, cpu_deform_conv2d, cpu_roi_align, cpu_transpose  # noqa: E402,F401  (register their schedules)
from . import cuda_deform_conv2d, cuda_roi_align  # noqa: E402,F401


def register_intrinsics() -> None:
    """Register the tensor intrinsics the hand schedules use (``Schedule.tensorize``): a tuning
    record's trace names them, so replaying one needs them registered first."""
    cpu_transpose.register()
    cpu_bf16.register(cpu_bf16.DOT_16X2_BF16)
    cpu_bf16.register(cpu_bf16.DOT_16X2_BF16_BITS)
