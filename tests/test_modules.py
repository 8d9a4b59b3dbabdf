"""Tests of the nn.Module layers in tvm_dcn.modules.

References: torchvision.ops.DeformConv2d / deform_conv2d, and mmcv's Pack semantics re-stated
independently here (mmcv itself is not a dependency). Shapes are few and small: each distinct
workload compiles a TVM kernel once.
"""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

torchvision = pytest.importorskip("torchvision")
from torchvision.ops import DeformConv2d as TVDeformConv2d  # noqa: E402
from torchvision.ops import deform_conv2d as tv_deform_conv2d  # noqa: E402

import tvm_dcn  # noqa: E402
import tvm_dcn.functional  # noqa: E402
from tvm_dcn.modules import (  # noqa: E402
    DCN, DCNv2, DeformConv2d, DeformConv2dPack, ModulatedDeformConv2dPack)

PACKS = [DeformConv2dPack, ModulatedDeformConv2dPack]


def _tol(dtype):
    return dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)


def _assert_close(actual, expected, dtype):
    torch.testing.assert_close(actual, expected, **_tol(dtype))


def _randomize(module: torch.nn.Module, scale: float = 1.0) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * scale)


def _mmcv_offset_and_mask(out: torch.Tensor, deform_groups: int, taps: int):
    """mmcv's DCNv2 split, written with explicit indices: chunk(3) + cat of the first two thirds
    is the first 2 * G * K channels (interleaved dy, dx per tap); the last third is the mask logit."""
    n = deform_groups * taps
    assert out.shape[1] == 3 * n
    return out[:, : 2 * n], torch.sigmoid(out[:, 2 * n:])


# ---------------------------------------------------------------------------------------------
# DeformConv2d vs torchvision

# (in, out, kernel, stride, padding, dilation, groups, bias, offset_groups, with_mask, dtype)
TV_CONFIGS = [
    pytest.param(4, 6, 3, 1, 1, 1, 1, True, 1, False, torch.float32, id="plain-f32"),
    pytest.param(4, 6, 3, 1, 1, 1, 1, True, 1, True, torch.float32, id="mask-f32"),
    pytest.param(4, 6, (3, 2), 2, (1, 0), (1, 2), 2, False, 2, True, torch.float32,
                 id="groups-stride-dilation-nobias-f32"),
    pytest.param(4, 6, 3, 1, 1, 1, 1, True, 1, True, torch.float64, id="mask-f64"),
    pytest.param(4, 6, (3, 2), 2, (1, 0), (1, 2), 2, False, 2, False, torch.float64,
                 id="groups-stride-dilation-nobias-f64"),
]


@pytest.mark.parametrize(
    "cin,cout,k,stride,padding,dilation,groups,bias,offset_groups,with_mask,dtype", TV_CONFIGS)
def test_deform_conv2d_matches_torchvision(cin, cout, k, stride, padding, dilation, groups, bias,
                                           offset_groups, with_mask, dtype):
    torch.manual_seed(0)
    ref = TVDeformConv2d(cin, cout, k, stride, padding, dilation, groups, bias).to(dtype)
    mod = DeformConv2d(cin, cout, k, stride, padding, dilation, groups, bias).to(dtype)
    mod.load_state_dict(ref.state_dict())  # strict: same keys and shapes

    x = torch.randn(2, cin, 7, 8, dtype=dtype)
    kh, kw = mod.kernel_size
    with torch.no_grad():
        out_h, out_w = F.conv2d(x, ref.weight, None, ref.stride, ref.padding, ref.dilation, groups).shape[2:]
    # Offsets of a few pixels, so that samples fall between pixels and some fall outside.
    offset = 2.0 * torch.randn(2, 2 * offset_groups * kh * kw, out_h, out_w, dtype=dtype)
    mask = torch.rand(2, offset_groups * kh * kw, out_h, out_w, dtype=dtype) if with_mask else None
    with torch.no_grad():
        expected = ref(x, offset, mask)
        actual = mod(x, offset, mask)
    assert actual.shape == expected.shape and actual.dtype == dtype
    _assert_close(actual, expected, dtype)


def test_deform_conv2d_signature_attributes_and_repr_match_torchvision():
    for args, kwargs in [((4, 6, 3), {}),
                         ((4, 6, (3, 2)), dict(stride=2, padding=(1, 0), dilation=(1, 2), groups=2, bias=False))]:
        ref, mod = TVDeformConv2d(*args, **kwargs), DeformConv2d(*args, **kwargs)
        assert repr(mod) == repr(ref)
        for name in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups"):
            assert getattr(mod, name) == getattr(ref, name), name
        assert list(mod.state_dict()) == list(ref.state_dict())
        for name, p in ref.named_parameters():
            assert dict(mod.named_parameters())[name].shape == p.shape


