"""Deformable convolution (DCNv1 and modulated DCNv2), NCHW, in TE.

Semantics are those of ``torchvision.ops.deform_conv2d``: output pixel (oh, ow), kernel tap
(i, j) of offset group g samples the input at

    y = oh * stride_h - pad_h + i * dilation_h + offset[n, 2 * (g * KH * KW + i * KW + j),     oh, ow]
    x = ow * stride_w - pad_w + j * dilation_w + offset[n, 2 * (g * KH * KW + i * KW + j) + 1, oh, ow]

by bilinear interpolation with zero padding (a sample with y <= -1, y >= H, x <= -1 or x >= W is
zero; so is one whose position is NaN or infinite), multiplied by ``mask[n, g * KH * KW + i * KW + j,
oh, ow]`` when a mask is given. Input channel c belongs to offset group ``c // (C / offset_groups)``
and to convolution group ``c // (C / groups)``.

The computation is split into stages so it schedules like a GEMM:

1. ``sample_coord``   (N, OG, K, 2, P')  sampling position per (offset group, tap, output pixel);
                                         invalid samples get the sentinel -2 (outside every image).
2. ``corner_index``   (N, OG, K, 4, P')  flat index of each bilinear corner, clamped in range,
   ``corner_weight``  (N, OG, K, 4, P')  its bilinear weight (times the mask), 0 when out of bounds.
3. ``deform_col``     (N, C*K, P')       deformable im2col: 4 gathers per (channel, tap, pixel).
4. ``gemm``           (N, Cout, P')      weight (Cout, C/groups*K) x columns, per group.
5. output             (N, Cout, P)       drops the padding, adds the bias.

K = KH*KW, P = OH*OW output pixels, P' = P rounded up to a multiple of ``SPATIAL_ALIGN`` so the
pixel axis vectorises without tails. Coordinates and weights are computed once per (tap, pixel)
and reused by every channel of the offset group. Kernel arguments use flattened spatial axes:
input (N, C, H*W), offset (N, 2*OG*K, P), mask (N, OG*K, P), weight (Cout, C/groups*K), bias
(Cout,), output (N, Cout, P); the PyTorch bridge passes views of its tensors, no copies.
"""
from __future__ import annotations

from tvm import te, tirx

from ..workload import Workload
from . import OperatorDef, register

FORWARD = "deform_conv2d"
# Rounding of the output-pixel axis of the intermediate stages, so that vector loops have no tail.
SPATIAL_ALIGN = 8
# Sampling position given to invalid samples: every bilinear corner of it is out of bounds.
_OUTSIDE = -2


def output_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def forward_workload(*, batch, in_channels, height, width, out_channels, kernel_size, stride=(1, 1),
                     padding=(0, 0), dilation=(1, 1), groups=1, offset_groups=1, with_mask=False,
                     with_bias=False, dtype="float32") -> Workload:
    """The workload of one ``deform_conv2d`` forward call (all spatial parameters as pairs)."""
    return Workload.make(
        FORWARD, dtype, batch=batch, in_channels=in_channels, height=height, width=width,
        out_channels=out_channels, kernel_size=tuple(kernel_size), stride=tuple(stride),
        padding=tuple(padding), dilation=tuple(dilation), groups=groups, offset_groups=offset_groups,
        with_mask=bool(with_mask), with_bias=bool(with_bias))


