"""CUDA kernels without a GPU: scatter formulations, schedules checked by emulation on the CPU,
static bounds checks, builds for several architectures (with nvcc: skipped without it), register
and shared-memory budgets, target tags, and the errors of a machine that cannot run CUDA."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

import tvm_dcn  # noqa: F401  (before torch)
import torch  # noqa: E402
import tvm  # noqa: E402

import cuda_emulation as emu  # noqa: E402
from tvm_dcn import cuda, kernel, ops  # noqa: E402
from tvm_dcn.ops.deform_conv import backward_data_workload, backward_weight_workload, forward_workload  # noqa: E402
from tvm_dcn.ops.deform_roi_pool import deform_psroi_pool_workload, deform_roi_pool_workload  # noqa: E402
from tvm_dcn.ops.roi_align import ps_roi_align_workload, roi_align_workload, roi_pool_workload  # noqa: E402
from tvm_dcn.target import cuda_model, model_of_device_name, target_tag  # noqa: E402
from tvm_dcn.ops import Workload  # noqa: E402

SM90 = {"kind": "cuda", "arch": "sm_90"}
needs_nvcc = pytest.mark.skipif(cuda.nvcc_path() is None, reason="nvcc not found")

CONV = dict(batch=2, in_channels=8, height=9, width=7, out_channels=6, kernel_size=(3, 3), padding=(1, 1), groups=2,
            offset_groups=2, with_mask=True, with_bias=True)
ROI = dict(batch=2, channels=8, height=10, width=12, num_rois=5, output_size=(3, 3))
PS_ROI = dict(ROI, channels=18)
DPS_ROI = dict(batch=2, channels=18, height=10, width=12, num_rois=5, output_dim=2, group_size=3, pooled_size=3,
               sample_per_part=2)


def conv_workloads(**overrides) -> dict[str, Workload]:
    fwd = forward_workload(**{**CONV, **overrides})
    return {"forward": fwd,
            "backward_data": backward_data_workload(fwd, need_input=True, need_sampling=True),
            "backward_input": backward_data_workload(fwd, need_input=True, need_sampling=False),
            "backward_weight": backward_weight_workload(fwd, need_weight=True, need_bias=fwd["with_bias"])}


def roi_workloads() -> dict[str, Workload]:
    return {
        "roi_align": roi_align_workload(**ROI, sampling_ratio=2),
        "roi_align_backward": roi_align_workload(**ROI, sampling_ratio=-1, backward=True),
        "ps_roi_align": ps_roi_align_workload(**PS_ROI, sampling_ratio=2),
        "ps_roi_align_backward": ps_roi_align_workload(**PS_ROI, sampling_ratio=2, backward=True),
        "roi_pool": roi_pool_workload(**ROI),
        "roi_pool_backward": roi_pool_workload(**ROI, backward=True),
        "ps_roi_pool": roi_pool_workload(**PS_ROI, position_sensitive=True),
        "ps_roi_pool_backward": roi_pool_workload(**PS_ROI, position_sensitive=True, backward=True),
        "deform_roi_pool": deform_roi_pool_workload(**ROI, with_mask=True),
        "deform_roi_pool_backward": deform_roi_pool_workload(**ROI, with_mask=True, backward="input"),
        "deform_roi_pool_params": deform_roi_pool_workload(**ROI, with_mask=True, backward="params"),
        "deform_psroi_pool": deform_psroi_pool_workload(**DPS_ROI),
        "deform_psroi_pool_backward": deform_psroi_pool_workload(**DPS_ROI, backward="input"),
        "deform_psroi_pool_params": deform_psroi_pool_workload(**DPS_ROI, backward="params"),
    }


ALL = {**conv_workloads(), **roi_workloads()}
# Extra convolution shapes: real tiles (16 x 16 threads), odd sizes, stride/dilation, depthwise, float64.
CONV_SHAPES = {
    "c32-14x14-o64": dict(batch=1, in_channels=32, height=14, width=14, out_channels=64, groups=1, offset_groups=1,
                          with_bias=False),
    "strided-dilated": dict(batch=3, in_channels=12, height=11, width=13, out_channels=20, stride=(2, 2),
                            padding=(2, 1), dilation=(2, 1), groups=2, offset_groups=3, with_mask=False),
    "f64-28x28": dict(batch=1, in_channels=16, height=28, width=28, out_channels=16, groups=1, offset_groups=1,
                      dtype="float64"),
    "depthwise-1x3": dict(batch=2, in_channels=6, height=5, width=9, out_channels=6, kernel_size=(1, 3), padding=(0, 0),
                          groups=6, offset_groups=6, with_mask=False),
    "k2x2-prime": dict(batch=1, in_channels=5, height=7, width=7, out_channels=7, kernel_size=(2, 2), padding=(0, 0),
                       groups=1, offset_groups=1),
}


# --------------------------------------------------------------------------------------------
# Scatter formulations and workloads


def test_cuda_workloads_use_the_atomic_scatter_and_cpu_workloads_do_not_change():
    for name, wl in ALL.items():
        gpu = ops.for_target(wl, "cuda")
        has_scatter = name in ("backward_data", "backward_input") or name.endswith("_backward")
        assert (gpu.get("scatter") == "atomic") == has_scatter, name
        assert ops.for_target(wl, "llvm") is wl
        assert ops.for_target(gpu, "cuda") == gpu
        cpu_func = ops.primfunc(wl)
        assert emu.atomic_adds(cpu_func) == 0 and not emu.thread_bindings(cpu_func), name
        if has_scatter:
            assert emu.atomic_adds(ops.primfunc(gpu)) > 0, name


def test_atomic_scatter_is_refused_on_the_cpu_and_validated():
    gpu = ops.for_target(ALL["backward_data"], "cuda")
    with pytest.raises(ValueError, match="scatter"):
        tvm_dcn.compile(gpu)
    bad = Workload.make(gpu.op, gpu.dtype, **{**dict(gpu.params), "scatter": "planes"})
    with pytest.raises(ValueError, match="scatter"):
        ops.primfunc(bad)
    with pytest.raises(ValueError, match="scatter"):
        ops.for_target(Workload.make("deform_conv2d", "float32", **{**dict(ALL["forward"].params), "scatter": "atomic"}),
                       "cuda")


# --------------------------------------------------------------------------------------------
# Schedules: emulation on the CPU against the CPU kernels


def _emulate_and_compare(wl: Workload, schedule=None, seed=0):
    source, mod = kernel.scheduled_module(wl, SM90, schedule=schedule)
    assert emu.thread_bindings(mod["main"]) >= {"blockIdx.x", "threadIdx.x"}
    assert not emu.unbound_loops(mod["main"])
    emu.check_bounds(mod)
    emulated = tvm.compile(emu.on_cpu(mod), target=tvm_dcn.host_target())
    forward = None
    if wl.op == "roi_pool_backward":
        forward = tvm_dcn.compile(Workload.make("roi_pool", wl.dtype, **dict(wl.params)))
    args = emu.random_arguments(wl, torch.Generator().manual_seed(seed), forward)
    expected = [a.clone() for a in args]
    emulated["main"](*args)
    tvm_dcn.compile(wl)(*expected)
    outputs = ops.build(wl).num_outputs
    for got, want in zip(args[-outputs:], expected[-outputs:]):
        assert not torch.isnan(got).any()
        tol = 1e-5 if wl.dtype == "float32" else 1e-12
        torch.testing.assert_close(got, want, rtol=tol, atol=tol * max(1.0, want.abs().max().item()))
    return source, mod


@pytest.mark.parametrize("name", sorted(ALL))
def test_hand_schedule_emulated_matches_cpu_kernel(name):
    source, _ = _emulate_and_compare(ALL[name])
    assert source == "hand"


@pytest.mark.parametrize("shape", sorted(CONV_SHAPES))
def test_conv_schedules_emulated_on_other_shapes(shape):
    for wl in conv_workloads(**CONV_SHAPES[shape]).values():
        _emulate_and_compare(wl, seed=1)


# dlight's fallback binds one thread per output element with no tiling: emulated on the CPU it
# runs the whole reduction per element, so it gets a smaller convolution (still grouped).
DLIGHT_CONV = conv_workloads(batch=1, in_channels=4, height=5, width=4, out_channels=4)


@pytest.mark.parametrize("name", ["forward", "backward_data", "roi_pool_backward"])
def test_dlight_fallback_emulated_matches_cpu_kernel(name):
    source, _ = _emulate_and_compare(DLIGHT_CONV.get(name) or ALL[name], schedule="default")
    assert source == "default"


def test_forward_gemm_is_tiled_through_shared_memory_with_vector_loads():
    _, mod = kernel.scheduled_module(conv_workloads(**CONV_SHAPES["c32-14x14-o64"])["forward"], SM90)
    text = mod.script()
    assert 'scope="shared"' in text and "T.vectorized(4)" in text and 'scope="local"' in text
    built = tvm_dcn.compile(conv_workloads(**CONV_SHAPES["c32-14x14-o64"])["forward"], SM90, use_disk_cache=False)
    cu = built.source("cu")
    assert "__shared__" in cu and "float4" in cu and "__syncthreads()" in cu


def test_backward_scatter_uses_atomics_in_cuda_source():
    built = tvm_dcn.compile(ALL["backward_input"], SM90, use_disk_cache=False)
    assert built.workload.get("scatter") == "atomic"
    assert "atomicAdd" in built.source("cu")


# --------------------------------------------------------------------------------------------
# Builds (nvcc)


@needs_nvcc
@pytest.mark.parametrize("arch", ["sm_75", "sm_80", "sm_90", "sm_120"])
def test_builds_for_architectures(arch):
    for name in ("forward", "backward_data", "backward_weight", "roi_align_backward"):
        built = tvm_dcn.compile(ALL[name], {"kind": "cuda", "arch": arch}, use_disk_cache=False)
        binary, fmt = built.cuda_binary
        assert fmt == "fatbin" and len(binary) > 1000
        assert built.target_tag == f"cuda-{arch}"


def _resnet_layer_kernels():
    """The three kernels of a ResNet-50 c4 DCNv2 layer (256 channels, 14x14) and of c3's stride-2 layer."""
    kernels = {}
    for label, size, stride in (("c4-14x14", 14, 1), ("c3-56x56-s2", 56, 2)):
        channels = 256 if label.startswith("c4") else 128
        fwd = forward_workload(batch=1, in_channels=channels, height=size, width=size, out_channels=channels,
                               kernel_size=(3, 3), stride=(stride, stride), padding=(1, 1), with_mask=True)
        kernels[f"{label}-forward"] = fwd
        kernels[f"{label}-backward_data"] = backward_data_workload(fwd, need_input=True, need_sampling=True)
        kernels[f"{label}-backward_weight"] = backward_weight_workload(fwd, need_weight=True, need_bias=False)
    return kernels


