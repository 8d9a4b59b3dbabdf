"""Hand-written schedules: the fallback used for every workload without a tuning record, and the
expert baseline the auto-scheduler must beat.

Installed as ``tvm_dcn.schedules``. Each schedule is a function ``schedule(sch, workload, target)``
that transforms a :class:`tvm.s_tir.Schedule` of the operator's PrimFunc in place (blocks are
addressed by the stage names of the operator's TE definition in ``tvm_dcn/ops``).
"""
from __future__ import annotations

import importlib
from typing import Callable, Optional

# (operator, target kind) -> module in this package defining ``schedule``.
_SCHEDULES = {
    ("deform_conv2d", "llvm"): "cpu_deform_conv2d",
}


def find(op: str, target_kind: str) -> Optional[Callable]:
    """The hand schedule of ``op`` for ``target_kind`` ('llvm', 'cuda'), or None."""
    name = _SCHEDULES.get((op, target_kind))
    if name is None:
        return None
    return importlib.import_module(f"{__name__}.{name}").schedule


def source_file(op: str, target_kind: str) -> Optional[str]:
    """Path of the module holding the hand schedule (its bytes fingerprint cached kernels)."""
    name = _SCHEDULES.get((op, target_kind))
    if name is None:
        return None
    return importlib.import_module(f"{__name__}.{name}").__file__
