"""Gradients of tvm_dcn.deform_conv2d (input, offset, mask, weight, bias).

- ``torch.autograd.gradcheck`` in float64 on small configurations covering every parameter, with
  sample positions kept away from integers (the bilinear kernel's derivative jumps there);
- agreement of every gradient with torchvision's autograd (float32 and float64) on the pairwise
  sweep of the forward tests, and on positions exactly on integers and the image borders, where
  the derivative is torchvision's one-sided one;
- only the requested gradients are computed; bit-reproducible gradients; non-finite offsets;
  empty batches; double backward refused; memory layouts; ``torch.library.opcheck``.

Every distinct shape compiles up to three kernels (forward, backward-data, backward-weight), so
the configurations reuse shapes of the forward tests where they can.
"""
from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tvm_dcn
import tvm_dcn.kernel
from conftest import Config, assert_matches, call_kwargs, make_inputs, reference_deform_conv2d_autograd
from test_deform_conv2d import (BAD_VALUES, BORDER_CONFIGS, EXTRAS, HUGE_VALUES, NONFINITE_CONFIGS, PAIRWISE,
                                _as_layout, _offsets_to_positions)

torchvision = pytest.importorskip("torchvision")

NAMES = ("input", "offset", "weight", "bias", "mask")
F64 = torch.float64


def gradients(fn, cfg: Config, inputs: dict, grad_output: torch.Tensor, wrt=NAMES, dtype=None):
    """``fn(**inputs)`` and its gradients (a dict; None for tensors not in ``wrt``) for the output
    gradient ``grad_output``; inputs are copied to fresh leaves (of ``dtype`` if given)."""
    leaves = {name: None if t is None else t.detach().to(dtype or t.dtype, copy=True).requires_grad_(name in wrt)
              for name, t in inputs.items()}
    out = fn(**leaves, **call_kwargs(cfg))
    out.backward(grad_output.to(out.dtype))
    return out, {name: None if t is None else t.grad for name, t in leaves.items()}


def random_grad_output(cfg: Config, generator: torch.Generator) -> torch.Tensor:
    shape = (cfg.batch, cfg.out_channels, *cfg.out_size())
    return torch.randn(*shape, generator=generator, dtype=F64).to(cfg.dtype)


def assert_gradients_match(actual: dict, expected: dict, dtype, what: str) -> None:
    assert actual.keys() == expected.keys()
    for name in NAMES:
        if expected[name] is None:
            assert actual[name] is None, f"{what}: {name} has a gradient"
        else:
            assert_matches(actual[name], expected[name], dtype, what=f"{what}: grad {name}")


def away_from_integers(cfg: Config, generator: torch.Generator) -> torch.Tensor:
    """Offsets whose sample positions have a fractional part in [0.2, 0.8] (the sampling grid is
    integer): an integer of spread ``cfg.offset_std`` plus 0.5 plus noise. Finite differences
    with a small eps never cross a cell boundary, where the derivative jumps."""
    oh, ow = cfg.out_size()
    shape = (cfg.batch, 2 * cfg.offset_groups * cfg.kh * cfg.kw, oh, ow)
    whole = torch.round(torch.randn(*shape, generator=generator, dtype=F64) * cfg.offset_std)
    noise = (torch.rand(*shape, generator=generator, dtype=F64) - 0.5) * 0.6
    return (whole + 0.5 + noise).to(cfg.dtype)


def _G(n, c, hw, o, k, s=1, p=0, d=1, g=1, og=1, bias=True, mask=True, std=1.5):
    return Config(batch=n, in_channels=c, height=hw[0], width=hw[1], out_channels=o, kernel=k, stride=s,
                  padding=p, dilation=d, groups=g, offset_groups=og, bias=bias, mask=mask, dtype=F64,
                  offset_std=std)


