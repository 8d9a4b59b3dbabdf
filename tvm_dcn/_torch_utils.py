"""PyTorch-side helpers shared by the bridge modules (``functional``, ``roi``): the dtypes the
operators are defined for, the exception types of bad arguments and the checks that raise them."""
from __future__ import annotations

import torch

from ._utils import IntPair, int_pair

# The tensor dtypes the operators are defined for.
SUPPORTED_DTYPES = (torch.float32, torch.float64)


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
        raise ArgumentTypeError(f"{name} has dtype {t.dtype}; tvm_dcn supports float32 and float64")
