"""Bad and edge-case input for the RoI pooling family: empty box sets, batch indices out of range,
wrong box shapes and types, bad sizes and scales, mismatched offsets: clear exceptions, no crash."""
from __future__ import annotations

import math

import pytest
import torch

import tvm_dcn

# The feature map, scale and output size of test_roi_ops.py (its kernels are reused).
X = torch.randn(2, 12, 9, 11)
OUT = (3, 2)
BOX = torch.tensor([[0.0, 1.0, 1.0, 5.0, 4.0]])

# name -> call(input, boxes) (PS variants: 12 / 6 = 2 output channels).
CALLS = {
    "roi_align": lambda x, b: tvm_dcn.roi_align(x, b, OUT, 0.5, 2),
    "roi_align_adaptive": lambda x, b: tvm_dcn.roi_align(x, b, OUT, 0.5, -1, True),
    "roi_pool": lambda x, b: tvm_dcn.roi_pool(x, b, OUT, 0.5),
    "ps_roi_align": lambda x, b: tvm_dcn.ps_roi_align(x, b, OUT, 0.5, 2),
    "ps_roi_pool": lambda x, b: tvm_dcn.ps_roi_pool(x, b, OUT, 0.5),
    "deform_roi_pool": lambda x, b: tvm_dcn.deform_roi_pool(x, b, None, OUT, 0.5, 2),
    "deform_psroi_pool": lambda x, b: tvm_dcn.deform_psroi_pool(x, b, None, 0.5, 3, 2, 3, no_trans=True),
}
OUT_CHANNELS = {"ps_roi_align": 2, "ps_roi_pool": 2, "deform_psroi_pool": 3}
OUT_SIZE = {"deform_psroi_pool": (3, 3)}


@pytest.mark.parametrize("name", list(CALLS))
@pytest.mark.parametrize("boxes", [torch.zeros(0, 5), [], [torch.zeros(0, 4), torch.zeros(0, 4)]],
                         ids=["tensor", "empty-list", "list-of-empty"])
def test_empty_boxes_give_empty_outputs_and_zero_gradients(name, boxes):
    x = X.clone().requires_grad_()
    out = CALLS[name](x, boxes)
    assert out.shape == (0, OUT_CHANNELS.get(name, 12)) + OUT_SIZE.get(name, OUT) and out.dtype == x.dtype
    out.sum().backward()
    assert x.grad is not None and (x.grad == 0).all()


def test_empty_boxes_with_empty_batch():
    out = tvm_dcn.roi_align(torch.zeros(0, 12, 9, 11), torch.zeros(0, 5), OUT)
    assert out.shape == (0, 12) + OUT


@pytest.mark.parametrize("name", list(CALLS))
def test_batch_index_out_of_range(name):
    for bad in (2.0, -1.0, 7.5):
        boxes = BOX.clone()
        boxes[0, 0] = bad
        with pytest.raises(ValueError, match="batch index"):
            CALLS[name](X, boxes)
    with pytest.raises(ValueError, match="batch index"):  # three images' boxes for a batch of two
        CALLS[name](X, [BOX[:, 1:]] * 3)
    with pytest.raises(ValueError, match="batch index"):
        CALLS[name](torch.zeros(0, 12, 9, 11), BOX)


@pytest.mark.parametrize("name", list(CALLS))
def test_wrong_box_shapes(name):
    call = CALLS[name]
    for boxes in (torch.zeros(3, 4), torch.zeros(5), torch.zeros(2, 5, 1), [torch.zeros(2, 5)], [torch.zeros(4)]):
        with pytest.raises(ValueError, match="boxes|rois"):
            call(X, boxes)
    for boxes in ("boxes", None, [[1.0, 2.0, 3.0, 4.0]], torch.zeros(1, 5, dtype=torch.bool)):
        with pytest.raises(TypeError):
            call(X, boxes)
    for value in (math.nan, math.inf):
        boxes = BOX.clone()
        boxes[0, 3] = value
        with pytest.raises(ValueError, match="non-finite"):
            call(X, boxes)
    with pytest.raises(ValueError, match="exceed"):
        call(X, BOX * torch.tensor([0, 1, 1, 1e9, 1]))


