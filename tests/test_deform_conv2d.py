"""tvm_dcn.deform_conv2d against torchvision.ops.deform_conv2d and an independent reference.

Every distinct shape compiles a TVM kernel, so the sweep is a hand-picked list: a pairwise covering
set over the parameters (checked by ``test_sweep_is_pairwise_covering``) plus targeted extras.
"""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

import tvm_dcn
from conftest import (Config, assert_matches, call_kwargs, make_inputs, reference_deform_conv2d,
                      torchvision_oracle)

torchvision = pytest.importorskip("torchvision")


def _P(n, c, hw, om, k, s, p, d, g, og, bias, mask, f64, std):
    return Config(batch=n, in_channels=c, height=hw[0], width=hw[1], out_channels=g * om, kernel=k,
                  stride=s, padding=p, dilation=d, groups=g, offset_groups=og, bias=bias, mask=mask,
                  dtype=torch.float64 if f64 else torch.float32, offset_std=std)


# Pairwise covering set (every pair of values of any two parameters appears in some row) over:
# batch {1,3,5}, in_channels {4,8,12}, input size {7x11, 13x9, 10x10}, out channels per group
# {1,2,3}, kernel {1x1,3x3,1x3,3x1,5x5}, stride {1,2,(1,2)}, padding {0,1,(2,1)}, dilation
# {1,2,(2,1)}, groups {1,2,4}, offset groups {1,2,4}, bias, mask, dtype, offset std {1, 10}.
PAIRWISE = [
    _P(n=1, c=4, hw=(7, 11), om=1, k=(5, 5), s=1, p=0, d=1, g=1, og=1, bias=True, mask=True, f64=False, std=1),
    _P(n=3, c=8, hw=(13, 9), om=2, k=(1, 1), s=2, p=1, d=2, g=1, og=2, bias=False, mask=False, f64=True, std=10),
    _P(n=5, c=12, hw=(10, 10), om=3, k=(3, 3), s=(1, 2), p=(2, 1), d=(2, 1), g=2, og=4, bias=False, mask=False, f64=False, std=1),
    _P(n=3, c=12, hw=(10, 10), om=1, k=(1, 3), s=(1, 2), p=1, d=1, g=4, og=4, bias=True, mask=True, f64=True, std=10),
    _P(n=1, c=8, hw=(13, 9), om=3, k=(3, 1), s=1, p=(2, 1), d=(2, 1), g=2, og=1, bias=True, mask=True, f64=True, std=10),
    _P(n=5, c=4, hw=(7, 11), om=2, k=(3, 1), s=2, p=0, d=2, g=4, og=2, bias=False, mask=True, f64=False, std=1),
    _P(n=3, c=4, hw=(7, 11), om=3, k=(3, 3), s=2, p=0, d=(2, 1), g=2, og=2, bias=True, mask=False, f64=True, std=10),
    _P(n=5, c=8, hw=(13, 9), om=1, k=(1, 3), s=1, p=1, d=1, g=4, og=1, bias=False, mask=False, f64=False, std=1),
    _P(n=1, c=12, hw=(10, 10), om=2, k=(5, 5), s=(1, 2), p=(2, 1), d=2, g=1, og=2, bias=False, mask=False, f64=True, std=10),
    _P(n=3, c=12, hw=(10, 10), om=2, k=(1, 1), s=1, p=0, d=2, g=2, og=1, bias=True, mask=True, f64=False, std=1),
    _P(n=1, c=4, hw=(7, 11), om=1, k=(1, 1), s=2, p=(2, 1), d=1, g=4, og=4, bias=True, mask=False, f64=False, std=10),
    _P(n=5, c=8, hw=(13, 9), om=1, k=(3, 3), s=(1, 2), p=0, d=2, g=1, og=4, bias=True, mask=True, f64=True, std=1),
    _P(n=1, c=4, hw=(7, 11), om=3, k=(1, 3), s=(1, 2), p=1, d=(2, 1), g=1, og=1, bias=True, mask=True, f64=False, std=1),
    _P(n=3, c=12, hw=(10, 10), om=1, k=(3, 1), s=2, p=1, d=1, g=2, og=2, bias=True, mask=False, f64=False, std=10),
    _P(n=5, c=8, hw=(10, 10), om=3, k=(5, 5), s=2, p=1, d=(2, 1), g=4, og=1, bias=True, mask=True, f64=False, std=10),
    _P(n=1, c=8, hw=(7, 11), om=2, k=(3, 3), s=1, p=1, d=1, g=4, og=4, bias=True, mask=True, f64=False, std=1),
    _P(n=3, c=12, hw=(7, 11), om=2, k=(1, 3), s=2, p=(2, 1), d=2, g=2, og=2, bias=True, mask=True, f64=False, std=1),
    _P(n=3, c=4, hw=(13, 9), om=3, k=(5, 5), s=1, p=0, d=1, g=2, og=2, bias=True, mask=True, f64=False, std=1),
    _P(n=5, c=12, hw=(13, 9), om=1, k=(1, 1), s=(1, 2), p=0, d=(2, 1), g=1, og=1, bias=True, mask=True, f64=False, std=1),
    _P(n=1, c=4, hw=(10, 10), om=2, k=(3, 1), s=(1, 2), p=0, d=(2, 1), g=1, og=4, bias=True, mask=True, f64=False, std=1),
    _P(n=1, c=4, hw=(7, 11), om=3, k=(1, 3), s=1, p=0, d=2, g=1, og=1, bias=True, mask=True, f64=False, std=1),
    _P(n=1, c=4, hw=(7, 11), om=3, k=(1, 1), s=1, p=0, d=1, g=1, og=1, bias=True, mask=True, f64=False, std=1),
    _P(n=1, c=4, hw=(7, 11), om=1, k=(5, 5), s=1, p=0, d=1, g=1, og=4, bias=True, mask=True, f64=False, std=1),
    _P(n=1, c=4, hw=(7, 11), om=1, k=(3, 3), s=1, p=0, d=1, g=1, og=1, bias=True, mask=True, f64=False, std=1),
]

