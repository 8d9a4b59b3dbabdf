"""The CPU's half-precision deform_conv2d kernels (bfloat16 and float16 tensors in and out, float32
arithmetic), forward and gradients, and AVX512-BF16's dot product in their bfloat16 GEMMs.

Which formulation a workload gets is read from the target (built for named CPUs, so these run on
any x86 host); running the dot-product kernel needs a host with avx512bf16 (skipped elsewhere,
with the reason). Its results are checked against the float64 reference on the same bfloat16
inputs, within what it rounds: each column value to bfloat16 (``conftest.columns_rounding_bound``)
and the output.
"""
from __future__ import annotations

import pytest
import torch
import tvm

import tvm_dcn
from conftest import assert_matches, columns_rounding_bound, reference_deform_conv2d
from tvm_dcn import kernel, ops
from tvm_dcn.cpu_isa import vector_unit
from tvm_dcn.ops.deform_conv import GEMM_BF16_DOT, forward_workload

SAPPHIRE_RAPIDS = {"kind": "llvm", "mcpu": "sapphirerapids", "num-cores": 2}  # AVX-512 with avx512bf16
SKYLAKE_X = {"kind": "llvm", "mcpu": "skylake-avx512", "num-cores": 2}  # AVX-512 without it
ZEN3 = {"kind": "llvm", "mcpu": "znver3", "num-cores": 2}  # AVX2

HOST_HAS_DOT = vector_unit(tvm_dcn.host_target()).bf16_dot
needs_dot = pytest.mark.skipif(not HOST_HAS_DOT, reason="this CPU has no AVX512-BF16 (vdpbf16ps)")


def _workload(dtype="bfloat16", in_channels=32, groups=1, size=(9, 7), stride=1, offset_groups=1, out_channels=24):
    return forward_workload(batch=2, in_channels=in_channels, height=size[0], width=size[1], out_channels=out_channels,
                            kernel_size=(3, 3), stride=(stride, stride), padding=(1, 1), groups=groups,
                            offset_groups=offset_groups, with_mask=True, with_bias=True, dtype=dtype)


def test_formulation_follows_the_target():
    bf16 = ops.for_target(_workload(), tvm.target.Target(SAPPHIRE_RAPIDS))
    assert bf16["gemm"] == GEMM_BF16_DOT and bf16["pixel_align"] == 16
    without = ops.for_target(_workload(), tvm.target.Target(SKYLAKE_X))
    assert without.get("gemm") is None and without["pixel_align"] == 16
    assert ops.for_target(_workload(), tvm.target.Target(ZEN3)).get("gemm") is None
    # float32 and float16 never take it; nor does a reduction that does not pair up (1 x 3 x 3).
    for wl in (_workload("float32"), _workload("float16"), _workload(in_channels=2, groups=2)):
        assert ops.for_target(wl, tvm.target.Target(SAPPHIRE_RAPIDS)).get("gemm") is None


def test_bad_gemm_parameter_is_refused_by_name():
    wl = _workload()
    for dtype, params in (("bfloat16", {"gemm": "amx"}), ("float32", {"gemm": GEMM_BF16_DOT}),
                          ("bfloat16", {"gemm": GEMM_BF16_DOT, "in_channels": 3})):
        bad = type(wl).make(wl.op, dtype, **{**dict(wl.params), **params})
        with pytest.raises(ValueError, match="gemm"):
            ops.primfunc(bad)


def test_dot_kernel_is_built_with_vdpbf16ps():
    target = tvm.target.Target(SAPPHIRE_RAPIDS)
    with kernel.forced_schedule("hand"):
        dot = kernel.compile(_workload(), target, use_disk_cache=False)
        single = kernel.compile(_workload("float32"), target, use_disk_cache=False)
    assert dot.workload["gemm"] == GEMM_BF16_DOT
    assert "vdpbf16ps" in dot.source("asm")
    assert "vdpbf16ps" not in single.source("asm")


def _inputs(wl, seed=0):
    g = torch.Generator().manual_seed(seed)
    geo = ops.deform_conv.ConvGeometry(wl)
    oh, ow = geo.out_h, geo.out_w
    taps = 9 * geo.offset_groups
    x = torch.randn(geo.batch, geo.in_channels, geo.height, geo.width, generator=g)
    offset = torch.randn(geo.batch, 2 * taps, oh, ow, generator=g) * 2
    mask = torch.rand(geo.batch, taps, oh, ow, generator=g)
    weight = torch.randn(geo.out_channels, geo.group_in_channels, 3, 3, generator=g) / geo.reduction ** 0.5
    bias = torch.randn(geo.out_channels, generator=g)
    return [t.to(getattr(torch, wl.dtype)) for t in (x, offset, weight, bias, mask)]


