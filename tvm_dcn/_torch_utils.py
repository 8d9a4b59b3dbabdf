"""PyTorch-side helpers shared by the bridge modules (``functional``, ``roi``): the dtypes the
operators are defined for, autocast's casts, the exception types of bad arguments and the checks
that raise them."""
from __future__ import annotations

from typing import Optional

import torch

from ._utils import IntPair, int_pair

# Half precision computes in float32: the operators without half kernels (all but the CPU
# deformable-convolution forward) convert half tensors to float32 once, compute (and accumulate)
# in float32 and return their results in the half dtype.
HALF_DTYPES = (torch.bfloat16, torch.float16)
# The tensor dtypes the operators are defined for.
SUPPORTED_DTYPES = (torch.float32, torch.float64) + HALF_DTYPES
_AUTOCAST_DEVICE_TYPES = ("cpu", "cuda")


def kernel_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the kernels that compute an operator on tensors of ``dtype``."""
    return torch.float32 if dtype in HALF_DTYPES else dtype


def autocast_dtype(t) -> Optional[torch.dtype]:
    """The dtype autocast runs ``conv2d`` in on the device of tensor ``t``; None when autocast is
    off there (or ``t`` is not a tensor)."""
    if not isinstance(t, torch.Tensor) or not torch._C._is_any_autocast_enabled():
        return None
    device_type = t.device.type
    if device_type not in _AUTOCAST_DEVICE_TYPES or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def autocast_cast(value, dtype: torch.dtype):
    """autocast's cast of one argument: a floating-point tensor other than float64 to ``dtype``;
    anything else (None, integer or float64 tensors, scalars) as it is."""
    if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype != torch.float64:
        return value.to(dtype)
    return value


class ArgumentValueError(ValueError, RuntimeError):
    """A bad argument value or shape. A ``ValueError`` naming the argument, and a ``RuntimeError``:
    the type torchvision's operators raise for the same mistake, so code written for them catches it."""


class ArgumentTypeError(TypeError, RuntimeError):
    """An argument of the wrong type or dtype (``TypeError``; also ``RuntimeError``, as torchvision)."""


class BoxFormatError(ArgumentValueError, AssertionError):
    """Boxes of the wrong shape: also an ``AssertionError``, which torchvision's box checks raise."""


class BoxTypeError(ArgumentTypeError, AssertionError):
    """Boxes of the wrong type (``TypeError``; also ``AssertionError``, as torchvision's box checks)."""


def int_pair_argument(value: IntPair, name: str) -> tuple[int, int]:
    """:func:`tvm_dcn._utils.int_pair` for a user's argument: ``ArgumentTypeError`` naming it."""
    try:
        return int_pair(value, name)
    except TypeError as err:
        raise ArgumentTypeError(str(err)) from None


def check_tensor(t, name: str, ndim: int) -> None:
    """``t`` is a tensor of ``ndim`` dimensions and a supported dtype; else an error naming ``name``."""
    if not isinstance(t, torch.Tensor):
        raise ArgumentTypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ArgumentValueError(f"{name} must be a {ndim}-d tensor, got shape {tuple(t.shape)}")
    if t.dtype not in SUPPORTED_DTYPES:
        raise ArgumentTypeError(f"{name} has dtype {t.dtype}; tvm_dcn supports float32, float64, "
                                "bfloat16 and float16")