# Small float64 configurations for gradcheck (its cost is one forward per input element).
GRADCHECK = [
    _G(1, 2, (5, 5), 2, 3),
    _G(2, 2, (4, 5), 3, 3, p=1, bias=False, mask=False),
    _G(1, 4, (6, 6), 4, 3, s=2, p=1, g=2, og=2),
    _G(2, 4, (4, 5), 2, (1, 3), s=(1, 2), p=(0, 1), og=4, bias=False),
    _G(1, 3, (6, 7), 3, (3, 1), s=(2, 1), p=(1, 0), d=(2, 1), g=3, mask=False),
    _G(3, 2, (5, 5), 2, 1),
    _G(1, 4, (6, 5), 2, 3, p=2, d=2, g=2, og=2, bias=False),
    _G(2, 4, (3, 4), 4, 2, p=1, g=4, og=4),
    _G(1, 2, (4, 9), 2, (2, 3), s=(1, 3), p=(1, 2), d=(1, 2), mask=False),
    _G(1, 6, (4, 5), 6, 3, p=1, g=3, og=2),
    _G(2, 2, (6, 5), 1, 3, s=2, p=1, bias=False),
    _G(1, 4, (5, 5), 4, 3, s=(2, 1), p=1, d=(1, 2), g=2, bias=False),
    _G(1, 1, (3, 3), 1, 3),
    _G(2, 4, (5, 6), 2, (3, 2), p=(1, 0), d=(2, 1), og=2, bias=False, mask=False),
    _G(1, 2, (1, 7), 2, (1, 3), p=(0, 1)),
    _G(1, 2, (7, 1), 2, (3, 1), p=(1, 0), bias=False),
    _G(1, 4, (6, 6), 4, 3, s=3, p=2, mask=False),
    _G(2, 2, (5, 5), 2, 3, p=1, std=4.0),  # many samples outside the image
    _G(1, 4, (4, 4), 8, 3, p=1, g=2, og=4),
    _G(1, 2, (5, 5), 2, 5, p=2, bias=False),
    _G(3, 2, (4, 4), 2, 2, s=2, og=2, mask=False),
    _G(1, 3, (5, 6), 6, 3, p=(2, 1), d=2, og=3, bias=False),
]


def test_gradcheck_set_covers_every_parameter():
    """Guards edits to GRADCHECK: >= 20 configurations, each parameter in non-trivial values."""
    assert len(GRADCHECK) >= 20

    def pairs(attr):
        return {v if isinstance(v, tuple) else (v, v) for v in (getattr(c, attr) for c in GRADCHECK)}

    for attr, plain in (("stride", 1), ("padding", 0), ("dilation", 1), ("kernel", 3)):
        values = pairs(attr)
        assert any(a != b for a, b in values), f"no non-square {attr}"
        assert {a for a, _ in values} - {plain} and {b for _, b in values} - {plain}, attr
        assert (plain, plain) in values, attr
    assert {c.groups for c in GRADCHECK} >= {1, 2, 3, 4}
    assert {c.offset_groups for c in GRADCHECK} >= {1, 2, 4}
    assert {(c.bias, c.mask) for c in GRADCHECK} == {(True, True), (True, False), (False, True), (False, False)}
    assert {c.batch for c in GRADCHECK} >= {1, 2, 3}
    assert any(c.groups > 1 and c.offset_groups > 1 and c.groups != c.offset_groups for c in GRADCHECK)


@pytest.mark.parametrize("cfg", GRADCHECK, ids=lambda c: c.ident())
def test_gradcheck(cfg: Config, generator):
    inputs = make_inputs(cfg, generator)
    inputs["offset"] = away_from_integers(cfg, generator)
    names = [name for name in NAMES if inputs[name] is not None]

    def fn(*tensors):
        return tvm_dcn.deform_conv2d(**dict(zip(names, tensors)), **call_kwargs(cfg))

    leaves = [inputs[name].requires_grad_() for name in names]
    # The function is linear in each offset within a cell, so central differences are exact up
    # to rounding: tight tolerances. gradcheck also checks that backward is reentrant (two runs
    # bit-identical) and handles an undefined output gradient.
    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-7, rtol=1e-6)


# ------------------------------------------------------------------------------------------------
# Agreement with torchvision's autograd.

def _tvm(**kwargs):
    return tvm_dcn.deform_conv2d(**kwargs)


def _torchvision(**kwargs):
    return torchvision.ops.deform_conv2d(**kwargs)


def _check_against_torchvision(cfg: Config, inputs: dict, generator) -> dict:
    grad_out = random_grad_output(cfg, generator)
    _, actual = gradients(_tvm, cfg, inputs, grad_out)
    _, expected = gradients(_torchvision, cfg, inputs, grad_out, dtype=F64)
    assert_gradients_match(actual, expected, cfg.dtype, cfg.ident())
    return actual


# The first 12 rows of the forward tests' pairwise sweep: every value of every parameter in
# float32 and in float64 (checked below; each shape costs two backward kernels to build), offsets
# of spread 1 and 10 (many samples off the image); and the gradcheck set (kernels already built).
SWEEP = PAIRWISE[:12]