@needs_nvcc
def test_resource_usage_of_real_layers_fits_sm90():
    """No register spills or stack, shared memory far below 48 KiB, and the GEMM kernels do tile
    through shared memory (the numbers are in docs/cuda.md)."""
    for name, wl in _resnet_layer_kernels().items():
        usage = tvm_dcn.compile(wl, SM90, use_disk_cache=False).resource_usage()
        assert usage, name
        for kernel_name, r in usage.items():
            assert r.spill_store_bytes == 0 and r.spill_load_bytes == 0 and r.stack_bytes == 0, (name, kernel_name, r)
            assert r.registers <= 128 and r.shared_bytes <= 16 * 1024, (name, kernel_name, r)
        assert max(r.shared_bytes for r in usage.values()) >= 4096, (name, usage)


def test_compile_error_names_the_missing_compiler(monkeypatch):
    monkeypatch.setattr(cuda, "nvcc_path", lambda: None)
    monkeypatch.setattr(cuda, "nvrtc_available", lambda: False)
    assert cuda.compiler() is None
    with pytest.raises(cuda.CudaBuildError, match="NVRTC.*nvcc"):
        cuda.configure()
    with pytest.raises(cuda.CudaBuildError):
        cuda.compile_source("extern \"C\" __global__ void k() {}", "sm_90")
    with pytest.raises(ValueError, match="arch"):
        cuda.arch_number("90")


