"""tvm-dcn: deformable convolution and RoI pooling in Apache TVM, called from PyTorch."""
from __future__ import annotations

import os as _os
import sys as _sys

from .version import __version__  # noqa: F401

# Threads. TVM's CPU thread pool configures itself once, on the first parallel kernel, from the
# environment; PyTorch's OpenMP runtime does so when torch is first imported. Unless the user chose:
# - TVM_NUM_THREADS: TVM counts physical cores itself and undercounts on some VMs (1 of 2 vCPUs
#   here); use the CPUs this process may run on, as PyTorch does.
# - TVM_THREAD_POOL_SPIN_COUNT=100: an idle TVM worker yields its core 100 times (~40 us here)
#   before it sleeps. That bridges the gaps between the parallel loops of one kernel (waking a
#   sleeping worker costs ~15 us per loop here: 3-region forwards 0.72 -> 0.66 ms geomean) and
#   then gives the core back to the torch ops that follow (TVM's default, 300000 yields, spins
#   ~100 ms: a 2.0 ms conv2d took 2.5 ms right after a tvm_dcn kernel).
# - OMP_WAIT_POLICY=PASSIVE, only if torch is not imported yet: idle OpenMP workers of PyTorch
#   otherwise spin for milliseconds after each torch op and halve the cores left to the next
#   tvm_dcn kernel (measured: 2.0 ms alone, 9.5 ms right after a torch conv2d). Import tvm_dcn
#   before torch, or set OMP_WAIT_POLICY=PASSIVE yourself, to get this (README, "Threads").
#   (Importing tvm imports torch too, through tvm_ffi: so this runs before any import.)
# - TVM_BIND_THREADS=0: TVM pins its worker threads to cores but not the calling thread, which
#   the OS may leave on a worker's core: the kernels then share one core (measured: the 256 x 14
#   forward, after the offset conv2d, 1.25-1.35 ms with the caller on the pinned worker's core,
#   0.79-1.07 ms on the other; unpinned 0.77-0.92 ms wherever the caller runs).
if "torch" not in _sys.modules:
    _os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
_os.environ.setdefault("TVM_THREAD_POOL_SPIN_COUNT", "100")
_os.environ.setdefault("TVM_BIND_THREADS", "0")
if "TVM_NUM_THREADS" not in _os.environ:
    try:
        _os.environ["TVM_NUM_THREADS"] = str(len(_os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        _os.environ["TVM_NUM_THREADS"] = str(_os.cpu_count() or 1)

from .ops.workload import Workload  # noqa: E402
from .kernel import Kernel, compile, clear_memory_cache, cache_dir  # noqa: E402
from .target import host_target, target_tag  # noqa: E402
from .functional import deform_conv2d  # noqa: E402
from . import workloads  # noqa: E402,F401  (tvm_dcn.workloads.record, load, save)
from . import roi as _roi  # noqa: E402,F401  (defines the RoI family's torch.ops.tvm_dcn operators: 70 ms)

__all__ = [
    "Workload", "Kernel", "compile", "clear_memory_cache", "cache_dir", "host_target", "target_tag",
    "deform_conv2d", "DeformConv2d", "DeformConv2dPack", "ModulatedDeformConv2dPack", "DCN", "DCNv2",
]
# RoI pooling family (tvm_dcn/roi.py).
_ROI_NAMES = ("roi_align", "roi_pool", "ps_roi_align", "ps_roi_pool", "deform_roi_pool", "deform_psroi_pool",
              "RoIAlign", "RoIPool", "PSRoIAlign", "PSRoIPool", "DeformRoIPool", "DeformRoIPoolPack",
              "ModulatedDeformRoIPoolPack", "DeformRoIPooling", "DeformRoIPoolingPack", "benchmark_roi_align")
__all__ += list(_ROI_NAMES)


def __getattr__(name):
    # Modules are imported lazily so that `import tvm_dcn` stays light for kernel-only use.
    if name in ("DeformConv2d", "DeformConv2dPack", "ModulatedDeformConv2dPack", "DCN", "DCNv2"):
        from . import modules

        return getattr(modules, name)
    if name in _ROI_NAMES:
        from . import roi

        return getattr(roi, name)
    raise AttributeError(f"module 'tvm_dcn' has no attribute {name!r}")
