"""PyTorch entry points: torchvision-compatible functions that run tvm-dcn kernels.

Tensors reach the compiled kernels zero-copy through DLPack; outputs are allocated by PyTorch.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch

from . import kernel as _kernel
from .ops.deform_conv import forward_workload, output_size

IntPair = Union[int, Sequence[int]]

# Gradients land with the backward kernels; until then inputs that require grad are refused.
SUPPORTS_BACKWARD = False

_SUPPORTED_DTYPES = (torch.float32, torch.float64)
_INT32_MAX = 2**31 - 1


def _pair(value: IntPair, name: str) -> tuple[int, int]:
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if isinstance(value, int):
        return (value, value)
    try:
        items = tuple(value)
    except TypeError:
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}") from None
    if len(items) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in items):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    return items  # type: ignore[return-value]


def _check_tensor(t, name: str, ndim: int) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must be a {ndim}-d tensor, got shape {tuple(t.shape)}")
    if t.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"{name} has dtype {t.dtype}; tvm_dcn supports float32 and float64")


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


def _check_grad_unsupported(**tensors) -> None:
    if SUPPORTS_BACKWARD or not torch.is_grad_enabled():
        return
    for name, t in tensors.items():
        if t is not None and t.requires_grad:
            raise RuntimeError(
                f"tvm_dcn.deform_conv2d: {name} requires grad, but gradients are not implemented yet; "
                "run under torch.no_grad() or detach the inputs")


def deform_conv2d(input: torch.Tensor, offset: torch.Tensor, weight: torch.Tensor,
                  bias: Optional[torch.Tensor] = None, stride: IntPair = 1, padding: IntPair = 0,
                  dilation: IntPair = 1, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
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
    """
    _check_tensor(input, "input", 4)
    _check_tensor(offset, "offset", 4)
    _check_tensor(weight, "weight", 4)
    if bias is not None:
        _check_tensor(bias, "bias", 1)
    if mask is not None:
        _check_tensor(mask, "mask", 4)
    stride_hw, padding_hw, dilation_hw = _pair(stride, "stride"), _pair(padding, "padding"), _pair(dilation, "dilation")
    if min(stride_hw) < 1:
        raise ValueError(f"stride must be positive, got {stride}")
    if min(padding_hw) < 0:
        raise ValueError(f"padding must be non-negative, got {padding}")
    if min(dilation_hw) < 1:
        raise ValueError(f"dilation must be positive, got {dilation}")

    for name, t in (("offset", offset), ("weight", weight), ("bias", bias), ("mask", mask)):
        if t is None:
            continue
        if t.dtype != input.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but input has {input.dtype}; all must match")
        if t.device != input.device:
            raise ValueError(f"{name} is on {t.device} but input is on {input.device}; all must be on one device")
    if input.device.type != "cpu":
        raise ValueError(f"input is on {input.device}; tvm_dcn runs on the CPU for now")

    batch, in_channels, height, width = input.shape
    out_channels, weight_in_channels, kernel_h, kernel_w = weight.shape
    if weight_in_channels == 0 or kernel_h == 0 or kernel_w == 0:
        raise ValueError(f"weight has an empty dimension: shape {tuple(weight.shape)}")
    if in_channels % weight_in_channels:
        raise ValueError(f"input has {in_channels} channels, not a multiple of weight.shape[1] = "
                         f"{weight_in_channels} (the channels per group)")
    groups = in_channels // weight_in_channels
    if out_channels % groups:
        raise ValueError(f"weight has {out_channels} output channels, not divisible by groups = {groups}")
    taps = kernel_h * kernel_w
    if offset.shape[1] == 0 or offset.shape[1] % (2 * taps):
        raise ValueError(f"offset has {offset.shape[1]} channels; expected a positive multiple of "
                         f"2 * kernel_h * kernel_w = {2 * taps}")
    offset_groups = offset.shape[1] // (2 * taps)
    if in_channels % offset_groups:
        raise ValueError(f"offset implies {offset_groups} offset groups, which do not divide the "
                         f"{in_channels} input channels")
    out_h = output_size(height, kernel_h, stride_hw[0], padding_hw[0], dilation_hw[0])
    out_w = output_size(width, kernel_w, stride_hw[1], padding_hw[1], dilation_hw[1])
    if out_h < 1 or out_w < 1:
        extent = (dilation_hw[0] * (kernel_h - 1) + 1, dilation_hw[1] * (kernel_w - 1) + 1)
        raise ValueError(f"the output would be empty ({out_h}x{out_w}): input {height}x{width} with padding "
                         f"{padding_hw} is smaller than the dilated kernel extent {extent[0]}x{extent[1]}")
    if offset.shape[0] != batch or tuple(offset.shape[2:]) != (out_h, out_w):
        raise ValueError(f"offset has shape {tuple(offset.shape)}; expected ({batch}, {offset.shape[1]}, "
                         f"{out_h}, {out_w}) for the batch and output size")
    if bias is not None and bias.shape[0] != out_channels:
        raise ValueError(f"bias has {bias.shape[0]} elements; expected {out_channels} (weight.shape[0])")
    if mask is not None and tuple(mask.shape) != (batch, offset_groups * taps, out_h, out_w):
        raise ValueError(f"mask has shape {tuple(mask.shape)}; expected "
                         f"({batch}, {offset_groups * taps}, {out_h}, {out_w})")
    _check_grad_unsupported(input=input, offset=offset, weight=weight, bias=bias, mask=mask)

    out_shape = (batch, out_channels, out_h, out_w)
    if batch == 0 or out_channels == 0:
        return input.new_zeros(out_shape)
    if in_channels == 0:
        out = input.new_zeros(out_shape)
        return out + bias.view(1, -1, 1, 1) if bias is not None else out
    largest = max(input.numel(), batch * in_channels * taps * math.ceil(out_h * out_w / 8) * 8,
                  offset.numel(), batch * out_channels * out_h * out_w)
    if largest > _INT32_MAX:
        raise ValueError(f"input of shape {tuple(input.shape)} is too large for one kernel call "
                         "(more than 2**31 elements in an intermediate); split the batch")

    workload = forward_workload(
        batch=batch, in_channels=in_channels, height=height, width=width, out_channels=out_channels,
        kernel_size=(kernel_h, kernel_w), stride=stride_hw, padding=padding_hw, dilation=dilation_hw,
        groups=groups, offset_groups=offset_groups, with_mask=mask is not None, with_bias=bias is not None,
        dtype=str(input.dtype).replace("torch.", ""))
    kern = _kernel.compile(workload)

    args = [kernel_arg(input).view(batch, in_channels, height * width),
            kernel_arg(offset).view(batch, offset.shape[1], out_h * out_w)]
    if mask is not None:
        args.append(kernel_arg(mask).view(batch, mask.shape[1], out_h * out_w))
    args.append(kernel_arg(weight).view(out_channels, weight_in_channels * taps))
    if bias is not None:
        args.append(kernel_arg(bias))
    out = torch.empty((batch, out_channels, out_h * out_w), dtype=input.dtype)
    with torch.no_grad():
        kern(*args, out)
    return out.view(out_shape)
