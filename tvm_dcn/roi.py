"""PyTorch entry points for the RoI pooling family: torchvision's ``roi_align``, ``roi_pool``,
``ps_roi_align``, ``ps_roi_pool``; mmcv's ``deform_roi_pool`` (plain and modulated) and the
Deformable-ConvNets ``deform_psroi_pool``; their ``nn.Module`` wrappers; forward and backward on
the CPU or a CUDA GPU (the input's device; boxes and parameters must be on it too) through
tvm-dcn kernels.

Boxes are ``Tensor[K, 5]`` rows (batch index, x1, y1, x2, y2) or a list of ``Tensor[L, 4]`` (one per
image), as in torchvision. Kernels are compiled per feature-map shape and *bucket* of box counts
(16, 24, 32, 48, 64, ...; see ``tvm_dcn.ops.roi_align.roi_bucket``): a call pads its boxes with
rows that every stage skips, so a new box count rarely recompiles. Adaptive sampling
(``sampling_ratio <= 0``) loops up to a bound measured from the boxes and bucketed to a power of
two, masking the samples a box does not have.

Validation: empty box sets give empty outputs (and zero gradients); boxes outside the image and
degenerate boxes follow the operators' definitions; batch indices outside [0, N), non-finite
boxes or wrong box shapes raise ``ValueError`` naming the argument.
"""
from __future__ import annotations

import math
import statistics
import time
from numbers import Real
from typing import Callable, Optional, Sequence, Union

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from . import kernel as _kernel
from ._torch_utils import SUPPORTED_DTYPES
from ._utils import IntPair, int_pair
from .functional import device_target, kernel_arg
from .ops.deform_roi_pool import deform_psroi_pool_workload, deform_roi_pool_workload
from .ops.roi_align import (MAX_GRID, grid_bucket, ps_roi_align_workload, roi_align_workload, roi_bucket,
                            roi_pool_workload)

Boxes = Union[torch.Tensor, Sequence[torch.Tensor]]

_INT32_MAX = 2**31 - 1
# |coordinate * spatial_scale| beyond this is refused: the kernels convert coordinates to int32.
_MAX_COORDINATE = 2.0**24


# --------------------------------------------------------------------------------------------
# Validation


def _check_input(input, name: str = "input") -> None:
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(input).__name__}")
    if input.dim() != 4:
        raise ValueError(f"{name} must be a 4-d (N, C, H, W) tensor, got shape {tuple(input.shape)}")
    if input.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} has dtype {input.dtype}; tvm_dcn supports float32 and float64")
    device_target(input.device, name)
    if input.shape[2] == 0 or input.shape[3] == 0:
        raise ValueError(f"{name} has an empty spatial size {tuple(input.shape[2:])}")


def _output_size(value, name: str = "output_size") -> tuple[int, int]:
    items = int_pair(value, name)
    if min(items) < 1:
        raise ValueError(f"{name} must be positive, got {value!r}")
    return items


def _real(value, name: str, positive: bool = False) -> float:
    """``value`` as a finite float (positive if asked), else TypeError/ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    value = float(value)
    if not math.isfinite(value) or (positive and value <= 0):
        raise ValueError(f"{name} must be finite{' and positive' if positive else ''}, got {value!r}")
    return value


def _int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    return value


def _rois(boxes: Boxes, input: torch.Tensor, spatial_scale: float, name: str = "boxes") -> torch.Tensor:
    """``boxes`` as a (K, 5) tensor of the input's dtype, validated."""
    dtype = input.dtype
    if isinstance(boxes, torch.Tensor):
        if boxes.dim() != 2 or boxes.shape[1] != 5:
            raise ValueError(f"{name} must be a Tensor[K, 5] (batch index, x1, y1, x2, y2) or a list of "
                             f"Tensor[L, 4], got a tensor of shape {tuple(boxes.shape)}")
        rois = _as_float(boxes, name, dtype, input)
    elif isinstance(boxes, (list, tuple)):
        parts = []
        for i, b in enumerate(boxes):
            if not isinstance(b, torch.Tensor):
                raise TypeError(f"{name}[{i}] must be a torch.Tensor, got {type(b).__name__}")
            if b.dim() != 2 or b.shape[1] != 4:
                raise ValueError(f"{name}[{i}] must be a Tensor[L, 4] (x1, y1, x2, y2), got shape {tuple(b.shape)}")
            b = _as_float(b, f"{name}[{i}]", dtype, input)
            parts.append(torch.cat([torch.full((b.shape[0], 1), float(i), dtype=dtype, device=b.device), b], dim=1))
        rois = torch.cat(parts) if parts else input.new_zeros(0, 5)
    else:
        raise TypeError(f"{name} must be a Tensor[K, 5] or a list of Tensor[L, 4], got {type(boxes).__name__}")
    if rois.numel() == 0:
        return rois.reshape(0, 5)
    if not torch.isfinite(rois).all():
        raise ValueError(f"{name} contains non-finite values")
    batch_index = rois[:, 0].trunc()  # torchvision converts with a C cast
    bad = (batch_index < 0) | (batch_index >= input.shape[0])
    if bad.any():
        k = int(bad.nonzero()[0])
        raise ValueError(f"{name}: box {k} has batch index {rois[k, 0].item():g}, outside [0, {input.shape[0]}) "
                         f"for an input of batch size {input.shape[0]}")
    if (rois[:, 1:].abs() * spatial_scale).max() > _MAX_COORDINATE:
        raise ValueError(f"{name}: coordinates times spatial_scale exceed {_MAX_COORDINATE:g} pixels")
    return rois


