"""PyTorch entry points for the RoI pooling family: torchvision's ``roi_align``, ``roi_pool``,
``ps_roi_align``, ``ps_roi_pool``; mmcv's ``deform_roi_pool`` (plain and modulated) and the
Deformable-ConvNets ``deform_psroi_pool``; their ``nn.Module`` wrappers; forward and backward on
the CPU or a CUDA GPU (the input's device; boxes and parameters must be on it too) through
tvm-dcn kernels.

Each operator is a ``torch.library`` operator in the ``tvm_dcn`` namespace, defined in the library
of :mod:`tvm_dcn.functional` and registered the same way as ``deform_conv2d``: CPU and CUDA
kernels, a fake implementation (``torch.compile``, ``torch.export``) and autograd
(``torch.library.register_autograd``), e.g. ``torch.ops.tvm_dcn.roi_align_forward(input, rois,
spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned)`` with torchvision's argument
order, and ``..._backward`` operators for the gradients (double backward raises). The functions
validate their arguments and call the operator; eager calls with nothing to differentiate call
its kernel implementation directly (``functional.is_plain_eager_call``). The forward operators
validate their arguments too: TorchScript (the functions take torchvision's annotations and,
scripted, call the operators) and direct callers reach them without the functions. For
``torch.fx`` each function is one leaf node (``torch.fx.wrap``).

Boxes are ``Tensor[K, 5]`` rows (batch index, x1, y1, x2, y2) or a list of ``Tensor[L, 4]`` (one per
image), as in torchvision. Kernels are compiled per feature-map shape and *bucket* of box counts
(16, 24, 32, 48, 64, ...; see ``tvm_dcn.ops.roi_align.roi_bucket``): a call pads its boxes with
rows that every stage skips, so a new box count rarely recompiles. Adaptive sampling
(``sampling_ratio <= 0``) loops up to a bound measured from the boxes and bucketed to a power of
two, masking the samples a box does not have.

Validation: empty box sets give empty outputs (and zero gradients); boxes outside the image and
degenerate boxes follow the operators' definitions; wrong box shapes raise ``BoxFormatError``
(a ``ValueError`` and, as torchvision's box checks, an ``AssertionError``) naming the argument;
batch indices outside [0, N) and non-finite boxes raise ``ArgumentValueError`` (``ValueError``
and, as torchvision's errors, ``RuntimeError``) in the operators (the checks read the box values,
so they run with the kernels).

Dtypes: float32, float64, bfloat16 and float16 (the last two through the float32 kernels, results
and gradients in the half dtype, ``functional``); ``offset`` and ``mask`` must have the input's
dtype, boxes may have any real dtype (used in the kernels' dtype: float32 boxes stay exact for a
half-precision input). Under ``torch.autocast`` the operators and functions follow torchvision's
rule for its RoI operators: compute in float32, return the input's dtype. (Running them in the
autocast dtype would gain nothing, as the kernels compute in float32 anyway, and a float32 feature
map keeps its float32 result, as with torchvision.)
"""
from __future__ import annotations

import functools
import math
import statistics
import time
from numbers import Real
from typing import Callable, List, Optional, Sequence, Union

import torch
from torch import nn
from torch.jit.annotations import BroadcastingList2

from . import kernel as _kernel
from ._torch_utils import (ArgumentTypeError, ArgumentValueError, BoxFormatError, BoxTypeError, autocast_cast,
                           autocast_dtype, check_tensor, int_pair_argument, kernel_dtype)
from ._utils import IntPair
from .functional import LIBRARY, device_target, implements, implements_autocast, is_plain_eager_call, kernel_arg
from .ops.deform_roi_pool import deform_psroi_pool_workload, deform_roi_pool_workload
from .ops.roi_align import (MAX_GRID, grid_bucket, ps_roi_align_workload, roi_align_workload, roi_bucket,
                            roi_pool_workload)

Boxes = Union[torch.Tensor, List[torch.Tensor]]  # (also a tuple of tensors, outside TorchScript)

_INT32_MAX = 2**31 - 1
# |coordinate * spatial_scale| beyond this is refused: the kernels convert coordinates to int32.
_MAX_COORDINATE = 2.0**24


# --------------------------------------------------------------------------------------------
# Validation: arguments (in the functions; traceable) and box values (in the operators)


def _check_input(input, name: str = "input") -> None:
    check_tensor(input, name, 4)
    device_target(input.device, name)
    if input.shape[2] == 0 or input.shape[3] == 0:
        raise ArgumentValueError(f"{name} has an empty spatial size {tuple(input.shape[2:])}")


def _output_size(value, name: str = "output_size") -> tuple[int, int]:
    items = int_pair_argument(value, name)
    if min(items) < 1:
        raise ArgumentValueError(f"{name} must be positive, got {value!r}")
    return items