# Targeted extras: shapes the pairwise set does not reach.
EXTRAS = [
    # A realistic layer: more channels, 15x17 = 255 output pixels (not a multiple of 8).
    Config(batch=2, in_channels=16, height=15, width=17, out_channels=24, kernel=3, padding=1,
           offset_groups=2, mask=True),
    Config(batch=2, in_channels=16, height=15, width=17, out_channels=24, kernel=3, padding=1,
           offset_groups=2, mask=True, dtype=torch.float64),
    # Exactly 8x8 = 64 output pixels (the aligned case) next to 9x7 = 63.
    Config(batch=2, in_channels=4, height=10, width=10, out_channels=4, kernel=3),
    Config(batch=2, in_channels=4, height=11, width=9, out_channels=4, kernel=3, bias=False),
    # A single output pixel, a single channel.
    Config(batch=1, in_channels=1, height=3, width=3, out_channels=1, kernel=3, bias=False, mask=True),
    # One pixel per input row / column, and a 1x1 input with 1x1 kernel.
    Config(batch=3, in_channels=2, height=1, width=20, out_channels=3, kernel=(1, 3), stride=(1, 3), padding=(0, 1)),
    Config(batch=2, in_channels=2, height=19, width=1, out_channels=2, kernel=(3, 1), dilation=(3, 1), mask=True),
    Config(batch=2, in_channels=3, height=1, width=1, out_channels=5, kernel=1, offset_std=0.3),
    # Depthwise with per-channel offset groups.
    Config(batch=2, in_channels=8, height=9, width=12, out_channels=8, kernel=3, padding=1, groups=8,
           offset_groups=8, mask=True),
    # Stride 3 with large padding; even kernel size; padding wider than the kernel.
    Config(batch=1, in_channels=4, height=12, width=14, out_channels=4, kernel=3, stride=3, padding=2),
    Config(batch=2, in_channels=4, height=8, width=9, out_channels=6, kernel=(2, 4), padding=(1, 2), mask=True),
    Config(batch=1, in_channels=2, height=5, width=6, out_channels=2, kernel=3, padding=(4, 3), mask=True,
           dtype=torch.float64),
    # Offsets that send almost every sample far outside the image.
    Config(batch=2, in_channels=4, height=7, width=11, out_channels=6, kernel=3, padding=1, mask=True,
           offset_std=100.0),
    # Small offsets (samples near the regular grid).
    Config(batch=2, in_channels=4, height=7, width=11, out_channels=6, kernel=3, padding=1, offset_std=0.05,
           dtype=torch.float64),
]

SWEEP = PAIRWISE + EXTRAS


def _run(cfg: Config, inputs: dict):
    return tvm_dcn.deform_conv2d(inputs["input"], inputs["offset"], inputs["weight"], inputs["bias"],
                                 mask=inputs["mask"], **call_kwargs(cfg))


def _oracle(cfg: Config, inputs: dict):
    return torchvision_oracle(inputs["input"], inputs["offset"], inputs["weight"], inputs["bias"],
                              mask=inputs["mask"], **call_kwargs(cfg))


