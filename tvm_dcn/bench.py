"""``tvm-dcn bench``: side-by-side CPU timing of tvm-dcn kernels against the baselines.

For every distinct deformable-conv layer (and RoI Align head) of a workload set, these candidates
run interleaved in one process (so machine noise hits them alike), each through its
PyTorch entry point:

* ``tvm-dcn default`` / ``tvm-dcn hand`` / ``tvm-dcn tuned``: :func:`tvm_dcn.deform_conv2d` with
  every kernel forced to that schedule source (``tuned`` is skipped where a kernel has no record;
  the source is set around the timed call, so the time is the user's call alone);
* ``torchvision``: ``torchvision.ops.deform_conv2d`` (``roi_align``);
* ``dense conv2d``: ``torch.nn.functional.conv2d`` of the same shape (oneDNN here): the floor a
  deformable convolution, which also samples its input, cannot beat;
* the peers a user would pick instead, forward only (neither has a backward; in
  ``forward+backward`` they are absent): ``onnxruntime``, ONNX Runtime's CPU ``DeformConv``
  (ONNX opset 19) in a one-node model built in memory (:class:`OnnxRuntimeDeformConv`), and
  ``openvino``, OpenVINO's ``DeformableConvolution`` (opset 8, ``bilinear_interpolation_pad=True``,
  which samples as torchvision does) plus an ``Add`` of the bias, compiled for the CPU at float32
  inference precision (:class:`OpenVINODeformConv`). Each is checked against torchvision on the
  layer before it is timed (a peer off by more than :data:`PEER_TOLERANCE` is reported and not
  timed), and left out with the reason printed when its package cannot be imported
  (``pip install 'tvm-dcn[bench]'`` installs both).

Thread pools. Up to four pools share the cores here, and an idle pool that spins takes a core from
whichever runs next. Each is made to sleep when idle (TVM's after ~40 us) and sized to PyTorch's
thread count: TVM's workers with ``TVM_THREAD_POOL_SPIN_COUNT=100`` and PyTorch's OpenMP workers with
``OMP_WAIT_POLICY=PASSIVE`` (both set by ``import tvm_dcn``, which ``tvm-dcn`` runs before
torch loads); ONNX Runtime with ``session.intra_op.allow_spinning`` (and ``inter_op``) ``"0"``,
``torch.get_num_threads()`` intra-op threads, one inter-op thread and sequential execution;
OpenVINO with ``INFERENCE_NUM_THREADS`` = the same count, one stream and no CPU pinning (so its
workers do not claim cores the other pools use; its TBB workers have no spin setting).

Each repeat runs every candidate once, in the orders of a balanced (Williams) design, so that
each candidate directly follows each other one equally often (and, first in a repeat, the
untimed dense convolution run between repeats), and every timed
deformable-conv call right after the layer's offset convolution (untimed), as in a DCN network:
what ran just before changes a kernel's time by up to ~0.7 ms here (a core left idle, as during
torchvision's single-threaded sampling, is slow to come back on this shared host). The layers'
repeats are interleaved too (repeat i of every layer before repeat i + 1 of any), so that a burst
of load on the host, which can last a few seconds, hits every layer alike. The unscheduled
``default`` kernels (100-400 ms, mostly on one core) run in a phase of their own afterwards.

RoI Align cases time 512 random boxes (16-400 px) of the workload on its feature map.

Half precision (``dtype="bfloat16"`` / ``"float16"``, ``--dtype``): the tvm-dcn rows and dense
conv2d take the layer's tensors in that dtype (tvm-dcn's CPU forward with its half kernels, the
bfloat16 gradients with theirs, float16 ones through the float32 kernels: ``functional``),
torchvision and the peers keep them in float32 (torchvision has no bfloat16 deformable
convolution on the CPU, the peers no half-precision one), and the reported error is against that
float32 forward. Results then go to ``bench-<dtype>.{json,md,png}``.

Two modes per layer: ``forward`` (no autograd) and ``forward+backward`` (gradients of input,
offset, mask and weight, as in training). ``batches`` (``--batch 1 8``) times every
deformable-conv layer at each of those batch sizes (a row per layer and batch; RoI Align heads
keep their workload's). The median of the repeats is reported, with the speed-up over
torchvision and the geometric mean over the set (and over each batch size's rows). Results go to
the terminal and to ``<output-dir>/<target-tag>/bench.{json,md,png}``.
"""
from __future__ import annotations

import functools
import json
import math
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from . import functional as _functional
from .kernel import forced_schedule
from .ops.deform_conv import FORWARD, ConvGeometry
from .target import host_target, target_tag
from .ops.workload import Workload, unique_with_counts
from .workloads import load

