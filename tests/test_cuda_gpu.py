"""On a CUDA GPU: every operator against torchvision's CUDA kernels (or, for the deformable RoI
variants, against tvm-dcn's CPU kernels, which the CPU tests check against references), streams
(a side stream, CUDA graph capture), device indices and mixed-device errors.

Skipped where torch sees no CUDA device (and where TVM's CUDA runtime is not loaded, with the
reason). Run on a GPU host with ``python3 -m pytest -q tests/test_cuda_gpu.py``.
"""
from __future__ import annotations

import pytest

import tvm_dcn  # noqa: F401  (before torch)
import torch  # noqa: E402

from conftest import Config, assert_matches, call_kwargs, make_inputs  # noqa: E402
from roi_reference import make_boxes  # noqa: E402
from tvm_dcn.kernel import runtime_can_run  # noqa: E402

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
    pytest.mark.skipif(torch.cuda.is_available() and not runtime_can_run({"kind": "cuda"}),
                       reason="TVM's CUDA runtime is not loaded (libtvm_runtime_cuda / driver)"),
]

CONV_CONFIGS = [
    Config(mask=True),
    Config(batch=2, in_channels=8, out_channels=4, groups=2, offset_groups=2, stride=2, padding=1, dilation=(1, 2)),
    Config(batch=3, in_channels=16, height=14, width=14, out_channels=32, padding=1, bias=False, mask=True,
           offset_std=2.0),
    Config(dtype=torch.float64, mask=True, padding=1),
]


def _cuda(t):
    return None if t is None else t.cuda()


def _conv_grads(fn, inputs: dict, cfg: Config, grad):
    leaves = {k: (v.detach().requires_grad_() if v is not None else None) for k, v in inputs.items()}
    out = fn(leaves["input"], leaves["offset"], leaves["weight"], leaves["bias"], mask=leaves["mask"],
             **call_kwargs(cfg))
    out.backward(grad)
    return out.detach(), {k: v.grad for k, v in leaves.items() if v is not None}


@pytest.mark.parametrize("cfg", CONV_CONFIGS, ids=[c.ident() for c in CONV_CONFIGS])
def test_deform_conv2d_matches_torchvision_cuda(cfg, generator):
    import torchvision

    inputs = {k: _cuda(v) for k, v in make_inputs(cfg, generator).items()}
    oh, ow = cfg.out_size()
    grad = torch.randn(cfg.batch, cfg.out_channels, oh, ow, generator=generator, dtype=torch.float64).to(cfg.dtype).cuda()
    out, grads = _conv_grads(tvm_dcn.deform_conv2d, inputs, cfg, grad)
    as64 = {k: (v.double() if v is not None else None) for k, v in inputs.items()}
    ref, ref_grads = _conv_grads(torchvision.ops.deform_conv2d, as64, cfg, grad.double())
    assert out.device == inputs["input"].device
    assert_matches(out, ref, cfg.dtype, what="output")
    for name, g in grads.items():
        assert g.device == inputs["input"].device
        assert_matches(g, ref_grads[name], cfg.dtype, what=f"grad {name}")


def test_deform_conv2d_cuda_agrees_with_cpu(generator):
    cfg = Config(batch=2, in_channels=6, out_channels=4, mask=True, padding=1, groups=2)
    cpu = make_inputs(cfg, generator)
    gpu = {k: _cuda(v) for k, v in cpu.items()}
    oh, ow = cfg.out_size()
    grad = torch.randn(cfg.batch, cfg.out_channels, oh, ow, generator=generator)
    out_cpu, grads_cpu = _conv_grads(tvm_dcn.deform_conv2d, cpu, cfg, grad)
    out_gpu, grads_gpu = _conv_grads(tvm_dcn.deform_conv2d, gpu, cfg, grad.cuda())
    assert_matches(out_gpu.cpu(), out_cpu.double(), torch.float32, what="output")
    for name in grads_cpu:
        assert_matches(grads_gpu[name].cpu(), grads_cpu[name].double(), torch.float32, what=f"grad {name}")


