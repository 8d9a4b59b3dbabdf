"""PyTorch entry points: torchvision-compatible functions that run tvm-dcn kernels.

Tensors reach the compiled kernels zero-copy through DLPack; outputs are allocated by PyTorch.
CPU tensors run CPU kernels; CUDA tensors run kernels built for their GPU (``target.cuda_target``:
its architecture and model, so its tuning records), on that device and on torch's current
stream of it (``Kernel.__call__``), so they order with the surrounding torch work and can be
captured in CUDA graphs (call once before capturing: the first call loads the kernels).
The kernels are registered as ``torch.library`` operators (``torch.ops.tvm_dcn.*``, with fake
implementations for ``torch.compile``), and ``torch.library.register_autograd`` wires the
forward and backward operators into autograd (so ``torch.ops.tvm_dcn.deform_conv2d_forward`` is
differentiable on its own). Backward kernels compute only the gradients autograd asks for.
The RoI family (``roi.py``) defines its operators in the same library, the same way. Scripted
with ``torch.jit.script``, :func:`deform_conv2d` calls the operator directly (which validates its
arguments with :func:`check_deform_conv2d_args`, as the function does). Bad arguments raise
:class:`ArgumentValueError` / :class:`ArgumentTypeError`: a ``ValueError`` / ``TypeError`` naming
the argument that is also the ``RuntimeError`` torchvision raises for the same mistake.

The operators are defined with ``torch.library.Library`` and implemented for the CPU and CUDA
dispatch keys rather than with the ``torch.library.custom_op`` decorator: measured here side by
side (no-op operators), a ``custom_op`` call costs 20 us of eager dispatch back to back and 100 us
right after a 2 ms kernel (its autograd and tracing wrappers run on cold caches), a ``Library``
operator 6.5 us and 41 us, a plain Python call 3 us and 15 us.

Eager calls without autograd skip even that: :func:`deform_conv2d` keeps a plan (kernel and
output shapes) per validated call signature and runs the kernel directly when a call matches one
(plain tensors, nothing to differentiate, no tracing, dispatch or function mode, no workload
recorder; anything else goes through the operator). Right after other work every new torch call
runs on cold caches here, so each one counts: measured side by side, each call right after the
layer's offset convolution, the direct call took 0.23-0.30 ms less than validation plus the
operator (ResNet-50 DCN layers, two runs).

Half precision: on the CPU the forward has bfloat16 and float16 kernels and the gradients
bfloat16 ones (half tensors in and out, sampling and accumulation in float32, each result rounded
once; on CPUs with AVX512-BF16 their GEMMs use ``vdpbf16ps``, the forward's and the weight
gradient's columns rounded to bfloat16). float16 gradients, and CUDA, run the float32 kernels:
the operators convert half tensors to float32 once and return results and gradients in the half
dtype (``kernel_dtype``). ``torch.autocast``: the forward
operators have AutocastCPU and AutocastCUDA kernels (:func:`implements_autocast`), deform_conv2d
with ``conv2d``'s rule (floating-point arguments cast to the autocast dtype), the RoI family with
torchvision's (float32 compute, results in the input's dtype); the functions apply the same rules
before their validation, which requires one dtype.
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import torch
from torch.jit.annotations import BroadcastingList2

from . import kernel as _kernel
from . import recording as _recording
from ._torch_utils import (HALF_DTYPES, SUPPORTED_DTYPES, ArgumentTypeError, ArgumentValueError,  # noqa: F401
                           BoxFormatError, BoxTypeError, autocast_cast, autocast_dtype, check_tensor,
                           int_pair_argument, kernel_dtype)
from ._utils import IntPair
from .ops.deform_conv import (backward_data_workload, backward_weight_workload, forward_workload, output_size,
                               padded_pixels)

_INT32_MAX = 2**31 - 1


@functools.lru_cache(maxsize=None)
def _cuda_target(index: int):
    from .target import cuda_target  # noqa: PLC0415

    return cuda_target(index)


def device_target(device: torch.device, name: str = "input"):
    """The TVM target of tensors on ``device``: None (this CPU) for CPU tensors, the target of that
    GPU for CUDA tensors; ValueError naming ``name`` for other devices."""
    if device.type == "cpu":
        return None
    if device.type == "cuda":
        return _cuda_target(device.index if device.index is not None else torch.cuda.current_device())
    raise ArgumentValueError(f"{name} is on {device}; tvm_dcn runs on CPU and CUDA devices")


def kernel_arg(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a dense, 64-byte-aligned tensor that TVM can take over DLPack without copying.

    TVM requires aligned data pointers (a misaligned one, e.g. a slice, crashes the kernel), so
    views that are not contiguous or not aligned are copied once.
    """
    if not t.is_contiguous():
        t = t.contiguous()
    if t.data_ptr() % 64:
        t = t.clone()
    return t


