"""Half precision (bfloat16, float16) and ``torch.autocast``.

Every operator, forward and every gradient, in both half dtypes against a float64 reference
(torchvision's operators or the references of conftest.py / roi_reference.py) evaluated on the
same half-rounded inputs: the operators compute in float32 and round each result once, so the
difference is within one unit in the last place of the half dtype (``conftest.RTOL``; rounding the
inputs is half precision's own error, not the operators'); a bfloat16 forward that multiplies
with AVX512-BF16's dot product rounds its columns to bfloat16 too (``conftest.columns_rounding_bound``;
the bfloat16 gradients' dot products are in test_half_kernels.py: these shapes do not take them).
Then: results equal the float32 kernels' rounded where the bridge promises it (half kernels
without the dot product, and float16 gradients, which run the float32 kernels), the no-grad
eager path, mixed dtypes, autocast on
the CPU (a DCNv2 module, the RoI functions, the operators directly, ``torch.compile``), ``opcheck``
of half calls and the training example under autocast.

Shapes are those of test_roi_ops.py / test_roi_deform.py, so the (float32) kernels are shared.
"""
from __future__ import annotations

import pytest
import torch
import torchvision

import roi_reference as ref
import tvm_dcn
from conftest import (assert_matches, columns_rounding_bound, reference_deform_conv2d,
                      reference_deform_conv2d_autograd)
from roi_reference import make_boxes, roi_case

HALF = [torch.bfloat16, torch.float16]
HALF_IDS = ["bf16", "f16"]
ops = torch.ops.tvm_dcn

# RoI family: the feature maps of test_roi_ops.py (torchvision's operators) and test_roi_deform.py.
SHAPE = (2, 12, 9, 11)
DEFORM_SHAPE = (2, 6, 9, 11)
SCALE = 0.5
OUT = (3, 2)
# deform_conv2d: two groups, two offset groups, modulated, with bias.
CONV = dict(stride=1, padding=1, dilation=1)


def _check(ours, reference, tensors: dict, grad: torch.Tensor, dtype: torch.dtype, grads_of=None,
           output_extra=None) -> None:
    """``ours`` on ``tensors`` rounded to ``dtype`` against ``reference`` on the same values in
    float64: output and gradients of <output, grad> (for the tensors in ``grads_of``, default all),
    in ``dtype``. ``output_extra(**leaves)``: an elementwise allowance for the output."""
    leaves = {name: t.to(dtype).requires_grad_() for name, t in tensors.items() if t is not None}
    out = ours(**leaves)
    out.backward(grad.to(dtype))
    ref_leaves = {name: t.detach().double().requires_grad_() for name, t in leaves.items()}
    ref_out = reference(**ref_leaves)
    ref_out.backward(grad.to(dtype).double())
    extra = output_extra(**leaves) if output_extra is not None else None
    assert_matches(out, ref_out, dtype, what="output", extra=extra)
    for name in grads_of or leaves:
        assert_matches(leaves[name].grad, ref_leaves[name].grad, dtype, what=f"grad {name}")


