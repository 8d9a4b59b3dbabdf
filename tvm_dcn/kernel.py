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
from tvm import te

from . import __version__, ops, workloads
from .target import TargetLike, as_target, target_tag
from .workload import Workload

logger = logging.getLogger(__name__)

SCHEDULE_SOURCES = ("tuned", "hand", "default")
_ENTRY = "main"


class Kernel:
    """A compiled kernel for one workload and target.

    Call it with the kernel arguments (torch tensors or TVM tensors, in the operator's argument
    order, outputs last); it writes the outputs in place. ``schedule_source`` is ``"tuned"``,
    ``"hand"`` or ``"default"``.
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
        self._func = module[_ENTRY]

    def __call__(self, *args) -> None:
        self._func(*args)

    def source(self, fmt: str = "ll") -> str:
        """Generated code (``"ll"``: LLVM IR, ``"asm"``; ``"cu"`` for CUDA) of a freshly built kernel."""
        module = getattr(self.module, "mod", self.module)  # tvm.compile returns an Executable
        if fmt == "cu":
            module = next(m for m in module.imports if m.kind == "cuda")
        return module.inspect_source(fmt)

    def __repr__(self) -> str:
        return (f"Kernel({self.workload.short_name()}, target={self.target_tag}, "
                f"schedule={self.schedule_source})")


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


def clear_memory_cache() -> None:
    """Forget kernels compiled or loaded by this process (the disk cache is kept)."""
    with _memory_lock:
        _memory_cache.clear()


def compile(workload: Workload, target: TargetLike = None, *, schedule: Optional[str] = None,
            use_disk_cache: bool = True) -> Kernel:  # noqa: A001  (mirrors tvm.compile)
    """Build (or fetch from the caches) the kernel of ``workload`` for ``target``.

    ``target``: None for the host CPU, or a TVM target / its JSON dict. ``schedule``: force one
    source (``"tuned"``, ``"hand"``, ``"default"``) instead of the best available; forcing a source
    that does not exist for this workload raises ``LookupError``.
    """
    if not isinstance(workload, Workload):
        raise TypeError(f"workload must be a tvm_dcn.Workload, got {type(workload).__name__}")
    if schedule is not None and schedule not in SCHEDULE_SOURCES:
        raise ValueError(f"schedule must be one of {SCHEDULE_SOURCES} or None, got {schedule!r}")
    workloads.note(workload)
    schedule = schedule or _preferred_schedule.source
    target = as_target(target)
    key = (workload, json.dumps(target.export(), sort_keys=True, default=str), schedule)
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


def _build_or_load(workload: Workload, target, schedule: Optional[str], use_disk_cache: bool,
                   skip_tuned: bool = False) -> Kernel:
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
    return Kernel(workload, target, module, source, library_path=library_path)


def primfunc(workload: Workload) -> tvm.tirx.PrimFunc:
    """The unscheduled PrimFunc of ``workload`` (what schedules and MetaSchedule start from)."""
    definition = ops.build(workload)
    return te.create_prim_func(definition.args).with_attr("global_symbol", _ENTRY)


def ir_module(workload: Workload) -> tvm.IRModule:
    return tvm.IRModule({_ENTRY: primfunc(workload)})


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
        from .schedules import find, source_file  # noqa: PLC0415

        hand = find(workload.op, kind)
        if hand is not None:
            def apply_hand():
                sch = tvm.s_tir.Schedule(tvm.IRModule({_ENTRY: func}))
                hand(sch, workload, target)
                return sch.mod

            return "hand", Path(source_file(workload.op, kind)).read_bytes(), apply_hand
        if forced == "hand":
            raise LookupError(f"no hand schedule for {workload.op} on target kind {kind!r}")
    return "default", default_schedule_fingerprint(kind), lambda: default_schedule(func, target)


def default_schedule_fingerprint(kind: str) -> bytes:
    return f"default-{kind}-v1".encode()


def default_schedule(func, target) -> tvm.IRModule:
    """No schedule on the CPU (plain loop nests); GPU targets need thread bindings: dlight's."""
    mod = tvm.IRModule({_ENTRY: func})
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