def _as_float(t: torch.Tensor, name: str, dtype, input: torch.Tensor) -> torch.Tensor:
    if t.dtype == torch.bool or t.is_complex():
        raise TypeError(f"{name} has dtype {t.dtype}; boxes must be real numbers")
    if t.device != input.device:
        raise ValueError(f"{name} is on {t.device} but input is on {input.device}; boxes must be on the input's device")
    return t.detach().to(dtype)


def _check_param(t, name: str, shape: tuple, input: torch.Tensor) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
    if t.dtype != input.dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but input has {input.dtype}; they must match")
    if t.device != input.device:
        raise ValueError(f"{name} is on {t.device} but input is on {input.device}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} has shape {tuple(t.shape)}; expected {shape}")
    return t


def _check_size(input: torch.Tensor, out_numel: int) -> None:
    if max(input.numel(), out_numel) > _INT32_MAX:
        raise ValueError(f"input of shape {tuple(input.shape)} is too large for one kernel call "
                         "(more than 2**31 elements); split the batch or the boxes")


def _adaptive_grid(rois: torch.Tensor, spatial_scale: float, output_size, shift: float, min_size) -> tuple[int, int]:
    """Largest ``ceil(roi_size / pooled)`` along (y, x), computed as the kernels do, bucketed."""
    if rois.shape[0] == 0:
        return (1, 1)
    scale = torch.tensor(spatial_scale, dtype=rois.dtype, device=rois.device)
    grid = []
    for axis, (lo_col, hi_col) in enumerate(((2, 4), (1, 3))):
        size = (rois[:, hi_col] * scale - shift) - (rois[:, lo_col] * scale - shift)
        if min_size is not None:
            size = size.clamp(min=min_size)
        needed = int(torch.ceil(size / output_size[axis]).max().item())
        if needed > MAX_GRID:
            raise ValueError(f"adaptive sampling (sampling_ratio <= 0) would take {needed} samples per bin and axis "
                             f"for the largest box (limit {MAX_GRID}); pass a positive sampling_ratio")
        grid.append(grid_bucket(needed))
    return (grid[0], grid[1])


def _max_roi_size(rois: torch.Tensor, spatial_scale: float) -> tuple[int, int]:
    """Upper bound on the (h, w) of RoI Pool's integer RoIs, in feature-map pixels."""
    if rois.shape[0] == 0:
        return (1, 1)
    r = rois[:, 1:].to(torch.float64) * spatial_scale
    return (int((r[:, 3] - r[:, 1]).abs().max().ceil()) + 3, int((r[:, 2] - r[:, 0]).abs().max().ceil()) + 3)


def _dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).replace("torch.", "")


# --------------------------------------------------------------------------------------------
# Plans: one call's kernels and padded arguments


class _Plan:
    """Padded RoIs and scalars of one call; subclasses run the forward and backward kernels."""

    def __init__(self, input: torch.Tensor, rois: torch.Tensor, scalars: Sequence[float], out_channels: int,
                 output_size: tuple[int, int]):
        self.shape = tuple(input.shape)
        self.dtype = input.dtype
        self.num_rois = rois.shape[0]
        self.rows = roi_bucket(self.num_rois)
        self.output_size = output_size
        self.out_channels = out_channels
        self.target = device_target(input.device)
        padded = input.new_zeros(self.rows, 5)
        padded[:, 0] = -1  # padding rows: skipped by every stage
        padded[: self.num_rois] = rois
        self.rois = padded
        self.scalars = torch.tensor(list(scalars), dtype=input.dtype, device=input.device)
        _check_size(input, self.rows * out_channels * output_size[0] * output_size[1])

    @property
    def empty(self) -> bool:
        n, c = self.shape[:2]
        return self.num_rois == 0 or self.out_channels == 0 or n == 0 or c == 0

    def geometry(self) -> dict:
        n, c, h, w = self.shape
        return dict(batch=n, channels=c, height=h, width=w, num_rois=self.num_rois, dtype=_dtype_name(self.rois))

    def output_shape(self, rows: int) -> tuple:
        return (rows, self.out_channels) + tuple(self.output_size)

    def flat_input(self, input: torch.Tensor) -> torch.Tensor:
        n, c, h, w = self.shape
        return kernel_arg(input).view(n, c, h * w)

    def padded(self, t: torch.Tensor, shape_tail: tuple) -> torch.Tensor:
        """``t`` (K, ...) as a kernel argument with ``rows`` rows (zeros below)."""
        t = t.reshape((self.num_rois,) + shape_tail)
        if self.num_rois == self.rows:
            return kernel_arg(t)
        out = t.new_zeros((self.rows,) + shape_tail)
        out[: self.num_rois] = t
        return out

    def grad_input_buffer(self) -> torch.Tensor:
        n, c, h, w = self.shape
        return self.rois.new_empty((n, c, h * w))

    def run_forward(self, workload, args, extra_outputs=()) -> torch.Tensor:
        out = self.rois.new_empty(self.output_shape(self.rows))
        self.kernel(workload)(*args, out, *extra_outputs)
        return out

    def kernel(self, workload) -> _kernel.Kernel:
        """The kernel of ``workload`` for this call's device."""
        return _kernel.compile(workload, self.target)

    # Interface for _RoIFunction.
    def forward(self, input, offset, mask):  # -> (output, tensors to save)
        raise NotImplementedError

    def backward(self, grad, needs, input, offset, mask, saved):  # -> (grad_input, grad_offset, grad_mask)
        raise NotImplementedError


