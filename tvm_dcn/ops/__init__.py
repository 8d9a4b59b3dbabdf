"""Operator definitions in TVM's tensor expression language.

Each operator module registers a builder per operator (``@register(op)``, ``registry.py``);
``build(workload) -> OperatorDef`` gives the TE tensors of one workload (kernel arguments in call
order, output last) and ``primfunc(workload)`` its unscheduled PrimFunc. A workload
(:class:`Workload`, ``workload.py``) names the operator and fixes every shape and attribute.
Schedules live apart from these definitions, in the top-level ``schedules`` folder (installed as
``tvm_dcn.schedules``).

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

from .registry import (ENTRY, SCATTER_ATOMIC, OperatorDef, atomic_scatter, build, for_target, ir_module,  # noqa: F401
                       primfunc, register)
from .workload import Workload  # noqa: F401

from . import deform_conv  # noqa: E402,F401  (registers its operators)
from . import roi_align, deform_roi_pool  # noqa: E402,F401  (RoI pooling family)