# --------------------------------------------------------------------------------------------
# Kernels this machine cannot run


@pytest.mark.skipif(kernel.runtime_can_run(SM90), reason="TVM's CUDA runtime is loaded here")
def test_cuda_kernel_without_runtime_is_inspectable_but_not_callable():
    built = tvm_dcn.compile(ALL["forward"], SM90)
    assert not built.runnable and built.library_path is None
    assert "__global__" in built.source("cu")
    with pytest.raises(RuntimeError, match="runtime cannot run cuda"):
        built(torch.zeros(1))
    with pytest.raises(ValueError, match="no CUDA module"):
        tvm_dcn.compile(ALL["forward"]).source("cu")


def test_device_argument_errors():
    from tvm_dcn.kernel import _device_index

    class FakeDevice:
        def __init__(self, type_, index):
            self.type, self.index = type_, index

    class FakeTensor:
        def __init__(self, device):
            self.device = device

        def data_ptr(self):
            return 0

    args = [FakeTensor(FakeDevice("cuda", 0)), FakeTensor(FakeDevice("cuda", 1))]
    with pytest.raises(ValueError, match="argument 1 .* cuda:1|argument 1"):
        _device_index(args, "cuda", "deform_conv2d")
    with pytest.raises(ValueError, match="argument 0"):
        _device_index([torch.zeros(1)], "cuda", "deform_conv2d")
    assert _device_index([FakeTensor(FakeDevice("cuda", 1))] * 2, "cuda", "op") == 1