class _RoIFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, plan: _Plan, input, offset, mask):
        if plan.empty:
            out, saved = input.new_zeros(plan.output_shape(plan.num_rois)), ()
        else:
            out, saved = plan.forward(input, offset, mask)
        ctx.plan = plan
        ctx.save_for_backward(input, offset, mask, *saved)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        input, offset, mask, *saved = ctx.saved_tensors
        plan: _Plan = ctx.plan
        needs = ctx.needs_input_grad[1:4]
        if plan.empty or grad is None:
            grads = [None if t is None or not need else torch.zeros_like(t)
                     for t, need in zip((input, offset, mask), needs)]
            return (None, *grads)
        grad_input, grad_offset, grad_mask = plan.backward(grad, needs, input, offset, mask, saved)
        return None, grad_input, grad_offset, grad_mask


class _AlignPlan(_Plan):
    """RoI Align (``position_sensitive=False``) and PS RoI Align."""

    def __init__(self, input, rois, output_size, spatial_scale, sampling_ratio, aligned, position_sensitive):
        ph, pw = output_size
        channels = input.shape[1] // (ph * pw) if position_sensitive else input.shape[1]
        super().__init__(input, rois, [spatial_scale], channels, output_size)
        shift, min_size = (0.5, None) if aligned else (0.0, 1.0)
        grid = None if sampling_ratio > 0 else _adaptive_grid(rois, spatial_scale, output_size, shift, min_size)
        params = dict(self.geometry(), output_size=output_size, sampling_ratio=sampling_ratio, max_grid=grid)
        if position_sensitive:
            self.workloads = [ps_roi_align_workload(**params, backward=b) for b in (False, True)]
        else:
            self.workloads = [roi_align_workload(**params, aligned=aligned, backward=b) for b in (False, True)]

    def forward(self, input, offset, mask):
        out = self.run_forward(self.workloads[0], [self.flat_input(input), self.rois, self.scalars])
        return out[: self.num_rois], ()

    def backward(self, grad, needs, input, offset, mask, saved):
        if not needs[0]:
            return None, None, None
        grad_input = self.grad_input_buffer()
        grad_out = self.padded(grad, self.output_shape(self.rows)[1:])
        self.kernel(self.workloads[1])(grad_out, self.rois, self.scalars, grad_input)
        return grad_input.view(self.shape), None, None


class _PoolPlan(_Plan):
    """RoI Pool (max, saves the argmax) and PS RoI Pool (average)."""

    def __init__(self, input, rois, output_size, spatial_scale, position_sensitive):
        ph, pw = output_size
        channels = input.shape[1] // (ph * pw) if position_sensitive else input.shape[1]
        super().__init__(input, rois, [spatial_scale], channels, output_size)
        self.position_sensitive = position_sensitive
        params = dict(self.geometry(), output_size=output_size, max_roi_size=_max_roi_size(rois, spatial_scale),
                      position_sensitive=position_sensitive)
        self.workloads = [roi_pool_workload(**params, backward=b) for b in (False, True)]

    def forward(self, input, offset, mask):
        args = [self.flat_input(input), self.rois, self.scalars]
        if self.position_sensitive:
            return self.run_forward(self.workloads[0], args)[: self.num_rois], ()
        argmax = self.rois.new_empty(self.output_shape(self.rows), dtype=torch.int32)
        out = self.run_forward(self.workloads[0], args, [argmax])
        return out[: self.num_rois], (argmax,)

    def backward(self, grad, needs, input, offset, mask, saved):
        if not needs[0]:
            return None, None, None
        grad_input = self.grad_input_buffer()
        grad_out = self.padded(grad, self.output_shape(self.rows)[1:])
        kern = self.kernel(self.workloads[1])
        if self.position_sensitive:
            kern(grad_out, self.rois, self.scalars, grad_input)
        else:
            kern(grad_out, saved[0], self.rois, grad_input)
        return grad_input.view(self.shape), None, None


