"""Run GPU-scheduled TIR on the CPU, to check CUDA schedules numerically without a GPU.

A scheduled TIR program has sequential semantics: a loop bound to ``threadIdx.x`` means "for
every thread", and the stages of a thread block (a cooperative copy into shared memory, then
the compute reading it) are separate loop nests, one after the other. Turning every
thread-bound loop into a serial loop, and each CUDA atomic add into a plain read-modify-write
(which a serial loop makes race-free), gives a CPU program that computes what the GPU program
computes: the tiling, index arithmetic, bounds predicates, shared-memory tiles, register
accumulators and vectorised accesses are all exercised. What it cannot check is the GPU side of
the contract: races between threads, missing barriers, and the CUDA code generator itself
(those need a GPU: ``tests/test_cuda_gpu.py``).
"""
from __future__ import annotations

import tvm
import tvm_ffi
from tvm import tirx

ATOMIC_ADD = "tirx.cuda.atomic_add"


def _serial_loop(node):
    if node.kind == tirx.ForKind.THREAD_BINDING:
        return tirx.For(node.loop_var, node.min, node.extent, tirx.ForKind.SERIAL, node.body)
    return node


def _plain_add(node):
    call = node.value
    if isinstance(call, tvm.ir.Call) and getattr(call.op, "name", "") == ATOMIC_ADD:
        address, value = call.args
        load = address.args[0]  # address_of(buffer[indices])
        return tirx.BufferStore(load.source, load + value, load.indices)
    return node


def atomic_adds(func) -> int:
    """Number of CUDA atomic adds in ``func``."""
    count = []

    def visit(node):
        if getattr(node.op, "name", "") == ATOMIC_ADD:
            count.append(node)

    tvm_ffi.structural_walk(func, [(tvm.ir.Call, visit)], order="post")
    return len(count)


def thread_bindings(func) -> set:
    """Thread tags (``blockIdx.x``, ``threadIdx.y``, ...) bound anywhere in ``func``."""
    tags = set()

    def visit(node):
        if node.kind == tirx.ForKind.THREAD_BINDING:
            tags.add(str(node.thread_binding.thread_tag))

    tvm_ffi.structural_walk(func, [(tirx.For, visit)], order="post")
    return tags


def unbound_loops(func) -> list:
    """Loop variables of the loops at the top of ``func`` that are bound to no thread: they would
    run on the host, reading device memory."""
    body = func.body
    if isinstance(body, tvm.s_tir.SBlockRealize):  # the root block
        body = body.block.body
    stmts = list(body.seq) if isinstance(body, tirx.SeqStmt) else [body]
    return [str(s.loop_var) for s in stmts if isinstance(s, tirx.For) and s.kind != tirx.ForKind.THREAD_BINDING]


def on_cpu(mod: tvm.IRModule) -> tvm.IRModule:
    """``mod`` (GPU-scheduled) as a CPU program with the same results (see the module docstring)."""
    func = mod["main"]
    func = tvm_ffi.structural_map(func, [(tirx.For, _serial_loop), (tirx.Evaluate, _plain_add)])
    return tvm.IRModule({"main": func})


