"""Compilation targets and the stable tags that name their tuning records and kernel caches.

The host CPU target is an LLVM target for the CPU this process runs on (``mcpu`` from LLVM's host
detection, ``num-cores`` from the CPUs this process may use). Its *tag* names the machine class
that tuning records are valid for: ``llvm-<arch>-<isa>-<N>c``, where ``isa`` is the widest SIMD
extension that matters for code generation (``avx512``, ``avx2``, ``avx``, ``sse4``, ``neon``,
``sve``, or ``generic``) and ``N`` the core count. Two machines with the same tag use the same
vector width and thread count, so records tuned on one are valid (if not optimal) on the other;
a different tag never picks them up.

CUDA targets are tagged ``cuda-<arch>`` (e.g. ``cuda-sm_90``), plus ``-<model>`` when the target
names a known device model (e.g. ``cuda-sm_90-h100``): records for one GPU model are not the
best for another of the same architecture (SM count, memory bandwidth and cache sizes differ),
but a record is only *valid* for its architecture. The model comes from, in this order:

- the target's ``model`` attribute (``{"kind": "cuda", "arch": "sm_90", "model": "h100"}``);
- a TVM target tag given by name (``as_target("nvidia/nvidia-h100")`` records its model);
- a target whose configuration equals exactly one TVM tag's (``Target("nvidia/nvidia-h100")``);
- for a torch device (:func:`cuda_target`), the TVM tag whose model its name contains
  (``"NVIDIA H100 80GB HBM3"`` -> ``h100``).

Model names are TVM's tag names without the ``nvidia/`` and ``nvidia-`` prefixes (``h100``,
``a100``, ``geforce-rtx-4090``), lower case.
"""
from __future__ import annotations

import functools
import json
import os
import platform
import re
from typing import Any, Optional, Union

import tvm

from .cpu_isa import X86_ISA_ORDER, CpuVectorUnit, vector_unit

TargetLike = Union[None, str, dict, "tvm.target.Target"]



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
        for isa, required in X86_ISA_ORDER:
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
    if isinstance(target, str) and target.strip() in _cuda_tag_models():
        name = target.strip()
        return tvm.target.Target({**_config(tvm.target.Target(name)), "model": _cuda_tag_models()[name]})
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
        model = cuda_model(target)
        return f"cuda-{arch}-{model}" if model else f"cuda-{arch}"
    return kind


def target_config(target) -> dict:
    """``target`` as a plain JSON-able dict (TVM exports maps and arrays of its own types)."""
    def plain(value):
        if hasattr(value, "items"):
            return {str(k): plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)) or type(value).__name__ in ("Array", "List"):
            return [plain(v) for v in value]
        if isinstance(value, (bool, int, float)) or value is None:
            return value
        if hasattr(value, "value"):  # IntImm, FloatImm
            return value.value
        return str(value)

    return plain(as_target(target).export())


def _config(target: tvm.target.Target) -> dict:
    """``target_config`` without the tag the target was made from (to compare configurations)."""
    return {key: value for key, value in target_config(target).items() if key != "tag"}


def model_slug(name: str) -> str:
    """A device or model name as used in tags: lower case, runs of other characters as ``-``."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


@functools.lru_cache(maxsize=None)
def _cuda_tag_models() -> dict[str, str]:
    """TVM's CUDA target tags -> model name (``"nvidia/nvidia-h100"`` -> ``"h100"``)."""
    models = {}
    for name in tvm.target.list_tags():
        name = str(name)
        if not name.startswith("nvidia/"):
            continue
        slug = model_slug(name.split("/", 1)[1])
        models[name] = slug[len("nvidia-"):] if slug.startswith("nvidia-") else slug
    return models


@functools.lru_cache(maxsize=None)
def _model_of_config(config_json: str) -> Optional[str]:
    matches = [model for name, model in _cuda_tag_models().items()
               if json.dumps(_config(tvm.target.Target(name)), sort_keys=True, default=str) == config_json]
    return matches[0] if len(matches) == 1 else None


def cuda_model(target: TargetLike) -> Optional[str]:
    """The device model a CUDA target names (see the module docstring), or None."""
    target = as_target(target)
    model = target.attrs.get("model")
    if model:
        return model_slug(str(model))
    return _model_of_config(json.dumps(_config(target), sort_keys=True, default=str))


def model_of_device_name(name: str) -> Optional[str]:
    """The TVM tag model contained in a device name (``"NVIDIA A100-SXM4-80GB"`` -> ``"a100"``): the
    longest model whose words appear consecutively in the name, or None."""
    words = model_slug(name).split("-")
    found = None
    for model in set(_cuda_tag_models().values()):
        parts = model.split("-")
        if any(words[i:i + len(parts)] == parts for i in range(len(words) - len(parts) + 1)):
            if found is None or len(model) > len(found):
                found = model
    return found


def cuda_target(device_index: int = 0) -> tvm.target.Target:
    """CUDA target of torch's CUDA device ``device_index``: its architecture (``sm_<major><minor>``),
    limits and, where TVM knows the model, ``model`` (so its tag names it)."""
    import torch  # noqa: PLC0415

    props = torch.cuda.get_device_properties(device_index)
    config: dict[str, Any] = {
        "kind": "cuda", "arch": f"sm_{props.major}{props.minor}",
        "max_threads_per_block": int(getattr(props, "max_threads_per_block", 1024)),
        "max_shared_memory_per_block": int(getattr(props, "shared_memory_per_block", 48 * 1024)),
        "thread_warp_size": int(getattr(props, "warp_size", 32)),
    }
    model = model_of_device_name(props.name)
    if model:
        config["model"] = model
    return tvm.target.Target(config)


def cpu_vector_unit(target: TargetLike) -> CpuVectorUnit:
    """The SIMD unit of an LLVM ``target`` (None, a JSON dict or a Target): see
    :func:`tvm_dcn.cpu_isa.vector_unit`."""
    return vector_unit(as_target(target))


def _isa_of_mcpu(mcpu: str) -> str:
    """ISA class of an explicitly named CPU (used when the target is not this host)."""
    if not mcpu:
        return "generic"
    try:
        has = tvm.get_global_func("target.llvm_cpu_has_feature")
        target = tvm.target.Target({"kind": "llvm", "mcpu": mcpu})
        for isa, required in X86_ISA_ORDER:
            if all(bool(has(f, target)) for f in required):
                return isa
    except Exception:  # non-x86 mcpu names or an LLVM without that query
        pass
    return mcpu
