"""Deformable RoI pooling (mmcv's deform_roi_pool, plain and modulated) and deformable
position-sensitive RoI pooling (Deformable-ConvNets) against the independent plain-PyTorch
references of ``roi_reference.py``: forward in float32 and float64, gradients (input, offset,
mask, trans) against autograd through the references, float64 gradcheck, and the modules."""
from __future__ import annotations

import pytest
import torch
import torchvision

import roi_reference as ref
import tvm_dcn
from conftest import assert_matches

SHAPE = (2, 6, 9, 11)
SCALE = 0.5
OUT = (3, 2)
GAMMA = 0.1


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(4321)
    x = torch.randn(*SHAPE, generator=g, dtype=torch.float64)
    rois = ref.make_boxes(g, SHAPE[0], (SHAPE[2] / SCALE, SHAPE[3] / SCALE), dtype=torch.float64)
    k = rois.shape[0]
    offset = torch.randn(k, 2, *OUT, generator=g, dtype=torch.float64)
    mask = torch.rand(k, 1, *OUT, generator=g, dtype=torch.float64)
    grad = torch.randn(k, SHAPE[1], *OUT, generator=g, dtype=torch.float64)
    return x, rois, offset, mask, grad


def _grads(fn, tensors: dict, grad_out, dtype):
    """Output and gradients of <fn(**tensors), grad_out> for the tensors that are not None."""
    leaves = {name: t.detach().to(dtype).requires_grad_() for name, t in tensors.items() if t is not None}
    out = fn(**leaves)
    out.backward(grad_out.to(dtype))
    return out.detach(), {name: t.grad for name, t in leaves.items()}


# float32 for every variant; float64 for the modulated one (whose kernels the gradcheck reuses).
DEFORM_CASES = [(v, r, torch.float32) for v in ("no_offset", "offset", "modulated") for r in (2, 0)] + \
    [("modulated", r, torch.float64) for r in (2, 0)]


@pytest.mark.parametrize("variant, sampling_ratio, dtype", DEFORM_CASES,
                         ids=[f"{v}-{'ratio2' if r else 'adaptive'}-{str(d)[-2:]}" for v, r, d in DEFORM_CASES])
def test_deform_roi_pool_matches_reference(data, variant, sampling_ratio, dtype):
    x, rois, offset, mask, grad = data
    tensors = dict(input=x, offset=None if variant == "no_offset" else offset,
                   mask=mask if variant == "modulated" else None)

    def ours(input, offset=None, mask=None):
        return tvm_dcn.deform_roi_pool(input, rois.to(dtype), offset, OUT, SCALE, sampling_ratio, GAMMA, mask=mask)

    def theirs(input, offset=None, mask=None):
        return ref.deform_roi_pool(input, rois, offset, OUT, SCALE, sampling_ratio, GAMMA, mask=mask)

    out, grads = _grads(ours, tensors, grad, dtype)
    ref_out, ref_grads = _grads(theirs, tensors, grad, torch.float64)
    assert_matches(out, ref_out, dtype, what="output")
    for name in grads:
        assert_matches(grads[name], ref_grads[name], dtype, what=f"grad {name}")


def test_deform_roi_pool_without_offset_is_aligned_roi_align(data):
    """mmcv's RoI frame is x * spatial_scale - 0.5: zero offsets give torchvision's aligned RoI Align."""
    x, rois, offset, _, _ = data
    x, rois = x.float(), rois.float()
    expected = torchvision.ops.roi_align(x, rois, OUT, SCALE, 2, aligned=True)
    torch.testing.assert_close(tvm_dcn.deform_roi_pool(x, rois, None, OUT, SCALE, 2), expected)
    torch.testing.assert_close(tvm_dcn.deform_roi_pool(x, rois, torch.zeros_like(offset).float(), OUT, SCALE, 2),
                               expected)


PS_CONFIGS = {
    # output_dim, group_size, pooled_size, part_size, sample_per_part, classes, no_trans
    "groups=pooled": (2, 3, 3, 3, 2, 1, False),
    "groups<pooled-2classes": (4, 2, 3, 2, 3, 2, False),
    "no_trans": (3, 1, 3, 3, 2, 1, True),
}


@pytest.fixture(scope="module")
def ps_data():
    g = torch.Generator().manual_seed(777)
    rois = ref.make_boxes(g, 2, (18.0, 22.0), count=4, dtype=torch.float64)
    return g, rois


def _ps_case(ps_data, config):
    g, rois = ps_data
    output_dim, group, pooled, part, spp, classes, no_trans = PS_CONFIGS[config]
    g = torch.Generator().manual_seed(len(config))
    x = torch.randn(2, output_dim * group * group, 9, 11, generator=g, dtype=torch.float64)
    trans = None if no_trans else torch.randn(rois.shape[0], 2 * classes, part, part, generator=g, dtype=torch.float64)
    grad = torch.randn(rois.shape[0], output_dim, pooled, pooled, generator=g, dtype=torch.float64)
    return rois, x, trans, grad, (SCALE, output_dim, group, pooled, part, spp, 0.2, no_trans)