def test_bridge_refuses_other_devices_by_name():
    x = torch.zeros(1, 2, 4, 4, device="meta")
    with pytest.raises(ValueError, match="input"):
        tvm_dcn.roi_align(x, torch.zeros(0, 5, device="meta"), 2)
    from tvm_dcn.functional import device_target

    assert device_target(torch.device("cpu")) is None
    with pytest.raises(ValueError, match="offset is on meta"):
        device_target(torch.device("meta"), "offset")


# --------------------------------------------------------------------------------------------
# Target tags


def test_cuda_target_tags_name_arch_and_model():
    assert target_tag(SM90) == "cuda-sm_90"
    assert target_tag({"kind": "cuda", "arch": "sm_90", "model": "H100"}) == "cuda-sm_90-h100"
    assert target_tag("nvidia/nvidia-h100") == "cuda-sm_90a-h100"
    assert target_tag(tvm.target.Target("nvidia/nvidia-a100")) == "cuda-sm_80-a100"
    assert cuda_model(SM90) is None
    assert model_of_device_name("NVIDIA H100 80GB HBM3") == "h100"
    assert model_of_device_name("NVIDIA A100-SXM4-80GB") == "a100"
    assert model_of_device_name("NVIDIA GeForce RTX 4090") == "geforce-rtx-4090"
    assert model_of_device_name("NVIDIA A10") == "a10"
    assert model_of_device_name("Some Future GPU") is None


# --------------------------------------------------------------------------------------------
# Precompiled binaries (a GPU host without a compiler)


@needs_nvcc
def test_precompiled_binaries_answer_tvm_compiles(tmp_path):
    built = tvm_dcn.compile(ALL["forward"], SM90, use_disk_cache=False)
    binary, fmt = built.cuda_binary
    cuda.save_binary(tmp_path / "bin", built.source("cu"), binary, fmt)
    script = textwrap.dedent(f"""
        import json, sys
        import tvm_ffi
        from tvm_dcn import cuda
        cuda.use_precompiled({str(tmp_path / "bin")!r}, allow_compile=False)
        callback = tvm_ffi.get_global_func("tvm_callback_cuda_compile")
        source = open({str(tmp_path / "k.cu")!r}).read()
        out = {{"same": bytes(callback(source)) == open({str(tmp_path / "k.bin")!r}, "rb").read()}}
        try:
            callback("// another kernel")
        except Exception as err:
            out["error"] = str(err)
        print(json.dumps(out))
    """)
    (tmp_path / "k.cu").write_text(built.source("cu"))
    (tmp_path / "k.bin").write_bytes(binary)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["same"] is True
    assert "no precompiled binary" in result["error"]


# --------------------------------------------------------------------------------------------
# Half precision: the forward of bfloat16 and float16 tensors (float32 arithmetic)

HALF_FORWARD = {dtype: forward_workload(batch=2, in_channels=32, height=9, width=7, out_channels=24,
                                        kernel_size=(3, 3), padding=(1, 1), offset_groups=2, with_mask=True,
                                        with_bias=True, dtype=dtype)
                for dtype in ("bfloat16", "float16")}


@pytest.mark.parametrize("dtype", sorted(HALF_FORWARD))
def test_half_forward_emulated_matches_cpu_kernel(dtype):
    """The CUDA schedule of a half forward (half tensors in and out, columns and accumulators in
    float32) computes what the CPU's float32-arithmetic kernel computes (built for a plain x86-64
    target: no AVX512-BF16 dot product), within one rounding of the half output."""
    wl = HALF_FORWARD[dtype]
    source, mod = kernel.scheduled_module(wl, SM90)
    assert source == "hand"
    assert not emu.unbound_loops(mod["main"])
    emulated = tvm.compile(emu.on_cpu(mod), target=tvm_dcn.host_target())
    args = emu.random_arguments(wl, torch.Generator().manual_seed(3))
    expected = [a.clone() for a in args]
    emulated["main"](*args)
    tvm_dcn.compile(wl, {"kind": "llvm"}, use_disk_cache=False)(*expected)
    got, want = args[-1].double(), expected[-1].double()
    assert args[-1].dtype == getattr(torch, dtype) and not torch.isnan(got).any()
    ulp = 2.0 ** -7 if dtype == "bfloat16" else 2.0 ** -10
    torch.testing.assert_close(got, want, rtol=ulp, atol=1e-5 * want.abs().max().item())


@needs_nvcc
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_half_forward_builds_for_ampere_and_hopper(arch):
    for wl in HALF_FORWARD.values():
        built = tvm_dcn.compile(wl, {"kind": "cuda", "arch": arch}, use_disk_cache=False)
        binary, fmt = built.cuda_binary
        assert fmt == "fatbin" and len(binary) > 1000
        cu = built.source("cu")
        assert ("nv_bfloat16" if wl.dtype == "bfloat16" else "half") in cu
