"""Independent plain-PyTorch references for the deformable RoI pooling operators.

Written from the definitions (mmcv's ``deform_roi_pool`` and the Deformable-ConvNets paper /
official ``DeformablePSROIPooling``), one RoI at a time with direct 2-D sampling, so they share no
structure with the kernels (which use separable per-axis tables). Everything is differentiable
with autograd, which gives the reference gradients: those of the forward function, i.e. zero
where a sampling coordinate is clamped at the image border.
"""
from __future__ import annotations

import math

import torch


def _bilinear_clamp_edge(img: torch.Tensor, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """torchvision / mmcv bilinear sampling of img (C, H, W) at same-shape y, x -> (C, *y.shape).

    Zero outside [-1, H] x [-1, W]; coordinates below 0 are raised to 0; from H - 1 on both rows
    are the last one."""
    _, height, width = img.shape
    valid = (y >= -1) & (y <= height) & (x >= -1) & (x <= width)
    y = torch.where(valid, y, torch.zeros_like(y)).clamp(min=0)
    x = torch.where(valid, x, torch.zeros_like(x)).clamp(min=0)

    def corners(c, extent):
        low = c.detach().floor().long()
        at_end = low >= extent - 1
        low = torch.where(at_end, torch.full_like(low, extent - 1), low)
        high = torch.where(at_end, low, low + 1)
        frac = torch.where(at_end, torch.zeros_like(c), c - low.to(c.dtype))
        return low, high, frac

    y0, y1, ly = corners(y, height)
    x0, x1, lx = corners(x, width)
    value = ((1 - ly) * (1 - lx) * img[:, y0, x0] + (1 - ly) * lx * img[:, y0, x1]
             + ly * (1 - lx) * img[:, y1, x0] + ly * lx * img[:, y1, x1])
    return value * valid.to(img.dtype)


def deform_roi_pool(input, rois, offset, output_size, spatial_scale=1.0, sampling_ratio=0, gamma=0.1,
                    mask=None) -> torch.Tensor:
    """mmcv's deform_roi_pool: (K, C, PH, PW).

    RoI corners ``x * spatial_scale - 0.5``, bins ``roi_size / pooled``; bin (ph, pw) starts at
    ``roi_start + gamma * roi_size * offset`` (offset channel 0: x, 1: y); it averages a
    ``grid_h x grid_w`` grid of samples at ``bin_start + (i + 0.5) * bin / grid``, the grid being
    ``sampling_ratio`` or ``ceil(roi_size / pooled)``. The modulated variant multiplies by
    ``mask`` (K, 1, PH, PW)."""
    ph_n, pw_n = (output_size, output_size) if isinstance(output_size, int) else output_size
    outs = []
    for k in range(rois.shape[0]):
        b = int(rois[k, 0])
        x1, y1, x2, y2 = (rois[k, 1:].detach().to(input.dtype) * spatial_scale - 0.5).unbind()
        roi_w, roi_h = x2 - x1, y2 - y1
        bin_w, bin_h = roi_w / pw_n, roi_h / ph_n
        gh = sampling_ratio if sampling_ratio > 0 else int(math.ceil(float(roi_h / ph_n)))
        gw = sampling_ratio if sampling_ratio > 0 else int(math.ceil(float(roi_w / pw_n)))
        count = max(gh * gw, 1)
        if gh <= 0 or gw <= 0:
            outs.append(input.new_zeros(input.shape[1], ph_n, pw_n) + 0 * input.sum())
            continue
        ph = torch.arange(ph_n, dtype=input.dtype).view(ph_n, 1, 1, 1)
        pw = torch.arange(pw_n, dtype=input.dtype).view(1, pw_n, 1, 1)
        iy = torch.arange(gh, dtype=input.dtype).view(1, 1, gh, 1)
        ix = torch.arange(gw, dtype=input.dtype).view(1, 1, 1, gw)
        start_x, start_y = x1, y1
        if offset is not None:
            start_x = start_x + gamma * roi_w * offset[k, 0].view(ph_n, pw_n, 1, 1)
            start_y = start_y + gamma * roi_h * offset[k, 1].view(ph_n, pw_n, 1, 1)
        ys = start_y + ph * bin_h + (iy + 0.5) * bin_h / gh
        xs = start_x + pw * bin_w + (ix + 0.5) * bin_w / gw
        ys, xs = torch.broadcast_tensors(ys, xs)
        val = _bilinear_clamp_edge(input[b], ys, xs).sum(dim=(-1, -2)) / count
        if mask is not None:
            val = val * mask[k].view(1, ph_n, pw_n)
        outs.append(val)
    if not outs:
        return input.new_zeros(0, input.shape[1], ph_n, pw_n)
    return torch.stack(outs)


def _bilinear_psroi(plane: torch.Tensor, h: torch.Tensor, w: torch.Tensor):
    """Official DeformablePSROIPooling sampling of plane (H, W) at h, w: (value, valid)."""
    height, width = plane.shape
    valid = (w >= -0.5) & (w <= width - 0.5) & (h >= -0.5) & (h <= height - 0.5)
    w = torch.where(valid, w, torch.zeros_like(w)).clamp(0, width - 1)
    h = torch.where(valid, h, torch.zeros_like(h)).clamp(0, height - 1)
    x1, x2 = w.detach().floor().long(), w.detach().ceil().long()
    y1, y2 = h.detach().floor().long(), h.detach().ceil().long()
    dx, dy = w - x1.to(w.dtype), h - y1.to(h.dtype)
    value = ((1 - dx) * (1 - dy) * plane[y1, x1] + (1 - dx) * dy * plane[y2, x1]
             + dx * (1 - dy) * plane[y1, x2] + dx * dy * plane[y2, x2])
    return value * valid.to(plane.dtype), valid


def deform_psroi_pool(input, rois, trans, spatial_scale, output_dim, group_size, pooled_size, part_size=None,
                      sample_per_part=4, trans_std=0.0, no_trans=False) -> torch.Tensor:
    """Deformable position-sensitive RoI pooling (Deformable-ConvNets), (K, output_dim, P, P).

    RoI ``[round(x1) s - 0.5, (round(x2) + 1) s - 0.5]`` (size >= 0.1); output channel ``ctop`` of
    bin (ph, pw) averages, over the valid samples of a ``sample_per_part``^2 grid at
    ``bin_start + trans_std * trans * roi_size + i * bin / sample_per_part``, input channel
    ``(ctop * group + gh) * group + gw``; samples outside [-0.5, extent - 0.5] are skipped.
    ``trans`` is (K, 2 * classes, part, part), class of ``ctop``: ``ctop // (output_dim / classes)``.
    """
    part_size = part_size or pooled_size
    P, spp = pooled_size, sample_per_part
    classes = 1 if no_trans else trans.shape[1] // 2
    per_class = output_dim // classes

    def c_round(v):  # C's round: halves away from zero
        return torch.sign(v) * torch.floor(v.abs() + 0.5)

    out = input.new_zeros(rois.shape[0], output_dim, P, P) + 0 * input.sum()
    result = []
    for k in range(rois.shape[0]):
        b = int(rois[k, 0])
        r = rois[k].detach().to(input.dtype)
        start_w = c_round(r[1]) * spatial_scale - 0.5
        start_h = c_round(r[2]) * spatial_scale - 0.5
        end_w = (c_round(r[3]) + 1) * spatial_scale - 0.5
        end_h = (c_round(r[4]) + 1) * spatial_scale - 0.5
        roi_w = torch.clamp(end_w - start_w, min=0.1)
        roi_h = torch.clamp(end_h - start_h, min=0.1)
        bin_w, bin_h = roi_w / P, roi_h / P
        sub_w, sub_h = bin_w / spp, bin_h / spp
        rows = []
        for ctop in range(output_dim):
            cls = ctop // per_class
            bins = []
            for ph in range(P):
                for pw in range(P):
                    part_h = int(math.floor(ph / P * part_size))
                    part_w = int(math.floor(pw / P * part_size))
                    tx = ty = 0.0
                    if not no_trans:
                        tx = trans[k, 2 * cls, part_h, part_w] * trans_std
                        ty = trans[k, 2 * cls + 1, part_h, part_w] * trans_std
                    wstart = pw * bin_w + start_w + tx * roi_w
                    hstart = ph * bin_h + start_h + ty * roi_h
                    gw = min(max(int(math.floor(pw * group_size / P)), 0), group_size - 1)
                    gh = min(max(int(math.floor(ph * group_size / P)), 0), group_size - 1)
                    c = (ctop * group_size + gh) * group_size + gw
                    i = torch.arange(spp, dtype=input.dtype)
                    hs = (hstart + i * sub_h).view(spp, 1).expand(spp, spp)
                    ws = (wstart + i * sub_w).view(1, spp).expand(spp, spp)
                    val, valid = _bilinear_psroi(input[b, c], hs, ws)
                    count = int(valid.sum())
                    bins.append(val.sum() / count if count else val.sum() * 0)
            rows.append(torch.stack(bins).view(P, P))
        result.append(torch.stack(rows))
    return torch.stack(result) if result else out


def make_boxes(generator: torch.Generator, batch: int, image_hw, count: int = 10, dtype=torch.float32):
    """(K, 5) test boxes in image coordinates for a batch of ``batch`` images of ``image_hw``:
    ``count`` random boxes inside the image plus the edge cases every operator must handle (partly
    and fully outside, zero width/height, inverted, tiny, covering the whole image, coordinates on
    half pixels for the integer rounding of RoI Pool)."""
    h, w = image_hw
    xy = torch.rand(count, 2, generator=generator, dtype=torch.float64) * torch.tensor([w * 0.8, h * 0.8])
    wh = torch.rand(count, 2, generator=generator, dtype=torch.float64) * torch.tensor([w * 0.6, h * 0.6]) + 1
    random = torch.cat([xy, xy + wh], dim=1)
    special = torch.tensor([
        [-6.0, -4.0, 0.45 * w, 0.4 * h],          # partly outside (top left)
        [0.7 * w, 0.6 * h, 1.4 * w, 1.3 * h],     # partly outside (bottom right)
        [1.5 * w, 1.5 * h, 1.8 * w, 1.9 * h],     # fully outside
        [-20.0, -20.0, -10.0, -12.0],             # fully outside, negative
        [0.3 * w, 0.3 * h, 0.3 * w, 0.3 * h],     # a point
        [0.2 * w, 0.25 * h, 0.2 * w, 0.7 * h],    # zero width
        [0.6 * w, 0.6 * h, 0.2 * w, 0.3 * h],     # inverted
        [3.2, 3.3, 3.45, 3.5],                    # tiny
        [-2.0, -2.0, w + 2.0, h + 2.0],           # covers the image
        [3.0, 5.0, 9.0, 13.0],                    # half pixels after scaling by 0.5
    ], dtype=torch.float64)
    coords = torch.cat([random, special])
    index = torch.randint(0, batch, (coords.shape[0], 1), generator=generator).to(torch.float64)
    return torch.cat([index, coords], dim=1).to(dtype)


def roi_case(shape, spatial_scale: float, output_size, seed: int = 1234):
    """Seeded float64 (feature map, boxes, output gradient) for RoI tests: a ``shape`` map, 16
    boxes (6 random plus the edge cases of :func:`make_boxes`: one bucket) in the image the map
    covers at ``spatial_scale``, and a gradient of the (boxes, channels, *output_size) output."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    image = (shape[2] / spatial_scale, shape[3] / spatial_scale)
    boxes = make_boxes(g, shape[0], image, count=6, dtype=torch.float64)
    grad = torch.randn(boxes.shape[0], shape[1], *output_size, generator=g, dtype=torch.float64)
    return x, boxes, grad
