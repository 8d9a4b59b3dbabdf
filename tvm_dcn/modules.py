"""``torch.nn`` layers around :func:`tvm_dcn.functional.deform_conv2d`.

Three layers, each a drop-in replacement for a widely used one, with the same constructor
arguments, parameter names and ``state_dict`` keys, so that checkpoints load unchanged:

* :class:`DeformConv2d` -- ``torchvision.ops.DeformConv2d``: offsets (and optionally a mask)
  are passed to ``forward``.
* :class:`DeformConv2dPack` -- mmcv's ``DeformConv2dPack`` (DCNv1, registered in mmcv as
  ``"DCN"``): a zero-initialised ``conv_offset`` convolution predicts the offsets from the input.
* :class:`ModulatedDeformConv2dPack` -- mmcv's ``ModulatedDeformConv2dPack`` (DCNv2, registered
  in mmcv as ``"DCNv2"``): ``conv_offset`` predicts offsets and a modulation mask.

``DCN`` and ``DCNv2`` are aliases of the two Pack classes (mmcv's registry names for them).

Offset and mask layout (all three layers; identical in torchvision and mmcv)
------------------------------------------------------------------------------
For a kernel of ``KH x KW`` taps, tap ``k = i * KW + j`` (row ``i``, column ``j``) and offset
group ``g`` (input channels ``[g * C_in / G, (g + 1) * C_in / G)``), at output position
``(y, x)``:

* ``offset[:, 2 * (g * KH * KW + k)]`` is the vertical displacement ``dy`` and
  ``offset[:, 2 * (g * KH * KW + k) + 1]`` the horizontal displacement ``dx``, in input pixels;
* ``mask[:, g * KH * KW + k]`` multiplies that tap's sample (DCNv2 only).

The tap samples the (zero-padded, bilinearly interpolated) input at
``(y * stride_h - pad_h + i * dil_h + dy, x * stride_w - pad_w + j * dil_w + dx)``; a sample
outside ``(-1, H) x (-1, W)`` is zero. The bias is added after the masked sum (it is not
modulated).

mmcv compatibility notes (checked against mmcv's ``mmcv/ops/deform_conv.py``,
``mmcv/ops/modulated_deform_conv.py`` and the CUDA im2col kernels they call): mmcv's kernels
index the offset tensor exactly as above (``data_offset + group * 2 * KH * KW * HW``, then
channel ``2 * (i * KW + j)`` for ``dy`` and ``2 * (i * KW + j) + 1`` for ``dx``; the mask at
``group * KH * KW + i * KW + j``), and use the same bilinear sampling and out-of-range rule as
torchvision, so no channel permutation is needed anywhere.
"""
from __future__ import annotations

import math
import warnings
from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from ._utils import IntPair
from .functional import deform_conv2d

# torch.fx: the convolution is one leaf node of a symbolically traced graph (as torchvision's
# deform_conv2d), so models with these layers trace and create_feature_extractor works.
torch.fx.wrap("deform_conv2d")

__all__ = ["DeformConv2d", "DeformConv2dPack", "ModulatedDeformConv2dPack", "DCN", "DCNv2"]



# --------------------------------------------------------------------------------------------
# argument validation


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_int(value, name: str, minimum: int) -> int:
    if not _is_int(value):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    if value < minimum:
        qualifier = "positive" if minimum == 1 else f">= {minimum}"
        raise ValueError(f"{name} must be {qualifier}, got {value}")
    return value


def _check_pair(value, name: str, minimum: int) -> Tuple[int, int]:
    if _is_int(value):
        items: tuple = (value, value)
    elif isinstance(value, (tuple, list)):
        items = tuple(value)
        if len(items) != 2:
            raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    else:
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r} ({type(value).__name__})")
    for item in items:
        if not _is_int(item):
            raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
        if item < minimum:
            qualifier = "positive" if minimum == 1 else f">= {minimum}"
            raise ValueError(f"{name} must be {qualifier}, got {value!r}")
    return items  # type: ignore[return-value]