# Eager calls without autograd run the kernel directly, and calls like one validated before skip
# the validation: the plans of validated calls, keyed by everything the validation looked at
# (module docstring: 0.23-0.30 ms a call saved on the ResNet-50 DCN layers).
_eager_plans: dict[tuple, "_ForwardPlan"] = {}
_MAX_EAGER_PLANS = 1024
_kernel.on_clear_memory_cache(_eager_plans.clear)
_Tensor = torch.Tensor


def _eager_key(input, offset, weight, bias, mask, stride, padding, dilation) -> Optional[tuple]:
    """The plan key of a call that may bypass the operator: plain tensors, nothing to differentiate,
    no tracing, no dispatch or function mode that must see the operator, no workload recorder;
    None otherwise (the call goes through ``torch.ops.tvm_dcn``)."""
    if (input is None or offset is None or weight is None or not is_plain_eager_call(input, offset, weight, bias, mask)
            or _recording.is_recording()):
        return None
    conv = (_int_or_pair(stride), _int_or_pair(padding), _int_or_pair(dilation))
    if None in conv:
        return None
    return (input.shape, offset.shape, weight.shape, input.dtype, offset.dtype, weight.dtype, input.device,
            offset.device, weight.device, None if bias is None else (bias.shape, bias.dtype, bias.device),
            None if mask is None else (mask.shape, mask.dtype, mask.device), conv, _kernel._preferred_schedule.source)


def is_plain_eager_call(*tensors: Optional[torch.Tensor]) -> bool:
    """Whether a call on ``tensors`` (None for absent optional ones) may run its kernel implementation
    directly instead of through its ``torch.ops.tvm_dcn`` operator: plain tensors, nothing to
    differentiate, no tracing or compilation, no dispatch or function mode that must see the operator."""
    if torch.compiler.is_compiling():  # first: TorchDynamo cannot trace the checks below
        return False
    for t in tensors:
        if t is not None and type(t) is not _Tensor:
            return False
    if torch.is_grad_enabled():
        for t in tensors:
            if t is not None and t.requires_grad:
                return False
    return not (torch._C._len_torch_dispatch_stack() or torch._C._is_torch_function_mode_enabled())


def _int_or_pair(value):
    """``value`` if an int, as a tuple if a pair of ints, else None (then the call takes the full path)."""
    if type(value) is int:
        return value
    if type(value) in (tuple, list) and len(value) == 2 and type(value[0]) is int and type(value[1]) is int:
        return (value[0], value[1])
    return None


