"""Operator definitions in TVM's tensor expression language.

Each operator module exposes ``build(workload) -> OperatorDef``: the TE tensors of one workload
(kernel arguments in call order, output last). Schedules live apart from these definitions, in
the top-level ``schedules`` folder (installed as ``tvm_dcn.schedules``).

Scatter stages (input gradients that add each sample's gradient to its bilinear corners) come in
two formulations, chosen by the workload parameter ``scatter``:

- absent (CPU): one parallel task per block of (batch, channel) planes, which never collide; no
  atomics, a fixed summation order, bit-reproducible gradients;
- ``"atomic"`` (GPU): one thread per gradient element, atomic adds into a zero-filled output
  (CUDA ``atomicAdd``: float64 needs sm_60 or newer; the summation order varies from run to run).

The interpolation math is shared; only the loop structure around the adds differs.

Operators may also lay out an intermediate differently for GPUs (registered ``gpu_params``, e.g.
the forward deformable convolution's ``columns``, see ``deform_conv.py``).
:func:`for_target` gives a workload the formulation of a target (``tvm_dcn.compile`` applies
it), so a CPU workload and its CUDA twin are distinct workloads, and CPU PrimFuncs (and the
structural hashes their tuning records are matched by) do not change.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from tvm import te

from ..workload import Workload


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
