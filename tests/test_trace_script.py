"""The ways torchvision's operators are traced and deployed, on models that mix tvm-dcn modules
with plain torch layers:

- torch.fx and torchvision's feature extraction: every tvm-dcn function is one leaf node
  (torch.fx.wrap), the traced module computes what the model computes (forward and gradients),
  and create_feature_extractor returns the intermediate outputs a forward hook sees;
- TorchScript: functions and modules script (calling the torch.ops.tvm_dcn operators), compute
  what eager does, forward and gradients, and survive torch.jit.save / load;
- exceptions: instances of the types torchvision raises for the same mistake, with our messages.
"""
from __future__ import annotations

import io
import warnings
from typing import List

import pytest
import torch
import torch.fx
import torchvision
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

import tvm_dcn
from tvm_dcn import modules, roi


class _Detector(nn.Module):
    """A stem, both deformable conv packs, and a box head with RoI Align and a DeformRoIPoolPack."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.mdcn = tvm_dcn.ModulatedDeformConv2dPack(8, 8, 3, padding=1, deform_groups=2)
        self.dcn = tvm_dcn.DeformConv2dPack(8, 8, 3, padding=1)
        self.align = tvm_dcn.RoIAlign((3, 2), 0.5, 2, aligned=True)
        self.deform = tvm_dcn.DeformRoIPoolPack((3, 2), 8, deform_fc_channels=8, spatial_scale=0.5)
        self.head = nn.Linear(2 * 8 * 6, 3)

    def forward(self, x, boxes):
        features = self.dcn(self.mdcn(self.stem(x).relu()).relu())
        pooled = torch.cat([self.align(features, boxes), self.deform(features, boxes)], 1)
        return self.head(pooled.flatten(1))


def _model_and_inputs():
    g = torch.Generator().manual_seed(5)
    model = _Detector()
    with torch.no_grad():  # random offsets (the packs start at zero offsets)
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    x = torch.randn(2, 3, 9, 11, generator=g)
    boxes = torch.tensor([[0, 1.0, 1.0, 8.0, 6.0], [1, 2.0, 0.0, 12.0, 9.0], [1, 0.0, 3.0, 20.0, 17.0]])
    return model, x, boxes


def test_symbolic_trace_keeps_each_function_as_one_leaf():
    model, x, boxes = _model_and_inputs()
    traced = torch.fx.symbolic_trace(model)
    calls = [n.target for n in traced.graph.nodes if n.op == "call_function"]
    assert calls.count(modules.deform_conv2d) == 2
    assert calls.count(roi.roi_align) == 1 and calls.count(roi.deform_roi_pool) == 2
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    expected, actual = model(x1, boxes), traced(x2, boxes)
    torch.testing.assert_close(actual, expected)
    expected.square().sum().backward()
    actual.square().sum().backward()
    torch.testing.assert_close(x2.grad, x1.grad)


def test_create_feature_extractor_returns_intermediate_outputs():
    model, x, boxes = _model_and_inputs()
    train_nodes, eval_nodes = get_graph_node_names(model)
    for name in ("mdcn.deform_conv2d", "dcn.deform_conv2d", "align.roi_align", "deform.deform_roi_pool_1"):
        assert name in train_nodes and name in eval_nodes
    seen = {}
    hooks = [getattr(model, name).register_forward_hook(lambda m, i, o, name=name: seen.__setitem__(name, o))
             for name in ("mdcn", "align", "deform")]
    model(x, boxes)
    for h in hooks:
        h.remove()
    extractor = create_feature_extractor(model, {"mdcn.deform_conv2d": "mdcn", "align.roi_align": "align",
                                                 "deform.deform_roi_pool_1": "deform"})
    features = extractor(x, boxes)
    for name in ("mdcn", "align", "deform"):
        torch.testing.assert_close(features[name], seen[name])


# ------------------------------------------------------------------------------------------------
# TorchScript.


def _script(obj):
    with warnings.catch_warnings():  # torch.jit.script is deprecated in favour of torch.compile / export
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.script(obj)


def _pool_everything(x: torch.Tensor, boxes: torch.Tensor, box_list: List[torch.Tensor], weight: torch.Tensor,
                     offset: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Every function, with torchvision's argument forms (int or pair sizes, box tensors or lists)."""
    y = tvm_dcn.deform_conv2d(x, offset, weight, padding=1, mask=mask) + tvm_dcn.deform_conv2d(x, offset, weight, None,
                                                                                              (1, 1), [1, 1])
    pooled = [tvm_dcn.roi_align(y, boxes, [3, 2], 0.5, 2, True), tvm_dcn.roi_align(y, box_list, (3, 2), 0.5),
              tvm_dcn.roi_pool(y, boxes, (3, 2), 0.5), tvm_dcn.deform_roi_pool(y, boxes, None, (3, 2), 0.5, 2),
              tvm_dcn.ps_roi_align(y, boxes, 2, 0.5, 2).repeat(1, 4, 1, 1)[:, :, :, :2].repeat(1, 1, 2, 1)[:, :, :3],
              tvm_dcn.ps_roi_pool(y, box_list, 2, 0.5).repeat(1, 4, 1, 1)[:, :, :, :2].repeat(1, 1, 2, 1)[:, :, :3]]
    psroi = tvm_dcn.deform_psroi_pool(y, boxes, None, 0.5, 2, 2, 2, no_trans=True)
    return torch.cat(pooled, 1).sum() + psroi.sum()