def test_sweep_is_pairwise_covering():
    """The PAIRWISE list covers every pair of parameter values (guards edits to the list)."""
    def key(c):
        return dict(batch=c.batch, in_channels=c.in_channels, size=(c.height, c.width),
                    out_mult=c.out_channels // c.groups, kernel=c.kernel, stride=c.stride, padding=c.padding,
                    dilation=c.dilation, groups=c.groups, offset_groups=c.offset_groups, bias=c.bias,
                    mask=c.mask, dtype=c.dtype, std=c.offset_std)

    rows = [key(c) for c in PAIRWISE]
    domains = {name: {r[name] for r in rows} for name in rows[0]}
    expected_sizes = dict(batch=3, in_channels=3, size=3, out_mult=3, kernel=5, stride=3, padding=3,
                          dilation=3, groups=3, offset_groups=3, bias=2, mask=2, dtype=2, std=2)
    assert {k: len(v) for k, v in domains.items()} == expected_sizes
    seen = {(a, r[a], b, r[b]) for r in rows for a, b in itertools.combinations(sorted(r), 2)}
    missing = [(a, va, b, vb) for a, b in itertools.combinations(sorted(domains), 2)
               for va in domains[a] for vb in domains[b] if (a, va, b, vb) not in seen]
    assert not missing, missing[:10]
    # And the output sizes are mostly not multiples of 8.
    assert sum((c.out_size()[0] * c.out_size()[1]) % 8 != 0 for c in SWEEP) >= len(SWEEP) - 3


@pytest.mark.parametrize("cfg", SWEEP, ids=[c.ident() for c in SWEEP])
def test_matches_torchvision(cfg: Config, generator):
    inputs = make_inputs(cfg, generator)
    out = _run(cfg, inputs)
    expected = _oracle(cfg, inputs)
    assert out.shape == (cfg.batch, cfg.out_channels, *cfg.out_size())
    assert_matches(out, expected, cfg.dtype, what=cfg.ident())


@pytest.mark.parametrize("cfg", [PAIRWISE[2], PAIRWISE[4], EXTRAS[0]], ids=lambda c: c.ident())
def test_reference_agrees_with_torchvision(cfg: Config, generator):
    """Sanity check of the independent reference used for the non-finite tests."""
    inputs = make_inputs(cfg, generator)
    ref = reference_deform_conv2d(inputs["input"], inputs["offset"], inputs["weight"], inputs["bias"],
                                  mask=inputs["mask"], **call_kwargs(cfg))
    assert_matches(ref, _oracle(cfg, inputs), torch.float64, what="reference vs torchvision")


# ------------------------------------------------------------------------------------------------
# Offsets landing exactly on integer positions, half-integers and the image borders.

BORDER_CONFIGS = [
    Config(batch=2, in_channels=4, height=7, width=11, out_channels=6, kernel=3, padding=1, mask=True),
    Config(batch=2, in_channels=4, height=7, width=11, out_channels=6, kernel=3, padding=1, mask=True,
           dtype=torch.float64),
    Config(batch=1, in_channels=4, height=7, width=11, out_channels=6, kernel=3, stride=2, offset_groups=2),
]


def _offsets_to_positions(cfg: Config, ys: torch.Tensor, xs: torch.Tensor) -> torch.Tensor:
    """Offsets (N, 2*OG*K, OH, OW) that make every sample land at (ys, xs) (same shape, per tap)."""
    n, og, taps = cfg.batch, cfg.offset_groups, cfg.kh * cfg.kw
    oh, ow = cfg.out_size()
    (sh, sw), (ph, pw), (dh, dw) = [(v, v) if isinstance(v, int) else v
                                    for v in (cfg.stride, cfg.padding, cfg.dilation)]
    base_y = (torch.arange(oh) * sh - ph).view(1, 1, 1, oh, 1) + \
        (torch.arange(cfg.kh) * dh).repeat_interleave(cfg.kw).view(1, 1, taps, 1, 1)
    base_x = (torch.arange(ow) * sw - pw).view(1, 1, 1, 1, ow) + \
        (torch.arange(cfg.kw) * dw).repeat(cfg.kh).view(1, 1, taps, 1, 1)
    off = torch.stack([ys - base_y.double(), xs - base_x.double()], dim=3)  # (n, og, taps, 2, oh, ow)
    return off.reshape(n, 2 * og * taps, oh, ow).to(cfg.dtype)


