"""RoI Align, RoI Pool, PS RoI Align and PS RoI Pool against torchvision (the oracle), forward and
gradients, and float64 gradcheck of every operator.

Shapes are shared between tests so that each kernel compiles once per session.
"""
from __future__ import annotations

import pytest
import torch
import torchvision

import tvm_dcn
from conftest import assert_matches
from roi_reference import roi_case

# One feature map (batch 2, 12 channels, 9 x 11) at spatial scale 0.5, output 3 x 2: PS variants
# read 12 / 6 = 2 output channels.
SHAPE = (2, 12, 9, 11)
SCALE = 0.5
OUT = (3, 2)


@pytest.fixture(scope="module")
def data():
    return roi_case(SHAPE, SCALE, OUT)


def _run(fn, x, boxes, grad_out, dtype, **kw):
    """Output and input gradient of ``fn`` in ``dtype`` (gradient of <output, grad_out>)."""
    xr = x.detach().to(dtype).requires_grad_()
    out = fn(xr, boxes.to(dtype), OUT, spatial_scale=SCALE, **kw)
    out.backward(grad_out[:, : out.shape[1]].to(dtype))
    return out.detach(), xr.grad


def _check_against_torchvision(ours, theirs, x, boxes, grad, dtype, grad_boxes=None, **kw):
    out, gin = _run(ours, x, boxes, grad, dtype, **kw)
    ref_out, ref_gin = _run(theirs, x, boxes, grad, torch.float64, **kw)
    assert_matches(out, ref_out, dtype, what=f"{ours.__name__} output")
    if grad_boxes is not None:  # compare gradients on a subset of the boxes
        _, gin = _run(ours, x, boxes[grad_boxes], grad[grad_boxes], dtype, **kw)
        _, ref_gin = _run(theirs, x, boxes[grad_boxes], grad[grad_boxes], torch.float64, **kw)
    assert_matches(gin, ref_gin, dtype, what=f"{ours.__name__} grad input")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("sampling_ratio", [2, -1], ids=["ratio2", "adaptive"])