def test_sweep_covers_every_value_in_both_dtypes():
    def values(configs):
        return {(c.dtype, name, repr(getattr(c, name))) for c in configs for name in Config.__dataclass_fields__
                if name not in ("dtype", "out_channels")}

    assert values(SWEEP) == values(PAIRWISE)


@pytest.mark.parametrize("cfg", SWEEP + GRADCHECK, ids=Config.ident)
def test_gradients_match_torchvision(cfg: Config, generator):
    _check_against_torchvision(cfg, make_inputs(cfg, generator), generator)


@pytest.mark.parametrize("channels", [1, 3], ids=["single-channel", "depthwise"])
def test_weight_gradient_of_a_1x1_conv_with_one_channel_per_group(channels, generator):
    """Weight (C, 1, 1, 1), groups = C: the weight-gradient GEMM has unit tiles."""
    cfg = Config(batch=1, in_channels=channels, height=4, width=4, out_channels=channels, kernel=1,
                 groups=channels, bias=False)
    inputs = make_inputs(cfg, generator)
    grad_out = random_grad_output(cfg, generator)
    _, grads = gradients(_tvm, cfg, inputs, grad_out, wrt=("weight",))
    _, expected = gradients(_torchvision, cfg, inputs, grad_out, wrt=("weight",), dtype=F64)
    assert_matches(grads["weight"], expected["weight"], cfg.dtype)


@pytest.mark.parametrize("cfg", BORDER_CONFIGS, ids=lambda c: c.ident())
def test_gradients_on_integer_and_border_positions(cfg: Config, generator):
    """Samples exactly on -1, 0, H-1, H, other integers and just inside/outside (-1, H): the
    offset gradient is one-sided there; torchvision's choice must be reproduced exactly."""
    inputs = make_inputs(cfg, generator)
    h, w = cfg.height, cfg.width
    shape = (cfg.batch, cfg.offset_groups, cfg.kh * cfg.kw, *cfg.out_size())

    def positions(size, inner):
        return torch.tensor([-3, -2, -1.5, -1, -0.5, 0, 0.5, 1, inner, size - 1.5, size - 1, size - 0.5, size,
                             size + 0.5, size + 1, -1 + 2**-10, -1 - 2**-10, size - 2**-10, size - 1 + 2**-10],
                            dtype=F64)

    ys, xs = positions(h, 3), positions(w, 7)
    inputs["offset"] = _offsets_to_positions(cfg, ys[torch.randint(len(ys), shape, generator=generator)],
                                             xs[torch.randint(len(xs), shape, generator=generator)])
    grads = _check_against_torchvision(cfg, inputs, generator)
    assert (grads["offset"] != 0).float().mean() > 0.3  # the border slopes are really exercised


def test_large_offsets_off_the_image_have_zero_gradient(generator):
    """Samples entirely outside the image: zero offset/mask gradients, input gradient only
    from the samples that remain inside; matches torchvision."""
    cfg = BORDER_CONFIGS[1]
    inputs = make_inputs(cfg, generator)
    far = torch.rand(inputs["offset"].shape, generator=generator, dtype=F64) < 0.5
    inputs["offset"] = torch.where(far, torch.full_like(inputs["offset"], 50.0), inputs["offset"])
    grads = _check_against_torchvision(cfg, inputs, generator)
    # A sample is off the image when either of its coordinates is far.
    n, taps = cfg.batch, cfg.kh * cfg.kw
    sample_far = far.view(n, cfg.offset_groups, taps, 2, *cfg.out_size()).any(dim=3)
    assert torch.all(grads["mask"].view_as(sample_far)[sample_far] == 0)
    offset_grad = grads["offset"].view(n, cfg.offset_groups, taps, 2, *cfg.out_size())
    assert torch.all(offset_grad.permute(0, 1, 2, 4, 5, 3)[sample_far] == 0)


# ------------------------------------------------------------------------------------------------
# Only the gradients that are needed.

SUBSETS = [("offset",), ("weight",), ("bias",), ("mask",), ("input",), ("input", "offset", "bias", "mask"),
           ("offset", "mask"), ("input", "weight")]