def test_deform_conv2d_init_matches_torch_conv_distribution():
    # kaiming_uniform_(a=sqrt(5)) -> U(-1/sqrt(fan_in), 1/sqrt(fan_in)); bias from the same range.
    torch.manual_seed(0)
    mod = DeformConv2d(8, 64, 3, groups=2)
    bound = 1.0 / (4 * 9) ** 0.5
    assert mod.weight.abs().max() <= bound and mod.weight.abs().max() > 0.9 * bound
    assert mod.bias.abs().max() <= bound and mod.bias.abs().max() > 0.5 * bound
    # Same RNG stream as torchvision's layer.
    torch.manual_seed(1)
    ref = TVDeformConv2d(8, 64, 3, groups=2)
    torch.manual_seed(1)
    mod = DeformConv2d(8, 64, 3, groups=2)
    assert torch.equal(mod.weight, ref.weight) and torch.equal(mod.bias, ref.bias)


# ---------------------------------------------------------------------------------------------
# Pack layers


PACK_CONFIGS = [
    # (kwargs, input shape)
    pytest.param(dict(in_channels=4, out_channels=6, kernel_size=3, padding=1), (2, 4, 7, 8), id="3x3-pad1"),
    pytest.param(dict(in_channels=4, out_channels=6, kernel_size=(3, 2), stride=2, padding=(1, 0),
                      dilation=(1, 2), groups=2, deform_groups=2, bias=False), (2, 4, 7, 8),
                 id="groups-deformgroups-stride-dilation-nobias"),
]