@pytest.mark.parametrize("cfg", BORDER_CONFIGS, ids=lambda c: c.ident())
def test_integer_and_border_positions(cfg: Config, generator):
    inputs = make_inputs(cfg, generator)
    h, w = cfg.height, cfg.width
    n, og, taps = cfg.batch, cfg.offset_groups, cfg.kh * cfg.kw
    oh, ow = cfg.out_size()
    shape = (n, og, taps, oh, ow)
    # Exactly representable positions: integers inside, the borders -1, 0, H-1, H, half-integers
    # next to them, and values just inside/outside of the valid range (-1, H).
    y_choices = torch.tensor([-2, -1, -0.5, 0, 0.5, 1, 2, 3, h - 1.5, h - 1, h - 0.5, h, h + 1,
                              -1 + 2**-10, h - 2**-10], dtype=torch.float64)
    x_choices = torch.tensor([-2, -1, -0.5, 0, 0.5, 1, 4, 7, w - 1.5, w - 1, w - 0.5, w, w + 1,
                              -1 + 2**-10, w - 2**-10], dtype=torch.float64)
    ys = y_choices[torch.randint(len(y_choices), shape, generator=generator)]
    xs = x_choices[torch.randint(len(x_choices), shape, generator=generator)]
    inputs["offset"] = _offsets_to_positions(cfg, ys, xs)
    out = _run(cfg, inputs)
    assert_matches(out, _oracle(cfg, inputs), cfg.dtype, what="vs torchvision")
    ref = reference_deform_conv2d(inputs["input"], inputs["offset"], inputs["weight"], inputs["bias"],
                                  mask=inputs["mask"], **call_kwargs(cfg))
    assert_matches(out, ref, cfg.dtype, what="vs reference")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_integer_offsets_shift_the_image(dtype, generator):
    """A 1x1 kernel with integer offsets (dy, dx) samples x[y + dy, x + dx] exactly (zero outside)."""
    cfg = Config(batch=1, in_channels=3, height=6, width=9, out_channels=3, kernel=1, bias=False, dtype=dtype)
    x = torch.randn(1, 3, 6, 9, generator=generator, dtype=torch.float64).to(dtype)
    weight = torch.eye(3, dtype=dtype).view(3, 3, 1, 1)
    for dy, dx in [(0, 0), (1, 0), (0, -2), (-3, 4), (5, 8), (6, 0), (0, -9)]:
        offset = torch.empty(1, 2, 6, 9, dtype=dtype)
        offset[:, 0], offset[:, 1] = dy, dx
        out = tvm_dcn.deform_conv2d(x, offset, weight, **call_kwargs(cfg))
        expected = torch.zeros_like(x)
        ys, ye = max(0, -dy), min(6, 6 - dy)
        xs, xe = max(0, -dx), min(9, 9 - dx)
        if ys < ye and xs < xe:
            expected[:, :, ys:ye, xs:xe] = x[:, :, ys + dy:ye + dy, xs + dx:xe + dx]
        assert torch.equal(out, expected), (dy, dx, (out - expected).abs().max())


# ------------------------------------------------------------------------------------------------
# Identity: zero offsets (and an all-ones mask, or none) give an ordinary convolution.

IDENTITY_CONFIGS = [
    Config(batch=2, in_channels=4, height=7, width=11, out_channels=6, kernel=3, padding=1),
    Config(batch=3, in_channels=8, height=10, width=9, out_channels=4, kernel=3, stride=2, padding=(2, 1),
           dilation=2, groups=2, offset_groups=2),
    Config(batch=1, in_channels=8, height=9, width=13, out_channels=8, kernel=(1, 3), stride=(1, 2),
           padding=(0, 1), dilation=(2, 1), groups=4, offset_groups=4, bias=False),
    Config(batch=2, in_channels=4, height=12, width=10, out_channels=4, kernel=5, padding=2, dilation=(1, 2),
           dtype=torch.float64),
]


@pytest.mark.parametrize("with_mask", [False, True], ids=["nomask", "onesmask"])
@pytest.mark.parametrize("cfg", IDENTITY_CONFIGS, ids=lambda c: c.ident())
def test_zero_offsets_is_conv2d(cfg: Config, with_mask: bool, generator):
    inputs = make_inputs(cfg, generator)
    offset = torch.zeros_like(inputs["offset"])
    mask = None
    if with_mask:
        oh, ow = cfg.out_size()
        mask = torch.ones(cfg.batch, cfg.offset_groups * cfg.kh * cfg.kw, oh, ow, dtype=cfg.dtype)
    out = tvm_dcn.deform_conv2d(inputs["input"], offset, inputs["weight"], inputs["bias"], mask=mask,
                                **call_kwargs(cfg))
    x64 = inputs["input"].double()
    w64 = inputs["weight"].double()
    b64 = None if inputs["bias"] is None else inputs["bias"].double()
    expected = F.conv2d(x64, w64, b64, stride=cfg.stride, padding=cfg.padding, dilation=cfg.dilation,
                        groups=cfg.groups)
    assert_matches(out, expected, cfg.dtype, what="vs conv2d")