def _check_bias(bias) -> bool:
    # Lenient like nn.Conv2d for bool-like values (0/1, numpy bools), but a string such as
    # "False" or mmcv's "auto" (which ConvModule resolves before building a layer) is refused.
    if isinstance(bias, (str, bytes)) or bias not in (True, False):
        raise TypeError(f"bias must be a bool, got {bias!r} ({type(bias).__name__})")
    return bool(bias)


# --------------------------------------------------------------------------------------------
# shared base


class _DeformConvBase(nn.Module):
    """Validation, parameters and ``repr`` shared by the three layers (not public)."""

    # Compatibility with code that inspects nn.Conv2d-like layers (mmcv sets these too).
    transposed = False
    output_padding = (0,)

    def __init__(self, in_channels: int, out_channels: int, kernel_size: IntPair,
                 stride: IntPair, padding: IntPair, dilation: IntPair, groups: int,
                 deform_groups: Optional[int], bias: bool) -> None:
        super().__init__()
        in_channels = _check_int(in_channels, "in_channels", 1)
        out_channels = _check_int(out_channels, "out_channels", 1)
        groups = _check_int(groups, "groups", 1)
        if in_channels % groups:
            raise ValueError(f"in_channels ({in_channels}) must be divisible by groups ({groups})")
        if out_channels % groups:
            raise ValueError(f"out_channels ({out_channels}) must be divisible by groups ({groups})")
        if deform_groups is not None:  # None: offset groups come from the offset (DeformConv2d)
            deform_groups = _check_int(deform_groups, "deform_groups", 1)
            if in_channels % deform_groups:
                raise ValueError(f"in_channels ({in_channels}) must be divisible by deform_groups "
                                 f"({deform_groups})")
            self.deform_groups = deform_groups
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = _check_pair(kernel_size, "kernel_size", 1)
        self.stride = _check_pair(stride, "stride", 1)
        self.padding = _check_pair(padding, "padding", 0)
        self.dilation = _check_pair(dilation, "dilation", 1)
        self.groups = groups

        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, *self.kernel_size))
        if _check_bias(bias):
            self.bias = nn.Parameter(torch.empty(out_channels))
        else:
            self.register_parameter("bias", None)

    @property
    def _taps(self) -> int:
        return self.kernel_size[0] * self.kernel_size[1]

    def _conv_init(self) -> None:
        # The initialisation of torch.nn.Conv2d (and torchvision.ops.DeformConv2d): weight from
        # kaiming_uniform_(a=sqrt(5)), i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in)); bias from the same
        # range, with fan_in = in_channels / groups * KH * KW.
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in = self.weight.shape[1] * self._taps
            bound = 1.0 / math.sqrt(fan_in)
            nn.init.uniform_(self.bias, -bound, bound)

    def extra_repr(self) -> str:
        s = f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}"
        if self.padding != (0, 0):
            s += f", padding={self.padding}"
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if getattr(self, "deform_groups", 1) != 1:
            s += f", deform_groups={self.deform_groups}"
        if self.bias is None:
            s += ", bias=False"
        return s

    def _deform(self, input: Tensor, offset: Tensor, mask: Optional[Tensor]) -> Tensor:
        return deform_conv2d(input, offset, self.weight, self.bias, stride=self.stride,
                             padding=self.padding, dilation=self.dilation, mask=mask)


# --------------------------------------------------------------------------------------------
# torchvision-compatible layer


