"""tvm-dcn: deformable convolution and RoI pooling in Apache TVM, called from PyTorch."""
from __future__ import annotations

import os as _os

__version__ = "0.1.0"

# TVM's CPU thread pool sizes itself once, on the first parallel kernel, from TVM_NUM_THREADS or
# its own count of physical cores (which undercounts on some VMs: 1 of 2 vCPUs here). Use the
# CPUs this process may run on, as PyTorch does, unless the user chose.
if "TVM_NUM_THREADS" not in _os.environ:
    from .target import available_cores as _available_cores

    _os.environ["TVM_NUM_THREADS"] = str(_available_cores())

from .workload import Workload  # noqa: E402
from .kernel import Kernel, compile, clear_memory_cache, cache_dir  # noqa: E402
from .target import host_target, target_tag  # noqa: E402
from .functional import deform_conv2d  # noqa: E402

__all__ = [
    "Workload", "Kernel", "compile", "clear_memory_cache", "cache_dir", "host_target", "target_tag",
    "deform_conv2d", "DeformConv2d", "DeformConv2dPack", "ModulatedDeformConv2dPack",
]


def __getattr__(name):
    # Modules are imported lazily so that `import tvm_dcn` stays light for kernel-only use.
    if name in ("DeformConv2d", "DeformConv2dPack", "ModulatedDeformConv2dPack"):
        from . import modules

        return getattr(modules, name)
    raise AttributeError(f"module 'tvm_dcn' has no attribute {name!r}")
