"""The RoI family as ``torch.library`` operators: ``torch.library.opcheck`` of every forward and
backward operator (schema, fake kernel against the real one, autograd registration, AOT dispatch
with dynamic shapes, gradients), double backward refused, and ``torch.compile(fullgraph=True)`` of
a detector head and of a modulated deformable-conv block, forward and backward, against eager.

Shapes are those of test_roi_ops.py / test_roi_deform.py, so the kernels are shared.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import tvm_dcn
from roi_reference import make_boxes

SHAPE = (2, 12, 9, 11)
DEFORM_SHAPE = (2, 6, 9, 11)
SCALE = 0.5
OUT = (3, 2)
ops = torch.ops.tvm_dcn


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(*SHAPE, generator=g, dtype=torch.float64)
    boxes = make_boxes(g, SHAPE[0], (SHAPE[2] / SCALE, SHAPE[3] / SCALE), count=6, dtype=torch.float64)
    return x, boxes, g


def _leaf(t):
    return t.detach().clone().requires_grad_()


@pytest.mark.parametrize("sampling_ratio", [2, -1], ids=["ratio2", "adaptive"])
@pytest.mark.parametrize("aligned", [False, True], ids=["unaligned", "aligned"])
def test_opcheck_roi_align(data, aligned, sampling_ratio):
    x, boxes, _ = data
    torch.library.opcheck(ops.roi_align_forward, (_leaf(x), boxes, SCALE, *OUT, sampling_ratio, aligned))
    grad = torch.randn(boxes.shape[0], SHAPE[1], *OUT, dtype=torch.float64)
    torch.library.opcheck(ops.roi_align_backward, (grad, boxes, SCALE, *OUT, *SHAPE, sampling_ratio, aligned))


def test_opcheck_ps_roi_align(data):
    x, boxes, _ = data
    torch.library.opcheck(ops.ps_roi_align_forward, (_leaf(x), boxes, SCALE, *OUT, 2))
    grad = torch.randn(boxes.shape[0], SHAPE[1] // 6, *OUT, dtype=torch.float64)
    torch.library.opcheck(ops.ps_roi_align_backward, (grad, boxes, SCALE, *OUT, 2, *SHAPE))


def test_opcheck_roi_pool(data):
    x, boxes, _ = data
    torch.library.opcheck(ops.roi_pool_forward, (_leaf(x), boxes, SCALE, *OUT))
    _, argmax = ops.roi_pool_forward(x, boxes, SCALE, *OUT)
    grad = torch.randn(boxes.shape[0], SHAPE[1], *OUT, dtype=torch.float64)
    torch.library.opcheck(ops.roi_pool_backward, (grad, boxes, argmax, SCALE, *OUT, *SHAPE))
    with pytest.raises(ValueError, match="argmax"):  # a scatter index from elsewhere: refused, not written
        ops.roi_pool_backward(grad, boxes, argmax + 1000, SCALE, *OUT, *SHAPE)


def test_opcheck_ps_roi_pool(data):
    x, boxes, _ = data
    torch.library.opcheck(ops.ps_roi_pool_forward, (_leaf(x), boxes, SCALE, *OUT))
    grad = torch.randn(boxes.shape[0], SHAPE[1] // 6, *OUT, dtype=torch.float64)
    torch.library.opcheck(ops.ps_roi_pool_backward, (grad, boxes, SCALE, *OUT, *SHAPE))


def test_opcheck_empty_boxes(data):
    x, _, _ = data
    none = torch.zeros(0, 5, dtype=torch.float64)
    torch.library.opcheck(ops.roi_align_forward, (_leaf(x), none, SCALE, *OUT, 2, False))
    torch.library.opcheck(ops.roi_pool_forward, (_leaf(x), none, SCALE, *OUT))


@pytest.mark.parametrize("variant", ["none", "offset", "modulated", "modulated-3d-mask"])
def test_opcheck_deform_roi_pool(data, variant):
    x, boxes, g = data
    x = x[:, : DEFORM_SHAPE[1]].contiguous()
    k = boxes.shape[0]
    offset = None if variant == "none" else torch.randn(k, 2, *OUT, generator=g, dtype=torch.float64)
    mask = None
    if variant.startswith("modulated"):
        mask = torch.rand(k, *((1,) if variant == "modulated" else ()), *OUT, generator=g, dtype=torch.float64)
    params = (*OUT, SCALE, 2, 0.1)
    leaves = [None if t is None else _leaf(t) for t in (offset, mask)]
    torch.library.opcheck(ops.deform_roi_pool_forward, (_leaf(x), boxes, *leaves, *params))
    grad = torch.randn(k, DEFORM_SHAPE[1], *OUT, generator=g, dtype=torch.float64)
    for needs in ([True, True, True], [False, True, False], [True, False, True]):
        torch.library.opcheck(ops.deform_roi_pool_backward, (grad, x, boxes, offset, mask, *params, needs))


@pytest.mark.parametrize("with_trans", [False, True], ids=["no_trans", "trans"])
def test_opcheck_deform_psroi_pool(data, with_trans):
    x, boxes, g = data
    k = boxes.shape[0]
    x = torch.randn(2, 3 * 2 * 2, 9, 11, generator=g, dtype=torch.float64)  # output_dim 3, group_size 2
    trans = torch.randn(k, 2, 3, 3, generator=g, dtype=torch.float64) if with_trans else None
    params = (SCALE, 3, 2, 3, 3, 2, 0.1)  # spatial_scale, output_dim, group_size, pooled, part, samples, trans_std
    torch.library.opcheck(ops.deform_psroi_pool_forward, (_leaf(x), boxes, None if trans is None else _leaf(trans),
                                                          *params))
    grad = torch.randn(k, 3, 3, 3, generator=g, dtype=torch.float64)
    torch.library.opcheck(ops.deform_psroi_pool_backward, (grad, x, boxes, trans, *params, [True, True]))


def test_operators_validate_box_values(data):
    """The operators check what the functions cannot without reading the boxes (bad values from a
    direct call or from a compiled graph): a clear exception, not an out-of-bounds kernel access."""
    x, boxes, _ = data
    bad = boxes.clone()
    bad[0, 0] = 5
    with pytest.raises(ValueError, match="batch index"):
        ops.roi_align_forward(x, bad, SCALE, *OUT, 2, False)
    with pytest.raises(ValueError, match="batch index"):
        ops.roi_align_backward(torch.zeros(bad.shape[0], SHAPE[1], *OUT, dtype=torch.float64), bad, SCALE, *OUT,
                               *SHAPE, 2, False)
    with pytest.raises(ValueError, match="rois"):
        ops.deform_roi_pool_forward(x, boxes[:, :4], None, None, *OUT, SCALE, 2, 0.1)


def test_double_backward_raises(data):
    x, boxes, g = data
    x = _leaf(x[:, : DEFORM_SHAPE[1]])
    offset = _leaf(torch.randn(boxes.shape[0], 2, *OUT, generator=g, dtype=torch.float64))
    out = tvm_dcn.deform_roi_pool(x, boxes, offset, OUT, SCALE, 2)
    (grad_x,) = torch.autograd.grad((out * out).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        grad_x.sum().backward()


# ------------------------------------------------------------------------------------------------
# torch.compile(fullgraph=True): forward and backward match eager.


class _DetectorHead(nn.Module):
    """RoI Align (both modes) and a DeformRoIPoolPack feeding a box classifier."""

    def __init__(self, channels: int):
        super().__init__()
        self.align = tvm_dcn.RoIAlign(OUT, SCALE, sampling_ratio=2, aligned=True)
        self.align_legacy = tvm_dcn.RoIAlign(OUT, SCALE, sampling_ratio=-1, aligned=False)
        self.deform = tvm_dcn.DeformRoIPoolPack(OUT, channels, deform_fc_channels=16, spatial_scale=SCALE,
                                                sampling_ratio=2)
        self.cls = nn.Linear(3 * channels * OUT[0] * OUT[1], 5)

    def forward(self, features, boxes):
        pooled = [self.align(features, boxes), self.align_legacy(features, boxes), self.deform(features, boxes)]
        return self.cls(torch.cat(pooled, 1).flatten(1).relu())


class _ModulatedBlock(nn.Module):
    """A residual block whose 3x3 convolution is a ModulatedDeformConv2dPack."""

    def __init__(self, channels: int):
        super().__init__()
        self.reduce = nn.Conv2d(channels, 8, 1)
        self.dcn = tvm_dcn.ModulatedDeformConv2dPack(8, 8, 3, padding=1, deform_groups=2)
        self.expand = nn.Conv2d(8, channels, 1)

    def forward(self, x):
        return (x + self.expand(self.dcn(self.reduce(x).relu()).relu())).relu()


def _randomize(module: nn.Module, generator) -> None:
    """Random parameters everywhere (the packs zero-initialise their offset layers)."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=generator, dtype=p.dtype) * 0.3)


