"""torch.fx and torchvision's feature extraction on models that mix tvm-dcn modules with plain
torch layers: every tvm-dcn function is one leaf node (torch.fx.wrap), the traced module computes
what the model computes (forward and gradients), and create_feature_extractor returns the
intermediate outputs a forward hook sees."""
from __future__ import annotations

import torch
import torch.fx
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
# Exceptions: instances of what torchvision raises for the same mistake, with our messages.

import pytest  # noqa: E402
import torchvision  # noqa: E402

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
