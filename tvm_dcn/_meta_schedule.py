"""MetaSchedule helpers shared by the tuners (``tune`` on this machine, ``remote_tune`` across
machines): the lazy MetaSchedule import, a lean import of the tensor intrinsics, and reading a
tuning database."""
from __future__ import annotations

import importlib
import importlib.util
import logging
import platform
import sys

from .ops import Workload, ir_module


def meta_schedule():
    """``tvm.s_tir.meta_schedule``, imported on first use (slow), its logger quieted to warnings."""
    from tvm.s_tir import meta_schedule as ms  # noqa: PLC0415

    logging.getLogger("tvm.s_tir.meta_schedule").setLevel(logging.WARNING)
    return ms


_TENSOR_INTRIN = "tvm.s_tir.tensor_intrin"
# Submodules of tvm.s_tir.tensor_intrin holding each CPU architecture's intrinsics.
_CPU_INTRIN_MODULES = {"x86_64": "x86", "amd64": "x86", "i386": "x86", "i686": "x86", "aarch64": "arm_cpu",
                       "arm64": "arm_cpu", "riscv64": "riscv_cpu"}


def intrinsics_key(target) -> tuple[str, str]:
    """(kind, CPU architecture) of ``target``: the arguments of ``import_tensor_intrinsics``."""
    if target.kind.name != "llvm":
        return target.kind.name, ""
    triple = str(target.attrs.get("mtriple", "") or "")
    return "llvm", (triple.split("-")[0] if triple else platform.machine()).lower()


def import_tensor_intrinsics(kind: str, arch: str = "") -> None:
    """Register the tensor intrinsics a target of ``kind`` (and CPU ``arch``) can tensorize with.

    ``TuneContext`` and MetaSchedule's build function both run ``import tvm.s_tir.tensor_intrin``,
    which registers every backend's intrinsics: ~26 s on this machine (17 s of it CUDA's), paid by
    the tuning process and again by every builder worker process. A CPU task can only use its own
    architecture's intrinsics, so for ``kind == "llvm"`` the package is entered in ``sys.modules``
    without running its ``__init__`` and only that architecture's submodule is imported (< 1 s);
    the import statements in MetaSchedule then find the package. Any other kind imports it whole
    (completing a lean package imported earlier in the process)."""
    package = sys.modules.get(_TENSOR_INTRIN)
    lean = package is not None and getattr(package, "_tvm_dcn_lean", False)
    if package is not None and not lean:
        return  # the whole package is already imported
    submodule = _CPU_INTRIN_MODULES.get(arch.lower()) if kind == "llvm" else None
    if submodule is None:
        if lean:
            from tvm.runtime import enabled  # noqa: PLC0415

            for name in ["cuda"] + (["arm_cpu", "x86", "rocm", "hexagon", "riscv_cpu"] if enabled("llvm") else []):
                importlib.import_module(f"{_TENSOR_INTRIN}.{name}")
            package._tvm_dcn_lean = False
        else:
            importlib.import_module(_TENSOR_INTRIN)
        return
    if package is None:
        import tvm.s_tir  # noqa: PLC0415

        package = importlib.util.module_from_spec(importlib.util.find_spec(_TENSOR_INTRIN))  # not executed
        package._tvm_dcn_lean = True
        sys.modules[_TENSOR_INTRIN] = package
        tvm.s_tir.tensor_intrin = package
    importlib.import_module(f"{_TENSOR_INTRIN}.{submodule}")


def import_tensor_intrinsics_for(target) -> None:
    """The tensor intrinsics ``target`` can tensorize with, and the hand schedules' own."""
    from .schedules import register_intrinsics  # noqa: PLC0415

    import_tensor_intrinsics(*intrinsics_key(target))
    register_intrinsics()  # the hand schedules' own (their traces seed and may win the search)


def records_of(db, workload: Workload) -> list:
    """Measured records of ``workload`` in ``db``, fastest first."""
    mod = ir_module(workload)
    if not db.has_workload(mod):
        return []
    return [r for r in db.get_top_k(db.commit_workload(mod), 1_000_000) if r.run_secs]


def mean_seconds(record) -> float:
    """Mean measured run time of a tuning record, in seconds."""
    secs = [float(s) for s in record.run_secs]
    return sum(secs) / len(secs)
