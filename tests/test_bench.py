"""`tvm-dcn bench` on a tiny workload file: every candidate is timed, each tvm-dcn column really
uses its schedule source for every kernel (forward and backward), and the result files are written.
No timing is asserted (speed targets live in the benchmark's own output)."""
from __future__ import annotations

import collections
import json

import pytest

import tvm_dcn
from tvm_dcn import bench, cli, kernel, workloads
from tvm_dcn.ops.deform_conv import forward_workload
from tvm_dcn.ops.roi_align import roi_align_workload

CONV = forward_workload(batch=1, in_channels=4, height=6, width=5, out_channels=4, kernel_size=(3, 3),
                        padding=(1, 1), with_mask=True)
# 8 channels: the channels-last column formulation (4 channels gather).
CONV8 = forward_workload(batch=1, in_channels=8, height=6, width=5, out_channels=4, kernel_size=(3, 3),
                         padding=(1, 1), with_mask=True)
ROI = roi_align_workload(batch=1, channels=4, height=6, width=7, num_rois=8, output_size=(2, 2),
                         sampling_ratio=2)


@pytest.fixture
def workload_file(tmp_path):
    tvm_dcn.clear_memory_cache()
    path = tmp_path / "tiny.json"
    workloads.save(path, [CONV, CONV, ROI])
    yield path
    tvm_dcn.clear_memory_cache()


@pytest.fixture
def compile_log(monkeypatch):
    """(candidate being timed, requested schedule source, op) for every kernel request."""
    log = []
    original = kernel.compile

    def spy(workload, target=None, *, schedule=None, **kw):
        log.append((schedule or kernel._preferred_schedule.source, workload.op))
        return original(workload, target, schedule=schedule, **kw)

    monkeypatch.setattr(kernel, "compile", spy)
    return log