def check_deform_conv2d_args(input, offset, weight, bias, mask, stride, padding, dilation) -> tuple:
    """Validates a :func:`deform_conv2d` call (the function's and the operator's: TorchScript calls
    the operator directly); returns (stride, padding, dilation) as pairs."""
    check_tensor(input, "input", 4)
    check_tensor(offset, "offset", 4)
    check_tensor(weight, "weight", 4)
    if bias is not None:
        check_tensor(bias, "bias", 1)
    if mask is not None:
        check_tensor(mask, "mask", 4)
    stride_hw, padding_hw = int_pair_argument(stride, "stride"), int_pair_argument(padding, "padding")
    dilation_hw = int_pair_argument(dilation, "dilation")
    if min(stride_hw) < 1:
        raise ArgumentValueError(f"stride must be positive, got {stride}")
    if min(padding_hw) < 0:
        raise ArgumentValueError(f"padding must be non-negative, got {padding}")
    if min(dilation_hw) < 1:
        raise ArgumentValueError(f"dilation must be positive, got {dilation}")

    for name, t in (("offset", offset), ("weight", weight), ("bias", bias), ("mask", mask)):
        if t is None:
            continue
        if t.dtype != input.dtype:
            raise ArgumentTypeError(f"{name} has dtype {t.dtype} but input has {input.dtype}; all must match")
        if t.device != input.device:
            raise ArgumentValueError(f"{name} is on {t.device} but input is on {input.device}; all must be on one "
                                     "device")
    device_target(input.device, "input")

    batch, in_channels, height, width = input.shape
    out_channels, weight_in_channels, kernel_h, kernel_w = weight.shape
    if weight_in_channels == 0 or kernel_h == 0 or kernel_w == 0:
        raise ArgumentValueError(f"weight has an empty dimension: shape {tuple(weight.shape)}")
    if in_channels % weight_in_channels:
        raise ArgumentValueError(f"input has {in_channels} channels, not a multiple of weight.shape[1] = "
                                 f"{weight_in_channels} (the channels per group)")
    groups = in_channels // weight_in_channels
    if out_channels % groups:
        raise ArgumentValueError(f"weight has {out_channels} output channels, not divisible by groups = {groups}")
    taps = kernel_h * kernel_w
    if offset.shape[1] == 0 or offset.shape[1] % (2 * taps):
        raise ArgumentValueError(f"offset has {offset.shape[1]} channels; expected a positive multiple of "
                                 f"2 * kernel_h * kernel_w = {2 * taps}")
    offset_groups = offset.shape[1] // (2 * taps)
    if in_channels % offset_groups:
        raise ArgumentValueError(f"offset implies {offset_groups} offset groups, which do not divide the "
                                 f"{in_channels} input channels")
    out_h = output_size(height, kernel_h, stride_hw[0], padding_hw[0], dilation_hw[0])
    out_w = output_size(width, kernel_w, stride_hw[1], padding_hw[1], dilation_hw[1])
    if out_h < 1 or out_w < 1:
        extent = (dilation_hw[0] * (kernel_h - 1) + 1, dilation_hw[1] * (kernel_w - 1) + 1)
        raise ArgumentValueError(f"the output would be empty ({out_h}x{out_w}): input {height}x{width} with padding "
                                 f"{padding_hw} is smaller than the dilated kernel extent {extent[0]}x{extent[1]}")
    if offset.shape[0] != batch or tuple(offset.shape[2:]) != (out_h, out_w):
        raise ArgumentValueError(f"offset has shape {tuple(offset.shape)}; expected ({batch}, {offset.shape[1]}, "
                                 f"{out_h}, {out_w}) for the batch and output size")
    if bias is not None and bias.shape[0] != out_channels:
        raise ArgumentValueError(f"bias has {bias.shape[0]} elements; expected {out_channels} (weight.shape[0])")
    if mask is not None and tuple(mask.shape) != (batch, offset_groups * taps, out_h, out_w):
        raise ArgumentValueError(f"mask has shape {tuple(mask.shape)}; expected "
                                 f"({batch}, {offset_groups * taps}, {out_h}, {out_w})")
    # The columns' pixels are padded per target; 16 (AVX-512's float32 lanes) is the widest.
    largest = max(input.numel(), batch * in_channels * taps * padded_pixels(out_h * out_w, 16),
                  offset.numel(), batch * out_channels * out_h * out_w)
    if largest > _INT32_MAX:
        raise ArgumentValueError(f"input of shape {tuple(input.shape)} is too large for one kernel call "
                                 "(more than 2**31 elements in an intermediate); split the batch")
    return stride_hw, padding_hw, dilation_hw


