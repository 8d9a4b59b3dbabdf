"""CPU schedules that read the target's SIMD unit: vector width and registers per ISA (AVX-512,
AVX2, NEON, SVE), the forward's pixel padding that follows the vector width, kernels built for
targets this machine cannot run (AArch64: the generated assembly is checked), and the tuning
template's sampled decisions (every sample builds and computes the forward)."""
import re
from collections import Counter

import numpy as np
import pytest
import torch
import torchvision
import tvm
import tvm_ffi

import tvm_dcn
from tvm_dcn import kernel, ops
from tvm_dcn.ops.deform_conv import ConvGeometry, forward_workload, padded_pixels
from tvm_dcn.schedules import cpu_common, find, find_hand_point, find_template
from tvm_dcn.target import cpu_vector_unit

AVX512 = {"kind": "llvm", "mcpu": "znver5", "num-cores": 2}
AVX2 = {"kind": "llvm", "mcpu": "haswell", "num-cores": 2}
NEON = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"], "num-cores": 2}
SVE = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+sve"], "num-cores": 2}


def _layer(channels=16, size=9, dtype="float32", batch=1, groups=1):
    return forward_workload(batch=batch, in_channels=channels, height=size, width=size, out_channels=32,
                            kernel_size=(3, 3), padding=(1, 1), groups=groups, with_mask=True, dtype=dtype)