def random_arguments(workload, generator, reference=None) -> list:
    """Kernel arguments of ``workload`` (inputs random but valid, outputs NaN-filled), as torch
    tensors on the CPU. RoI rows: the first ``min(5, rows)`` are boxes inside the image, the rest
    padding (batch index -1); RoI Pool's argmax comes from ``reference`` (the CPU forward kernel
    of the same shapes, called as ``reference(input, rois, scalars, out, argmax)``)."""
    import torch  # noqa: PLC0415

    from tvm_dcn.ops import build  # noqa: PLC0415

    definition = build(workload)
    dtype = getattr(torch, workload.dtype)
    args = []
    inputs = definition.args[:len(definition.args) - definition.num_outputs]
    for tensor in inputs:
        shape = tuple(int(d) for d in tensor.shape)
        name = tensor.op.name
        if name == "rois":
            args.append(_rois(workload, shape, generator, dtype))
        elif name == "scalars":
            args.append(torch.tensor([0.5, 0.3][:shape[0]], dtype=dtype))
        elif name == "argmax":
            args.append(None)  # filled below
        elif name == "mask":
            args.append(torch.rand(shape, generator=generator, dtype=torch.float64).to(dtype))
        elif name in ("offset", "trans") and workload.op.startswith("deform_") and "roi" in workload.op:
            args.append((torch.randn(shape, generator=generator, dtype=torch.float64) * 0.3).to(dtype))
        else:
            args.append(torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype))
    if any(a is None for a in args):
        argmax_at = next(i for i, a in enumerate(args) if a is None)
        args[argmax_at] = _roi_pool_argmax(workload, args, generator, reference)
    outputs = [torch.full(tuple(int(d) for d in t.shape), float("nan"), dtype=getattr(torch, str(t.dtype)))
               if "float" in str(t.dtype) else torch.full(tuple(int(d) for d in t.shape), -7, dtype=torch.int32)
               for t in definition.args[len(inputs):]]
    return args + outputs


def _rois(workload, shape, generator, dtype):
    import torch  # noqa: PLC0415

    rows = shape[0]
    height, width, batch = workload["height"], workload["width"], workload["batch"]
    scale = 0.5  # the scalars' spatial_scale: boxes in image coordinates twice the feature map
    rois = torch.zeros(rows, 5, dtype=torch.float64)
    rois[:, 0] = -1
    for k in range(min(5, rows)):
        x1 = float(torch.rand(1, generator=generator)) * (width - 2) / scale
        y1 = float(torch.rand(1, generator=generator)) * (height - 2) / scale
        w = 1 + float(torch.rand(1, generator=generator)) * (width / scale - x1 - 1)
        h = 1 + float(torch.rand(1, generator=generator)) * (height / scale - y1 - 1)
        rois[k] = torch.tensor([k % batch, x1, y1, x1 + w, y1 + h], dtype=torch.float64)
    return rois.to(dtype)


def _roi_pool_argmax(workload, args, generator, reference):
    import torch  # noqa: PLC0415

    params = dict(workload.params)
    grad = args[0]
    rows, channels, ph, pw = grad.shape
    data = torch.randn(params["batch"], channels, params["height"] * params["width"], generator=generator,
                       dtype=grad.dtype)
    out = torch.empty_like(grad)
    argmax = torch.empty(grad.shape, dtype=torch.int32)
    reference(data, args[2], torch.tensor([0.5], dtype=grad.dtype), out, argmax)
    return argmax


def check_bounds(mod: tvm.IRModule, scatter_stages=("grad_input", "scatter")) -> None:
    """TVM's static out-of-bounds check (``OOBChecker``) of a scheduled module, on the blocks
    without a bounds predicate (``T.where``): the checker compares a block's iterator domains
    with the buffers, and TVM widens the domains of predicated blocks (a cooperative copy of a
    tile that the threads do not divide) beyond what the predicate lets through. Also skipped:
    the atomic scatter stages (guarded by ``if t < total``, which the checker ignores too); the
    emulation runs all of them. What this catches: an unguarded block writing past a buffer,
    e.g. a per-thread write-back left without the predicate of its producer."""
    import tvm.s_tir  # noqa: PLC0415

    def blank(block):
        return tvm.s_tir.SBlock(block.iter_vars, [], [], block.name_hint, tirx.Evaluate(0))

    def skip_unchecked(realize):
        block = realize.block
        guarded = not (isinstance(realize.predicate, tvm.tirx.IntImm) and realize.predicate.value == 1)
        if guarded or (block.name_hint in scatter_stages and thread_bindings(block.body)):
            return tvm.s_tir.SBlockRealize(realize.iter_values, realize.predicate, blank(block))
        return realize

    func = tvm_ffi.structural_map(mod["main"], [(tvm.s_tir.SBlockRealize, skip_unchecked)])
    tvm.s_tir.analysis.OOBChecker()(tvm.IRModule({"main": func}))
