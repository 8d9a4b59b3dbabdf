"""`tvm-dcn bench` on a tiny workload file: every candidate is timed, each tvm-dcn column really
uses its schedule source for every kernel (forward and backward), the peers (ONNX Runtime,
OpenVINO) compute torchvision's forward or are left out with a reason, and the result files are
written. No timing is asserted (speed targets live in the benchmark's own output)."""
from __future__ import annotations

import collections
import json
import sys

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
    # The installed peers join the forward deformable convolutions only (no backward, no RoI Align).
    installed = bench.available_peers(log=lambda line: None)
    assert set(data["environment"]["peers"]) == set(installed)
    for (layer, mode), result in cases.items():
        peers = set(bench.PEERS) & set(result["times_ms"])
        assert peers == (set(installed) if (layer, mode) == (conv_name, "forward") else set())
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


def _recording_candidates(events: list, names, prelude=None, label=lambda wl, name: name):
    """A stand-in for ``bench._conv_candidates``: candidates ``names`` that append
    ``label(workload, name)`` to ``events`` when called, and the untimed ``prelude``."""
    import torch  # noqa: PLC0415

    def candidates(wl, mode, schedules, peers=(), dtype="float32"):
        def make(name):
            def call():
                events.append(label(wl, name))
                return torch.zeros(1)
            return call
        return {name: make(name) for name in names}, prelude
    return candidates


def test_timed_calls_follow_the_offset_convolution_in_balanced_orders(monkeypatch):
    """Every timed call runs right after the layer's (untimed) offset convolution, and the
    candidates run in balanced orders (not a rotation of one order), each repeat after the same
    untimed separator."""
    import torch  # noqa: PLC0415

    events = []
    x = torch.randn(1, 4, 6, 5)
    offset_conv = bench._offset_conv(CONV, x)
    assert tuple(offset_conv().shape) == (1, 27, 6, 5)  # 2 x 9 offsets and 9 mask channels per pixel
    monkeypatch.setattr(bench, "_conv_candidates", _recording_candidates(
        events, ("tvm-dcn hand", "tvm-dcn tuned", "torchvision", "dense conv2d"),
        prelude=lambda: events.append("offset conv")))
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


def test_default_is_timed_in_a_phase_of_its_own(monkeypatch):
    """The unscheduled default (slow, mostly on one core) runs after every repeat of the others,
    ``slow_repeats`` times, so that it never runs just before another candidate's timed call."""
    events = []
    monkeypatch.setattr(bench, "_conv_candidates", _recording_candidates(
        events, ("tvm-dcn default", "tvm-dcn hand", "torchvision", "dense conv2d")))
    result = bench.run_case(CONV, 1, "forward", repeats=5, slow_repeats=2, warmup=0, log=lambda line: None)
    assert set(result.times_ms) == {"tvm-dcn default", "tvm-dcn hand", "torchvision", "dense conv2d"}
    # Set-up: torchvision's reference, each candidate once and the default's warm-up; then 5
    # repeats of the others (separator + 3 calls), then the default's 2 repeats after the separator.
    timed = events[6:]
    assert timed[:20].count("tvm-dcn default") == 0 and timed[:20].count("tvm-dcn hand") == 5
    assert timed[20:] == ["dense conv2d", "tvm-dcn default"] * 2


@pytest.mark.parametrize("n", range(1, 8))
def test_balanced_orders_are_permutations_with_every_succession_equally_often(n):
    orders = bench.balanced_orders(n)
    assert all(sorted(order) == list(range(n)) for order in orders)
    pairs = collections.Counter(pair for order in orders for pair in zip(order, order[1:]))
    assert len(pairs) == n * (n - 1) and len(set(pairs.values())) <= 1