def test_ones_mask_equals_no_mask(generator):
    cfg = IDENTITY_CONFIGS[0]
    inputs = make_inputs(cfg, generator)
    oh, ow = cfg.out_size()
    ones = torch.ones(cfg.batch, cfg.kh * cfg.kw, oh, ow)
    a = tvm_dcn.deform_conv2d(inputs["input"], inputs["offset"], inputs["weight"], inputs["bias"],
                              **call_kwargs(cfg))
    b = tvm_dcn.deform_conv2d(inputs["input"], inputs["offset"], inputs["weight"], inputs["bias"], mask=ones,
                              **call_kwargs(cfg))
    assert_matches(a, b.double(), torch.float32, what="mask=ones vs mask=None")


def test_int_and_pair_arguments_are_equivalent(generator):
    cfg = Config(batch=1, in_channels=4, height=9, width=9, out_channels=4, kernel=3, stride=2, padding=1,
                 dilation=2)
    inputs = make_inputs(cfg, generator)
    args = (inputs["input"], inputs["offset"], inputs["weight"], inputs["bias"])
    a = tvm_dcn.deform_conv2d(*args, stride=2, padding=1, dilation=2)
    b = tvm_dcn.deform_conv2d(*args, stride=(2, 2), padding=(1, 1), dilation=(2, 2))
    c = tvm_dcn.deform_conv2d(*args, stride=[2, 2], padding=[1, 1], dilation=[2, 2])
    assert torch.equal(a, b) and torch.equal(a, c)


# ------------------------------------------------------------------------------------------------
# Non-finite offsets.

NONFINITE_CONFIGS = [
    Config(batch=2, in_channels=4, height=7, width=11, out_channels=6, kernel=3, padding=1, mask=True),
    Config(batch=2, in_channels=4, height=7, width=11, out_channels=6, kernel=3, padding=1, mask=True,
           dtype=torch.float64),
    PAIRWISE[2],  # groups 2, offset groups 4, no bias, no mask
]
BAD_VALUES = [float("nan"), float("inf"), float("-inf"), 1e30, -1e30]
# Finite but beyond the int32 range once added to a pixel position (float -> int casts overflow).
HUGE_VALUES = [3e9, -3e9, 2.0**31, -(2.0**31) - 2048, 1e15]


@pytest.mark.parametrize("cfg", NONFINITE_CONFIGS, ids=lambda c: c.ident())
def test_non_finite_offsets(cfg: Config, generator):
    inputs = make_inputs(cfg, generator)
    offset = inputs["offset"].clone()
    # Poison ~1/3 of the offset entries (y and x channels independently) with the bad values.
    which = torch.randint(len(BAD_VALUES + HUGE_VALUES) * 3, offset.shape, generator=generator)
    for i, v in enumerate(BAD_VALUES + HUGE_VALUES):
        offset[which == i] = v
    # And some whole samples (both coordinates) at NaN.
    offset[:, 0:2, 0, :] = float("nan")
    assert (~torch.isfinite(offset)).any()
    inputs["offset"] = offset
    out = _run(cfg, inputs)
    assert torch.isfinite(out).all()

    finite_equiv = torch.where(torch.isfinite(offset) & (offset.abs() < 1e4), offset,
                               torch.full_like(offset, -1e4))
    expected = torchvision_oracle(inputs["input"], finite_equiv, inputs["weight"], inputs["bias"],
                                  mask=inputs["mask"], **call_kwargs(cfg))
    assert_matches(out, expected, cfg.dtype, what="vs torchvision with offsets -> -1e4")
    ref = reference_deform_conv2d(inputs["input"], offset, inputs["weight"], inputs["bias"],
                                  mask=inputs["mask"], **call_kwargs(cfg))
    assert_matches(out, ref, cfg.dtype, what="vs reference with raw offsets")


@pytest.mark.parametrize("value", BAD_VALUES + HUGE_VALUES, ids=lambda v: f"{v:g}")
def test_all_offsets_non_finite_gives_bias(value, generator):
    cfg = NONFINITE_CONFIGS[0]
    inputs = make_inputs(cfg, generator)
    offset = torch.full_like(inputs["offset"], value)
    out = _run(cfg, dict(inputs, offset=offset))
    expected = inputs["bias"].view(1, -1, 1, 1).expand_as(out)
    assert torch.equal(out, expected)