@pytest.mark.parametrize("target, isa, float_lanes, double_lanes, registers", [
    (AVX512, "avx512", 16, 8, 32),
    ({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mattr": ["+avx512f"]}, "avx512", 16, 8, 32),
    (AVX2, "avx2", 8, 4, 16),
    (NEON, "neon", 4, 2, 32),
    (SVE, "sve", 4, 2, 32),  # SVE treated as 128-bit NEON (its minimum width)
])
def test_vector_unit_of_target(target, isa, float_lanes, double_lanes, registers):
    unit = cpu_vector_unit(target)
    assert (unit.isa, unit.lanes("float32"), unit.lanes("float64"), unit.registers) == (
        isa, float_lanes, double_lanes, registers)
    assert cpu_common.vector_lanes("float32", tvm.target.Target(target)) == float_lanes
    assert cpu_common.vector_registers(tvm.target.Target(target)) == registers


def test_vector_unit_rejects_gpu_targets():
    with pytest.raises(ValueError, match="not a CPU"):
        cpu_vector_unit({"kind": "cuda", "arch": "sm_80"})


def test_pixel_padding_follows_the_vector_width():
    wl = _layer(size=7)  # 49 pixels
    wide = ops.for_target(wl, tvm.target.Target(AVX512))
    assert wide["pixel_align"] == 16 and ConvGeometry(wide).padded_pixels == 64
    # AVX2, NEON, float64 on AVX-512, and the kind name alone: the workload (and its PrimFunc) as it was.
    assert ops.for_target(wl, tvm.target.Target(AVX2)) is wl
    assert ops.for_target(wl, tvm.target.Target(NEON)) is wl
    assert ops.for_target(_layer(size=7, dtype="float64"), tvm.target.Target(AVX512)) == _layer(size=7, dtype="float64")
    assert ops.for_target(wl, "llvm") is wl
    assert ConvGeometry(wl).padded_pixels == 56
    assert ops.for_target(wide, tvm.target.Target(AVX512)) is wide  # already has it
    # Backward workloads keep their padding (their schedules and records are unchanged).
    grad = tvm_dcn.ops.deform_conv.backward_data_workload(wl, need_input=True, need_sampling=True)
    assert ops.for_target(grad, tvm.target.Target(AVX512)) is grad
    for pixels in range(1, 300):
        padded = padded_pixels(pixels, 16)
        assert padded % 16 == 0 and 0 <= padded - pixels < 16


def test_pixel_align_is_validated():
    bad = tvm_dcn.Workload.make("deform_conv2d", "float32", **{**dict(_layer().params), "pixel_align": 12})
    with pytest.raises(ValueError, match="pixel_align"):
        ConvGeometry(bad)


@pytest.mark.parametrize("registers, pixel_vectors, tile", [
    (16, 98, (4, 2)), (16, 7, (8, 1)),  # AVX2: 4 x 2 where the vectors pair up, else 8 x 1
    (32, 49, (16, 1)), (32, 13, (16, 1)), (32, 4, (8, 2)),  # AVX-512, AArch64
])
def test_register_tile_per_register_count(registers, pixel_vectors, tile):
    assert cpu_common.register_tile(128, pixel_vectors, registers) == tile
    rows, vectors = cpu_common.register_tile(12, pixel_vectors, registers)
    assert 12 % rows == 0 and pixel_vectors % vectors == 0 and rows * vectors <= registers // 2


def _fma_forms(asm: str) -> Counter:
    return Counter(re.sub(r"[0-9]+", "N", line.strip().split("//")[0].strip())
                   for line in asm.splitlines() if "fmla" in line or "vfmadd" in line)


@pytest.mark.parametrize("target, register_form", [
    (NEON, "fmla\tvN.Ns, vN.Ns, vN.s[N]"),   # by-element FMAs on 4 x float32
    (SVE, "fmla\tvN.Ns, vN.Ns, vN.s[N]"),
])
def test_aarch64_forward_builds_with_128_bit_vectors(target, register_form):
    """Built for AArch64 (not run: no ARM machine here): 4-lane float32 vectors, and the GEMM's
    FMAs take the weight as a vector element."""
    source, mod = kernel.scheduled_module(_layer(), target, schedule="hand")
    assert source == "hand"
    asm = tvm.compile(mod, target=target).mod.inspect_source("s")
    forms = _fma_forms(asm)
    assert forms[register_form] > 0
    assert not any("zmm" in form or "ymm" in form for form in forms)
    assert re.search(r"\bv\d+\.4s\b", asm)


def test_avx512_gemm_uses_16_lanes_and_embedded_broadcasts():
    # 36 pixels: 3 vectors of 16, the 16 x 1 tile, each row's weight a broadcast memory operand.
    source, mod = kernel.scheduled_module(_layer(size=6), AVX512, schedule="hand")
    forms = _fma_forms(tvm.compile(mod, target=AVX512).mod.inspect_source("s"))
    assert any("{NtoN}, %zmmN, %zmmN" in form for form in forms)
    # 81 pixels: 6 vectors, the 8 x 2 tile: 16-lane FMAs too.
    source, mod = kernel.scheduled_module(_layer(size=9), AVX512, schedule="hand")
    forms = _fma_forms(tvm.compile(mod, target=AVX512).mod.inspect_source("s"))
    assert sum(count for form, count in forms.items() if form.endswith("%zmmN, %zmmN")) >= 16
    source, mod = kernel.scheduled_module(_layer(), AVX2, schedule="hand")
    forms = _fma_forms(tvm.compile(mod, target=AVX2).mod.inspect_source("s"))
    assert forms and not any("zmm" in form for form in forms)


def _run(lib, wl, generator):
    geo = ConvGeometry(wl)
    x = torch.randn(1, geo.in_channels, geo.height, geo.width, generator=generator)
    offset = torch.randn(1, 18, geo.out_h, geo.out_w, generator=generator) * 2
    mask = torch.rand(1, 9, geo.out_h, geo.out_w, generator=generator)
    weight = torch.randn(geo.out_channels, geo.in_channels, 3, 3, generator=generator)
    out = torch.zeros(1, geo.out_channels, geo.pixels)
    lib["main"](x.reshape(1, geo.in_channels, -1), offset.reshape(1, 18, -1), mask.reshape(1, 9, -1),
                weight.reshape(geo.out_channels, -1), out)
    expected = torchvision.ops.deform_conv2d(x, offset, weight, padding=1, mask=mask)
    torch.testing.assert_close(out.reshape(expected.shape), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("channels, size", [(16, 9), (32, 7)])
def test_tuning_template_samples_build_and_compute_the_forward(channels, size):
    """The hand schedule as a design space (``sampled=True``): schedules drawn from it with other
    random decisions (tiles, vector widths, parallel splits, loop orders) build for this CPU and
    give torchvision's forward."""
    target = tvm_dcn.target.as_target(None)
    wl = ops.for_target(_layer(channels, size), target)
    template = find_template("deform_conv2d", "llvm")
    generator = torch.Generator().manual_seed(0)
    traces = set()
    for seed in range(1, 5):
        sch = tvm.s_tir.Schedule(ops.ir_module(wl), seed=seed)
        template(sch, wl, target)
        traces.add(str(sch.trace))
        _run(tvm.compile(sch.mod, target=target), wl, generator)
    assert len(traces) > 1  # the decisions differ from seed to seed


def test_template_decisions_are_replayed_not_frozen():
    """A sampled trace replayed with another decision gives another schedule (a loop order or a
    vector width chosen in Python would be frozen into the trace)."""
    target = tvm_dcn.target.as_target(None)
    wl = ops.for_target(_layer(16, 9), target)
    sch = tvm.s_tir.Schedule(ops.ir_module(wl), seed=1)
    find_template("deform_conv2d", "llvm")(sch, wl, target)
    categorical = [inst for inst in sch.trace.insts if inst.kind.name == "SampleCategorical"]
    assert categorical
    inst = categorical[-1]
    candidates = [int(c) for c in inst.attrs[0]]
    decision = int(sch.trace.decisions[inst])
    other = next(i for i in range(len(candidates)) if i != decision)
    replayed = tvm.s_tir.Schedule(ops.ir_module(wl))
    sch.trace.with_decision(inst, other, remove_postproc=True).apply_to_schedule(replayed, remove_postproc=False)
    assert replayed.mod.script() != sch.mod.script()
    _run(tvm.compile(replayed.mod, target=target), wl, torch.Generator().manual_seed(1))


@pytest.mark.parametrize("channels, height, width", [(192, 20, 30), (128, 28, 28), (384, 12, 12), (96, 9, 9)])
def test_parallel_tasks_are_shared_evenly_by_the_cores(channels, height, width):
    """Every parallel loop of the forward gives each of 2 cores the same number of tasks, or many
    tasks each: 3 GEMM tasks on 2 cores (192 channels, 64-row blocks) left one core idle for a third
    of the GEMM (now 48-row blocks, 4 tasks)."""
    target = tvm.target.Target({"kind": "llvm", "mcpu": "znver5", "num-cores": 2})
    wl = forward_workload(batch=1, in_channels=channels, height=height, width=width, out_channels=channels,
                          kernel_size=(3, 3), padding=(1, 1), with_mask=True)
    _, mod = kernel.scheduled_module(wl, target, schedule="hand")
    extents = _parallel_extents(mod)
    assert extents and all(e % 2 == 0 or e >= 8 for e in extents), extents


def _parallel_extents(mod) -> list[int]:
    from tvm import tirx

    extents = []

    def visit(node):
        if node.kind == tirx.ForKind.PARALLEL:
            extents.append(int(node.extent))

    tvm_ffi.structural_walk(mod["main"], [(tirx.For, visit)], order="post")
    return extents


@pytest.mark.parametrize("dtype, size, regions", [
    # 49 pixels padded to 64, two 2-vector tile columns: one GEMM task per core, each computing
    # its columns; the output drops the padding in the same tasks.
    ("float32", 7, 2),
    ("float32", 8, 2),    # 64 pixels: the output written from the GEMM's registers
    ("float32", 9, 3),    # 81 pixels, 3 tile columns: 3 tasks on 2 cores; a columns region
    ("float64", 7, 3),    # 7 one-vector tile columns on 2 cores: a columns region
    ("bfloat16", 7, 3),   # the columns' pairs per stripe, in the columns' tasks
    ("float16", 7, 3),    # + the weight widened once; columns in the GEMM's tasks
])
def test_channels_last_forward_runs_in_few_parallel_regions(dtype, size, regions):
    """Transposition, columns (with the sampling stages per stripe) and GEMM (with the output),
    the columns in the GEMM's tasks where those are shared evenly by the cores
    (``columns_in_gemm_tasks``): each parallel loop wakes the other workers (~15 us on 2 cores
    here), so stages that can share one do."""
    target = tvm.target.Target({"kind": "llvm", "mcpu": "znver5", "num-cores": 2})
    wl = _layer(channels=32, size=size, dtype=dtype)
    _, mod = kernel.scheduled_module(wl, target, schedule="hand")
    assert len(_parallel_extents(mod)) == regions, mod.script()


@pytest.mark.parametrize("target, channels, size, expected", [
    (AVX512, 128, 28, True),    # 576 KB weight, 49 one-vector tile columns: many tasks per core
    (AVX512, 512, 7, False),    # a 9 MB weight
    (AVX512, 256, 14, False),   # a 2.25 MB weight, read by every task
    ({**AVX512, "num-cores": 16}, 128, 28, False),  # 49 tasks on 16 cores: uneven
    (AVX2, 128, 28, False),     # 576 KB does not stay in the L2 of AVX2 parts
    (AVX2, 64, 28, True),       # 144 KB does (256 KB on Haswell)
])
def test_columns_in_gemm_tasks_follows_weight_size_and_task_balance(target, channels, size, expected):
    from tvm_dcn.schedules.cpu_deform_conv2d import columns_in_gemm_tasks, geometry

    target = tvm.target.Target(target)
    wl = ops.for_target(forward_workload(batch=1, in_channels=channels, height=size, width=size,
                                         out_channels=channels, kernel_size=(3, 3), padding=(1, 1),
                                         with_mask=True), target)
    geo, lanes = geometry(wl, target)
    assert columns_in_gemm_tasks(wl, geo, lanes, target) == expected
    _, mod = kernel.scheduled_module(wl, target, schedule="hand")
    assert len(_parallel_extents(mod)) == (2 if expected else 3)


@pytest.mark.parametrize("batch, groups, offset_groups, with_bias, dtype", [
    (1, 1, 1, False, "float32"),
    (2, 2, 2, True, "float32"),
    (1, 1, 1, True, "float64"),
    (2, 1, 1, False, "float16"),
    (1, 32, 1, False, "bfloat16"),  # one channel per group: no dot product (9 reduction rows)
])
def test_forward_with_columns_in_gemm_tasks_matches_torchvision(batch, groups, offset_groups, with_bias, dtype):
    """The forward whose columns are sampled inside the GEMM's tasks (32 channels, 8 x 8 pixels:
    a small weight and a few tile columns per image), built for this CPU with 2 cores, against
    torchvision in float64."""
    from tvm_dcn.schedules.cpu_deform_conv2d import columns_in_gemm_tasks, geometry

    target = tvm.target.Target({**tvm_dcn.target.target_config(tvm_dcn.target.as_target(None)), "num-cores": 2})
    wl = ops.for_target(forward_workload(batch=batch, in_channels=32, height=8, width=8, out_channels=32,
                                         kernel_size=(3, 3), padding=(1, 1), groups=groups,
                                         offset_groups=offset_groups, with_mask=True, with_bias=with_bias,
                                         dtype=dtype), target)
    geo, lanes = geometry(wl, target)
    assert columns_in_gemm_tasks(wl, geo, lanes, target)
    lib = kernel.compile(wl, target, schedule="hand")
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(batch, 32, 8, 8, generator=generator, dtype=torch.float64)
    offset = torch.randn(batch, 18 * offset_groups, 8, 8, generator=generator, dtype=torch.float64) * 2
    mask = torch.rand(batch, 9 * offset_groups, 8, 8, generator=generator, dtype=torch.float64)
    weight = torch.randn(32, 32 // groups, 3, 3, generator=generator, dtype=torch.float64)
    bias = torch.randn(32, generator=generator, dtype=torch.float64) if with_bias else None
    torch_dtype = getattr(torch, dtype)
    # The inputs rounded to the kernel's dtype, the reference in float64 on the rounded values.
    x, offset, mask, weight = (t.to(torch_dtype).double() for t in (x, offset, mask, weight))
    bias = bias.to(torch_dtype).double() if with_bias else None
    args = [x.reshape(batch, 32, -1), offset.reshape(batch, 18 * offset_groups, -1),
            mask.reshape(batch, 9 * offset_groups, -1), weight.reshape(32, -1)] + ([bias] if with_bias else [])
    out = torch.zeros(batch, 32, 64, dtype=torch_dtype)
    lib(*[a.to(torch_dtype).contiguous() for a in args], out)
    expected = torchvision.ops.deform_conv2d(x, offset, weight, bias, padding=1, mask=mask)
    tolerance = {"float32": 1e-4, "float64": 1e-10, "float16": 2e-3, "bfloat16": 1e-2}[dtype]
    torch.testing.assert_close(out.double().reshape(expected.shape), expected, rtol=tolerance,
                               atol=tolerance * max(1.0, expected.abs().max().item()))


def test_info_prints_the_vector_unit_and_the_bfloat16_gemm(capsys):
    from tvm_dcn import cli

    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    unit = cpu_vector_unit(None)
    assert f"target tag:     {tvm_dcn.target_tag(None)}" in out
    assert f"vector unit:    {unit.isa}, {unit.vector_bits}-bit x {unit.registers} registers" in out
    assert ("vdpbf16ps" in out) == unit.bf16_dot
    assert "TVM_BIND_THREADS=" in out


def _layer_workload(op: str, channels: int, dtype: str = "float32", size: int = 9, batch: int = 1, groups: int = 1):
    from tvm_dcn.ops.deform_conv import backward_data_workload, backward_weight_workload

    wl = _layer(channels, size, dtype, batch, groups)
    if op.endswith("data"):
        return backward_data_workload(wl, need_input=True, need_sampling=True)
    if op.endswith("weight"):
        return backward_weight_workload(wl, need_weight=True, need_bias=False)
    return wl


def _loop_shape(mod, block: str) -> tuple[list[int], list[int]]:
    """(extents of the loops above ``block`` that are not unit loops, in order; extents of every
    parallel loop of the kernel)."""
    sch = tvm.s_tir.Schedule(mod)
    try:
        gemm = sch.get_sblock(block)
    except tvm.s_tir.schedule.ScheduleError:
        gemm = sch.get_sblock(f"{block}_o")  # tensorized (bfloat16 dot product): the outer block
    extents = [int(sch.get(loop).extent) for loop in sch.get_loops(gemm)]
    return [e for e in extents if e != 1], _parallel_extents(mod)


_GEMM_BLOCK = {"deform_conv2d": "gemm_update", "deform_conv2d_backward_data": "grad_col_update",
               "deform_conv2d_backward_weight": "grad_weight_update"}  # after decompose_reduction


@pytest.mark.parametrize("target", [AVX512, AVX2])
@pytest.mark.parametrize("op, channels, dtype, size, batch, groups", [
    ("deform_conv2d", 32, "float32", 9, 1, 1),    # channels-last columns; 2-vector tiles on AVX-512
    ("deform_conv2d", 32, "float32", 7, 1, 1),    # 4 (AVX-512) or 7 (AVX2) pixel vectors
    ("deform_conv2d", 32, "float32", 9, 2, 2),    # batch and convolution groups
    ("deform_conv2d", 12, "float32", 9, 1, 1),    # gather columns
    ("deform_conv2d", 32, "float64", 9, 1, 1),
    ("deform_conv2d", 32, "bfloat16", 9, 1, 1),   # AVX512-BF16's dot product on Zen 5: pairs per stripe
    ("deform_conv2d_backward_data", 32, "float32", 9, 1, 1),
    ("deform_conv2d_backward_data", 32, "bfloat16", 9, 1, 1),    # AVX512-BF16's dot product on Zen 5
    ("deform_conv2d_backward_weight", 32, "float32", 9, 1, 1),
    ("deform_conv2d_backward_weight", 32, "bfloat16", 9, 1, 1),  # AVX512-BF16's dot product on Zen 5
])
def test_hand_point_has_the_hand_schedules_tiles_and_tasks(target, op, channels, dtype, size, batch, groups):
    """The hand choices expressed as the template's decisions (the tuner's starting point): the
    GEMM's loops (tiles, task shape, order) and every parallel loop as in the hand schedule (only
    unit loops added), every decision supplied, not drawn (schedules of different random seeds
    agree), and decisions there to mutate."""
    target = tvm.target.Target(target)
    wl = ops.for_target(_layer_workload(op, channels, dtype, size, batch, groups), target)
    modules = {}
    for name, find_schedule in (("hand", find), ("point", find_hand_point)):
        sch = tvm.s_tir.Schedule(ops.ir_module(wl), seed=1)
        find_schedule(op, "llvm")(sch, wl, target)
        modules[name] = sch
    assert any(inst.kind.name == "SamplePerfectTile" for inst in modules["point"].trace.insts)
    block = _GEMM_BLOCK[op]
    if op.endswith("weight") and dtype in ("bfloat16", "float16"):
        block = "grad_weight_sum_update"  # float32 sums, rounded once
    assert _loop_shape(modules["point"].mod, block) == _loop_shape(modules["hand"].mod, block)
    for seed in (2, 3):
        other = tvm.s_tir.Schedule(ops.ir_module(wl), seed=seed)
        find_hand_point(op, "llvm")(other, wl, target)
        tvm.ir.assert_structural_equal(other.mod, modules["point"].mod)


@pytest.mark.parametrize("op, channels", [("deform_conv2d", 32), ("deform_conv2d", 12),
                                          ("deform_conv2d_backward_data", 32),
                                          ("deform_conv2d_backward_weight", 32)])
def test_hand_point_computes_as_the_hand_schedule(op, channels):
    target = tvm_dcn.target.as_target(None)  # run here
    wl = ops.for_target(_layer_workload(op, channels), target)
    definition = ops.registry.build(wl)
    inputs_n = len(definition.args) - definition.num_outputs
    generator = torch.Generator().manual_seed(4)
    inputs = [torch.randn([int(x) for x in t.shape], generator=generator) for t in definition.args[:inputs_n]]
    results = {}
    for name, find_schedule in (("hand", find), ("point", find_hand_point)):
        sch = tvm.s_tir.Schedule(ops.ir_module(wl))
        find_schedule(op, "llvm")(sch, wl, target)
        outputs = [torch.zeros([int(x) for x in t.shape]) for t in definition.args[inputs_n:]]
        tvm.compile(sch.mod, target=target)["main"](*inputs, *outputs)
        results[name] = outputs
    for hand, found in zip(results["hand"], results["point"]):
        torch.testing.assert_close(found, hand, rtol=1e-5, atol=1e-4)


def _extreme_tiles(decision: list[int], max_innermost: int) -> list[list[int]]:
    """Other factorisations of a perfect tile: everything in one position (the innermost only up
    to ``max_innermost``), the rest unit extents, which is where a loop count changes."""
    extent = 1
    for factor in decision:
        extent *= factor
    tiles = []
    for position in range(len(decision)):
        if position == len(decision) - 1 and extent > max_innermost:
            continue
        tiles.append([extent if i == position else 1 for i in range(len(decision))])
    return [t for t in tiles if t != decision]


@pytest.mark.parametrize("op", ["deform_conv2d", "deform_conv2d_backward_data", "deform_conv2d_backward_weight"])
def test_every_tile_decision_of_the_template_replays(op):
    """MetaSchedule's search mutates one decision of a trace and replays it; an instruction whose
    outputs depend on the decisions (GetLoops under a compute-at) then fails the replay, and the
    error stops the whole search. From the hand point, every perfect tile moved to its extremes
    must replay."""
    target = tvm_dcn.target.as_target(None)
    wl = ops.for_target(_layer_workload(op, 32), target)
    sch = tvm.s_tir.Schedule(ops.ir_module(wl))
    find_hand_point(op, "llvm")(sch, wl, target)
    tiles = [inst for inst in sch.trace.insts if inst.kind.name == "SamplePerfectTile"]
    assert tiles
    replays = 0
    for inst in tiles:
        decision = [int(f) for f in sch.trace.decisions[inst]]
        for other in _extreme_tiles(decision, int(inst.attrs[1])):
            replayed = tvm.s_tir.Schedule(ops.ir_module(wl))
            sch.trace.with_decision(inst, other, remove_postproc=True).apply_to_schedule(replayed,
                                                                                       remove_postproc=False)
            replays += 1
    assert replays
