"""ONNX export (tvm_dcn.onnx): each exported file runs in ONNX Runtime and matches tvm-dcn's own
output at two batch sizes (one file, dynamic batch), passes onnx.checker, and holds the expected
ONNX operators; operators ONNX has no equivalent for raise a clear error naming them."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import tvm_dcn
from roi_reference import make_boxes

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
tvm_onnx = pytest.importorskip("tvm_dcn.onnx")

TOLERANCE = dict(rtol=1e-4, atol=1e-4)


def _randomize(module: nn.Module, generator, scale: float = 0.3) -> None:
    """Random parameters everywhere (the packs zero-initialise their offset layers) and statistics."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * scale)
        for b in module.buffers():
            if b.is_floating_point():
                b.copy_(torch.rand(b.shape, generator=generator) + 0.5)


def _export_and_load(model, args, path, **kwargs):
    tvm_onnx.export(model, args, path, **kwargs)
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return proto, session


def _run(session, *inputs):
    feeds = {i.name: t.numpy() for i, t in zip(session.get_inputs(), inputs)}
    return torch.from_numpy(session.run(None, feeds)[0])


class _DeformBottleneck(nn.Module):
    """A ResNet bottleneck whose 3x3 convolutions are deformable: a DeformConv2dPack (stride 2,
    dilation 2, groups, offset groups, bias) and a ModulatedDeformConv2dPack (groups, offset groups),
    with BatchNorm and a strided projection shortcut."""

    def __init__(self, channels: int = 8, width: int = 8):
        super().__init__()
        self.reduce = nn.Sequential(nn.Conv2d(channels, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.dcn = tvm_dcn.DeformConv2dPack(width, width, 3, stride=2, padding=2, dilation=2, groups=2,
                                            deform_groups=2)
        self.mdcn = tvm_dcn.ModulatedDeformConv2dPack(width, width, 3, padding=1, groups=2, deform_groups=4,
                                                      bias=False)
        self.bn = nn.BatchNorm2d(width)
        self.expand = nn.Conv2d(width, 2 * channels, 1)
        self.shortcut = nn.Conv2d(channels, 2 * channels, 1, stride=2)

    def forward(self, x):
        y = self.reduce(x)
        y = torch.relu(self.bn(self.mdcn(torch.relu(self.dcn(y)))))
        return torch.relu(self.expand(y) + self.shortcut(x))


class _BoxHead(nn.Module):
    """RoI Align in both modes (sampling 2 and adaptive) and RoI Pool feeding a box classifier."""

    def __init__(self, channels: int = 8, out=(3, 2)):
        super().__init__()
        self.aligned = tvm_dcn.RoIAlign(out, 0.5, sampling_ratio=2, aligned=True)
        self.legacy = tvm_dcn.RoIAlign(out, 0.5, sampling_ratio=-1, aligned=False)
        self.pool = tvm_dcn.RoIPool(out, 0.5)
        self.cls = nn.Linear(3 * channels * out[0] * out[1], 4)

    def forward(self, features, boxes):
        pooled = torch.cat([self.aligned(features, boxes), self.legacy(features, boxes), self.pool(features, boxes)], 1)
        return self.cls(pooled.flatten(1))


def _boxes(generator, batch: int, count: int) -> torch.Tensor:
    """Random and edge-case boxes (make_boxes) on an 18 x 22 image, plus corners on negative half
    pixels after scaling by 0.5 (RoI Pool's rounding)."""
    boxes = make_boxes(generator, batch, (18.0, 22.0), count=count)
    return torch.cat([boxes, torch.tensor([[0.0, -3.0, -1.0, 5.0, 7.0]])])


def test_deform_bottleneck_exports_to_deform_conv(tmp_path):
    g = torch.Generator().manual_seed(0)
    model = _DeformBottleneck()
    _randomize(model, g)
    model.eval()
    proto, session = _export_and_load(model, (torch.randn(2, 8, 13, 11, generator=g),), tmp_path / "block.onnx")
    assert [n.op_type for n in proto.graph.node].count("DeformConv") == 2
    for batch in (2, 3):
        x = torch.randn(batch, 8, 13, 11, generator=g)
        with torch.no_grad():
            expected = model(x)
        torch.testing.assert_close(_run(session, x), expected, **TOLERANCE)


def test_deform_conv2d_with_given_offset_mask_and_bias(tmp_path):
    """The functional form: offset and mask as graph inputs, bias, asymmetric stride and padding."""
    g = torch.Generator().manual_seed(1)
    weight = torch.randn(6, 2, 3, 2, generator=g)  # groups 2 (4 input channels)
    bias = torch.randn(6, generator=g)

    class Conv(nn.Module):
        def forward(self, x, offset, mask):
            return tvm_dcn.deform_conv2d(x, offset, weight, bias, stride=(2, 1), padding=(1, 0), dilation=(1, 2),
                                         mask=mask)

    def inputs(batch):
        x = torch.randn(batch, 4, 9, 8, generator=g)
        offset = torch.randn(batch, 2 * 2 * 6, 5, 6, generator=g)  # 2 offset groups, 3 x 2 taps, 5 x 6 output
        return x, offset, torch.rand(batch, 2 * 6, 5, 6, generator=g)

    proto, session = _export_and_load(Conv(), inputs(2), tmp_path / "conv.onnx")
    assert "DeformConv" in [n.op_type for n in proto.graph.node]
    for batch in (2, 4):
        args = inputs(batch)
        torch.testing.assert_close(_run(session, *args), Conv()(*args), **TOLERANCE)


def test_box_head_exports_to_roi_align_and_max_roi_pool(tmp_path):
    g = torch.Generator().manual_seed(2)
    model = _BoxHead()
    _randomize(model, g)
    proto, session = _export_and_load(model, (torch.randn(2, 8, 9, 11, generator=g), _boxes(g, 2, 6)),
                                      tmp_path / "head.onnx", opset=16)
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("RoiAlign") == 2 and ops.count("MaxRoiPool") == 1
    modes = sorted(a.s.decode() for n in proto.graph.node if n.op_type == "RoiAlign" for a in n.attribute
                   if a.name == "coordinate_transformation_mode")
    assert modes == ["half_pixel", "output_half_pixel"]
    for batch, count in ((2, 6), (3, 13)):
        features, boxes = torch.randn(batch, 8, 9, 11, generator=g), _boxes(g, batch, count)
        with torch.no_grad():
            expected = model(features, boxes)
        torch.testing.assert_close(_run(session, features, boxes), expected, **TOLERANCE)


@pytest.mark.parametrize("name", ["ps_roi_align", "ps_roi_pool", "deform_roi_pool", "modulated_deform_roi_pool",
                                  "deform_psroi_pool"])
def test_unsupported_operators_raise_naming_the_operator(name, tmp_path):
    module = {
        "ps_roi_align": tvm_dcn.PSRoIAlign((3, 2), 0.5, 2),
        "ps_roi_pool": tvm_dcn.PSRoIPool((3, 2), 0.5),
        "deform_roi_pool": tvm_dcn.DeformRoIPoolPack((3, 2), 12, deform_fc_channels=8, spatial_scale=0.5),
        "modulated_deform_roi_pool": tvm_dcn.ModulatedDeformRoIPoolPack((3, 2), 12, deform_fc_channels=8,
                                                                        spatial_scale=0.5),
        "deform_psroi_pool": tvm_dcn.DeformRoIPoolingPack(0.5, 3, 3, no_trans=False, group_size=2, part_size=3,
                                                          deform_fc_channels=8),
    }[name]
    g = torch.Generator().manual_seed(3)
    args = (torch.randn(2, 12, 9, 11, generator=g), _boxes(g, 2, 6))
    operator = "ps_roi_align" if name == "ps_roi_align" else name.replace("modulated_", "")
    with pytest.raises(tvm_onnx.UnsupportedOperatorError, match=rf"tvm_dcn\.{operator}\b.*cannot be exported"):
        tvm_onnx.export(module, args, tmp_path / "x.onnx")
    assert not (tmp_path / "x.onnx").exists()
    # torch.onnx.export with the translation table fails on it too, with this message in the chain.
    with pytest.raises(Exception) as info:
        torch.onnx.export(module, args, dynamo=True, custom_translation_table=tvm_onnx.translation_table(),
                          opset_version=19, verbose=False)
    chain, error = [], info.value
    while error is not None:
        chain.append(str(error))
        error = error.__cause__ or error.__context__
    assert any(f"tvm_dcn.{operator}" in message and "cannot be exported" in message for message in chain), chain


def test_opset_too_old_for_deform_conv_raises():
    model = tvm_dcn.DeformConv2dPack(4, 4, 3, padding=1)
    with pytest.raises(tvm_onnx.UnsupportedOperatorError, match="DeformConv.*opset >= 19"):
        tvm_onnx.export(model, (torch.randn(2, 4, 6, 6),), opset=18)