def test_bad_arguments():
    with pytest.raises(TypeError, match="input"):
        tvm_dcn.roi_align(X.numpy(), BOX, OUT)
    with pytest.raises(ValueError, match="input"):
        tvm_dcn.roi_align(X[0], BOX, OUT)
    with pytest.raises(TypeError, match="dtype"):
        tvm_dcn.roi_align(X.to(torch.int32), BOX, OUT)
    for size in (0, (2, 0), -1):
        with pytest.raises(ValueError, match="output_size"):
            tvm_dcn.roi_align(X, BOX, size)
    for size in (1.5, (1, 2, 3), "7", True):
        with pytest.raises(TypeError, match="output_size"):
            tvm_dcn.roi_align(X, BOX, size)
    for scale in (0.0, -1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="spatial_scale"):
            tvm_dcn.roi_pool(X, BOX, OUT, scale)
    with pytest.raises(TypeError, match="spatial_scale"):
        tvm_dcn.roi_pool(X, BOX, OUT, "0.5")
    with pytest.raises(TypeError, match="sampling_ratio"):
        tvm_dcn.roi_align(X, BOX, OUT, 1.0, 2.0)
    with pytest.raises(TypeError, match="aligned"):
        tvm_dcn.roi_align(X, BOX, OUT, 1.0, 2, "yes")
    with pytest.raises(ValueError, match="channels"):
        tvm_dcn.ps_roi_align(X, BOX, 3)  # 12 channels, 9 bins
    with pytest.raises(ValueError, match="sampling_ratio"):  # adaptive grid beyond the limit
        tvm_dcn.roi_align(X, torch.tensor([[0.0, 0.0, 0.0, 1e6, 1e6]]), 1, 1.0, -1)


def test_deform_argument_checks():
    offset = torch.zeros(1, 2, *OUT)
    with pytest.raises(ValueError, match="offset"):
        tvm_dcn.deform_roi_pool(X, BOX, torch.zeros(1, 2, 3, 3), OUT)
    with pytest.raises(ValueError, match="offset"):
        tvm_dcn.deform_roi_pool(X, BOX, torch.zeros(2, 2, *OUT), OUT)
    with pytest.raises(TypeError, match="offset"):
        tvm_dcn.deform_roi_pool(X, BOX, offset.double(), OUT)
    with pytest.raises(ValueError, match="mask"):
        tvm_dcn.deform_roi_pool(X, BOX, offset, OUT, mask=torch.ones(1, 2, *OUT))
    with pytest.raises(ValueError, match="gamma"):
        tvm_dcn.deform_roi_pool(X, BOX, offset, OUT, gamma=math.nan)
    with pytest.raises(ValueError, match="channels"):  # 12 channels != output_dim * group_size**2
        tvm_dcn.deform_psroi_pool(X, BOX, None, 1.0, 2, 2, 2, no_trans=True)
    with pytest.raises(ValueError, match="no_trans"):
        tvm_dcn.deform_psroi_pool(X, BOX, None, 1.0, 3, 2, 2)
    with pytest.raises(ValueError, match="classes"):  # 2 classes do not divide output_dim = 3
        tvm_dcn.deform_psroi_pool(X, BOX, torch.zeros(1, 4, 2, 2), 1.0, 3, 2, 2)
    with pytest.raises(ValueError, match="offset"):
        tvm_dcn.deform_psroi_pool(X, BOX, torch.zeros(1, 2, 3, 3), 1.0, 3, 2, 2)
    with pytest.raises(ValueError, match="output_channels"):
        tvm_dcn.DeformRoIPoolPack(OUT, 4, deform_fc_channels=8)(X, BOX)  # built for 4 channels, given 12


def test_boxes_outside_and_degenerate_are_finite_and_zero_outside():
    boxes = torch.tensor([[0, 100.0, 100.0, 120.0, 110.0],   # outside the 18 x 22 image
                          [1, 3.0, 2.0, 3.0, 2.0],           # a point
                          [1, 5.0, 4.0, 1.0, 1.0]])          # inverted
    for name, call in CALLS.items():
        out = call(X, boxes)
        assert torch.isfinite(out).all(), name
        assert (out[0] == 0).all(), name
