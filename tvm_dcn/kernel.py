"""The kernel build pipeline: workload + target -> scheduled, compiled, cached kernel.

Schedule preference: a committed MetaSchedule record for the target's tag (``"tuned"``), else
the hand schedule in ``schedules/`` (``"hand"``), else TVM's default lowering (``"default"``: the
unscheduled loop nest on the CPU). Compiled kernels are cached in memory per process and on disk
as exported shared libraries, so that a second process loads instead of recompiling.

The disk cache lives in ``$TVM_DCN_CACHE_DIR``, else ``$XDG_CACHE_HOME/tvm-dcn``, else
``~/.cache/tvm-dcn``. Each entry is named by a hash of everything that determines the code (TVM
and tvm-dcn versions, operator and schedule sources, tuning record, workload, target), and is
written to a temporary file and renamed into place, so concurrent processes never see a partial
library (the worst case is two processes compiling the same kernel once each).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Optional, Sequence

import tvm

from . import ops, recording
from .ops import ENTRY, Workload, primfunc
from .target import TargetLike, as_target, target_tag
from .version import __version__

logger = logging.getLogger(__name__)

SCHEDULE_SOURCES = ("tuned", "hand", "default")


class Kernel:
    """A compiled kernel for one workload and target.

    Call it with the kernel arguments (torch tensors or TVM tensors, in the operator's argument
    order, outputs last); it writes the outputs in place. ``schedule_source`` is ``"tuned"``,
    ``"hand"`` or ``"default"``. A CUDA kernel runs on the device of its torch tensors (all on
    one) and on torch's current stream of that device.
    """

    def __init__(self, workload: Workload, target: tvm.target.Target, module, schedule_source: str,
                 from_disk_cache: bool = False, library_path: Optional[str] = None):
        self.workload = workload
        self.target = target
        self.target_tag = target_tag(target)
        self.module = module
        self.schedule_source = schedule_source
        self.from_disk_cache = from_disk_cache
        self.library_path = library_path
        self.device_type = "cpu" if target.kind.name == "llvm" else target.kind.name
        # A GPU kernel built where TVM cannot load GPU modules (no driver): inspectable, not callable.
        self.runnable = runtime_can_run(target)
        self._func = module[ENTRY] if self.runnable else None
        # Such a kernel's device code compiled here (tvm_dcn.cuda.compile_source), if a compiler is:
        # (binary, "fatbin" or "cubin"); None elsewhere (a runnable module holds its binary itself).
        self.cuda_binary: Optional[tuple[bytes, str]] = None

    def __call__(self, *args) -> None:
        if self.device_type == "cpu":
            self._func(*args)
            return
        if self._func is None:
            raise RuntimeError(f"tvm_dcn: {self.workload.op} was built for {self.target_tag}, but this process's TVM "
                               f"runtime cannot run {self.device_type} kernels (its {self.device_type} runtime "
                               "library did not load: is the GPU driver installed?)")
        index = _device_index(args, self.device_type, self.workload.op)
        if index is None:
            self._func(*args)
            return
        import torch  # noqa: PLC0415

        # TVM launches on the current CUDA device (and its host code sets it from the arguments):
        # make it the tensors' device for the call, then restore the caller's. tvm_ffi runs the
        # kernels on torch's current stream of that device (it reads it from the tensor arguments).
        with torch.cuda.device(index):
            self._func(*args)

    def source(self, fmt: str = "ll") -> str:
        """Generated code of a freshly built kernel: ``"ll"`` (LLVM IR) or ``"asm"`` of the CPU
        (host) part, ``"cu"`` for the CUDA C of a CUDA kernel."""
        module = getattr(self.module, "mod", self.module)  # tvm.compile returns an Executable
        if fmt == "cu":
            device_modules = [m for m in module.imports if m.kind == "cuda"]
            if not device_modules:
                raise ValueError(f"source('cu'): {self!r} has no CUDA module (a {self.target.kind.name} kernel, "
                                 "or one loaded from the disk cache, which keeps only binaries)")
            return device_modules[0].inspect_source("cuda")
        return module.inspect_source(fmt)

    def resource_usage(self) -> dict:
        """Per CUDA kernel of this module: registers, shared memory, stack and spills for the
        target's architecture (``tvm_dcn.cuda.resource_usage``; needs nvcc)."""
        from . import cuda  # noqa: PLC0415

        return cuda.resource_usage(self.source("cu"), str(self.target.attrs["arch"]))

    def __repr__(self) -> str:
        return (f"Kernel({self.workload.short_name()}, target={self.target_tag}, "
                f"schedule={self.schedule_source})")