def _deform_conv2d(input: torch.Tensor, offset: torch.Tensor, weight: torch.Tensor,
                  bias: Optional[torch.Tensor] = None, stride: IntPair = 1, padding: IntPair = 0,
                  dilation: IntPair = 1, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    dtype = autocast_dtype(input)
    if dtype is not None:
        # The operator's autocast rule (implements_autocast), applied before the validation, which
        # requires one dtype: conv_offset under autocast returns the autocast dtype, not the input's.
        input, offset, weight, bias, mask = (autocast_cast(t, dtype) for t in (input, offset, weight, bias, mask))
    key = _eager_key(input, offset, weight, bias, mask, stride, padding, dilation)
    if key is not None:
        plan = _eager_plans.get(key)
        if plan is not None:
            return _run_forward(plan, input, offset, weight, bias, mask)
    stride_hw, padding_hw, dilation_hw = check_deform_conv2d_args(input, offset, weight, bias, mask, stride, padding,
                                                                  dilation)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (input, offset, weight, bias, mask)):
        return _forward_op(input, offset, weight, bias, mask, list(stride_hw), list(padding_hw), list(dilation_hw))
    # Nothing to differentiate: skip the operator's dispatch and autograd (tens of microseconds a call).
    if key is not None and not _is_empty(input, weight):
        if len(_eager_plans) >= _MAX_EAGER_PLANS:  # many input sizes: forget the older ones
            _eager_plans.clear()
        plan = _eager_plans[key] = _forward_plan(input, offset, weight, bias, mask, stride_hw, padding_hw,
                                                 dilation_hw)
        return _run_forward(plan, input, offset, weight, bias, mask)
    return _forward_op(input, offset, weight, bias, mask, list(stride_hw), list(padding_hw), list(dilation_hw))