class DeformConv2d(_DeformConvBase):
    r"""Deformable 2-D convolution (DCNv1, or DCNv2 when a mask is given); a drop-in replacement
    for ``torchvision.ops.DeformConv2d`` that runs tvm-dcn's kernels.

    Same constructor signature, parameters (``weight``, ``bias``), ``state_dict`` keys,
    initialisation (that of ``nn.Conv2d``) and ``repr`` as torchvision's layer. The offsets (and
    optional mask) are inputs of :meth:`forward`, typically predicted by another layer.

    Args:
        in_channels: ``C_in``, channels of the input (positive, divisible by ``groups``).
        out_channels: ``C_out``, channels of the output (positive, divisible by ``groups``).
        kernel_size: ``(KH, KW)`` or one int for both; positive.
        stride: int or ``(stride_h, stride_w)``; positive. Default 1.
        padding: int or ``(pad_h, pad_w)``; implicit zero padding on both sides; non-negative.
            Default 0.
        dilation: int or ``(dil_h, dil_w)``; spacing between kernel taps; positive. Default 1.
        groups: number of blocked connections from input to output channels, as in
            ``nn.Conv2d``. Default 1.
        bias: whether to add a learnable bias. Default True.

    Attributes:
        weight: ``(C_out, C_in / groups, KH, KW)``, initialised with
            ``kaiming_uniform_(a=sqrt(5))``.
        bias: ``(C_out,)`` or None, initialised from ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))`` with
            ``fan_in = C_in / groups * KH * KW``.

    Raises:
        ValueError / TypeError naming the offending argument for an invalid one.

    Shapes (see :func:`forward`):
        ``H_out = (H + 2 * pad_h - dil_h * (KH - 1) - 1) // stride_h + 1``, likewise ``W_out``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: IntPair, stride: IntPair = 1,
                 padding: IntPair = 0, dilation: IntPair = 1, groups: int = 1, bias: bool = True) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                         deform_groups=None, bias=bias)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Re-initialise ``weight`` and ``bias`` as ``nn.Conv2d`` does."""
        self._conv_init()

    def forward(self, input: Tensor, offset: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        """Apply the deformable convolution.

        Args:
            input: ``(N, C_in, H, W)``, float32, float64, bfloat16 or float16 (see
                :func:`tvm_dcn.deform_conv2d`; under ``torch.autocast``, the autocast dtype).
            offset: ``(N, 2 * G * KH * KW, H_out, W_out)``, same dtype; ``G`` (the number of
                offset groups, which must divide ``C_in``) is inferred from the channel count.
                Channel ``2 * (g * KH * KW + k)`` is ``dy`` and ``2 * (g * KH * KW + k) + 1`` is
                ``dx`` for tap ``k = i * KW + j`` of group ``g`` (see the module docstring).
            mask: optional ``(N, G * KH * KW, H_out, W_out)`` modulation (DCNv2); channel
                ``g * KH * KW + k`` multiplies the sample of tap ``k`` of group ``g``. None means
                DCNv1 (all ones).

        Returns:
            ``(N, C_out, H_out, W_out)``.
        """
        return self._deform(input, offset, mask)


# --------------------------------------------------------------------------------------------
# mmcv-compatible layers


def _resolve_deform_groups(deform_groups: int, deformable_groups: Optional[int], cls_name: str) -> int:
    # mmcv accepts the old keyword ``deformable_groups`` with a deprecation warning.
    if deformable_groups is None:
        return deform_groups
    if deform_groups != 1 and deform_groups != deformable_groups:
        raise ValueError(f"deform_groups ({deform_groups}) and its deprecated alias deformable_groups "
                         f"({deformable_groups}) disagree; pass only deform_groups")
    warnings.warn(f"{cls_name}: 'deformable_groups' is deprecated, use 'deform_groups' instead",
                  DeprecationWarning, stacklevel=3)
    return deformable_groups


class _PackBase(_DeformConvBase):
    """A deformable convolution whose offsets come from its own ``conv_offset`` (not public)."""

    # mmcv's Pack layers record state-dict version 2 in the checkpoint metadata; so do these.
    # (mmcv also renames version-1 keys ``<name>_offset.*`` -- a sibling of the layer -- to
    # ``<name>.conv_offset.*`` on load, but since torch hands each child only the keys under its
    # own prefix, that rename can no longer see those keys; it is not reproduced here.)
    _version = 2
    _offset_channels_per_tap: int  # 2 for DCNv1 (dy, dx), 3 for DCNv2 (dy, dx, mask)

    def __init__(self, in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                 deform_groups, bias) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                         deform_groups, bias)
        self.conv_offset = nn.Conv2d(
            self.in_channels, self.deform_groups * self._offset_channels_per_tap * self._taps,
            kernel_size=self.kernel_size, stride=self.stride, padding=self.padding,
            dilation=self.dilation, bias=True)

    def init_offset(self) -> None:
        """Zero ``conv_offset`` (weight and bias), so that the layer starts as a plain convolution."""
        with torch.no_grad():
            self.conv_offset.weight.zero_()
            self.conv_offset.bias.zero_()