SCHEDULES = ("default", "hand", "tuned")
MODES = ("forward", "forward+backward")
BASELINES = ("torchvision", "dense conv2d")
PEERS = ("onnxruntime", "openvino")
# The dtypes of the tvm-dcn and dense conv2d rows (the layers' workloads are float32).
DTYPES = ("float32", "bfloat16", "float16")
# Largest max abs difference from torchvision's forward accepted from a peer, per unit of the
# output's largest magnitude: on resnet50-dcn-224 both peers (and tvm-dcn) are within 5e-6 of it
# (float32 sums of up to 4608 products in another order); a wrong layout or sampling rule is off by O(1).
PEER_TOLERANCE = 1e-3


@dataclass
class CaseResult:
    """Median milliseconds per candidate for one layer and mode, and each candidate's max abs error
    against torchvision (forward output, or the input gradient)."""

    layer: str
    mode: str
    count: int
    times_ms: dict = field(default_factory=dict)
    max_abs_err: dict = field(default_factory=dict)
    batch: Optional[int] = None  # of a deformable-conv layer (None for a RoI Align head)
    not_timed: dict = field(default_factory=dict)  # candidate -> why it was left out of this case


def layer_name(wl: Workload) -> str:
    geo = ConvGeometry(wl)
    kind = "v2" if geo.with_mask else "v1"
    return (f"dcn{kind} b{geo.batch} {geo.in_channels}x{geo.height}x{geo.width}->{geo.out_channels} "
            f"k{geo.kernel_h}x{geo.kernel_w} s{geo.stride_h}")


def layers_of(workloads: list[Workload], batches: Optional[Sequence[int]] = None) -> list[tuple[Workload, int]]:
    """The distinct forward deformable-conv and RoI Align workloads of a set, with their counts;
    with ``batches``, each deformable-conv layer once per batch size (all layers at the first
    size, then all at the next, ...), the RoI Align heads once at the end."""
    layers = [(wl, n) for wl, n in unique_with_counts(workloads) if wl.op in (FORWARD, "roi_align")]
    if batches is None:
        return layers
    convs: dict[Workload, int] = {}
    for batch in check_batches(batches):
        for wl, n in layers:
            if wl.op == FORWARD:
                resized = with_batch(wl, batch)
                convs[resized] = convs.get(resized, 0) + n
    return list(convs.items()) + [(wl, n) for wl, n in layers if wl.op != FORWARD]


def check_batches(batches: Sequence[int]) -> tuple[int, ...]:
    """``batches`` as a tuple of distinct positive ints, in order; ValueError naming it otherwise."""
    if isinstance(batches, (int, str)) or not batches:
        raise ValueError(f"batches must be a non-empty sequence of batch sizes, got {batches!r}")
    if not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in batches):
        raise ValueError(f"batches must be positive ints, got {list(batches)!r}")
    return tuple(dict.fromkeys(batches))


def with_batch(wl: Workload, batch: int) -> Workload:
    """The deformable-conv workload ``wl`` at batch size ``batch``."""
    return Workload.make(wl.op, wl.dtype, **{**dict(wl.params), "batch": batch})


def _inputs(wl: Workload, generator: torch.Generator):
    geo = ConvGeometry(wl)
    dtype = getattr(torch, geo.dtype)
    taps, og = geo.taps, geo.offset_groups
    x = torch.randn(geo.batch, geo.in_channels, geo.height, geo.width, generator=generator, dtype=dtype)
    w = torch.randn(geo.out_channels, geo.group_in_channels, geo.kernel_h, geo.kernel_w, generator=generator,
                    dtype=dtype) / math.sqrt(geo.reduction)
    offset = torch.randn(geo.batch, 2 * og * taps, geo.out_h, geo.out_w, generator=generator, dtype=dtype) * 2
    mask = (torch.rand(geo.batch, og * taps, geo.out_h, geo.out_w, generator=generator, dtype=dtype)
            if geo.with_mask else None)
    bias = torch.randn(geo.out_channels, generator=generator, dtype=dtype) if geo.with_bias else None
    return dict(input=x, offset=offset, weight=w, bias=bias, mask=mask)


def _roi_inputs(wl: Workload, generator: torch.Generator, spatial_scale: float = 1 / 16):
    dtype = getattr(torch, wl.dtype)
    boxes_n = wl["num_rois"]
    x = torch.randn(wl["batch"], wl["channels"], wl["height"], wl["width"], generator=generator, dtype=dtype)
    image = torch.tensor([wl["width"] / spatial_scale, wl["height"] / spatial_scale], dtype=torch.float64)
    xy = torch.rand(boxes_n, 2, generator=generator, dtype=torch.float64) * image
    wh = torch.rand(boxes_n, 2, generator=generator, dtype=torch.float64) * 384 + 16
    boxes = torch.cat([torch.zeros(boxes_n, 1, dtype=torch.float64), xy, xy + wh], 1).to(dtype)
    return x, boxes, spatial_scale


def _conv_kwargs(wl: Workload) -> dict:
    return dict(stride=wl["stride"], padding=wl["padding"], dilation=wl["dilation"])