@pytest.mark.parametrize("kwargs,shape", PACK_CONFIGS)
@pytest.mark.parametrize("cls", PACKS)
def test_pack_structure_and_state_dict_keys(cls, kwargs, shape):
    mod = cls(**kwargs)
    g = kwargs.get("deform_groups", 1)
    kh, kw = mod.kernel_size
    per_tap = 2 if cls is DeformConv2dPack else 3
    co = mod.conv_offset
    assert isinstance(co, torch.nn.Conv2d)
    assert (co.in_channels, co.out_channels) == (kwargs["in_channels"], g * per_tap * kh * kw)
    assert (co.kernel_size, co.stride, co.padding, co.dilation, co.groups) == (
        mod.kernel_size, mod.stride, mod.padding, mod.dilation, 1)
    assert co.bias is not None
    assert torch.count_nonzero(co.weight) == 0 and torch.count_nonzero(co.bias) == 0
    default_bias = cls is not DeformConv2dPack  # mmcv: DCNv1 has no bias by default, DCNv2 has one
    expected_keys = ["weight"] + (["bias"] if kwargs.get("bias", default_bias) else []) + [
        "conv_offset.weight", "conv_offset.bias"]
    assert list(mod.state_dict()) == expected_keys
    assert mod.weight.shape == (kwargs["out_channels"], kwargs["in_channels"] // kwargs.get("groups", 1), kh, kw)
    assert mod.state_dict()._metadata[""]["version"] == 2  # as mmcv's Pack layers
    if mod.bias is not None:
        assert torch.count_nonzero(mod.bias) == 0  # mmcv initialises the bias to zero


@pytest.mark.parametrize("kwargs,shape", PACK_CONFIGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_pack_at_init_is_a_plain_convolution(kwargs, shape, dtype):
    torch.manual_seed(0)
    mod = DeformConv2dPack(**kwargs).to(dtype)
    if mod.bias is not None:
        with torch.no_grad():
            mod.bias.normal_()  # the bias is zero at init; make it visible
    x = torch.randn(*shape, dtype=dtype)
    with torch.no_grad():
        actual = mod(x)
        expected = F.conv2d(x, mod.weight, mod.bias, mod.stride, mod.padding, mod.dilation, mod.groups)
    _assert_close(actual, expected, dtype)


@pytest.mark.parametrize("kwargs,shape", PACK_CONFIGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_modulated_pack_at_init_is_half_a_convolution_plus_bias(kwargs, shape, dtype):
    # Zero offsets and mask = sigmoid(0) = 0.5 on every tap; mmcv adds the bias after the
    # modulated sum, so the bias is not halved.
    torch.manual_seed(0)
    mod = ModulatedDeformConv2dPack(**kwargs).to(dtype)
    if mod.bias is not None:
        with torch.no_grad():
            mod.bias.normal_()
    x = torch.randn(*shape, dtype=dtype)
    with torch.no_grad():
        actual = mod(x)
        expected = 0.5 * F.conv2d(x, mod.weight, None, mod.stride, mod.padding, mod.dilation, mod.groups)
        if mod.bias is not None:
            expected = expected + mod.bias.view(1, -1, 1, 1)
    _assert_close(actual, expected, dtype)


@pytest.mark.parametrize("kwargs,shape", PACK_CONFIGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("cls", PACKS)
def test_pack_with_random_conv_offset_matches_reference(cls, kwargs, shape, dtype):
    torch.manual_seed(1)
    mod = cls(**kwargs).to(dtype)
    _randomize(mod, scale=0.3)  # offsets of order a pixel; weights and bias non-zero
    x = torch.randn(*shape, dtype=dtype)
    taps = mod.kernel_size[0] * mod.kernel_size[1]
    with torch.no_grad():
        actual = mod(x)
        out = F.conv2d(x, mod.conv_offset.weight, mod.conv_offset.bias, mod.stride, mod.padding, mod.dilation)
        if cls is DeformConv2dPack:
            offset, mask = out, None
        else:
            offset, mask = _mmcv_offset_and_mask(out, mod.deform_groups, taps)
        assert offset.abs().max() > 0.5  # the offsets really move the samples
        expected = tv_deform_conv2d(x, offset, mod.weight, mod.bias, mod.stride, mod.padding,
                                    mod.dilation, mask)
    _assert_close(actual, expected, dtype)


@pytest.mark.parametrize("cls", PACKS)
def test_pack_offset_layout_is_dy_dx_interleaved(cls):
    """Independent of torchvision: conv_offset with only a bias of dy = +1 (even channels of
    the offset part) moves every sample down one row: output row y, kernel row i reads input row
    y + i instead of y - 1 + i, i.e. a plain convolution of the input padded with no row on top
    and two at the bottom."""
    torch.manual_seed(2)
    mod = cls(4, 6, 3, padding=1, deform_groups=2, bias=True)
    with torch.no_grad():
        mod.bias.normal_()
        n = mod.deform_groups * 9
        mod.conv_offset.bias[0: 2 * n: 2] = 1.0  # dy of every tap of every group
        mod.conv_offset.bias[1: 2 * n: 2] = 0.0  # dx
        if cls is ModulatedDeformConv2dPack:
            mod.conv_offset.bias[2 * n:] = torch.logit(torch.tensor(0.25))  # mask = 0.25
        x = torch.randn(2, 4, 7, 8)
        padded = F.pad(x, (1, 1, 0, 2))  # (left, right, top, bottom)
        scale = 1.0 if cls is DeformConv2dPack else 0.25
        expected = scale * F.conv2d(padded, mod.weight) + mod.bias.view(1, -1, 1, 1)
        actual = mod(x)
    _assert_close(actual, expected, torch.float32)


def test_mmcv_split_is_first_two_thirds_then_mask():
    # The chunk/cat in the layer is the same as slicing; guard the helper used as reference.
    out = torch.arange(2 * 3 * 2 * 9, dtype=torch.float32).view(2, 3 * 2 * 9, 1, 1)
    o1, o2, m = torch.chunk(out, 3, dim=1)
    offset, mask = _mmcv_offset_and_mask(out, 2, 9)
    assert torch.equal(torch.cat((o1, o2), dim=1), offset)
    assert torch.equal(torch.sigmoid(m), mask)


def test_mmcv_style_state_dict_loads_and_reproduces():
    """A state dict with mmcv's key names (as a checkpoint saved by mmcv has) loads strictly and
    gives the reference output; mmcv's DCNv1 has no bias, so it loads into bias=False."""
    torch.manual_seed(3)
    x = torch.randn(2, 4, 7, 8)
    v1 = {"weight": torch.randn(6, 4, 3, 3), "conv_offset.weight": 0.1 * torch.randn(18, 4, 3, 3),
          "conv_offset.bias": 0.1 * torch.randn(18)}
    mod = DCN(4, 6, 3, padding=1, bias=False)
    mod.load_state_dict(v1)
    v2 = {"weight": torch.randn(6, 4, 3, 3), "bias": torch.randn(6),
          "conv_offset.weight": 0.1 * torch.randn(27, 4, 3, 3), "conv_offset.bias": 0.1 * torch.randn(27)}
    mod2 = DCNv2(4, 6, 3, padding=1)
    mod2.load_state_dict(v2)
    with torch.no_grad():
        off = F.conv2d(x, v1["conv_offset.weight"], v1["conv_offset.bias"], padding=1)
        _assert_close(mod(x), tv_deform_conv2d(x, off, v1["weight"], None, padding=1), torch.float32)
        out = F.conv2d(x, v2["conv_offset.weight"], v2["conv_offset.bias"], padding=1)
        o1, o2, m = torch.chunk(out, 3, dim=1)
        expected = tv_deform_conv2d(x, torch.cat((o1, o2), 1), v2["weight"], v2["bias"], padding=1,
                                    mask=torch.sigmoid(m))
        _assert_close(mod2(x), expected, torch.float32)


def test_pack_init_distributions_follow_mmcv():
    torch.manual_seed(0)
    # DCNv1: kaiming_uniform_(nonlinearity='relu'): bound sqrt(6 / fan_in), fan_in = C_in/groups*K.
    v1 = DeformConv2dPack(8, 64, 3, groups=2, bias=True)
    bound = (6.0 / (4 * 9)) ** 0.5
    assert v1.weight.abs().max() <= bound and v1.weight.abs().max() > 0.9 * bound
    # DCNv2: U(-1/sqrt(n), 1/sqrt(n)), n = C_in * K (all input channels, whatever groups).
    v2 = ModulatedDeformConv2dPack(8, 64, 3, groups=2)
    bound = 1.0 / (8 * 9) ** 0.5
    assert v2.weight.abs().max() <= bound and v2.weight.abs().max() > 0.9 * bound
    for mod in (v1, v2):
        mod.reset_parameters()
        assert torch.count_nonzero(mod.bias) == 0 and torch.count_nonzero(mod.conv_offset.weight) == 0


def test_aliases_and_deprecated_keyword():
    assert DCN is DeformConv2dPack and DCNv2 is ModulatedDeformConv2dPack
    assert tvm_dcn.DeformConv2d is DeformConv2d
    assert tvm_dcn.DeformConv2dPack is DeformConv2dPack
    assert tvm_dcn.ModulatedDeformConv2dPack is ModulatedDeformConv2dPack
    for cls in PACKS:
        with pytest.warns(DeprecationWarning, match="deformable_groups"):
            mod = cls(4, 6, 3, deformable_groups=2)
        assert mod.deform_groups == 2
        with pytest.raises(ValueError, match="deformable_groups"):
            cls(4, 6, 3, deform_groups=4, deformable_groups=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        DeformConv2dPack(4, 6, 3, deform_groups=2)


def test_pack_repr():
    r = repr(ModulatedDeformConv2dPack(4, 6, 3, padding=1, deform_groups=2, bias=False))
    assert r.startswith("ModulatedDeformConv2dPack(")
    assert "deform_groups=2" in r and "bias=False" in r and "padding=(1, 1)" in r and "conv_offset" in r


# ---------------------------------------------------------------------------------------------
# constructor validation

BAD_ARGS = [
    (dict(in_channels=0), ValueError, "in_channels"),
    (dict(out_channels=-1), ValueError, "out_channels"),
    (dict(in_channels=5, groups=2), ValueError, "in_channels"),
    (dict(out_channels=5, groups=2), ValueError, "out_channels"),
    (dict(groups=0), ValueError, "groups"),
    (dict(kernel_size=0), ValueError, "kernel_size"),
    (dict(kernel_size=(3, 0)), ValueError, "kernel_size"),
    (dict(kernel_size=(3, 3, 3)), ValueError, "kernel_size"),
    (dict(stride=0), ValueError, "stride"),
    (dict(stride=(1, -2)), ValueError, "stride"),
    (dict(padding=-1), ValueError, "padding"),
    (dict(dilation=0), ValueError, "dilation"),
    (dict(kernel_size=3.0), TypeError, "kernel_size"),
    (dict(in_channels=4.0), TypeError, "in_channels"),
    (dict(padding="same"), TypeError, "padding"),
    (dict(bias="auto"), TypeError, "bias"),
]
PACK_BAD_ARGS = [
    (dict(deform_groups=0), ValueError, "deform_groups"),
    (dict(deform_groups=3), ValueError, "deform_groups"),
    (dict(deform_groups=2.0), TypeError, "deform_groups"),
]


@pytest.mark.parametrize("cls", [DeformConv2d] + PACKS)
@pytest.mark.parametrize("bad,exc,name", BAD_ARGS + PACK_BAD_ARGS,
                         ids=[",".join(f"{k}={v!r}" for k, v in b.items()) for b, _, _ in BAD_ARGS + PACK_BAD_ARGS])
def test_constructor_validation(cls, bad, exc, name):
    if cls is DeformConv2d and "deform_groups" in bad:
        pytest.skip("DeformConv2d takes its offset groups from the offset tensor")
    kwargs = dict(in_channels=4, out_channels=6, kernel_size=3)
    kwargs.update(bad)
    with pytest.raises(exc, match=name):
        cls(**kwargs)


def test_valid_edge_arguments_are_accepted():
    DeformConv2d(4, 6, (1, 5), stride=(1, 2), padding=(0, 2), dilation=(3, 1), groups=2, bias=0)
    DeformConv2dPack(4, 6, [3, 3], deform_groups=4, bias=False)
    ModulatedDeformConv2dPack(3, 3, 1, groups=3, deform_groups=3)
    assert DeformConv2d(4, 6, 3, bias=1).bias is not None


# ---------------------------------------------------------------------------------------------
# training (needs the backward kernels)


def _toy_regression(cls, steps=30, lr=0.2):
    """Fit a layer to the output of a fixed 'teacher' (the same kind of layer with non-zero
    offsets); returns the losses."""
    torch.manual_seed(4)
    teacher = cls(4, 6, 3, padding=1)
    _randomize(teacher, scale=0.2)
    x = torch.randn(2, 4, 7, 8)
    with torch.no_grad():
        target = teacher(x)
    student = cls(4, 6, 3, padding=1)
    opt = torch.optim.SGD(student.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = F.mse_loss(student(x), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return student, losses


@pytest.mark.parametrize("cls", PACKS)
def test_training_reduces_loss(cls):
    student, losses = _toy_regression(cls)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.6 * losses[0], losses
    for p in student.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all()
    # The offset predictor gets a gradient and moves off zero.
    assert torch.count_nonzero(student.conv_offset.weight) > 0


@pytest.mark.parametrize("cls", PACKS)
def test_pack_gradients_match_reference(cls):
    torch.manual_seed(5)
    mod = cls(4, 6, 3, padding=1, deform_groups=2).double()
    _randomize(mod, scale=0.3)  # non-integer sample positions, where the gradient is smooth
    x = torch.randn(2, 4, 7, 8, dtype=torch.float64, requires_grad=True)
    ref_params = {n: p.detach().clone().requires_grad_(True) for n, p in mod.named_parameters()}
    x_ref = x.detach().clone().requires_grad_(True)

    mod(x).square().sum().backward()
    out = F.conv2d(x_ref, ref_params["conv_offset.weight"], ref_params["conv_offset.bias"], padding=1)
    if cls is DeformConv2dPack:
        offset, mask = out, None
    else:
        offset, mask = _mmcv_offset_and_mask(out, 2, 9)
    tv_deform_conv2d(x_ref, offset, ref_params["weight"], ref_params.get("bias"), padding=1,
                     mask=mask).square().sum().backward()
    _assert_close(x.grad, x_ref.grad, torch.float64)
    for n, p in mod.named_parameters():
        _assert_close(p.grad, ref_params[n].grad, torch.float64)


def test_deform_conv2d_gradients_match_torchvision():
    torch.manual_seed(6)
    ref = TVDeformConv2d(4, 6, 3, padding=1).double()
    mod = DeformConv2d(4, 6, 3, padding=1).double()
    mod.load_state_dict(ref.state_dict())
    x = torch.randn(2, 4, 7, 8, dtype=torch.float64)
    offset = torch.randn(2, 18, 7, 8, dtype=torch.float64)
    mask = torch.rand(2, 9, 7, 8, dtype=torch.float64)
    grads = []
    for layer in (ref, mod):
        inputs = [t.clone().requires_grad_(True) for t in (x, offset, mask)]
        layer.zero_grad()
        layer(*inputs).square().sum().backward()
        grads.append([t.grad for t in inputs] + [layer.weight.grad, layer.bias.grad])
    for expected, actual in zip(*grads):
        _assert_close(actual, expected, torch.float64)


def test_forward_with_parameters_requiring_grad_under_no_grad():
    # Inference with a freshly built (trainable) layer must work even before backward lands.
    mod = DeformConv2dPack(4, 6, 3, padding=1)
    assert mod.weight.requires_grad
    with torch.no_grad():
        out = mod(torch.randn(2, 4, 7, 8))
    assert out.shape == (2, 6, 7, 8)