class _DeformPlan(_Plan):
    """mmcv's deform_roi_pool, plain or modulated."""

    def __init__(self, input, rois, output_size, spatial_scale, sampling_ratio, gamma, with_offset, with_mask):
        super().__init__(input, rois, [spatial_scale, gamma], input.shape[1], output_size)
        grid = None if sampling_ratio > 0 else _adaptive_grid(rois, spatial_scale, output_size, 0.5, None)
        params = dict(self.geometry(), output_size=output_size, sampling_ratio=sampling_ratio, max_grid=grid,
                      with_offset=with_offset, with_mask=with_mask)
        self.workloads = {b: deform_roi_pool_workload(**params, backward=b) for b in (None, "input", "params")}

    def _params(self, offset, mask) -> list:
        ph, pw = self.output_size
        args = [self.rois]
        if offset is not None:
            args.append(self.padded(offset, (2, ph, pw)))
        if mask is not None:
            args.append(self.padded(mask, (ph, pw)))
        return args + [self.scalars]

    def forward(self, input, offset, mask):
        out = self.run_forward(self.workloads[None], [self.flat_input(input)] + self._params(offset, mask))
        return out[: self.num_rois], ()

    def backward(self, grad, needs, input, offset, mask, saved):
        grad_out = self.padded(grad, self.output_shape(self.rows)[1:])
        params = self._params(offset, mask)
        grad_input = grad_offset = grad_mask = None
        if needs[0]:
            grad_input = self.grad_input_buffer()
            self.kernel(self.workloads["input"])(grad_out, *params, grad_input)
            grad_input = grad_input.view(self.shape)
        if (needs[1] and offset is not None) or (needs[2] and mask is not None):
            ph, pw = self.output_size
            outs = ([self.rois.new_empty(self.rows, 2, ph, pw)] if offset is not None else []) + \
                   ([self.rois.new_empty(self.rows, ph, pw)] if mask is not None else [])
            self.kernel(self.workloads["params"])(grad_out, self.flat_input(input), *params, *outs)
            if offset is not None and needs[1]:
                grad_offset = outs[0][: self.num_rois].view_as(offset)
            if mask is not None and needs[2]:
                grad_mask = outs[-1][: self.num_rois].view_as(mask)
        return grad_input, grad_offset, grad_mask


class _PSDeformPlan(_Plan):
    """Deformable position-sensitive RoI pooling (Deformable-ConvNets)."""

    def __init__(self, input, rois, spatial_scale, trans_std, output_dim, group_size, pooled_size, part_size,
                 sample_per_part, num_classes, no_trans):
        super().__init__(input, rois, [spatial_scale, trans_std], output_dim, (pooled_size, pooled_size))
        self.part_size, self.num_classes = part_size, num_classes
        params = dict(self.geometry(), output_dim=output_dim, group_size=group_size, pooled_size=pooled_size,
                      part_size=part_size, sample_per_part=sample_per_part, num_classes=num_classes,
                      no_trans=no_trans)
        self.workloads = {b: deform_psroi_pool_workload(**params, backward=b) for b in (None, "input", "params")}

    def _params(self, trans) -> list:
        args = [self.rois]
        if trans is not None:
            args.append(self.padded(trans, (2 * self.num_classes, self.part_size, self.part_size)))
        return args + [self.scalars]

    def forward(self, input, trans, mask):
        out = self.run_forward(self.workloads[None], [self.flat_input(input)] + self._params(trans))
        return out[: self.num_rois], ()

    def backward(self, grad, needs, input, trans, mask, saved):
        grad_out = self.padded(grad, self.output_shape(self.rows)[1:])
        params = self._params(trans)
        grad_input = grad_trans = None
        if needs[0]:
            grad_input = self.grad_input_buffer()
            self.kernel(self.workloads["input"])(grad_out, *params, grad_input)
            grad_input = grad_input.view(self.shape)
        if needs[1] and trans is not None:
            part = self.part_size
            out = self.rois.new_empty(self.rows, 2 * self.num_classes, part, part)
            self.kernel(self.workloads["params"])(grad_out, self.flat_input(input), *params, out)
            grad_trans = out[: self.num_rois]
        return grad_input, grad_trans, None


# --------------------------------------------------------------------------------------------
# Functions


def _align_like(input, boxes, output_size, spatial_scale, sampling_ratio, aligned, position_sensitive):
    _check_input(input)
    output_size = _output_size(output_size)
    spatial_scale = _real(spatial_scale, "spatial_scale", positive=True)
    sampling_ratio = _int(sampling_ratio, "sampling_ratio")
    if not isinstance(aligned, bool):
        raise TypeError(f"aligned must be a bool, got {aligned!r}")
    if position_sensitive:
        _check_ps_channels(input, output_size)
    rois = _rois(boxes, input, spatial_scale)
    plan = _AlignPlan(input, rois, output_size, spatial_scale, sampling_ratio, aligned, position_sensitive)
    return _RoIFunction.apply(plan, input, None, None)


