"""Compilation targets and the stable tags that name their tuning records and kernel caches.

The host CPU target is an LLVM target for the CPU this process runs on (``mcpu`` from LLVM's host
detection, ``num-cores`` from the CPUs this process may use). Its *tag* names the machine class
that tuning records are valid for: ``llvm-<arch>-<isa>-<N>c``, where ``isa`` is the widest SIMD
extension that matters for code generation (``avx512``, ``avx2``, ``avx``, ``sse4``, ``neon``,
``sve``, or ``generic``) and ``N`` the core count. Two machines with the same tag use the same
vector width and thread count, so records tuned on one are valid (if not optimal) on the other;
a different tag never picks them up. CUDA targets are tagged ``cuda-<arch>`` (e.g. ``cuda-sm_90``).
"""
from __future__ import annotations

import functools
import os
import platform
from typing import Any, Union

import tvm

TargetLike = Union[None, str, dict, "tvm.target.Target"]

_X86_ISA_ORDER = (("avx512", ("avx512f", "avx512bw", "avx512vl")), ("avx2", ("avx2", "fma")),
                  ("avx", ("avx",)), ("sse4", ("sse4.2",)))


def available_cores() -> int:
    """CPUs this process may run on (respects affinity masks and cgroup-pinned CPU sets)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@functools.lru_cache(maxsize=None)
def _host_cpu_features() -> frozenset[str]:
    features = tvm.get_global_func("tvm.codegen.llvm.GetHostCPUFeatures")()
    return frozenset(str(name) for name, enabled in features.items() if bool(enabled))


def host_isa() -> str:
    """The widest SIMD extension of the host CPU, as used in target tags."""
    arch = platform.machine().lower()
    features = _host_cpu_features()
    if arch in ("x86_64", "amd64"):
        for isa, required in _X86_ISA_ORDER:
            if all(f in features for f in required):
                return isa
        return "generic"
    if arch in ("aarch64", "arm64"):
        return "sve" if "sve" in features else "neon"
    return "generic"


@functools.lru_cache(maxsize=None)
def host_target() -> tvm.target.Target:
    """LLVM target for this machine's CPU."""
    mcpu = str(tvm.get_global_func("target.llvm_get_system_cpu")())
    config: dict[str, Any] = {"kind": "llvm", "num-cores": available_cores()}
    if mcpu and mcpu != "generic":
        config["mcpu"] = mcpu
    return tvm.target.Target(config)


def as_target(target: TargetLike) -> tvm.target.Target:
    """Normalise ``target``: None means the host CPU; a dict or JSON string is a TVM target config."""
    if target is None:
        return host_target()
    if isinstance(target, tvm.target.Target):
        return target
    if isinstance(target, str) and target.strip() == "llvm":
        return host_target()
    if isinstance(target, (dict, str)):
        try:
            return tvm.target.Target(target)
        except Exception as err:  # TVM raises its own error types for bad configs
            raise ValueError(f"target: cannot make a TVM target from {target!r}: {err}") from None
    raise TypeError(f"target must be None, a dict, a JSON string or a tvm.target.Target, got {type(target).__name__}")


def target_tag(target: TargetLike) -> str:
    """The stable machine-class tag of ``target`` (see the module docstring)."""
    target = as_target(target)
    kind = target.kind.name
    if kind == "llvm":
        cores = int(target.attrs.get("num-cores", 0) or available_cores())
        host = host_target()
        same_cpu = str(target.attrs.get("mcpu", "")) == str(host.attrs.get("mcpu", ""))
        isa = host_isa() if same_cpu else _isa_of_mcpu(str(target.attrs.get("mcpu", "")))
        arch = str(target.attrs.get("mtriple", "")).split("-")[0] or platform.machine().lower()
        return f"llvm-{arch}-{isa}-{cores}c"
    if kind == "cuda":
        arch = str(target.attrs.get("arch", "") or "sm_unknown")
        return f"cuda-{arch}"
    return kind


def _isa_of_mcpu(mcpu: str) -> str:
    """ISA class of an explicitly named CPU (used when the target is not this host)."""
    if not mcpu:
        return "generic"
    try:
        has = tvm.get_global_func("target.llvm_cpu_has_feature")
        target = tvm.target.Target({"kind": "llvm", "mcpu": mcpu})
        for isa, required in _X86_ISA_ORDER:
            if all(bool(has(f, target)) for f in required):
                return isa
    except Exception:  # non-x86 mcpu names or an LLVM without that query
        pass
    return mcpu