# ------------------------------------------------------------------------------------------------
# Empty batch, memory layouts, determinism.

@pytest.mark.parametrize("cfg", [PAIRWISE[0], PAIRWISE[2], PAIRWISE[4]], ids=lambda c: c.ident())
def test_empty_batch(cfg: Config, generator):
    cfg0 = Config(**{**cfg.__dict__, "batch": 0})
    inputs = make_inputs(cfg0, generator)
    out = _run(cfg0, inputs)
    assert out.shape == (0, cfg.out_channels, *cfg.out_size())
    assert out.dtype == cfg.dtype
    assert out.device == inputs["input"].device


LAYOUT_CONFIGS = [EXTRAS[0], PAIRWISE[3], PAIRWISE[2]]


def _misaligned(t: torch.Tensor, dim: int) -> torch.Tensor:
    """The same values as ``t`` in a view sliced along ``dim`` (data pointer not 64-byte aligned)."""
    shape = list(t.shape)
    shape[dim] += 1
    big = torch.full(shape, 12345.0, dtype=t.dtype)
    view = big.narrow(dim, 1, t.shape[dim])
    view.copy_(t)
    assert not view.is_contiguous() or view.data_ptr() % 64
    return view


def _transposed(t: torch.Tensor) -> torch.Tensor:
    """The same values as ``t`` in a non-contiguous view with its last two axes transposed in memory."""
    return t.transpose(-1, -2).contiguous().transpose(-1, -2)


def _as_layout(inputs: dict, how: str) -> dict:
    out = {}
    for name, t in inputs.items():
        if t is None:
            out[name] = None
        elif how == "sliced":
            out[name] = _misaligned(t, t.dim() - 1)
        elif how == "channel_sliced":
            out[name] = _misaligned(t, 1 if t.dim() > 1 else 0)
        elif how == "transposed":
            out[name] = _transposed(t) if t.dim() >= 2 else t[::1]
        elif how == "channels_last":
            out[name] = t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t
        elif how == "strided":
            out[name] = torch.repeat_interleave(t, 2, dim=-1)[..., ::2]
        else:
            raise AssertionError(how)
    return out


@pytest.mark.parametrize("how", ["sliced", "channel_sliced", "transposed", "channels_last", "strided"])
@pytest.mark.parametrize("cfg", LAYOUT_CONFIGS, ids=lambda c: c.ident())
def test_layouts_match_contiguous(cfg: Config, how: str, generator):
    inputs = make_inputs(cfg, generator)
    expected = _run(cfg, inputs)
    views = _as_layout(inputs, how)
    for name in inputs:
        if inputs[name] is not None:
            assert torch.equal(views[name], inputs[name]), name
    if how != "channels_last":
        assert not views["input"].is_contiguous()
    out = _run(cfg, views)
    assert out.shape == expected.shape
    assert torch.equal(out, expected), (out - expected).abs().max()


def test_only_input_misaligned(generator):
    """The literal case from the contract: ``x[:, :, :, 1:]``."""
    cfg = Config(batch=2, in_channels=4, height=7, width=11, out_channels=6, kernel=3, padding=1, mask=True)
    big = make_inputs(Config(**{**cfg.__dict__, "width": 12}), generator)["input"]
    x = big[:, :, :, 1:]
    inputs = make_inputs(cfg, generator)
    inputs["input"] = x
    out = _run(cfg, inputs)
    assert torch.equal(out, _run(cfg, dict(inputs, input=x.contiguous())))
    assert_matches(out, _oracle(cfg, inputs), cfg.dtype)


@pytest.mark.parametrize("cfg", [EXTRAS[0], PAIRWISE[3]], ids=lambda c: c.ident())
def test_deterministic(cfg: Config, generator):
    inputs = make_inputs(cfg, generator)
    outs = [_run(cfg, inputs) for _ in range(3)]
    assert all(torch.equal(outs[0], o) for o in outs[1:])
    # Inputs are not modified.
    again = make_inputs(cfg, torch.Generator().manual_seed(generator.initial_seed()))
    for name in inputs:
        if inputs[name] is not None:
            assert torch.equal(inputs[name], again[name]), name


