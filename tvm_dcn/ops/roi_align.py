"""RoI Align and RoI Pool, plain and position-sensitive, with torchvision's semantics, in TE/TIR.

Kernel arguments (all operators of this family):

- ``input``  (N, C, H*W): the feature map, spatial axes flattened.
- ``rois``   (R, 5): rows (batch index, x1, y1, x2, y2) in image coordinates. R is the number of
  RoIs rounded up to a *bucket* (:func:`roi_bucket`), so that a new box count rarely recompiles;
  the bridge pads with rows whose batch index is -1, which every stage skips.
- ``scalars`` (1,) or more: ``spatial_scale`` (and, for the deformable variants, gamma or
  trans_std), in the input's dtype, so that no float is baked into a kernel.

Sampling operators (RoI Align, PS RoI Align and the deformable variants in ``deform_roi_pool.py``)
are built from the same stages:

1. ``roi_batch``         (R,)           batch index of each RoI, -1 for padding rows.
2. ``roi_geometry``      (R, 2, 3)      per axis (0: y, 1: x): start, bin size, RoI size.
3. ``roi_grid``          (R, 2)         samples per bin along each axis: ``sampling_ratio``, or the
                                        adaptive ``ceil(roi_size / pooled)`` clamped to the
                                        workload's ``grid`` bound (computed from the boxes by the
                                        bridge and bucketed to a power of two); 0 for padding.
4. ``{y,x}_index``       (R', TH, TW, G, 2) flat offsets (row * W, column) of the two linear
   ``{y,x}_weight``                      interpolation corners of each sample along each axis, and
                                        their weights. Bilinear interpolation is separable: the
                                        weight of corner (a, b) is ``y_weight[a] * x_weight[b]``,
                                        and torchvision's out-of-image rule (zero outside
                                        [-1, H] x [-1, W]) is a product of one rule per axis. The
                                        tables are small (no channel axis) and shared by every
                                        channel. TH/TW are 1 where a position does not depend on
                                        the bin column/row (RoI Align) and PH/PW where it does
                                        (deformable pooling).
5. the gather            (R, C', PH, PW) sum over the bin's active samples of the four weighted
                                        corners; 1/count is folded into ``y_weight``.

Backward passes are scatters into the input gradient. ``te.compute`` cannot scatter and the CPU
has no atomics, so they are written in TVMScript (``te.extern_primfunc``) with one parallel task
per block of (batch, channel) planes, which never collide; every task loops over all RoIs of its
batch in order, so gradients are deterministic. The bilinear scatter accumulates a block of
channels in a channels-last scratch (one vector update per sample corner) and transposes it into
the planes at the end.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

from tvm import te, tirx
from tvm.script import tirx as T
from tvm.script.ir_builder import tirx as T_ib

from .._utils import int_pair
from . import gpu_scatter
from .registry import OperatorDef, atomic_scatter, register
from .workload import Workload

ROI_ALIGN = "roi_align"
ROI_POOL = "roi_pool"
PS_ROI_ALIGN = "ps_roi_align"
PS_ROI_POOL = "ps_roi_pool"
BACKWARD = "_backward"

# torchvision initialises its max pooling with -FLT_MAX in float32 and float64 alike.
FLT_MAX = 3.4028234663852886e38
MIN_ROI_BUCKET = 16
# Adaptive sampling beyond this many samples per bin and axis is refused (the tables would be huge).
MAX_GRID = 1024
# Channels per backward task: a task's accumulator (pixels x channels) should stay in the L2
# cache, and there should be enough tasks for the cores.
_SCATTER_PLANE_BYTES = 512 * 1024
_SCATTER_MAX_BLOCK = 64
_SCATTER_MIN_TASKS = 8


# --------------------------------------------------------------------------------------------
# Buckets and workloads


def roi_bucket(num_rois: int) -> int:
    """Number of RoI rows a kernel is compiled for: the smallest of 16, 24, 32, 48, 64, 96, ...
    (powers of two and 1.5 times powers of two) that holds ``num_rois``."""
    if num_rois < 0:
        raise ValueError(f"num_rois must be non-negative, got {num_rois}")
    size = MIN_ROI_BUCKET
    while True:
        if num_rois <= size:
            return size
        if num_rois <= size * 3 // 2:
            return size * 3 // 2
        size *= 2


def grid_bucket(samples: int) -> int:
    """Bound on adaptive samples per bin and axis: the next power of two (at least 1)."""
    samples = max(int(samples), 1)
    return 1 << (samples - 1).bit_length()


def adaptive_grid_bound(height: int, width: int, output_size) -> tuple[int, int]:
    """Adaptive-sampling bound for boxes inside a ``height x width`` feature map (a workload
    default for tuning; the bridge measures the boxes of each call instead)."""
    ph, pw = int_pair(output_size, "output_size")
    return (grid_bucket(math.ceil(height / ph)), grid_bucket(math.ceil(width / pw)))


def align_params(sampling_ratio: int, max_grid, height: int, width: int, output_size) -> tuple[int, tuple[int, int]]:
    """(sampling_ratio, grid) workload parameters: a fixed ratio, or for adaptive sampling (0) the
    bucketed bound on samples per bin (``max_grid``, else that of boxes inside the map)."""
    if sampling_ratio > 0:
        return sampling_ratio, (sampling_ratio, sampling_ratio)
    grid = adaptive_grid_bound(height, width, output_size) if max_grid is None else int_pair(max_grid, "max_grid")
    return 0, (grid_bucket(grid[0]), grid_bucket(grid[1]))


def roi_align_workload(*, batch, channels, height, width, num_rois, output_size, sampling_ratio=-1,
                       aligned=False, max_grid=None, backward=False, dtype="float32") -> Workload:
    """Workload of ``roi_align`` (or its backward) for ``num_rois`` boxes (bucketed here).

    ``max_grid``: for adaptive sampling (``sampling_ratio <= 0``), the largest number of samples
    per bin along (y, x) among the boxes (bucketed here); default: boxes inside the feature map.
    """
    ratio, grid = align_params(sampling_ratio, max_grid, height, width, output_size)
    return Workload.make(ROI_ALIGN + (BACKWARD if backward else ""), dtype, batch=batch, channels=channels,
                         height=height, width=width, num_rois=roi_bucket(num_rois),
                         output_size=int_pair(output_size, "output_size"), sampling_ratio=ratio, grid=grid,
                         aligned=bool(aligned))


def ps_roi_align_workload(*, batch, channels, height, width, num_rois, output_size, sampling_ratio=-1,
                          max_grid=None, backward=False, dtype="float32") -> Workload:
    """Workload of ``ps_roi_align`` (``channels``: input channels, a multiple of PH * PW)."""
    ratio, grid = align_params(sampling_ratio, max_grid, height, width, output_size)
    return Workload.make(PS_ROI_ALIGN + (BACKWARD if backward else ""), dtype, batch=batch, channels=channels,
                         height=height, width=width, num_rois=roi_bucket(num_rois),
                         output_size=int_pair(output_size, "output_size"), sampling_ratio=ratio, grid=grid)


def pool_bin_bound(height: int, width: int, output_size, max_roi_size=None) -> tuple[int, int]:
    """Bound on the rows/columns of one RoI Pool bin: ``ceil(roi / pooled) + 1`` for the largest RoI
    (in feature-map pixels, (h, w); default: the feature map), bucketed to a power of two and
    clipped to the map."""
    ph, pw = int_pair(output_size, "output_size")
    roi_h, roi_w = (height, width) if max_roi_size is None else max_roi_size
    return (min(height, grid_bucket(math.ceil(roi_h / ph) + 1)), min(width, grid_bucket(math.ceil(roi_w / pw) + 1)))


def roi_pool_workload(*, batch, channels, height, width, num_rois, output_size, max_roi_size=None,
                      backward=False, position_sensitive=False, dtype="float32") -> Workload:
    """Workload of ``roi_pool`` or ``ps_roi_pool`` (``position_sensitive``), or their backward."""
    op = (PS_ROI_POOL if position_sensitive else ROI_POOL) + (BACKWARD if backward else "")
    return Workload.make(op, dtype, batch=batch, channels=channels, height=height, width=width,
                         num_rois=roi_bucket(num_rois), output_size=int_pair(output_size, "output_size"),
                         bin_bound=pool_bin_bound(height, width, output_size, max_roi_size))


class RoIShape:
    """Shapes shared by the RoI operators of a workload."""

    def __init__(self, wl: Workload):
        self.batch, self.channels = wl["batch"], wl["channels"]
        self.height, self.width = wl["height"], wl["width"]
        self.rois = wl["num_rois"]
        self.pooled_h, self.pooled_w = wl["output_size"]
        self.dtype = wl.dtype
        self.pixels = self.height * self.width

    def pooled(self, axis):
        """Bins along ``axis`` (0: y, 1: x; a TE expression or int)."""
        return te.if_then_else(axis == 0, self.pooled_h, self.pooled_w) if not isinstance(axis, int) \
            else (self.pooled_h, self.pooled_w)[axis]

    def extent(self, axis: int) -> int:
        return (self.height, self.width)[axis]

    def const(self, value):
        return tirx.const(value, self.dtype)

    def grad_placeholder(self, channels: Optional[int] = None, dtype: Optional[str] = None, name="grad_output"):
        """(R, channels, PH, PW): an output gradient (or, with ``dtype="int32"``, RoI Pool's argmax)."""
        return te.placeholder((self.rois, self.channels if channels is None else channels, self.pooled_h,
                               self.pooled_w), dtype or self.dtype, name=name)

    def placeholders(self, num_scalars: int = 1):
        data = te.placeholder((self.batch, self.channels, self.pixels), self.dtype, name="input")
        rois = te.placeholder((self.rois, 5), self.dtype, name="rois")
        scalars = te.placeholder((num_scalars,), self.dtype, name="scalars")
        return data, rois, scalars


def scatter_channel_block(outer_tasks: int, channels: int, pixels: int, dtype: str) -> int:
    """Channels per backward task (``outer_tasks`` tasks per channel: images x channel groups):
    the largest divisor of ``channels`` that is at most ``_SCATTER_MAX_BLOCK``, leaves at least
    ``_SCATTER_MIN_TASKS`` tasks and whose planes fit in ``_SCATTER_PLANE_BYTES`` (one at least)."""
    plane = pixels * (8 if dtype == "float64" else 4)
    limit = min(_SCATTER_MAX_BLOCK, _SCATTER_PLANE_BYTES // max(plane, 1),
                max(1, outer_tasks * channels // _SCATTER_MIN_TASKS))
    for block in range(max(1, min(limit, channels)), 0, -1):
        if channels % block == 0:
            return block
    return 1


# --------------------------------------------------------------------------------------------
# Shared stages


def roi_batch_index(s: RoIShape, rois: te.Tensor) -> te.Tensor:
    """(R,) batch index of each RoI (truncated, as torchvision's int cast); -1 outside [0, N)."""
    def index(k):
        b = rois[k, 0].astype("int32")
        return te.if_then_else(tirx.all(rois[k, 0] > -1, b < s.batch), b, -1)

    return te.compute((s.rois,), index, name="roi_batch")


def align_geometry(s: RoIShape, rois, scalars, shift: float, min_size: Optional[float]) -> te.Tensor:
    """(R, 2, 3): per axis (0: y, 1: x) the RoI start, bin size and RoI size in feature-map pixels,
    ``x * spatial_scale - shift``; sizes below ``min_size`` are raised to it (RoI Align, not aligned)."""
    def field(k, axis, f):
        lo = rois[k, 2 - axis] * scalars[0] - s.const(shift)
        hi = rois[k, 4 - axis] * scalars[0] - s.const(shift)
        size = hi - lo
        if min_size is not None:
            size = te.max(size, s.const(min_size))
        bin_size = size / s.pooled(axis).astype(s.dtype)
        return te.if_then_else(f == 0, lo, te.if_then_else(f == 1, bin_size, size))

    return te.compute((s.rois, 2, 3), field, name="roi_geometry")


def inverse_count(s: RoIShape, grid: te.Tensor) -> te.Tensor:
    """(R,) 1 / max(samples per bin, 1): the averaging factor, folded into the y weights."""
    return te.compute((s.rois,), lambda k: s.const(1) / te.max(grid[k, 0] * grid[k, 1], 1).astype(s.dtype),
                      name="roi_inv_count")


def sample_grid(s: RoIShape, geometry, batch_index, sampling_ratio: int, bound: Sequence[int]) -> te.Tensor:
    """(R, 2) samples per bin along (y, x): ``sampling_ratio`` or ``ceil(bin size)`` (adaptive),
    clamped to [0, bound]; 0 for padding rows."""
    def grid(k, axis):
        if sampling_ratio > 0:
            n = tirx.const(sampling_ratio, "int32")
        else:
            n = te.ceil(geometry[k, axis, 1]).astype("int32")
            n = te.min(te.max(n, 0), te.if_then_else(axis == 0, bound[0], bound[1]))
        return te.if_then_else(batch_index[k] >= 0, n, 0)

    return te.compute((s.rois, 2), grid, name="roi_grid")


class Interpolation:
    """Linear interpolation of a coordinate along one axis of ``extent`` pixels.

    ``rule`` ``"clamp_edge"`` is torchvision's (and mmcv's): zero outside [-1, extent], the
    coordinate raised to 0 below it, and both corners on the last pixel from ``extent - 1`` on.
    ``"psroi"`` is the official deformable PS RoI pooling's: zero outside [-0.5, extent - 0.5],
    coordinate clamped to [0, extent - 1], corners ``floor`` and ``ceil``.
    """

    def __init__(self, pos, extent: int, rule: str, dtype: str):
        zero, one = tirx.const(0, dtype), tirx.const(1, dtype)
        last = tirx.const(extent - 1, dtype)
        if rule == "clamp_edge":
            # Positive comparisons: NaN (every comparison false) is invalid, as in torchvision.
            self.valid = tirx.all(pos >= tirx.const(-1, dtype), pos <= tirx.const(extent, dtype))
            p = te.if_then_else(self.valid, te.max(pos, zero), zero)
            low = p.astype("int32")
            at_end = low >= extent - 1
            self.low = te.if_then_else(at_end, extent - 1, low)
            self.high = te.if_then_else(at_end, extent - 1, low + 1)
            self.frac = te.if_then_else(at_end, zero, p - low.astype(dtype))
            self.moving = tirx.all(self.valid, pos > zero, tirx.Not(at_end))
        elif rule == "psroi":
            half = tirx.const(0.5, dtype)
            self.valid = tirx.all(pos >= -half, pos <= tirx.const(extent, dtype) - half)
            p = te.if_then_else(self.valid, te.min(te.max(pos, zero), last), zero)
            floor = te.floor(p)
            self.low = floor.astype("int32")
            self.high = te.ceil(p).astype("int32")
            self.frac = p - floor
            self.moving = tirx.all(self.valid, pos > zero, pos < last)
        else:
            raise ValueError(f"unknown interpolation rule {rule!r}")
        self.one = one

    def corner_weight(self, a):
        return te.if_then_else(a == 0, self.one - self.frac, self.frac)

    def corner(self, a):
        return te.if_then_else(a == 0, self.low, self.high)

    def corner_slope(self, a):
        """d(corner weight)/d(position), zero where the position is clamped or invalid."""
        return te.if_then_else(self.moving, te.if_then_else(a == 0, -self.one, self.one), self.one * 0)


class AxisTable:
    """Interpolation tables of the samples along one axis, shape (R', TH, TW, G, 2).

    ``position(r, ph, pw, i)`` is sample i's coordinate in bin (ph, pw) of row r (ph/pw are 0 on a
    broadcast dimension), ``active(r, i)`` whether the sample exists, ``scale(r, ph, pw)`` an extra
    factor of the weights (1/count, a modulation mask). Stages: ``{name}_index`` (int32 flat offset
    of each corner: the pixel times ``stride``) and ``{name}_weight``; ``{name}_slope`` (the
    weights' derivative with respect to the position, times ``slope_scale``) on request.
    """

    def __init__(self, s: RoIShape, name: str, axis: int, shape, position: Callable, active: Callable,
                 rule: str, scale: Optional[Callable] = None):
        self.s, self.name, self.axis, self.shape = s, name, axis, tuple(shape)
        self.position, self.active, self.rule, self.scale = position, active, rule, scale
        self.extent = s.extent(axis)
        self.stride = s.width if axis == 0 else 1
        # Positions in a stage of their own keep the table expressions shallow.
        self.pos = te.compute(self.shape[:4], position, name=f"{name}_position")
        self.index = te.compute(self.shape, self._index, name=f"{name}_index")
        self.weight = te.compute(self.shape, self._weight, name=f"{name}_weight")

    def interpolation(self, r, ph, pw, i) -> Interpolation:
        return Interpolation(self.pos[r, ph, pw, i], self.extent, self.rule, self.s.dtype)

    def _index(self, r, ph, pw, i, a):
        interp = self.interpolation(r, ph, pw, i)
        return interp.corner(a) * self.stride

    def _weight(self, r, ph, pw, i, a):
        interp = self.interpolation(r, ph, pw, i)
        w = interp.corner_weight(a)
        if self.scale is not None:
            w = w * self.scale(r, ph, pw)
        return te.if_then_else(tirx.all(interp.valid, self.active(r, i)), w, self.s.const(0))

    def slope(self, slope_scale: Callable) -> te.Tensor:
        def fn(r, ph, pw, i, a):
            interp = self.interpolation(r, ph, pw, i)
            ds = interp.corner_slope(a) * slope_scale(r, ph, pw)
            return te.if_then_else(self.active(r, i), ds, self.s.const(0))

        return te.compute(self.shape, fn, name=f"{self.name}_slope")

    def at(self, table: te.Tensor, r, ph, pw, i, a):
        """``table[r, ph, pw, i, a]`` with broadcast dimensions indexed at 0 (works on TE tensors
        and TIR buffers alike)."""
        return table[r, ph if self.shape[1] > 1 else 0, pw if self.shape[2] > 1 else 0, i, a]


def bilinear_value(data, y: AxisTable, x: AxisTable, batch, channel, r, ph, pw, iy, ix,
                   y_weight=None, x_weight=None):
    """Sum over the four corners of sample (iy, ix) of weight times ``data[batch, channel, corner]``
    (the weights default to the tables' interpolation weights)."""
    y_weight = y.weight if y_weight is None else y_weight
    x_weight = x.weight if x_weight is None else x_weight
    terms = []
    for a in (0, 1):
        row = y.at(y.index, r, ph, pw, iy, a)
        wy = y.at(y_weight, r, ph, pw, iy, a)
        for b in (0, 1):
            value = data[batch, channel, row + x.at(x.index, r, ph, pw, ix, b)]
            terms.append(wy * x.at(x_weight, r, ph, pw, ix, b) * value)
    return terms[0] + terms[1] + terms[2] + terms[3]


def bilinear_gather(name: str, shape, data, y: AxisTable, x: AxisTable, locate: Callable,
                    active: Callable, bound: Sequence[int]) -> te.Tensor:
    """Stage ``name`` of ``shape`` (R, C', PH, PW): the sum over the active samples of a bin.

    ``locate(k, c, ph, pw) -> (row, batch, channel)`` names the table row and the input plane
    of an output element; ``active(row, iy, ix)`` whether sample (iy, ix) exists.
    """
    iy = te.reduce_axis((0, bound[0]), name="iy")
    ix = te.reduce_axis((0, bound[1]), name="ix")

    def fn(k, c, ph, pw):
        r, b, ch = locate(k, c, ph, pw)
        value = bilinear_value(data, y, x, b, ch, r, ph, pw, iy, ix)
        return te.sum(te.if_then_else(active(r, iy, ix), value, y.s.const(0)), axis=[iy, ix])

    return te.compute(shape, fn, name=name)


def lookup(values: Sequence[int], index):
    """``values[index]`` for a TE/TIR index expression: ``index`` itself for the identity, else a
    select chain over the short Python list (selects keep the result's bounds provable)."""
    values = list(values)
    if values == list(range(len(values))):
        return index
    expr = tirx.const(values[-1], "int32")
    for i in range(len(values) - 2, -1, -1):
        expr = tirx.Select(index == i, tirx.const(values[i], "int32"), expr)
    return expr


def _region(buf):
    return buf[tuple(slice(0, int(d)) for d in buf.shape)]


class PositionSensitiveMap:
    """Channel mapping of (position-sensitive) pooling: output channel ``co`` in bin (ph, pw) reads
    input channel ``(co * GH + gh(ph)) * GW + gw(pw)`` and table row ``k * classes + co // per_class``.
    Plain pooling is the one-group case (input channel = output channel, table row = RoI)."""

    def __init__(self, groups_h: int, groups_w: int, group_of_ph: Sequence[int], group_of_pw: Sequence[int],
                 out_channels: int, classes: int = 1):
        self.gh, self.gw = groups_h, groups_w
        self.group_of_ph, self.group_of_pw = list(group_of_ph), list(group_of_pw)
        self.out_channels, self.classes = out_channels, classes
        self.per_class = out_channels // classes

    @classmethod
    def plain(cls, s: RoIShape) -> "PositionSensitiveMap":
        return cls(1, 1, [0] * s.pooled_h, [0] * s.pooled_w, s.channels)

    def channel(self, co, ph, pw):
        return (co * self.gh + lookup(self.group_of_ph, ph)) * self.gw + lookup(self.group_of_pw, pw)

    def row(self, k, co):
        return k * self.classes + co // self.per_class if self.classes > 1 else k


def scatter_bilinear(s: RoIShape, grad: te.Tensor, batch_index: te.Tensor, grid: te.Tensor, y: AxisTable,
                     x: AxisTable, psmap: Optional[PositionSensitiveMap] = None, atomic: bool = False) -> te.Tensor:
    """Input gradient (N, C, H*W) of a bilinear gather (``bilinear_gather``): its adjoint scatter.

    One parallel task per (batch, channel group, block of output channels of one class). Channel
    ``co`` of the block feeds input channel ``psmap.channel(co, ...)`` from the bins of the group
    (every bin for plain pooling). A task accumulates in a channels-last scratch (H*W, block): for
    each RoI of its image, bin of its group and active sample (``grid`` (R', 2)), it loads the
    block's output gradients once and adds ``weight * grad`` to the four corners, each a contiguous
    vector update; the scratch is transposed into the planes at the end.

    GPU formulation (``atomic``): one thread per output-gradient element (RoI, channel, bin), bins
    fastest, adding ``weight * grad`` to the in-image corners of each active sample with atomics.
    """
    psmap = psmap or PositionSensitiveMap.plain(s)
    if atomic:
        return _atomic_scatter_bilinear(s, grad, batch_index, grid, y, x, psmap)
    N, C, P, dtype = s.batch, s.channels, s.pixels, s.dtype
    R, PH, PW = s.rois, s.pooled_h, s.pooled_w
    GH, GW = psmap.gh, psmap.gw
    groups = GH * GW
    group_of_ph, group_of_pw = psmap.group_of_ph, psmap.group_of_pw
    block = scatter_channel_block(N * groups, psmap.per_class, P, dtype)
    blocks = psmap.out_channels // block
    tasks = N * groups * blocks
    row_of = psmap.row
    at_y, at_x = y.at, x.at

    @T.prim_func(private=True, s_tir=True)
    def scatter(g: T.Buffer(grad.shape, dtype), bidx: T.Buffer(batch_index.shape, "int32"),
                grd: T.Buffer(grid.shape, "int32"), yi: T.Buffer(y.index.shape, "int32"),
                yw: T.Buffer(y.weight.shape, dtype), xi: T.Buffer(x.index.shape, "int32"),
                xw: T.Buffer(x.weight.shape, dtype), out: T.Buffer((N, C, P), dtype)):
        with T.sblock("scatter_root"):  # named: the PrimFunc has its own "root"
            for task in T.parallel(tasks):
                with T.sblock("scatter"):
                    T.reads(_region(g), _region(bidx), _region(grd), _region(yi), _region(yw), _region(xi),
                            _region(xw))
                    T.writes(out[task // (groups * blocks), 0:C, 0:P])
                    acc = T.sblock_alloc_buffer((P, block), dtype)
                    bin_grad = T.sblock_alloc_buffer((block,), dtype)
                    b = task // (groups * blocks)
                    group = task // blocks % groups
                    co0 = task % blocks * block
                    for p in range(P):
                        for ci in T.vectorized(block):
                            acc[p, ci] = T.cast(0, dtype)
                    for k in range(R):
                        if bidx[k] == b:
                            r = row_of(k, co0)
                            for ph, pw in T.grid(PH, PW):
                                if lookup(group_of_ph, ph) * GW + lookup(group_of_pw, pw) == group:
                                    for ci in range(block):
                                        bin_grad[ci] = g[k, co0 + ci, ph, pw]
                                    for iy in range(grd[r, 0]):
                                        for ix in range(grd[r, 1]):
                                            for a, bb in T.grid(2, 2):
                                                idx = at_y(yi, r, ph, pw, iy, a) + at_x(xi, r, ph, pw, ix, bb)
                                                w = at_y(yw, r, ph, pw, iy, a) * at_x(xw, r, ph, pw, ix, bb)
                                                for ci in T.vectorized(block):
                                                    acc[idx, ci] = acc[idx, ci] + w * bin_grad[ci]
                    for ci, p in T.grid(block, P):
                        out[b, (co0 + ci) * groups + group, p] = acc[p, ci]  # = psmap.channel(co, ph, pw)

    return te.extern_primfunc([grad, batch_index, grid, y.index, y.weight, x.index, x.weight], scatter)


def _atomic_scatter_bilinear(s: RoIShape, grad: te.Tensor, batch_index: te.Tensor, grid: te.Tensor, y: AxisTable,
                             x: AxisTable, psmap: PositionSensitiveMap) -> te.Tensor:
    """GPU input gradient of a bilinear gather (see :func:`scatter_bilinear`)."""
    R, CO, PH, PW = (int(d) for d in grad.shape)
    zero = s.const(0)

    def add(t, ins, out):
        g, bidx, grd, yi, yw, xi, xw = ins
        k, co, ph, pw = gpu_scatter.unravel(t, (R, CO, PH, PW))
        b = bidx[k]
        r = psmap.row(k, co)
        channel = psmap.channel(co, ph, pw)
        value = g[k, co, ph, pw]
        with gpu_scatter.when(b >= 0):
            with T_ib.serial(0, grd[r, 0]) as iy:
                with T_ib.serial(0, grd[r, 1]) as ix:
                    for a in (0, 1):
                        for bb in (0, 1):
                            w = y.at(yw, r, ph, pw, iy, a) * x.at(xw, r, ph, pw, ix, bb)
                            with gpu_scatter.when(w != zero):
                                idx = y.at(yi, r, ph, pw, iy, a) + x.at(xi, r, ph, pw, ix, bb)
                                gpu_scatter.atomic_add(out, (b, channel, idx), w * value)

    return gpu_scatter.atomic_scatter("scatter", (s.batch, s.channels, s.pixels), s.dtype,
                                      [grad, batch_index, grid, y.index, y.weight, x.index, x.weight],
                                      R * CO * PH * PW, add)


# --------------------------------------------------------------------------------------------
# RoI Align and PS RoI Align


class AlignStages:
    """Stages 1-4 of a torchvision-style RoI Align (plain or position-sensitive)."""

    def __init__(self, wl: Workload, aligned: bool, rois, scalars):
        s = self.s = RoIShape(wl)
        self.sampling_ratio = wl["sampling_ratio"]
        self.bound = wl["grid"]
        self.batch_index = roi_batch_index(s, rois)
        geo = self.geometry = align_geometry(s, rois, scalars, 0.5 if aligned else 0.0,
                                             None if aligned else 1.0)
        grid = self.grid = sample_grid(s, geo, self.batch_index, self.sampling_ratio, self.bound)
        inv_count = inverse_count(s, grid)

        def position(axis):
            def pos(k, ph, pw, i):
                p = ph if axis == 0 else pw
                return (geo[k, axis, 0] + p.astype(s.dtype) * geo[k, axis, 1]
                        + (i.astype(s.dtype) + s.const(0.5)) * geo[k, axis, 1] / grid[k, axis].astype(s.dtype))
            return pos

        self.y = AxisTable(s, "y", 0, (s.rois, s.pooled_h, 1, self.bound[0], 2), position(0),
                           lambda k, i: i < grid[k, 0], "clamp_edge", scale=lambda k, ph, pw: inv_count[k])
        self.x = AxisTable(s, "x", 1, (s.rois, 1, s.pooled_w, self.bound[1], 2), position(1),
                           lambda k, i: i < grid[k, 1], "clamp_edge")

    def active(self, k, iy, ix):
        return tirx.all(iy < self.grid[k, 0], ix < self.grid[k, 1])


def _ps_align_map(s: RoIShape) -> PositionSensitiveMap:
    return PositionSensitiveMap(s.pooled_h, s.pooled_w, range(s.pooled_h), range(s.pooled_w),
                                s.channels // (s.pooled_h * s.pooled_w))


def _ps_backward_inputs(wl: Workload):
    """Shapes, RoIs, scalars, channel map and output-gradient placeholder of a PS backward kernel."""
    s = RoIShape(wl)
    _, rois, scalars = s.placeholders()
    psmap = _ps_align_map(s)
    return s, rois, scalars, psmap, s.grad_placeholder(psmap.out_channels)


@register(ROI_ALIGN)
def build_roi_align(wl: Workload) -> OperatorDef:
    s = RoIShape(wl)
    data, rois, scalars = s.placeholders()
    st = AlignStages(wl, wl["aligned"], rois, scalars)
    out = bilinear_gather("output", (s.rois, s.channels, s.pooled_h, s.pooled_w), data, st.y, st.x,
                          lambda k, c, ph, pw: (k, te.max(st.batch_index[k], 0), c), st.active, st.bound)
    return OperatorDef([data, rois, scalars, out])


@register(ROI_ALIGN + BACKWARD, scatter=lambda wl: True)
def build_roi_align_backward(wl: Workload) -> OperatorDef:
    s = RoIShape(wl)
    _, rois, scalars = s.placeholders()
    grad = s.grad_placeholder()
    st = AlignStages(wl, wl["aligned"], rois, scalars)
    grad_input = scatter_bilinear(s, grad, st.batch_index, st.grid, st.y, st.x, atomic=atomic_scatter(wl))
    return OperatorDef([grad, rois, scalars, grad_input])


@register(PS_ROI_ALIGN)
def build_ps_roi_align(wl: Workload) -> OperatorDef:
    s = RoIShape(wl)
    data, rois, scalars = s.placeholders()
    st = AlignStages(wl, True, rois, scalars)
    psmap = _ps_align_map(s)
    out = bilinear_gather(
        "output", (s.rois, psmap.out_channels, s.pooled_h, s.pooled_w), data, st.y, st.x,
        lambda k, co, ph, pw: (k, te.max(st.batch_index[k], 0), psmap.channel(co, ph, pw)), st.active, st.bound)
    return OperatorDef([data, rois, scalars, out])


@register(PS_ROI_ALIGN + BACKWARD, scatter=lambda wl: True)
def build_ps_roi_align_backward(wl: Workload) -> OperatorDef:
    s, rois, scalars, psmap, grad = _ps_backward_inputs(wl)
    st = AlignStages(wl, True, rois, scalars)
    grad_input = scatter_bilinear(s, grad, st.batch_index, st.grid, st.y, st.x, psmap, atomic=atomic_scatter(wl))
    return OperatorDef([grad, rois, scalars, grad_input])


# --------------------------------------------------------------------------------------------
# RoI Pool (max) and PS RoI Pool (average) over integer bins


def round_half_away(x, dtype: str):
    """C's ``round`` of ``x`` (of ``dtype``): halves away from zero (``te.round`` rounds them to even)."""
    t = te.trunc(x)
    d = x - t  # exact
    one, half = tirx.const(1, dtype), tirx.const(0.5, dtype)
    return t + te.if_then_else(d >= half, one, te.if_then_else(d <= -half, -one, one * 0))


def pool_bins(s: RoIShape, rois, scalars, axis: int, position_sensitive: bool) -> te.Tensor:
    """(R, P, 2) int32: [start, end) pixel range of each bin along ``axis``, torchvision's rules.

    RoI Pool: RoI size ``max(round(x2 s) - round(x1 s) + 1, 1)``, bins clipped to [0, extent].
    PS RoI Pool: size ``max(round(x2 s) - round(x1 s), 1)``, bins clipped to [0, extent - 1] (as
    torchvision's forward does: its last row and column are never pooled).
    """
    pooled = s.pooled(axis)
    extent = s.extent(axis)
    hi_clip = extent - 1 if position_sensitive else extent

    def rng(k, p, side):
        start = round_half_away(rois[k, 1 + (1 - axis)] * scalars[0], s.dtype).astype("int32")
        end = round_half_away(rois[k, 3 + (1 - axis)] * scalars[0], s.dtype).astype("int32")
        size = te.max(end - start + (0 if position_sensitive else 1), 1)
        bin_size = size.astype(s.dtype) / s.const(pooled)
        lo = te.floor(p.astype(s.dtype) * bin_size).astype("int32")
        hi = te.ceil((p + 1).astype(s.dtype) * bin_size).astype("int32")
        edge = te.if_then_else(side == 0, lo, hi) + start
        return te.min(te.max(edge, 0), hi_clip)

    return te.compute((s.rois, pooled, 2), rng, name="row_bins" if axis == 0 else "col_bins")


class PoolStages:
    def __init__(self, wl: Workload, rois, scalars, position_sensitive: bool):
        s = self.s = RoIShape(wl)
        self.bound = wl["bin_bound"]
        self.batch_index = roi_batch_index(s, rois)
        self.rows = pool_bins(s, rois, scalars, 0, position_sensitive)
        self.cols = pool_bins(s, rois, scalars, 1, position_sensitive)

    def empty(self, k, ph, pw):
        return tirx.any(self.rows[k, ph, 1] <= self.rows[k, ph, 0], self.cols[k, pw, 1] <= self.cols[k, pw, 0],
                        self.batch_index[k] < 0)

    def pixel(self, k, ph, pw, dh, dw):
        """(inside the bin, flat pixel index) of offset (dh, dw) from the bin's first pixel."""
        h = self.rows[k, ph, 0] + dh
        w = self.cols[k, pw, 0] + dw
        inside = tirx.all(h < self.rows[k, ph, 1], w < self.cols[k, pw, 1])
        return inside, h * self.s.width + w


def _argmax_reducer(dtype):
    def combine(x, y):
        take = y[0] > x[0]  # strict: the first maximum in row-major order wins, as in torchvision
        # Selects (not if_then_else): both sides are plain values, and they vectorise correctly.
        return tirx.Select(take, y[0], x[0]), tirx.Select(take, y[1], x[1])

    def identity(t0, t1):
        return tirx.const(-FLT_MAX, t0), tirx.const(-1, t1)

    return te.comm_reducer(combine, identity, name="argmax")


@register(ROI_POOL)
def build_roi_pool(wl: Workload) -> OperatorDef:
    s = RoIShape(wl)
    data, rois, scalars = s.placeholders()
    st = PoolStages(wl, rois, scalars, position_sensitive=False)
    dh = te.reduce_axis((0, st.bound[0]), name="dh")
    dw = te.reduce_axis((0, st.bound[1]), name="dw")
    argmax = _argmax_reducer(s.dtype)
    neg_inf = tirx.const(-math.inf, s.dtype)

    def pool(k, c, ph, pw):
        inside, idx = st.pixel(k, ph, pw, dh, dw)
        b = te.max(st.batch_index[k], 0)
        value = te.if_then_else(inside, data[b, c, te.if_then_else(inside, idx, 0)], neg_inf)
        return argmax((value, te.if_then_else(inside, idx, -1)), axis=[dh, dw])

    shape = (s.rois, s.channels, s.pooled_h, s.pooled_w)
    best, best_index = te.compute(shape, pool, name="pool_max")
    out = te.compute(shape, lambda k, c, ph, pw: te.if_then_else(st.empty(k, ph, pw), s.const(0), best[k, c, ph, pw]),
                     name="output")
    index = te.compute(shape, lambda k, c, ph, pw: te.if_then_else(st.empty(k, ph, pw), -1, best_index[k, c, ph, pw]),
                       name="argmax")
    return OperatorDef([data, rois, scalars, out, index], num_outputs=2)


@register(ROI_POOL + BACKWARD, scatter=lambda wl: True)
def build_roi_pool_backward(wl: Workload) -> OperatorDef:
    s = RoIShape(wl)
    _, rois, _ = s.placeholders()
    grad = s.grad_placeholder()
    argmax = s.grad_placeholder(dtype="int32", name="argmax")
    batch_index = roi_batch_index(s, rois)
    N, C, P, dtype = s.batch, s.channels, s.pixels, s.dtype
    R, PH, PW = s.rois, s.pooled_h, s.pooled_w
    if atomic_scatter(wl):
        # GPU: one thread per output-gradient element, adding it to its bin's maximum.
        def add(t, ins, out):
            g, am, bidx = ins
            k, c, ph, pw = gpu_scatter.unravel(t, (R, C, PH, PW))
            with gpu_scatter.when(tirx.all(bidx[k] >= 0, am[k, c, ph, pw] >= 0)):
                gpu_scatter.atomic_add(out, (bidx[k], c, am[k, c, ph, pw]), g[k, c, ph, pw])

        grad_input = gpu_scatter.atomic_scatter("scatter", (N, C, P), dtype, [grad, argmax, batch_index],
                                                R * C * PH * PW, add)
        return OperatorDef([grad, argmax, rois, grad_input])
    block = scatter_channel_block(N, C, P, dtype)
    blocks = C // block

    @T.prim_func(private=True, s_tir=True)
    def scatter(g: T.Buffer(grad.shape, dtype), am: T.Buffer(argmax.shape, "int32"),
                bidx: T.Buffer(batch_index.shape, "int32"), out: T.Buffer((N, C, P), dtype)):
        with T.sblock("scatter_root"):  # named: the PrimFunc has its own "root"
            for task in T.parallel(N * blocks):
                with T.sblock("scatter"):
                    T.reads(_region(g), _region(am), _region(bidx))
                    T.writes(out[task // blocks, (task % blocks) * block:(task % blocks) * block + block, 0:P])
                    b = task // blocks
                    c0 = (task % blocks) * block
                    for ci, p in T.grid(block, P):
                        out[b, c0 + ci, p] = T.cast(0, dtype)
                    for k in range(R):
                        if bidx[k] == b:
                            for ci, ph, pw in T.grid(block, PH, PW):
                                if am[k, c0 + ci, ph, pw] >= 0:
                                    out[b, c0 + ci, am[k, c0 + ci, ph, pw]] = (
                                        out[b, c0 + ci, am[k, c0 + ci, ph, pw]] + g[k, c0 + ci, ph, pw])

    grad_input = te.extern_primfunc([grad, argmax, batch_index], scatter)
    return OperatorDef([grad, argmax, rois, grad_input])


def _ps_pool_scale(st: PoolStages) -> te.Tensor:
    """(R, PH, PW): 1 / bin area, 0 for empty bins (the average's factor, folded into the sum)."""
    s = st.s

    def scale(k, ph, pw):
        area = (st.rows[k, ph, 1] - st.rows[k, ph, 0]) * (st.cols[k, pw, 1] - st.cols[k, pw, 0])
        return te.if_then_else(st.empty(k, ph, pw), s.const(0), s.const(1) / area.astype(s.dtype))

    return te.compute((s.rois, s.pooled_h, s.pooled_w), scale, name="bin_scale")


@register(PS_ROI_POOL)
def build_ps_roi_pool(wl: Workload) -> OperatorDef:
    s = RoIShape(wl)
    data, rois, scalars = s.placeholders()
    st = PoolStages(wl, rois, scalars, position_sensitive=True)
    psmap = _ps_align_map(s)
    bin_scale = _ps_pool_scale(st)
    dh = te.reduce_axis((0, st.bound[0]), name="dh")
    dw = te.reduce_axis((0, st.bound[1]), name="dw")

    def pool(k, co, ph, pw):
        inside, idx = st.pixel(k, ph, pw, dh, dw)
        b = te.max(st.batch_index[k], 0)
        value = data[b, psmap.channel(co, ph, pw), te.if_then_else(inside, idx, 0)] * bin_scale[k, ph, pw]
        return te.sum(te.if_then_else(inside, value, s.const(0)), axis=[dh, dw])

    out = te.compute((s.rois, psmap.out_channels, s.pooled_h, s.pooled_w), pool, name="output")
    return OperatorDef([data, rois, scalars, out])


@register(PS_ROI_POOL + BACKWARD, scatter=lambda wl: True)
def build_ps_roi_pool_backward(wl: Workload) -> OperatorDef:
    s, rois, scalars, psmap, grad = _ps_backward_inputs(wl)
    st = PoolStages(wl, rois, scalars, position_sensitive=True)
    # Gradient per bin pixel: grad / area, zero for empty bins.
    bin_scale = _ps_pool_scale(st)
    share = te.compute(grad.shape, lambda k, co, ph, pw: grad[k, co, ph, pw] * bin_scale[k, ph, pw], name="bin_share")
    N, C, P, W, dtype = s.batch, s.channels, s.pixels, s.width, s.dtype
    R, PH, PW = s.rois, s.pooled_h, s.pooled_w
    rows_t, cols_t, bidx_t = st.rows, st.cols, st.batch_index
    if atomic_scatter(wl):
        # GPU: one thread per (RoI, output channel, bin) adding its share to every pixel of the bin.
        CO = psmap.out_channels

        def add(t, ins, out):
            g, bidx, rows, cols = ins
            k, co, ph, pw = gpu_scatter.unravel(t, (R, CO, PH, PW))
            with gpu_scatter.when(bidx[k] >= 0):
                with T_ib.serial(rows[k, ph, 0], rows[k, ph, 1]) as h:
                    with T_ib.serial(cols[k, pw, 0], cols[k, pw, 1]) as w:
                        gpu_scatter.atomic_add(out, (bidx[k], psmap.channel(co, ph, pw), h * W + w), g[k, co, ph, pw])

        grad_input = gpu_scatter.atomic_scatter("scatter", (N, C, P), dtype, [share, bidx_t, rows_t, cols_t],
                                                R * CO * PH * PW, add)
        return OperatorDef([grad, rois, scalars, grad_input])

    @T.prim_func(private=True, s_tir=True)
    def scatter(g: T.Buffer(share.shape, dtype), bidx: T.Buffer(bidx_t.shape, "int32"),
                rows: T.Buffer(rows_t.shape, "int32"), cols: T.Buffer(cols_t.shape, "int32"),
                out: T.Buffer((N, C, P), dtype)):
        with T.sblock("scatter_root"):  # named: the PrimFunc has its own "root"
            for task in T.parallel(N * C):
                with T.sblock("scatter"):
                    T.reads(_region(g), _region(bidx), _region(rows), _region(cols))
                    T.writes(out[task // C, task % C, 0:P])
                    b = task // C
                    c = task % C
                    co = c // (PH * PW)
                    ph = c // PW % PH
                    pw = c % PW
                    for p in range(P):
                        out[b, c, p] = T.cast(0, dtype)
                    for k in range(R):
                        if bidx[k] == b:
                            for h in range(rows[k, ph, 0], rows[k, ph, 1]):
                                for w in range(cols[k, pw, 0], cols[k, pw, 1]):
                                    out[b, c, h * W + w] = out[b, c, h * W + w] + g[k, co, ph, pw]

    grad_input = te.extern_primfunc([share, bidx_t, rows_t, cols_t], scatter)
    return OperatorDef([grad, rois, scalars, grad_input])
