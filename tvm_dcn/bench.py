"""Side-by-side CPU timing of deformable convolution: tvm-dcn kernels (per schedule source)
against ``torchvision.ops.deform_conv2d`` and dense ``torch.nn.functional.conv2d`` (oneDNN), the
floor a deformable convolution cannot beat. All candidates of a case run interleaved in one
process, so machine noise hits them alike; the median of the repeats is reported.
"""
from __future__ import annotations

import json
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from . import kernel as _kernel
from .functional import kernel_arg
from .ops.deform_conv import forward_workload, output_size
from .target import host_target, target_tag


@dataclass
class ConvCase:
    """One deformable conv layer to time: 3x3 by default, square input, same in/out channels."""

    channels: int
    size: int
    batch: int = 1
    kernel: int = 3
    stride: int = 1
    padding: int = 1
    with_mask: bool = True
    dtype: str = "float32"

    @property
    def name(self) -> str:
        kind = "v2" if self.with_mask else "v1"
        return (f"dcn{kind} b{self.batch} {self.channels}x{self.size}x{self.size} "
                f"k{self.kernel} s{self.stride}")


# The reference layers: ResNet-50 stage c3-c5 widths at batch 1.
DEFAULT_CASES = [ConvCase(128, 28), ConvCase(256, 14), ConvCase(512, 7)]


@dataclass
class CaseResult:
    case: str
    times_ms: dict = field(default_factory=dict)   # candidate -> median ms
    max_abs_err: dict = field(default_factory=dict)  # candidate -> vs torchvision


def _inputs(case: ConvCase):
    g = torch.Generator().manual_seed(0)
    dtype = getattr(torch, case.dtype)
    out = output_size(case.size, case.kernel, case.stride, case.padding, 1)
    taps = case.kernel * case.kernel
    x = torch.randn(case.batch, case.channels, case.size, case.size, generator=g, dtype=dtype)
    w = torch.randn(case.channels, case.channels, case.kernel, case.kernel, generator=g, dtype=dtype) * 0.05
    off = torch.randn(case.batch, 2 * taps, out, out, generator=g, dtype=dtype) * 2
    mask = torch.rand(case.batch, taps, out, out, generator=g, dtype=dtype) if case.with_mask else None
    bias = torch.randn(case.channels, generator=g, dtype=dtype)
    return x, off, w, bias, mask, out


def _time(fn: Callable[[], object], repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def run_case(case: ConvCase, schedules=("default", "hand", "tuned"), repeats: int = 20,
             warmup: int = 3, log: Callable[[str], None] = print) -> CaseResult:
    import torchvision  # noqa: PLC0415

    x, off, w, bias, mask, out = _inputs(case)
    workload = forward_workload(
        batch=case.batch, in_channels=case.channels, height=case.size, width=case.size,
        out_channels=case.channels, kernel_size=(case.kernel, case.kernel), stride=(case.stride,) * 2,
        padding=(case.padding,) * 2, groups=1, offset_groups=1, with_mask=mask is not None,
        with_bias=True, dtype=case.dtype)
    args = [kernel_arg(x).view(case.batch, case.channels, -1), kernel_arg(off).view(case.batch, off.shape[1], -1)]
    if mask is not None:
        args.append(kernel_arg(mask).view(case.batch, mask.shape[1], -1))
    args += [kernel_arg(w).view(case.channels, -1), bias]
    result_buffer = torch.empty(case.batch, case.channels, out * out, dtype=x.dtype)

    reference = torchvision.ops.deform_conv2d(x, off, w, bias, stride=case.stride, padding=case.padding, mask=mask)
    candidates: dict[str, Callable[[], object]] = {
        "torchvision": lambda: torchvision.ops.deform_conv2d(x, off, w, bias, stride=case.stride,
                                                             padding=case.padding, mask=mask),
        "dense conv2d": lambda: torch.nn.functional.conv2d(x, w, bias, stride=case.stride, padding=case.padding),
    }
    result = CaseResult(case.name)
    for source in schedules:
        try:
            kern = _kernel.compile(workload, schedule=source)
        except LookupError:
            continue
        kern(*args, result_buffer)
        err = (result_buffer.view_as(reference) - reference).abs().max().item()
        result.max_abs_err[f"tvm-dcn {source}"] = err
        candidates[f"tvm-dcn {source}"] = (lambda k=kern: k(*args, result_buffer))
    # The untuned default is orders of magnitude slower: time it with fewer repeats.
    slow = {name for name in candidates if name.endswith("default")}
    for name, fn in candidates.items():
        for _ in range(1 if name in slow else warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    with torch.no_grad():
        for i in range(repeats):
            for name, fn in candidates.items():  # interleaved: noise hits every candidate alike
                if name in slow and i >= max(3, repeats // 5):
                    continue
                samples[name] += _time(fn, 1)
    result.times_ms = {name: statistics.median(ts) for name, ts in samples.items()}
    log(format_case(result))
    return result


def format_case(result: CaseResult) -> str:
    tv = result.times_ms.get("torchvision")
    parts = []
    for name, ms in result.times_ms.items():
        speedup = f" ({tv / ms:.2f}x tv)" if tv and not name.startswith("torchvision") else ""
        parts.append(f"{name}: {ms:.3f} ms{speedup}")
    return f"{result.case}: " + "; ".join(parts)


def environment() -> dict:
    return {
        "target": str(host_target()), "target_tag": target_tag(None), "machine": platform.machine(),
        "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def write_results(results: list[CaseResult], path: Optional[str]) -> None:
    if not path:
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps({"environment": environment(), "results": [asdict(r) for r in results]},
                                     indent=2) + "\n")