class DeformConv2dPack(_PackBase):
    r"""Deformable convolution v1 that predicts its own offsets; mmcv's ``DeformConv2dPack``
    (``"DCN"`` in mmcv's registry) running tvm-dcn's kernels.

    ``forward(x)`` computes ``offset = conv_offset(x)`` and returns
    ``deform_conv2d(x, offset, weight, bias, stride, padding, dilation)``. ``conv_offset`` is a
    regular ``nn.Conv2d(in_channels, deform_groups * 2 * KH * KW, kernel_size, stride, padding,
    dilation, bias=True)`` -- same geometry as the main convolution, so its output has the
    output's spatial size -- and is initialised to zero, so a freshly built layer computes exactly
    ``F.conv2d(x, weight, bias, stride, padding, dilation, groups)``.

    The offset channels are consumed in the interleaved layout of the module docstring
    (``[dy_0, dx_0, dy_1, dx_1, ...]`` per offset group), which is mmcv's layout too, so the
    weights of an mmcv checkpoint produce the same output.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups: as
            :class:`DeformConv2d` / ``nn.Conv2d``.
        deform_groups: ``G``, number of offset groups (each predicts its own offsets for a slice
            of ``C_in / G`` input channels); must divide ``in_channels``. Default 1. The
            deprecated mmcv keyword ``deformable_groups`` is accepted too.
        bias: whether the main convolution has a learnable bias. Default False, as in mmcv, whose
            DCNv1 layers support no bias at all (``bias=True`` fails an assertion there) and whose
            checkpoints have no ``bias`` key; ``bias=True`` is an extension.

    Attributes:
        weight: ``(C_out, C_in / groups, KH, KW)``; initialised as mmcv does,
            ``kaiming_uniform_(nonlinearity='relu')``.
        bias: ``(C_out,)`` or None; initialised to zero.
        conv_offset: ``nn.Conv2d`` producing ``(N, 2 * G * KH * KW, H_out, W_out)``; zero.

    ``state_dict`` keys are mmcv's: ``weight``, [``bias``,] ``conv_offset.weight``,
    ``conv_offset.bias``.
    """

    _offset_channels_per_tap = 2

    def __init__(self, in_channels: int, out_channels: int, kernel_size: IntPair, stride: IntPair = 1,
                 padding: IntPair = 0, dilation: IntPair = 1, groups: int = 1, deform_groups: int = 1,
                 bias: bool = False, *, deformable_groups: Optional[int] = None) -> None:
        deform_groups = _resolve_deform_groups(deform_groups, deformable_groups, type(self).__name__)
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                         deform_groups, bias)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Re-initialise as mmcv does: ``weight`` kaiming-uniform (ReLU gain), ``bias`` and
        ``conv_offset`` zero."""
        nn.init.kaiming_uniform_(self.weight, nonlinearity="relu")
        if self.bias is not None:
            nn.init.zeros_(self.bias)
        self.init_offset()

    def forward(self, x: Tensor) -> Tensor:
        """``x``: ``(N, C_in, H, W)`` float32/float64/bfloat16/float16 -> ``(N, C_out, H_out, W_out)``."""
        return self._deform(x, self.conv_offset(x), None)


class ModulatedDeformConv2dPack(_PackBase):
    r"""Modulated deformable convolution (DCNv2) that predicts its own offsets and mask; mmcv's
    ``ModulatedDeformConv2dPack`` (``"DCNv2"`` in mmcv's registry) running tvm-dcn's kernels.

    ``conv_offset`` is ``nn.Conv2d(in_channels, deform_groups * 3 * KH * KW, kernel_size,
    stride, padding, dilation, bias=True)``, initialised to zero. ``forward(x)`` does exactly what
    mmcv does::

        out = conv_offset(x)                      # (N, 3 * G * KH * KW, H_out, W_out)
        o1, o2, m = torch.chunk(out, 3, dim=1)    # thirds of G * KH * KW channels each
        offset = torch.cat((o1, o2), dim=1)       # = out[:, :2 * G * KH * KW]
        mask = torch.sigmoid(m)                   # = sigmoid(out[:, 2 * G * KH * KW:])
        return deform_conv2d(x, offset, weight, bias, stride, padding, dilation, mask=mask)

    Note what the split means: ``o1`` and ``o2`` are *not* the ``dy`` and ``dx`` planes.
    Concatenating them just gives back the first two thirds of ``conv_offset``'s output, which is
    read in the interleaved layout (channel ``2 * (g * KH * KW + k)`` is ``dy``, the next ``dx``,
    for tap ``k`` of offset group ``g``), the same layout mmcv's kernel reads; the last third,
    through a sigmoid, is the mask (channel ``g * KH * KW + k``). So an mmcv checkpoint gives
    the same output here.

    At initialisation the offsets are zero and the mask is ``sigmoid(0) = 0.5`` everywhere, so
    the layer computes ``0.5 * F.conv2d(x, weight, None, ...) + bias`` (the bias is not
    modulated).

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups: as
            :class:`DeformConv2d` / ``nn.Conv2d``.
        deform_groups: ``G``, number of offset groups; must divide ``in_channels``. Default 1.
            The deprecated mmcv keyword ``deformable_groups`` is accepted too.
        bias: whether to add a learnable bias. Default True (as in mmcv).

    Attributes:
        weight: ``(C_out, C_in / groups, KH, KW)``; initialised as mmcv does, from
            ``U(-1/sqrt(n), 1/sqrt(n))`` with ``n = C_in * KH * KW`` (mmcv's choice: all input
            channels, whatever ``groups``).
        bias: ``(C_out,)`` or None; initialised to zero.
        conv_offset: ``nn.Conv2d`` producing ``(N, 3 * G * KH * KW, H_out, W_out)``; zero.

    ``state_dict`` keys are mmcv's: ``weight``, [``bias``,] ``conv_offset.weight``,
    ``conv_offset.bias``.
    """

    _offset_channels_per_tap = 3

    def __init__(self, in_channels: int, out_channels: int, kernel_size: IntPair, stride: IntPair = 1,
                 padding: IntPair = 0, dilation: IntPair = 1, groups: int = 1, deform_groups: int = 1,
                 bias: bool = True, *, deformable_groups: Optional[int] = None) -> None:
        deform_groups = _resolve_deform_groups(deform_groups, deformable_groups, type(self).__name__)
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                         deform_groups, bias)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Re-initialise as mmcv does: ``weight`` from ``U(-1/sqrt(n), 1/sqrt(n))``,
        ``n = in_channels * KH * KW``; ``bias`` and ``conv_offset`` zero."""
        stdv = 1.0 / math.sqrt(self.in_channels * self._taps)
        nn.init.uniform_(self.weight, -stdv, stdv)
        if self.bias is not None:
            nn.init.zeros_(self.bias)
        self.init_offset()

    # mmcv's name for the same method.
    init_weights = reset_parameters

    def forward(self, x: Tensor) -> Tensor:
        """``x``: ``(N, C_in, H, W)`` float32/float64/bfloat16/float16 -> ``(N, C_out, H_out, W_out)``."""
        out = self.conv_offset(x)
        o1, o2, mask = torch.chunk(out, 3, dim=1)
        offset = torch.cat((o1, o2), dim=1)
        return self._deform(x, offset, torch.sigmoid(mask))


# mmcv registers the Pack layers in its MODELS registry as "DCN" and "DCNv2".
DCN = DeformConv2dPack
DCNv2 = ModulatedDeformConv2dPack