def _check_ps_channels(input, output_size) -> None:
    bins = output_size[0] * output_size[1]
    if input.shape[1] % bins:
        raise ValueError(f"input has {input.shape[1]} channels, not a multiple of output_size[0] * output_size[1] "
                         f"= {bins} (position-sensitive pooling reads one channel group per bin)")


def roi_align(input: torch.Tensor, boxes: Boxes, output_size: IntPair, spatial_scale: float = 1.0,
              sampling_ratio: int = -1, aligned: bool = False) -> torch.Tensor:
    """RoI Align, ``torchvision.ops.roi_align``'s signature and results: (K, C, PH, PW).

    Each bin averages a ``sampling_ratio`` x ``sampling_ratio`` grid of bilinear samples (adaptive,
    ``ceil(roi_size / output_size)``, when ``sampling_ratio <= 0``). ``aligned=True`` shifts the box
    by -0.5 pixel; ``aligned=False`` raises RoI sizes below 1 to 1.
    """
    return _align_like(input, boxes, output_size, spatial_scale, sampling_ratio, aligned, False)


def ps_roi_align(input: torch.Tensor, boxes: Boxes, output_size: IntPair, spatial_scale: float = 1.0,
                 sampling_ratio: int = -1) -> torch.Tensor:
    """Position-sensitive RoI Align (``torchvision.ops.ps_roi_align``): (K, C / (PH * PW), PH, PW).

    Unlike torchvision, a degenerate box with adaptive sampling (no sample in its bins) gives 0,
    not NaN (torchvision divides 0 by a sample count of 0)."""
    return _align_like(input, boxes, output_size, spatial_scale, sampling_ratio, True, True)


def _pool_like(input, boxes, output_size, spatial_scale, position_sensitive):
    _check_input(input)
    output_size = _output_size(output_size)
    spatial_scale = _real(spatial_scale, "spatial_scale", positive=True)
    if position_sensitive:
        _check_ps_channels(input, output_size)
    rois = _rois(boxes, input, spatial_scale)
    return _RoIFunction.apply(_PoolPlan(input, rois, output_size, spatial_scale, position_sensitive), input, None, None)


def roi_pool(input: torch.Tensor, boxes: Boxes, output_size: IntPair, spatial_scale: float = 1.0) -> torch.Tensor:
    """RoI max pooling (``torchvision.ops.roi_pool``): (K, C, PH, PW); the gradient goes to the
    first maximum of each bin (row-major order); empty bins are 0."""
    return _pool_like(input, boxes, output_size, spatial_scale, False)


def ps_roi_pool(input: torch.Tensor, boxes: Boxes, output_size: IntPair, spatial_scale: float = 1.0) -> torch.Tensor:
    """Position-sensitive RoI average pooling (``torchvision.ops.ps_roi_pool``): (K, C / (PH * PW), PH, PW).

    As torchvision's forward, bins are clipped to the first H - 1 rows and W - 1 columns. The
    gradient is that of this forward function; torchvision's backward clips to H and W instead,
    so the two differ for boxes that reach the last row or column."""
    return _pool_like(input, boxes, output_size, spatial_scale, True)


