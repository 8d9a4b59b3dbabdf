"""ONNX export of models that use tvm-dcn operators, through torch's exporter
(``torch.onnx.export(..., dynamo=True)``: ``torch.export``, then onnxscript translations).

:func:`export` exports a model in one call; :func:`translation_table` gives the translations for
``torch.onnx.export(model, args, custom_translation_table=translation_table(opset), opset_version=opset)``.

Operators and the ONNX operators they become (each checked in ONNX Runtime against tvm-dcn,
tests/test_onnx.py):

``deform_conv2d`` (``DeformConv2d``, ``DeformConv2dPack``, ``ModulatedDeformConv2dPack``)
    ``DeformConv`` (opset >= 19): bias, mask, stride, padding, dilation, groups and offset groups;
    the offset layout is torchvision's, as ONNX's.
``roi_align`` (``RoIAlign``)
    ``RoiAlign`` (opset >= 16): ``aligned=True`` is ``coordinate_transformation_mode="half_pixel"``,
    ``aligned=False`` ``"output_half_pixel"`` (RoI sizes raised to 1, as torchvision); the (K, 5)
    boxes split into (K, 4) rois and int64 batch indices (truncated, as torchvision's C cast);
    ``sampling_ratio <= 0`` (adaptive, ``ceil(roi_size / output_size)`` samples) is ONNX's 0.
``roi_pool`` (``RoIPool``)
    ``MaxRoiPool`` (opset >= 16 here): the same definition (box corners rounded half away from
    zero after scaling, bins ``floor``/``ceil`` of the scaled RoI, empty bins 0).

Not exportable (ONNX has no operator for them): ``ps_roi_align``, ``ps_roi_pool``,
``deform_roi_pool`` (plain and modulated: ``DeformRoIPool``, ``DeformRoIPoolPack``,
``ModulatedDeformRoIPoolPack``) and ``deform_psroi_pool`` (``DeformRoIPooling``,
``DeformRoIPoolingPack``): export raises :class:`UnsupportedOperatorError` naming the operator.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Optional, Union

import onnx
import onnxscript
import torch

__all__ = ["export", "translation_table", "UnsupportedOperatorError", "DEFAULT_OPSET"]

DEFAULT_OPSET = 19
_ops = torch.ops.tvm_dcn

# tvm_dcn operator -> (function name, ONNX operator, first opset with the semantics used here).
_EXPORTABLE = {
    "deform_conv2d_forward": ("deform_conv2d", "DeformConv", 19),
    "roi_align_forward": ("roi_align", "RoiAlign", 16),
    "roi_pool_forward": ("roi_pool", "MaxRoiPool", 16),
}
_NOT_EXPORTABLE = {
    "ps_roi_align_forward": "ps_roi_align",
    "ps_roi_pool_forward": "ps_roi_pool",
    "deform_roi_pool_forward": "deform_roi_pool (DeformRoIPool, DeformRoIPoolPack, ModulatedDeformRoIPoolPack)",
    "deform_psroi_pool_forward": "deform_psroi_pool (DeformRoIPooling, DeformRoIPoolingPack)",
}


class UnsupportedOperatorError(torch.onnx.OnnxExporterError):
    """A model uses a tvm-dcn operator that has no ONNX translation (at the requested opset)."""


def _refuse(name: str) -> UnsupportedOperatorError:
    return UnsupportedOperatorError(f"tvm_dcn.{name} cannot be exported to ONNX: ONNX has no operator with its "
                                    "semantics (exportable: deform_conv2d -> DeformConv, roi_align -> RoiAlign, "
                                    "roi_pool -> MaxRoiPool)")


def _check_opset(operator: str, opset: int) -> None:
    name, onnx_op, first = _EXPORTABLE[operator]
    if opset < first:
        raise UnsupportedOperatorError(f"tvm_dcn.{name} exports to ONNX {onnx_op}, which needs opset >= {first}; "
                                       f"got opset {opset}")


def _static(value, what: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise UnsupportedOperatorError(f"deform_conv2d export needs a static {what}, got {value!r}") from None


def translation_table(opset: int = DEFAULT_OPSET) -> dict[Callable, Callable]:
    """Translations of the tvm-dcn operators to ONNX at ``opset``, for ``torch.onnx.export(...,
    custom_translation_table=...)``; operators without an ONNX equivalent (or that need a later
    opset) raise :class:`UnsupportedOperatorError` when the exporter reaches them."""
    op = onnxscript.values.Opset("", opset)

    def deform_conv2d(input, offset, weight, bias, mask, stride, padding, dilation):
        _check_opset("deform_conv2d_forward", opset)
        kernel_h, kernel_w = _static(weight.shape[2], "kernel height"), _static(weight.shape[3], "kernel width")
        groups = _static(input.shape[1], "input channel count") // _static(weight.shape[1], "weight.shape[1]")
        offset_groups = _static(offset.shape[1], "offset channel count") // (2 * kernel_h * kernel_w)
        return op.DeformConv(input, weight, offset, bias, mask, dilations=list(dilation), group=groups,
                             kernel_shape=[kernel_h, kernel_w], offset_group=offset_groups,
                             pads=[padding[0], padding[1], padding[0], padding[1]], strides=list(stride))

    def split_rois(rois):
        """(K, 5) rows (batch index, x1, y1, x2, y2) -> (K, 4) boxes and (K,) int64 batch indices."""
        def ints(*values):
            return op.Constant(value_ints=list(values))
        batch_index = op.Cast(op.Squeeze(op.Slice(rois, ints(0), ints(1), ints(1)), ints(1)),
                              to=onnx.TensorProto.INT64)
        return op.Slice(rois, ints(1), ints(5), ints(1)), batch_index

    def roi_align(input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned):
        _check_opset("roi_align_forward", opset)
        boxes, batch_index = split_rois(rois)
        return op.RoiAlign(input, boxes, batch_index,
                           coordinate_transformation_mode="half_pixel" if aligned else "output_half_pixel",
                           mode="avg", output_height=pooled_height, output_width=pooled_width,
                           sampling_ratio=max(sampling_ratio, 0), spatial_scale=spatial_scale)

    def roi_pool(input, rois, spatial_scale, pooled_height, pooled_width):
        _check_opset("roi_pool_forward", opset)
        output = op.MaxRoiPool(input, rois, pooled_shape=[pooled_height, pooled_width], spatial_scale=spatial_scale)
        # The operator's second output, the argmax, only feeds its backward: nothing reads it in an
        # exported graph, and the exporter drops this placeholder.
        return output, op.Cast(output, to=onnx.TensorProto.INT32)

    def refusal(name: str) -> Callable:
        def translate(*args, **kwargs):
            raise _refuse(name)
        return translate

    table: dict[Callable, Callable] = {
        _ops.deform_conv2d_forward.default: deform_conv2d,
        _ops.roi_align_forward.default: roi_align,
        _ops.roi_pool_forward.default: roi_pool,
    }
    for operator, name in _NOT_EXPORTABLE.items():
        table[getattr(_ops, operator).default] = refusal(name)
    return table


def check_exportable(program: torch.export.ExportedProgram, opset: int = DEFAULT_OPSET) -> None:
    """Raise :class:`UnsupportedOperatorError` naming the first tvm-dcn operator in ``program``
    that has no ONNX translation at ``opset``."""
    for node in program.graph.nodes:
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            continue
        if node.target.namespace != "tvm_dcn":
            continue
        operator = node.target._opname
        if operator in _NOT_EXPORTABLE:
            raise _refuse(_NOT_EXPORTABLE[operator])
        if operator in _EXPORTABLE:
            _check_opset(operator, opset)
        else:
            raise UnsupportedOperatorError(f"torch.ops.tvm_dcn.{operator} has no ONNX translation")


def export(model: torch.nn.Module, args: Union[tuple, torch.Tensor], f: Optional[Union[str, os.PathLike]] = None,
           *, opset: int = DEFAULT_OPSET, dynamic_batch: bool = True, kwargs: Optional[dict[str, Any]] = None,
           optimize: bool = True) -> "torch.onnx.ONNXProgram":
    """Export ``model`` called on ``args`` to ONNX at ``opset`` (file ``f`` if given); returns the
    ``torch.onnx.ONNXProgram``.

    ``dynamic_batch``: the first dimension of every tensor argument is dynamic (each its own: the
    batch of images, the number of boxes), so one file runs any batch size; shapes of the example
    ``args`` of size 0 or 1 there are specialized by ``torch.export``, so give at least 2.
    Raises :class:`UnsupportedOperatorError` naming the operator if the model uses one that does not
    export (module docstring), before translating anything.
    """
    if not isinstance(args, tuple):
        args = (args,)
    dynamic_shapes = None
    if dynamic_batch:
        dynamic_shapes = tuple({0: torch.export.Dim.DYNAMIC} if isinstance(a, torch.Tensor) else None for a in args)
        if kwargs:
            dynamic_shapes = {**{name: spec for name, spec in zip(_arg_names(model, len(args)), dynamic_shapes)},
                              **{k: ({0: torch.export.Dim.DYNAMIC} if isinstance(v, torch.Tensor) else None)
                                 for k, v in kwargs.items()}}
    program = torch.export.export(model, args, kwargs=kwargs, dynamic_shapes=dynamic_shapes, strict=False)
    check_exportable(program, opset)
    onnx_program = torch.onnx.export(program, args, kwargs=kwargs, dynamo=True, opset_version=opset,
                                     custom_translation_table=translation_table(opset), optimize=optimize,
                                     verbose=False)
    if f is not None:
        onnx_program.save(f)
    return onnx_program


def _arg_names(model: torch.nn.Module, count: int) -> list[str]:
    import inspect  # noqa: PLC0415

    params = list(inspect.signature(model.forward).parameters)
    return params[:count]