@pytest.mark.parametrize("wrt", SUBSETS, ids="+".join)
def test_only_needed_gradients(wrt, generator, monkeypatch):
    cfg = GRADCHECK[0]  # float64, bias and mask
    inputs = make_inputs(cfg, generator)
    grad_out = random_grad_output(cfg, generator)
    _, full = gradients(_tvm, cfg, inputs, grad_out)

    built = []
    compile_ = tvm_dcn.kernel.compile
    monkeypatch.setattr(tvm_dcn.kernel, "compile", lambda wl, *a, **k: built.append(wl) or compile_(wl, *a, **k))
    _, part = gradients(_tvm, cfg, inputs, grad_out, wrt=wrt)
    for name in NAMES:
        if name in wrt:
            assert_matches(part[name], full[name], cfg.dtype, what=name)
        else:
            assert part[name] is None, name
    # The kernels run compute only what was asked for.
    backward = {wl.op: wl for wl in built if wl.op != "deform_conv2d"}
    data, weight = backward.get("deform_conv2d_backward_data"), backward.get("deform_conv2d_backward_weight")
    assert (data is not None) == bool({"input", "offset", "mask"} & set(wrt))
    if data is not None:
        assert data["need_input"] == ("input" in wrt)
        assert data["need_sampling"] == bool({"offset", "mask"} & set(wrt))
    assert (weight is not None) == bool({"weight", "bias"} & set(wrt))
    if weight is not None:
        assert weight["need_weight"] == ("weight" in wrt) and weight["with_bias"] == ("bias" in wrt)


def test_autograd_records_only_when_a_gradient_can_flow(generator):
    """Without a tensor that requires grad (or under no_grad) the forward skips autograd (no
    grad_fn, same numbers); with one, the result is differentiable."""
    cfg = GRADCHECK[0]
    inputs = make_inputs(cfg, generator)
    plain = _tvm(**inputs, **call_kwargs(cfg))
    assert plain.grad_fn is None and not plain.requires_grad
    weight = inputs["weight"].clone().requires_grad_()
    tracked = _tvm(**{**inputs, "weight": weight}, **call_kwargs(cfg))
    assert tracked.requires_grad and tracked.grad_fn is not None
    with torch.no_grad():
        untracked = _tvm(**{**inputs, "weight": weight}, **call_kwargs(cfg))
    assert untracked.grad_fn is None
    assert torch.equal(plain, tracked.detach()) and torch.equal(plain, untracked)


def test_frozen_layer_inside_a_network():
    """A frozen deformable layer (no parameter requires grad) passes the same gradient on to
    the layer before it (through its input and its predicted offsets and mask) as a trainable one."""
    torch.manual_seed(0)
    layer = tvm_dcn.ModulatedDeformConv2dPack(4, 6, 3, padding=1)
    torch.nn.init.normal_(layer.conv_offset.weight, 0, 0.1)  # offsets and mask depend on the input
    upstream = torch.nn.Conv2d(4, 4, 1)
    x = torch.randn(2, 4, 7, 11)
    grads = []
    for trainable in (True, False):
        layer.requires_grad_(trainable).zero_grad()
        upstream.zero_grad()
        layer(upstream(x)).square().sum().backward()
        grads.append(upstream.weight.grad)
        assert all((p.grad is not None) == trainable for p in layer.parameters())
    assert grads[0].abs().sum() > 0
    assert_matches(grads[1], grads[0].double(), torch.float32, what="upstream weight gradient")


# ------------------------------------------------------------------------------------------------
# Determinism, non-finite offsets, empty batch, double backward, layouts.

def test_gradients_are_bit_reproducible(generator):
    """Many samples land on the same pixels (16 channels, 9 taps, offsets of spread 1, two
    offset groups): two backward passes give identical bits (torchvision's and mmcv's CUDA
    backward do not: atomic adds)."""
    cfg = EXTRAS[0]
    inputs = make_inputs(cfg, generator)
    grad_out = random_grad_output(cfg, generator)
    runs = [gradients(_tvm, cfg, inputs, grad_out)[1] for _ in range(3)]
    for name in NAMES:
        assert all(torch.equal(runs[0][name], run[name]) for run in runs[1:]), name


def _poisoned(offset: torch.Tensor, generator) -> torch.Tensor:
    """``offset`` with about a third of its entries replaced by NaN, +-inf, +-1e30 and values
    beyond the int32 range, and the first tap of a whole output row at NaN."""
    values = BAD_VALUES + HUGE_VALUES
    which = torch.randint(3 * len(values), offset.shape, generator=generator)
    out = offset.clone()
    for i, v in enumerate(values):
        out[which == i] = v
    out[:, 0:2, 0, :] = float("nan")
    return out