# (description, workload): channels-last columns in 16-channel stripes, gather columns (12
# channels), two groups and two offset groups, 64 output pixels (no padding: the output written
# from the GEMM's registers), stride 2.
DOT_CASES = {
    "stripes": _workload(),
    "gather": _workload(in_channels=12, out_channels=8),
    "groups": _workload(in_channels=32, groups=2, offset_groups=2),
    "unpadded": _workload(size=(8, 8)),
    "stride2": _workload(size=(13, 11), stride=2),
}


@needs_dot
@pytest.mark.parametrize("name", sorted(DOT_CASES))
def test_dot_kernel_error_is_within_the_columns_rounding(name):
    wl = DOT_CASES[name]
    x, offset, weight, bias, mask = _inputs(wl)
    conv = dict(stride=wl["stride"], padding=wl["padding"])
    out = tvm_dcn.deform_conv2d(x, offset, weight, bias, mask=mask, **conv)
    d = [t.double() for t in (x, offset, weight, bias, mask)]
    ref = reference_deform_conv2d(*d[:4], mask=d[4], **conv)
    extra = columns_rounding_bound(x, offset, weight, mask=mask, **conv)
    assert extra.any()
    assert_matches(out, ref, torch.bfloat16, what=name, extra=extra)
    # Not the float32 kernel in disguise: its columns are not rounded (an output differs).
    assert not torch.equal(out, tvm_dcn.deform_conv2d(*(t.float() for t in (x, offset, weight, bias)),
                                                       mask=mask.float(), **conv).to(torch.bfloat16))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_half_kernels_without_the_dot_round_the_float32_result(dtype):
    """The half forward kernels without the dot product (float16; bfloat16 whose reduction does not
    pair up, here 1 x 3 x 3 per group) compute in float32 what the float32 hand kernel computes:
    equal to its result, rounded once, through the kernels and through the bridge."""
    name = str(dtype).replace("torch.", "")
    wl = _workload(name, in_channels=6, groups=6, out_channels=12)
    single_wl = _workload("float32", in_channels=6, groups=6, out_channels=12)
    assert ops.for_target(wl, tvm_dcn.host_target()).get("gemm") is None
    x, offset, weight, bias, mask = _inputs(wl, seed=1)
    geo = ops.deform_conv.ConvGeometry(wl)
    args = [x.reshape(2, 6, -1), offset.reshape(2, 18, -1), mask.reshape(2, 9, -1), weight.reshape(12, -1), bias]
    out = torch.empty(2, 12, geo.pixels, dtype=dtype)
    single = torch.empty(2, 12, geo.pixels)
    with kernel.forced_schedule("hand"):
        tvm_dcn.compile(wl)(*args, out)
        tvm_dcn.compile(single_wl)(*(a.float() for a in args), single)
    assert torch.equal(out, single.to(dtype))
    bridged = tvm_dcn.deform_conv2d(x, offset, weight, bias, mask=mask, padding=1)
    assert bridged.dtype == dtype and torch.equal(bridged.reshape(out.shape), out)


def _dot_template_samples(wl, target) -> list:
    """(seed, library) of schedules drawn with seeds 1-3 from the tuning template of ``wl`` (a
    dot-product workload) for ``target``: each built, with ``vdpbf16ps`` in its code; the draws
    differ."""
    from tvm_dcn.schedules import find_template

    assert wl["gemm"] == GEMM_BF16_DOT
    samples, traces = [], set()
    for seed in range(1, 4):
        sch = tvm.s_tir.Schedule(ops.ir_module(wl), seed=seed)
        find_template(wl.op, "llvm")(sch, wl, target)
        traces.add(str(sch.trace))
        lib = tvm.compile(sch.mod, target=target)
        assert "vdpbf16ps" in lib.mod.inspect_source("asm")
        samples.append((seed, lib))
    assert len(traces) > 1
    return samples


