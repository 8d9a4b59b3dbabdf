"""The operator registry: each operator module registers the builder of its TE definition
(:func:`register`); :func:`build` gives a workload's TE tensors, :func:`primfunc` its unscheduled
PrimFunc (what schedules and MetaSchedule start from), and :func:`for_target` its formulation for a
target kind (see the package docstring).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import tvm
from tvm import te

from .workload import Workload

# Name of the kernel function in every PrimFunc, IRModule and compiled module.
ENTRY = "main"


@dataclass(frozen=True)
class OperatorDef:
    """The TE graph of one workload: ``args`` are kernel arguments in call order (outputs last)."""

    args: list[te.Tensor]
    num_outputs: int = 1


_BUILDERS: dict[str, Callable[[Workload], OperatorDef]] = {}
# op -> whether a workload of it has a scatter stage
_SCATTERS: dict[str, Callable[[Workload], bool]] = {}
# op -> workload parameters of its GPU formulation (beyond the atomic scatter)
_GPU_PARAMS: dict[str, dict] = {}
# op -> (workload, CPU target) -> workload parameters of its formulation for that CPU
_CPU_PARAMS: dict[str, Callable[[Workload, object], dict]] = {}

SCATTER_ATOMIC = "atomic"


def register(op: str, scatter: Optional[Callable[[Workload], bool]] = None, gpu_params: Optional[dict] = None,
             cpu_params: Optional[Callable[[Workload, object], dict]] = None):
    """Register the builder of ``op``; ``scatter(workload)``: whether the workload has a scatter
    stage (and so a GPU formulation, see the module docstring); ``gpu_params``: parameters that
    GPU workloads of ``op`` get (another formulation of an intermediate); ``cpu_params(workload,
    target)``: parameters that its workloads get for an LLVM target (e.g. a padding that follows
    the target's vector width)."""
    def wrap(fn: Callable[[Workload], OperatorDef]):
        _BUILDERS[op] = fn
        if scatter is not None:
            _SCATTERS[op] = scatter
        if gpu_params:
            _GPU_PARAMS[op] = dict(gpu_params)
        if cpu_params is not None:
            _CPU_PARAMS[op] = cpu_params
        return fn

    return wrap


def atomic_scatter(workload: Workload) -> bool:
    """Whether ``workload`` uses the atomic (GPU) scatter formulation; validates the parameter."""
    mode = workload.get("scatter")
    if mode is None:
        return False
    if mode != SCATTER_ATOMIC or workload.op not in _SCATTERS:
        raise ValueError(f"workload {workload.op}: scatter must be absent (plane-parallel CPU scatter) or "
                         f"{SCATTER_ATOMIC!r} (operators with a scatter stage only), got {mode!r}")
    return True


def for_target(workload: Workload, target) -> Workload:
    """``workload`` with the formulation of ``target`` (a TVM target, or only its kind name):
    for an LLVM target, the operator's registered ``cpu_params`` for it (none given the kind name
    ``"llvm"`` alone); for GPU kinds the atomic scatter (``scatter``, operators with a scatter
    stage) and the operator's registered ``gpu_params``. Parameters the workload has already are
    kept: a workload that has them all is returned unchanged."""
    kind = target if isinstance(target, str) else target.kind.name
    atomic = atomic_scatter(workload)
    if kind == "llvm":
        if atomic:
            raise ValueError(f"workload {workload.op} has scatter={SCATTER_ATOMIC!r} (GPU atomics); "
                             "the CPU target needs the workload without it")
        if isinstance(target, str) or workload.op not in _CPU_PARAMS:
            return workload
        extra = {name: value for name, value in _CPU_PARAMS[workload.op](workload, target).items()
                 if workload.get(name) is None}
    else:
        extra = {name: value for name, value in _GPU_PARAMS.get(workload.op, {}).items()
                 if workload.get(name) is None}
        if not atomic and _SCATTERS.get(workload.op, lambda wl: False)(workload):
            extra["scatter"] = SCATTER_ATOMIC
    if not extra:
        return workload
    return Workload.make(workload.op, workload.dtype, **dict(workload.params), **extra)


def build(workload: Workload) -> OperatorDef:
    """The TE definition of ``workload``."""
    try:
        builder = _BUILDERS[workload.op]
    except KeyError:
        raise ValueError(f"workload: unknown operator {workload.op!r}; known: {sorted(_BUILDERS)}") from None
    return builder(workload)


def primfunc(workload: Workload) -> tvm.tirx.PrimFunc:
    """The unscheduled PrimFunc of ``workload`` (what schedules and MetaSchedule start from)."""
    definition = build(workload)
    return te.create_prim_func(definition.args).with_attr("global_symbol", ENTRY)


def ir_module(workload: Workload) -> tvm.IRModule:
    """:func:`primfunc` in an IRModule (the form tuning records are matched by, structurally)."""
    return tvm.IRModule({ENTRY: primfunc(workload)})