def deform_conv2d(input: torch.Tensor, offset: torch.Tensor, weight: torch.Tensor,
                  bias: Optional[torch.Tensor] = None, stride: BroadcastingList2[int] = 1,
                  padding: BroadcastingList2[int] = 0, dilation: BroadcastingList2[int] = 1,
                  mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Deformable convolution v1, or modulated v2 when ``mask`` is given; torchvision's semantics.

    Args:
        input: (N, C_in, H, W).
        offset: (N, 2 * offset_groups * KH * KW, H_out, W_out); channel ``2 * (g * KH * KW + k)`` is
            the vertical and ``2 * (g * KH * KW + k) + 1`` the horizontal displacement of kernel tap
            ``k = i * KW + j`` for offset group ``g``. ``offset_groups`` is inferred from the channel
            count and must divide ``C_in``.
        weight: (C_out, C_in / groups, KH, KW); ``groups`` is inferred as ``C_in // weight.shape[1]``.
        bias: (C_out,) or None.
        stride, padding, dilation: int or (h, w) pair.
        mask: (N, offset_groups * KH * KW, H_out, W_out) or None; multiplies each bilinear sample.

    Returns:
        (N, C_out, H_out, W_out) with ``H_out = (H + 2 * pad_h - dil_h * (KH - 1) - 1) // stride_h + 1``
        (likewise W_out). A sample at a position outside (-1, H) x (-1, W), or at a non-finite
        position (NaN/inf offsets), contributes zero. Same dtype and device as ``input``.

    All tensors have one dtype: float32, float64, or bfloat16 / float16. Half tensors compute in
    float32 and return results and gradients in their dtype: on the CPU the forward has half
    kernels and the bfloat16 gradients too (with AVX512-BF16 their GEMMs use ``vdpbf16ps``: the
    forward where (C_in / groups) x KH x KW is even and the weight gradient where it is a
    multiple of 16, on columns rounded to bfloat16; the input, offset and mask gradients where
    C_out / groups is even); float16 gradients, and CUDA, convert them to float32 once and run
    the float32 kernels. Under ``torch.autocast`` the floating-point tensors
    (except float64 ones) are first cast to the autocast dtype, as ``conv2d``'s are.
    """
    if not torch.jit.is_scripting():
        return _deform_conv2d(input, offset, weight, bias, stride, padding, dilation, mask)
    # TorchScript compiles only this branch: the operator (which validates less than the function).
    return torch.ops.tvm_dcn.deform_conv2d_forward(input, offset, weight, bias, mask, stride, padding, dilation)


def _workload(input, offset, weight, bias, mask, stride, padding, dilation, dtype: Optional[torch.dtype] = None):
    """The forward workload of a validated call, in ``dtype`` (default: ``kernel_dtype``)."""
    return _forward_workload(tuple(input.shape), tuple(weight.shape), offset.shape[1], tuple(stride), tuple(padding),
                             tuple(dilation), mask is not None, bias is not None, dtype or kernel_dtype(input.dtype))


@functools.lru_cache(maxsize=1024)
def _forward_workload(input_shape, weight_shape, offset_channels, stride, padding, dilation, with_mask, with_bias,
                      dtype):
    batch, in_channels, height, width = input_shape
    out_channels, weight_in_channels, kernel_h, kernel_w = weight_shape
    return forward_workload(
        batch=batch, in_channels=in_channels, height=height, width=width, out_channels=out_channels,
        kernel_size=(kernel_h, kernel_w), stride=stride, padding=padding, dilation=dilation,
        groups=in_channels // weight_in_channels, offset_groups=offset_channels // (2 * kernel_h * kernel_w),
        with_mask=with_mask, with_bias=with_bias, dtype=str(dtype).replace("torch.", ""))


def _is_empty(input: torch.Tensor, weight: torch.Tensor) -> bool:
    """Calls with nothing to compute (no batch, no input or output channels) skip the kernels."""
    return input.shape[0] == 0 or input.shape[1] == 0 or weight.shape[0] == 0


def _float32(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else t.float()


def _flat(t: torch.Tensor, rows: int) -> torch.Tensor:
    """``t`` as a kernel argument of shape (batch, rows, -1) (the layout of the TE definitions)."""
    return kernel_arg(t).view(t.shape[0], rows, -1)


# The ``tvm_dcn`` operator namespace, defined once: the RoI family (roi.py) defines its operators here too.
LIBRARY = torch.library.Library("tvm_dcn", "DEF")
LIBRARY.define("deform_conv2d_forward(Tensor input, Tensor offset, Tensor weight, Tensor? bias, Tensor? mask, "
                "int[] stride, int[] padding, int[] dilation) -> Tensor")
LIBRARY.define("deform_conv2d_backward(Tensor grad_output, Tensor input, Tensor offset, Tensor weight, "
                "Tensor? mask, bool with_bias, int[] stride, int[] padding, int[] dilation, bool[] needs) "
                "-> (Tensor, Tensor, Tensor, Tensor, Tensor)")
_DEVICE_KEYS = ("CPU", "CUDA")


def implements(name: str):
    """Registers the decorated function as the CPU and CUDA kernel of ``tvm_dcn::<name>``."""
    def register(fn):
        for key in _DEVICE_KEYS:
            LIBRARY.impl(name, fn, key)
        return fn
    return register


_AUTOCAST_KEYS = {"cpu": "AutocastCPU", "cuda": "AutocastCUDA"}


def implements_autocast(name: str, float32: bool = False) -> None:
    """Registers the ``torch.autocast`` rule of ``tvm_dcn::<name>`` (its AutocastCPU and AutocastCUDA
    kernels): the floating-point arguments, except float64 ones, cast to the autocast dtype, as
    ``conv2d``'s; with ``float32``, torchvision's rule for its RoI operators instead: cast to
    float32, floating-point results back to the first argument's dtype."""
    op = getattr(torch.ops.tvm_dcn, name).default
    for device_type, key in _AUTOCAST_KEYS.items():
        LIBRARY.impl(name, _autocast_kernel(op, device_type, key, float32), key, with_keyset=True)


def _autocast_kernel(op, device_type: str, key: str, float32: bool):
    this_autocast = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key))

    def kernel(keyset, *args):
        dtype = torch.float32 if float32 else torch.get_autocast_dtype(device_type)
        with torch._C._ExcludeDispatchKeyGuard(this_autocast):  # as torch.library.register_autocast
            out = op(*(autocast_cast(a, dtype) for a in args))
        if not float32:
            return out
        result_dtype = args[0].dtype
        if isinstance(out, torch.Tensor):
            return out.to(result_dtype)
        return tuple(t.to(result_dtype) if t.is_floating_point() else t for t in out)
    return kernel


class _ForwardPlan(NamedTuple):
    """The forward kernel of one call signature and its output's shapes: as the kernel writes it
    (the TE definition's layout) and as returned."""

    kernel: _kernel.Kernel
    output_shape: tuple
    result_shape: tuple
    kernel_dtype: torch.dtype


def _forward_plan(input, offset, weight, bias, mask, stride, padding, dilation) -> _ForwardPlan:
    """Compiles (or fetches) the forward kernel of a validated, non-empty call."""
    batch, out_channels = input.shape[0], weight.shape[0]
    out_h, out_w = offset.shape[2:]
    # On the CPU half tensors have forward kernels of their own (float32 arithmetic; AVX512-BF16's
    # dot product in the bfloat16 GEMM where the target has it); on CUDA the float32 kernel.
    target = device_target(input.device)
    dtype = input.dtype if target is None else kernel_dtype(input.dtype)
    kern = _kernel.compile(_workload(input, offset, weight, bias, mask, stride, padding, dilation, dtype), target)
    return _ForwardPlan(kern, (batch, out_channels, out_h * out_w), (batch, out_channels, out_h, out_w), dtype)