def test_script_functions_match_eager():
    g = torch.Generator().manual_seed(8)
    x = torch.randn(2, 8, 9, 11, generator=g)
    boxes = torch.tensor([[0, 1.0, 1.0, 8.0, 6.0], [1, 2.0, 0.0, 12.0, 9.0], [1, 0.0, 3.0, 20.0, 17.0]])
    box_list = [boxes[:1, 1:], boxes[1:, 1:]]
    weight = torch.randn(8, 8, 3, 3, generator=g) * 0.2
    offset, mask = torch.randn(2, 18, 9, 11, generator=g), torch.rand(2, 9, 9, 11, generator=g)
    scripted = _script(_pool_everything)
    calls = {n.kind() for n in scripted.inlined_graph.nodes()}
    assert {f"tvm_dcn::{name}_forward" for name in ("deform_conv2d", "roi_align", "roi_pool", "ps_roi_align",
                                                     "ps_roi_pool", "deform_roi_pool", "deform_psroi_pool")} <= calls
    grads = []
    for fn in (_pool_everything, scripted):
        leaves = [t.clone().requires_grad_() for t in (x, weight, offset, mask)]
        value = fn(leaves[0], boxes, box_list, leaves[1], leaves[2], leaves[3])
        value.backward()
        grads.append((value.detach(), [t.grad for t in leaves]))
    torch.testing.assert_close(grads[1][0], grads[0][0])
    for a, b in zip(grads[1][1], grads[0][1]):
        torch.testing.assert_close(a, b)


def test_script_modules_match_eager_and_round_trip():
    model, x, boxes = _model_and_inputs()
    scripted = _script(model)
    buffer = io.BytesIO()
    torch.jit.save(scripted, buffer)
    buffer.seek(0)
    loaded = torch.jit.load(buffer)
    x0 = x.clone().requires_grad_()
    expected = model(x0, boxes)
    expected.square().sum().backward()
    for candidate in (scripted, loaded):
        x1 = x.clone().requires_grad_()
        actual = candidate(x1, boxes)
        torch.testing.assert_close(actual, expected)
        actual.square().sum().backward()
        torch.testing.assert_close(x1.grad, x0.grad)


def test_script_every_module():
    g = torch.Generator().manual_seed(9)
    x = torch.randn(2, 8, 9, 11, generator=g)
    boxes = torch.tensor([[0, 1.0, 1.0, 8.0, 6.0], [1, 2.0, 0.0, 12.0, 9.0]])
    cases = [
        (tvm_dcn.RoIAlign(3, 0.5, 2, True), (x, boxes)), (tvm_dcn.RoIPool((3, 2), 0.5), (x, boxes)),
        (tvm_dcn.PSRoIAlign((2, 2), 0.5, 2), (x, boxes)), (tvm_dcn.PSRoIPool((2, 2), 0.5), (x, boxes)),
        (tvm_dcn.DeformRoIPool((3, 2), 0.5, 2), (x, boxes)),
        (tvm_dcn.ModulatedDeformRoIPoolPack((3, 2), 8, 16, 0.5, 2), (x, boxes)),
        (tvm_dcn.DeformRoIPooling(0.5, 2, 2, True, group_size=2), (x, boxes)),
        (tvm_dcn.DeformRoIPoolingPack(0.5, 2, 8, False, deform_fc_channels=16), (x, boxes)),
        (tvm_dcn.DeformRoIPoolingPack(0.5, 2, 8, True), (x, boxes)),
        (tvm_dcn.ModulatedDeformConv2dPack(8, 4, 3, padding=1), (x,)),
        (tvm_dcn.DeformConv2d(8, 4, 3, padding=1), (x, torch.randn(2, 18, 9, 11, generator=g))),
        (tvm_dcn.DeformConv2dPack(8, 4, 3, padding=1), (x,)),
    ]
    for module, args in cases:
        with torch.no_grad():
            for p in module.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        torch.testing.assert_close(_script(module)(*args), module(*args), msg=type(module).__name__)