def test_bench_writes_table_json_and_plot(workload_file, tmp_path, capsys):
    assert cli.main(["bench", "--workloads", str(workload_file), "--repeats", "2",
                     "--output-dir", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    folder = tmp_path / "out" / tvm_dcn.target_tag(None)
    data = json.loads((folder / "bench.json").read_text())
    assert data["workload_set"] == str(workload_file)
    cases = {(r["layer"], r["mode"]): r for r in data["results"]}
    conv_name, roi_name = bench.case_name(CONV), bench.case_name(ROI)
    assert set(cases) == {(n, m) for n in (conv_name, roi_name) for m in bench.MODES}
    assert cases[(conv_name, "forward")]["count"] == 2
    for result in cases.values():
        # No tuning record exists for these shapes: the tuned column is left out, not faked.
        assert {"tvm-dcn default", "tvm-dcn hand", "torchvision"} <= set(result["times_ms"])
        assert "tvm-dcn tuned" not in result["times_ms"]
        assert all(ms > 0 for ms in result["times_ms"].values())
        for name, err in result["max_abs_err"].items():
            assert err < 1e-4, (result["layer"], result["mode"], name, err)
    assert "dense conv2d" in cases[(conv_name, "forward")]["times_ms"]
    for mode in bench.MODES:
        assert set(data["geomean_speedup_over_torchvision"][mode]) >= {"tvm-dcn hand", "torchvision"}
    table = (folder / "bench.md").read_text()
    assert "| **geomean speed-up** |" in table and conv_name in table and conv_name in printed
    assert (folder / "bench.png").stat().st_size > 0


def test_each_column_uses_its_schedule_for_backward_too(workload_file, compile_log):
    results = bench.run(str(workload_file), modes=("forward+backward",), schedules=("default", "hand"),
                        repeats=1, output_dir=None, log=lambda line: None)
    assert [r.mode for r in results] == ["forward+backward"] * 2
    ops_by_source = {}
    for source, op in compile_log:
        ops_by_source.setdefault(source, set()).add(op)
    for source in ("default", "hand"):
        assert {"deform_conv2d", "deform_conv2d_backward_data", "deform_conv2d_backward_weight"} <= \
            ops_by_source[source], source
    # Kernels built outside a forced column would show up as "best available" (None).
    assert None not in ops_by_source


@pytest.mark.parametrize("conv", [CONV, CONV8], ids=["gather", "channels_last"])
def test_forward_breakdown_parts_compute_the_forward(conv, capsys, monkeypatch, workload_file):
    """examples/forward_breakdown.py times sampling and GEMM as separate kernels: composed, they
    give torchvision's forward (in both column formulations); and the script runs on a workload file."""
    import importlib.util  # noqa: PLC0415
    import sys  # noqa: PLC0415
    from pathlib import Path  # noqa: PLC0415

    import numpy as np  # noqa: PLC0415
    import torch  # noqa: PLC0415
    import torchvision  # noqa: PLC0415
    import tvm  # noqa: PLC0415

    from tvm_dcn.ops.deform_conv import columns_formulation  # noqa: PLC0415

    assert columns_formulation(conv) == ("gather" if conv is CONV else "channels_last")
    path = Path(__file__).parents[1] / "examples" / "forward_breakdown.py"
    spec = importlib.util.spec_from_file_location("forward_breakdown", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    target = tvm_dcn.target.as_target(None)
    geo = tvm_dcn.ops.deform_conv.ConvGeometry(conv)
    channels = geo.in_channels
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, channels, 6, 5, generator=g)
    offset = torch.randn(1, 18, 6, 5, generator=g) * 2
    mask = torch.rand(1, 9, 6, 5, generator=g)
    weight = torch.randn(4, channels, 3, 3, generator=g)
    sampling, _ = example.sampling_kernel(conv, target)
    gemm, gemm_args = example.gemm_kernel(conv, target)
    columns = tvm.runtime.tensor(np.zeros([int(d) for d in gemm_args[1].shape], "float32"), tvm.cpu())
    out = tvm.runtime.tensor(np.zeros((1, 4, geo.padded_pixels), "float32"), tvm.cpu())
    sampling.mod["main"](*(tvm.runtime.tensor(t.reshape(1, t.shape[1], -1).numpy(), tvm.cpu())
                           for t in (x, offset, mask)), columns)
    gemm.mod["main"](tvm.runtime.tensor(weight.reshape(4, -1).numpy(), tvm.cpu()), columns, out)
    expected = torchvision.ops.deform_conv2d(x, offset, weight, padding=1, mask=mask)
    torch.testing.assert_close(torch.from_numpy(out.numpy()[:, :, :geo.pixels]), expected.reshape(1, 4, -1))

    monkeypatch.setattr(sys, "argv", ["forward_breakdown.py", "--workloads", str(workload_file)])
    example.main()
    assert "dcnv2 b1 4x6x5->4 k3x3 s1" in capsys.readouterr().out


def test_timed_calls_follow_the_offset_convolution_in_balanced_orders(monkeypatch):
    """Every timed call runs right after the layer's (untimed) offset convolution, and the
    candidates run in balanced orders (not a rotation of one order), each repeat after the same
    untimed separator."""
    import torch  # noqa: PLC0415

    events = []

    def candidates(wl, mode, schedules):
        def make(name):
            def call():
                events.append(name)
                return torch.zeros(1)
            return call
        names = ("tvm-dcn hand", "tvm-dcn tuned", "torchvision", "dense conv2d")
        return {name: make(name) for name in names}, lambda: events.append("offset conv")

    x = torch.randn(1, 4, 6, 5)
    offset_conv = bench._offset_conv(CONV, x)
    assert tuple(offset_conv().shape) == (1, 27, 6, 5)  # 2 x 9 offsets and 9 mask channels per pixel
    monkeypatch.setattr(bench, "_conv_candidates", candidates)
    repeats = 12
    bench.run_case(CONV, 1, "forward", repeats=repeats, warmup=0, log=lambda line: None)
    timed = events[events.index("offset conv") - 1:]
    assert len(timed) == 9 * repeats
    orders = []
    for i in range(repeats):
        rep = timed[9 * i:9 * i + 9]
        # The untimed separator (the layer's dense convolution), then each candidate once, each
        # right after the offset convolution.
        assert rep[0] == "dense conv2d" and rep[1::2] == ["offset conv"] * 4
        orders.append(tuple(rep[2::2]))
    assert all(sorted(o) == sorted(orders[0]) for o in orders)
    # Within the repeats, each candidate follows each other one equally often (a rotated fixed
    # order gives 8 of the 12 ordered pairs, each candidate nearly always after the same one),
    # and each comes first (after the separator) equally often.
    pairs = collections.Counter()
    for order in orders:
        pairs.update(zip(order, order[1:]))
    assert len(pairs) == 12 and len(set(pairs.values())) == 1
    assert len(set(collections.Counter(order[0] for order in orders).values())) == 1


@pytest.mark.parametrize("n", range(1, 8))
def test_balanced_orders_are_permutations_with_every_succession_equally_often(n):
    orders = bench.balanced_orders(n)
    assert all(sorted(order) == list(range(n)) for order in orders)
    pairs = collections.Counter(pair for order in orders for pair in zip(order, order[1:]))
    assert len(pairs) == n * (n - 1) and len(set(pairs.values())) <= 1


def test_layers_repeats_are_interleaved(monkeypatch):
    """run_cases times repeat i of every layer (in a rotating order) before repeat i + 1 of any,
    so that a burst of load on the host hits every layer alike."""
    import torch  # noqa: PLC0415

    events = []

    def candidates(wl, mode, schedules):
        def make(name):
            def call():
                events.append((wl["in_channels"], name))
                return torch.zeros(1)
            return call
        return {name: make(name) for name in ("tvm-dcn hand", "torchvision", "dense conv2d")}, None

    monkeypatch.setattr(bench, "_conv_candidates", candidates)
    layers = [(forward_workload(batch=1, in_channels=c, height=6, width=5, out_channels=4, kernel_size=(3, 3),
                                padding=(1, 1), with_mask=True), 1) for c in (4, 8, 12)]
    repeats = 4
    results = bench.run_cases(layers, "forward", repeats=repeats, warmup=0, log=lambda line: None)
    assert [r.layer for r in results] == [bench.case_name(wl) for wl, _ in layers]
    assert all(len(r.times_ms) == 3 for r in results)
    # After set-up (each layer's reference, then its candidates once), blocks of 1 separator + 3
    # timed calls per layer.
    timed = events[3 * 4:]
    blocks = [timed[4 * i:4 * i + 4] for i in range(len(timed) // 4)]
    assert len(blocks) == repeats * 3
    layer_order = [block[0][0] for block in blocks]
    assert all(block[0][1] == "dense conv2d" and {c for c, _ in block} == {block[0][0]} for block in blocks)
    assert layer_order == [4, 8, 12, 8, 12, 4, 12, 4, 8, 4, 8, 12]