def deform_roi_pool(input: torch.Tensor, rois: Boxes, offset: Optional[torch.Tensor], output_size: IntPair,
                    spatial_scale: float = 1.0, sampling_ratio: int = 0, gamma: float = 0.1,
                    mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Deformable RoI pooling with mmcv's semantics: (K, C, PH, PW).

    RoI Align with the half-pixel shift (``x * spatial_scale - 0.5``, as mmcv) whose bin (ph, pw)
    moves by ``gamma * roi_width * offset[k, 0, ph, pw]`` along x and ``gamma * roi_height *
    offset[k, 1, ph, pw]`` along y. ``offset``: (K, 2, PH, PW) or None (zero offsets: then this is
    ``roi_align(..., aligned=True)``). ``mask`` (K, 1, PH, PW) or (K, PH, PW), optional: the
    modulated variant, which multiplies each bin by its mask value (``ModulatedDeformRoIPoolPack``).
    """
    _check_input(input)
    output_size = _output_size(output_size)
    spatial_scale = _real(spatial_scale, "spatial_scale", positive=True)
    sampling_ratio = _int(sampling_ratio, "sampling_ratio")
    gamma = _real(gamma, "gamma")
    rois = _rois(rois, input, spatial_scale, name="rois")
    k = rois.shape[0]
    if offset is not None:
        _check_param(offset, "offset", (k, 2) + output_size, input)
    if mask is not None:
        shape = (k, 1) + output_size if mask.dim() == 4 else (k,) + output_size
        _check_param(mask, "mask", shape, input)
    plan = _DeformPlan(input, rois, output_size, spatial_scale, sampling_ratio, gamma, offset is not None,
                       mask is not None)
    return _RoIFunction.apply(plan, input, offset, mask)


def deform_psroi_pool(input: torch.Tensor, rois: Boxes, offset: Optional[torch.Tensor], spatial_scale: float,
                      output_dim: int, group_size: int, pooled_size: int, part_size: Optional[int] = None,
                      sample_per_part: int = 4, trans_std: float = 0.0, no_trans: bool = False) -> torch.Tensor:
    """Deformable position-sensitive RoI pooling (Deformable-ConvNets, R-FCN): (K, output_dim, P, P).

    ``input`` has ``output_dim * group_size ** 2`` channels; ``offset`` ("trans") is
    (K, 2 * classes, part_size, part_size), its channel pair (2c, 2c + 1) moving, in units of the
    RoI's width and height times ``trans_std``, the bins of output channels ``c * output_dim /
    classes ...``; ignored (may be None) when ``no_trans``. ``part_size`` defaults to ``pooled_size``.
    """
    _check_input(input)
    spatial_scale = _real(spatial_scale, "spatial_scale", positive=True)
    trans_std = _real(trans_std, "trans_std")
    output_dim, group_size, pooled_size = (_int(output_dim, "output_dim"), _int(group_size, "group_size"),
                                           _int(pooled_size, "pooled_size"))
    part_size = pooled_size if part_size is None or part_size == 0 else _int(part_size, "part_size")
    sample_per_part = _int(sample_per_part, "sample_per_part")
    if not isinstance(no_trans, bool):
        raise TypeError(f"no_trans must be a bool, got {no_trans!r}")
    for name, v in (("output_dim", output_dim), ("group_size", group_size), ("pooled_size", pooled_size),
                    ("part_size", part_size), ("sample_per_part", sample_per_part)):
        if v < 1:
            raise ValueError(f"{name} must be positive, got {v}")
    if input.shape[1] != output_dim * group_size * group_size:
        raise ValueError(f"input has {input.shape[1]} channels; expected output_dim * group_size**2 = "
                         f"{output_dim * group_size * group_size}")
    rois = _rois(rois, input, spatial_scale, name="rois")
    k = rois.shape[0]
    num_classes = 1
    if no_trans:
        offset = None
    else:
        if offset is None:
            raise ValueError("offset is None but no_trans is False; pass no_trans=True to pool without offsets")
        if not isinstance(offset, torch.Tensor) or offset.dim() != 4 or offset.shape[1] == 0 or offset.shape[1] % 2:
            raise ValueError(f"offset must be a (K, 2 * classes, part_size, part_size) tensor, got "
                             f"{tuple(offset.shape) if isinstance(offset, torch.Tensor) else type(offset).__name__}")
        num_classes = offset.shape[1] // 2
        if output_dim % num_classes:
            raise ValueError(f"offset has {num_classes} classes (channels / 2), which do not divide output_dim = "
                             f"{output_dim}")
        _check_param(offset, "offset", (k, 2 * num_classes, part_size, part_size), input)
    plan = _PSDeformPlan(input, rois, spatial_scale, trans_std, output_dim, group_size, pooled_size, part_size,
                         sample_per_part, num_classes, no_trans)
    return _RoIFunction.apply(plan, input, offset, None)


# --------------------------------------------------------------------------------------------
# Modules


class RoIAlign(nn.Module):
    """``torchvision.ops.RoIAlign``: ``forward(input, boxes)``."""

    def __init__(self, output_size: IntPair, spatial_scale: float, sampling_ratio: int, aligned: bool = False):
        super().__init__()
        self.output_size, self.spatial_scale = output_size, spatial_scale
        self.sampling_ratio, self.aligned = sampling_ratio, aligned

    def forward(self, input: torch.Tensor, boxes: Boxes) -> torch.Tensor:
        return roi_align(input, boxes, self.output_size, self.spatial_scale, self.sampling_ratio, self.aligned)

    def extra_repr(self) -> str:
        return (f"output_size={self.output_size}, spatial_scale={self.spatial_scale}, "
                f"sampling_ratio={self.sampling_ratio}, aligned={self.aligned}")


class PSRoIAlign(nn.Module):
    """``torchvision.ops.PSRoIAlign``."""

    def __init__(self, output_size: IntPair, spatial_scale: float, sampling_ratio: int):
        super().__init__()
        self.output_size, self.spatial_scale, self.sampling_ratio = output_size, spatial_scale, sampling_ratio

    def forward(self, input: torch.Tensor, boxes: Boxes) -> torch.Tensor:
        return ps_roi_align(input, boxes, self.output_size, self.spatial_scale, self.sampling_ratio)


class RoIPool(nn.Module):
    """``torchvision.ops.RoIPool``."""

    def __init__(self, output_size: IntPair, spatial_scale: float):
        super().__init__()
        self.output_size, self.spatial_scale = output_size, spatial_scale

    def forward(self, input: torch.Tensor, boxes: Boxes) -> torch.Tensor:
        return roi_pool(input, boxes, self.output_size, self.spatial_scale)


class PSRoIPool(RoIPool):
    """``torchvision.ops.PSRoIPool``."""

    def forward(self, input: torch.Tensor, boxes: Boxes) -> torch.Tensor:
        return ps_roi_pool(input, boxes, self.output_size, self.spatial_scale)


class DeformRoIPool(nn.Module):
    """mmcv's ``DeformRoIPool``: ``forward(input, rois, offset=None)``."""

    def __init__(self, output_size: IntPair, spatial_scale: float = 1.0, sampling_ratio: int = 0,
                 gamma: float = 0.1):
        super().__init__()
        self.output_size = _output_size(output_size)
        self.spatial_scale = float(spatial_scale)
        self.sampling_ratio = int(sampling_ratio)
        self.gamma = float(gamma)

    def pool(self, input, rois, offset=None, mask=None) -> torch.Tensor:
        return deform_roi_pool(input, rois, offset, self.output_size, self.spatial_scale, self.sampling_ratio,
                               self.gamma, mask=mask)

    def forward(self, input: torch.Tensor, rois: Boxes, offset: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.pool(input, rois, offset)


def _fc_stack(in_features: int, hidden: int, out_features: int, layers: int, final: Optional[nn.Module] = None):
    """``layers`` Linear layers (ReLU between), the last zero-initialised, then ``final``."""
    seq, width = [], in_features
    for i in range(layers):
        last = i == layers - 1
        seq.append(nn.Linear(width, out_features if last else hidden))
        if not last:
            seq.append(nn.ReLU(inplace=True))
        width = hidden
    nn.init.zeros_(seq[-1].weight)
    nn.init.zeros_(seq[-1].bias)
    if final is not None:
        seq.append(final)
    return nn.Sequential(*seq)


class DeformRoIPoolPack(DeformRoIPool):
    """mmcv's ``DeformRoIPoolPack``: offsets predicted from the RoI-aligned features by three fully
    connected layers (the last zero-initialised, so training starts from plain RoI Align)."""

    def __init__(self, output_size: IntPair, output_channels: int, deform_fc_channels: int = 1024,
                 spatial_scale: float = 1.0, sampling_ratio: int = 0, gamma: float = 0.1):
        super().__init__(output_size, spatial_scale, sampling_ratio, gamma)
        self.output_channels = output_channels
        self.deform_fc_channels = deform_fc_channels
        bins = self.output_size[0] * self.output_size[1]
        self.offset_fc = _fc_stack(bins * output_channels, deform_fc_channels, bins * 2, 3)

    def _features(self, input, rois):
        if isinstance(input, torch.Tensor) and input.dim() == 4 and input.shape[1] != self.output_channels:
            raise ValueError(f"input has {input.shape[1]} channels; this module was built for output_channels = "
                             f"{self.output_channels}")
        x = self.pool(input, rois)
        flat = x.reshape(x.shape[0], -1)
        offset = self.offset_fc(flat).view(x.shape[0], 2, *self.output_size)
        return flat, offset

    def forward(self, input: torch.Tensor, rois: Boxes) -> torch.Tensor:  # type: ignore[override]
        _, offset = self._features(input, rois)
        return self.pool(input, rois, offset)


class ModulatedDeformRoIPoolPack(DeformRoIPoolPack):
    """mmcv's ``ModulatedDeformRoIPoolPack``: also predicts a sigmoid mask per bin (two fully
    connected layers, the last zero-initialised: the mask starts at 0.5) multiplying the output."""

    def __init__(self, output_size: IntPair, output_channels: int, deform_fc_channels: int = 1024,
                 spatial_scale: float = 1.0, sampling_ratio: int = 0, gamma: float = 0.1):
        super().__init__(output_size, output_channels, deform_fc_channels, spatial_scale, sampling_ratio, gamma)
        bins = self.output_size[0] * self.output_size[1]
        self.mask_fc = _fc_stack(bins * output_channels, deform_fc_channels, bins, 2, nn.Sigmoid())

    def forward(self, input: torch.Tensor, rois: Boxes) -> torch.Tensor:  # type: ignore[override]
        flat, offset = self._features(input, rois)
        mask = self.mask_fc(flat).view(flat.shape[0], 1, *self.output_size)
        return self.pool(input, rois, offset, mask)


class DeformRoIPooling(nn.Module):
    """Deformable PS RoI pooling module (Deformable-ConvNets / mmdetection v1 signature):
    ``forward(input, rois, offset=None)``."""

    def __init__(self, spatial_scale: float, out_size: int, out_channels: int, no_trans: bool, group_size: int = 1,
                 part_size: Optional[int] = None, sample_per_part: int = 4, trans_std: float = 0.0):
        super().__init__()
        self.spatial_scale, self.out_size, self.out_channels = spatial_scale, out_size, out_channels
        self.no_trans, self.group_size = no_trans, group_size
        self.part_size = out_size if part_size is None else part_size
        self.sample_per_part, self.trans_std = sample_per_part, trans_std

    def pool(self, input, rois, offset, no_trans: bool) -> torch.Tensor:
        return deform_psroi_pool(input, rois, offset, self.spatial_scale, self.out_channels, self.group_size,
                                 self.out_size, self.part_size, self.sample_per_part, self.trans_std, no_trans)

    def forward(self, input: torch.Tensor, rois: Boxes, offset: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.pool(input, rois, offset, self.no_trans)


class DeformRoIPoolingPack(DeformRoIPooling):
    """mmdetection v1's ``DeformRoIPoolingPack``: offsets ((K, 2, part, part), one class) predicted
    from the pooled features (without offsets) by ``num_offset_fcs`` fully connected layers, the
    last zero-initialised."""

    def __init__(self, spatial_scale: float, out_size: int, out_channels: int, no_trans: bool, group_size: int = 1,
                 part_size: Optional[int] = None, sample_per_part: int = 4, trans_std: float = 0.0,
                 num_offset_fcs: int = 3, deform_fc_channels: int = 1024):
        super().__init__(spatial_scale, out_size, out_channels, no_trans, group_size, part_size, sample_per_part,
                         trans_std)
        if not no_trans:
            self.offset_fc = _fc_stack(out_size * out_size * out_channels, deform_fc_channels,
                                       self.part_size * self.part_size * 2, num_offset_fcs)

    def forward(self, input: torch.Tensor, rois: Boxes) -> torch.Tensor:  # type: ignore[override]
        if self.no_trans:
            return self.pool(input, rois, None, True)
        x = self.pool(input, rois, None, True)
        offset = self.offset_fc(x.reshape(x.shape[0], -1)).view(x.shape[0], 2, self.part_size, self.part_size)
        return self.pool(input, rois, offset, False)


# --------------------------------------------------------------------------------------------
# Benchmark


def benchmark_roi_align(num_rois: int = 512, channels: int = 256, height: int = 50, width: int = 68,
                        output_size: int = 7, sampling_ratio: int = 2, aligned: bool = False,
                        spatial_scale: float = 1 / 16, dtype: torch.dtype = torch.float32, repeats: int = 20,
                        warmup: int = 3, seed: int = 0, log: Optional[Callable[[str], None]] = print) -> dict:
    """Time RoI Align forward + backward, tvm-dcn against ``torchvision.ops.roi_align``, interleaved in
    this process (machine noise hits both alike); returns median milliseconds and the largest
    output/gradient difference. Boxes: random, 16-400 px, in the image the feature map covers."""
    import torchvision  # noqa: PLC0415

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, channels, height, width, generator=g, dtype=dtype)
    image = torch.tensor([width / spatial_scale, height / spatial_scale], dtype=torch.float64)
    xy = torch.rand(num_rois, 2, generator=g, dtype=torch.float64) * image
    wh = torch.rand(num_rois, 2, generator=g, dtype=torch.float64) * 384 + 16
    boxes = torch.cat([torch.zeros(num_rois, 1, dtype=torch.float64), xy, xy + wh], 1).to(dtype)
    grad = torch.randn(num_rois, channels, output_size, output_size, generator=g, dtype=dtype)

    def run(fn):
        def step():
            xr = x.detach().requires_grad_()
            out = fn(xr, boxes, output_size, spatial_scale, sampling_ratio, aligned)
            out.backward(grad)
            return out.detach(), xr.grad
        return step

    candidates = {"tvm_dcn": run(roi_align), "torchvision": run(torchvision.ops.roi_align)}
    results = {name: step() for name, step in candidates.items()}  # compile, check
    for _ in range(warmup):
        for step in candidates.values():
            step()
    times = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, step in candidates.items():
            start = time.perf_counter()
            step()
            times[name].append((time.perf_counter() - start) * 1e3)
    summary = {
        "case": f"roi_align fwd+bwd {num_rois} boxes {channels}x{height}x{width} {output_size}x{output_size} "
                f"sampling {sampling_ratio} aligned={aligned} {str(dtype).replace('torch.', '')}",
        "median_ms": {name: statistics.median(ts) for name, ts in times.items()},
        "max_abs_diff": {"output": (results["tvm_dcn"][0] - results["torchvision"][0]).abs().max().item(),
                         "grad_input": (results["tvm_dcn"][1] - results["torchvision"][1]).abs().max().item()},
    }
    summary["speedup"] = summary["median_ms"]["torchvision"] / summary["median_ms"]["tvm_dcn"]
    if log is not None:
        med = summary["median_ms"]
        log(f"{summary['case']}: tvm_dcn {med['tvm_dcn']:.1f} ms, torchvision {med['torchvision']:.1f} ms "
            f"({summary['speedup']:.1f}x); max |diff| output {summary['max_abs_diff']['output']:.2g}, "
            f"grad {summary['max_abs_diff']['grad_input']:.2g}")
    return summary