@pytest.mark.parametrize("aligned", [False, True], ids=["unaligned", "aligned"])
def test_roi_align_matches_torchvision(data, aligned, sampling_ratio, dtype):
    x, boxes, grad = data
    _check_against_torchvision(tvm_dcn.roi_align, torchvision.ops.roi_align, x, boxes, grad, dtype,
                               sampling_ratio=sampling_ratio, aligned=aligned)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_roi_pool_matches_torchvision(data, dtype):
    x, boxes, grad = data
    _check_against_torchvision(tvm_dcn.roi_pool, torchvision.ops.roi_pool, x, boxes, grad, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("sampling_ratio", [2, -1], ids=["ratio2", "adaptive"])
def test_ps_roi_align_matches_torchvision(data, sampling_ratio, dtype):
    x, boxes, grad = data
    if sampling_ratio > 0:
        _check_against_torchvision(tvm_dcn.ps_roi_align, torchvision.ops.ps_roi_align, x, boxes, grad,
                                   dtype, sampling_ratio=sampling_ratio)
        return
    # Adaptive sampling: torchvision divides 0 by 0 (NaN) for boxes without samples; we give 0.
    out, gin = _run(tvm_dcn.ps_roi_align, x, boxes, grad, dtype, sampling_ratio=-1)
    ref, ref_gin = _run(torchvision.ops.ps_roi_align, x, boxes, grad, torch.float64, sampling_ratio=-1)
    empty = torch.isnan(ref).flatten(1).any(1)
    assert empty.any(), "the box set should contain a box without samples"
    assert (out[empty] == 0).all()
    assert_matches(out[~empty], ref[~empty], dtype, what="ps_roi_align output")
    # Gradients, on all boxes (a box without samples contributes nothing) against torchvision on the others.
    _, ref_gin = _run(torchvision.ops.ps_roi_align, x, boxes[~empty], grad[~empty], torch.float64, sampling_ratio=-1)
    assert_matches(gin, ref_gin, dtype, what="ps_roi_align grad input")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_ps_roi_pool_matches_torchvision(data, dtype):
    x, boxes, grad = data
    # torchvision's backward clips bins to H and W where its forward clips to H - 1 and W - 1: compare
    # gradients on the boxes whose bins stay clear of the last row and column (gradcheck covers the rest).
    s = boxes[:, 1:] * SCALE
    interior = (s[:, [0, 2]].max(1).values < SHAPE[3] - 2) & (s[:, [1, 3]].max(1).values < SHAPE[2] - 2)
    assert interior.sum() >= 3 and (~interior).sum() >= 3
    _check_against_torchvision(tvm_dcn.ps_roi_pool, torchvision.ops.ps_roi_pool, x, boxes, grad, dtype,
                               grad_boxes=interior)


def test_box_list_equals_tensor(data):
    x, boxes, _ = data
    x = x.float()
    per_image = [torch.tensor([[1.0, 2.0, 12.0, 15.0], [0.5, 0.5, 3.0, 4.0]]), torch.tensor([[4.0, 3.0, 20.0, 9.0]])]
    as_tensor = torch.tensor([[0, 1.0, 2.0, 12.0, 15.0], [0, 0.5, 0.5, 3.0, 4.0], [1, 4.0, 3.0, 20.0, 9.0]])
    for fn, args in ((tvm_dcn.roi_align, (SCALE, 2)), (tvm_dcn.roi_pool, (SCALE,)), (tvm_dcn.ps_roi_align, (SCALE, 2)),
                     (tvm_dcn.ps_roi_pool, (SCALE,))):
        a = fn(x, per_image, OUT, *args)
        b = fn(x, as_tensor, OUT, *args)
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        torch.testing.assert_close(a, getattr(torchvision.ops, fn.__name__)(x, per_image, OUT, *args))


def test_modules_match_torchvision(data):
    x, boxes, _ = data
    x, boxes = x.float(), boxes.float()
    pairs = [(tvm_dcn.RoIAlign(OUT, SCALE, 2, aligned=True), torchvision.ops.RoIAlign(OUT, SCALE, 2, aligned=True)),
             (tvm_dcn.RoIPool(OUT, SCALE), torchvision.ops.RoIPool(OUT, SCALE)),
             (tvm_dcn.PSRoIAlign(OUT, SCALE, 2), torchvision.ops.PSRoIAlign(OUT, SCALE, 2)),
             (tvm_dcn.PSRoIPool(OUT, SCALE), torchvision.ops.PSRoIPool(OUT, SCALE))]
    for ours, theirs in pairs:
        assert_matches(ours(x, boxes), theirs(x.double(), boxes.double()), torch.float32, what=type(ours).__name__)


def test_layouts_and_box_dtypes(data):
    """channels_last / non-contiguous inputs and integer or float64 boxes give the same results."""
    x, boxes, _ = data
    x = x.float()
    expected = tvm_dcn.roi_align(x, boxes.float(), OUT, SCALE, 2)
    torch.testing.assert_close(tvm_dcn.roi_align(x.to(memory_format=torch.channels_last), boxes.float(), OUT, SCALE, 2),
                               expected, rtol=0, atol=0)
    wide = torch.cat([x, x], dim=3)[:, :, :, ::2]  # a non-contiguous view of width 11
    torch.testing.assert_close(tvm_dcn.roi_align(wide, boxes.float(), OUT, SCALE, 2),
                               tvm_dcn.roi_align(wide.contiguous(), boxes.float(), OUT, SCALE, 2), rtol=0, atol=0)
    torch.testing.assert_close(tvm_dcn.roi_align(x, boxes, OUT, SCALE, 2), expected, rtol=0, atol=0)
    int_boxes = boxes.round().to(torch.int64)
    torch.testing.assert_close(tvm_dcn.roi_align(x, int_boxes, OUT, SCALE, 2),
                               tvm_dcn.roi_align(x, int_boxes.float(), OUT, SCALE, 2), rtol=0, atol=0)


def test_box_count_buckets_reuse_kernels(data, monkeypatch):
    """Box counts within a bucket (and adaptive grids within a power of two) share one kernel."""
    x, boxes, _ = data
    x = x.float()
    seen = []
    real_compile = tvm_dcn.roi._kernel.compile

    def spy(workload, *args, **kwargs):
        seen.append(workload)
        return real_compile(workload, *args, **kwargs)

    monkeypatch.setattr(tvm_dcn.roi._kernel, "compile", spy)
    small = torch.tensor([[0, 2.0, 2.0, 9.0, 9.0]])
    for count in (1, 5, 16):
        rois = small.repeat(count, 1) + torch.rand(count, 5) * torch.tensor([0, 1, 1, 1, 1.0])
        out = tvm_dcn.roi_align(x, rois, OUT, SCALE, sampling_ratio=-1)
        assert out.shape == (count, SHAPE[1]) + OUT
        assert_matches(out, torchvision.ops.roi_align(x.double(), rois.double(), OUT, SCALE, -1), torch.float32)
    assert len(set(seen)) == 1 and seen[0]["num_rois"] == 16
    tvm_dcn.roi_align(x, small.repeat(17, 1), OUT, SCALE, sampling_ratio=-1)
    assert seen[-1]["num_rois"] == 24


# --------------------------------------------------------------------------------------------
# gradcheck (float64): every operator, with the edge-case boxes (the kernels of the tests above)


@pytest.mark.parametrize("op, kwargs", [
    ("roi_align", dict(sampling_ratio=2, aligned=False)),
    ("roi_align", dict(sampling_ratio=-1, aligned=True)),
    ("roi_pool", {}),
    ("ps_roi_align", dict(sampling_ratio=-1)),
    ("ps_roi_pool", {}),
], ids=["roi_align-ratio2", "roi_align-adaptive-aligned", "roi_pool", "ps_roi_align", "ps_roi_pool"])
def test_gradcheck(data, op, kwargs):
    x, boxes, _ = data
    fn = getattr(tvm_dcn, op)
    xr = x.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda t: fn(t, boxes, OUT, SCALE, **kwargs), (xr,), eps=1e-6, atol=1e-7,
                                    nondet_tol=0.0)


