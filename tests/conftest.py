"""Shared helpers for the tvm_dcn functional tests.

- ``Config``: one deform_conv2d call (shapes and hyper-parameters), with a readable test id.
- ``make_inputs``: seeded random (input, offset, weight, bias, mask) for a Config.
- ``reference_deform_conv2d``: an independent pure-PyTorch implementation of the documented
  semantics (bilinear sampling with zero padding, non-finite positions contribute zero). It is
  used where torchvision cannot be called (NaN offsets segfault it) and as a second opinion.
- ``torchvision_oracle``: torchvision.ops.deform_conv2d, computed in float64.
- ``assert_matches``: tolerance policy (float32: rtol 1e-4 plus an atol scaled by the output
  magnitude; float64: rtol 1e-10 likewise; bfloat16 / float16: one unit in the last place).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Optional

import pytest

import tvm_dcn  # noqa: F401  (before torch: tvm_dcn sets OMP_WAIT_POLICY=PASSIVE while it still can)
import torch  # noqa: E402

SEED = 20240611


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


@dataclasses.dataclass(frozen=True)
class Config:
    batch: int = 1
    in_channels: int = 4
    height: int = 7
    width: int = 11
    out_channels: int = 6
    kernel: tuple = (3, 3)
    stride: object = 1
    padding: object = 0
    dilation: object = 1
    groups: int = 1
    offset_groups: int = 1
    bias: bool = True
    mask: bool = False
    dtype: torch.dtype = torch.float32
    offset_std: float = 1.0

    @property
    def kh(self):
        return _pair(self.kernel)[0]

    @property
    def kw(self):
        return _pair(self.kernel)[1]

    def out_size(self):
        (sh, sw), (ph, pw), (dh, dw) = _pair(self.stride), _pair(self.padding), _pair(self.dilation)
        oh = (self.height + 2 * ph - dh * (self.kh - 1) - 1) // sh + 1
        ow = (self.width + 2 * pw - dw * (self.kw - 1) - 1) // sw + 1
        return oh, ow

    def ident(self) -> str:
        def fmt(v):
            return "x".join(map(str, v)) if isinstance(v, tuple) else str(v)

        parts = [f"n{self.batch}", f"c{self.in_channels}", f"{self.height}x{self.width}",
                 f"o{self.out_channels}", f"k{fmt(self.kernel)}", f"s{fmt(self.stride)}",
                 f"p{fmt(self.padding)}", f"d{fmt(self.dilation)}", f"g{self.groups}",
                 f"og{self.offset_groups}", "b" if self.bias else "nob", "m" if self.mask else "nom",
                 "f64" if self.dtype == torch.float64 else "f32"]
        if self.offset_std != 1.0:
            parts.append(f"std{self.offset_std:g}")
        return "-".join(parts)


def make_inputs(cfg: Config, generator: torch.Generator):
    """Random inputs for ``cfg``: dict with input, offset, weight, bias (or None), mask (or None)."""
    oh, ow = cfg.out_size()
    taps = cfg.kh * cfg.kw

    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64).to(cfg.dtype)

    x = randn(cfg.batch, cfg.in_channels, cfg.height, cfg.width)
    offset = randn(cfg.batch, 2 * cfg.offset_groups * taps, oh, ow) * cfg.offset_std
    weight = randn(cfg.out_channels, cfg.in_channels // cfg.groups, cfg.kh, cfg.kw)
    bias = randn(cfg.out_channels) if cfg.bias else None
    mask = None
    if cfg.mask:
        mask = torch.rand(cfg.batch, cfg.offset_groups * taps, oh, ow, generator=generator,
                          dtype=torch.float64).to(cfg.dtype)
    return dict(input=x, offset=offset, weight=weight, bias=bias, mask=mask)


def call_kwargs(cfg: Config) -> dict:
    return dict(stride=cfg.stride, padding=cfg.padding, dilation=cfg.dilation)


def pytest_xdist_auto_num_workers(config):
    """``-n auto`` (pyproject's addopts): one worker more than the CPUs this process may use, at
    most 4 (each worker holds torch, TVM and its kernels). The extra worker fills the time the
    others wait on subprocesses: tuning's builders and runners, RPC servers, child processes."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(4, cpus + 1)


@pytest.fixture(scope="session", autouse=True)
def session_kernel_cache(tmp_path_factory):
    """One disk kernel cache for the whole test session, shared by the xdist workers (the cache is
    safe for concurrent processes) and empty at its start: the tests neither depend on nor fill
    the user's ``~/.cache/tvm-dcn``. Tests of the cache itself point it elsewhere."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the run's directory, common to the workers
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TVM_DCN_CACHE_DIR", str(root / "kernel-cache"))
        yield root / "kernel-cache"


@pytest.fixture
def generator() -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(SEED)
    return g


# --------------------------------------------------------------------------------------------
# Oracles


def torchvision_oracle(input, offset, weight, bias=None, stride=1, padding=0, dilation=1, mask=None):
    """torchvision's deform_conv2d in float64 (never call with non-finite offsets)."""
    import torchvision

    assert torch.isfinite(offset).all(), "torchvision segfaults on non-finite offsets"

    def d(t):
        return None if t is None else t.detach().to(torch.float64)

    return torchvision.ops.deform_conv2d(d(input), d(offset), d(weight), d(bias), stride=_pair(stride),
                                         padding=_pair(padding), dilation=_pair(dilation), mask=d(mask))


def reference_deform_conv2d(input, offset, weight, bias=None, stride=1, padding=0, dilation=1,
                            mask=None) -> torch.Tensor:
    """Independent float64 implementation of the documented semantics.

    Output pixel (oh, ow), tap (i, j) of offset group g samples the input at
    y = oh*sh - ph + i*dh + offset[2*(g*K + i*KW + j)], x = ow*sw - pw + j*dw + offset[... + 1]
    bilinearly; the sample is zero when y or x is non-finite or y <= -1, y >= H, x <= -1, x >= W,
    and corners outside the image count as zero.
    """
    x_in = input.detach().to(torch.float64)
    off = offset.detach().to(torch.float64)
    w = weight.detach().to(torch.float64)
    n, c, h, wd = x_in.shape
    cout, cpg, kh, kw = w.shape
    groups = c // cpg
    taps = kh * kw
    og = off.shape[1] // (2 * taps)
    oh, ow = off.shape[2], off.shape[3]
    (sh, sw), (ph, pw), (dh, dw) = _pair(stride), _pair(padding), _pair(dilation)

    base_y = (torch.arange(oh, dtype=torch.float64) * sh - ph).view(1, 1, 1, oh, 1) + \
        (torch.arange(kh, dtype=torch.float64) * dh).repeat_interleave(kw).view(1, 1, taps, 1, 1)
    base_x = (torch.arange(ow, dtype=torch.float64) * sw - pw).view(1, 1, 1, 1, ow) + \
        (torch.arange(kw, dtype=torch.float64) * dw).repeat(kh).view(1, 1, taps, 1, 1)
    off = off.reshape(n, og, taps, 2, oh, ow)
    ys = base_y + off[:, :, :, 0]  # (n, og, taps, oh, ow)
    xs = base_x + off[:, :, :, 1]
    valid = torch.isfinite(ys) & torch.isfinite(xs) & (ys > -1) & (ys < h) & (xs > -1) & (xs < wd)
    ys = torch.where(valid, ys, torch.zeros_like(ys))
    xs = torch.where(valid, xs, torch.zeros_like(xs))
    y0 = torch.floor(ys)
    x0 = torch.floor(xs)
    ly, lx = ys - y0, xs - x0
    y0, x0 = y0.long(), x0.long()

    flat = x_in.reshape(n, og, c // og, h * wd)
    cols = torch.zeros(n, og, c // og, taps, oh, ow, dtype=torch.float64)
    for dy, dx in ((0, 0), (0, 1), (1, 0), (1, 1)):
        yy, xx = y0 + dy, x0 + dx
        cw = (ly if dy else 1 - ly) * (lx if dx else 1 - lx)
        inside = valid & (yy >= 0) & (yy < h) & (xx >= 0) & (xx < wd)
        cw = torch.where(inside, cw, torch.zeros_like(cw))
        idx = (yy.clamp(0, h - 1) * wd + xx.clamp(0, wd - 1)).view(n, og, 1, taps * oh * ow)
        idx = idx.expand(n, og, c // og, taps * oh * ow)
        vals = torch.gather(flat, 3, idx).view(n, og, c // og, taps, oh, ow)
        cols += vals * cw.unsqueeze(2)
    if mask is not None:
        cols = cols * mask.detach().to(torch.float64).view(n, og, 1, taps, oh, ow)
    cols = cols.reshape(n, groups, cpg * taps, oh * ow)
    wg = w.view(groups, cout // groups, cpg * taps)
    out = torch.einsum("gok,ngkp->ngop", wg, cols).reshape(n, cout, oh, ow)
    if bias is not None:
        out = out + bias.detach().to(torch.float64).view(1, -1, 1, 1)
    return out


# --------------------------------------------------------------------------------------------
# Tolerances

# Half precision (bfloat16, float16) computes in float32 and rounds each result once: against
# a float64 reference on the same (rounded) inputs its error is half a unit in the last place of
# the half dtype plus float32's. rtol is one unit (2**-7 for bfloat16's 8-bit significand, 2**-10
# for float16's 11-bit one), atol float32's.
RTOL = {torch.float32: 1e-4, torch.float64: 1e-10, torch.bfloat16: 2**-7, torch.float16: 2**-10}
# atol = ATOL_SCALE * max(1, max |expected|): the error of a sum of many products is relative to
# the size of the terms, not of the (possibly cancelled) result.
ATOL_SCALE = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 1e-5, torch.float16: 1e-5}


def assert_matches(actual: torch.Tensor, expected: torch.Tensor, dtype: Optional[torch.dtype] = None,
                   what: str = "", extra: Optional[torch.Tensor] = None) -> None:
    """``actual`` (of ``dtype``) within the dtype's tolerance of ``expected``, plus ``extra`` (an
    elementwise allowance, e.g. ``columns_rounding_bound``) where given."""
    dtype = dtype or actual.dtype
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == dtype, f"{what}: dtype {actual.dtype} != {dtype}"
    exp = expected.to(torch.float64)
    act = actual.detach().to(torch.float64)
    scale = max(1.0, exp.abs().max().item()) if exp.numel() else 1.0
    atol = ATOL_SCALE[dtype] * scale
    rtol = RTOL[dtype]
    err = (act - exp).abs()
    bound = atol + rtol * exp.abs() + (0 if extra is None else extra)
    bad = ~(err <= bound)  # also catches NaN
    if bad.any():
        idx = tuple(bad.nonzero()[0].tolist())
        raise AssertionError(
            f"{what}: {int(bad.sum())}/{bad.numel()} elements out of tolerance (rtol={rtol}, atol={atol:.3g}); "
            f"max abs err {err.nan_to_num(float('inf')).max().item():.3g}, max |expected| {scale:.3g}; "
            f"first at {idx}: got {act[idx].item()!r}, expected {exp[idx].item()!r}")


def columns_rounding_bound(input, offset, weight, mask=None, stride=1, padding=0, dilation=1) -> torch.Tensor:
    """The error a bfloat16 forward adds where it multiplies with AVX512-BF16's dot product: each
    column value is rounded to bfloat16 (8 significant bits: relative error at most 2**-8), so an
    output moves by at most 2**-8 x sum |weight| |column|: the deformable convolution of |input|,
    |weight| and |mask| (bilinear weights are non-negative), in float64. Zero where the forward
    does not use it (other dtypes, a host without avx512bf16, a reduction that does not pair up)."""
    from tvm_dcn.cpu_isa import vector_unit  # noqa: PLC0415
    from tvm_dcn.ops.deform_conv import bf16_dot_applies, forward_workload  # noqa: PLC0415

    kh, kw = weight.shape[2:]
    wl = forward_workload(batch=1, in_channels=input.shape[1], height=1, width=1, out_channels=weight.shape[0],
                          kernel_size=(kh, kw), groups=input.shape[1] // weight.shape[1], dtype="bfloat16")
    if input.dtype != torch.bfloat16 or not vector_unit(tvm_dcn.host_target()).bf16_dot or not bf16_dot_applies(wl):
        return torch.zeros(())
    magnitude = reference_deform_conv2d(input.double().abs(), offset.double(), weight.double().abs(), None, stride,
                                        padding, dilation, None if mask is None else mask.double().abs())
    return 2 ** -8 * magnitude


def reference_deform_conv2d_autograd(input, offset, weight, bias=None, stride=1, padding=0, dilation=1,
                                     mask=None) -> torch.Tensor:
    """Differentiable float64 implementation of the documented semantics, for gradients.

    Autograd through it gives torchvision's gradients: each tap samples its 4 bilinear corners
    (``floor`` of the position and the next integer), corners outside the image count as zero,
    and the weights ``frac`` / ``1 - frac`` make the derivative at an integer position the
    one-sided (right) one. A non-finite position is replaced by -2 (all corners outside) with
    ``torch.where`` *before* any arithmetic, so its gradient is exactly zero, not NaN. Unlike
    :func:`reference_deform_conv2d` it loops over taps and corners, a second formulation.
    """
    x = input.to(torch.float64)
    n, c, h, w = x.shape
    out_channels, group_channels, kh, kw = weight.shape
    taps = kh * kw
    og = offset.shape[1] // (2 * taps)
    oh, ow = offset.shape[2:]
    (sh, sw), (ph, pw), (dh, dw) = _pair(stride), _pair(padding), _pair(dilation)
    off = offset.to(torch.float64).reshape(n, og, taps, 2, oh, ow)
    planes = x.reshape(n, og, c // og, h * w)
    columns = []  # per tap: (n, og, c/og, oh, ow)
    for tap in range(taps):
        i, j = divmod(tap, kw)
        pos_y = (torch.arange(oh, dtype=torch.float64) * sh - ph + i * dh).view(oh, 1) + off[:, :, tap, 0]
        pos_x = (torch.arange(ow, dtype=torch.float64) * sw - pw + j * dw).view(1, ow) + off[:, :, tap, 1]
        finite = torch.isfinite(pos_y) & torch.isfinite(pos_x)
        pos_y = torch.where(finite, pos_y, torch.full_like(pos_y, -2.0))
        pos_x = torch.where(finite, pos_x, torch.full_like(pos_x, -2.0))
        # Clamp far-away (huge but finite) positions so the integer conversion below is defined;
        # everything beyond the image stays beyond it.
        floor_y = torch.floor(pos_y.detach()).clamp(-2, h + 1)
        floor_x = torch.floor(pos_x.detach()).clamp(-2, w + 1)
        frac_y, frac_x = pos_y - floor_y, pos_x - floor_x
        sample = 0
        for dy in (0, 1):
            for dx in (0, 1):
                row, col = floor_y + dy, floor_x + dx
                inside = (row >= 0) & (row < h) & (col >= 0) & (col < w)
                corner_weight = (frac_y if dy else 1 - frac_y) * (frac_x if dx else 1 - frac_x)
                corner_weight = torch.where(inside, corner_weight, torch.zeros_like(corner_weight))
                index = (row.clamp(0, h - 1) * w + col.clamp(0, w - 1)).long().view(n, og, 1, oh * ow)
                values = torch.gather(planes, 3, index.expand(n, og, c // og, oh * ow)).view(n, og, c // og, oh, ow)
                sample = sample + corner_weight.unsqueeze(2) * values
        if mask is not None:
            sample = sample * mask.to(torch.float64)[:, tap::taps].reshape(n, og, 1, oh, ow)
        columns.append(sample.reshape(n, c, oh * ow))
    groups = c // group_channels
    # (n, c, taps, P) -> (n, groups, c/groups * taps, P): the row order of weight.view(cout, -1).
    cols = torch.stack(columns, dim=2).reshape(n, groups, group_channels * taps, oh * ow)
    wg = weight.to(torch.float64).reshape(groups, out_channels // groups, group_channels * taps)
    out = torch.einsum("gok,ngkp->ngop", wg, cols).reshape(n, out_channels, oh, ow)
    if bias is not None:
        out = out + bias.to(torch.float64).view(1, -1, 1, 1)
    return out