class ConvGeometry:
    """Shapes derived from a deform_conv2d workload."""

    def __init__(self, wl: Workload):
        self.batch = wl["batch"]
        self.in_channels = wl["in_channels"]
        self.height, self.width = wl["height"], wl["width"]
        self.out_channels = wl["out_channels"]
        self.kernel_h, self.kernel_w = wl["kernel_size"]
        self.stride_h, self.stride_w = wl["stride"]
        self.pad_h, self.pad_w = wl["padding"]
        self.dil_h, self.dil_w = wl["dilation"]
        self.groups = wl["groups"]
        self.offset_groups = wl["offset_groups"]
        self.with_mask = wl["with_mask"]
        self.with_bias = wl["with_bias"]
        self.dtype = wl.dtype
        self.out_h = output_size(self.height, self.kernel_h, self.stride_h, self.pad_h, self.dil_h)
        self.out_w = output_size(self.width, self.kernel_w, self.stride_w, self.pad_w, self.dil_w)
        self.taps = self.kernel_h * self.kernel_w
        self.pixels = self.out_h * self.out_w
        self.padded_pixels = -(-self.pixels // SPATIAL_ALIGN) * SPATIAL_ALIGN
        self.group_in_channels = self.in_channels // self.groups
        self.group_out_channels = self.out_channels // self.groups
        self.channels_per_offset_group = self.in_channels // self.offset_groups
        self.reduction = self.group_in_channels * self.taps


def sample_coordinates(geo: ConvGeometry, offset: te.Tensor) -> te.Tensor:
    """Stage 1: (N, OG, K, 2, P') sampling position (y, x) per offset group, tap and output pixel.

    A position outside (-2, H + 1) x (-2, W + 1), non-finite, or of a padding pixel is replaced
    by the sentinel (-2, -2): every bilinear corner of the cell is then outside the image, so the
    sample, and all its gradients, are zero. Inside that range, in-bounds corners alone reproduce
    torchvision exactly: zero value outside (-1, H) x (-1, W), and its one-sided coordinate
    gradients on the border. The sentinel also keeps float->int conversions of huge values defined.
    """
    dtype = geo.dtype
    K, P = geo.taps, geo.pixels

    def coord(n, g, k, axis, p):
        p_in = te.min(p, P - 1)  # padding pixels read a real pixel, then are marked invalid
        oh, ow = p_in // geo.out_w, p_in % geo.out_w
        ki, kj = k // geo.kernel_w, k % geo.kernel_w
        channel = (g * K + k) * 2
        y = (oh * geo.stride_h - geo.pad_h + ki * geo.dil_h).astype(dtype) + offset[n, channel, p_in]
        x = (ow * geo.stride_w - geo.pad_w + kj * geo.dil_w).astype(dtype) + offset[n, channel + 1, p_in]
        # Positive comparisons, so that NaN (every comparison false) takes the sentinel too.
        valid = tirx.all(p < P, y > -2, y < geo.height + 1, x > -2, x < geo.width + 1)
        return te.if_then_else(valid, te.if_then_else(axis == 0, y, x), tirx.const(_OUTSIDE, dtype))

    return te.compute((geo.batch, geo.offset_groups, K, 2, geo.padded_pixels), coord, name="sample_coord")


class BilinearCorner:
    """Corner q = 2*dy + dx of the bilinear cell of sample (n, g, k, p)."""

    def __init__(self, geo: ConvGeometry, sample: te.Tensor, n, g, k, q, p):
        y, x = sample[n, g, k, 0, p], sample[n, g, k, 1, p]
        y0, x0 = te.floor(y), te.floor(x)
        self.dy, self.dx = q // 2, q % 2
        row = y0.astype("int32") + self.dy
        col = x0.astype("int32") + self.dx
        self.frac_y, self.frac_x = y - y0, x - x0
        self.in_bounds = tirx.all(row >= 0, row < geo.height, col >= 0, col < geo.width)
        self.flat_index = row * geo.width + col
        self.one = tirx.const(1, geo.dtype)
        self.zero = tirx.const(0, geo.dtype)

    def weight_y(self):
        return te.if_then_else(self.dy == 1, self.frac_y, self.one - self.frac_y)

    def weight_x(self):
        return te.if_then_else(self.dx == 1, self.frac_x, self.one - self.frac_x)

    def masked(self, value):
        """``value`` for an in-bounds corner, zero for one outside the image."""
        return te.if_then_else(self.in_bounds, value, self.zero)


def corner_indices(geo: ConvGeometry, sample: te.Tensor) -> te.Tensor:
    """(N, OG, K, 4, P') flat input index of each bilinear corner (0 where out of bounds)."""
    def index(n, g, k, q, p):
        corner = BilinearCorner(geo, sample, n, g, k, q, p)
        return te.if_then_else(corner.in_bounds, corner.flat_index, 0)

    shape = (geo.batch, geo.offset_groups, geo.taps, 4, geo.padded_pixels)
    return te.compute(shape, index, name="corner_index")


def corner_weights(geo: ConvGeometry, sample: te.Tensor, mask: te.Tensor | None) -> te.Tensor:
    """(N, OG, K, 4, P') bilinear weight of each corner, times the mask; 0 where out of bounds."""
    K, P = geo.taps, geo.pixels

    def weight(n, g, k, q, p):
        corner = BilinearCorner(geo, sample, n, g, k, q, p)
        w = corner.weight_y() * corner.weight_x()
        if mask is not None:
            w = w * mask[n, g * K + k, te.min(p, P - 1)]
        return corner.masked(w)

    shape = (geo.batch, geo.offset_groups, K, 4, geo.padded_pixels)
    return te.compute(shape, weight, name="corner_weight")


def sampling_stages(geo: ConvGeometry, offset: te.Tensor, mask: te.Tensor | None):
    """Stages 1-2: bilinear corner indices and (masked) weights per (offset group, tap, pixel)."""
    sample = sample_coordinates(geo, offset)
    return corner_indices(geo, sample), corner_weights(geo, sample, mask)


def deformable_columns(geo: ConvGeometry, data: te.Tensor, corner_index: te.Tensor,
                       corner_weight: te.Tensor) -> te.Tensor:
    """Stage 3: the (N, C*K, P') matrix of bilinear samples (row c*K + k)."""
    K = geo.taps

    def sample(n, row, p):
        c, k = row // K, row % K
        g = c // geo.channels_per_offset_group
        return sum(corner_weight[n, g, k, q, p] * data[n, c, corner_index[n, g, k, q, p]] for q in range(4))

    return te.compute((geo.batch, geo.in_channels * K, geo.padded_pixels), sample, name="deform_col")


@register(FORWARD)
def build_forward(wl: Workload) -> OperatorDef:
    geo = ConvGeometry(wl)
    dtype = geo.dtype
    N, C, K = geo.batch, geo.in_channels, geo.taps
    data = te.placeholder((N, C, geo.height * geo.width), dtype, name="input")
    offset = te.placeholder((N, 2 * geo.offset_groups * K, geo.pixels), dtype, name="offset")
    mask = te.placeholder((N, geo.offset_groups * K, geo.pixels), dtype, name="mask") if geo.with_mask else None
    weight = te.placeholder((geo.out_channels, geo.reduction), dtype, name="weight")
    bias = te.placeholder((geo.out_channels,), dtype, name="bias") if geo.with_bias else None

    corner_index, corner_weight = sampling_stages(geo, offset, mask)
    columns = deformable_columns(geo, data, corner_index, corner_weight)
    r = te.reduce_axis((0, geo.reduction), name="r")
    gemm = te.compute(
        (N, geo.out_channels, geo.padded_pixels),
        lambda n, co, p: te.sum(
            weight[co, r] * columns[n, (co // geo.group_out_channels) * geo.reduction + r, p], axis=r),
        name="gemm")
    if bias is None:
        out = te.compute((N, geo.out_channels, geo.pixels), lambda n, co, p: gemm[n, co, p], name="output")
    else:
        out = te.compute((N, geo.out_channels, geo.pixels), lambda n, co, p: gemm[n, co, p] + bias[co],
                         name="output")
    args = [data, offset] + ([mask] if mask is not None else []) + [weight] + ([bias] if bias is not None else [])
    return OperatorDef(args + [out])