def test_block_names_are_unique():
    """MetaSchedule (the tuner) refuses PrimFuncs with two blocks of one name; the TVMScript scatter
    stages of the backward kernels must not bring a second "root" block along."""
    import re

    from tvm_dcn.ops import primfunc
    from tvm_dcn.ops.deform_roi_pool import deform_psroi_pool_workload, deform_roi_pool_workload
    from tvm_dcn.ops.roi_align import ps_roi_align_workload, roi_align_workload, roi_pool_workload

    common = dict(batch=1, height=6, width=7, num_rois=16)
    workloads = [roi_align_workload(channels=8, output_size=2, sampling_ratio=2, backward=True, **common),
                 roi_pool_workload(channels=8, output_size=2, backward=True, **common),
                 roi_pool_workload(channels=8, output_size=2, position_sensitive=True, backward=True, **common),
                 ps_roi_align_workload(channels=8, output_size=2, sampling_ratio=-1, backward=True, **common),
                 deform_roi_pool_workload(channels=8, output_size=2, backward="input", **common),
                 deform_psroi_pool_workload(channels=8, output_dim=2, group_size=2, pooled_size=2, backward="input",
                                            **common)]
    for wl in workloads:
        names = re.findall(r'T\.sblock\("([^"]+)"', primfunc(wl).script())
        assert "scatter" in names and len(names) == len(set(names)), (wl.short_name(), sorted(names))