def _run_forward(plan: _ForwardPlan, input, offset, weight, bias, mask) -> torch.Tensor:
    if input.dtype != plan.kernel_dtype:  # the float32 kernel (kernel_dtype), the result in the half dtype
        return _run_forward(plan, *(_float32(t) for t in (input, offset, weight, bias, mask))).to(input.dtype)
    args = [_flat(input, input.shape[1]), _flat(offset, offset.shape[1])]
    if mask is not None:
        args.append(_flat(mask, mask.shape[1]))
    args.append(kernel_arg(weight).view(weight.shape[0], -1))
    if bias is not None:
        args.append(kernel_arg(bias))
    result = input.new_empty(plan.result_shape)
    # Viewed before the kernel, not after: right after a kernel every new torch call runs on cold
    # caches (a view then costs ~40 us here).
    plan.kernel(*args, result.view(plan.output_shape))
    return result


@implements("deform_conv2d_forward")
def _forward_impl(input: torch.Tensor, offset: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                  mask: Optional[torch.Tensor], stride: list[int], padding: list[int],
                  dilation: list[int]) -> torch.Tensor:
    check_deform_conv2d_args(input, offset, weight, bias, mask, stride, padding, dilation)
    if _is_empty(input, weight):
        out = input.new_zeros((input.shape[0], weight.shape[0], offset.shape[2], offset.shape[3]))
        return out + bias.view(1, -1, 1, 1) if bias is not None and input.shape[0] else out
    plan = _forward_plan(input, offset, weight, bias, mask, stride, padding, dilation)
    return _run_forward(plan, input, offset, weight, bias, mask)


@torch.library.register_fake("tvm_dcn::deform_conv2d_forward")
def _(input, offset, weight, bias, mask, stride, padding, dilation):
    return input.new_empty((input.shape[0], weight.shape[0], offset.shape[2], offset.shape[3]))


@implements("deform_conv2d_backward")
def _backward_impl(grad_output: torch.Tensor, input: torch.Tensor, offset: torch.Tensor, weight: torch.Tensor,
                   mask: Optional[torch.Tensor], with_bias: bool, stride: list[int], padding: list[int],
                   dilation: list[int], needs: list[bool]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                     torch.Tensor, torch.Tensor]:
    """Gradients (input, offset, mask, weight, bias) for the flags ``needs``; a gradient that is
    not needed (or a mask/bias that does not exist) comes back as an empty tensor."""
    if input.dtype in HALF_DTYPES and (input.dtype != torch.bfloat16 or device_target(input.device) is not None):
        # float16, and CUDA: the float32 kernels (kernel_dtype), the gradients rounded to the half
        # dtype. bfloat16 on the CPU has gradient kernels of its own (float32 sums, each gradient
        # rounded once; AVX512-BF16's dot product). float16's ran 1.13-1.25x as long as float32's
        # (each gathered float16 value converted; no dot product), which costs more than
        # converting the tensors once.
        grads = _backward_impl(*(_float32(t) for t in (grad_output, input, offset, weight, mask)), with_bias, stride,
                               padding, dilation, needs)
        return tuple(g.to(input.dtype) for g in grads)
    need_input, need_offset, need_mask, need_weight, need_bias = needs
    need_mask = need_mask and mask is not None
    need_bias = need_bias and with_bias
    grads = [input.new_empty(0) for _ in range(5)]  # distinct tensors: custom-op outputs may not alias
    if _is_empty(input, weight):
        for i, (t, need) in enumerate(zip((input, offset, mask, weight), (need_input, need_offset, need_mask,
                                                                           need_weight))):
            if need:
                grads[i] = torch.zeros_like(t, memory_format=torch.contiguous_format)
        if need_bias:
            grads[4] = grad_output.sum((0, 2, 3))
        return tuple(grads)
    batch, in_channels = input.shape[:2]
    out_channels = weight.shape[0]
    pixels = offset.shape[2] * offset.shape[3]
    forward = _workload(input, offset, weight, None, mask, stride, padding, dilation, input.dtype)
    target = device_target(input.device)
    grad_out = _flat(grad_output, out_channels)
    sampling_args = [_flat(input, in_channels), _flat(offset, offset.shape[1])]
    if mask is not None:
        sampling_args.append(_flat(mask, mask.shape[1]))

    if need_input or need_offset or need_mask:
        need_sampling = need_offset or need_mask
        kern = _kernel.compile(backward_data_workload(forward, need_input=need_input, need_sampling=need_sampling),
                               target)
        outs = []
        if need_input:
            outs.append(input.new_empty((batch, in_channels, input.shape[2] * input.shape[3])))
        if need_sampling:
            outs.append(input.new_empty((batch, offset.shape[1], pixels)))
            if mask is not None:
                outs.append(input.new_empty((batch, mask.shape[1], pixels)))
        kern(grad_out, *sampling_args, kernel_arg(weight).view(out_channels, -1), *outs)
        if need_input:
            grads[0] = outs.pop(0).view_as(input)
        if need_sampling:
            grad_offset = outs.pop(0)
            if need_offset:
                grads[1] = grad_offset.view_as(offset)
            if mask is not None and need_mask:
                grads[2] = outs.pop(0).view_as(mask)
    if need_weight or need_bias:
        kern = _kernel.compile(backward_weight_workload(forward, need_weight=need_weight, need_bias=need_bias), target)
        outs = []
        if need_weight:
            outs.append(input.new_empty((out_channels, weight[0].numel())))
        if need_bias:
            outs.append(input.new_empty(out_channels))
        kern(grad_out, *(sampling_args if need_weight else []), *outs)
        if need_weight:
            grads[3] = outs.pop(0).view_as(weight)
        if need_bias:
            grads[4] = outs.pop(0)
    return tuple(grads)


