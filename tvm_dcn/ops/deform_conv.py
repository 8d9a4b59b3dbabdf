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
3. ``deform_col``     (N, C*K, P')       deformable im2col: 4 corner reads per (channel, tap, pixel)
                                         ((N, C, K, P') in the channels-last formulation).
4. ``gemm``           (N, Cout, P')      weight (Cout, C/groups*K) x columns, per group.
5. output             (N, Cout, P)       drops the padding, adds the bias.

K = KH*KW, P = OH*OW output pixels, P' = P rounded up to a multiple of ``SPATIAL_ALIGN`` so the
pixel axis vectorises without tails (of twice that where cheap: ``padded_pixels``), or of the
workload's ``pixel_align`` (the forward on CPUs with wider vectors: ``cpu_params``). Coordinates
and weights are computed once per (tap, pixel) and reused by every channel of the offset group.

The forward columns come in two formulations (workload parameter ``columns``):

- ``"channels_last"``: the input is first transposed to channels-last (``input_channels_last``,
  (N, H*W, C)), so the four corners of one (tap, pixel) are contiguous vectors over channels,
  read with plain vector loads instead of gathers (which the x86 back end scalarises). The
  columns are (N, C, K, P') (``channel_major_columns``): the rows c*K + k of the gather
  formulation, in the weight's own order, so the GEMM reads the weight as given.
- ``"gather"``: (N, C*K, P') rows gathered straight from the NCHW input, one contiguous pixel
  vector per row (``deformable_columns``).
- absent: the CPU's choice: channels-last where the channels of an offset group fill whole
  vectors (C/OG a multiple of ``SPATIAL_ALIGN``), else gather. Measured here (ResNet-50 DCN
  layers, 2 Zen 3 cores, whole forward kernels): channels-last 14-25% faster at 784 and 196
  pixels, 1-5% at 49 pixels x 512 channels. (An earlier channels-last formulation ordered the
  rows tap-major and reordered the weight to match on every call: 18-29% slower than gather
  on the 512-channel layers, whose weight is 9.4 MB.) GPU workloads get ``"gather"``
  (``ops.for_target``: what the CUDA GEMM tiles stage).

The backward kernels reuse stages 1-3 (see ``build_backward_data`` and ``build_backward_weight``).

Kernel arguments use flattened spatial axes:
input (N, C, H*W), offset (N, 2*OG*K, P), mask (N, OG*K, P), weight (Cout, C/groups*K), bias
(Cout,), output (N, Cout, P); the PyTorch bridge passes views of its tensors, no copies.
"""
from __future__ import annotations

from tvm import te, tirx

from ..cpu_isa import vector_unit
from . import gpu_scatter
from .registry import OperatorDef, atomic_scatter, register
from .workload import Workload

FORWARD = "deform_conv2d"
BACKWARD_DATA = "deform_conv2d_backward_data"
BACKWARD_WEIGHT = "deform_conv2d_backward_weight"
# Rounding of the output-pixel axis of the intermediate stages, so that vector loops have no tail.
SPATIAL_ALIGN = 8
# Sampling position given to invalid samples: every bilinear corner of it is out of bounds.
_OUTSIDE = -2
# Forward column formulations (workload parameter ``columns``; absent: chosen by the sizes).
COLUMNS_GATHER = "gather"
COLUMNS_CHANNELS_LAST = "channels_last"
# Storage dtypes whose arithmetic runs in float32 (sampling, bilinear sums, GEMM accumulation).
HALF_DTYPES = ("bfloat16", "float16")
# The GEMMs of a bfloat16 workload with ``gemm=GEMM_BF16_DOT``: operands stored as bfloat16 pairs
# along the reduction (the forward's columns and weights, the column gradient's output gradient and
# transposed weight, the weight gradient's pixels), multiplied and summed into float32
# accumulators by AVX512-BF16's ``vdpbf16ps`` (32 products per instruction where FMA does 16).
GEMM_BF16_DOT = "avx512_bf16"
# Float32 accumulators of one dot product (pixels; in the weight gradient, weight columns).
DOT_LANES = 16


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


def backward_data_workload(forward: Workload, *, need_input: bool, need_sampling: bool) -> Workload:
    """The workload computing the gradients of ``forward``'s input (``need_input``) and of its
    offset and mask (``need_sampling``) from the output gradient. The bias plays no part."""
    if not (need_input or need_sampling):
        raise ValueError("a backward-data workload must compute some gradient")
    params = dict(forward.params)
    params.pop("with_bias")
    params.pop("gemm", None)  # the gradients' own formulation: their cpu_params
    return Workload.make(BACKWARD_DATA, forward.dtype, need_input=bool(need_input),
                         need_sampling=bool(need_sampling), **params)


def backward_weight_workload(forward: Workload, *, need_weight: bool, need_bias: bool) -> Workload:
    """The workload computing the gradients of ``forward``'s weight and/or bias."""
    if not (need_weight or need_bias):
        raise ValueError("a backward-weight workload must compute some gradient")
    params = dict(forward.params)
    params["with_bias"] = bool(need_bias)
    params.pop("gemm", None)  # the gradients' own formulation: their cpu_params
    return Workload.make(BACKWARD_WEIGHT, forward.dtype, need_weight=bool(need_weight), **params)


def padded_pixels(pixels: int, align: int = SPATIAL_ALIGN) -> int:
    """P': ``pixels`` rounded up to a multiple of ``align`` (the workload's ``pixel_align``).

    With the default (8-lane vectors, AVX2's 16 registers), rounded to twice that where this adds
    at most a tenth: an even number of 8-lane vectors lets the CPU GEMM use its 4 x 2 register
    tile (measured here: 256 x 2304 x 208 in 1.35 ms, 256 x 2304 x 200 with the 8 x 1 tile in
    1.46 ms), e.g. 196 pixels (14 x 14) -> 208, not 200; 49 (7 x 7) stays 56, not 64. A wider
    ``align`` (16: AVX-512's float32 vectors, 32 registers) rounds to one vector: its register
    tiles take any number of vectors."""
    padded = -(-pixels // align) * align
    if align != SPATIAL_ALIGN:
        return padded
    paired = -(-pixels // (2 * SPATIAL_ALIGN)) * 2 * SPATIAL_ALIGN
    return paired if 10 * paired <= 11 * pixels else padded


def cpu_params(wl: Workload, target) -> dict:
    """Parameters of the forward's CPU formulation for ``target``: ``pixel_align``, the lanes of
    one vector register of the arithmetic's dtype (float32 for the half dtypes) where these are
    more than ``SPATIAL_ALIGN`` (AVX-512: 16 float32), so that P' holds whole vectors; absent
    (``SPATIAL_ALIGN``) elsewhere, which keeps AVX2's PrimFuncs, and the tuning records matched by
    their structural hash, as they are. A bfloat16 workload on a target with AVX512-BF16 whose
    reduction pairs up (``bf16_dot_applies``) also gets ``gemm=GEMM_BF16_DOT``."""
    unit = vector_unit(target)
    lanes = unit.lanes(compute_dtype(wl.dtype))
    params = {"pixel_align": lanes} if lanes > SPATIAL_ALIGN else {}
    if unit.bf16_dot and bf16_dot_applies(wl) and wl.get("pixel_align", DOT_LANES) % DOT_LANES == 0:
        params = {"pixel_align": DOT_LANES, "gemm": GEMM_BF16_DOT}
    return params


def compute_dtype(dtype: str) -> str:
    """The dtype the arithmetic of a ``dtype`` workload runs in: float32 for the half dtypes."""
    return "float32" if dtype in HALF_DTYPES else dtype


def bf16_dot_applies(wl: Workload) -> bool:
    """Whether ``wl`` can take ``gemm=GEMM_BF16_DOT``: bfloat16, and for the forward an even number
    of reduction rows per group (the dot product takes them in pairs), for the column gradient an
    even number of output channels per group, for the weight gradient (``need_weight``) a
    multiple of 16 reduction rows (the accumulators of one dot product: 16 of a group's weight
    columns; its pairs are of pixels, and P' is even)."""
    if wl.dtype != "bfloat16":
        return False
    kh, kw = wl["kernel_size"]
    rows = (wl["in_channels"] // wl["groups"]) * kh * kw
    if wl.op == FORWARD:
        return rows % 2 == 0
    if wl.op == BACKWARD_DATA:  # the column gradient sums over a group's output channels, in pairs
        return (wl["out_channels"] // wl["groups"]) % 2 == 0
    return wl.op == BACKWARD_WEIGHT and wl["need_weight"] and rows % DOT_LANES == 0


def backward_data_cpu_params(wl: Workload, target) -> dict:
    """Parameters of the input, offset and mask gradients' CPU formulation for ``target``:
    ``gemm=GEMM_BF16_DOT`` with ``pixel_align=16`` (vectors of 16 pixels of the output gradient's
    pairs) for a bfloat16 workload on a target with AVX512-BF16 where it applies."""
    if vector_unit(target).bf16_dot and bf16_dot_applies(wl) and wl.get("pixel_align", DOT_LANES) % DOT_LANES == 0:
        return {"pixel_align": DOT_LANES, "gemm": GEMM_BF16_DOT}
    return {}


def backward_weight_cpu_params(wl: Workload, target) -> dict:
    """Parameters of the weight gradient's CPU formulation for ``target``: ``gemm=GEMM_BF16_DOT``
    for a bfloat16 workload on a target with AVX512-BF16 where it applies (``bf16_dot_applies``)."""
    return {"gemm": GEMM_BF16_DOT} if vector_unit(target).bf16_dot and bf16_dot_applies(wl) else {}


def _as(value, dtype: str):
    """``value`` cast to ``dtype`` where it has another (float32 and float64 definitions stay as
    they are, and so do the PrimFuncs tuning records are matched by)."""
    own = value.dtype if hasattr(value, "dtype") else str(value.ty)  # a load has dtype, arithmetic ty
    return value if own == dtype else value.astype(dtype)


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
        self.with_bias = wl.get("with_bias", False)
        self.dtype = wl.dtype
        # Sampling, bilinear sums and GEMM accumulators: float32 for the half dtypes.
        self.compute_dtype = compute_dtype(wl.dtype)
        self.out_h = output_size(self.height, self.kernel_h, self.stride_h, self.pad_h, self.dil_h)
        self.out_w = output_size(self.width, self.kernel_w, self.stride_w, self.pad_w, self.dil_w)
        self.taps = self.kernel_h * self.kernel_w
        self.pixels = self.out_h * self.out_w
        self.pixel_align = wl.get("pixel_align", SPATIAL_ALIGN)
        if not isinstance(self.pixel_align, int) or self.pixel_align < SPATIAL_ALIGN or self.pixel_align % SPATIAL_ALIGN:
            raise ValueError(f"workload {wl.op}: pixel_align must be a multiple of {SPATIAL_ALIGN}, "
                             f"got {self.pixel_align!r}")
        self.padded_pixels = padded_pixels(self.pixels, self.pixel_align)
        self.group_in_channels = self.in_channels // self.groups
        self.group_out_channels = self.out_channels // self.groups
        self.channels_per_offset_group = self.in_channels // self.offset_groups
        self.reduction = self.group_in_channels * self.taps
        self.gemm = wl.get("gemm")
        if self.gemm is not None:
            if self.gemm != GEMM_BF16_DOT or not bf16_dot_applies(wl):
                raise ValueError(f"workload {wl.op}: gemm must be absent or {GEMM_BF16_DOT!r} (bfloat16, with an even "
                                 f"number of reduction rows per group in the forward, of output channels per group in "
                                 f"the input gradient, a multiple of {DOT_LANES} reduction rows in the weight "
                                 f"gradient), got {self.gemm!r}")
            if wl.op != BACKWARD_WEIGHT and self.pixel_align % DOT_LANES:
                raise ValueError(f"workload {wl.op}: gemm={GEMM_BF16_DOT!r} needs pixel_align a multiple of "
                                 f"{DOT_LANES}, got {self.pixel_align}")


def sample_coordinates(geo: ConvGeometry, offset: te.Tensor) -> te.Tensor:
    """Stage 1: (N, OG, K, 2, P') sampling position (y, x) per offset group, tap and output pixel.

    A position outside (-2, H + 1) x (-2, W + 1), non-finite, or of a padding pixel is replaced
    by the sentinel (-2, -2): every bilinear corner of the cell is then outside the image, so the
    sample, and all its gradients, are zero. Inside that range, in-bounds corners alone reproduce
    torchvision exactly: zero value outside (-1, H) x (-1, W), and its one-sided coordinate
    gradients on the border. The sentinel also keeps float->int conversions of huge values defined.
    """
    dtype = geo.compute_dtype
    K, P = geo.taps, geo.pixels

    def coord(n, g, k, axis, p):
        p_in = te.min(p, P - 1)  # padding pixels read a real pixel, then are marked invalid
        oh, ow = p_in // geo.out_w, p_in % geo.out_w
        ki, kj = k // geo.kernel_w, k % geo.kernel_w
        channel = (g * K + k) * 2
        y = (oh * geo.stride_h - geo.pad_h + ki * geo.dil_h).astype(dtype) + _as(offset[n, channel, p_in], dtype)
        x = (ow * geo.stride_w - geo.pad_w + kj * geo.dil_w).astype(dtype) + _as(offset[n, channel + 1, p_in], dtype)
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
        self.one = tirx.const(1, geo.compute_dtype)
        self.zero = tirx.const(0, geo.compute_dtype)

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
            w = w * _as(mask[n, g * K + k, te.min(p, P - 1)], geo.compute_dtype)
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
        return sum(corner_weight[n, g, k, q, p] * _as(data[n, c, corner_index[n, g, k, q, p]], geo.compute_dtype)
                   for q in range(4))

    return te.compute((geo.batch, geo.in_channels * K, geo.padded_pixels), sample, name="deform_col")


def channels_last(geo: ConvGeometry, data: te.Tensor) -> te.Tensor:
    """(N, H*W, C): the input with its channels innermost (in the arithmetic's dtype)."""
    return te.compute((geo.batch, geo.height * geo.width, geo.in_channels),
                      lambda n, i, c: _as(data[n, c, i], geo.compute_dtype), name="input_channels_last")


def channel_major_columns(geo: ConvGeometry, data_channels_last: te.Tensor, corner_index: te.Tensor,
                          corner_weight: te.Tensor) -> te.Tensor:
    """Stage 3, channels-last: (N, C, K, P') bilinear samples of channel c at tap k, i.e. the rows
    c*K + k of ``deformable_columns`` (the weight's own order), read from the channels-last input."""
    def sample(n, c, k, p):
        g = c // geo.channels_per_offset_group
        return sum(corner_weight[n, g, k, q, p] * data_channels_last[n, corner_index[n, g, k, q, p], c]
                   for q in range(4))

    return te.compute((geo.batch, geo.in_channels, geo.taps, geo.padded_pixels), sample, name="deform_col")


def forward_columns(wl: Workload, geo: ConvGeometry, data: te.Tensor, corner_index: te.Tensor,
                    corner_weight: te.Tensor) -> te.Tensor:
    """The forward's deformable columns in the workload's formulation."""
    if columns_formulation(wl) == COLUMNS_GATHER:
        return deformable_columns(geo, data, corner_index, corner_weight)
    return channel_major_columns(geo, channels_last(geo, data), corner_index, corner_weight)


def columns_formulation(wl: Workload) -> str:
    """The forward's column formulation: the ``columns`` parameter, validated, or (absent) the
    CPU's choice by the sizes (see the module docstring)."""
    mode = wl.get("columns")
    if mode is None:
        geo = ConvGeometry(wl)
        return COLUMNS_CHANNELS_LAST if geo.channels_per_offset_group % SPATIAL_ALIGN == 0 else COLUMNS_GATHER
    if mode not in (COLUMNS_GATHER, COLUMNS_CHANNELS_LAST):
        raise ValueError(f"workload {wl.op}: columns must be absent, {COLUMNS_GATHER!r} or "
                         f"{COLUMNS_CHANNELS_LAST!r}, got {mode!r}")
    return mode


class Placeholders:
    """The kernel-argument tensors shared by the forward and backward definitions."""

    def __init__(self, geo: ConvGeometry, with_bias: bool):
        N, C, K, dtype = geo.batch, geo.in_channels, geo.taps, geo.dtype
        self.data = te.placeholder((N, C, geo.height * geo.width), dtype, name="input")
        self.offset = te.placeholder((N, 2 * geo.offset_groups * K, geo.pixels), dtype, name="offset")
        self.mask = (te.placeholder((N, geo.offset_groups * K, geo.pixels), dtype, name="mask")
                     if geo.with_mask else None)
        self.weight = te.placeholder((geo.out_channels, geo.reduction), dtype, name="weight")
        self.bias = te.placeholder((geo.out_channels,), dtype, name="bias") if with_bias else None
        self.grad_output = te.placeholder((N, geo.out_channels, geo.pixels), dtype, name="grad_output")

    def sampling_args(self) -> list[te.Tensor]:
        """input, offset[, mask]: the tensors that determine the deformable columns."""
        return [self.data, self.offset] + ([self.mask] if self.mask is not None else [])


def forward_gemm(geo: ConvGeometry, weight: te.Tensor, columns: te.Tensor) -> te.Tensor:
    """Stage 4: (N, Cout, P') weight x columns per group, for either column layout: (N, C*K, P')
    (gather) or (N, C, K, P') (channels-last; the reduction then runs over channel and tap). In
    the arithmetic's dtype (a half weight is widened to float32)."""
    if len(columns.shape) == 4:
        rc = te.reduce_axis((0, geo.group_in_channels), name="rc")
        rk = te.reduce_axis((0, geo.taps), name="rk")
        return te.compute(
            (geo.batch, geo.out_channels, geo.padded_pixels),
            lambda n, co, p: te.sum(
                _as(weight[co, rc * geo.taps + rk], geo.compute_dtype)
                * columns[n, (co // geo.group_out_channels) * geo.group_in_channels + rc, rk, p], axis=[rc, rk]),
            name="gemm")
    r = te.reduce_axis((0, geo.reduction), name="r")
    return te.compute(
        (geo.batch, geo.out_channels, geo.padded_pixels),
        lambda n, co, p: te.sum(
            _as(weight[co, r], geo.compute_dtype) * columns[n, (co // geo.group_out_channels) * geo.reduction + r, p],
            axis=r),
        name="gemm")


def bfloat16_bits(value):
    """The bfloat16 nearest a float32 ``value`` (ties to even; NaN stays a quiet NaN) as its
    uint16 bit pattern. Bit patterns, not bfloat16 values: TVM widens intermediate bfloat16
    buffers to float32, and the dot product needs the 16-bit layout."""
    bits = tirx.reinterpret("uint32", value)
    rounded = (bits + tirx.const(0x7FFF, "uint32") + ((bits >> tirx.const(16, "uint32")) & tirx.const(1, "uint32"))) \
        >> tirx.const(16, "uint32")
    # NaN tested on the bits: TVM folds ``value != value`` to false.
    nan = (bits & tirx.const(0x7FFFFFFF, "uint32")) > tirx.const(0x7F800000, "uint32")
    return te.if_then_else(nan, tirx.const(0x7FC0, "uint16"), rounded.astype("uint16"))


def bfloat16_value(bits):
    """The float32 value of a bfloat16 uint16 bit pattern ``bits`` (exact)."""
    return tirx.reinterpret("float32", bits.astype("uint32") << tirx.const(16, "uint32"))


def pair_columns(geo: ConvGeometry, columns: te.Tensor) -> te.Tensor:
    """Stage 3 of the ``gemm=GEMM_BF16_DOT`` forward: (N, P'/16, C*K/2, 2, 16), the columns (either
    layout) rounded to bfloat16 (uint16 bit patterns, ``bfloat16_bits``), per vector of 16 pixels
    the rows in pairs: row 2*r2 + t of pixel 16*v + l at [n, v, r2, t, l]. ``vdpbf16ps`` multiplies
    a pair of rows (interleaved in registers) by a pair of consecutive weights (one 32-bit
    broadcast: the weight as given)."""
    K = geo.taps

    def value(n, v, r2, t, l):
        row, p = 2 * r2 + t, v * DOT_LANES + l
        return bfloat16_bits(columns[n, row // K, row % K, p] if len(columns.shape) == 4 else columns[n, row, p])

    shape = (geo.batch, geo.padded_pixels // DOT_LANES, geo.in_channels * K // 2, 2, DOT_LANES)
    return te.compute(shape, value, name="deform_col_pairs")


def pair_gemm(geo: ConvGeometry, weight: te.Tensor, pairs: te.Tensor) -> te.Tensor:
    """Stage 4 of the ``gemm=GEMM_BF16_DOT`` forward: (N, Cout, P') float32, the bfloat16 weight
    times the paired columns (``pair_columns``), products and sums in float32, per group."""
    half = geo.reduction // 2
    r2 = te.reduce_axis((0, half), name="r2")
    t = te.reduce_axis((0, 2), name="rt")
    return te.compute(
        (geo.batch, geo.out_channels, geo.padded_pixels),
        lambda n, co, p: te.sum(
            weight[co, 2 * r2 + t].astype("float32")
            * bfloat16_value(pairs[n, p // DOT_LANES, (co // geo.group_out_channels) * half + r2, t, p % DOT_LANES]),
            axis=[r2, t]),
        name="gemm")


@register(FORWARD, gpu_params={"columns": COLUMNS_GATHER}, cpu_params=cpu_params)
def build_forward(wl: Workload) -> OperatorDef:
    """Kernel arguments: input, offset, [mask], weight, [bias] -> output (N, Cout, P), all of the
    workload's dtype (half dtypes: sampling, sums and the output's GEMM in float32, the output
    rounded once)."""
    geo = ConvGeometry(wl)
    t = Placeholders(geo, geo.with_bias)
    corner_index, corner_weight = sampling_stages(geo, t.offset, t.mask)
    columns = forward_columns(wl, geo, t.data, corner_index, corner_weight)
    if geo.gemm == GEMM_BF16_DOT:
        gemm = pair_gemm(geo, t.weight, pair_columns(geo, columns))
    elif geo.dtype != geo.compute_dtype:
        gemm = forward_gemm(geo, widened_weight(geo, t.weight), columns)
    else:
        gemm = forward_gemm(geo, t.weight, columns)
    if t.bias is None:
        out = te.compute((geo.batch, geo.out_channels, geo.pixels), lambda n, co, p: _as(gemm[n, co, p], geo.dtype),
                         name="output")
    else:
        out = te.compute((geo.batch, geo.out_channels, geo.pixels),
                         lambda n, co, p: _as(gemm[n, co, p] + _as(t.bias[co], geo.compute_dtype), geo.dtype),
                         name="output")
    args = t.sampling_args() + [t.weight] + ([t.bias] if t.bias is not None else [])
    return OperatorDef(args + [out])


def widened_weight(geo: ConvGeometry, weight: te.Tensor) -> te.Tensor:
    """A half weight widened to float32 once, not per use in a GEMM's inner loop (where each
    conversion also keeps the broadcast from folding into the FMA)."""
    return te.compute(weight.shape, lambda co, r: weight[co, r].astype(geo.compute_dtype), name="weight_widened")


def padded_grad_output(geo: ConvGeometry, grad_output: te.Tensor) -> te.Tensor:
    """(N, Cout, P') output gradient, zero on the padding pixels (so GEMMs run over P'), in the
    arithmetic's dtype."""
    return te.compute(
        (geo.batch, geo.out_channels, geo.padded_pixels),
        lambda n, co, p: te.if_then_else(p < geo.pixels, _as(grad_output[n, co, te.min(p, geo.pixels - 1)],
                                                             geo.compute_dtype),
                                         tirx.const(0, geo.compute_dtype)),
        name="grad_output_padded")


def grad_output_bits(geo: ConvGeometry, grad_output: te.Tensor) -> te.Tensor:
    """(N, Cout, P') the bfloat16 output gradient as uint16 bit patterns (``bfloat16_bits`` of its
    exact float32 value: the same bits), zero on the padding pixels: the pixel pairs of the
    ``gemm=GEMM_BF16_DOT`` weight gradient (a 32-bit broadcast each)."""
    return te.compute(
        (geo.batch, geo.out_channels, geo.padded_pixels),
        lambda n, co, p: te.if_then_else(
            p < geo.pixels, bfloat16_bits(grad_output[n, co, te.min(p, geo.pixels - 1)].astype("float32")),
            tirx.const(0, "uint16")),
        name="grad_output_bits")


def pixel_pair_columns(geo: ConvGeometry, columns: te.Tensor) -> te.Tensor:
    """(N, C*K/16, P'/2, 2, 16): the (N, C*K, P') columns rounded to bfloat16 (uint16 bit patterns),
    per vector of 16 rows the pixels in pairs: row 16*v + l of pixel 2*p2 + t at [n, v, p2, t, l],
    the operand of ``vdpbf16ps`` in the weight gradient (16 weight columns, a pair of pixels)."""
    shape = (geo.batch, geo.in_channels * geo.taps // DOT_LANES, geo.padded_pixels // 2, 2, DOT_LANES)
    return te.compute(shape, lambda n, v, p2, t, l: bfloat16_bits(columns[n, v * DOT_LANES + l, 2 * p2 + t]),
                      name="deform_col_pixel_pairs")


def weight_gradient(geo: ConvGeometry, grad_out: te.Tensor, columns: te.Tensor, name: str = "grad_weight") -> te.Tensor:
    """(Cout, C/groups*K) grad_output x columns^T over (batch, pixel), per group, in the
    arithmetic's dtype: from the padded output gradient and the (N, C*K, P') columns, or with
    ``gemm=GEMM_BF16_DOT`` from their bfloat16 bits (``grad_output_bits``, ``pixel_pair_columns``),
    products and sums in float32."""
    n = te.reduce_axis((0, geo.batch), name="n")
    if geo.gemm != GEMM_BF16_DOT:
        p = te.reduce_axis((0, geo.padded_pixels), name="p")
        return te.compute(
            (geo.out_channels, geo.reduction),
            lambda co, r: te.sum(
                grad_out[n, co, p] * columns[n, (co // geo.group_out_channels) * geo.reduction + r, p], axis=[n, p]),
            name=name)
    p2 = te.reduce_axis((0, geo.padded_pixels // 2), name="p2")
    t = te.reduce_axis((0, 2), name="t")

    def total(co, r):
        row = (co // geo.group_out_channels) * geo.reduction + r
        return te.sum(bfloat16_value(grad_out[n, co, 2 * p2 + t])
                      * bfloat16_value(columns[n, row // DOT_LANES, p2, t, row % DOT_LANES]), axis=[n, p2, t])

    return te.compute((geo.out_channels, geo.reduction), total, name=name)


def column_gradient(geo: ConvGeometry, weight: te.Tensor, grad_out: te.Tensor) -> te.Tensor:
    """(N, C*K, P') gradient of the deformable columns: weight^T x grad_output, per group, in the
    arithmetic's dtype (the weight of a half workload comes widened: ``widened_weight``)."""
    o = te.reduce_axis((0, geo.group_out_channels), name="o")

    def grad(n, row, p):
        g = row // geo.reduction
        co = g * geo.group_out_channels + o
        return te.sum(_as(weight[co, row - g * geo.reduction], geo.compute_dtype) * grad_out[n, co, p], axis=o)

    return te.compute((geo.batch, geo.in_channels * geo.taps, geo.padded_pixels), grad, name="grad_col")


def paired_weight_transposed(geo: ConvGeometry, weight: te.Tensor) -> te.Tensor:
    """(C*K, Cout/groups/2, 2) the bfloat16 weight transposed, as uint16 bit patterns: for column
    row c*K + k of group g, its group's output channels in pairs, ``[row, o2, t]`` the weight of
    output channel 2*o2 + t (one 32-bit broadcast of the column gradient's dot product)."""
    def bits(row, o2, t):
        g = row // geo.reduction
        return bfloat16_bits(weight[g * geo.group_out_channels + 2 * o2 + t, row - g * geo.reduction].astype("float32"))

    return te.compute((geo.in_channels * geo.taps, geo.group_out_channels // 2, 2), bits, name="weight_pairs")


def paired_grad_output(geo: ConvGeometry, grad_output: te.Tensor) -> te.Tensor:
    """(N, P'/16, Cout/2, 2, 16) the bfloat16 output gradient as uint16 bit patterns, zero on the
    padding pixels, per vector of 16 pixels its output channels in pairs (the layout of
    ``pair_columns``, with output channels for rows)."""
    P = geo.pixels

    def bits(n, v, o2, t, l):
        p = v * DOT_LANES + l
        value = grad_output[n, 2 * o2 + t, te.min(p, P - 1)].astype("float32")
        return te.if_then_else(p < P, bfloat16_bits(value), tirx.const(0, "uint16"))

    shape = (geo.batch, geo.padded_pixels // DOT_LANES, geo.out_channels // 2, 2, DOT_LANES)
    return te.compute(shape, bits, name="grad_output_pairs")


def paired_column_gradient(geo: ConvGeometry, weight_pairs: te.Tensor, grad_out_pairs: te.Tensor) -> te.Tensor:
    """The ``gemm=GEMM_BF16_DOT`` column gradient (``column_gradient``): products of bfloat16 values
    (exact in float32) summed in float32, a pair of output channels per step."""
    pairs = geo.group_out_channels // 2
    o2 = te.reduce_axis((0, pairs), name="o2")
    t = te.reduce_axis((0, 2), name="ot")

    def grad(n, row, p):
        g = row // geo.reduction
        return te.sum(bfloat16_value(weight_pairs[row, o2, t])
                      * bfloat16_value(grad_out_pairs[n, p // DOT_LANES, g * pairs + o2, t, p % DOT_LANES]),
                      axis=[o2, t])

    return te.compute((geo.batch, geo.in_channels * geo.taps, geo.padded_pixels), grad, name="grad_col")


def corner_sums(geo: ConvGeometry, data: te.Tensor, corner_index: te.Tensor, grad_col: te.Tensor) -> te.Tensor:
    """(N, OG, K, 4, P') sum over the offset group's channels of grad_col x input at each corner:
    everything the offset and mask gradients need from the input."""
    K, cpg = geo.taps, geo.channels_per_offset_group
    ci = te.reduce_axis((0, cpg), name="ci")

    def total(n, g, k, q, p):
        c = g * cpg + ci
        return te.sum(grad_col[n, c * K + k, p] * _as(data[n, c, corner_index[n, g, k, q, p]], geo.compute_dtype),
                      axis=ci)

    shape = (geo.batch, geo.offset_groups, K, 4, geo.padded_pixels)
    return te.compute(shape, total, name="corner_sum")


def offset_gradient(geo: ConvGeometry, sample: te.Tensor, sums: te.Tensor, mask: te.Tensor | None) -> te.Tensor:
    """(N, 2*OG*K, P) d loss / d offset: the derivative of each corner's bilinear weight along the
    axis, weighted by that corner's sum; corners outside the image contribute nothing."""
    K = geo.taps

    def grad(n, channel, p):
        g, k, axis = channel // (2 * K), (channel // 2) % K, channel % 2
        total = tirx.const(0, geo.compute_dtype)
        for q in range(4):
            corner = BilinearCorner(geo, sample, n, g, k, q, p)
            # d(weight_y * weight_x)/dy = +-weight_x, /dx = +-weight_y
            sign_y = te.if_then_else(corner.dy == 1, corner.one, -corner.one)
            sign_x = te.if_then_else(corner.dx == 1, corner.one, -corner.one)
            slope = te.if_then_else(axis == 0, sign_y * corner.weight_x(), sign_x * corner.weight_y())
            total = total + corner.masked(slope * sums[n, g, k, q, p])
        if mask is not None:
            total = total * _as(mask[n, g * K + k, p], geo.compute_dtype)
        return _as(total, geo.dtype)

    return te.compute((geo.batch, 2 * geo.offset_groups * K, geo.pixels), grad, name="grad_offset")


def mask_gradient(geo: ConvGeometry, sample: te.Tensor, sums: te.Tensor) -> te.Tensor:
    """(N, OG*K, P) d loss / d mask: the unmasked bilinear sample, weighted by the corner sums."""
    K = geo.taps

    def grad(n, channel, p):
        g, k = channel // K, channel % K
        total = tirx.const(0, geo.compute_dtype)
        for q in range(4):
            corner = BilinearCorner(geo, sample, n, g, k, q, p)
            total = total + corner.masked(corner.weight_y() * corner.weight_x() * sums[n, g, k, q, p])
        return _as(total, geo.dtype)

    return te.compute((geo.batch, geo.offset_groups * K, geo.pixels), grad, name="grad_mask")


def input_gradient(geo: ConvGeometry, grad_col: te.Tensor, corner_index: te.Tensor,
                   corner_weight: te.Tensor, atomic: bool = False, name: str = "grad_input") -> te.Tensor:
    """(N, C, H*W) d loss / d input: each column entry's gradient scattered to its four corners.

    A scatter, which ``te.compute`` cannot express: an extern stage. CPU formulation: every
    (batch, channel) plane is written by one task, so the planes run in parallel with no atomics
    and the summation order is fixed (bit-reproducible gradients). GPU formulation (``atomic``):
    one thread per (batch, channel, tap, pixel), pixels fastest (a warp reads contiguous column
    gradients, indices and weights), adding to the in-image corners with atomics; out-of-image
    corners (weight 0, index 0) are skipped, they would all hit element 0 of the plane.
    """
    from tvm.script.ir_builder import IRBuilder
    from tvm.script.ir_builder import tirx as T

    N, C, K, HW, P = geo.batch, geo.in_channels, geo.taps, geo.height * geo.width, geo.pixels
    cpg = geo.channels_per_offset_group
    dtype = geo.compute_dtype  # half gradients: summed in float32, rounded by the caller
    if atomic:
        def add(t, ins, grad_input):
            grad_col_buf, index_buf, weight_buf = ins
            n, c, k, p = gpu_scatter.unravel(t, (N, C, K, P))
            g = c // cpg
            column_grad = grad_col_buf[n, c * K + k, p]
            for q in range(4):
                w = weight_buf[n, g, k, q, p]
                with gpu_scatter.when(w != tirx.const(0, dtype)):
                    gpu_scatter.atomic_add(grad_input, (n, c, index_buf[n, g, k, q, p]), w * column_grad)

        return gpu_scatter.atomic_scatter(name, (N, C, HW), dtype, [grad_col, corner_index, corner_weight],
                                          N * C * K * P, add)

    def body(ins, outs):
        grad_col_buf, index_buf, weight_buf = (T.buffer_proxy(b) for b in ins)
        grad_input = T.buffer_proxy(outs[0])
        with IRBuilder() as ib:
            with T.parallel(0, N * C) as plane:
                n, c = plane // C, plane % C
                g = c // cpg
                with T.serial(0, HW) as i:
                    grad_input[n, c, i] = tirx.const(0, dtype)
                with T.serial(0, K) as k:
                    with T.serial(0, P) as p:
                        column_grad = grad_col_buf[n, c * K + k, p]
                        for q in range(4):
                            target = index_buf[n, g, k, q, p]
                            grad_input[n, c, target] = (grad_input[n, c, target]
                                                        + weight_buf[n, g, k, q, p] * column_grad)
        return ib.get()

    return te.extern([(N, C, HW)], [grad_col, corner_index, corner_weight], body, dtype=dtype, name=name)


@register(BACKWARD_DATA, scatter=lambda wl: wl["need_input"], cpu_params=backward_data_cpu_params)
def build_backward_data(wl: Workload) -> OperatorDef:
    """Kernel arguments: grad_output, input, offset, [mask], weight ->
    [grad_input (N, C, H*W)] if need_input, [grad_offset, [grad_mask]] if need_sampling, all of the
    workload's dtype. Half dtypes: the column gradient, sums and scatter in float32, each gradient
    rounded once; with ``gemm=GEMM_BF16_DOT`` the column gradient is AVX512-BF16's dot product of
    the bfloat16 weight and output gradient (exact products, float32 sums)."""
    geo = ConvGeometry(wl)
    half = geo.dtype != geo.compute_dtype
    t = Placeholders(geo, with_bias=False)
    sample = sample_coordinates(geo, t.offset)
    corner_index = corner_indices(geo, sample)
    if geo.gemm == GEMM_BF16_DOT:
        grad_col = paired_column_gradient(geo, paired_weight_transposed(geo, t.weight),
                                          paired_grad_output(geo, t.grad_output))
    else:
        grad_col = column_gradient(geo, widened_weight(geo, t.weight) if half else t.weight,
                                   padded_grad_output(geo, t.grad_output))
    outputs = []
    if wl["need_input"]:
        grad_input = input_gradient(geo, grad_col, corner_index, corner_weights(geo, sample, t.mask),
                                    atomic=atomic_scatter(wl), name="grad_input_sum" if half else "grad_input")
        outputs.append(_rounded(grad_input, geo.dtype, "grad_input") if half else grad_input)
    if wl["need_sampling"]:
        sums = corner_sums(geo, t.data, corner_index, grad_col)
        outputs.append(offset_gradient(geo, sample, sums, t.mask))
        if t.mask is not None:
            outputs.append(mask_gradient(geo, sample, sums))
    return OperatorDef([t.grad_output] + t.sampling_args() + [t.weight] + outputs, num_outputs=len(outputs))


@register(BACKWARD_WEIGHT, cpu_params=backward_weight_cpu_params)
def build_backward_weight(wl: Workload) -> OperatorDef:
    """Kernel arguments: grad_output, input, offset, [mask] ->
    [grad_weight (Cout, C/groups*K)] if need_weight, [grad_bias (Cout,)] if with_bias, all of the
    workload's dtype. Half dtypes: sampling, columns and sums in float32 (``grad_weight_sum``,
    ``grad_bias_sum``), each gradient rounded once; with ``gemm=GEMM_BF16_DOT`` the columns are
    rounded to bfloat16 and multiplied by AVX512-BF16's dot product."""
    geo = ConvGeometry(wl)
    half = geo.dtype != geo.compute_dtype
    t = Placeholders(geo, with_bias=False)
    outputs = []
    if wl["need_weight"]:
        corner_index, corner_weight = sampling_stages(geo, t.offset, t.mask)
        columns = deformable_columns(geo, t.data, corner_index, corner_weight)
        if geo.gemm == GEMM_BF16_DOT:
            grad = weight_gradient(geo, grad_output_bits(geo, t.grad_output), pixel_pair_columns(geo, columns),
                                   name="grad_weight_sum")
        else:
            grad = weight_gradient(geo, padded_grad_output(geo, t.grad_output), columns,
                                   name="grad_weight_sum" if half else "grad_weight")
        outputs.append(_rounded(grad, geo.dtype, "grad_weight") if half else grad)
    if wl["with_bias"]:
        n = te.reduce_axis((0, geo.batch), name="n")
        p = te.reduce_axis((0, geo.pixels), name="p")
        grad = te.compute((geo.out_channels,), lambda co: te.sum(_as(t.grad_output[n, co, p], geo.compute_dtype),
                                                                 axis=[n, p]),
                          name="grad_bias_sum" if half else "grad_bias")
        outputs.append(_rounded(grad, geo.dtype, "grad_bias") if half else grad)
    args = [t.grad_output] + (t.sampling_args() if wl["need_weight"] else [])
    return OperatorDef(args + outputs, num_outputs=len(outputs))


def _rounded(value: te.Tensor, dtype: str, name: str) -> te.Tensor:
    """``value`` (float32) rounded to ``dtype`` once, as stage ``name``."""
    return te.compute(value.shape, lambda *i: value(*i).astype(dtype), name=name)