def _runner(leaves: dict, backward: bool):
    """Wraps a candidate: under no_grad (forward), or forward then backward, returning the output
    (forward) or the gradient of ``leaves["input"]``."""
    grad_out = None

    def run(fn):
        def call():
            nonlocal grad_out
            if not backward:
                with torch.no_grad():
                    return fn()
            for t in leaves.values():
                if isinstance(t, torch.Tensor) and t.requires_grad:
                    t.grad = None
            out = fn()
            if grad_out is None:
                # Drawn in float32 for every dtype (torch draws other values in half precision).
                grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.dtype)
            out.backward(grad_out)
            return leaves["input"].grad
        return call
    return run


def _schedule_of(name: str) -> Optional[str]:
    """The schedule source a candidate forces on its kernels ("tvm-dcn hand" -> "hand"), else None.
    Forced around the timed call, not inside it: the user's call is what is timed."""
    return name[len("tvm-dcn "):] if name.startswith("tvm-dcn ") else None


def _in_dtype(leaves: dict, dtype: str, backward: bool) -> dict:
    """Copies of the leaf tensors ``leaves`` in ``dtype`` (the same tensors for their own dtype)."""
    if all(v is None or str(v.dtype) == f"torch.{dtype}" for v in leaves.values()):
        return leaves
    return {k: None if v is None else v.detach().to(getattr(torch, dtype)).requires_grad_(backward)
            for k, v in leaves.items()}


def _conv_candidates(wl: Workload, mode: str, schedules, peers=(),
                     dtype: str = "float32") -> tuple[dict[str, Callable[[], torch.Tensor]], Callable]:
    """The timed candidates of a deform_conv2d layer, and the untimed call to run before each.
    ``peers`` (names in :data:`PEERS` whose packages import) join in forward mode only. tvm-dcn
    and dense conv2d run in ``dtype``, torchvision and the peers in the workload's dtype."""
    import torchvision  # noqa: PLC0415

    kw = _conv_kwargs(wl)
    backward = mode == "forward+backward"
    leaves = {k: (v.requires_grad_(backward) if v is not None else None)
              for k, v in _inputs(wl, torch.Generator().manual_seed(0)).items()}
    run = _runner(leaves, backward)
    x, off, w, b, m = (leaves[k] for k in ("input", "offset", "weight", "bias", "mask"))
    own = _in_dtype(leaves, dtype, backward)
    run_own = _runner(own, backward)
    xd, offd, wd, bd, md = (own[k] for k in ("input", "offset", "weight", "bias", "mask"))
    out = {f"tvm-dcn {s}": run_own(lambda: _functional.deform_conv2d(xd, offd, wd, bd, mask=md, **kw))
           for s in schedules}
    if not backward:
        for name in peers:
            try:
                peer = PEER_CLASSES[name](wl, w, b)
            except Exception as err:  # noqa: BLE001 - e.g. a release without this operator: reported, not timed
                out[name] = _unavailable(f"{type(err).__name__}: {err}".splitlines()[0])
                continue
            out[name] = run(lambda peer=peer: peer(x, off, m))
    out["torchvision"] = run(lambda: torchvision.ops.deform_conv2d(x, off, w, b, mask=m, **kw))
    groups = wl["in_channels"] // ConvGeometry(wl).group_in_channels
    out["dense conv2d"] = run_own(lambda: torch.nn.functional.conv2d(xd, wd, bd, groups=groups, **kw))
    # Every timed call follows the same untimed work, the layer's offset convolution on both
    # cores, as in a network: a core left idle (torchvision samples on one) costs the next kernel
    # ~0.3-0.7 ms here on this shared host (its vCPU descheduled, its caches reused meanwhile).
    return out, _offset_conv(wl, xd)


def _offset_conv(wl: Workload, x: torch.Tensor) -> Callable[[], torch.Tensor]:
    """The convolution that predicts the layer's offsets (and mask) from its input ``x``, as it
    runs right before the deformable layer in a DCN network (untimed, before every timed call)."""
    geo = ConvGeometry(wl)
    channels = (3 if geo.with_mask else 2) * geo.offset_groups * geo.taps
    w = torch.randn(channels, geo.in_channels, geo.kernel_h, geo.kernel_w, generator=torch.Generator().manual_seed(2),
                    dtype=x.dtype) / math.sqrt(geo.in_channels * geo.taps)
    x = x.detach()
    kw = _conv_kwargs(wl)

    def call():
        with torch.no_grad():
            return torch.nn.functional.conv2d(x, w, **kw)
    return call


def _peer_threads() -> int:
    # PyTorch's thread count, which TVM_NUM_THREADS also follows (tvm_dcn/__init__.py).
    return torch.get_num_threads()