def test_deform_conv2d_gradcheck_cuda():
    from test_backward import away_from_integers

    cfg = Config(batch=1, in_channels=2, height=5, width=6, out_channels=2, dtype=torch.float64, mask=True, padding=1)
    g = torch.Generator().manual_seed(3)
    inputs = make_inputs(cfg, g)
    inputs["offset"] = away_from_integers(cfg, g)
    leaves = [inputs[k].cuda().requires_grad_() for k in ("input", "offset", "weight", "bias", "mask")]

    def fn(x, off, w, b, m):
        return tvm_dcn.deform_conv2d(x, off, w, b, mask=m, **call_kwargs(cfg))

    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-7, rtol=1e-6)


# --------------------------------------------------------------------------------------------
# RoI family

SHAPE = (2, 12, 9, 11)
SCALE = 0.5
OUT = (3, 2)


@pytest.fixture(scope="module")
def roi_data():
    g = torch.Generator().manual_seed(99)
    x = torch.randn(*SHAPE, generator=g, dtype=torch.float64)
    boxes = make_boxes(g, SHAPE[0], (SHAPE[2] / SCALE, SHAPE[3] / SCALE), count=6, dtype=torch.float64)
    grad = torch.randn(boxes.shape[0], SHAPE[1], *OUT, generator=g, dtype=torch.float64)
    return x, boxes, grad


def _roi_run(fn, x, boxes, grad, dtype, device, **kw):
    xr = x.detach().to(dtype).to(device).requires_grad_()
    out = fn(xr, boxes.to(dtype).to(device), OUT, spatial_scale=SCALE, **kw)
    out.backward(grad[:, : out.shape[1]].to(dtype).to(device))
    return out.detach(), xr.grad


ROI_CASES = [("roi_align", dict(sampling_ratio=2, aligned=False)), ("roi_align", dict(sampling_ratio=-1, aligned=True)),
             ("roi_pool", {}), ("ps_roi_align", dict(sampling_ratio=2)), ("ps_roi_pool", {})]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("op, kw", ROI_CASES, ids=[f"{op}-{i}" for i, (op, _) in enumerate(ROI_CASES)])
def test_roi_ops_match_torchvision_cuda(roi_data, op, kw, dtype):
    import torchvision

    x, boxes, grad = roi_data
    out, gin = _roi_run(getattr(tvm_dcn, op), x, boxes, grad, dtype, "cuda", **kw)
    ref, ref_gin = _roi_run(getattr(torchvision.ops, op), x, boxes, grad, torch.float64, "cuda", **kw)
    assert out.is_cuda and gin.is_cuda
    assert_matches(out, ref, dtype, what=f"{op} output")
    if op == "ps_roi_pool":
        # Our gradient is that of our forward (torchvision's backward clips bins differently, see
        # tvm_dcn.ps_roi_pool): compare with tvm-dcn's CPU kernels instead.
        _, ref_gin = _roi_run(tvm_dcn.ps_roi_pool, x, boxes, grad, torch.float64, "cpu")
    assert_matches(gin, ref_gin.to(gin.device), dtype, what=f"{op} grad input")


def test_deform_roi_pools_cuda_agree_with_cpu(roi_data):
    x, boxes, grad = roi_data
    g = torch.Generator().manual_seed(5)
    k = boxes.shape[0]
    offset = torch.randn(k, 2, *OUT, generator=g, dtype=torch.float64)
    mask = torch.rand(k, 1, *OUT, generator=g, dtype=torch.float64)

    def run(device):
        leaves = [t.to(device).requires_grad_() for t in (x, offset, mask)]
        out = tvm_dcn.deform_roi_pool(leaves[0], boxes.to(device), leaves[1], OUT, SCALE, 0, 0.1, mask=leaves[2])
        out.backward(grad.to(device))
        return [out.detach()] + [t.grad for t in leaves]

    for got, want in zip(run("cuda"), run("cpu")):
        assert_matches(got.cpu(), want, torch.float64, what="deform_roi_pool")

    rois = boxes[:, :5]
    trans = torch.randn(k, 2, 3, 3, generator=g, dtype=torch.float64)
    xs = torch.randn(2, 2 * 9, 9, 11, generator=g, dtype=torch.float64)
    grad_ps = torch.randn(k, 2, 3, 3, generator=g, dtype=torch.float64)

    def run_ps(device):
        leaves = [t.to(device).requires_grad_() for t in (xs, trans)]
        out = tvm_dcn.deform_psroi_pool(leaves[0], rois.to(device), leaves[1], SCALE, 2, 3, 3, 3, 2, 0.2)
        out.backward(grad_ps.to(device))
        return [out.detach()] + [t.grad for t in leaves]

    for got, want in zip(run_ps("cuda"), run_ps("cpu")):
        assert_matches(got.cpu(), want, torch.float64, what="deform_psroi_pool")