def test_batch_elements_are_independent(generator):
    """Result for a batch equals the results of each element on its own (no cross-talk)."""
    cfg = Config(batch=3, in_channels=4, height=7, width=11, out_channels=6, kernel=3, padding=1, mask=True)
    inputs = make_inputs(cfg, generator)
    out = _run(cfg, inputs)
    one = Config(**{**cfg.__dict__, "batch": 1})
    for i in range(3):
        sub = {k: (None if v is None or k in ("weight", "bias") else v[i:i + 1]) for k, v in inputs.items()}
        sub["weight"], sub["bias"] = inputs["weight"], inputs["bias"]
        assert_matches(_run(one, sub), out[i:i + 1].double(), torch.float32, what=f"batch element {i}")


# --------------------------------------------------------------------------------------------
# Column formulations (ops/deform_conv.py): the CPU picks one by the sizes; both must be exact.

FORMULATION_CASES = [
    PAIRWISE[2], PAIRWISE[4], EXTRAS[0], EXTRAS[1], EXTRAS[8],
    # Channels per offset group a multiple of 8 (the transposed-tile schedule), with groups.
    Config(batch=2, in_channels=32, height=9, width=9, out_channels=32, kernel=3, padding=1, groups=2,
           offset_groups=2, mask=True),
]


@pytest.mark.parametrize("columns", ["gather", "channels_last"])
@pytest.mark.parametrize("cfg", FORMULATION_CASES, ids=[c.ident() for c in FORMULATION_CASES])
def test_column_formulations_match_torchvision(cfg: Config, columns: str, generator, monkeypatch):
    from tvm_dcn import functional

    chosen = functional._workload

    def forced(*args):
        wl = chosen(*args)
        return tvm_dcn.Workload.make(wl.op, wl.dtype, **dict(wl.params), columns=columns)

    monkeypatch.setattr(functional, "_workload", forced)
    inputs = make_inputs(cfg, generator)
    with torch.no_grad():
        out = _run(cfg, inputs)
    assert_matches(out, _oracle(cfg, inputs), cfg.dtype, what=f"{columns}: {cfg.ident()}")


def test_column_formulation_choice():
    from tvm_dcn import ops
    from tvm_dcn.ops.deform_conv import columns_formulation, forward_workload

    def layer(channels, size, stride=1):
        return forward_workload(batch=1, in_channels=channels, height=size, width=size, out_channels=channels,
                                kernel_size=(3, 3), stride=(stride, stride), padding=(1, 1), with_mask=True)

    # Channels-last wherever the channels of an offset group fill whole 8-lane vectors.
    assert columns_formulation(layer(128, 28)) == "channels_last"
    assert columns_formulation(layer(256, 14)) == "channels_last"
    assert columns_formulation(layer(512, 7)) == "channels_last"
    assert columns_formulation(layer(512, 14, stride=2)) == "channels_last"
    assert columns_formulation(layer(12, 9)) == "gather"
    four_offset_groups = forward_workload(batch=1, in_channels=16, height=9, width=9, out_channels=16,
                                         kernel_size=(3, 3), padding=(1, 1), offset_groups=4)
    assert columns_formulation(four_offset_groups) == "gather"  # 4 channels per offset group
    gpu = ops.for_target(layer(128, 28), "cuda")
    assert gpu["columns"] == "gather" and columns_formulation(gpu) == "gather"
    assert ops.for_target(gpu, "cuda") == gpu
    with pytest.raises(ValueError, match="columns"):
        tvm_dcn.ops.primfunc(tvm_dcn.Workload.make("deform_conv2d", "float32", **dict(layer(8, 8).params),
                                                      columns="nhwc"))