PS_CASES = [(c, torch.float32) for c in PS_CONFIGS] + [("groups<pooled-2classes", torch.float64)]


@pytest.mark.parametrize("config, dtype", PS_CASES, ids=[f"{c}-{str(d)[-2:]}" for c, d in PS_CASES])
def test_deform_psroi_pool_matches_reference(ps_data, config, dtype):
    rois, x, trans, grad, args = _ps_case(ps_data, config)

    def ours(input, offset=None):
        return tvm_dcn.deform_psroi_pool(input, rois.to(dtype), offset, *args)

    def theirs(input, offset=None):
        return ref.deform_psroi_pool(input, rois, offset, *args)

    out, grads = _grads(ours, dict(input=x, offset=trans), grad, dtype)
    ref_out, ref_grads = _grads(theirs, dict(input=x, offset=trans), grad, torch.float64)
    assert_matches(out, ref_out, dtype, what="output")
    for name in grads:
        assert_matches(grads[name], ref_grads[name], dtype, what=f"grad {name}")


@pytest.mark.parametrize("sampling_ratio", [2, 0], ids=["ratio2", "adaptive"])
def test_gradcheck_deform_roi_pool(data, sampling_ratio):
    x, rois, offset, mask, _ = data
    tensors = [t.clone().requires_grad_() for t in (x, offset * 0.5, mask)]
    assert torch.autograd.gradcheck(
        lambda a, b, c: tvm_dcn.deform_roi_pool(a, rois, b, OUT, SCALE, sampling_ratio, GAMMA, mask=c), tensors,
        eps=1e-6, atol=1e-7)


def test_gradcheck_deform_psroi_pool(ps_data):
    rois, x, trans, _, args = _ps_case(ps_data, "groups<pooled-2classes")
    tensors = [x.clone().requires_grad_(), trans.clone().requires_grad_()]
    assert torch.autograd.gradcheck(lambda a, b: tvm_dcn.deform_psroi_pool(a, rois, b, *args), tensors,
                                    eps=1e-6, atol=1e-7)


# --------------------------------------------------------------------------------------------
# Modules


def test_deform_roi_pool_packs_start_from_roi_align(data):
    x, rois, _, _, _ = data
    x, rois = x.float(), rois.float()
    torch.manual_seed(0)
    plain = tvm_dcn.deform_roi_pool(x, rois, None, OUT, SCALE, 2)
    pack = tvm_dcn.DeformRoIPoolPack(OUT, SHAPE[1], deform_fc_channels=16, spatial_scale=SCALE, sampling_ratio=2)
    modulated = tvm_dcn.ModulatedDeformRoIPoolPack(OUT, SHAPE[1], deform_fc_channels=16, spatial_scale=SCALE,
                                                   sampling_ratio=2)
    torch.testing.assert_close(pack(x, rois), plain)  # zero-initialised offsets
    torch.testing.assert_close(modulated(x, rois), plain * 0.5)  # sigmoid(0) masks
    # Gradients reach the offset predictor (through the offset gradient) and the mask predictor.
    xr = x.clone().requires_grad_()
    modulated(xr, rois).square().sum().backward()
    assert modulated.offset_fc[-1].weight.grad.abs().sum() > 0
    assert modulated.mask_fc[2].weight.grad.abs().sum() > 0
    assert xr.grad.abs().sum() > 0
    module = tvm_dcn.DeformRoIPool(OUT, SCALE, 2)
    torch.testing.assert_close(module(x, rois), plain)


def test_deform_roi_pooling_pack_starts_without_offsets(ps_data):
    g, rois = ps_data
    x = torch.randn(2, 2 * 9, 9, 11, generator=torch.Generator().manual_seed(3))
    rois = rois.float()
    pooling = tvm_dcn.DeformRoIPooling(SCALE, 3, 2, no_trans=True, group_size=3, sample_per_part=2)
    pack = tvm_dcn.DeformRoIPoolingPack(SCALE, 3, 2, no_trans=False, group_size=3, sample_per_part=2,
                                        trans_std=0.1, deform_fc_channels=16)
    expected = pooling(x, rois)
    assert_matches(expected, ref.deform_psroi_pool(x.double(), rois.double(), None, SCALE, 2, 3, 3, 3, 2, 0.1, True),
                   torch.float32)
    torch.testing.assert_close(pack(x, rois), expected)
    pack(x, rois).square().sum().backward()
    assert pack.offset_fc[-1].weight.grad.abs().sum() > 0