def _real(value, name: str, positive: bool = False) -> float:
    """``value`` as a finite float (positive if asked), else TypeError/ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise ArgumentTypeError(f"{name} must be a real number, got {value!r}")
    value = float(value)
    if not math.isfinite(value) or (positive and value <= 0):
        raise ArgumentValueError(f"{name} must be finite{' and positive' if positive else ''}, got {value!r}")
    return value


def _int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ArgumentTypeError(f"{name} must be an int, got {value!r}")
    return value


def _rois(boxes: Boxes, input: torch.Tensor, name: str = "boxes") -> torch.Tensor:
    """``boxes`` as a detached (K, 5) tensor of the dtype of the input's kernels (float32 for a
    half-precision input: its boxes keep their precision); shapes and types validated here, values
    by the operators (:func:`_check_box_values`)."""
    dtype = kernel_dtype(input.dtype)
    if isinstance(boxes, torch.Tensor):
        if boxes.dim() != 2 or boxes.shape[1] != 5:
            raise BoxFormatError(f"{name} must be a Tensor[K, 5] (batch index, x1, y1, x2, y2) or a list of "
                                 f"Tensor[L, 4], got a tensor of shape {tuple(boxes.shape)}")
        return _as_float(boxes, name, dtype, input)
    if isinstance(boxes, (list, tuple)):
        parts = []
        for i, b in enumerate(boxes):
            if not isinstance(b, torch.Tensor):
                raise BoxTypeError(f"{name}[{i}] must be a torch.Tensor, got {type(b).__name__}")
            if b.dim() != 2 or b.shape[1] != 4:
                raise BoxFormatError(f"{name}[{i}] must be a Tensor[L, 4] (x1, y1, x2, y2), got shape {tuple(b.shape)}")
            b = _as_float(b, f"{name}[{i}]", dtype, input)
            parts.append(torch.cat([torch.full((b.shape[0], 1), float(i), dtype=dtype, device=b.device), b], dim=1))
        return torch.cat(parts) if parts else input.new_zeros(0, 5, dtype=dtype)
    raise BoxTypeError(f"{name} must be a Tensor[K, 5] or a list of Tensor[L, 4], got {type(boxes).__name__}")


def _as_float(t: torch.Tensor, name: str, dtype, input: torch.Tensor) -> torch.Tensor:
    if t.dtype == torch.bool or t.is_complex():
        raise BoxTypeError(f"{name} has dtype {t.dtype}; boxes must be real numbers")
    if t.device != input.device:
        raise ArgumentValueError(f"{name} is on {t.device} but input is on {input.device}; boxes must be on the "
                                 "input's device")
    return t.detach().to(dtype)


def _check_box_values(rois: torch.Tensor, batch: int, spatial_scale: float, name: str) -> None:
    """The values of (K, 5) ``rois`` (an operator's argument): finite, batch indices in [0, batch),
    coordinates the kernels can convert to int32."""
    if rois.dim() != 2 or rois.shape[1] != 5:
        raise BoxFormatError(f"{name} must be a Tensor[K, 5] (batch index, x1, y1, x2, y2), got shape "
                             f"{tuple(rois.shape)}")
    if rois.shape[0] == 0:
        return
    if not torch.isfinite(rois).all():
        raise ArgumentValueError(f"{name} contains non-finite values")
    batch_index = rois[:, 0].trunc()  # torchvision converts with a C cast
    bad = (batch_index < 0) | (batch_index >= batch)
    if bad.any():
        k = int(bad.nonzero()[0])
        raise ArgumentValueError(f"{name}: box {k} has batch index {rois[k, 0].item():g}, outside [0, {batch}) "
                         f"for an input of batch size {batch}")
    if (rois[:, 1:].abs() * spatial_scale).max() > _MAX_COORDINATE:
        raise ArgumentValueError(f"{name}: coordinates times spatial_scale exceed {_MAX_COORDINATE:g} pixels")


def _check_param(t, name: str, shape: tuple, input: torch.Tensor) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise ArgumentTypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
    if t.dtype != input.dtype:
        raise ArgumentTypeError(f"{name} has dtype {t.dtype} but input has {input.dtype}; they must match")
    if t.device != input.device:
        raise ArgumentValueError(f"{name} is on {t.device} but input is on {input.device}")
    if tuple(t.shape) != shape:
        raise ArgumentValueError(f"{name} has shape {tuple(t.shape)}; expected {shape}")
    return t


def _check_size(shape: tuple, out_numel: int) -> None:
    if max(math.prod(shape), out_numel) > _INT32_MAX:
        raise ArgumentValueError(f"input of shape {shape} is too large for one kernel call "
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
            raise ArgumentValueError(f"adaptive sampling (sampling_ratio <= 0) would take {needed} samples per bin "
                                     f"and axis for the largest box (limit {MAX_GRID}); pass a positive "
                                     "sampling_ratio")
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
# Plans: the kernels and padded arguments of one operator call


class _Plan:
    """Padded RoIs and scalars of one call on a feature map of ``shape``, results of the dtype and
    device of ``like``; subclasses run the forward and backward kernels. The kernels run in
    ``kernel_dtype``: half-precision tensors are converted to float32 for them (``kernel_tensor``)
    and their results back (``result``)."""

    def __init__(self, shape: Sequence[int], like: torch.Tensor, rois: torch.Tensor, scalars: Sequence[float],
                 out_channels: int, output_size: tuple[int, int], name: str):
        self.shape = tuple(int(v) for v in shape)
        _check_box_values(rois, self.shape[0], scalars[0], name)
        dtype = kernel_dtype(like.dtype)
        self.boxes = rois = rois.to(dtype)  # (K, 5), as the kernels read them
        self.like = like
        self.num_rois = rois.shape[0]
        self.rows = roi_bucket(self.num_rois)
        self.output_size = (int(output_size[0]), int(output_size[1]))
        self.out_channels = out_channels
        self.target = device_target(like.device)
        padded = like.new_zeros(self.rows, 5, dtype=dtype)
        padded[:, 0] = -1  # padding rows: skipped by every stage
        padded[: self.num_rois] = rois
        self.rois = padded
        self.scalars = torch.tensor(list(scalars), dtype=dtype, device=like.device)
        _check_size(self.shape, self.rows * out_channels * self.output_size[0] * self.output_size[1])

    @property
    def empty(self) -> bool:
        n, c = self.shape[:2]
        return self.num_rois == 0 or self.out_channels == 0 or n == 0 or c == 0

    def geometry(self) -> dict:
        n, c, h, w = self.shape
        return dict(batch=n, channels=c, height=h, width=w, num_rois=self.num_rois, dtype=_dtype_name(self.rois))

    def output_shape(self, rows: int) -> tuple:
        return (rows, self.out_channels) + self.output_size

    def empty_output(self) -> torch.Tensor:
        return self.like.new_zeros(self.output_shape(self.num_rois))

    def zero_grad_input(self) -> torch.Tensor:
        return self.like.new_zeros(self.shape)

    def kernel_tensor(self, t: torch.Tensor) -> torch.Tensor:
        """Floating-point ``t`` in the kernels' dtype."""
        return t if t.dtype == self.rois.dtype else t.to(self.rois.dtype)

    def result(self, t: torch.Tensor) -> torch.Tensor:
        """A kernel's floating-point result in the dtype of the call's results."""
        return t if t.dtype == self.like.dtype else t.to(self.like.dtype)

    def flat_input(self, input: torch.Tensor) -> torch.Tensor:
        n, c, h, w = self.shape
        return kernel_arg(self.kernel_tensor(input)).view(n, c, h * w)

    def padded(self, t: torch.Tensor, shape_tail: tuple) -> torch.Tensor:
        """``t`` (K, ...) as a kernel argument with ``rows`` rows (zeros below)."""
        t = t.reshape((self.num_rois,) + shape_tail)
        if self.num_rois == self.rows:
            return kernel_arg(t)
        out = t.new_zeros((self.rows,) + shape_tail)
        out[: self.num_rois] = t
        return out

    def padded_grad(self, grad: torch.Tensor) -> torch.Tensor:
        return self.padded(self.kernel_tensor(grad), self.output_shape(self.rows)[1:])

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


class _AlignPlan(_Plan):
    """RoI Align (``position_sensitive=False``) and PS RoI Align."""

    def __init__(self, shape, like, rois, output_size, spatial_scale, sampling_ratio, aligned, position_sensitive):
        bins = output_size[0] * output_size[1]
        channels = shape[1] // bins if position_sensitive else shape[1]
        super().__init__(shape, like, rois, [spatial_scale], channels, output_size, "boxes")
        shift, min_size = (0.5, None) if aligned else (0.0, 1.0)
        grid = None if sampling_ratio > 0 else _adaptive_grid(self.boxes, spatial_scale, self.output_size, shift,
                                                              min_size)
        params = dict(self.geometry(), output_size=self.output_size, sampling_ratio=sampling_ratio, max_grid=grid)
        if position_sensitive:
            self.workloads = [ps_roi_align_workload(**params, backward=b) for b in (False, True)]
        else:
            self.workloads = [roi_align_workload(**params, aligned=aligned, backward=b) for b in (False, True)]

    def forward(self, input):
        if self.empty:
            return self.empty_output()
        out = self.run_forward(self.workloads[0], [self.flat_input(input), self.rois, self.scalars])
        return self.result(out[: self.num_rois])

    def backward(self, grad):
        if self.empty:
            return self.zero_grad_input()
        grad_input = self.grad_input_buffer()
        self.kernel(self.workloads[1])(self.padded_grad(grad), self.rois, self.scalars, grad_input)
        return self.result(grad_input.view(self.shape))


class _PoolPlan(_Plan):
    """RoI Pool (max, with the argmax for the backward) and PS RoI Pool (average)."""

    def __init__(self, shape, like, rois, output_size, spatial_scale, position_sensitive):
        bins = output_size[0] * output_size[1]
        channels = shape[1] // bins if position_sensitive else shape[1]
        super().__init__(shape, like, rois, [spatial_scale], channels, output_size, "boxes")
        self.position_sensitive = position_sensitive
        params = dict(self.geometry(), output_size=self.output_size,
                      max_roi_size=_max_roi_size(self.boxes, spatial_scale),
                      position_sensitive=position_sensitive)
        self.workloads = [roi_pool_workload(**params, backward=b) for b in (False, True)]

    def forward(self, input):  # -> (output, argmax or None)
        if self.empty:
            out = self.empty_output()
            return out, (None if self.position_sensitive else out.new_full(out.shape, -1, dtype=torch.int32))
        args = [self.flat_input(input), self.rois, self.scalars]
        if self.position_sensitive:
            return self.result(self.run_forward(self.workloads[0], args)[: self.num_rois]), None
        argmax = self.rois.new_empty(self.output_shape(self.rows), dtype=torch.int32)
        out = self.run_forward(self.workloads[0], args, [argmax])
        return self.result(out[: self.num_rois]), argmax[: self.num_rois]

    def backward(self, grad, argmax=None):
        if self.empty:
            return self.zero_grad_input()
        grad_input = self.grad_input_buffer()
        kern = self.kernel(self.workloads[1])
        if self.position_sensitive:
            kern(self.padded_grad(grad), self.rois, self.scalars, grad_input)
        else:
            _check_argmax(argmax, self.output_shape(self.num_rois), self.shape[2] * self.shape[3])
            kern(self.padded_grad(grad), self.padded(argmax, self.output_shape(self.rows)[1:]), self.rois, grad_input)
        return self.result(grad_input.view(self.shape))


def _check_argmax(argmax: torch.Tensor, shape: tuple, pixels: int) -> None:
    """RoI Pool's backward scatters to ``argmax``: it must be the forward's (indices in [-1, H * W))."""
    if argmax.dtype != torch.int32 or tuple(argmax.shape) != shape:
        raise ArgumentValueError(f"argmax must be the int32 {shape} tensor roi_pool_forward returned, got "
                                 f"{argmax.dtype} {tuple(argmax.shape)}")
    if argmax.numel() and (argmax.min() < -1 or argmax.max() >= pixels):
        raise ArgumentValueError(f"argmax has indices outside [-1, {pixels}); it must be the one roi_pool_forward "
                                 "returned")


class _DeformPlan(_Plan):
    """mmcv's deform_roi_pool, plain or modulated."""

    def __init__(self, shape, like, rois, output_size, spatial_scale, sampling_ratio, gamma, with_offset, with_mask):
        super().__init__(shape, like, rois, [spatial_scale, gamma], shape[1], output_size, "rois")
        grid = None if sampling_ratio > 0 else _adaptive_grid(self.boxes, spatial_scale, self.output_size, 0.5, None)
        params = dict(self.geometry(), output_size=self.output_size, sampling_ratio=sampling_ratio, max_grid=grid,
                      with_offset=with_offset, with_mask=with_mask)
        self.workloads = {b: deform_roi_pool_workload(**params, backward=b) for b in (None, "input", "params")}

    def _params(self, offset, mask) -> list:
        ph, pw = self.output_size
        args = [self.rois]
        if offset is not None:
            args.append(self.padded(self.kernel_tensor(offset), (2, ph, pw)))
        if mask is not None:
            args.append(self.padded(self.kernel_tensor(mask), (ph, pw)))
        return args + [self.scalars]

    def forward(self, input, offset, mask):
        if self.empty:
            return self.empty_output()
        out = self.run_forward(self.workloads[None], [self.flat_input(input)] + self._params(offset, mask))
        return self.result(out[: self.num_rois])

    def backward(self, grad, needs, input, offset, mask):
        """Gradients (input, offset, mask) for the flags ``needs`` (None where not needed or absent)."""
        need_input, need_offset, need_mask = needs
        need_offset, need_mask = need_offset and offset is not None, need_mask and mask is not None
        if self.empty:
            return tuple(torch.zeros_like(t, memory_format=torch.contiguous_format) if need else None
                         for t, need in ((input, need_input), (offset, need_offset), (mask, need_mask)))
        grad_out = self.padded_grad(grad)
        params = self._params(offset, mask)
        grad_input = grad_offset = grad_mask = None
        if need_input:
            grad_input = self.grad_input_buffer()
            self.kernel(self.workloads["input"])(grad_out, *params, grad_input)
            grad_input = self.result(grad_input.view(self.shape))
        if need_offset or need_mask:
            ph, pw = self.output_size
            outs = ([self.rois.new_empty(self.rows, 2, ph, pw)] if offset is not None else []) + \
                   ([self.rois.new_empty(self.rows, ph, pw)] if mask is not None else [])
            self.kernel(self.workloads["params"])(grad_out, self.flat_input(input), *params, *outs)
            if need_offset:
                grad_offset = self.result(outs[0][: self.num_rois].reshape(offset.shape))
            if need_mask:
                grad_mask = self.result(outs[-1][: self.num_rois].reshape(mask.shape))
        return grad_input, grad_offset, grad_mask


class _PSDeformPlan(_Plan):
    """Deformable position-sensitive RoI pooling (Deformable-ConvNets)."""

    def __init__(self, shape, like, rois, spatial_scale, trans_std, output_dim, group_size, pooled_size, part_size,
                 sample_per_part, num_classes, no_trans):
        super().__init__(shape, like, rois, [spatial_scale, trans_std], output_dim, (pooled_size, pooled_size),
                         "rois")
        self.part_size, self.num_classes = part_size, num_classes
        params = dict(self.geometry(), output_dim=output_dim, group_size=group_size, pooled_size=pooled_size,
                      part_size=part_size, sample_per_part=sample_per_part, num_classes=num_classes,
                      no_trans=no_trans)
        self.workloads = {b: deform_psroi_pool_workload(**params, backward=b) for b in (None, "input", "params")}

    def _params(self, trans) -> list:
        args = [self.rois]
        if trans is not None:
            args.append(self.padded(self.kernel_tensor(trans), (2 * self.num_classes, self.part_size, self.part_size)))
        return args + [self.scalars]

    def forward(self, input, trans):
        if self.empty:
            return self.empty_output()
        out = self.run_forward(self.workloads[None], [self.flat_input(input)] + self._params(trans))
        return self.result(out[: self.num_rois])

    def backward(self, grad, needs, input, trans):
        """Gradients (input, trans) for the flags ``needs`` (None where not needed or absent)."""
        need_input, need_trans = needs[0], needs[1] and trans is not None
        if self.empty:
            return tuple(torch.zeros_like(t, memory_format=torch.contiguous_format) if need else None
                         for t, need in ((input, need_input), (trans, need_trans)))
        grad_out = self.padded_grad(grad)
        params = self._params(trans)
        grad_input = grad_trans = None
        if need_input:
            grad_input = self.grad_input_buffer()
            self.kernel(self.workloads["input"])(grad_out, *params, grad_input)
            grad_input = self.result(grad_input.view(self.shape))
        if need_trans:
            part = self.part_size
            out = self.rois.new_empty(self.rows, 2 * self.num_classes, part, part)
            self.kernel(self.workloads["params"])(grad_out, self.flat_input(input), *params, out)
            grad_trans = self.result(out[: self.num_rois])
        return grad_input, grad_trans


# --------------------------------------------------------------------------------------------
# Operators: torch.ops.tvm_dcn.*_forward / *_backward (kernels, fake implementations, autograd)

_SHAPE_ARGS = "SymInt batch_size, SymInt channels, SymInt height, SymInt width"
LIBRARY.define("roi_align_forward(Tensor input, Tensor rois, float spatial_scale, int pooled_height, "
               "int pooled_width, int sampling_ratio, bool aligned) -> Tensor")
LIBRARY.define("roi_align_backward(Tensor grad, Tensor rois, float spatial_scale, int pooled_height, "
               f"int pooled_width, {_SHAPE_ARGS}, int sampling_ratio, bool aligned) -> Tensor")
LIBRARY.define("ps_roi_align_forward(Tensor input, Tensor rois, float spatial_scale, int pooled_height, "
               "int pooled_width, int sampling_ratio) -> Tensor")
LIBRARY.define("ps_roi_align_backward(Tensor grad, Tensor rois, float spatial_scale, int pooled_height, "
               f"int pooled_width, int sampling_ratio, {_SHAPE_ARGS}) -> Tensor")
LIBRARY.define("roi_pool_forward(Tensor input, Tensor rois, float spatial_scale, int pooled_height, "
               "int pooled_width) -> (Tensor, Tensor)")
LIBRARY.define("roi_pool_backward(Tensor grad, Tensor rois, Tensor argmax, float spatial_scale, int pooled_height, "
               f"int pooled_width, {_SHAPE_ARGS}) -> Tensor")
LIBRARY.define("ps_roi_pool_forward(Tensor input, Tensor rois, float spatial_scale, int pooled_height, "
               "int pooled_width) -> Tensor")
LIBRARY.define("ps_roi_pool_backward(Tensor grad, Tensor rois, float spatial_scale, int pooled_height, "
               f"int pooled_width, {_SHAPE_ARGS}) -> Tensor")
LIBRARY.define("deform_roi_pool_forward(Tensor input, Tensor rois, Tensor? offset, Tensor? mask, int pooled_height, "
               "int pooled_width, float spatial_scale, int sampling_ratio, float gamma) -> Tensor")
LIBRARY.define("deform_roi_pool_backward(Tensor grad, Tensor input, Tensor rois, Tensor? offset, Tensor? mask, "
               "int pooled_height, int pooled_width, float spatial_scale, int sampling_ratio, float gamma, "
               "bool[] needs) -> (Tensor, Tensor, Tensor)")
LIBRARY.define("deform_psroi_pool_forward(Tensor input, Tensor rois, Tensor? offset, float spatial_scale, "
               "int output_dim, int group_size, int pooled_size, int part_size, int sample_per_part, "
               "float trans_std) -> Tensor")
LIBRARY.define("deform_psroi_pool_backward(Tensor grad, Tensor input, Tensor rois, Tensor? offset, "
               "float spatial_scale, int output_dim, int group_size, int pooled_size, int part_size, "
               "int sample_per_part, float trans_std, bool[] needs) -> (Tensor, Tensor)")


def _no_double_backward(ctx, *grads):
    raise RuntimeError("tvm_dcn RoI operators: double backward (differentiating their gradients) is not supported")


def _unneeded(t: Optional[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """A gradient a backward operator does not compute: an empty tensor (custom-op outputs are tensors)."""
    return like.new_empty(0) if t is None else t


def _pooled_channels(channels, output_size, position_sensitive: bool):
    return channels // (output_size[0] * output_size[1]) if position_sensitive else channels


# RoI Align and PS RoI Align.

def _roi_align_forward(input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned):
    plan = _AlignPlan(input.shape, input, rois, (pooled_height, pooled_width), spatial_scale, sampling_ratio, aligned,
                      False)
    return plan.forward(input)


@implements("roi_align_forward")
def _roi_align_operator(input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned):
    _check_operator_input(input, pooled_height, pooled_width, spatial_scale)
    return _roi_align_forward(input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned)


@implements("roi_align_backward")
def _roi_align_backward(grad, rois, spatial_scale, pooled_height, pooled_width, batch_size, channels, height, width,
                        sampling_ratio, aligned):
    plan = _AlignPlan((batch_size, channels, height, width), grad, rois, (pooled_height, pooled_width), spatial_scale,
                      sampling_ratio, aligned, False)
    return plan.backward(grad)


def _ps_roi_align_forward(input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio):
    plan = _AlignPlan(input.shape, input, rois, (pooled_height, pooled_width), spatial_scale, sampling_ratio, True,
                      True)
    return plan.forward(input)


@implements("ps_roi_align_forward")
def _ps_roi_align_operator(input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio):
    _check_operator_input(input, pooled_height, pooled_width, spatial_scale, position_sensitive=True)
    return _ps_roi_align_forward(input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio)


@implements("ps_roi_align_backward")
def _ps_roi_align_backward(grad, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, batch_size,
                           channels, height, width):
    plan = _AlignPlan((batch_size, channels, height, width), grad, rois, (pooled_height, pooled_width), spatial_scale,
                      sampling_ratio, True, True)
    return plan.backward(grad)


@torch.library.register_fake("tvm_dcn::roi_align_forward")
def _(input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned):
    return input.new_empty((rois.shape[0], input.shape[1], pooled_height, pooled_width))


@torch.library.register_fake("tvm_dcn::ps_roi_align_forward")
def _(input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio):
    channels = _pooled_channels(input.shape[1], (pooled_height, pooled_width), True)
    return input.new_empty((rois.shape[0], channels, pooled_height, pooled_width))


@torch.library.register_fake("tvm_dcn::roi_align_backward")
def _(grad, rois, spatial_scale, pooled_height, pooled_width, batch_size, channels, height, width, sampling_ratio,
      aligned):
    return grad.new_empty((batch_size, channels, height, width))


@torch.library.register_fake("tvm_dcn::ps_roi_align_backward")
def _(grad, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, batch_size, channels, height, width):
    return grad.new_empty((batch_size, channels, height, width))


def _save_rois(ctx, inputs, output):
    """setup_context of the operators whose backward needs the boxes and the input's shape."""
    input, rois, *params = inputs
    ctx.save_for_backward(rois)
    ctx.params, ctx.input_shape = params, tuple(input.shape)


def _roi_align_grad(ctx, grad):
    grad_input = None
    if ctx.needs_input_grad[0]:
        (rois,) = ctx.saved_tensors
        spatial_scale, ph, pw, sampling_ratio, aligned = ctx.params
        grad_input = torch.ops.tvm_dcn.roi_align_backward.default(grad, rois, spatial_scale, ph, pw, *ctx.input_shape,
                                                                  sampling_ratio, aligned)
    return grad_input, None, None, None, None, None, None


def _ps_roi_align_grad(ctx, grad):
    grad_input = None
    if ctx.needs_input_grad[0]:
        (rois,) = ctx.saved_tensors
        spatial_scale, ph, pw, sampling_ratio = ctx.params
        grad_input = torch.ops.tvm_dcn.ps_roi_align_backward.default(grad, rois, spatial_scale, ph, pw,
                                                                     sampling_ratio, *ctx.input_shape)
    return grad_input, None, None, None, None, None


torch.library.register_autograd("tvm_dcn::roi_align_forward", _roi_align_grad, setup_context=_save_rois)
torch.library.register_autograd("tvm_dcn::ps_roi_align_forward", _ps_roi_align_grad, setup_context=_save_rois)


# RoI Pool and PS RoI Pool.

def _roi_pool_forward(input, rois, spatial_scale, pooled_height, pooled_width):
    plan = _PoolPlan(input.shape, input, rois, (pooled_height, pooled_width), spatial_scale, False)
    return plan.forward(input)


@implements("roi_pool_forward")
def _roi_pool_operator(input, rois, spatial_scale, pooled_height, pooled_width):
    _check_operator_input(input, pooled_height, pooled_width, spatial_scale)
    return _roi_pool_forward(input, rois, spatial_scale, pooled_height, pooled_width)


@implements("roi_pool_backward")
def _roi_pool_backward(grad, rois, argmax, spatial_scale, pooled_height, pooled_width, batch_size, channels, height,
                       width):
    plan = _PoolPlan((batch_size, channels, height, width), grad, rois, (pooled_height, pooled_width), spatial_scale,
                     False)
    return plan.backward(grad, argmax)


def _ps_roi_pool_forward(input, rois, spatial_scale, pooled_height, pooled_width):
    plan = _PoolPlan(input.shape, input, rois, (pooled_height, pooled_width), spatial_scale, True)
    return plan.forward(input)[0]


@implements("ps_roi_pool_forward")
def _ps_roi_pool_operator(input, rois, spatial_scale, pooled_height, pooled_width):
    _check_operator_input(input, pooled_height, pooled_width, spatial_scale, position_sensitive=True)
    return _ps_roi_pool_forward(input, rois, spatial_scale, pooled_height, pooled_width)


@implements("ps_roi_pool_backward")
def _ps_roi_pool_backward(grad, rois, spatial_scale, pooled_height, pooled_width, batch_size, channels, height, width):
    plan = _PoolPlan((batch_size, channels, height, width), grad, rois, (pooled_height, pooled_width), spatial_scale,
                     True)
    return plan.backward(grad)


@torch.library.register_fake("tvm_dcn::roi_pool_forward")
def _(input, rois, spatial_scale, pooled_height, pooled_width):
    shape = (rois.shape[0], input.shape[1], pooled_height, pooled_width)
    return input.new_empty(shape), input.new_empty(shape, dtype=torch.int32)


@torch.library.register_fake("tvm_dcn::ps_roi_pool_forward")
def _(input, rois, spatial_scale, pooled_height, pooled_width):
    channels = _pooled_channels(input.shape[1], (pooled_height, pooled_width), True)
    return input.new_empty((rois.shape[0], channels, pooled_height, pooled_width))


@torch.library.register_fake("tvm_dcn::roi_pool_backward")
def _(grad, rois, argmax, spatial_scale, pooled_height, pooled_width, batch_size, channels, height, width):
    return grad.new_empty((batch_size, channels, height, width))


@torch.library.register_fake("tvm_dcn::ps_roi_pool_backward")
def _(grad, rois, spatial_scale, pooled_height, pooled_width, batch_size, channels, height, width):
    return grad.new_empty((batch_size, channels, height, width))


def _roi_pool_setup(ctx, inputs, output):
    input, rois, *params = inputs
    ctx.save_for_backward(rois, output[1])
    ctx.params, ctx.input_shape = params, tuple(input.shape)


def _roi_pool_grad(ctx, grad, grad_argmax):
    grad_input = None
    if ctx.needs_input_grad[0]:
        rois, argmax = ctx.saved_tensors
        spatial_scale, ph, pw = ctx.params
        grad_input = torch.ops.tvm_dcn.roi_pool_backward.default(grad, rois, argmax, spatial_scale, ph, pw,
                                                                 *ctx.input_shape)
    return grad_input, None, None, None, None


def _ps_roi_pool_grad(ctx, grad):
    grad_input = None
    if ctx.needs_input_grad[0]:
        (rois,) = ctx.saved_tensors
        spatial_scale, ph, pw = ctx.params
        grad_input = torch.ops.tvm_dcn.ps_roi_pool_backward.default(grad, rois, spatial_scale, ph, pw, *ctx.input_shape)
    return grad_input, None, None, None, None


torch.library.register_autograd("tvm_dcn::roi_pool_forward", _roi_pool_grad, setup_context=_roi_pool_setup)
torch.library.register_autograd("tvm_dcn::ps_roi_pool_forward", _ps_roi_pool_grad, setup_context=_save_rois)


# Deformable RoI pooling (mmcv) and deformable PS RoI pooling (Deformable-ConvNets).

def _deform_plan(input, rois, offset, mask, pooled_height, pooled_width, spatial_scale, sampling_ratio, gamma):
    return _DeformPlan(input.shape, input, rois, (pooled_height, pooled_width), spatial_scale, sampling_ratio, gamma,
                       offset is not None, mask is not None)


def _deform_roi_pool_forward(input, rois, offset, mask, pooled_height, pooled_width, spatial_scale, sampling_ratio,
                             gamma):
    plan = _deform_plan(input, rois, offset, mask, pooled_height, pooled_width, spatial_scale, sampling_ratio, gamma)
    return plan.forward(input, offset, mask)


@implements("deform_roi_pool_forward")
def _deform_roi_pool_operator(input, rois, offset, mask, pooled_height, pooled_width, spatial_scale, sampling_ratio,
                              gamma):
    _check_operator_input(input, pooled_height, pooled_width, spatial_scale)
    _check_deform_params(input, rois.shape[0], offset, mask, (pooled_height, pooled_width))
    return _deform_roi_pool_forward(input, rois, offset, mask, pooled_height, pooled_width, spatial_scale,
                                    sampling_ratio, gamma)


@implements("deform_roi_pool_backward")
def _deform_roi_pool_backward(grad, input, rois, offset, mask, pooled_height, pooled_width, spatial_scale,
                              sampling_ratio, gamma, needs):
    plan = _deform_plan(input, rois, offset, mask, pooled_height, pooled_width, spatial_scale, sampling_ratio, gamma)
    return tuple(_unneeded(g, input) for g in plan.backward(grad, needs, input, offset, mask))


def _psroi_plan(input, rois, offset, spatial_scale, output_dim, group_size, pooled_size, part_size, sample_per_part,
                trans_std):
    num_classes = 1 if offset is None else offset.shape[1] // 2
    return _PSDeformPlan(input.shape, input, rois, spatial_scale, trans_std, output_dim, group_size, pooled_size,
                         part_size, sample_per_part, num_classes, offset is None)


def _deform_psroi_pool_forward(input, rois, offset, spatial_scale, output_dim, group_size, pooled_size, part_size,
                               sample_per_part, trans_std):
    plan = _psroi_plan(input, rois, offset, spatial_scale, output_dim, group_size, pooled_size, part_size,
                       sample_per_part, trans_std)
    return plan.forward(input, offset)


@implements("deform_psroi_pool_forward")
def _deform_psroi_pool_operator(input, rois, offset, spatial_scale, output_dim, group_size, pooled_size, part_size,
                                sample_per_part, trans_std):
    _check_operator_input(input, pooled_size, pooled_size, spatial_scale)
    _check_psroi_params(input, rois.shape[0], offset, output_dim, group_size, pooled_size, part_size, sample_per_part)
    return _deform_psroi_pool_forward(input, rois, offset, spatial_scale, output_dim, group_size, pooled_size,
                                      part_size, sample_per_part, trans_std)


@implements("deform_psroi_pool_backward")
def _deform_psroi_pool_backward(grad, input, rois, offset, spatial_scale, output_dim, group_size, pooled_size,
                                part_size, sample_per_part, trans_std, needs):
    plan = _psroi_plan(input, rois, offset, spatial_scale, output_dim, group_size, pooled_size, part_size,
                       sample_per_part, trans_std)
    return tuple(_unneeded(g, input) for g in plan.backward(grad, needs, input, offset))


@torch.library.register_fake("tvm_dcn::deform_roi_pool_forward")
def _(input, rois, offset, mask, pooled_height, pooled_width, spatial_scale, sampling_ratio, gamma):
    return input.new_empty((rois.shape[0], input.shape[1], pooled_height, pooled_width))


@torch.library.register_fake("tvm_dcn::deform_roi_pool_backward")
def _(grad, input, rois, offset, mask, pooled_height, pooled_width, spatial_scale, sampling_ratio, gamma, needs):
    return tuple(t.new_empty(t.shape) if need and t is not None else input.new_empty(0)
                 for t, need in zip((input, offset, mask), needs))


@torch.library.register_fake("tvm_dcn::deform_psroi_pool_forward")
def _(input, rois, offset, spatial_scale, output_dim, group_size, pooled_size, part_size, sample_per_part, trans_std):
    return input.new_empty((rois.shape[0], output_dim, pooled_size, pooled_size))


@torch.library.register_fake("tvm_dcn::deform_psroi_pool_backward")
def _(grad, input, rois, offset, spatial_scale, output_dim, group_size, pooled_size, part_size, sample_per_part,
      trans_std, needs):
    return tuple(t.new_empty(t.shape) if need and t is not None else input.new_empty(0)
                 for t, need in zip((input, offset), needs))


def _deform_setup(optional: int):
    """setup_context of a deformable pooling: saves input, rois and its ``optional`` optional tensors
    (None where absent); the scalar arguments after them go to the backward operator."""
    def setup(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:2 + optional])
        ctx.params = inputs[2 + optional:]
    return setup


def _deform_roi_pool_grad(ctx, grad):
    needs = [ctx.needs_input_grad[0], ctx.needs_input_grad[2], ctx.needs_input_grad[3]]
    grads = [None, None, None]
    if any(needs):
        input, rois, offset, mask = ctx.saved_tensors
        out = torch.ops.tvm_dcn.deform_roi_pool_backward.default(grad, input, rois, offset, mask, *ctx.params, needs)
        grads = [g if need else None for g, need in zip(out, needs)]
    return grads[0], None, grads[1], grads[2], None, None, None, None, None


def _deform_psroi_pool_grad(ctx, grad):
    needs = [ctx.needs_input_grad[0], ctx.needs_input_grad[2]]
    grads = [None, None]
    if any(needs):
        input, rois, offset = ctx.saved_tensors
        out = torch.ops.tvm_dcn.deform_psroi_pool_backward.default(grad, input, rois, offset, *ctx.params, needs)
        grads = [g if need else None for g, need in zip(out, needs)]
    return grads[0], None, grads[1], None, None, None, None, None, None, None


torch.library.register_autograd("tvm_dcn::deform_roi_pool_forward", _deform_roi_pool_grad,
                                setup_context=_deform_setup(2))
torch.library.register_autograd("tvm_dcn::deform_psroi_pool_forward", _deform_psroi_pool_grad,
                                setup_context=_deform_setup(1))
for _name in ("roi_align", "ps_roi_align", "roi_pool", "ps_roi_pool", "deform_roi_pool", "deform_psroi_pool"):
    # Gradients computed with create_graph=True record the backward operator; differentiating them
    # raises, as torchvision does, instead of finding no path to the inputs.
    torch.library.register_autograd(f"tvm_dcn::{_name}_backward", _no_double_backward)
    # Under autocast, torchvision's rule for its RoI operators: float32 in, the input's dtype out.
    implements_autocast(f"{_name}_forward", float32=True)


def _float32_under_autocast(function):
    """The autocast rule of the RoI operators (``implements_autocast(..., float32=True)``) for the
    function that calls one: under ``torch.autocast``, its floating-point tensor arguments cast to
    float32 before the validation (which requires one dtype), the result in the input's dtype."""
    @functools.wraps(function)
    def call(input, *args, **kwargs):
        if autocast_dtype(input) is None:
            return function(input, *args, **kwargs)
        args = [autocast_cast(a, torch.float32) for a in args]
        kwargs = {k: autocast_cast(v, torch.float32) for k, v in kwargs.items()}
        return function(autocast_cast(input, torch.float32), *args, **kwargs).to(input.dtype)
    return call


# --------------------------------------------------------------------------------------------
# Functions


@_float32_under_autocast
def _roi_align(input: torch.Tensor, boxes: Boxes, output_size: IntPair, spatial_scale: float = 1.0,
              sampling_ratio: int = -1, aligned: bool = False) -> torch.Tensor:
    _check_input(input)
    ph, pw = _output_size(output_size)
    spatial_scale = _real(spatial_scale, "spatial_scale", positive=True)
    sampling_ratio = _int(sampling_ratio, "sampling_ratio")
    if not isinstance(aligned, bool):
        raise ArgumentTypeError(f"aligned must be a bool, got {aligned!r}")
    rois = _rois(boxes, input)
    if is_plain_eager_call(input):
        return _roi_align_forward(input, rois, spatial_scale, ph, pw, sampling_ratio, aligned)
    return torch.ops.tvm_dcn.roi_align_forward.default(input, rois, spatial_scale, ph, pw, sampling_ratio, aligned)


def _check_deform_params(input: torch.Tensor, k: int, offset, mask, output_size: tuple) -> None:
    """deform_roi_pool's optional offset (K, 2, PH, PW) and mask ((K, 1, PH, PW) or (K, PH, PW))."""
    if offset is not None:
        _check_param(offset, "offset", (k, 2) + tuple(output_size), input)
    if mask is not None:
        shape = (k, 1) + tuple(output_size) if isinstance(mask, torch.Tensor) and mask.dim() == 4 else \
            (k,) + tuple(output_size)
        _check_param(mask, "mask", shape, input)


def _check_psroi_params(input: torch.Tensor, k: int, offset, output_dim: int, group_size: int, pooled_size: int,
                        part_size: int, sample_per_part: int) -> None:
    """deform_psroi_pool's sizes, input channels and optional offset ("trans")."""
    for name, v in (("output_dim", output_dim), ("group_size", group_size), ("pooled_size", pooled_size),
                    ("part_size", part_size), ("sample_per_part", sample_per_part)):
        if v < 1:
            raise ArgumentValueError(f"{name} must be positive, got {v}")
    if input.shape[1] != output_dim * group_size * group_size:
        raise ArgumentValueError(f"input has {input.shape[1]} channels; expected output_dim * group_size**2 = "
                                 f"{output_dim * group_size * group_size}")
    if offset is None:
        return
    if not isinstance(offset, torch.Tensor) or offset.dim() != 4 or offset.shape[1] == 0 or offset.shape[1] % 2:
        got = tuple(offset.shape) if isinstance(offset, torch.Tensor) else type(offset).__name__
        raise ArgumentValueError(f"offset must be a (K, 2 * classes, part_size, part_size) tensor, got {got}")
    num_classes = offset.shape[1] // 2
    if output_dim % num_classes:
        raise ArgumentValueError(f"offset has {num_classes} classes (channels / 2), which do not divide "
                                 f"output_dim = {output_dim}")
    _check_param(offset, "offset", (k, 2 * num_classes, part_size, part_size), input)


def _check_operator_input(input: torch.Tensor, pooled_height: int, pooled_width: int, spatial_scale: float,
                          position_sensitive: bool = False) -> None:
    """The arguments a forward operator checks itself (TorchScript and direct callers reach it
    without the functions' validation)."""
    _check_input(input)
    _output_size((pooled_height, pooled_width), "pooled_height, pooled_width")
    _real(spatial_scale, "spatial_scale", positive=True)
    if position_sensitive:
        _check_ps_channels(input, (pooled_height, pooled_width))


def _check_ps_channels(input, output_size) -> None:
    bins = output_size[0] * output_size[1]
    if input.shape[1] % bins:
        raise ArgumentValueError(f"input has {input.shape[1]} channels, not a multiple of output_size[0] * "
                                 f"output_size[1] = {bins} (position-sensitive pooling reads one channel group per "
                                 "bin)")


@_float32_under_autocast
def _ps_roi_align(input: torch.Tensor, boxes: Boxes, output_size: IntPair, spatial_scale: float = 1.0,
                 sampling_ratio: int = -1) -> torch.Tensor:
    _check_input(input)
    ph, pw = _output_size(output_size)
    spatial_scale = _real(spatial_scale, "spatial_scale", positive=True)
    sampling_ratio = _int(sampling_ratio, "sampling_ratio")
    _check_ps_channels(input, (ph, pw))
    rois = _rois(boxes, input)
    if is_plain_eager_call(input):
        return _ps_roi_align_forward(input, rois, spatial_scale, ph, pw, sampling_ratio)
    return torch.ops.tvm_dcn.ps_roi_align_forward.default(input, rois, spatial_scale, ph, pw, sampling_ratio)


@_float32_under_autocast
def _roi_pool(input: torch.Tensor, boxes: Boxes, output_size: IntPair, spatial_scale: float = 1.0) -> torch.Tensor:
    _check_input(input)
    ph, pw = _output_size(output_size)
    spatial_scale = _real(spatial_scale, "spatial_scale", positive=True)
    rois = _rois(boxes, input)
    if is_plain_eager_call(input):
        return _roi_pool_forward(input, rois, spatial_scale, ph, pw)[0]
    return torch.ops.tvm_dcn.roi_pool_forward.default(input, rois, spatial_scale, ph, pw)[0]


@_float32_under_autocast
def _ps_roi_pool(input: torch.Tensor, boxes: Boxes, output_size: IntPair, spatial_scale: float = 1.0) -> torch.Tensor:
    _check_input(input)
    ph, pw = _output_size(output_size)
    spatial_scale = _real(spatial_scale, "spatial_scale", positive=True)
    _check_ps_channels(input, (ph, pw))
    rois = _rois(boxes, input)
    if is_plain_eager_call(input):
        return _ps_roi_pool_forward(input, rois, spatial_scale, ph, pw)
    return torch.ops.tvm_dcn.ps_roi_pool_forward.default(input, rois, spatial_scale, ph, pw)


@_float32_under_autocast
def _deform_roi_pool(input: torch.Tensor, rois: Boxes, offset: Optional[torch.Tensor], output_size: IntPair,
                    spatial_scale: float = 1.0, sampling_ratio: int = 0, gamma: float = 0.1,
                    mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    _check_input(input)
    output_size = _output_size(output_size)
    spatial_scale = _real(spatial_scale, "spatial_scale", positive=True)
    sampling_ratio = _int(sampling_ratio, "sampling_ratio")
    gamma = _real(gamma, "gamma")
    rois = _rois(rois, input, name="rois")
    _check_deform_params(input, rois.shape[0], offset, mask, output_size)
    args = (input, rois, offset, mask, *output_size, spatial_scale, sampling_ratio, gamma)
    if is_plain_eager_call(input, offset, mask):
        return _deform_roi_pool_forward(*args)
    return torch.ops.tvm_dcn.deform_roi_pool_forward.default(*args)


@_float32_under_autocast
def _deform_psroi_pool(input: torch.Tensor, rois: Boxes, offset: Optional[torch.Tensor], spatial_scale: float,
                      output_dim: int, group_size: int, pooled_size: int, part_size: Optional[int] = None,
                      sample_per_part: int = 4, trans_std: float = 0.0, no_trans: bool = False) -> torch.Tensor:
    _check_input(input)
    spatial_scale = _real(spatial_scale, "spatial_scale", positive=True)
    trans_std = _real(trans_std, "trans_std")
    output_dim, group_size, pooled_size = (_int(output_dim, "output_dim"), _int(group_size, "group_size"),
                                           _int(pooled_size, "pooled_size"))
    part_size = pooled_size if part_size is None or part_size == 0 else _int(part_size, "part_size")
    sample_per_part = _int(sample_per_part, "sample_per_part")
    if not isinstance(no_trans, bool):
        raise ArgumentTypeError(f"no_trans must be a bool, got {no_trans!r}")
    rois = _rois(rois, input, name="rois")
    if no_trans:
        offset = None
    elif offset is None:
        raise ArgumentValueError("offset is None but no_trans is False; pass no_trans=True to pool without offsets")
    _check_psroi_params(input, rois.shape[0], offset, output_dim, group_size, pooled_size, part_size, sample_per_part)
    args = (input, rois, offset, spatial_scale, output_dim, group_size, pooled_size, part_size, sample_per_part,
            trans_std)
    if is_plain_eager_call(input, offset):
        return _deform_psroi_pool_forward(*args)
    return torch.ops.tvm_dcn.deform_psroi_pool_forward.default(*args)


def _script_rois(boxes: Boxes, input: torch.Tensor) -> torch.Tensor:
    """TorchScript's conversion of ``boxes`` to (K, 5) rows (the operators validate them), in the
    dtype of the input's kernels (``kernel_dtype``: float32 for a half-precision input)."""
    dtype = input.dtype
    if dtype == torch.float16 or dtype == torch.bfloat16:
        dtype = torch.float32
    if isinstance(boxes, torch.Tensor):
        return boxes.to(dtype)
    parts: List[torch.Tensor] = []
    for i, b in enumerate(boxes):
        parts.append(torch.cat([torch.full_like(b[:, :1], float(i)), b], 1))
    if len(parts) == 0:
        return input.new_zeros([0, 5], dtype=dtype)
    return torch.cat(parts).to(dtype)


# The public functions: validated eager calls (above), or in TorchScript the operators directly
# (torch.ops.tvm_dcn.*: TorchScript compiles only the branch it runs).


def roi_align(input: torch.Tensor, boxes: Boxes, output_size: BroadcastingList2[int], spatial_scale: float = 1.0,
              sampling_ratio: int = -1, aligned: bool = False) -> torch.Tensor:
    """RoI Align, ``torchvision.ops.roi_align``'s signature and results: (K, C, PH, PW).

    Each bin averages a ``sampling_ratio`` x ``sampling_ratio`` grid of bilinear samples (adaptive,
    ``ceil(roi_size / output_size)``, when ``sampling_ratio <= 0``). ``aligned=True`` shifts the box
    by -0.5 pixel; ``aligned=False`` raises RoI sizes below 1 to 1.
    """
    if not torch.jit.is_scripting():
        return _roi_align(input, boxes, output_size, spatial_scale, sampling_ratio, aligned)
    return torch.ops.tvm_dcn.roi_align_forward(input, _script_rois(boxes, input), spatial_scale, output_size[0],
                                               output_size[1], sampling_ratio, aligned)


def ps_roi_align(input: torch.Tensor, boxes: Boxes, output_size: BroadcastingList2[int], spatial_scale: float = 1.0,
                 sampling_ratio: int = -1) -> torch.Tensor:
    """Position-sensitive RoI Align (``torchvision.ops.ps_roi_align``): (K, C / (PH * PW), PH, PW).

    Unlike torchvision, a degenerate box with adaptive sampling (no sample in its bins) gives 0,
    not NaN (torchvision divides 0 by a sample count of 0)."""
    if not torch.jit.is_scripting():
        return _ps_roi_align(input, boxes, output_size, spatial_scale, sampling_ratio)
    return torch.ops.tvm_dcn.ps_roi_align_forward(input, _script_rois(boxes, input), spatial_scale, output_size[0],
                                                  output_size[1], sampling_ratio)


def roi_pool(input: torch.Tensor, boxes: Boxes, output_size: BroadcastingList2[int],
             spatial_scale: float = 1.0) -> torch.Tensor:
    """RoI max pooling (``torchvision.ops.roi_pool``): (K, C, PH, PW); the gradient goes to the
    first maximum of each bin (row-major order); empty bins are 0."""
    if not torch.jit.is_scripting():
        return _roi_pool(input, boxes, output_size, spatial_scale)
    return torch.ops.tvm_dcn.roi_pool_forward(input, _script_rois(boxes, input), spatial_scale, output_size[0],
                                              output_size[1])[0]


def ps_roi_pool(input: torch.Tensor, boxes: Boxes, output_size: BroadcastingList2[int],
                spatial_scale: float = 1.0) -> torch.Tensor:
    """Position-sensitive RoI average pooling (``torchvision.ops.ps_roi_pool``): (K, C / (PH * PW), PH, PW).

    As torchvision's forward, bins are clipped to the first H - 1 rows and W - 1 columns. The
    gradient is that of this forward function; torchvision's backward clips to H and W instead,
    so the two differ for boxes that reach the last row or column."""
    if not torch.jit.is_scripting():
        return _ps_roi_pool(input, boxes, output_size, spatial_scale)
    return torch.ops.tvm_dcn.ps_roi_pool_forward(input, _script_rois(boxes, input), spatial_scale, output_size[0],
                                                 output_size[1])


def deform_roi_pool(input: torch.Tensor, rois: Boxes, offset: Optional[torch.Tensor],
                    output_size: BroadcastingList2[int], spatial_scale: float = 1.0, sampling_ratio: int = 0,
                    gamma: float = 0.1, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Deformable RoI pooling with mmcv's semantics: (K, C, PH, PW).

    RoI Align with the half-pixel shift (``x * spatial_scale - 0.5``, as mmcv) whose bin (ph, pw)
    moves by ``gamma * roi_width * offset[k, 0, ph, pw]`` along x and ``gamma * roi_height *
    offset[k, 1, ph, pw]`` along y. ``offset``: (K, 2, PH, PW) or None (zero offsets: then this is
    ``roi_align(..., aligned=True)``). ``mask`` (K, 1, PH, PW) or (K, PH, PW), optional: the
    modulated variant, which multiplies each bin by its mask value (``ModulatedDeformRoIPoolPack``).
    """
    if not torch.jit.is_scripting():
        return _deform_roi_pool(input, rois, offset, output_size, spatial_scale, sampling_ratio, gamma, mask)
    return torch.ops.tvm_dcn.deform_roi_pool_forward(input, _script_rois(rois, input), offset, mask, output_size[0],
                                                     output_size[1], spatial_scale, sampling_ratio, gamma)


def deform_psroi_pool(input: torch.Tensor, rois: Boxes, offset: Optional[torch.Tensor], spatial_scale: float,
                      output_dim: int, group_size: int, pooled_size: int, part_size: Optional[int] = None,
                      sample_per_part: int = 4, trans_std: float = 0.0, no_trans: bool = False) -> torch.Tensor:
    """Deformable position-sensitive RoI pooling (Deformable-ConvNets, R-FCN): (K, output_dim, P, P).

    ``input`` has ``output_dim * group_size ** 2`` channels; ``offset`` ("trans") is
    (K, 2 * classes, part_size, part_size), its channel pair (2c, 2c + 1) moving, in units of the
    RoI's width and height times ``trans_std``, the bins of output channels ``c * output_dim /
    classes ...``; ignored (may be None) when ``no_trans``. ``part_size`` defaults to ``pooled_size``.
    """
    if not torch.jit.is_scripting():
        return _deform_psroi_pool(input, rois, offset, spatial_scale, output_dim, group_size, pooled_size, part_size,
                                  sample_per_part, trans_std, no_trans)
    part = pooled_size if part_size is None or part_size == 0 else part_size
    return torch.ops.tvm_dcn.deform_psroi_pool_forward(input, _script_rois(rois, input), None if no_trans else offset,
                                                       spatial_scale, output_dim, group_size, pooled_size, part,
                                                       sample_per_part, trans_std)


# torch.fx: each function is one leaf node of a symbolically traced graph (as torchvision's ops),
# so models with the modules below trace and torchvision's create_feature_extractor works.
for _function in ("roi_align", "ps_roi_align", "roi_pool", "ps_roi_pool", "deform_roi_pool", "deform_psroi_pool"):
    torch.fx.wrap(_function)


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

    def pool(self, input: torch.Tensor, rois: Boxes, offset: Optional[torch.Tensor] = None,
             mask: Optional[torch.Tensor] = None) -> torch.Tensor:
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

    def _features(self, input: torch.Tensor, rois: Boxes) -> tuple[torch.Tensor, torch.Tensor]:
        if (not torch.jit.is_scripting() and isinstance(input, torch.Tensor) and input.dim() == 4
                and input.shape[1] != self.output_channels):
            raise ArgumentValueError(f"input has {input.shape[1]} channels; this module was built for "
                                     f"output_channels = {self.output_channels}")
        x = self.pool(input, rois)
        flat = x.reshape(x.shape[0], -1)
        offset = self.offset_fc(flat).view(x.shape[0], 2, self.output_size[0], self.output_size[1])
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
        mask = self.mask_fc(flat).view(flat.shape[0], 1, self.output_size[0], self.output_size[1])
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

    def pool(self, input: torch.Tensor, rois: Boxes, offset: Optional[torch.Tensor], no_trans: bool) -> torch.Tensor:
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
        else:
            # No parameters (mmdetection's state_dict keys), but TorchScript compiles the offset
            # branch of forward too, so the attribute must exist.
            self.offset_fc = nn.Identity()

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