def test_tuning_template_samples_of_the_dot_kernel():
    """The bfloat16 dot-product forward as a design space (``sampled=True``): schedules drawn with
    other decisions build (with ``vdpbf16ps``) and, where the host has it, compute the forward."""
    target = tvm_dcn.host_target() if HOST_HAS_DOT else tvm.target.Target(SAPPHIRE_RAPIDS)
    wl = ops.for_target(DOT_CASES["stripes"], target)
    x, offset, weight, bias, mask = _inputs(wl, seed=4)
    d = [t.double() for t in (x, offset, weight, bias, mask)]
    expected = reference_deform_conv2d(*d[:4], mask=d[4], padding=1)
    extra = columns_rounding_bound(x, offset, weight, mask=mask, padding=1)
    for seed, lib in _dot_template_samples(wl, target):
        if HOST_HAS_DOT:
            out = torch.empty(expected.shape[0], expected.shape[1], expected.shape[2] * expected.shape[3],
                              dtype=torch.bfloat16)
            lib["main"](*(t.reshape(t.shape[0], t.shape[1], -1) for t in (x, offset, mask)),
                        weight.reshape(weight.shape[0], -1), bias, out)
            assert_matches(out.reshape(expected.shape), expected, torch.bfloat16, what=f"seed {seed}", extra=extra)


def test_bfloat16_bits_round_to_nearest_even_and_keep_nan():
    """The columns' rounding (``ops.deform_conv.bfloat16_bits``) against torch's float32 -> bfloat16
    conversion, bit for bit, on ties, carries into the exponent, infinities, the largest finite
    values and NaNs, including NaNs whose payload is in the low 16 bits only (which a rounding on
    the bits alone turns into infinity)."""
    from tvm import te

    from tvm_dcn.ops.deform_conv import bfloat16_bits

    bits = torch.tensor([0x3F800000, 0x3F808000, 0x3F818000, 0x3F80FFFF, 0x3FFFFFFF, 0x7F7FFFFF, 0xFF7FFFFF,
                         0x7F800000, 0xFF800000, 0x00000001, 0x80000000, 0x7FC00000, 0x7F800001, 0xFF800001,
                         0x7FFFFFFF, 0xFFFFFFFF], dtype=torch.int64).to(torch.int32)
    values = bits.view(torch.float32)
    source = te.placeholder((len(values),), "float32", name="values")
    rounded = te.compute(source.shape, lambda i: bfloat16_bits(source[i]), name="bits")
    lib = tvm.compile(te.create_prim_func([source, rounded]), target=tvm_dcn.host_target())
    out = torch.zeros(len(values), dtype=torch.uint16)
    lib(values, out)
    expected = values.to(torch.bfloat16)
    got = out.view(torch.bfloat16)
    finite = ~torch.isnan(values)
    assert torch.equal(got[finite].view(torch.int16), expected[finite].view(torch.int16))
    assert torch.isnan(got[~finite].float()).all()


# The weight gradient: bfloat16 kernels with AVX512-BF16's dot product where a group's weight
# columns (C / groups x KH x KW) fill vectors of 16 (32 channels: 288 = 18 x 16; two groups of 16:
# 144 = 9 x 16); 63 output pixels, an odd count (the last pair's second pixel is padding).
WEIGHT_CASES = {
    "plain": _workload(),
    "groups": _workload(in_channels=32, groups=2, offset_groups=2),
    "stride2": _workload(size=(13, 11), stride=2),
}


def _weight_workload(wl, need_bias=True):
    from tvm_dcn.ops.deform_conv import backward_weight_workload

    return backward_weight_workload(wl, need_weight=True, need_bias=need_bias)


def test_weight_gradient_formulation_follows_the_target():
    from tvm_dcn.ops.deform_conv import backward_weight_workload

    target = tvm.target.Target(SAPPHIRE_RAPIDS)
    assert ops.for_target(_weight_workload(_workload()), target)["gemm"] == GEMM_BF16_DOT
    assert ops.for_target(_weight_workload(_workload()), tvm.target.Target(SKYLAKE_X)).get("gemm") is None
    # float16; 12 channels (108 weight columns: not whole vectors of 16); the bias gradient alone.
    for wl in (_weight_workload(_workload("float16")), _weight_workload(_workload(in_channels=12, out_channels=8)),
               backward_weight_workload(_workload(), need_weight=False, need_bias=True)):
        assert ops.for_target(wl, target).get("gemm") is None
    bad = _weight_workload(_workload(in_channels=12, out_channels=8))
    bad = type(bad).make(bad.op, bad.dtype, **{**dict(bad.params), "gemm": GEMM_BF16_DOT})
    with pytest.raises(ValueError, match="gemm"):
        ops.primfunc(bad)