def test_layers_repeats_are_interleaved(monkeypatch):
    """run_cases times repeat i of every layer (in a rotating order) before repeat i + 1 of any,
    so that a burst of load on the host hits every layer alike."""
    events = []
    monkeypatch.setattr(bench, "_conv_candidates", _recording_candidates(
        events, ("tvm-dcn hand", "torchvision", "dense conv2d"), label=lambda wl, name: (wl["in_channels"], name)))
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


# Grouped, two offset groups, unequal strides, paddings and dilations, a mask and a bias, batch 2.
ODD_CONV = forward_workload(batch=2, in_channels=8, height=9, width=7, out_channels=6, kernel_size=(3, 2),
                            stride=(2, 1), padding=(1, 2), dilation=(1, 2), groups=2, offset_groups=2,
                            with_mask=True, with_bias=True)
PLAIN_CONV = forward_workload(batch=1, in_channels=4, height=6, width=5, out_channels=4, kernel_size=(3, 3),
                              padding=(1, 1), with_mask=False, with_bias=False)


def _peer_matches_torchvision(peer_class, wl):
    import torch  # noqa: PLC0415
    import torchvision  # noqa: PLC0415

    inputs = bench._inputs(wl, torch.Generator().manual_seed(3))
    x, off, w, b, m = (inputs[k] for k in ("input", "offset", "weight", "bias", "mask"))
    # Offsets of up to several pixels: many taps sample across the border, where the peers must
    # blend with the zero padding as torchvision does.
    expected = torchvision.ops.deform_conv2d(x, off * 2, w, b, mask=m, **bench._conv_kwargs(wl))
    peer = peer_class(wl, w, b, threads=1)
    torch.testing.assert_close(peer(x, off * 2, m), expected, rtol=1e-5, atol=1e-5)
    return peer


@pytest.mark.parametrize("wl", [ODD_CONV, PLAIN_CONV], ids=["groups_offset_groups_mask_bias", "dcnv1"])
def test_onnxruntime_model_matches_torchvision(wl):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    import onnx  # noqa: PLC0415

    peer = _peer_matches_torchvision(bench.OnnxRuntimeDeformConv, wl)
    onnx.checker.check_model(peer.model)
    (node,) = peer.model.graph.node
    assert node.op_type == "DeformConv" and peer.model.opset_import[0].version == 19
    assert peer.session.get_session_options().intra_op_num_threads == 1


@pytest.mark.parametrize("wl", [ODD_CONV, PLAIN_CONV], ids=["groups_offset_groups_mask_bias", "dcnv1"])
def test_openvino_model_matches_torchvision(wl):
    pytest.importorskip("openvino")
    peer = _peer_matches_torchvision(bench.OpenVINODeformConv, wl)
    ops = {op.get_type_name() for op in peer.model.get_ops()}
    assert "DeformableConvolution" in ops and ("Add" in ops) == wl["with_bias"]
    assert str(peer.compiled.get_property("INFERENCE_PRECISION_HINT")) in ("<Type: 'float32'>", "f32")