@pytest.fixture(scope="module")
def conv_data():
    g = torch.Generator().manual_seed(2026)
    n, c, h, w, out_channels, taps = 2, 4, 6, 7, 6, 9

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    return dict(input=randn(n, c, h, w), offset=randn(n, 2 * 2 * taps, h, w), weight=randn(out_channels, c // 2, 3, 3),
                bias=randn(out_channels), mask=torch.rand(n, 2 * taps, h, w, generator=g, dtype=torch.float64)), \
        randn(n, out_channels, h, w)


@pytest.mark.parametrize("dtype", HALF, ids=HALF_IDS)
def test_deform_conv2d(conv_data, dtype):
    tensors, grad = conv_data
    _check(lambda **t: tvm_dcn.deform_conv2d(**t, **CONV),
           lambda **t: reference_deform_conv2d_autograd(**t, **CONV), tensors, grad, dtype,
           output_extra=lambda bias, **t: columns_rounding_bound(**t, **CONV))


@pytest.mark.parametrize("dtype", HALF, ids=HALF_IDS)
def test_deform_conv2d_is_the_float32_kernels_rounded(conv_data, dtype):
    """Half-precision results are the float32 kernels' rounded: float16 gradients run those kernels;
    the half forward, and the bfloat16 gradients, compute in float32 with the same loops and round
    once. Not where a bfloat16 forward multiplies with AVX512-BF16's dot product (its columns
    rounded: ``columns_rounding_bound``, test_deform_conv2d); these shapes' gradients do not take
    it (2 x 3 x 3 weight columns and 3 output channels per group)."""
    tensors, grad = conv_data
    names = list(tensors)
    half = [tensors[k].to(dtype).requires_grad_() for k in names]
    single = [t.detach().float().requires_grad_() for t in half]
    out_half = tvm_dcn.deform_conv2d(*half[:4], mask=half[4], **CONV)
    out_single = tvm_dcn.deform_conv2d(*single[:4], mask=single[4], **CONV)
    assert out_half.dtype == dtype
    dot = bool(columns_rounding_bound(*half[:3], mask=half[4], **CONV).any())
    assert torch.equal(out_half, out_single.to(dtype)) != dot
    out_half.backward(grad.to(dtype))
    out_single.backward(grad.to(dtype).float())
    for name, h, s in zip(names, half, single):
        assert h.grad.dtype == dtype, name
        assert torch.equal(h.grad, s.grad.to(dtype)), name
    # The no-grad eager path (a new plan, then the same plan again) gives the operator's output.
    with torch.no_grad():
        for _ in range(2):
            assert torch.equal(tvm_dcn.deform_conv2d(*half[:4], mask=half[4], **CONV), out_half)


@pytest.fixture(scope="module")
def roi_data():
    return roi_case(SHAPE, SCALE, OUT)


# (name, keyword arguments); ps_roi_align with a fixed grid (with adaptive sampling torchvision
# gives NaN for boxes without samples, test_roi_ops.py).
TORCHVISION_CASES = [("roi_align", dict(sampling_ratio=2, aligned=False)),
                     ("roi_align", dict(sampling_ratio=-1, aligned=True)),
                     ("roi_pool", {}), ("ps_roi_align", dict(sampling_ratio=2)), ("ps_roi_pool", {})]


@pytest.mark.parametrize("dtype", HALF, ids=HALF_IDS)
@pytest.mark.parametrize("name, kwargs", TORCHVISION_CASES,
                         ids=["roi_align-ratio2", "roi_align-adaptive-aligned", "roi_pool", "ps_roi_align",
                              "ps_roi_pool"])
def test_roi_ops_match_torchvision(roi_data, name, kwargs, dtype):
    """Boxes in the input's dtype, as torchvision takes them (torchvision in float64 on the same values)."""
    x, boxes, grad = roi_data
    if name == "ps_roi_pool":
        # torchvision's backward clips bins to H and W where its forward clips to H - 1 and W - 1
        # (test_roi_ops.py): boxes clear of the last row and column.
        s = boxes[:, 1:] * SCALE
        boxes = boxes[(s[:, [0, 2]].max(1).values < SHAPE[3] - 2) & (s[:, [1, 3]].max(1).values < SHAPE[2] - 2)]
    rounded = boxes.to(dtype)
    ours, theirs = getattr(tvm_dcn, name), getattr(torchvision.ops, name)
    channels = SHAPE[1] // (OUT[0] * OUT[1]) if name.startswith("ps_") else SHAPE[1]
    _check(lambda input: ours(input, rounded, OUT, SCALE, **kwargs),
           lambda input: theirs(input, rounded.double(), OUT, SCALE, **kwargs),
           dict(input=x), grad[: boxes.shape[0], :channels], dtype)


@pytest.fixture(scope="module")
def deform_data():
    g = torch.Generator().manual_seed(4321)
    x = torch.randn(*DEFORM_SHAPE, generator=g, dtype=torch.float64)
    rois = make_boxes(g, DEFORM_SHAPE[0], (DEFORM_SHAPE[2] / SCALE, DEFORM_SHAPE[3] / SCALE), dtype=torch.float64)
    k = rois.shape[0]
    offset = torch.randn(k, 2, *OUT, generator=g, dtype=torch.float64)
    mask = torch.rand(k, 1, *OUT, generator=g, dtype=torch.float64)
    grad = torch.randn(k, DEFORM_SHAPE[1], *OUT, generator=g, dtype=torch.float64)
    return x, rois, offset, mask, grad


@pytest.mark.parametrize("dtype", HALF, ids=HALF_IDS)
@pytest.mark.parametrize("modulated", [False, True], ids=["offset", "modulated"])
def test_deform_roi_pool(deform_data, modulated, dtype):
    """Boxes in float32 (kept as they are: half-precision inputs do not round float32 boxes)."""
    x, rois, offset, mask, grad = deform_data
    rois = rois.float()
    tensors = dict(input=x, offset=offset, mask=mask if modulated else None)
    _check(lambda input, offset, mask=None: tvm_dcn.deform_roi_pool(input, rois, offset, OUT, SCALE, 2, 0.1, mask=mask),
           lambda input, offset, mask=None: ref.deform_roi_pool(input, rois.double(), offset, OUT, SCALE, 2, 0.1,
                                                                mask=mask),
           tensors, grad, dtype)


@pytest.mark.parametrize("dtype", HALF, ids=HALF_IDS)
def test_deform_psroi_pool(dtype):
    """The "groups<pooled-2classes" case of test_roi_deform.py."""
    g = torch.Generator().manual_seed(777)
    rois = make_boxes(g, 2, (18.0, 22.0), count=4, dtype=torch.float64).float()
    output_dim, group, pooled, part, spp, classes = 4, 2, 3, 2, 3, 2
    g = torch.Generator().manual_seed(len("groups<pooled-2classes"))
    x = torch.randn(2, output_dim * group * group, 9, 11, generator=g, dtype=torch.float64)
    trans = torch.randn(rois.shape[0], 2 * classes, part, part, generator=g, dtype=torch.float64)
    grad = torch.randn(rois.shape[0], output_dim, pooled, pooled, generator=g, dtype=torch.float64)
    args = (SCALE, output_dim, group, pooled, part, spp, 0.2, False)
    _check(lambda input, offset: tvm_dcn.deform_psroi_pool(input, rois, offset, *args),
           lambda input, offset: ref.deform_psroi_pool(input, rois.double(), offset, *args),
           dict(input=x, offset=trans), grad, dtype)


@pytest.mark.parametrize("dtype", HALF, ids=HALF_IDS)
def test_roi_results_are_the_float32_kernels_rounded(roi_data, dtype):
    x, boxes, grad = roi_data
    half = x.to(dtype).requires_grad_()
    single = half.detach().float().requires_grad_()
    out_half = tvm_dcn.roi_align(half, boxes.float(), OUT, SCALE, 2)
    out_single = tvm_dcn.roi_align(single, boxes.float(), OUT, SCALE, 2)
    assert torch.equal(out_half, out_single.to(dtype))
    out_half.backward(grad.to(dtype))
    out_single.backward(grad.to(dtype).float())
    assert torch.equal(half.grad, single.grad.to(dtype))
    # Half-precision boxes are the same values as float32 ones; the no-grad path, the same results.
    with torch.no_grad():
        assert torch.equal(tvm_dcn.roi_align(half, boxes.float().to(dtype), OUT, SCALE, 2),
                           tvm_dcn.roi_align(half, boxes.float().to(dtype).float(), OUT, SCALE, 2))
        assert torch.equal(tvm_dcn.roi_align(half.detach(), boxes.float(), OUT, SCALE, 2), out_half)


# --------------------------------------------------------------------------------------------
# Mixed dtypes


def test_mixed_dtypes_raise_naming_the_arguments(conv_data, deform_data):
    tensors, _ = conv_data
    args = {k: t.to(torch.bfloat16) for k, t in tensors.items()}
    for name, dtype in (("offset", torch.float16), ("weight", torch.float32), ("bias", torch.float16),
                        ("mask", torch.float32)):
        bad = dict(args, **{name: args[name].to(dtype)})
        with pytest.raises(TypeError, match=rf"{name} has dtype {dtype}.*input has torch.bfloat16"):
            tvm_dcn.deform_conv2d(**bad, **CONV)
        with pytest.raises(TypeError, match=rf"{name} has dtype {dtype}.*input has torch.bfloat16"):
            ops.deform_conv2d_forward(bad["input"], bad["offset"], bad["weight"], bad["bias"], bad["mask"], [1, 1],
                                      [1, 1], [1, 1])
    x, rois, offset, mask, _ = deform_data
    with pytest.raises(TypeError, match=r"offset has dtype torch.float32 but input has torch.float16"):
        tvm_dcn.deform_roi_pool(x.half(), rois, offset.float(), OUT, SCALE)
    with pytest.raises(TypeError, match=r"mask has dtype torch.bfloat16 but input has torch.float16"):
        tvm_dcn.deform_roi_pool(x.half(), rois, offset.half(), OUT, SCALE, mask=mask.bfloat16())
    with pytest.raises(TypeError, match=r"offset has dtype torch.float16 but input has torch.bfloat16"):
        tvm_dcn.deform_psroi_pool(x.bfloat16(), rois, offset.half(), SCALE, 6, 1, 3, 3)


# --------------------------------------------------------------------------------------------
# Autocast (CPU, bfloat16)


def test_autocast_modulated_pack(conv_data):
    """Under autocast the module runs in bfloat16 like conv2d: the deformable convolution gets its
    input, weight and bias cast to bfloat16 (and the offsets and mask conv_offset computed in it)."""
    tensors, _ = conv_data
    g = torch.Generator().manual_seed(5)
    module = tvm_dcn.ModulatedDeformConv2dPack(4, 6, 3, padding=1, groups=2, deform_groups=2)
    with torch.no_grad():  # offsets and mask that are not zero
        module.conv_offset.weight.copy_(torch.randn(module.conv_offset.weight.shape, generator=g) * 0.3)
        module.bias.copy_(torch.randn(6, generator=g))
    x = tensors["input"].float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = module(x)
        o1, o2, m = torch.chunk(module.conv_offset(x), 3, dim=1)
        offset, mask = torch.cat((o1, o2), dim=1), torch.sigmoid(m)
    assert out.dtype == offset.dtype == mask.dtype == torch.bfloat16
    bf16 = [t.detach().to(torch.bfloat16).double() for t in (x, module.weight, module.bias)]
    expected = reference_deform_conv2d(bf16[0], offset.double(), bf16[1], bf16[2], mask=mask.double(), **CONV)
    assert_matches(out, expected, torch.bfloat16, what="autocast output",
                   extra=columns_rounding_bound(bf16[0].bfloat16(), offset, bf16[1].bfloat16(), mask=mask, **CONV))
    # The gradients reach the float32 parameters, in float32.
    grad = torch.randn(out.shape, generator=g).to(torch.bfloat16)
    out.backward(grad)
    assert module.weight.grad.dtype == torch.float32
    weight = bf16[1].clone().requires_grad_()
    reference_deform_conv2d_autograd(bf16[0], offset.double(), weight, bf16[2], mask=mask.double(),
                                     **CONV).backward(grad.double())
    assert_matches(module.weight.grad.to(torch.bfloat16), weight.grad, torch.bfloat16, what="autocast grad weight")
    # Outside autocast: float32.
    assert module(x).dtype == torch.float32


def test_autocast_roi_functions_compute_in_float32(roi_data, deform_data):
    """torchvision's autocast rule for its RoI operators: float32 compute, the input's dtype out."""
    x, boxes, _ = roi_data
    x, boxes = x.float(), boxes.float()
    plain32 = tvm_dcn.roi_align(x, boxes, OUT, SCALE, 2)
    plain16 = tvm_dcn.roi_align(x.bfloat16(), boxes.bfloat16(), OUT, SCALE, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(tvm_dcn.roi_align(x, boxes, OUT, SCALE, 2), plain32)
        assert torch.equal(tvm_dcn.roi_align(x.bfloat16(), boxes.bfloat16(), OUT, SCALE, 2), plain16)
        assert torch.equal(tvm_dcn.RoIAlign(OUT, SCALE, 2)(x, boxes), plain32)
        assert torch.equal(ops.roi_align_forward(x, boxes, SCALE, *OUT, 2, False), plain32)
        assert torch.equal(ops.roi_align_forward(x.bfloat16(), boxes.bfloat16(), SCALE, *OUT, 2, False), plain16)
        pooled, argmax = ops.roi_pool_forward(x.bfloat16(), boxes, SCALE, *OUT)
        assert pooled.dtype == torch.bfloat16 and argmax.dtype == torch.int32
    # Offsets predicted under autocast come in bfloat16 for a float32 input: float32 compute.
    x, rois, offset, mask, _ = deform_data
    x, rois = x.float().requires_grad_(), rois.float()
    offset16 = offset.bfloat16().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = tvm_dcn.deform_roi_pool(x, rois, offset16, OUT, SCALE, 2, mask=mask.bfloat16())
    assert out.dtype == torch.float32
    expected = tvm_dcn.deform_roi_pool(x, rois, offset16.float(), OUT, SCALE, 2, mask=mask.bfloat16().float())
    assert torch.equal(out, expected)
    out.sum().backward()
    assert x.grad.dtype == torch.float32 and offset16.grad.dtype == torch.bfloat16


def test_autocast_operator_and_eager_path(conv_data):
    """The operator itself (TorchScript, torch.compile and direct callers) runs in the autocast
    dtype, and the no-grad function gives the same."""
    tensors, _ = conv_data
    args = [tensors[k].float() for k in ("input", "offset", "weight", "bias", "mask")]
    expected = tvm_dcn.deform_conv2d(*[t.bfloat16() for t in args[:4]], mask=args[4].bfloat16(), **CONV)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(ops.deform_conv2d_forward(*args, [1, 1], [1, 1], [1, 1]), expected)
        with torch.no_grad():
            assert torch.equal(tvm_dcn.deform_conv2d(*args[:4], mask=args[4], **CONV), expected)
    with torch.autocast("cpu", dtype=torch.float16):
        assert ops.deform_conv2d_forward(*args, [1, 1], [1, 1], [1, 1]).dtype == torch.float16
    # float64 is left alone, as conv2d leaves it.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = tvm_dcn.deform_conv2d(*[t.double() for t in args[:4]], mask=args[4].double(), **CONV)
    assert out.dtype == torch.float64


# --------------------------------------------------------------------------------------------
# torch.library.opcheck (schema, fake kernels reporting the half dtype, autograd, AOT dispatch)


def test_opcheck_half(conv_data, roi_data):
    tensors, _ = conv_data
    args = [tensors[k].to(torch.bfloat16).requires_grad_() for k in ("input", "offset", "weight", "bias", "mask")]
    torch.library.opcheck(ops.deform_conv2d_forward, (*args, [1, 1], [1, 1], [1, 1]))
    x, boxes, _ = roi_data
    torch.library.opcheck(ops.roi_align_forward,
                          (x.half().requires_grad_(), boxes.float(), SCALE, *OUT, -1, True))


def test_training_example_under_autocast():
    """``examples/train_deformable.py --autocast bf16`` (reduced further than ``--quick``) runs,
    and every network's training loss falls."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "train_deformable.py"
    run = subprocess.run([sys.executable, str(path), "--quick", "--autocast", "bf16", "--epochs", "3", "--train", "512",
                          "--test", "128"], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "autocast bf16" in run.stdout.splitlines()[0], run.stdout
    losses = {}
    for match in re.finditer(r"^ +(\S.*?) +epoch +\d+ +train loss ([\d.]+)", run.stdout, re.M):
        losses.setdefault(match[1], []).append(float(match[2]))
    assert len(losses) == 3 and all(len(v) == 3 for v in losses.values()), run.stdout
    for name, loss in losses.items():
        assert loss[-1] < loss[0], (name, loss)


def test_compiled_module_under_autocast_matches_eager():
    """torch.compile(fullgraph=True) traces the autocast rule (the functions' and the operators')."""
    torch.manual_seed(0)
    module = tvm_dcn.ModulatedDeformConv2dPack(4, 6, 3, padding=1)
    with torch.no_grad():
        module.conv_offset.weight.normal_(0, 0.3)
    x = torch.randn(2, 4, 6, 7)
    compiled = torch.compile(module, fullgraph=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        eager, out = module(x), compiled(x)
    assert out.dtype == eager.dtype == torch.bfloat16
    assert torch.equal(out, eager)