class OnnxRuntimeDeformConv:
    """ONNX Runtime's CPU ``DeformConv`` (ONNX opset 19) for one deformable-conv layer ``wl``.

    A one-node ONNX model built in memory with inputs ``X`` (N, C, H, W), ``W`` (O, C/groups, kH,
    kW), ``offset`` (N, 2 * offset_groups * kH * kW, oH, oW), ``B`` (O,) and ``mask``
    (N, offset_groups * kH * kW, oH, oW) (``B`` and ``mask`` only where the layer has them), run
    in an ``InferenceSession`` on the CPU with ``threads`` intra-op threads (default PyTorch's),
    one inter-op thread and idle threads that sleep rather than spin. ``weight`` and ``bias`` are
    fed as inputs on every call (as initializers they timed the same here, 2.01 against 1.92 ms at
    256x14x14, side by side). The call takes and returns torch tensors in torchvision's layouts
    (which are ONNX's): ``peer(input, offset, mask)``.
    """

    def __init__(self, wl: Workload, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                 threads: Optional[int] = None):
        import onnxruntime  # noqa: PLC0415

        self.model = onnx_deform_conv_model(wl)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads or _peer_threads()
        options.inter_op_num_threads = 1
        options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        self.session = onnxruntime.InferenceSession(self.model.SerializeToString(), options,
                                                    providers=["CPUExecutionProvider"])
        self.constants = {"W": weight.detach().numpy()}
        if bias is not None:
            self.constants["B"] = bias.detach().numpy()

    def __call__(self, input: torch.Tensor, offset: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        feed = {"X": input.numpy(), "offset": offset.numpy(), **self.constants}
        if mask is not None:
            feed["mask"] = mask.numpy()
        return torch.from_numpy(self.session.run(None, feed)[0])


def onnx_deform_conv_model(wl: Workload):
    """The ``onnx.ModelProto`` of one ``DeformConv`` node (opset 19) computing layer ``wl``."""
    from onnx import TensorProto, helper  # noqa: PLC0415

    geo = ConvGeometry(wl)
    if geo.dtype != "float32":
        raise ValueError(f"the onnxruntime peer runs float32 layers, got dtype {geo.dtype!r}")

    def value(name, shape):
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape))

    inputs = [value("X", (geo.batch, geo.in_channels, geo.height, geo.width)),
              value("W", (geo.out_channels, geo.group_in_channels, geo.kernel_h, geo.kernel_w)),
              value("offset", (geo.batch, 2 * geo.offset_groups * geo.taps, geo.out_h, geo.out_w))]
    names = ["X", "W", "offset", "", ""]  # "" leaves an optional input out
    if geo.with_bias:
        inputs.append(value("B", (geo.out_channels,)))
        names[3] = "B"
    if geo.with_mask:
        inputs.append(value("mask", (geo.batch, geo.offset_groups * geo.taps, geo.out_h, geo.out_w)))
        names[4] = "mask"
    while names[-1] == "":
        names.pop()
    node = helper.make_node(
        "DeformConv", names, ["Y"], dilations=[geo.dil_h, geo.dil_w], group=geo.groups,
        kernel_shape=[geo.kernel_h, geo.kernel_w], offset_group=geo.offset_groups,
        pads=[geo.pad_h, geo.pad_w, geo.pad_h, geo.pad_w], strides=[geo.stride_h, geo.stride_w])
    graph = helper.make_graph([node], "deform_conv2d", inputs,
                              [value("Y", (geo.batch, geo.out_channels, geo.out_h, geo.out_w))])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])


def _openvino_opset8():
    """OpenVINO's opset-8 node factories (``openvino.opset8`` since 2024, ``openvino.runtime.opset8``
    before; openvino.runtime is gone in 2026)."""
    try:
        import openvino.opset8 as opset8  # noqa: PLC0415
    except ImportError:
        import openvino.runtime.opset8 as opset8  # noqa: PLC0415
    return opset8


@functools.lru_cache(maxsize=None)
def _openvino_core():
    # One Core, which holds the loaded CPU plugin, for all layers of the process.
    import openvino  # noqa: PLC0415

    return openvino.Core()