# --------------------------------------------------------------------------------------------
# Streams, graphs, devices


def _conv_case(device="cuda"):
    cfg = Config(batch=2, in_channels=8, height=12, width=12, out_channels=8, mask=True, padding=1)
    inputs = {k: v.to(device) if v is not None else None for k, v in make_inputs(cfg, torch.Generator().manual_seed(7)).items()}
    return cfg, inputs


def _conv(inputs, cfg):
    return tvm_dcn.deform_conv2d(inputs["input"], inputs["offset"], inputs["weight"], inputs["bias"],
                                 mask=inputs["mask"], **call_kwargs(cfg))


def test_kernels_run_on_the_current_stream():
    cfg, inputs = _conv_case()
    expected = _conv(inputs, cfg)
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(100_000_000)  # keeps the side stream busy for a while
        late = {k: (v * 1 if v is not None else None) for k, v in inputs.items()}  # ready only after the sleep
        out = _conv(late, cfg)
    # Had the kernels gone to another stream, they would have read ``late`` before it was written.
    side.synchronize()
    torch.testing.assert_close(out, expected)


def test_kernels_are_captured_by_cuda_graphs():
    cfg, inputs = _conv_case()
    static = {k: (v.clone() if v is not None else None) for k, v in inputs.items()}
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (loads the kernels) on a side stream, as torch recommends
        for _ in range(2):
            _conv(static, cfg)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = _conv(static, cfg)
    g = torch.Generator().manual_seed(11)
    static["input"].copy_(torch.randn(static["input"].shape, generator=g).cuda())
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(captured, _conv(static, cfg))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_device_index_is_respected():
    cfg, inputs = _conv_case("cuda:1")
    torch.cuda.set_device(0)
    out = _conv(inputs, cfg)
    assert out.device == torch.device("cuda:1")
    assert torch.cuda.current_device() == 0
    cpu = _conv({k: (v.cpu() if v is not None else None) for k, v in inputs.items()}, cfg)
    assert_matches(out.cpu(), cpu.double(), torch.float32, what="cuda:1 output")
    with pytest.raises(ValueError, match="device"):
        _conv({**inputs, "weight": inputs["weight"].to("cuda:0")}, cfg)


def test_mixed_devices_are_refused_by_name():
    cfg, inputs = _conv_case()
    with pytest.raises(ValueError, match="weight is on cpu"):
        _conv({**inputs, "weight": inputs["weight"].cpu()}, cfg)
    x = torch.randn(1, 4, 8, 8, device="cuda")
    with pytest.raises(ValueError, match="boxes"):
        tvm_dcn.roi_align(x, torch.tensor([[0, 1.0, 1.0, 5.0, 5.0]]), 2)
    with pytest.raises(ValueError, match="boxes\\[0\\]"):
        tvm_dcn.roi_align(x, [torch.tensor([[1.0, 1.0, 5.0, 5.0]])], 2)


def test_cuda_kernels_use_the_device_target():
    from tvm_dcn.functional import device_target

    target = device_target(torch.device("cuda", 0))
    major, minor = torch.cuda.get_device_capability(0)
    assert str(target.attrs["arch"]) == f"sm_{major}{minor}"
    assert tvm_dcn.target_tag(target).startswith(f"cuda-sm_{major}{minor}")