def test_missing_peer_packages_are_skipped_with_a_reason(workload_file, tmp_path, capsys, monkeypatch):
    conv_only = tmp_path / "conv.json"
    workloads.save(conv_only, [CONV])
    # A None entry in sys.modules makes the import raise ImportError, as when not installed.
    for name in ("onnxruntime", "openvino", "openvino.opset8", "openvino.runtime", "openvino.runtime.opset8"):
        monkeypatch.setitem(sys.modules, name, None)
    assert cli.main(["bench", "--workloads", str(conv_only), "--repeats", "1", "--forward-only",
                     "--no-default", "--output-dir", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "onnxruntime column skipped: " in printed and "openvino column skipped: " in printed
    data = json.loads((tmp_path / "out" / tvm_dcn.target_tag(None) / "bench.json").read_text())
    assert data["environment"]["peers"] == {}
    conv = next(r for r in data["results"] if r["layer"] == bench.case_name(CONV))
    assert set(conv["times_ms"]) == {"tvm-dcn hand", "torchvision", "dense conv2d"}


class _FakePeer:
    """Stands in for a peer: computes torchvision's forward, or (``wrong``) its negative."""

    wrong = False

    def __init__(self, wl, weight, bias=None, threads=None):
        self.args = (bench._conv_kwargs(wl), weight, bias)

    def __call__(self, x, offset, mask=None):
        import torchvision  # noqa: PLC0415

        kw, weight, bias = self.args
        out = torchvision.ops.deform_conv2d(x, offset, weight, bias, mask=mask, **kw)
        return -out if self.wrong else out


class _WrongPeer(_FakePeer):
    wrong = True


class _BrokenPeer(_FakePeer):
    def __init__(self, *args, **kw):
        raise RuntimeError("no kernel for DeformConv(19)\nsecond line")


def test_peers_are_checked_and_left_out_when_wrong(monkeypatch):
    """Peers run in forward mode only; one that disagrees with torchvision, or that cannot build
    the layer, is reported and not timed."""
    monkeypatch.setattr(bench, "PEER_CLASSES", {"onnxruntime": _FakePeer, "openvino": _WrongPeer})
    lines = []
    forward = bench.run_case(CONV, 1, "forward", schedules=(), peers=bench.PEERS, repeats=2, warmup=0,
                             log=lines.append)
    assert set(forward.times_ms) == {"onnxruntime", "torchvision", "dense conv2d"}
    assert forward.max_abs_err["onnxruntime"] == 0 and forward.max_abs_err["openvino"] > 1
    assert "disagrees with torchvision" in forward.not_timed["openvino"]
    assert any(line.startswith("WARNING: ") and "openvino" in line for line in lines)
    table = bench.markdown_table([forward], "tiny")
    assert "openvino not timed, disagrees with torchvision" in table

    monkeypatch.setattr(bench, "PEER_CLASSES", {"onnxruntime": _BrokenPeer, "openvino": _FakePeer})
    forward = bench.run_case(CONV, 1, "forward", schedules=(), peers=bench.PEERS, repeats=1, warmup=0,
                             log=lambda line: None)
    assert set(forward.times_ms) == {"openvino", "torchvision", "dense conv2d"}
    assert forward.not_timed["onnxruntime"] == "could not be built: RuntimeError: no kernel for DeformConv(19)"

    backward = bench.run_case(CONV, 1, "forward+backward", schedules=("hand",), peers=bench.PEERS, repeats=1,
                              warmup=0, log=lambda line: None)
    assert not set(bench.PEERS) & set(backward.times_ms)
    table = bench.markdown_table([forward, backward], "tiny")
    assert "openvino: forward only (no backward)." in table


def test_batch_option_gives_a_row_per_batch_size(monkeypatch):
    calls = []
    monkeypatch.setattr(bench, "run", lambda *args, **kw: calls.append(kw))
    assert cli.main(["bench", "--batch", "1", "8", "--forward-only"]) == 0
    assert calls[-1]["batches"] == [1, 8] and calls[-1]["modes"] == ("forward",)
    assert cli.main(["bench"]) == 0
    assert calls[-1]["batches"] is None
    with pytest.raises(SystemExit, match="--batch"):
        cli.main(["bench", "--batch", "0"])

    layers = bench.layers_of([CONV, CONV, ROI, CONV8], [1, 8])
    names = [bench.case_name(wl) for wl, _ in layers]
    assert names == ["dcnv2 b1 4x6x5->4 k3x3 s1", "dcnv2 b1 8x6x5->4 k3x3 s1", "dcnv2 b8 4x6x5->4 k3x3 s1",
                     "dcnv2 b8 8x6x5->4 k3x3 s1", bench.case_name(ROI)]
    assert [n for _, n in layers] == [2, 1, 2, 1, 1]
    assert layers[2][0] == forward_workload(batch=8, in_channels=4, height=6, width=5, out_channels=4,
                                            kernel_size=(3, 3), padding=(1, 1), with_mask=True)
    assert bench.layers_of([CONV], None) == [(CONV, 1)]
    for bad in ([], [0], [2, -1], 4):
        with pytest.raises(ValueError, match="batches"):
            bench.layers_of([CONV], bad)


def test_geomeans_per_batch():
    rows = [bench.CaseResult("a", "forward", 1, {"torchvision": 4.0, "tvm-dcn hand": 1.0}, batch=1),
            bench.CaseResult("b", "forward", 1, {"torchvision": 4.0, "tvm-dcn hand": 4.0}, batch=8),
            bench.CaseResult("c", "forward", 1, {"torchvision": 9.0, "tvm-dcn hand": 1.0}, batch=8)]
    assert bench.geomean_speedups(rows, "forward", 1) == {"torchvision": 1.0, "tvm-dcn hand": 4.0}
    assert bench.geomean_speedups(rows, "forward", 8)["tvm-dcn hand"] == pytest.approx(3.0)
    assert bench.geomean_speedups(rows, "forward")["tvm-dcn hand"] == pytest.approx(36 ** (1 / 3))
    table = bench.markdown_table(rows, "tiny")
    assert "| **geomean, batch 1** | | **4.00x** | **1.00x** |" in table
    assert "| **geomean, batch 8** | | **3.00x** | **1.00x** |" in table


def test_half_precision_rows(workload_file, tmp_path, monkeypatch):
    """``--dtype bfloat16``: tvm-dcn and dense conv2d get the layer's tensors in bfloat16,
    torchvision keeps float32; the error is against torchvision's float32 forward; own files."""
    seen = collections.defaultdict(set)
    real_deform, real_conv2d = tvm_dcn.functional.deform_conv2d, bench.torch.nn.functional.conv2d
    real_roi_align = tvm_dcn.roi.roi_align
    torchvision = pytest.importorskip("torchvision")
    real_tv = torchvision.ops.deform_conv2d

    def spy(name, fn):
        def call(x, *args, **kwargs):
            seen[name].add(x.dtype)
            return fn(x, *args, **kwargs)
        return call

    monkeypatch.setattr(tvm_dcn.functional, "deform_conv2d", spy("tvm-dcn", real_deform))
    monkeypatch.setattr(tvm_dcn.roi, "roi_align", spy("tvm-dcn roi_align", real_roi_align))
    monkeypatch.setattr(torchvision.ops, "deform_conv2d", spy("torchvision", real_tv))
    monkeypatch.setattr(bench.torch.nn.functional, "conv2d", spy("conv2d", real_conv2d))
    assert cli.main(["bench", "--workloads", str(workload_file), "--repeats", "1", "--no-default", "--dtype",
                     "bfloat16", "--output-dir", str(tmp_path / "out")]) == 0
    assert seen["tvm-dcn"] == seen["tvm-dcn roi_align"] == {bench.torch.bfloat16}
    assert seen["torchvision"] == {bench.torch.float32}
    assert bench.torch.bfloat16 in seen["conv2d"]  # dense conv2d and the offset convolution before each call
    folder = tmp_path / "out" / tvm_dcn.target_tag(None)
    data = json.loads((folder / "bench-bfloat16.json").read_text())
    assert data["dtype"] == "bfloat16" and not (folder / "bench.json").exists()
    for result in data["results"]:
        assert {"tvm-dcn hand", "torchvision"} <= set(result["times_ms"])
        err = result["max_abs_err"]["tvm-dcn hand"]
        assert 0 < err < 0.1, (result["layer"], result["mode"], err)  # bfloat16 rounding, not float32's
    assert "tvm-dcn and dense conv2d in bfloat16" in (folder / "bench-bfloat16.md").read_text()
    with pytest.raises(ValueError, match="dtype"):
        bench.run(str(workload_file), dtype="int8", output_dir=None)