def test_padded_pixels_rounds_to_whole_vectors_and_pairs_them_when_cheap():
    from tvm_dcn.ops.deform_conv import SPATIAL_ALIGN, padded_pixels

    assert padded_pixels(784) == 784  # 98 vectors: already even
    assert padded_pixels(196) == 208  # 25 vectors -> 26 (+6%), for the two-vector GEMM tile
    assert padded_pixels(49) == 56  # 64 would add 31%: an odd 7 vectors stay
    assert padded_pixels(1) == SPATIAL_ALIGN
    for pixels in range(1, 600):
        padded = padded_pixels(pixels)
        assert padded % SPATIAL_ALIGN == 0 and 0 <= padded - pixels < 2 * SPATIAL_ALIGN
        assert padded == -(-pixels // SPATIAL_ALIGN) * SPATIAL_ALIGN or 10 * padded <= 11 * pixels


# ------------------------------------------------------------------------------------------
# The eager fast path (``functional._eager_plans``): calls like one validated before run the
# kernel directly, skipping validation and the operator dispatch, only where that is invisible.

FAST_CFG = Config(batch=1, in_channels=4, height=7, width=11, out_channels=6, kernel=3, padding=1, bias=True,
                  mask=True)


def _fast_inputs(generator):
    return make_inputs(FAST_CFG, generator)


def _fast_call(inputs):
    return tvm_dcn.deform_conv2d(inputs["input"], inputs["offset"], inputs["weight"], inputs["bias"],
                                 mask=inputs["mask"], padding=1)


def _forbid_operator(monkeypatch):
    from tvm_dcn import functional  # noqa: PLC0415

    def forbidden(*args):
        raise AssertionError("went through torch.ops.tvm_dcn")
    monkeypatch.setattr(functional, "_forward_op", forbidden)


def test_repeated_call_runs_the_kernel_without_the_operator(generator, monkeypatch):
    """After one validated call, a call with new tensors of the same shapes (and a misaligned,
    non-contiguous input) bypasses the operator and still matches torchvision."""
    from tvm_dcn import functional  # noqa: PLC0415

    with torch.no_grad():
        _fast_call(_fast_inputs(generator))
    assert any(key[0] == torch.Size([1, 4, 7, 11]) for key in functional._eager_plans)
    _forbid_operator(monkeypatch)
    inputs = _fast_inputs(generator)
    with torch.no_grad():
        assert_matches(_fast_call(inputs), _oracle(FAST_CFG, inputs), FAST_CFG.dtype)
    wide = make_inputs(Config(**{**FAST_CFG.__dict__, "width": 12}), generator)["input"]
    inputs["input"] = wide[:, :, :, 1:]  # a misaligned view of the same shape
    assert inputs["input"].data_ptr() % 64 and not inputs["input"].is_contiguous()
    assert_matches(_fast_call(inputs), _oracle(FAST_CFG, inputs), FAST_CFG.dtype)


def test_fast_path_steps_aside_for_autograd_modes_and_recording(generator, monkeypatch):
    """Where the operator must be seen (autograd, a dispatch mode, a workload recorder), calls go
    through it even when a plan exists."""
    from torch.utils._python_dispatch import TorchDispatchMode  # noqa: PLC0415

    inputs = _fast_inputs(generator)
    with torch.no_grad():
        expected = _fast_call(inputs)

    class OpLog(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    with OpLog() as log, torch.no_grad():
        torch.testing.assert_close(_fast_call(inputs), expected)
    assert any("tvm_dcn.deform_conv2d_forward" in op for op in log.ops)
    with tvm_dcn.workloads.record() as recorder, torch.no_grad():
        _fast_call(inputs)
    assert [wl.op for wl in recorder.workloads] == ["deform_conv2d"]

    _forbid_operator(monkeypatch)
    with pytest.raises(AssertionError, match="torch.ops"):
        _fast_call(dict(inputs, weight=inputs["weight"].clone().requires_grad_()))
    with torch.no_grad():  # no grad mode: requires_grad does not matter
        torch.testing.assert_close(_fast_call(dict(inputs, weight=inputs["weight"].clone().requires_grad_())),
                                   expected)


def test_fast_path_follows_the_forced_schedule_and_the_kernel_cache(generator):
    from tvm_dcn import functional  # noqa: PLC0415
    from tvm_dcn.kernel import forced_schedule  # noqa: PLC0415

    inputs = _fast_inputs(generator)
    with torch.no_grad():
        expected = _fast_call(inputs)
        with forced_schedule("default"):
            torch.testing.assert_close(_fast_call(inputs), expected)
    sources = {key[-1]: plan.kernel.schedule_source for key, plan in functional._eager_plans.items()
               if key[0] == torch.Size([1, 4, 7, 11])}
    assert sources["default"] == "default" and sources[None] in ("tuned", "hand")
    tvm_dcn.clear_memory_cache()
    assert not functional._eager_plans


def test_torch_compile_fullgraph_traces_the_operator(generator):
    """Under torch.compile the fast path stays out of the way: the call is traced (fullgraph) as
    the registered operator, with and without autograd."""
    inputs = _fast_inputs(generator)
    with torch.no_grad():
        _fast_call(inputs)  # a plan exists: tracing must still not take the eager path
    compiled = torch.compile(lambda inputs: _fast_call(inputs) * 2, fullgraph=True)
    with torch.no_grad():
        assert_matches(compiled(inputs) / 2, _oracle(FAST_CFG, inputs), FAST_CFG.dtype)
    weight = inputs["weight"].clone().requires_grad_()
    compiled(dict(inputs, weight=weight)).sum().backward()
    assert weight.grad is not None and weight.grad.abs().sum() > 0