def _scripted_roi_align(x: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    return tvm_dcn.roi_align(x, boxes, 3, 0.5)


def _scripted_deform_conv2d(x: torch.Tensor, offset: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return tvm_dcn.deform_conv2d(x, offset, weight)


def test_scripted_bad_calls_raise_clear_errors():
    """Scripted code calls the operators without the functions' validation: the operators check
    the arguments themselves (TorchScript reports a RuntimeError carrying the message)."""
    roi_align, conv = _script(_scripted_roi_align), _script(_scripted_deform_conv2d)
    x, box = torch.randn(2, 12, 9, 11), torch.tensor([[0, 1.0, 1.0, 5.0, 4.0]])
    for call, message in [(lambda: roi_align(x.int(), box), "input has dtype torch.int32"),
                          (lambda: roi_align(x[0], box), "input must be a 4-d tensor"),
                          (lambda: roi_align(x, box + torch.tensor([5.0, 0, 0, 0, 0])), "batch index"),
                          (lambda: conv(x, torch.randn(2, 18, 5, 9), torch.randn(4, 12, 3, 3)), "offset has shape"),
                          (lambda: conv(x, torch.randn(2, 18, 7, 9), torch.randn(4, 5, 3, 3)), r"weight\.shape\[1\]")]:
        with pytest.raises(RuntimeError, match=message):
            call()


# ------------------------------------------------------------------------------------------------
# Exceptions: instances of what torchvision raises for the same mistake, with our messages.


_X = torch.randn(2, 12, 9, 11)
_BOX = torch.tensor([[0.0, 1.0, 1.0, 5.0, 4.0]])
_W = torch.randn(4, 12, 3, 3)
_OFF = torch.randn(2, 18, 7, 9)
# name -> (call on a module of functions (torchvision.ops or tvm_dcn), words our message names)
_BAD_CALLS = {
    "boxes_k4": (lambda m: m.roi_align(_X, torch.zeros(3, 4), 2), "boxes"),
    "boxes_not_a_tensor": (lambda m: m.roi_align(_X, "boxes", 2), "boxes"),
    "box_list_of_k5": (lambda m: m.roi_align(_X, [torch.zeros(2, 5)], 2), r"boxes\[0\]"),
    "roi_pool_boxes_k4": (lambda m: m.roi_pool(_X, torch.zeros(3, 4), 2), "boxes"),
    "input_3d": (lambda m: m.roi_align(_X[0], _BOX, 2), "input"),
    "input_int": (lambda m: m.roi_align(_X.int(), _BOX, 2), "dtype"),
    "ps_channels": (lambda m: m.ps_roi_align(_X, _BOX, 3), "channels"),
    "conv_offset_size": (lambda m: m.deform_conv2d(_X, _OFF[:, :, :5], _W), "offset"),
    "conv_offset_channels": (lambda m: m.deform_conv2d(_X, _OFF[:, :17], _W), "offset"),
    "conv_weight_groups": (lambda m: m.deform_conv2d(_X, _OFF, torch.randn(4, 5, 3, 3)), r"weight\.shape\[1\]"),
    "conv_input_3d": (lambda m: m.deform_conv2d(_X[0], _OFF, _W), "input"),
    "conv_mask_shape": (lambda m: m.deform_conv2d(_X, _OFF, _W, mask=torch.ones(2, 8, 7, 9)), "mask"),
    "conv_bias_shape": (lambda m: m.deform_conv2d(_X, _OFF, _W, bias=torch.ones(5)), "bias"),
    "conv_dtype_mix": (lambda m: m.deform_conv2d(_X, _OFF.double(), _W), "offset"),
}


@pytest.mark.parametrize("case", list(_BAD_CALLS))
def test_exceptions_are_instances_of_torchvisions(case):
    call, names = _BAD_CALLS[case]
    with pytest.raises(Exception) as theirs:
        call(torchvision.ops)
    expected = type(theirs.value)
    assert expected in (RuntimeError, AssertionError, ValueError), expected  # what torchvision raises here
    with pytest.raises(expected, match=names) as ours:
        call(tvm_dcn)
    assert isinstance(ours.value, (ValueError, TypeError))  # and still what tvm_dcn documents