def test_weight_gradient_dot_kernel_is_built_with_vdpbf16ps():
    with kernel.forced_schedule("hand"):
        dot = kernel.compile(_weight_workload(_workload()), tvm.target.Target(SAPPHIRE_RAPIDS), use_disk_cache=False)
    assert dot.workload["gemm"] == GEMM_BF16_DOT
    assert "vdpbf16ps" in dot.source("asm")


def _weight_gradients(wl, seed=0):
    """(bfloat16 weight and bias gradients through the bridge, float64 reference on the same values,
    allowance for the columns' rounding: 2**-8 x sum |grad_output| |column|, from the reference
    weight gradient of |input|, |mask| and |grad_output|)."""
    from conftest import reference_deform_conv2d_autograd

    x, offset, weight, bias, mask = _inputs(wl, seed)
    conv = dict(stride=wl["stride"], padding=wl["padding"])
    leaves = [t.requires_grad_() for t in (x, offset, weight, bias, mask)]
    out = tvm_dcn.deform_conv2d(*leaves[:4], mask=leaves[4], **conv)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1)).to(torch.bfloat16)
    out.backward(grad)
    ref = [t.detach().double().requires_grad_() for t in leaves]
    reference_deform_conv2d_autograd(*ref[:4], mask=ref[4], **conv).backward(grad.double())
    magnitude = [t.detach().double().abs().requires_grad_() for t in (x, offset, weight, bias, mask)]
    magnitude[1] = offset.detach().double()
    reference_deform_conv2d_autograd(*magnitude[:4], mask=magnitude[4], **conv).backward(grad.double().abs())
    return leaves, ref, 2 ** -8 * magnitude[2].grad


@needs_dot
@pytest.mark.parametrize("name", sorted(WEIGHT_CASES))
def test_weight_gradient_dot_error_is_within_the_columns_rounding(name):
    wl = WEIGHT_CASES[name]
    assert ops.for_target(_weight_workload(wl), tvm_dcn.host_target())["gemm"] == GEMM_BF16_DOT
    leaves, ref, extra = _weight_gradients(wl)
    assert_matches(leaves[2].grad, ref[2].grad, torch.bfloat16, what=f"{name} grad weight", extra=extra)
    assert_matches(leaves[3].grad, ref[3].grad, torch.bfloat16, what=f"{name} grad bias")
    # Not the float32 kernel in disguise: its columns are not rounded (a gradient differs).
    single = [t.detach().float().requires_grad_() for t in leaves]
    out = tvm_dcn.deform_conv2d(*single[:4], mask=single[4], stride=wl["stride"], padding=wl["padding"])
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16).float())
    assert not torch.equal(leaves[2].grad, single[2].grad.to(torch.bfloat16))


