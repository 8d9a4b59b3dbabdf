"""Named workload sets (what ``tvm-dcn tune`` and ``tvm-dcn bench`` work on), user files of
workloads, and a recorder that collects the workloads a model's tvm_dcn layers hit.

A set is a list of :class:`~tvm_dcn.Workload` s with one entry per *kernel call* of one pass of
the network: a workload appearing three times is a layer that occurs three times, and the tuner
weights it accordingly. ``unique_with_counts`` folds the repeats.

Built-in sets (batch 1, float32; ResNet-50 with DCNv2 in stages c3-c5, as in mmdetection's
``dconv_c3-c5`` configs: every 3x3 conv of those stages is a modulated deformable conv with one
offset group and no bias, the stride sitting on the 3x3 conv of each stage's first block):

``resnet50-dcn-224``
    the deformable layers of ResNet-50 at a 224x224 input: c3 (128 channels, 56->28 stride 2,
    then 3 blocks at 28x28), c4 (256, 28->14, then 5 at 14x14), c5 (512, 14->7, then 2 at 7x7);
    each layer's forward, backward-data (input, offset and mask gradients) and backward-weight
    kernels.
``resnet50-dcn-224-forward``
    the forward kernels alone.
``faster-rcnn-r50-dcn``
    the same layers at an 800x1216 input (c3-c5 outputs 100x152, 50x76, 25x38), forward and
    backward, plus the RoI heads: RoI Align and deformable RoI pooling of 512 boxes to 7x7 on the
    256-channel stride-16 feature map (50x76), forward and backward.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Union

from . import ops
from .ops.deform_conv import backward_data_workload, backward_weight_workload, forward_workload
from .ops.deform_roi_pool import deform_roi_pool_workload
from .ops.roi_align import roi_align_workload
from .ops.workload import Workload, save, unique_with_counts
from .recording import Recorder, record

__all__ = ["SETS", "Recorder", "load", "load_file", "names", "record", "resnet50_dcn_layers", "roi_head_workloads",
           "save", "unique_with_counts"]

# (in_channels, input size, out size, blocks at out size after the first) per stage at 224x224.
_RESNET50_DCN_STAGES = ((128, 56, 28, 3), (256, 28, 14, 5), (512, 14, 7, 2))


def _dcn_layer(channels: int, size: tuple[int, int], stride: int, batch: int) -> Workload:
    return forward_workload(batch=batch, in_channels=channels, height=size[0], width=size[1],
                            out_channels=channels, kernel_size=(3, 3), stride=(stride, stride), padding=(1, 1),
                            with_mask=True, with_bias=False)


def _layer_kernels(forward: Workload, backward: bool) -> list[Workload]:
    """The kernels one training (or inference) pass of a layer runs."""
    if not backward:
        return [forward]
    return [forward, backward_data_workload(forward, need_input=True, need_sampling=True),
            backward_weight_workload(forward, need_weight=True, need_bias=forward["with_bias"])]


def resnet50_dcn_layers(image: tuple[int, int] = (224, 224), batch: int = 1) -> list[Workload]:
    """Forward workloads of the DCNv2 layers of ResNet-50 c3-c5, one entry per layer."""
    layers = []
    for stage, (channels, _, _, repeats) in enumerate(_RESNET50_DCN_STAGES):
        stride_in = 4 * 2 ** stage  # c3 consumes the stride-4 map
        size_in = (-(-image[0] // stride_in), -(-image[1] // stride_in))
        size_out = (-(-size_in[0] // 2), -(-size_in[1] // 2))
        layers.append(_dcn_layer(channels, size_in, 2, batch))
        layers += [_dcn_layer(channels, size_out, 1, batch)] * repeats
    return layers


def roi_head_workloads(*, channels: int = 256, height: int = 50, width: int = 76, boxes: int = 512,
                      output_size: int = 7, batch: int = 1, roi_align_sampling_ratio: int = 2,
                      deform_sampling_ratio: int = 0, backward: bool = True, dtype: str = "float32") -> list:
    """The RoI kernels one pass of a two-stage detector's box head runs on one feature map (by
    default 512 boxes to 7x7 on the 256-channel stride-16 map of an 800x1216 image):

    - ``roi_align`` (torchvision's ``MultiScaleRoIAlign`` samples 2 x 2 per bin) and its backward;
    - ``DeformRoIPoolPack`` (mmcv's defaults: adaptive sampling): pooling without offsets, then
      with the predicted offsets; backward: input gradients of both, offset gradient of the second.

    Adaptive sampling workloads use the bound of boxes inside the map (the bridge measures each
    call's boxes, so smaller boxes hit smaller, bucketed bounds)."""
    common = dict(batch=batch, channels=channels, height=height, width=width, num_rois=boxes,
                  output_size=(output_size, output_size), dtype=dtype)
    kernels = [roi_align_workload(**common, sampling_ratio=roi_align_sampling_ratio)]
    if backward:
        kernels.append(roi_align_workload(**common, sampling_ratio=roi_align_sampling_ratio, backward=True))
    deform = dict(common, sampling_ratio=deform_sampling_ratio)
    for with_offset in (False, True):
        kernels.append(deform_roi_pool_workload(**deform, with_offset=with_offset))
        if backward:
            kernels.append(deform_roi_pool_workload(**deform, with_offset=with_offset, backward="input"))
    if backward:
        kernels.append(deform_roi_pool_workload(**deform, with_offset=True, backward="params"))
    return kernels


def _resnet50_dcn_224() -> list[Workload]:
    return [k for layer in resnet50_dcn_layers() for k in _layer_kernels(layer, backward=True)]


def _resnet50_dcn_224_forward() -> list[Workload]:
    return resnet50_dcn_layers()


def _faster_rcnn_r50_dcn() -> list[Workload]:
    layers = resnet50_dcn_layers(image=(800, 1216))
    kernels = [k for layer in layers for k in _layer_kernels(layer, backward=True)]
    return kernels + roi_head_workloads(channels=256, height=50, width=76, boxes=512)


SETS = {
    "resnet50-dcn-224": _resnet50_dcn_224,
    "resnet50-dcn-224-forward": _resnet50_dcn_224_forward,
    "faster-rcnn-r50-dcn": _faster_rcnn_r50_dcn,
}


def names() -> list[str]:
    return sorted(SETS)


def load(name_or_path: Union[str, Path]) -> list[Workload]:
    """A workload set: a built-in name (see :data:`SETS`) or a JSON/TOML file (see :func:`save`)."""
    if isinstance(name_or_path, str) and name_or_path in SETS:
        return SETS[name_or_path]()
    path = Path(name_or_path)
    if not path.exists():
        raise ValueError(f"workloads: {str(name_or_path)!r} is neither a built-in set ({', '.join(names())}) "
                         "nor an existing file")
    return load_file(path)


def load_file(path: Union[str, Path]) -> list[Workload]:
    """Workloads from a file written by :func:`save` (JSON) or a TOML file of the same structure::

        [[workload]]            # JSON: {"workloads": [{...}, ...]}
        op = "deform_conv2d"
        dtype = "float32"
        count = 3               # optional: calls per pass (default 1)
        params = { batch = 1, in_channels = 128, height = 28, width = 28, out_channels = 128,
                   kernel_size = [3, 3], stride = [1, 1], padding = [1, 1], dilation = [1, 1],
                   groups = 1, offset_groups = 1, with_mask = true, with_bias = false }
    """
    path = Path(path)
    text = path.read_text()
    try:
        if path.suffix == ".toml":
            import tomllib  # noqa: PLC0415  (Python 3.11+)

            data = tomllib.loads(text)
        else:
            data = json.loads(text)
    except (ValueError, ImportError) as err:
        raise ValueError(f"workloads file {path}: cannot parse it ({err})") from None
    entries = data.get("workloads", data.get("workload")) if isinstance(data, dict) else data
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"workloads file {path}: expected a non-empty list under 'workloads'")
    out = []
    for entry in entries:
        if not isinstance(entry, dict):
            raise ValueError(f"workloads file {path}: entry {entry!r} is not a table/object")
        count = entry.get("count", 1)
        if not isinstance(count, int) or count < 1:
            raise ValueError(f"workloads file {path}: count must be a positive integer, got {count!r}")
        workload = Workload.from_dict(entry)
        _check_known(workload, path)
        out += [workload] * count
    return out


def _check_known(workload: Workload, source) -> None:
    try:
        ops.build(workload)
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"workloads {source}: {workload.short_name()} is not a valid workload ({err})") from None