@torch.library.register_fake("tvm_dcn::deform_conv2d_backward")
def _(grad_output, input, offset, weight, mask, with_bias, stride, padding, dilation, needs):
    shapes = (input, offset, mask, weight, weight[:, 0, 0, 0] if with_bias else None)
    return tuple(t.new_empty(t.shape) if need and t is not None else input.new_empty(0)
                 for t, need in zip(shapes, needs))


def _no_double_backward(ctx, *grads):
    raise RuntimeError("tvm_dcn.deform_conv2d: double backward (differentiating its gradients) is not supported")


# Gradients computed with create_graph=True record this op (with edges to the forward's inputs);
# differentiating them then raises, as torchvision does, instead of finding no path to the inputs
# (an unclear error, or silently None with allow_unused=True).
torch.library.register_autograd("tvm_dcn::deform_conv2d_backward", _no_double_backward)

_forward_op = torch.ops.tvm_dcn.deform_conv2d_forward.default
_backward_op = torch.ops.tvm_dcn.deform_conv2d_backward.default


def _save_for_backward(ctx, inputs, output):
    input, offset, weight, bias, mask, stride, padding, dilation = inputs
    ctx.save_for_backward(input, offset, weight, mask)
    ctx.conv = (stride, padding, dilation, bias is not None)


def _forward_grad(ctx, grad_output):
    """Autograd of ``deform_conv2d_forward``: the gradients autograd asks for, from one backward call."""
    input, offset, weight, mask = ctx.saved_tensors
    stride, padding, dilation, with_bias = ctx.conv
    needs = ctx.needs_input_grad[:5]  # input, offset, weight, bias, mask
    order = [needs[0], needs[1], needs[4], needs[2], needs[3]]  # the op's order: input, offset, mask, weight, bias
    if not any(order):
        return None, None, None, None, None, None, None, None
    grads = _backward_op(grad_output, input, offset, weight, mask, with_bias, stride, padding, dilation, order)
    g_input, g_offset, g_mask, g_weight, g_bias = (g if need else None for g, need in zip(grads, order))
    return g_input, g_offset, g_weight, g_bias, g_mask, None, None, None


torch.library.register_autograd("tvm_dcn::deform_conv2d_forward", _forward_grad, setup_context=_save_for_backward)
implements_autocast("deform_conv2d_forward")
