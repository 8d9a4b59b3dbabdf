"""Operator definitions in TVM's tensor expression language.

Each operator module exposes ``build(workload) -> OperatorDef``: the TE tensors of one workload
(kernel arguments in call order, output last). Schedules live apart from these definitions, in
the top-level ``schedules`` folder (installed as ``tvm_dcn.schedules``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from tvm import te

from ..workload import Workload


@dataclass(frozen=True)
class OperatorDef:
    """The TE graph of one workload: ``args`` are kernel arguments in call order (outputs last)."""

    args: list[te.Tensor]
    num_outputs: int = 1


_BUILDERS: dict[str, Callable[[Workload], OperatorDef]] = {}


def register(op: str):
    def wrap(fn: Callable[[Workload], OperatorDef]):
        _BUILDERS[op] = fn
        return fn

    return wrap


def source_file(op: str) -> str:
    """Path of the module defining ``op`` (its bytes fingerprint cached kernels)."""
    import sys

    return sys.modules[_BUILDERS[op].__module__].__file__


def build(workload: Workload) -> OperatorDef:
    """The TE definition of ``workload``."""
    try:
        builder = _BUILDERS[workload.op]
    except KeyError:
        raise ValueError(f"workload: unknown operator {workload.op!r}; known: {sorted(_BUILDERS)}") from None
    return builder(workload)


from . import deform_conv  # noqa: E402,F401  (registers its operators)
from . import roi_align, deform_roi_pool  # noqa: E402,F401  (RoI pooling family)