def test_tuning_template_samples_of_the_weight_gradient_dot_kernel():
    """The bfloat16 weight gradient with the dot product as a design space: schedules drawn with
    other decisions build (with ``vdpbf16ps``) and, where the host has it, compute the gradient."""
    from tvm_dcn.ops.deform_conv import ConvGeometry

    target = tvm_dcn.host_target() if HOST_HAS_DOT else tvm.target.Target(SAPPHIRE_RAPIDS)
    wl = ops.for_target(_weight_workload(WEIGHT_CASES["plain"]), target)
    assert wl["gemm"] == GEMM_BF16_DOT
    geo = ConvGeometry(wl)
    x, offset, _, _, mask = _inputs(wl, seed=3)
    grad = torch.randn(geo.batch, geo.out_channels, geo.out_h, geo.out_w,
                       generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    args = [grad.reshape(geo.batch, geo.out_channels, -1)] + [t.reshape(t.shape[0], t.shape[1], -1)
                                                               for t in (x, offset, mask)]

    def run(lib):
        out = torch.empty(geo.out_channels, geo.reduction, dtype=torch.bfloat16)
        lib(*args, out, torch.empty(geo.out_channels, dtype=torch.bfloat16))
        return out

    if HOST_HAS_DOT:
        with kernel.forced_schedule("hand"):
            hand = run(tvm_dcn.compile(wl))
    for seed, lib in _dot_template_samples(wl, target):
        if HOST_HAS_DOT:
            # Sums in another order: within the float32 accumulation's error, rounded to bfloat16.
            assert_matches(run(lib["main"]), hand.double(), torch.bfloat16, what=f"seed {seed}")


def _data_workload(wl):
    from tvm_dcn.ops.deform_conv import backward_data_workload

    return backward_data_workload(wl, need_input=True, need_sampling=True)


def test_column_gradient_formulation_follows_the_target():
    target = tvm.target.Target(SAPPHIRE_RAPIDS)
    dot = ops.for_target(_data_workload(_workload()), target)
    assert dot["gemm"] == GEMM_BF16_DOT and dot["pixel_align"] == 16
    assert ops.for_target(_data_workload(_workload()), tvm.target.Target(SKYLAKE_X)).get("gemm") is None
    # float16; 9 output channels (the dot product sums output channels in pairs).
    for wl in (_data_workload(_workload("float16")), _data_workload(_workload(out_channels=9))):
        assert ops.for_target(wl, target).get("gemm") is None
    with kernel.forced_schedule("hand"):
        built = kernel.compile(_data_workload(_workload()), target, use_disk_cache=False)
    assert "vdpbf16ps" in built.source("asm")


@needs_dot
@pytest.mark.parametrize("name", sorted(DOT_CASES))
def test_input_offset_mask_gradients_with_the_dot_product(name):
    """With the dot product the column gradient's products are exact (bfloat16 x bfloat16) and its
    sums float32: the gradients are within the bfloat16 tolerance of the float64 reference."""
    from conftest import reference_deform_conv2d_autograd

    wl = DOT_CASES[name]
    assert ops.for_target(_data_workload(wl), tvm_dcn.host_target())["gemm"] == GEMM_BF16_DOT
    x, offset, weight, bias, mask = _inputs(wl, seed=2)
    conv = dict(stride=wl["stride"], padding=wl["padding"])
    leaves = [t.requires_grad_() for t in (x, offset, weight, bias, mask)]
    out = tvm_dcn.deform_conv2d(*leaves[:4], mask=leaves[4], **conv)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    out.backward(grad)
    ref = [t.detach().double().requires_grad_() for t in leaves]
    reference_deform_conv2d_autograd(*ref[:4], mask=ref[4], **conv).backward(grad.double())
    for index, what in ((0, "input"), (1, "offset"), (4, "mask")):
        assert_matches(leaves[index].grad, ref[index].grad, torch.bfloat16, what=f"{name} grad {what}")


def test_tuning_template_samples_of_the_column_gradient_dot_kernel():
    """The bfloat16 input, offset and mask gradients with the dot product as a design space:
    schedules drawn with other decisions build (with ``vdpbf16ps``) and, where the host has it,
    compute what the hand schedule computes."""
    from tvm_dcn.ops.deform_conv import ConvGeometry

    target = tvm_dcn.host_target() if HOST_HAS_DOT else tvm.target.Target(SAPPHIRE_RAPIDS)
    wl = ops.for_target(_data_workload(DOT_CASES["stripes"]), target)
    assert wl["gemm"] == GEMM_BF16_DOT
    geo = ConvGeometry(wl)
    x, offset, weight, _, mask = _inputs(wl, seed=5)
    grad = torch.randn(geo.batch, geo.out_channels, geo.pixels, generator=torch.Generator().manual_seed(6))
    args = [grad.to(torch.bfloat16)] + [t.reshape(t.shape[0], t.shape[1], -1) for t in (x, offset, mask)] + \
        [weight.reshape(geo.out_channels, -1)]

    def run(lib):
        outs = [torch.empty(geo.batch, geo.in_channels, geo.height * geo.width, dtype=torch.bfloat16),
                torch.empty(geo.batch, 18, geo.pixels, dtype=torch.bfloat16),
                torch.empty(geo.batch, 9, geo.pixels, dtype=torch.bfloat16)]
        lib(*args, *outs)
        return outs

    if HOST_HAS_DOT:
        with kernel.forced_schedule("hand"):
            hand = run(tvm_dcn.compile(wl))
    for seed, lib in _dot_template_samples(wl, target):
        if HOST_HAS_DOT:
            for got, expected, what in zip(run(lib["main"]), hand, ("input", "offset", "mask")):
                assert_matches(got, expected.double(), torch.bfloat16, what=f"seed {seed} grad {what}")


@pytest.mark.parametrize("make", [_weight_workload, _data_workload], ids=["weight", "data"])
def test_half_gradient_kernels_are_refused_for_cuda(make):
    """The half gradient kernels are CPU kernels (the bridge runs CUDA half gradients through the
    float32 ones): a CUDA build of one is refused by name rather than built unscheduled."""
    with pytest.raises(ValueError, match="half-precision gradient kernels are CPU kernels"):
        tvm_dcn.compile(make(_workload()), {"kind": "cuda", "arch": "sm_90"}, use_disk_cache=False)
