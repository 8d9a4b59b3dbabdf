"""Deformable RoI pooling (mmcv's ``deform_roi_pool``, plain and modulated) and the official
deformable position-sensitive RoI pooling of Deformable-ConvNets (R-FCN), in TE/TIR.

Both reuse the stages of ``roi_align.py`` (see its docstring): per-axis interpolation tables, a
bilinear gather for the forward pass, a scatter for the input gradient. Their sample positions
depend on the bin (a learnt offset per bin), so the tables carry both bin axes.

``deform_roi_pool`` (mmcv): RoI Align with ``aligned=True`` (``x * spatial_scale - 0.5``, no
minimum RoI size), whose bin (ph, pw) is shifted by ``gamma * roi_width * offset[k, 0, ph, pw]``
along x and ``gamma * roi_height * offset[k, 1, ph, pw]`` along y; adaptive sampling
``ceil(roi_size / pooled)`` when ``sampling_ratio <= 0``; the modulated variant multiplies each
bin by ``mask[k, ph, pw]``. Kernel arguments: input (N, C, H*W), rois (R, 5), offset (R, 2, PH, PW)
(if any), mask (R, PH, PW) (if any), scalars (spatial_scale, gamma), output (R, C, PH, PW).

``deform_psroi_pool`` (Deformable-ConvNets): RoI ``[round(x1) s - 0.5, (round(x2) + 1) s - 0.5]``
(size at least 0.1), bins of ``pooled_size`` split into ``sample_per_part`` sub-bins sampled at
their top-left corner, shifted by ``trans_std * roi_size * trans[k, 2 cls (+1), part_h, part_w]``;
samples outside [-0.5, H - 0.5] are skipped and the rest averaged; output channel ``ctop`` of bin
(ph, pw) reads input channel ``(ctop * G + gh) * G + gw`` (position-sensitive groups). Kernel
arguments: input, rois, trans (R, 2 * classes, part, part) (unless ``no_trans``), scalars
(spatial_scale, trans_std), output (R, output_dim, P, P).

Gradients: the input gradient is a scatter (TVMScript); offset/mask/trans gradients are gathers.
They reduce the output gradient against the input over channels first, per sample corner
(``corner_grad``: R' x bins x samples x 4), then weight those sums with the derivative tables, so
the expensive pass runs once for all of them. Derivatives are those of the forward function
(zero where a coordinate is clamped at the border); mmcv's CUDA kernel instead differentiates the
unclamped coordinate there, so its offset gradient differs from ours on samples within one pixel
outside the image.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
from tvm import te, tirx

from .._utils import int_pair
from .registry import OperatorDef, atomic_scatter, register
from .workload import Workload
from .roi_align import (BACKWARD, AxisTable, Interpolation, PositionSensitiveMap, RoIShape, align_params,
                        align_geometry, bilinear_gather, inverse_count, lookup, roi_batch_index, roi_bucket,
                        round_half_away, sample_grid, scatter_bilinear)

DEFORM_ROI_POOL = "deform_roi_pool"
DEFORM_PSROI_POOL = "deform_psroi_pool"
# Suffix of the kernels computing the offset (and mask, trans) gradients.
PARAMS_BACKWARD = "_backward_params"


def deform_roi_pool_workload(*, batch, channels, height, width, num_rois, output_size, sampling_ratio=0,
                             max_grid=None, with_offset=True, with_mask=False, backward=None,
                             dtype="float32") -> Workload:
    """Workload of ``deform_roi_pool``; ``backward``: None (forward), ``"input"`` (input gradient) or
    ``"params"`` (offset and mask gradients). ``max_grid`` as for ``roi_align_workload`` (offsets
    move bins, not their sizes, so the adaptive grid is the boxes')."""
    ratio, grid = align_params(sampling_ratio, max_grid, height, width, output_size)
    return Workload.make(DEFORM_ROI_POOL + _suffix(backward), dtype, batch=batch, channels=channels,
                         height=height, width=width, num_rois=roi_bucket(num_rois),
                         output_size=int_pair(output_size, "output_size"), sampling_ratio=ratio, grid=grid,
                         with_offset=bool(with_offset), with_mask=bool(with_mask))


def deform_psroi_pool_workload(*, batch, channels, height, width, num_rois, output_dim, group_size, pooled_size,
                               part_size=None, sample_per_part=4, num_classes=1, no_trans=False, backward=None,
                               dtype="float32") -> Workload:
    """Workload of ``deform_psroi_pool``; ``num_classes``: trans channels / 2 (1 when ``no_trans``)."""
    return Workload.make(DEFORM_PSROI_POOL + _suffix(backward), dtype, batch=batch, channels=channels,
                         height=height, width=width, num_rois=roi_bucket(num_rois), output_dim=output_dim,
                         group_size=group_size, output_size=(pooled_size, pooled_size),
                         part_size=pooled_size if not part_size else part_size, sample_per_part=sample_per_part,
                         num_classes=1 if no_trans else num_classes, no_trans=bool(no_trans))


def float_floor_table(count: int, expression: Callable, dtype: str) -> list[int]:
    """``floor(expression(float_type, i))`` for i < count: a float expression of small ints,
    evaluated in ``dtype`` as the reference C code does (e.g. ``floor(ph / P * part_size)``)."""
    np_type = np.float64 if dtype == "float64" else np.float32
    return [int(np.floor(expression(np_type, i))) for i in range(count)]


def _suffix(backward) -> str:
    if backward is None:
        return ""
    if backward == "input":
        return BACKWARD
    if backward == "params":
        return PARAMS_BACKWARD
    raise ValueError(f"backward must be None, 'input' or 'params', got {backward!r}")


def corner_grad(s: RoIShape, name: str, data, grad, y: AxisTable, x: AxisTable, rows: int, reduce_channels: int,
                locate, active) -> te.Tensor:
    """(R', TH', TW', GY, GX, 4): for each sample corner, the sum over the channels of output
    gradient times input value, ``locate(r, j, ph, pw) -> (roi, batch, channel, grad channel)``
    naming the j-th channel of table row r."""
    j = te.reduce_axis((0, reduce_channels), name="j")
    shape = (rows, s.pooled_h, s.pooled_w, int(y.shape[3]), int(x.shape[3]), 4)

    def fn(r, ph, pw, iy, ix, q):
        k, b, ch, gch = locate(r, j, ph, pw)
        idx = y.at(y.index, r, ph, pw, iy, q // 2) + x.at(x.index, r, ph, pw, ix, q % 2)
        value = grad[k, gch, ph, pw] * data[b, ch, idx]
        return te.sum(te.if_then_else(active(r, iy, ix), value, s.const(0)), axis=j)

    return te.compute(shape, fn, name=name)


def sample_grads(s: RoIShape, corners: te.Tensor, y: AxisTable, x: AxisTable, weight_pairs) -> te.Tensor:
    """(R', len(weight_pairs), PH, PW): per bin, sum over samples and corners of ``corners`` times
    ``y_table[a] * x_table[b]`` for each (y_table, x_table) pair."""
    iy = te.reduce_axis((0, int(y.shape[3])), name="iy")
    ix = te.reduce_axis((0, int(x.shape[3])), name="ix")
    rows = int(corners.shape[0])

    def fn(r, which, ph, pw):
        total = s.const(0)
        for n, (yt, xt) in enumerate(weight_pairs):
            term = None
            for q in range(4):
                t = y.at(yt, r, ph, pw, iy, q // 2) * x.at(xt, r, ph, pw, ix, q % 2) * corners[r, ph, pw, iy, ix, q]
                term = t if term is None else term + t
            total = te.if_then_else(which == n, term, total) if n else term
        return te.sum(total, axis=[iy, ix])

    return te.compute((rows, len(weight_pairs), s.pooled_h, s.pooled_w), fn, name="sample_grad")


# --------------------------------------------------------------------------------------------
# mmcv deform_roi_pool


class DeformStages:
    def __init__(self, wl: Workload, rois, scalars, offset, mask):
        s = self.s = RoIShape(wl)
        self.bound = wl["grid"]
        self.batch_index = roi_batch_index(s, rois)
        geo = self.geometry = align_geometry(s, rois, scalars, 0.5, None)
        grid = self.grid = sample_grid(s, geo, self.batch_index, wl["sampling_ratio"], self.bound)
        self.inv_count = inverse_count(s, grid)
        self.gamma = scalars[1]
        self.offset, self.mask = offset, mask

        def position(axis):
            def pos(k, ph, pw, i):
                start = geo[k, axis, 0]
                if offset is not None:  # mmcv: channel 0 moves x, channel 1 moves y
                    start = start + self.gamma * geo[k, axis, 2] * offset[k, 1 - axis, ph, pw]
                p = ph if axis == 0 else pw
                return (start + p.astype(s.dtype) * geo[k, axis, 1]
                        + (i.astype(s.dtype) + s.const(0.5)) * geo[k, axis, 1] / grid[k, axis].astype(s.dtype))
            return pos

        both = offset is not None
        y_shape = (s.rois, s.pooled_h, s.pooled_w if both or mask is not None else 1, self.bound[0], 2)
        x_shape = (s.rois, s.pooled_h if both else 1, s.pooled_w, self.bound[1], 2)
        self.y = AxisTable(s, "y", 0, y_shape, position(0), lambda k, i: i < grid[k, 0], "clamp_edge",
                           scale=self.y_scale)
        self.x = AxisTable(s, "x", 1, x_shape, position(1), lambda k, i: i < grid[k, 1], "clamp_edge")

    def y_scale(self, k, ph, pw, with_mask=True):
        scale = self.inv_count[k]
        return scale * self.mask[k, ph, pw] if with_mask and self.mask is not None else scale

    def active(self, k, iy, ix):
        return tirx.all(iy < self.grid[k, 0], ix < self.grid[k, 1])


def _deform_inputs(wl: Workload, s: RoIShape, with_data: bool = True):
    data, rois, scalars = s.placeholders(num_scalars=2)
    offset = te.placeholder((s.rois, 2, s.pooled_h, s.pooled_w), s.dtype, name="offset") if wl["with_offset"] else None
    mask = te.placeholder((s.rois, s.pooled_h, s.pooled_w), s.dtype, name="mask") if wl["with_mask"] else None
    args = ([data] if with_data else []) + [rois] + [t for t in (offset, mask) if t is not None] + [scalars]
    return data, rois, scalars, offset, mask, args


@register(DEFORM_ROI_POOL)
def build_deform_roi_pool(wl: Workload) -> OperatorDef:
    s = RoIShape(wl)
    data, rois, scalars, offset, mask, args = _deform_inputs(wl, s)
    st = DeformStages(wl, rois, scalars, offset, mask)
    out = bilinear_gather("output", (s.rois, s.channels, s.pooled_h, s.pooled_w), data, st.y, st.x,
                          lambda k, c, ph, pw: (k, te.max(st.batch_index[k], 0), c), st.active, st.bound)
    return OperatorDef(args + [out])


@register(DEFORM_ROI_POOL + BACKWARD, scatter=lambda wl: True)
def build_deform_roi_pool_backward(wl: Workload) -> OperatorDef:
    s = RoIShape(wl)
    _, rois, scalars, offset, mask, args = _deform_inputs(wl, s, with_data=False)
    grad = s.grad_placeholder()
    st = DeformStages(wl, rois, scalars, offset, mask)
    grad_input = scatter_bilinear(s, grad, st.batch_index, st.grid, st.y, st.x, atomic=atomic_scatter(wl))
    return OperatorDef([grad] + args + [grad_input])


@register(DEFORM_ROI_POOL + PARAMS_BACKWARD)
def build_deform_roi_pool_params_backward(wl: Workload) -> OperatorDef:
    """Gradients of the offset (R, 2, PH, PW) (if any) and of the mask (R, PH, PW) (if any)."""
    s = RoIShape(wl)
    data, rois, scalars, offset, mask, args = _deform_inputs(wl, s)
    if offset is None and mask is None:
        raise ValueError("deform_roi_pool_backward_params: the workload has neither offset nor mask")
    grad = s.grad_placeholder()
    st = DeformStages(wl, rois, scalars, offset, mask)
    geo = st.geometry
    corners = corner_grad(s, "corner_grad", data, grad, st.y, st.x, s.rois, s.channels,
                          lambda k, c, ph, pw: (k, te.max(st.batch_index[k], 0), c, c), st.active)
    pairs = []
    if offset is not None:
        # d/d offset[k, 0] moves x by gamma * roi_width; d/d offset[k, 1] moves y by gamma * roi_height.
        x_slope = st.x.slope(lambda k, ph, pw: st.gamma * geo[k, 1, 2])
        y_slope = st.y.slope(lambda k, ph, pw: st.y_scale(k, ph, pw) * st.gamma * geo[k, 0, 2])
        pairs += [(st.y.weight, x_slope), (y_slope, st.x.weight)]
    if mask is not None:
        unmasked = te.compute(st.y.shape, lambda k, ph, pw, i, a: te.if_then_else(
            tirx.all(st.y.interpolation(k, ph, pw, i).valid, i < st.grid[k, 0]),
            st.y.interpolation(k, ph, pw, i).corner_weight(a) * st.y_scale(k, ph, pw, with_mask=False),
            s.const(0)), name="y_weight_unmasked")
        pairs.append((unmasked, st.x.weight))
    grads = sample_grads(s, corners, st.y, st.x, pairs)
    outs = []
    if offset is not None:
        outs.append(te.compute(offset.shape, lambda k, a, ph, pw: grads[k, a, ph, pw], name="grad_offset"))
    if mask is not None:
        outs.append(te.compute(mask.shape, lambda k, ph, pw: grads[k, len(pairs) - 1, ph, pw], name="grad_mask"))
    return OperatorDef([grad] + args + outs, num_outputs=len(outs))


# --------------------------------------------------------------------------------------------
# Deformable PS RoI pooling (Deformable-ConvNets)


class PSRoIStages:
    def __init__(self, wl: Workload, rois, scalars, trans):
        s = self.s = RoIShape(wl)
        P = s.pooled_h
        self.classes = wl["num_classes"]
        self.spp = wl["sample_per_part"]
        self.part = wl["part_size"]
        self.rows = s.rois * self.classes
        self.batch_index = roi_batch_index(s, rois)
        self.trans = trans
        group = wl["group_size"]
        dtype = s.dtype
        # C's float expressions floor(ph / P * part) and floor(ph * group / P), in the input's dtype.
        self.part_of = float_floor_table(P, lambda f, p: f(p) / f(P) * f(self.part), dtype)
        group_of = float_floor_table(P, lambda f, p: f(p) * f(group) / f(P), dtype)
        group_of = [min(max(g, 0), group - 1) for g in group_of]
        self.psmap = PositionSensitiveMap(group, group, group_of, group_of, wl["output_dim"], self.classes)

        def field(k, axis, f):
            lo = round_half_away(rois[k, 2 - axis], dtype) * scalars[0] - s.const(0.5)
            hi = (round_half_away(rois[k, 4 - axis], dtype) + s.const(1)) * scalars[0] - s.const(0.5)
            size = te.max(hi - lo, s.const(0.1))
            bin_size = size / s.const(P)
            return te.if_then_else(f == 0, lo, te.if_then_else(f == 1, bin_size, te.if_then_else(
                f == 2, size, bin_size / s.const(self.spp))))

        geo = self.geometry = te.compute((s.rois, 2, 4), field, name="roi_geometry")
        self.grid = te.compute((self.rows, 2), lambda r, axis: tirx.const(self.spp, "int32"), name="roi_grid")
        self.trans_std = scalars[1]
        self.no_trans = trans is None

        def position(axis):
            def pos(r, ph, pw, i):
                k = r // self.classes if self.classes > 1 else r
                p = ph if axis == 0 else pw
                start = p.astype(dtype) * geo[k, axis, 1] + geo[k, axis, 0]
                if trans is not None:
                    cls = r % self.classes
                    t = trans[k, 2 * cls + 1 - axis, lookup(self.part_of, ph), lookup(self.part_of, pw)]
                    start = start + t * self.trans_std * geo[k, axis, 2]
                return start + i.astype(dtype) * geo[k, axis, 3]
            return pos

        both = trans is not None
        y_shape = (self.rows, P, P if both else 1, self.spp, 2)
        x_shape = (self.rows, P if both else 1, P, self.spp, 2)
        always = lambda r, i: tirx.const(True, "bool")  # noqa: E731  (validity is in the weights)
        # Averaging over count_y * count_x valid samples is separable: 1/count per axis.
        self.inv_count = {0: self._inv_count("y", 0, y_shape[:3], position(0)),
                          1: self._inv_count("x", 1, x_shape[:3], position(1))}
        scale = self._scale
        self.y = AxisTable(s, "y", 0, y_shape, position(0), always, "psroi",
                           scale=lambda r, ph, pw: scale(0, r, ph, pw))
        self.x = AxisTable(s, "x", 1, x_shape, position(1), always, "psroi",
                           scale=lambda r, ph, pw: scale(1, r, ph, pw))

    def _inv_count(self, name, axis, shape, position):
        """1 / (number of valid samples along ``axis``) per bin, 0 when there are none."""
        s, extent = self.s, self.s.extent(axis)
        i = te.reduce_axis((0, self.spp), name="i")
        count = te.compute(shape, lambda r, ph, pw: te.sum(
            Interpolation(position(r, ph, pw, i), extent, "psroi", s.dtype).valid.astype("int32"), axis=i),
            name=f"{name}_count")
        return te.compute(shape, lambda r, ph, pw: te.if_then_else(
            count[r, ph, pw] > 0, s.const(1) / count[r, ph, pw].astype(s.dtype), s.const(0)), name=f"{name}_inv_count")

    def _scale(self, axis, r, ph, pw):
        table = self.inv_count[axis]
        return table[r, ph if table.shape[1] > 1 else 0, pw if table.shape[2] > 1 else 0]

    def locate(self, k, co, ph, pw):
        return (self.psmap.row(k, co), te.max(self.batch_index[k], 0), self.psmap.channel(co, ph, pw))

    @staticmethod
    def active(r, iy, ix):
        return tirx.const(True, "bool")


def _psroi_inputs(wl: Workload, s: RoIShape, with_data: bool = True):
    data, rois, scalars = s.placeholders(num_scalars=2)
    trans = None
    if not wl["no_trans"]:
        part = wl["part_size"]
        trans = te.placeholder((s.rois, 2 * wl["num_classes"], part, part), s.dtype, name="trans")
    args = ([data] if with_data else []) + [rois] + ([trans] if trans is not None else []) + [scalars]
    return data, rois, scalars, trans, args


@register(DEFORM_PSROI_POOL)
def build_deform_psroi_pool(wl: Workload) -> OperatorDef:
    s = RoIShape(wl)
    data, rois, scalars, trans, args = _psroi_inputs(wl, s)
    st = PSRoIStages(wl, rois, scalars, trans)
    out = bilinear_gather("output", (s.rois, wl["output_dim"], s.pooled_h, s.pooled_w), data, st.y, st.x,
                          st.locate, st.active, (st.spp, st.spp))
    return OperatorDef(args + [out])


@register(DEFORM_PSROI_POOL + BACKWARD, scatter=lambda wl: True)
def build_deform_psroi_pool_backward(wl: Workload) -> OperatorDef:
    s = RoIShape(wl)
    _, rois, scalars, trans, args = _psroi_inputs(wl, s, with_data=False)
    grad = s.grad_placeholder(wl["output_dim"])
    st = PSRoIStages(wl, rois, scalars, trans)
    grad_input = scatter_bilinear(s, grad, st.batch_index, st.grid, st.y, st.x, st.psmap, atomic=atomic_scatter(wl))
    return OperatorDef([grad] + args + [grad_input])


@register(DEFORM_PSROI_POOL + PARAMS_BACKWARD)
def build_deform_psroi_pool_trans_backward(wl: Workload) -> OperatorDef:
    """Gradient of ``trans`` (R, 2 * classes, part, part)."""
    s = RoIShape(wl)
    data, rois, scalars, trans, args = _psroi_inputs(wl, s)
    if trans is None:
        raise ValueError("deform_psroi_pool_backward_params: the workload has no_trans=True")
    grad = s.grad_placeholder(wl["output_dim"])
    st = PSRoIStages(wl, rois, scalars, trans)
    per_class, classes = st.psmap.per_class, st.classes

    def locate(r, j, ph, pw):
        k = r // classes if classes > 1 else r
        co = (r % classes) * per_class + j if classes > 1 else j
        return k, te.max(st.batch_index[k], 0), st.psmap.channel(co, ph, pw), co

    corners = corner_grad(s, "corner_grad", data, grad, st.y, st.x, st.rows, per_class, locate, st.active)
    geo = st.geometry

    def roi(r):
        return r // classes if classes > 1 else r

    x_slope = st.x.slope(lambda r, ph, pw: st._scale(1, r, ph, pw) * st.trans_std * geo[roi(r), 1, 2])
    y_slope = st.y.slope(lambda r, ph, pw: st._scale(0, r, ph, pw) * st.trans_std * geo[roi(r), 0, 2])
    # (rows, 2, P, P): channel 0 = x (trans channel 2 cls), 1 = y (2 cls + 1).
    grads = sample_grads(s, corners, st.y, st.x, [(st.y.weight, x_slope), (y_slope, st.x.weight)])
    P, part = s.pooled_h, st.part
    ph = te.reduce_axis((0, P), name="ph")
    pw = te.reduce_axis((0, P), name="pw")

    def fn(k, ch, u, v):
        r = k * classes + ch // 2 if classes > 1 else k
        hit = tirx.all(lookup(st.part_of, ph) == u, lookup(st.part_of, pw) == v)
        return te.sum(te.if_then_else(hit, grads[r, ch % 2, ph, pw], s.const(0)), axis=[ph, pw])

    grad_trans = te.compute((s.rois, 2 * classes, part, part), fn, name="grad_trans")
    return OperatorDef([grad] + args + [grad_trans])