def runtime_can_run(target) -> bool:
    """Whether this process's TVM runtime can load (and so run) modules for ``target``'s kind: always for the
    CPU; for CUDA only where TVM's CUDA runtime library loaded (it needs the driver, ``libcuda``)."""
    kind = as_target(target).kind.name
    return kind == "llvm" or tvm.get_global_func(f"ffi.Module.load_from_bytes.{kind}", allow_missing=True) is not None


def _device_index(args, device_type: str, op: str) -> Optional[int]:
    """The device index of the tensor arguments of a GPU kernel call (None if none is a torch tensor);
    ValueError if a torch tensor is elsewhere."""
    index = None
    for position, arg in enumerate(args):
        device = getattr(arg, "device", None)
        if device is None or not hasattr(device, "index") or not hasattr(arg, "data_ptr"):
            continue  # not a torch tensor (TVM tensors carry their device themselves)
        if device.type != device_type or (index is not None and device.index != index):
            where = f"{device_type}:{index}" if index is not None else device_type
            raise ValueError(f"tvm_dcn: argument {position} of the {op} kernel is on {device}, but the kernel runs "
                             f"on {where}; all tensors must be on one {device_type} device")
        index = device.index
    return index


def cache_dir() -> Path:
    """Root of the on-disk kernel cache."""
    env = os.environ.get("TVM_DCN_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "tvm-dcn"


_memory_cache: dict[tuple[Workload, str, Optional[str]], Kernel] = {}
_memory_lock = threading.Lock()
_build_locks: dict[tuple, threading.Lock] = {}


class _PreferredSchedule(threading.local):
    source: Optional[str] = None


_preferred_schedule = _PreferredSchedule()


@contextlib.contextmanager
def forced_schedule(source: Optional[str]):
    """Within this context (this thread), kernels requested without an explicit ``schedule`` use
    ``source`` ("tuned", "hand", "default"; None: the best available). For benchmarks comparing
    schedule sources through the PyTorch functions, e.g. forward and backward together."""
    if source is not None and source not in SCHEDULE_SOURCES:
        raise ValueError(f"schedule must be one of {SCHEDULE_SOURCES} or None, got {source!r}")
    previous = _preferred_schedule.source
    _preferred_schedule.source = source
    try:
        yield
    finally:
        _preferred_schedule.source = previous


_clear_callbacks: list = []


def on_clear_memory_cache(callback) -> None:
    """Calls ``callback()`` whenever :func:`clear_memory_cache` runs (for caches holding kernels)."""
    _clear_callbacks.append(callback)


def clear_memory_cache() -> None:
    """Forget kernels compiled or loaded by this process (the disk cache is kept)."""
    with _memory_lock:
        _memory_cache.clear()
        for callback in _clear_callbacks:
            callback()


def compile(workload: Workload, target: TargetLike = None, *, schedule: Optional[str] = None,
            use_disk_cache: bool = True) -> Kernel:  # noqa: A001  (mirrors tvm.compile)
    """Build (or fetch from the caches) the kernel of ``workload`` for ``target``.

    ``target``: None for the host CPU, or a TVM target / its JSON dict. ``schedule``: force one
    source (``"tuned"``, ``"hand"``, ``"default"``) instead of the best available; forcing a source
    that does not exist for this workload raises ``LookupError``.

    GPU targets (e.g. ``{"kind": "cuda", "arch": "sm_90"}``) build on any machine: the workload
    gets the target's scatter formulation (``ops.for_target``; the kernel's ``workload`` says so).
    Where TVM cannot run CUDA (no driver), the kernel keeps its CUDA C (``source("cu")``) and, if
    nvcc or NVRTC is here, its compiled binary (``cuda_binary``); it is not cached on disk and
    calling it raises ``RuntimeError``.
    """
    if not isinstance(workload, Workload):
        raise TypeError(f"workload must be a tvm_dcn.Workload, got {type(workload).__name__}")
    if schedule is not None and schedule not in SCHEDULE_SOURCES:
        raise ValueError(f"schedule must be one of {SCHEDULE_SOURCES} or None, got {schedule!r}")
    recording.note(workload)
    schedule = schedule or _preferred_schedule.source
    target = as_target(target)
    workload = ops.for_target(workload, target)  # the target's formulation (GPU: atomic scatter)
    key = (workload, _target_key(target), schedule)
    kernel = _memory_cache.get(key)
    if kernel is not None:
        return kernel
    with _memory_lock:
        lock = _build_locks.setdefault(key, threading.Lock())
    with lock:  # one build per key, even with many threads asking at once
        kernel = _memory_cache.get(key)
        if kernel is None:
            kernel = _build_or_load(workload, target, schedule, use_disk_cache)
            _memory_cache[key] = kernel
    return kernel


_target_keys: dict[int, tuple[tvm.target.Target, str]] = {}


def _target_key(target: tvm.target.Target) -> str:
    """The canonical JSON of ``target`` (memoised per target object: exporting costs ~10 us, a
    noticeable part of a small kernel call)."""
    entry = _target_keys.get(id(target))
    if entry is None or entry[0] is not target:
        if len(_target_keys) > 64:  # targets built afresh per call (JSON dicts): keep the memo small
            _target_keys.clear()
        entry = (target, json.dumps(target.export(), sort_keys=True, default=str))
        _target_keys[id(target)] = entry
    return entry[1]


def _build_or_load(workload: Workload, target, schedule: Optional[str], use_disk_cache: bool,
                   skip_tuned: bool = False) -> Kernel:
    # A GPU module that this process cannot load is kept in memory (for its source), not exported.
    use_disk_cache = use_disk_cache and runtime_can_run(target)
    func = primfunc(workload)
    source, fingerprint_part, apply = _plan_schedule(workload, target, func, schedule, skip_tuned)
    fingerprint = _fingerprint(workload, target, source, fingerprint_part)
    path = cache_dir() / target_tag(target) / f"{workload.op}-{fingerprint}.so"
    if use_disk_cache and path.exists():
        try:
            module = tvm.runtime.load_module(str(path))
            return Kernel(workload, target, module, source, from_disk_cache=True, library_path=str(path))
        except Exception as err:  # a truncated or foreign file: rebuild and replace it
            logger.warning("tvm_dcn: ignoring unreadable cached kernel %s (%s)", path, err)
    gpu = target.kind.name != "llvm"
    if gpu and runtime_can_run(target):
        from . import cuda  # noqa: PLC0415

        cuda.configure()  # TVM compiles the device code as it builds: needs NVRTC or nvcc
    try:
        mod = apply()
        with tvm.transform.PassContext(opt_level=3):
            module = tvm.compile(mod, target=target)
    except Exception as err:
        if source != "tuned" or schedule == "tuned":
            raise
        # A stale record (e.g. from an older operator definition) must not take the op down.
        warnings.warn(f"tvm_dcn: the tuning record for {workload.short_name()} cannot be applied ({err}); "
                      "using the hand schedule", RuntimeWarning, stacklevel=4)
        return _build_or_load(workload, target, schedule, use_disk_cache, skip_tuned=True)
    library_path = None
    if use_disk_cache:
        library_path = _export_atomically(module, path)
        if library_path is not None:
            # Load the exported copy so this process and later ones run the very same code.
            module = tvm.runtime.load_module(library_path)
    kernel = Kernel(workload, target, module, source, library_path=library_path)
    if gpu and not kernel.runnable:
        from . import cuda  # noqa: PLC0415

        # No GPU runtime here: TVM kept the CUDA C. Compile it for the target's architecture,
        # which checks that it builds (and gives the binary, e.g. for a GPU host without a compiler).
        if cuda.compiler() is not None and target.attrs.get("arch"):
            kernel.cuda_binary = cuda.compile_source(kernel.source("cu"), str(target.attrs["arch"]))
    return kernel


def scheduled_module(workload: Workload, target: TargetLike = None, *,
                     schedule: Optional[str] = None) -> tuple[str, tvm.IRModule]:
    """(schedule source, scheduled IRModule) of ``workload`` for ``target``, before compilation:
    what :func:`compile` builds (with the target's scatter formulation), for inspection and tests."""
    target = as_target(target)
    workload = ops.for_target(workload, target)
    source, _, apply = _plan_schedule(workload, target, primfunc(workload), schedule)
    return source, apply()


def _plan_schedule(workload: Workload, target, func, forced: Optional[str], skip_tuned: bool = False):
    """Choose the schedule source: returns (source, fingerprint bytes, thunk -> scheduled IRModule)."""
    from . import tuning_records  # noqa: PLC0415  (imports MetaSchedule only when records exist)

    kind = target.kind.name
    if forced in (None, "tuned") and not skip_tuned:
        record = tuning_records.lookup(workload, target)
        if record is not None:
            return "tuned", record.fingerprint, record.apply
        if forced == "tuned":
            raise LookupError(f"no tuning record for {workload.short_name()} on {target_tag(target)}")
    if forced in (None, "hand"):
        from .schedules import find  # noqa: PLC0415

        hand = find(workload.op, kind)
        if hand is not None:
            def apply_hand():
                sch = tvm.s_tir.Schedule(tvm.IRModule({ENTRY: func}))
                hand(sch, workload, target)
                return sch.mod

            # The sources of all schedules are in the fingerprint (_fingerprint); this names the function.
            return "hand", f"hand-{hand.__module__}.{hand.__qualname__}".encode(), apply_hand
        if forced == "hand":
            raise LookupError(f"no hand schedule for {workload.op} on target kind {kind!r}")
    return "default", default_schedule_fingerprint(kind), lambda: default_schedule(func, target)


def default_schedule_fingerprint(kind: str) -> bytes:
    return f"default-{kind}-v1".encode()


def default_schedule(func, target) -> tvm.IRModule:
    """No schedule on the CPU (plain loop nests); GPU targets need thread bindings: dlight's."""
    mod = tvm.IRModule({ENTRY: func})
    if target.kind.name == "llvm":
        return mod
    from tvm.s_tir import dlight  # noqa: PLC0415

    with target:
        return dlight.ApplyDefaultSchedule(dlight.gpu.Fallback())(mod)


def _fingerprint(workload: Workload, target, source: str, schedule_bytes: bytes) -> str:
    digest = hashlib.sha256()
    for part in (tvm.__version__, __version__, workload.key(),
                 json.dumps(target.export(), sort_keys=True, default=str), source):
        digest.update(part.encode())
        digest.update(b"\0")
    # Operator modules import helpers from each other (and schedules from cpu_common): hash them all.
    for folder in (Path(ops.__file__).parent, _schedules_folder()):
        for source in sorted(folder.glob("*.py")):
            digest.update(source.name.encode())
            digest.update(source.read_bytes())
    digest.update(schedule_bytes)
    return digest.hexdigest()[:24]


def _schedules_folder() -> Path:
    from . import schedules  # noqa: PLC0415

    return Path(schedules.__file__).parent


def _export_atomically(module, path: Path) -> Optional[str]:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.stem + ".", suffix=".tmp.so", dir=path.parent)
        os.close(fd)
        try:
            module.export_library(tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return str(path)
    except OSError as err:  # read-only home, full disk: run from memory instead
        logger.warning("tvm_dcn: cannot write kernel cache %s (%s); continuing without it", path, err)
        return None