@pytest.mark.parametrize("cfg", NONFINITE_CONFIGS, ids=lambda c: c.ident())
def test_non_finite_offsets_gradients(cfg: Config, generator):
    inputs = make_inputs(cfg, generator)
    inputs["offset"] = _poisoned(inputs["offset"], generator)
    bad = ~torch.isfinite(inputs["offset"])
    assert bad.any()
    grad_out = random_grad_output(cfg, generator)
    out, grads = gradients(_tvm, cfg, inputs, grad_out)
    ref_out, expected = gradients(reference_deform_conv2d_autograd, cfg, inputs, grad_out)
    assert_matches(out, ref_out, cfg.dtype, what="output")
    for name in NAMES:
        if grads[name] is not None:
            assert torch.isfinite(grads[name]).all(), name
    assert torch.all(grads["offset"][bad] == 0)
    assert_gradients_match(grads, expected, cfg.dtype, "vs differentiable reference")


def test_differentiable_reference_agrees_with_torchvision(generator):
    """Sanity check of the reference used for the non-finite tests, on integer/border positions."""
    cfg = BORDER_CONFIGS[1]
    inputs = make_inputs(cfg, generator)
    ys = torch.randint(-2, cfg.height + 2, (cfg.batch, 1, 9, *cfg.out_size()), generator=generator).double()
    xs = torch.rand((cfg.batch, 1, 9, *cfg.out_size()), generator=generator, dtype=F64) * (cfg.width + 2) - 1.5
    inputs["offset"] = _offsets_to_positions(cfg, ys, xs)
    grad_out = random_grad_output(cfg, generator)
    _, ref = gradients(reference_deform_conv2d_autograd, cfg, inputs, grad_out)
    _, expected = gradients(_torchvision, cfg, inputs, grad_out)
    assert_gradients_match(ref, expected, F64, "reference vs torchvision")


@pytest.mark.parametrize("cfg", [PAIRWISE[0], PAIRWISE[2]], ids=lambda c: c.ident())
def test_empty_batch_backward(cfg: Config, generator):
    cfg0 = Config(**{**cfg.__dict__, "batch": 0})
    inputs = make_inputs(cfg0, generator)
    grad_out = random_grad_output(cfg0, generator)
    out, grads = gradients(_tvm, cfg0, inputs, grad_out)
    assert out.shape == grad_out.shape
    for name in NAMES:
        if inputs[name] is None:
            assert grads[name] is None
            continue
        assert grads[name].shape == inputs[name].shape and grads[name].dtype == cfg.dtype, name
        assert torch.count_nonzero(grads[name]) == 0, name  # weight and bias: zeros, not garbage


@pytest.mark.parametrize("route", ["grad", "grad_allow_unused", "backward"])
def test_double_backward_is_refused(route, generator):
    """Differentiating the gradients raises a clear error by every route, as torchvision does.
    (With ``once_differentiable``, autograd.grad found no path to the inputs: an unclear error,
    and with allow_unused=True a silent None, i.e. a second derivative of zero.)"""
    cfg = GRADCHECK[0]
    leaves = [t.requires_grad_() for t in make_inputs(cfg, generator).values()]
    out = tvm_dcn.deform_conv2d(*leaves[:4], mask=leaves[4], **call_kwargs(cfg))
    first = torch.autograd.grad(out.square().sum(), leaves, create_graph=True)
    assert all(torch.isfinite(g).all() and g.requires_grad for g in first)
    second = sum(g.sum() for g in first)
    with pytest.raises(RuntimeError, match="double backward .* not supported"):
        if route == "backward":
            second.backward()
        else:
            torch.autograd.grad(second, leaves, allow_unused=route == "grad_allow_unused")


@pytest.mark.parametrize("how", ["sliced", "channel_sliced", "transposed", "channels_last", "strided"])
def test_layouts_give_the_same_gradients(how, generator):
    cfg = EXTRAS[0]
    inputs = make_inputs(cfg, generator)
    grad_out = random_grad_output(cfg, generator)
    _, expected = gradients(_tvm, cfg, inputs, grad_out)
    views = _as_layout(inputs, how)
    leaves = {name: views[name].requires_grad_() for name in NAMES}
    assert not leaves["input"].is_contiguous() or how == "channels_last"
    out = tvm_dcn.deform_conv2d(**leaves, **call_kwargs(cfg))
    out.backward(_as_layout({"g": grad_out}, how)["g"])
    for name in NAMES:
        assert leaves[name].grad.shape == inputs[name].shape
        assert torch.equal(leaves[name].grad, expected[name]), name