def _forward_backward(model, *inputs):
    leaves = [_leaf(t) if t.is_floating_point() and t.dim() == 4 else t for t in inputs]
    model.zero_grad()
    out = model(*leaves)
    out.square().sum().backward()
    return out.detach(), [t.grad for t in leaves if t.requires_grad], [p.grad.clone() for p in model.parameters()]


def _assert_compiled_matches_eager(model, *inputs):
    eager = _forward_backward(model, *inputs)
    compiled = _forward_backward(torch.compile(model, fullgraph=True), *inputs)
    torch.testing.assert_close(compiled[0], eager[0], rtol=1e-4, atol=1e-5)
    for a, b in zip(compiled[1] + compiled[2], eager[1] + eager[2]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert all(g.abs().sum() > 0 for g in eager[1] + eager[2])  # every gradient is exercised


def test_torch_compile_detector_head(data):
    torch._dynamo.reset()
    x, boxes, g = data
    head = _DetectorHead(SHAPE[1])
    _randomize(head, g)
    _assert_compiled_matches_eager(head, x.float(), boxes.float())


def test_torch_compile_modulated_deform_conv_block():
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(7)
    block = _ModulatedBlock(6)
    _randomize(block, g)
    _assert_compiled_matches_eager(block, torch.randn(2, 6, 9, 11, generator=g))
