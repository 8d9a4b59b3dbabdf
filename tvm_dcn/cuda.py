"""CUDA build support: which compiler builds the kernels, binaries for machines without a GPU,
register and shared-memory usage, and precompiled kernels for GPU hosts without a compiler.

TVM generates CUDA C and compiles it with NVRTC (``cuda-bindings``) or ``nvcc``
(``TVM_CUDA_COMPILE_MODE``). Where TVM's CUDA runtime is loaded (a machine with the driver),
that happens when a kernel is built, and the binary lives in the kernel's module. Elsewhere TVM
keeps the CUDA C only; :func:`compile_source` compiles it here for a given ``sm_XX`` (``nvcc``:
a fatbin with the SASS for that architecture and its PTX, which newer GPUs' drivers compile
themselves; NVRTC: a cubin).

Math: TVM compiles with ``--use_fast_math`` by default, whose approximate division changes the
integer bin boundaries of RoI pooling (``floor(ph * size / pooled)`` one ulp below an integer).
:func:`configure` makes TVM's compiles IEEE-exact (``--prec-div``, ``--prec-sqrt``, no
flush-to-zero) unless the user set ``TVM_CUDA_NVRTC_EXTRA_OPTS`` / ``TVM_CUDA_NVCC_NO_FAST_MATH``.

Precompiled kernels: a module exported where TVM has no CUDA runtime carries its CUDA C, which
TVM compiles when the module is loaded. :func:`use_precompiled` makes this process answer such
compiles with binaries built elsewhere (files ``<sha256 of the CUDA C>.fatbin`` or ``.cubin`` in
a folder, written by :func:`save_binary`), so a GPU host needs no compiler
(``tvm_dcn.remote_tune``).
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

BINARY_SUFFIXES = (".fatbin", ".cubin")
_COMPILE_CALLBACK = "tvm_callback_cuda_compile"


class CudaBuildError(RuntimeError):
    """A CUDA kernel cannot be built here (no compiler, or the compiler failed)."""


def nvcc_path() -> Optional[str]:
    """``nvcc`` on PATH, else under ``$CUDA_HOME`` / ``/usr/local/cuda``, or None."""
    found = shutil.which("nvcc")
    if found:
        return found
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root and os.access(os.path.join(root, "bin", "nvcc"), os.X_OK):
            return os.path.join(root, "bin", "nvcc")
    return None


def nvrtc_available() -> bool:
    """Whether NVRTC can be called through ``cuda-bindings`` (what TVM's default mode needs)."""
    try:
        from cuda.bindings import nvrtc  # noqa: PLC0415

        result, _, _ = nvrtc.nvrtcVersion()
        return int(result) == 0
    except Exception:  # noqa: BLE001  (not installed, or the NVRTC library is missing)
        return False


def compiler() -> Optional[str]:
    """The compiler CUDA kernels are built with here: ``$TVM_CUDA_COMPILE_MODE`` if that one is
    available, else ``"nvrtc"`` if available, else ``"nvcc"``, else None."""
    available = {"nvrtc": nvrtc_available, "nvcc": lambda: nvcc_path() is not None}
    requested = os.environ.get("TVM_CUDA_COMPILE_MODE", "").lower()
    if requested in available and available[requested]():
        return requested
    for name, check in available.items():
        if check():
            return name
    return None


def configure() -> str:
    """Set up TVM's CUDA compile callback for tvm-dcn's builds (compiler, exact math; see the
    module docstring); returns the compiler, or raises :class:`CudaBuildError` if there is none."""
    chosen = compiler()
    if chosen is None:
        raise CudaBuildError("tvm_dcn: cannot build CUDA kernels here: neither NVRTC (pip install cuda-bindings "
                             "and an NVRTC library, e.g. nvidia-cuda-nvrtc) nor nvcc (CUDA toolkit) is available")
    os.environ["TVM_CUDA_COMPILE_MODE"] = chosen
    os.environ.setdefault("TVM_CUDA_NVRTC_EXTRA_OPTS", "--ftz=false --prec-div=true --prec-sqrt=true")
    os.environ.setdefault("TVM_CUDA_NVCC_NO_FAST_MATH", "1")
    return chosen


def arch_number(arch: str) -> str:
    """``"sm_90"`` / ``"sm_90a"`` -> ``"90"`` / ``"90a"``; ValueError for anything else."""
    match = re.fullmatch(r"sm_(\d{2,3}[a-z]?)", str(arch))
    if not match:
        raise ValueError(f"arch must look like 'sm_90' (or 'sm_90a'), got {arch!r}")
    return match.group(1)


def _nvcc(source: str, arch: str, output_kind: str, extra=()) -> tuple[bytes, str]:
    """Run nvcc on ``source``; (output bytes, compiler messages)."""
    nvcc = nvcc_path()
    if nvcc is None:
        raise CudaBuildError("tvm_dcn: nvcc not found (PATH, $CUDA_HOME/bin, /usr/local/cuda/bin)")
    number = arch_number(arch)
    with tempfile.TemporaryDirectory(prefix="tvm-dcn-nvcc-") as tmp:
        src = os.path.join(tmp, "kernels.cu")
        out = os.path.join(tmp, f"kernels.{output_kind}")
        Path(src).write_text(source)
        if output_kind == "fatbin":
            gencode = ["-gencode", f"arch=compute_{number},code=[sm_{number},compute_{number}]"]
        else:
            gencode = [f"-arch=sm_{number}"]
        cmd = [nvcc, f"--{output_kind}", "-O3", *gencode, *extra, "-o", out, src]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            messages = proc.stdout + proc.stderr
            # Errors first: nvcc's warnings about TVM's unused helpers can fill any tail.
            errors = "\n".join(line for line in messages.splitlines() if ": error" in line or "error:" in line)
            raise CudaBuildError(f"tvm_dcn: nvcc failed for {arch} (exit {proc.returncode}):\n"
                                 f"{errors[:4000]}\n--- last output:\n{messages[-2000:]}")
        return Path(out).read_bytes(), proc.stdout + proc.stderr


def compile_source(source: str, arch: str) -> tuple[bytes, str]:
    """Compile generated CUDA C for ``arch``: (binary, format): nvcc's ``"fatbin"`` if nvcc is
    here, else NVRTC's ``"cubin"``. Exact math (no ``--use_fast_math``)."""
    arch_number(arch)
    if nvcc_path() is not None:
        return _nvcc(source, arch, "fatbin")[0], "fatbin"
    if nvrtc_available():
        from tvm.support import nvcc as tvm_nvcc  # noqa: PLC0415

        configure()
        try:
            return bytes(tvm_nvcc.compile_cuda(source, target_format="cubin", arch=arch, compiler="nvrtc")), "cubin"
        except Exception as err:  # noqa: BLE001
            raise CudaBuildError(f"tvm_dcn: NVRTC failed for {arch}: {err}") from None
    raise CudaBuildError("tvm_dcn: cannot compile CUDA here: neither nvcc nor NVRTC is available")


@dataclass(frozen=True)
class KernelResources:
    """ptxas's report for one CUDA kernel (per thread: registers, stack, spills; per block:
    static shared memory)."""

    registers: int
    shared_bytes: int
    stack_bytes: int
    spill_store_bytes: int
    spill_load_bytes: int


_FUNCTION = re.compile(r"Compiling entry function '([^']+)'")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?")


def resource_usage(source: str, arch: str) -> dict[str, KernelResources]:
    """Registers, shared memory and spills of each kernel of ``source`` compiled for ``arch``
    (``nvcc --resource-usage``, exact math); needs nvcc."""
    _, report = _nvcc(source, arch, "cubin", extra=["--resource-usage"])
    usage: dict[str, KernelResources] = {}
    name, frame = None, (0, 0, 0)
    for line in report.splitlines():
        if (match := _FUNCTION.search(line)):
            name, frame = match.group(1), (0, 0, 0)
        elif (match := _FRAME.search(line)) and name:
            frame = tuple(int(g) for g in match.groups())
        elif (match := _USED.search(line)) and name:
            usage[name] = KernelResources(registers=int(match.group(1)), shared_bytes=int(match.group(2) or 0),
                                          stack_bytes=frame[0], spill_store_bytes=frame[1],
                                          spill_load_bytes=frame[2])
            name = None
    if not usage:
        raise CudaBuildError(f"tvm_dcn: no kernel found in nvcc's resource report:\n{report[-2000:]}")
    return usage


# --------------------------------------------------------------------------------------------
# Precompiled binaries


def source_key(source: str) -> str:
    return hashlib.sha256(source.encode()).hexdigest()


def save_binary(folder: os.PathLike, source: str, binary: bytes, fmt: str) -> Path:
    """Write ``binary`` (``fmt``: ``"fatbin"`` or ``"cubin"``) as the precompiled form of ``source``."""
    if f".{fmt}" not in BINARY_SUFFIXES:
        raise ValueError(f"fmt must be 'fatbin' or 'cubin', got {fmt!r}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{source_key(source)}.{fmt}"
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(binary)
    os.replace(tmp, path)
    return path


_precompiled_folders: list[Path] = []
_hook_lock = threading.Lock()
_previous_callback = None
_allow_compile = True


def find_binary(source: str) -> Optional[bytes]:
    """The precompiled binary of ``source`` in the folders given to :func:`use_precompiled`."""
    key = source_key(source)
    for folder in _precompiled_folders:
        for suffix in BINARY_SUFFIXES:
            path = folder / f"{key}{suffix}"
            if path.exists():
                return path.read_bytes()
    return None


def use_precompiled(folder: os.PathLike, *, allow_compile: bool = True) -> None:
    """From now on, CUDA C that TVM compiles in this process (e.g. when it loads a module exported
    without a CUDA runtime) is answered from ``folder``'s binaries (:func:`save_binary`); CUDA C
    without one is compiled as usual if ``allow_compile``, else raises :class:`CudaBuildError`."""
    import tvm_ffi  # noqa: PLC0415

    global _previous_callback, _allow_compile
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"precompiled CUDA binaries: no folder {folder}")
    with _hook_lock:
        if folder not in _precompiled_folders:
            _precompiled_folders.append(folder)
        _allow_compile = allow_compile
        if _previous_callback is None:
            _previous_callback = tvm_ffi.get_global_func(_COMPILE_CALLBACK, allow_missing=True) or False

            def compile_callback(code):
                binary = find_binary(str(code))
                if binary is not None:
                    return bytearray(binary)
                if not _allow_compile or not _previous_callback:
                    raise CudaBuildError("tvm_dcn: no precompiled binary for a CUDA module (sha256 "
                                         f"{source_key(str(code))[:16]}...) in {[str(f) for f in _precompiled_folders]}, "
                                         "and compiling here is not allowed")
                configure()
                return _previous_callback(code)

            tvm_ffi.register_global_func(_COMPILE_CALLBACK, compile_callback, override=True)