@pytest.mark.parametrize("kind", ["broadcast", "sum", "channels_last"])
def test_unusual_grad_output(kind, generator):
    """Output gradients with stride-0 (expanded) axes, as ``sum()`` produces, or channels_last."""
    cfg = EXTRAS[0]
    inputs = make_inputs(cfg, generator)
    oh, ow = cfg.out_size()
    if kind == "broadcast":
        grad_out = torch.randn(1, cfg.out_channels, 1, ow, generator=generator).expand(cfg.batch, -1, oh, -1)
    elif kind == "sum":
        grad_out = torch.ones(()).expand(cfg.batch, cfg.out_channels, oh, ow)
    else:
        grad_out = random_grad_output(cfg, generator).contiguous(memory_format=torch.channels_last)
    _, actual = gradients(_tvm, cfg, inputs, grad_out)
    _, expected = gradients(_tvm, cfg, inputs, grad_out.contiguous())
    for name in NAMES:
        assert torch.equal(actual[name], expected[name]), name
    if kind == "sum":  # and through autograd's own SumBackward (an expanded gradient)
        leaves = {name: t.clone().requires_grad_() for name, t in inputs.items()}
        tvm_dcn.deform_conv2d(**leaves, **call_kwargs(cfg)).sum().backward()
        assert all(torch.equal(leaves[name].grad, expected[name]) for name in NAMES)


# ------------------------------------------------------------------------------------------------
# Registration of the custom ops (schema, fake implementations, AOT dispatch).

def _op_args(cfg: Config, generator, batch=None):
    cfg = Config(**{**cfg.__dict__, "batch": cfg.batch if batch is None else batch})
    inputs = make_inputs(cfg, generator)
    conv = [list(v) if isinstance(v, tuple) else [v, v] for v in call_kwargs(cfg).values()]
    return cfg, inputs, conv


@pytest.mark.parametrize("batch", [None, 0], ids=["batch", "empty"])
@pytest.mark.parametrize("cfg", [GRADCHECK[0], GRADCHECK[1]], ids=lambda c: c.ident())
def test_opcheck_forward(cfg, batch, generator):
    # Every tensor requires grad: the forward op's registered autograd is checked too (gradients
    # through AOT dispatch against eager).
    cfg, x, conv = _op_args(cfg, generator, batch)
    leaves = [None if x[k] is None else x[k].detach().requires_grad_() for k in ("input", "offset", "weight", "bias",
                                                                                 "mask")]
    torch.library.opcheck(torch.ops.tvm_dcn.deform_conv2d_forward, (*leaves, *conv))


@pytest.mark.parametrize("needs", [[True] * 5, [False, True, False, True, False], [True, False, True, False, True]],
                         ids=lambda n: "".join("1" if v else "0" for v in n))
@pytest.mark.parametrize("batch", [None, 0], ids=["batch", "empty"])
@pytest.mark.parametrize("cfg", [GRADCHECK[0], GRADCHECK[1]], ids=lambda c: c.ident())
def test_opcheck_backward(cfg, batch, needs, generator):
    cfg, x, conv = _op_args(cfg, generator, batch)
    args = (random_grad_output(cfg, generator), x["input"], x["offset"], x["weight"], x["mask"], cfg.bias,
            *conv, needs)
    torch.library.opcheck(torch.ops.tvm_dcn.deform_conv2d_backward, args)


# ------------------------------------------------------------------------------------------------
# The training example (examples/train_deformable.py), in its reduced mode.

def test_training_example_quick_run():
    """``python examples/train_deformable.py --quick`` as a user runs it (a fresh process, which
    imports tvm_dcn before torch): it finishes and every network's training loss falls."""
    path = Path(__file__).resolve().parents[1] / "examples" / "train_deformable.py"
    run = subprocess.run([sys.executable, str(path), "--quick"], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    losses = {}
    for match in re.finditer(r"^ +(\S.*?) +epoch +\d+ +train loss ([\d.]+)", run.stdout, re.M):
        losses.setdefault(match[1], []).append(float(match[2]))
    assert len(losses) == 3 and all(len(v) == 6 for v in losses.values()), run.stdout
    assert any(name.startswith("deformable") for name in losses), losses
    for name, loss in losses.items():
        # Starts at chance level (ln 5 = 1.61 for 5 classes) and falls below it.
        assert abs(loss[0] - math.log(5)) < 0.1 and loss[-1] < loss[0] - 0.03, (name, loss)
    assert re.search(r"^total [\d.]+ s$", run.stdout, re.M), run.stdout
