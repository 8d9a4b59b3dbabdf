"""Where the time of the forward deformable convolution goes, per layer of a workload set.

The forward kernel is sampling (coordinates, bilinear corners, deformable im2col; in the
channels-last formulation also the input's transposition) followed by a GEMM. This builds the two
parts as separate kernels with the CPU hand schedule's own pieces and times them on random data
(offsets ~ N(0, 2), as ``tvm-dcn bench``), next to ``torch.mm`` (MKL / oneDNN sgemm) of the same
GEMM shape and a large square sgemm, the practical FLOP ceiling here. A layer can run no faster
than its GEMM, so this bounds what any forward schedule can reach. The machine's float32 FMA
peak (``fma_peak``: independent FMA chains in vector registers, no memory operand, on one and
on all threads) gives each GEMM's share of the hardware's limit.

    python examples/forward_breakdown.py [--workloads resnet50-dcn-224]
"""
from __future__ import annotations

import argparse
import statistics
import time

import tvm_dcn  # before torch: thread-pool policies (README, "Threads")
import numpy as np
import torch
import tvm
from tvm import te

from tvm_dcn import ops, schedules, workloads
from tvm_dcn.bench import layer_name
from tvm_dcn.ops.deform_conv import (COLUMNS_GATHER, FORWARD, ConvGeometry, Placeholders, columns_formulation,
                                     forward_columns, forward_gemm, sampling_stages)
from tvm_dcn.target import as_target
from tvm_dcn.schedules import cpu_common, cpu_deform_conv2d


def fma_peak(target, threads: int, chains: int = 12, iters: int = 4_000_000) -> float:
    """GFLOP/s of ``threads`` threads each running ``chains`` independent FMA chains
    (acc = acc * a + b) on whole float32 vectors that stay in registers: the FMA units' limit."""
    lanes = cpu_common.vector_lanes("float32", target)
    chain = te.comm_reducer(lambda acc, b: acc * tvm.tirx.const(0.99999988, "float32") + b,
                            lambda dtype: tvm.tirx.const(0, dtype), name="fma_chain")
    step = te.reduce_axis((0, iters), name="step")
    out = te.compute((threads, chains, lanes), lambda t, c, l: chain(tvm.tirx.const(1e-7, "float32"), axis=step),
                     name="out")
    sch = tvm.s_tir.Schedule(te.create_prim_func([out]))
    block = sch.get_sblock("out")
    t, c, lane, step = sch.get_loops(block)
    sch.reorder(t, step, c, lane)
    sch.parallel(t)
    accumulators = sch.cache_write(block, 0, "local")
    sch.reverse_compute_at(accumulators, t)
    sch.unroll(c)
    sch.vectorize(lane)
    sch.decompose_reduction(block, step)
    lib = tvm.compile(sch.mod, target=target)
    result = tvm.runtime.tensor(np.zeros((threads, chains, lanes), "float32"), tvm.cpu())
    seconds = min(lib.mod.time_evaluator("main", tvm.cpu(), number=1, repeat=7)(result).results)
    return 2 * threads * chains * lanes * iters / seconds / 1e9


