"""Argument validation of tvm_dcn.deform_conv2d: bad calls raise ValueError/TypeError naming the argument.

Base call: input (2, 4, 6, 6), weight (6, 4, 3, 3) -> output 4x4, offset (2, 18, 4, 4), mask (2, 9, 4, 4),
bias (6,). Each case replaces some arguments. ``CASES`` is also run in a child process
(``test_bad_calls_do_not_crash_the_process``) so that a crash shows up as a failed test, not a dead run.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import tvm_dcn

N, C, H, W, COUT, K = 2, 4, 6, 6, 6, 3
OH = OW = H - K + 1


def base_args(dtype=torch.float32) -> dict:
    g = torch.Generator().manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype)

    return dict(input=r(N, C, H, W), offset=r(N, 2 * K * K, OH, OW), weight=r(COUT, C, K, K), bias=r(COUT),
                mask=torch.rand(N, K * K, OH, OW, generator=g, dtype=dtype), stride=1, padding=0, dilation=1)


def call(args: dict):
    args = dict(args)
    return tvm_dcn.deform_conv2d(args.pop("input"), args.pop("offset"), args.pop("weight"), **args)


def _with(**changes):
    def build():
        a = base_args()
        for k, v in changes.items():
            a[k] = v(a) if callable(v) else v
        return a
    return build


def _empty_output_case(**changes):
    """A call whose output would be empty, with offset/mask shaped for that empty output."""
    def build():
        a = _with(**changes)()
        a["offset"] = torch.zeros(N, 2 * K * K, 0, 0)
        a["mask"] = torch.zeros(N, K * K, 0, 0)
        return a
    return build


# (id, builder, regex the message must match)
CASES = [
    # wrong number of dimensions
    ("input_3d", _with(input=lambda a: a["input"][0]), "input"),
    ("input_5d", _with(input=lambda a: a["input"][None]), "input"),
    ("offset_3d", _with(offset=lambda a: a["offset"][0]), "offset"),
    ("offset_5d", _with(offset=lambda a: a["offset"][None]), "offset"),
    ("weight_3d", _with(weight=lambda a: a["weight"][0]), "weight"),
    ("weight_2d", _with(weight=lambda a: a["weight"].reshape(COUT, -1)), "weight"),
    ("bias_2d", _with(bias=lambda a: a["bias"][None]), "bias"),
    ("bias_0d", _with(bias=lambda a: a["bias"][0]), "bias"),
    ("mask_3d", _with(mask=lambda a: a["mask"][0]), "mask"),
    ("mask_5d", _with(mask=lambda a: a["mask"][:, None]), "mask"),
    # channel counts
    ("offset_channels_not_multiple", _with(offset=lambda a: a["offset"][:, :17]), "offset"),
    ("offset_channels_zero", _with(offset=lambda a: a["offset"][:, :0]), "offset"),
    ("offset_groups_not_dividing_input", _with(offset=lambda a: torch.cat([a["offset"]] * 3, 1),
                                               mask=lambda a: torch.cat([a["mask"]] * 3, 1)), "offset"),
    ("input_channels_not_divisible", _with(input=torch.randn(N, 6, H, W)), "input|weight"),
    ("out_channels_not_divisible_by_groups", _with(weight=torch.randn(5, 2, K, K)), "weight|group"),
    ("mask_channels_too_few", _with(mask=lambda a: a["mask"][:, :8]), "mask"),
    ("mask_channels_too_many", _with(mask=lambda a: torch.cat([a["mask"]] * 2, 1)), "mask"),
    ("bias_wrong_size", _with(bias=torch.randn(COUT - 1)), "bias"),
    # spatial sizes
    ("offset_spatial_too_big", _with(offset=torch.randn(N, 18, OH + 1, OW)), "offset"),
    ("offset_spatial_too_small", _with(offset=torch.randn(N, 18, OH, OW - 1)), "offset"),
    ("offset_spatial_for_other_stride", _with(stride=2), "offset|mask"),
    ("mask_spatial_wrong", _with(mask=torch.rand(N, 9, OH, OW + 1)), "mask"),
    # batch mismatch
    ("offset_batch", _with(offset=lambda a: a["offset"][:1]), "offset"),
    ("offset_batch_bigger", _with(offset=lambda a: torch.cat([a["offset"]] * 2)), "offset"),
    ("mask_batch", _with(mask=lambda a: a["mask"][:1]), "mask"),
    # dtypes
    ("weight_float64", _with(weight=lambda a: a["weight"].double()), "weight"),
    ("offset_float64", _with(offset=lambda a: a["offset"].double()), "offset"),
    ("bias_float64", _with(bias=lambda a: a["bias"].double()), "bias"),
    ("mask_float64", _with(mask=lambda a: a["mask"].double()), "mask"),
    ("input_int64", _with(input=lambda a: a["input"].long()), "input"),
    ("input_int32_all_int", _with(input=lambda a: a["input"].int(), offset=lambda a: a["offset"].int(),
                                  weight=lambda a: a["weight"].int(), bias=lambda a: a["bias"].int(),
                                  mask=lambda a: a["mask"].int()), "input"),
    ("input_bool", _with(input=lambda a: a["input"] > 0), "input"),
    ("offset_int", _with(offset=lambda a: a["offset"].int()), "offset"),
    ("weight_uint8", _with(weight=lambda a: a["weight"].to(torch.uint8)), "weight"),
    ("bias_int", _with(bias=lambda a: a["bias"].long()), "bias"),
    ("mask_bool", _with(mask=lambda a: a["mask"] > 0.5), "mask"),
    ("input_float16_others_float32", _with(input=lambda a: a["input"].half()), "input"),
    ("input_complex", _with(input=lambda a: a["input"].to(torch.complex64)), "input"),
    # devices ('meta' is the only other device available everywhere)
    ("weight_meta", _with(weight=lambda a: a["weight"].to("meta")), "weight"),
    ("offset_meta", _with(offset=lambda a: a["offset"].to("meta")), "offset"),
    ("bias_meta", _with(bias=lambda a: a["bias"].to("meta")), "bias"),
    ("mask_meta", _with(mask=lambda a: a["mask"].to("meta")), "mask"),
    ("input_meta", _with(input=lambda a: a["input"].to("meta")), "input|offset|weight|bias|mask"),
    # stride / padding / dilation
    ("stride_zero", _with(stride=0), "stride"),
    ("stride_zero_w", _with(stride=(1, 0)), "stride"),
    ("stride_negative", _with(stride=-1), "stride"),
    ("stride_negative_h", _with(stride=(-2, 1)), "stride"),
    ("padding_negative", _with(padding=-1), "padding"),
    ("padding_negative_w", _with(padding=(0, -1)), "padding"),
    ("dilation_zero", _with(dilation=0), "dilation"),
    ("dilation_zero_h", _with(dilation=(0, 1)), "dilation"),
    ("dilation_negative", _with(dilation=-1), "dilation"),
    ("stride_triple", _with(stride=(1, 1, 1)), "stride"),
    ("stride_float", _with(stride=1.5), "stride"),
    ("padding_string", _with(padding="same"), "padding"),
    ("dilation_none", _with(dilation=None), "dilation"),
    # empty output
    ("output_empty_small_input", _empty_output_case(input=lambda a: a["input"][:, :, :2, :2]),
     "input|weight|kernel|output"),
    ("output_empty_big_dilation", _empty_output_case(dilation=3), "input|weight|kernel|dilation|output"),
    ("output_empty_narrow_input", _empty_output_case(input=lambda a: a["input"][:, :, :, :2]),
     "input|weight|kernel|output"),
    # not tensors
    ("input_list", _with(input=lambda a: a["input"].tolist()), "input"),
    ("weight_numpy", _with(weight=lambda a: a["weight"].numpy()), "weight"),
    ("offset_none", _with(offset=None), "offset"),
]
CASE_IDS = [c[0] for c in CASES]


@pytest.mark.parametrize("case_id,build,match", CASES, ids=CASE_IDS)
def test_bad_call_raises_naming_argument(case_id, build, match):
    args = build()
    with pytest.raises((ValueError, TypeError), match=match):
        call(args)


def test_bad_calls_raise_after_the_base_call_is_cached():
    """A validated call leaves a plan that lets calls of the same signature skip validation: no
    bad call may pass for it (the no-grad fast path, ``functional._eager_plans``)."""
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            call(base_args())
            for case_id, build, match in CASES:
                with pytest.raises((ValueError, TypeError), match=match):
                    call(build())


def test_output_empty_case_offsets_are_otherwise_valid():
    """The empty-output cases are only wrong in their output size (sanity of the case table)."""
    from tvm_dcn.ops.deform_conv import output_size

    assert output_size(2, K, 1, 0, 1) < 1
    assert output_size(H, K, 1, 0, 3) < 1


def test_base_call_is_valid():
    args = base_args()
    out = call(args)
    assert out.shape == (N, COUT, OH, OW)
    # float64 and no mask / no bias are fine too.
    out64 = call({**base_args(torch.float64), "mask": None, "bias": None})
    assert out64.dtype == torch.float64


def test_valid_after_errors():
    """Errors leave nothing behind: a valid call still works after every bad one."""
    good = call(base_args())
    for _, build, _ in CASES:
        try:
            call(build())
        except (ValueError, TypeError):
            pass
    assert torch.equal(call(base_args()), good)


CHILD = textwrap.dedent("""
    import sys
    sys.path.insert(0, {tests_dir!r})
    import torch
    import test_validation as tv
    raised = 0
    for case_id, build, match in tv.CASES:
        try:
            tv.call(build())
        except (ValueError, TypeError):
            raised += 1
        except Exception as e:
            print("UNEXPECTED", case_id, type(e).__name__, e)
    # non-finite offsets
    args = tv.base_args()
    off = args["offset"].clone()
    off[:, ::3] = float("nan"); off[:, 1::3] = float("inf"); off[:, 2::5] = -1e30
    args["offset"] = off
    out = tv.call(args)
    assert torch.isfinite(out).all()
    print("DONE", raised, len(tv.CASES))
""")


def test_bad_calls_do_not_crash_the_process():
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    proc = subprocess.run([sys.executable, "-c", CHILD.format(tests_dir=tests_dir)], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, (proc.returncode, proc.stdout[-2000:], proc.stderr[-4000:])
    assert f"DONE {len(CASES)} {len(CASES)}" in proc.stdout, proc.stdout[-2000:]
    assert "UNEXPECTED" not in proc.stdout