class OpenVINODeformConv:
    """OpenVINO's CPU ``DeformableConvolution`` (opset 8) for one deformable-conv layer ``wl``.

    The model: parameters ``input`` (N, C, H, W), ``offset`` (N, 2 * offset_groups * kH * kW, oH,
    oW) and ``mask`` (N, offset_groups * kH * kW, oH, oW) (where the layer has one),
    ``DeformableConvolution`` with ``bilinear_interpolation_pad=True`` (samples near the border
    blend with zero padding, as torchvision's do), then ``Add`` of the bias. ``weight`` and
    ``bias`` are constants, as in a converted model (a constant weight ran faster: 2.12 against
    2.51 ms as a parameter, at 256x14x14, side by side). Compiled for the CPU with
    float32 inference precision (not the bf16 default of AVX-512 BF16 CPUs), ``threads``
    inference threads (default PyTorch's), one stream, no CPU pinning. The call takes and returns
    torch tensors: ``peer(input, offset, mask)``; the output is the request's buffer, overwritten
    by the next call.
    """

    def __init__(self, wl: Workload, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                 threads: Optional[int] = None):
        import numpy as np  # noqa: PLC0415
        import openvino  # noqa: PLC0415

        opset8 = _openvino_opset8()
        geo = ConvGeometry(wl)
        if geo.dtype != "float32":
            raise ValueError(f"the openvino peer runs float32 layers, got dtype {geo.dtype!r}")
        shapes = {"input": (geo.batch, geo.in_channels, geo.height, geo.width),
                  "offset": (geo.batch, 2 * geo.offset_groups * geo.taps, geo.out_h, geo.out_w)}
        if geo.with_mask:
            shapes["mask"] = (geo.batch, geo.offset_groups * geo.taps, geo.out_h, geo.out_w)
        params = {name: opset8.parameter(list(shape), np.float32, name=name) for name, shape in shapes.items()}
        out = opset8.deformable_convolution(
            params["input"], params["offset"], opset8.constant(weight.detach().numpy()),
            strides=[geo.stride_h, geo.stride_w], pads_begin=[geo.pad_h, geo.pad_w],
            pads_end=[geo.pad_h, geo.pad_w], dilations=[geo.dil_h, geo.dil_w], mask=params.get("mask"),
            group=geo.groups, deformable_group=geo.offset_groups, bilinear_interpolation_pad=True)
        if bias is not None:
            out = opset8.add(out, opset8.constant(bias.detach().numpy().reshape(1, -1, 1, 1)))
        self.model = openvino.Model([out], list(params.values()), "deform_conv2d")
        self.compiled = _openvino_core().compile_model(self.model, "CPU", {
            "INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": threads or _peer_threads(),
            "NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY", "ENABLE_CPU_PINNING": False})
        self.request = self.compiled.create_infer_request()
        self.with_mask = geo.with_mask

    def __call__(self, input: torch.Tensor, offset: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if (mask is not None) != self.with_mask:
            raise ValueError(f"mask: this layer {'needs' if self.with_mask else 'has no'} mask")
        arrays = [input.numpy(), offset.numpy()] + ([mask.numpy()] if mask is not None else [])
        self.request.infer(arrays, share_inputs=True, share_outputs=True)
        return torch.from_numpy(self.request.get_output_tensor(0).data)


PEER_CLASSES = {"onnxruntime": OnnxRuntimeDeformConv, "openvino": OpenVINODeformConv}


class PeerUnavailable(RuntimeError):
    """A peer's package imports but cannot run the layer (raised by the candidate in its place)."""


def _unavailable(reason: str) -> Callable[[], torch.Tensor]:
    def call():
        raise PeerUnavailable(f"could not be built: {reason}")
    return call


def available_peers(peers=PEERS, log: Callable[[str], None] = print) -> tuple[str, ...]:
    """The ``peers`` whose packages import; a line for each of the others, saying why it is left out."""
    needs = {"onnxruntime": lambda: (__import__("onnx"), __import__("onnxruntime")),
             "openvino": _openvino_opset8}
    found = []
    for name in peers:
        try:
            needs[name]()
        except ImportError as err:
            log(f"{name} column skipped: {err} (pip install 'tvm-dcn[bench]' installs it)")
            continue
        found.append(name)
    return tuple(found)


def _peer_version(name: str) -> str:
    import importlib  # noqa: PLC0415
    import importlib.metadata  # noqa: PLC0415

    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:  # e.g. onnxruntime-gpu, an OpenVINO build
        return getattr(importlib.import_module(name), "__version__", "?")


def _roi_align_candidates(wl: Workload, mode: str, schedules, peers=(),
                          dtype: str = "float32") -> tuple[dict[str, Callable[[], torch.Tensor]], None]:
    """The timed candidates of a RoI Align head (no untimed prelude; no peer runs RoI Align);
    tvm-dcn in ``dtype`` (its boxes too, as torchvision takes them), torchvision in the workload's."""
    import torchvision  # noqa: PLC0415

    from . import roi  # noqa: PLC0415

    x, boxes, scale = _roi_inputs(wl, torch.Generator().manual_seed(0))
    backward = mode == "forward+backward"
    leaves = {"input": x.requires_grad_(backward), "boxes": boxes}
    own = _in_dtype(leaves, dtype, False)
    own["input"].requires_grad_(backward)
    run, run_own = _runner(leaves, backward), _runner(own, backward)
    params = (wl["output_size"], scale, wl["sampling_ratio"], wl["aligned"])
    out = {f"tvm-dcn {s}": run_own(lambda: roi.roi_align(own["input"], own["boxes"], *params)) for s in schedules}
    out["torchvision"] = run(lambda: torchvision.ops.roi_align(x, boxes, *params))
    return out, None


def case_name(wl: Workload) -> str:
    if wl.op == FORWARD:
        return layer_name(wl)
    return (f"roi_align {wl['num_rois']} boxes {wl['channels']}x{wl['height']}x{wl['width']} "
            f"{wl['output_size'][0]}x{wl['output_size'][1]} s{wl['sampling_ratio']}")


class _Case:
    """One layer (a deform_conv2d or roi_align forward workload) in one mode: its candidates, set
    up, checked against torchvision and warmed up on construction, then timed one repeat at a time
    (:meth:`repeat`), so that the repeats of several cases can be interleaved."""

    def __init__(self, wl: Workload, count: int, mode: str, *, schedules=SCHEDULES, peers=(), slow_repeats: int = 3,
                 warmup: int = 2, dtype: str = "float32", log: Callable[[str], None] = print):
        self.result = CaseResult(case_name(wl), mode, count, batch=wl["batch"] if wl.op == FORWARD else None)
        factory = _conv_candidates if wl.op == FORWARD else _roi_align_candidates
        candidates, self.prelude = factory(wl, mode, schedules, peers=peers, dtype=dtype)
        reference = candidates["torchvision"]().detach().clone()
        self.usable = {}
        for name, fn in candidates.items():
            try:
                with forced_schedule(_schedule_of(name)):
                    value = fn()  # compiles the kernels (and checks the schedule source exists)
            except LookupError:
                continue  # e.g. no tuning record for this layer on this machine
            except PeerUnavailable as err:
                self.result.not_timed[name] = str(err)
                log(f"WARNING: {self.result.layer} [{mode}]: {name} {err}; not timed")
                continue
            if name.startswith("tvm-dcn") or name in PEERS:
                err = (value - reference).abs().max().item()
                self.result.max_abs_err[name] = err
                limit = PEER_TOLERANCE * max(1.0, reference.abs().max().item())
                if name in PEERS and not err <= limit:
                    # A peer computing something else would be timed for the wrong work.
                    reason = f"disagrees with torchvision: max abs error {err:.3g} > {limit:.3g}"
                    self.result.not_timed[name] = reason
                    log(f"WARNING: {self.result.layer} [{mode}]: {name} {reason}; not timed")
                    continue
            self.usable[name] = fn
        # The untuned default is orders of magnitude slower: fewer repeats.
        self.slow = {name for name in self.usable if name.endswith("default")}
        self.slow_repeats = slow_repeats
        for name, fn in self.usable.items():
            with forced_schedule(_schedule_of(name)):
                for _ in range(1 if name in self.slow else warmup):
                    fn()
        self.samples: dict[str, list[float]] = {name: [] for name in self.usable}
        # Between repeats, untimed, the dense convolution of the layer (a network's previous layer):
        # each candidate comes first in one order of the design, so each follows it equally often.
        self.separator = self.usable.get("dense conv2d")

    def repeat(self, i: int) -> None:
        """Repeat ``i``: every candidate but the slow ones once, timed. Interleaved, so noise hits
        every candidate alike, in the orders of a balanced design, so every candidate follows every
        other equally often: what ran just before matters here (a forward ran 0.6-1 ms faster right
        after another forward of the same layer than after other work, 0.2-0.3 ms slower right
        after torchvision's mostly single-threaded one; a rotated fixed order, one random sequence
        reused for every layer, and the design without the separator each favoured a candidate:
        identical hand and tuned code timed 3-7% apart)."""
        self._timed([name for name in self.usable if name not in self.slow], i)

    def repeat_slow(self, i: int) -> None:
        """Repeat ``i`` of the slow candidates (the unscheduled ``default``), in a phase of their own
        after the others' repeats: running 100-400 ms mostly on one core, interleaved they slowed
        the candidates that followed them (hand forward 1.58-1.93 ms per layer against 1.03-1.20 ms
        without them, ONNX Runtime unchanged)."""
        if i < self.slow_repeats:
            self._timed([name for name in self.usable if name in self.slow], i)

    def _timed(self, active: list[str], i: int) -> None:
        if not active:
            return
        design = balanced_orders(len(active))
        if self.separator is not None:
            self.separator()
        for index in design[i % len(design)]:
            name = active[index]
            fn = self.usable[name]
            with forced_schedule(_schedule_of(name)):
                if self.prelude is not None:
                    self.prelude()
                start = time.perf_counter()
                fn()
                self.samples[name].append((time.perf_counter() - start) * 1e3)

    def finish(self) -> CaseResult:
        self.result.times_ms = {name: statistics.median(ts) for name, ts in self.samples.items()}
        return self.result


def run_case(wl: Workload, count: int, mode: str, *, schedules=SCHEDULES, peers=(), repeats: int = 20,
             slow_repeats: int = 3, warmup: int = 2, dtype: str = "float32",
             log: Callable[[str], None] = print) -> CaseResult:
    """Time one layer (a deform_conv2d or roi_align forward workload) in one mode."""
    return run_cases([(wl, count)], mode, schedules=schedules, peers=peers, repeats=repeats,
                     slow_repeats=slow_repeats, warmup=warmup, dtype=dtype, log=log)[0]


def run_cases(layers: list[tuple[Workload, int]], mode: str, *, schedules=SCHEDULES, peers=(), repeats: int = 20,
              slow_repeats: int = 3, warmup: int = 2, dtype: str = "float32",
              log: Callable[[str], None] = print) -> list[CaseResult]:
    """Time several layers in one mode, their repeats interleaved: repeat ``i`` of every layer
    (in a rotating order) before repeat ``i + 1`` of any. Timed one layer after the other, a burst
    of load on this shared host lasting one layer's few seconds hit that layer alone (the
    forward geomean over torchvision of three consecutive runs: 2.99x, 4.09x, 3.35x); spread over
    the whole run, it hits every layer alike and the median of each sheds it."""
    cases = [_Case(wl, count, mode, schedules=schedules, peers=peers, slow_repeats=slow_repeats, warmup=warmup,
                   dtype=dtype, log=log) for wl, count in layers]
    for i in range(repeats):
        for j in range(len(cases)):
            cases[(i + j) % len(cases)].repeat(i)
    for i in range(slow_repeats):
        for j in range(len(cases)):
            cases[(i + j) % len(cases)].repeat_slow(i)
    results = [case.finish() for case in cases]
    for result in results:
        log(format_case(result))
    return results


def balanced_orders(n: int) -> list[list[int]]:
    """Orders of ``range(n)`` in which each candidate directly follows each other one equally
    often (a Williams design: n orders for even n, 2n for odd n)."""
    first, low, high = [0], 1, n - 1
    while len(first) < n:
        first.append(low)
        low += 1
        if len(first) < n:
            first.append(high)
            high -= 1
    orders = [[(x + shift) % n for x in first] for shift in range(n)]
    return orders if n % 2 == 0 else orders + [order[::-1] for order in orders]


def format_case(result: CaseResult) -> str:
    tv = result.times_ms.get("torchvision")
    parts = []
    for name, ms in result.times_ms.items():
        speedup = f" ({tv / ms:.2f}x)" if tv and name != "torchvision" else ""
        parts.append(f"{name} {ms:.2f}{speedup}")
    return f"{result.layer} [{result.mode}] ms: " + ", ".join(parts)


def geomean_speedups(results: list[CaseResult], mode: str, batch: Optional[int] = None) -> dict[str, float]:
    """Geometric mean over the distinct layers (those of batch size ``batch`` if given) of
    torchvision time / candidate time, for the candidates timed on every one of them."""
    rows = [r for r in results if r.mode == mode and (batch is None or r.batch == batch)]
    ratios: dict[str, list[float]] = {}
    for r in rows:
        tv = r.times_ms.get("torchvision")
        if not tv:
            continue
        for name, ms in r.times_ms.items():
            ratios.setdefault(name, []).append(tv / ms)
    return {name: math.exp(sum(map(math.log, v)) / len(v)) for name, v in ratios.items() if len(v) == len(rows)}


def batches_of(results: list[CaseResult]) -> list[int]:
    """The batch sizes of the deformable-conv rows, in order of first appearance."""
    return list(dict.fromkeys(r.batch for r in results if r.batch is not None))


def environment() -> dict:
    return {
        "target": str(host_target()), "target_tag": target_tag(None), "machine": platform.machine(),
        "processor": _cpu_model(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _columns(results: list[CaseResult]) -> list[str]:
    names: list[str] = []
    for r in results:
        for name in r.times_ms:
            if name not in names:
                names.append(name)
    order = [f"tvm-dcn {s}" for s in SCHEDULES] + list(PEERS) + list(BASELINES)
    return [n for n in order if n in names]


def markdown_table(results: list[CaseResult], workload_set: str, dtype: str = "float32") -> str:
    cols = _columns(results)
    lines = []
    precision = "" if dtype == "float32" else f"; tvm-dcn and dense conv2d in {dtype}, the others in float32"
    for mode in MODES:
        rows = [r for r in results if r.mode == mode]
        if not rows:
            continue
        lines += [f"**{mode}**, `{workload_set}`: median ms (speed-up over torchvision){precision}", "",
                  "| layer | count | " + " | ".join(cols) + " |", "|---|---:|" + "---:|" * len(cols)]
        for r in rows:
            tv = r.times_ms.get("torchvision")
            cells = []
            for c in cols:
                ms = r.times_ms.get(c)
                cells.append("-" if ms is None else f"{ms:.2f}" + (f" ({tv / ms:.2f}x)" if tv and c != "torchvision"
                                                                   else ""))
            lines.append(f"| {r.layer} | {r.count} | " + " | ".join(cells) + " |")
        summaries = [("**geomean speed-up**", geomean_speedups(results, mode))]
        batches = batches_of(rows)
        if len(batches) > 1:
            summaries += [(f"**geomean, batch {b}**", geomean_speedups(results, mode, b)) for b in batches]
        for label, geo in summaries:
            lines.append(f"| {label} | | " + " | ".join(f"**{geo[c]:.2f}x**" if c in geo else "-" for c in cols) + " |")
        lines.append("")
        absent = [c for c in cols if c in PEERS and not any(c in r.times_ms for r in rows)]
        if mode == "forward+backward" and absent:
            lines += [f"{', '.join(absent)}: forward only (no backward).", ""]
        for r in rows:
            for name, reason in r.not_timed.items():
                lines.append(f"- {r.layer}: {name} not timed, {reason}")
        if any(r.not_timed for r in rows):
            lines.append("")
    return "\n".join(lines)


def plot(results: list[CaseResult], path: Path, title: str) -> bool:
    """Bar chart of speed-ups over torchvision per layer and mode; False if matplotlib is missing."""
    try:
        import matplotlib  # noqa: PLC0415

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError:
        return False
    cols = [c for c in _columns(results) if c != "torchvision"]
    modes = [m for m in MODES if any(r.mode == m for r in results)]
    fig, axes = plt.subplots(1, len(modes), figsize=(7 * len(modes), 4.8), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        rows = [r for r in results if r.mode == mode]
        mode_cols = [c for c in cols if any(c in r.times_ms for r in rows)]  # no peer bars in forward+backward
        width = 0.8 / len(mode_cols)
        for i, c in enumerate(mode_cols):
            values = [r.times_ms["torchvision"] / r.times_ms[c] if c in r.times_ms else 0 for r in rows]
            ax.bar([j + i * width for j in range(len(rows))], values, width, label=c, color=f"C{cols.index(c)}")
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_yscale("log")
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(rows))])
        ax.set_xticklabels([r.layer.replace(" k3x3", "").replace("dcnv2 ", "") for r in rows], rotation=30,
                           ha="right", fontsize=8)
        ax.set_ylabel("speed-up over torchvision (log)")
        ax.set_title(mode)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def run(workload_set: str = "resnet50-dcn-224", *, modes=MODES, schedules=SCHEDULES, peers=PEERS,
        batches: Optional[Sequence[int]] = None, repeats: int = 20, dtype: str = "float32",
        output_dir: Optional[str] = "bench_results", log: Callable[[str], None] = print) -> list[CaseResult]:
    """Benchmark every layer of ``workload_set`` (at each size of ``batches``, default the set's),
    the tvm-dcn and dense conv2d rows in ``dtype`` (:data:`DTYPES`); write
    ``<output_dir>/<tag>/bench.*`` (``bench-<dtype>.*`` for a half dtype) unless None. ``peers``
    whose packages do not import are left out with a printed reason."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    layers = layers_of(load(workload_set), batches)
    env = environment()
    log(f"target {env['target_tag']} ({env['processor']}), torch {env['torch']}, {env['torch_threads']} threads")
    peers = available_peers(peers, log) if "forward" in modes else ()
    env["peers"] = {name: _peer_version(name) for name in peers}
    if peers:
        log("peers: " + ", ".join(f"{name} {version}" for name, version in env["peers"].items()))
    results = [result for mode in modes
               for result in run_cases(layers, mode, schedules=schedules, peers=peers, repeats=repeats, dtype=dtype,
                                       log=log)]
    table = markdown_table(results, workload_set, dtype)
    log("\n" + table)
    if output_dir:
        folder = Path(output_dir) / env["target_tag"]
        folder.mkdir(parents=True, exist_ok=True)
        stem = "bench" if dtype == "float32" else f"bench-{dtype}"
        summary = {mode: geomean_speedups(results, mode) for mode in modes}
        by_batch = {mode: {str(b): geomean_speedups(results, mode, b) for b in batches_of(results)} for mode in modes}
        (folder / f"{stem}.json").write_text(json.dumps(
            {"environment": env, "workload_set": workload_set, "dtype": dtype,
             "geomean_speedup_over_torchvision": summary,
             "geomean_speedup_over_torchvision_by_batch": by_batch,
             "results": [asdict(r) for r in results]}, indent=1) + "\n")
        versions = "".join(f", {name} {version}" for name, version in env["peers"].items())
        (folder / f"{stem}.md").write_text(f"Environment: `{env['target_tag']}`, {env['processor']}, torch "
                                         f"{env['torch']} ({env['torch_threads']} threads){versions}, "
                                         f"{env['date']}\n\n" + table)
        title = f"tvm-dcn vs torchvision, {workload_set}, {env['target_tag']}" + \
            ("" if dtype == "float32" else f", {dtype} vs float32")
        if plot(results, folder / f"{stem}.png", title):
            log(f"wrote {folder}/{stem}.json, {stem}.md, {stem}.png")
        else:
            log(f"wrote {folder}/{stem}.json, {stem}.md (no plot: matplotlib is not installed)")
    return results