def _columns_layout(wl, geo, lanes):
    """(shape the GEMM indexes the columns by, shape they are stored in, index map or None)."""
    if columns_formulation(wl) == COLUMNS_GATHER:
        shape = (geo.batch, geo.reduction, geo.padded_pixels)
        return shape, shape, None
    shape = (geo.batch, geo.in_channels, geo.taps, geo.padded_pixels)
    if not cpu_deform_conv2d.has_column_stripes(geo, lanes):
        return shape, shape, None
    # As the sampling kernel stores them: stripes of one pixel vector.
    stored = (geo.batch, geo.padded_pixels // lanes, geo.in_channels, geo.taps, lanes)
    return shape, stored, cpu_deform_conv2d.column_stripes(lanes)


def sampling_kernel(wl, target):
    """input, offset[, mask] -> deformable columns (in the forward's formulation, as stored),
    hand-scheduled as in the forward kernel: (library, argument tensors)."""
    wl = ops.for_target(wl, target)
    geo, lanes = cpu_deform_conv2d.geometry(wl, target)
    t = Placeholders(geo, False)
    columns = forward_columns(wl, geo, t.data, *sampling_stages(geo, t.offset, t.mask))
    sch = tvm.s_tir.Schedule(tvm.IRModule({"main": te.create_prim_func(t.sampling_args() + [columns])}))
    cpu_deform_conv2d.forward_columns(sch, wl, geo, lanes)
    stored = te.placeholder(_columns_layout(wl, geo, lanes)[1], geo.dtype, name="columns")
    return tvm.compile(sch.mod, target=target), t.sampling_args() + [stored]


def gemm_kernel(wl, target):
    """weight x columns (the columns in the forward's formulation, as stored), hand-scheduled as
    in the forward kernel (groups = 1): (library, argument tensors)."""
    wl = ops.for_target(wl, target)
    geo, lanes = cpu_deform_conv2d.geometry(wl, target)
    weight = te.placeholder((geo.out_channels, geo.reduction), geo.dtype, name="weight")
    shape, stored_shape, stripes = _columns_layout(wl, geo, lanes)
    stored = columns = te.placeholder(stored_shape, geo.dtype, name="columns")
    if stripes is not None:
        columns = te.compute(shape, lambda *i: stored[stripes(*i)], name="columns_view")
    gemm = forward_gemm(geo, weight, columns)
    sch = tvm.s_tir.Schedule(tvm.IRModule({"main": te.create_prim_func([weight, stored, gemm])}))
    if stored is not columns:
        sch.compute_inline(sch.get_sblock("columns_view"))
    cpu_common.blocked_gemm(sch, "gemm", group_rows=geo.out_channels, batch_rows=geo.batch * geo.out_channels,
                            pixel_vectors=geo.padded_pixels // lanes, lanes=lanes,
                            cores=cpu_common.core_count(target), registers=cpu_common.vector_registers(target))
    return tvm.compile(sch.mod, target=target), [weight, stored, gemm]


def tvm_ms(lib, tensors, rng) -> float:
    def data(t):
        shape = [int(x) for x in t.shape]
        if t.name == "offset":
            return rng.standard_normal(shape) * 2
        return rng.uniform(0, 1, shape) if t.name == "mask" else rng.standard_normal(shape)
    args = [tvm.runtime.tensor(data(t).astype(str(t.dtype)), tvm.cpu()) for t in tensors]
    return lib.mod.time_evaluator("main", tvm.cpu(), number=20, repeat=7)(*args).median * 1e3


def torch_ms(fn, repeats: int = 30) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", default="resnet50-dcn-224")
    args = parser.parse_args()
    target = as_target(None)
    if schedules.find(FORWARD, "llvm") is None:
        raise SystemExit("no CPU hand schedule found")
    rng = np.random.default_rng(0)
    threads = cpu_common.core_count(target)
    peaks = {n: fma_peak(target, n) for n in sorted({1, threads})}
    peak = peaks[threads]
    print("float32 FMA peak (register-only chains): "
          + ", ".join(f"{p:.0f} GFLOP/s on {n} thread{'s' * (n > 1)}" for n, p in peaks.items()))
    big = torch.randn(1024, 1024)
    mm_peak = 2 * 1024 ** 3 / torch_ms(lambda: torch.mm(big, big), 10) / 1e6
    print(f"torch.mm 1024^3: {mm_peak:.0f} GFLOP/s ({torch.get_num_threads()} threads)")
    print(f"{'layer':<36} {'columns':>13} {'sampling ms':>11} {'gemm ms':>8} {'torch.mm ms':>11} "
          f"{'gemm GFLOP/s':>12} {'of peak':>7}")
    for wl, _ in workloads.unique_with_counts(workloads.load(args.workloads)):
        if wl.op != FORWARD:
            continue
        geo = ConvGeometry(wl)
        if geo.groups != 1:
            continue
        sampling = tvm_ms(*sampling_kernel(wl, target), rng)
        gemm = tvm_ms(*gemm_kernel(wl, target), rng)
        a, b = torch.randn(geo.out_channels, geo.reduction), torch.randn(geo.reduction, geo.pixels)
        mm = torch_ms(lambda: torch.mm(a, b))
        flops = 2 * geo.out_channels * geo.reduction * geo.pixels * geo.batch
        print(f"{layer_name(wl):<36} {columns_formulation(wl):>13} {sampling:>11.3f} {gemm:>8.3f} {mm:>11.3f} "
              f"{flops / gemm / 1e6:>12.0f} {flops / gemm / 1e6 / peak:>7.0%}")


if __name__ == "__main__":
    main()
