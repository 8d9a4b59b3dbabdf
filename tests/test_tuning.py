"""Workload sets, the recorder, MetaSchedule tuning (local and over RPC), exported records, and
reproducible builds from the committed records.

The tuning tests search a tiny workload for a handful of trials with a small population: each
takes well under a minute (about 10-25 s here; the RPC test ~40 s with its tracker and servers).
"""
from __future__ import annotations

import io
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
import tvm

import tvm_dcn
from tvm_dcn import schedule_checks, tune, workloads
from tvm_dcn.ops.deform_conv import (BACKWARD_DATA, BACKWARD_WEIGHT, FORWARD, backward_data_workload,
                                     forward_workload)
from tvm_dcn.tuning_records import MANIFEST_FILE, RECORD_FILE, WORKLOAD_FILE, records_root

TINY = forward_workload(batch=1, in_channels=4, height=5, width=6, out_channels=4, kernel_size=(3, 3),
                        padding=(1, 1), with_mask=True)
# Tests that tune in this process share a pytest-xdist worker: MetaSchedule's start-up (tensor
# intrinsics, ~20 s) is paid once, and the `tuned` run serves them all.
SEARCH = dict(trials_per_task=3, num_trials_per_iter=2, population=8, genetic_iters=1, verify_top=2, progress=False)


@pytest.fixture
def fresh_memory_cache():
    """Kernels compiled anew for the records in force (the disk cache, keyed by the schedule and
    the record, is the session's)."""
    tvm_dcn.clear_memory_cache()
    yield
    tvm_dcn.clear_memory_cache()


def _tiny_args():
    g = torch.Generator().manual_seed(3)
    return [torch.randn(1, 4, 30, generator=g), torch.randn(1, 18, 30, generator=g),
            torch.rand(1, 9, 30, generator=g), torch.randn(4, 36, generator=g)]


def _run(kernel, args):
    out = torch.empty(1, 4, 30)
    kernel(*args, out)
    return out


# ------------------------------------------------------------------------------------------
# Workload sets


def test_resnet50_set_matches_the_network():
    wls = workloads.load("resnet50-dcn-224")
    layers = [wl for wl in wls if wl.op == FORWARD]
    assert len(layers) == 4 + 6 + 3  # DCN 3x3 convs of the c3, c4 and c5 bottlenecks
    strided = [(wl["in_channels"], wl["height"]) for wl in layers if wl["stride"] == (2, 2)]
    assert strided == [(128, 56), (256, 28), (512, 14)]
    assert {(wl["in_channels"], wl["height"]) for wl in layers if wl["stride"] == (1, 1)} == {
        (128, 28), (256, 14), (512, 7)}
    assert all(wl["with_mask"] and not wl["with_bias"] and wl["batch"] == 1 for wl in layers)
    # Every layer also runs its two backward kernels.
    ops = [wl.op for wl in wls]
    assert ops.count(BACKWARD_DATA) == ops.count(BACKWARD_WEIGHT) == len(layers)
    counts = dict((wl, n) for wl, n in workloads.unique_with_counts(wls))
    assert sorted(n for wl, n in counts.items() if wl.op == FORWARD) == [1, 1, 1, 2, 3, 5]


def test_faster_rcnn_set_uses_the_large_input():
    layers = [wl for wl in workloads.load("faster-rcnn-r50-dcn") if wl.op == FORWARD]
    assert {(wl["height"], wl["width"]) for wl in layers if wl["stride"] == (1, 1)} == {
        (100, 152), (50, 76), (25, 38)}


def test_workload_files_round_trip(tmp_path):
    wls = workloads.load("resnet50-dcn-224-forward")
    path = tmp_path / "set.json"
    workloads.save(path, wls)
    assert workloads.load(str(path)) == wls
    toml = tmp_path / "set.toml"
    toml.write_text("\n".join([
        "[[workload]]", 'op = "deform_conv2d"', 'dtype = "float32"', "count = 2",
        "params = { batch = 1, in_channels = 8, height = 9, width = 9, out_channels = 8, kernel_size = [3, 3], "
        "stride = [1, 1], padding = [1, 1], dilation = [1, 1], groups = 1, offset_groups = 1, with_mask = true, "
        "with_bias = false }"]) + "\n")
    loaded = workloads.load(str(toml))
    assert len(loaded) == 2 and loaded[0]["in_channels"] == 8 and loaded[0] == loaded[1]


@pytest.mark.parametrize("content, match", [
    ("not json", "cannot parse"),
    ('{"workloads": []}', "non-empty list"),
    ('{"workloads": [{"op": "deform_conv2d"}]}', "not a workload"),
    ('{"workloads": [{"op": "no_such_op", "dtype": "float32", "params": {}}]}', "not a valid workload"),
    ('{"workloads": [{"op": "deform_conv2d", "dtype": "float32", "params": {"batch": 1}}]}', "not a valid workload"),
])
def test_bad_workload_files_raise(tmp_path, content, match):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=match):
        workloads.load(str(path))


def test_unknown_set_name_raises():
    with pytest.raises(ValueError, match="neither a built-in set"):
        workloads.load("resnet-9000")


def test_recorder_collects_forward_and_backward_workloads():
    layer = tvm_dcn.ModulatedDeformConv2dPack(4, 4, 3, padding=1)
    x = torch.randn(1, 4, 6, 5, requires_grad=True)
    with workloads.record() as rec:
        layer(x).sum().backward()
    ops = [wl.op for wl in rec.workloads]
    assert ops == [FORWARD, BACKWARD_DATA, BACKWARD_WEIGHT]
    assert rec.workloads[0]["height"] == 6 and rec.workloads[0]["with_mask"]
    with torch.no_grad():
        layer(x)  # outside the context: not recorded
    assert len(rec.workloads) == 3


# ------------------------------------------------------------------------------------------
# Tuning


@pytest.fixture(scope="module")
def application_log_handlers():
    """Handlers an application may have installed: an unnamed one on MetaSchedule's logger (the
    usual way to watch its progress) and one on the root logger. Tuning, however often it runs
    in the process, must leave both attached and open."""
    meta_schedule_logger = logging.getLogger("tvm.s_tir.meta_schedule")
    handlers = {logging.getLogger(): logging.StreamHandler(io.StringIO()),
                meta_schedule_logger: logging.StreamHandler(io.StringIO())}
    for log, handler in handlers.items():
        log.addHandler(handler)
    assert all(h.get_name() is None for h in handlers.values())
    yield handlers
    for log, handler in handlers.items():
        log.removeHandler(handler)


@pytest.fixture(scope="module")
def tuned(tmp_path_factory, application_log_handlers):
    """One small tuning run shared by the tests below (MetaSchedule's fixed start-up cost, mostly
    imports in this process and in the builder workers, dominates a run this small)."""
    root = tmp_path_factory.mktemp("tuning")
    result = tune.tune([TINY, TINY], work_dir=root / "work", output_dir=root / "records", **SEARCH)
    return root, result


def _assert_logging_left_alone(handlers):
    for log, handler in handlers.items():
        assert handler in log.handlers and not handler.stream.closed, log.name


@pytest.mark.xdist_group("metaschedule")
def test_tune_leaves_the_process_logging_alone(tuned, application_log_handlers):
    root, _ = tuned
    _assert_logging_left_alone(application_log_handlers)
    (task_log,) = (root / "work" / "logs").glob("*.log")  # the search's details go to the work dir
    assert task_log.stat().st_size > 0


@pytest.mark.xdist_group("metaschedule")
def test_tune_seeds_with_hand_and_searches(tuned):
    _, result = tuned
    (task,) = result.tasks
    assert task.count == 2 and task.trials >= 3  # the two hand seeds plus searched candidates
    assert task.hand_seconds and task.best_seconds <= task.hand_seconds


@pytest.mark.xdist_group("metaschedule")
def test_tune_seeds_the_hand_point_of_the_design_space(tuned):
    """Besides the hand schedule, the work dir holds its point in the design space: the template's
    sampling instructions with the hand choices as decisions, which the search's mutations change
    (the fixed schedule's trace has no decisions)."""
    from tvm_dcn import _meta_schedule, ops  # noqa: PLC0415
    from tvm_dcn.target import as_target  # noqa: PLC0415

    root, _ = tuned
    target = as_target(None)
    wl = ops.for_target(TINY, target)
    db = _meta_schedule.meta_schedule().database.JSONDatabase(work_dir=str(root / "work"))
    traces = [str(r.trace) for r in _meta_schedule.records_of(db, wl)]
    point, hand = tune.hand_trace(wl, target, point=True), tune.hand_trace(wl, target)
    assert str(point) in traces and str(hand) in traces
    assert any(inst.kind.name == "SamplePerfectTile" for inst in point.insts)
    assert not any(inst.kind.name.startswith("Sample") for inst in hand.insts)


@pytest.mark.xdist_group("metaschedule")
def test_tune_exports_pruned_records_and_manifest(tuned):
    root, _ = tuned
    out = root / "records"
    for name in (WORKLOAD_FILE, RECORD_FILE, MANIFEST_FILE):
        assert (out / name).exists()
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert manifest["target_tag"] == tvm_dcn.target_tag(None)
    assert tvm_dcn.target_tag(manifest["target"]) == manifest["target_tag"]  # a plain, reusable config
    (entry,) = manifest["records"]
    # The workload in the target's formulation (e.g. AVX-512's pixel padding: ops.for_target).
    assert tvm_dcn.Workload.from_dict(entry["workload"]) == tvm_dcn.ops.for_target(TINY, tvm_dcn.target.as_target(None))
    assert entry["tuned_us"] > 0
    assert len((out / RECORD_FILE).read_text().splitlines()) == 1  # pruned: best record only
    assert len((root / "work" / RECORD_FILE).read_text().splitlines()) >= 2  # the work dir keeps all


@pytest.mark.xdist_group("metaschedule")
def test_tune_stops_its_worker_processes(tuned):
    """MetaSchedule's runner keeps worker processes that would outlive the test run."""
    import psutil  # noqa: PLC0415

    workers = [p for p in psutil.Process().children(recursive=True)
               if "popen_worker" in " ".join(p.cmdline())]
    assert workers == []


@pytest.mark.xdist_group("metaschedule")
def test_tune_resumes_from_its_work_dir(tuned, tmp_path):
    """Re-running with the same budget measures nothing new."""
    root, first = tuned
    work = root / "work"
    records_before = (work / RECORD_FILE).read_text()
    again = tune.tune([TINY], work_dir=work, output_dir=tmp_path / "out", **{**SEARCH, "verify_top": 0},
                      export=False)
    assert (work / RECORD_FILE).read_text() == records_before
    assert again.tasks[0].trials == first.tasks[0].trials


@pytest.mark.xdist_group("metaschedule")
def test_a_new_process_resumes_records_that_tensorize(tmp_path):
    """A work dir whose records tensorize with tvm-dcn's own intrinsics (the hand schedules' traces
    seed every search) resumes in a fresh process: the intrinsics are registered before the
    database, whose traces name them, is read (reading it first raised 'not registered')."""
    from tvm_dcn import _meta_schedule, ops
    from tvm_dcn.schedules import find

    ms = _meta_schedule.meta_schedule()
    target = tvm_dcn.host_target()
    wl = ops.for_target(forward_workload(batch=1, in_channels=16, height=6, width=6, out_channels=8,
                                         kernel_size=(3, 3), padding=(1, 1), with_mask=True), target)
    sch = tvm.s_tir.Schedule(ops.ir_module(wl))
    find(FORWARD, "llvm")(sch, wl, target)
    work = tmp_path / "work"
    work.mkdir()
    db = ms.database.JSONDatabase(work_dir=str(work))
    db.commit_tuning_record(ms.database.TuningRecord(sch.trace, db.commit_workload(ops.ir_module(wl)), [1e-3],
                                                     target))
    # And a bfloat16 forward scheduled for a CPU with AVX512-BF16 (built for it, not run).
    bf16_target = tvm.target.Target({"kind": "llvm", "mcpu": "sapphirerapids", "num-cores": 2})
    bf16 = ops.for_target(forward_workload(batch=1, in_channels=16, height=6, width=6, out_channels=8,
                                           kernel_size=(3, 3), padding=(1, 1), dtype="bfloat16"), bf16_target)
    sch = tvm.s_tir.Schedule(ops.ir_module(bf16))
    find(FORWARD, "llvm")(sch, bf16, bf16_target)
    db.commit_tuning_record(ms.database.TuningRecord(sch.trace, db.commit_workload(ops.ir_module(bf16)), [1e-3],
                                                     bf16_target))
    records = (work / RECORD_FILE).read_text()
    assert "tvm_dcn_dot_16x2_bf16" in records
    if "tvm_dcn_transpose_8x8_f32" not in records:
        pytest.skip("this CPU's float32 forward does not tensorize its columns (fewer than 8 lanes)")
    workloads.save(tmp_path / "set.json", [wl])
    code = (f"from tvm_dcn import tune, workloads; tune.tune(workloads.load({str(tmp_path / 'set.json')!r}), "
            f"work_dir={str(work)!r}, search=False, verify_top=0, export=False, progress=False)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]


@pytest.mark.xdist_group("metaschedule")
def test_export_without_search_uses_the_work_dir_as_it_is(tuned, tmp_path):
    """--no-search: a larger budget searches nothing; the records are verified and exported."""
    root, first = tuned
    records_before = (root / "work" / RECORD_FILE).read_text()
    again = tune.tune([TINY], work_dir=root / "work", output_dir=tmp_path / "out",
                      **{**SEARCH, "trials_per_task": 50, "verify_top": 1}, search=False)
    assert (root / "work" / RECORD_FILE).read_text() == records_before
    assert again.tasks[0].trials == first.tasks[0].trials and again.tasks[0].best_seconds > 0
    manifest = json.loads((tmp_path / "out" / MANIFEST_FILE).read_text())
    assert manifest["trials_per_task"] is None and manifest["records"][0]["trials"] == first.tasks[0].trials


@pytest.mark.xdist_group("metaschedule")
def test_exported_record_is_applied_and_agrees(tuned, tmp_path, monkeypatch, fresh_memory_cache):
    root, _ = tuned
    monkeypatch.setenv("TVM_DCN_TUNING_LOGS", str(tmp_path))
    (tmp_path / tvm_dcn.target_tag(None)).symlink_to(root / "records")
    kernel = tvm_dcn.compile(TINY)
    assert kernel.schedule_source == "tuned"
    args = _tiny_args()
    torch.testing.assert_close(_run(kernel, args), _run(tvm_dcn.compile(TINY, schedule="hand"), args))


@pytest.mark.xdist_group("metaschedule")
def test_export_keeps_other_workloads_and_sorts(tuned, fresh_memory_cache):
    """A second set exported into the same folder keeps the first set's records, in sorted order
    (a budget of one trial is the hand seed alone: no search)."""
    root, _ = tuned
    other = forward_workload(batch=1, in_channels=4, height=4, width=4, out_channels=4, kernel_size=(3, 3),
                             padding=(1, 1))
    out = root / "records"
    tune.tune([other], work_dir=root / "work2", output_dir=out, **{**SEARCH, "trials_per_task": 1, "verify_top": 0})
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    keys = [tvm_dcn.Workload.from_dict(r["workload"]).key() for r in manifest["records"]]
    host = tvm_dcn.target.as_target(None)  # records hold the host's formulation (e.g. AVX-512 padding)
    expected = {tvm_dcn.ops.for_target(wl, host).key() for wl in (TINY, other)}
    assert keys == sorted(keys) and set(keys) == expected
    assert len((out / RECORD_FILE).read_text().splitlines()) == 2


@pytest.mark.parametrize("record_speedup, keeps_hand", [(1.05, True), (1.15, False), (0.9, True)])
def test_verification_keeps_the_hand_schedule_unless_a_record_is_clearly_faster(record_speedup, keeps_hand,
                                                                                monkeypatch):
    """A record displaces the hand schedule at export only if it measured ``HAND_MARGIN`` faster:
    a smaller lead is within this machine's noise."""
    from types import SimpleNamespace  # noqa: PLC0415

    from tvm_dcn.schedules import find_template  # noqa: PLC0415
    from tvm_dcn.target import as_target  # noqa: PLC0415

    target = as_target(None)
    hand = tune.hand_trace(TINY, target)
    sch = tvm.s_tir.Schedule(tvm_dcn.ops.ir_module(TINY))
    find_template(TINY.op, "llvm")(sch, TINY, target)  # the tuning template: another trace
    assert str(sch.trace) != str(hand)
    # Measured in order: the task's records, then its hand schedule.
    monkeypatch.setattr(tune, "_measure_many", lambda mods, *a, **k: [[1e-3 / record_speedup], [1e-3]])
    task = tune.TaskResult(TINY, 1, 2, None, None, False)
    tune._verify([(task, [SimpleNamespace(trace=sch.trace)])], target, None, None)
    assert task.best_is_hand is keeps_hand
    assert task.hand_seconds == pytest.approx(1e-3)
    assert task.best_seconds == pytest.approx(1e-3 if keeps_hand else 1e-3 / record_speedup)
    assert str(task.record.trace) == str(hand if keeps_hand else sch.trace)


def test_verification_scores_each_candidate_by_its_fastest_pass(monkeypatch):
    """A burst of load in one pass does not let a record displace the hand schedule: each
    candidate counts by the mean of its fastest pass (load only slows a kernel down)."""
    from types import SimpleNamespace  # noqa: PLC0415

    from tvm_dcn.schedules import find_template  # noqa: PLC0415
    from tvm_dcn.target import as_target  # noqa: PLC0415

    assert tune.fastest_pass_seconds([3.0, 3.2, 1.0, 1.2, 2.0, 2.0], 3) == pytest.approx(1.1)
    assert tune.fastest_pass_seconds([3.0, 1.0], 3) == pytest.approx(2.0)  # uneven: one pass
    target = as_target(None)
    sch = tvm.s_tir.Schedule(tvm_dcn.ops.ir_module(TINY))
    find_template(TINY.op, "llvm")(sch, TINY, target)
    passes = tune.VERIFY_PASSES
    record = [1.0e-3] * (2 * passes)                           # two repeats per pass, steady
    hand = [0.98e-3] * (2 * passes - 2) + [1.6e-3, 1.6e-3]     # one pass hit by a burst
    assert sum(hand) / len(hand) > tune.HAND_MARGIN * sum(record) / len(record)  # by the mean, the record wins
    monkeypatch.setattr(tune, "_measure_many", lambda mods, *a, **k: [record, hand])
    task = tune.TaskResult(TINY, 1, 2, None, None, False)
    tune._verify([(task, [SimpleNamespace(trace=sch.trace)])], target, None, None)
    assert task.best_is_hand and task.best_seconds == pytest.approx(0.98e-3)


def test_measurement_passes_alternate_their_order():
    """With several passes every module runs in each, every other pass in reverse order, and its
    run seconds are those of all passes; a module that failed in any pass gives None."""
    from types import SimpleNamespace  # noqa: PLC0415

    from tvm_dcn.target import as_target  # noqa: PLC0415

    mods = [tvm_dcn.ops.ir_module(TINY)] * 3
    runs = []

    class Builder:
        def build(self, inputs):
            return [SimpleNamespace(error_msg=None, artifact_path=f"/nonexistent/m{i}/lib.so")
                    for i in range(len(inputs))]

    class Runner:
        def run(self, inputs):
            order = [int(x.artifact_path.split("/")[2][1:]) for x in inputs]
            runs.append(order)
            return [SimpleNamespace(result=lambda i=i, p=len(runs): SimpleNamespace(
                error_msg="boom" if (i, p) == (2, 2) else None, run_secs=[i + p / 10]))
                for i in order]

    results = tune._measure_many(mods, as_target(None), Builder(), Runner(), passes=3)
    assert runs == [[0, 1, 2], [2, 1, 0], [0, 1, 2]]
    assert results[0] == pytest.approx([0.1, 0.2, 0.3]) and results[1] == pytest.approx([1.1, 1.2, 1.3])
    assert results[2] is None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.xdist_group("metaschedule")
def test_tune_through_rpc_tracker_and_two_servers(tmp_path, fresh_memory_cache, tuned,
                                                  application_log_handlers):
    """Measured on RPC servers, and a second search in this process (``tuned`` ran the first)."""
    import tvm.rpc  # noqa: PLC0415

    port = _free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # Each in its own process group: a server runs its sessions in child processes, which a
    # terminate() of the server alone would leave running.
    procs = [subprocess.Popen([sys.executable, "-m", "tvm.exec.rpc_tracker", "--host", "127.0.0.1", "--port",
                               str(port), "--port-end", str(port + 1)], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)]
    try:
        deadline = time.time() + 180  # generous: starting tvm in 3 processes on a loaded 2-core machine
        while True:  # wait for the port: connect_tracker itself retries only every 5 s
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:  # tracker not up yet
                if time.time() > deadline:
                    raise
                time.sleep(0.2)
        tracker = tvm.rpc.connect_tracker("127.0.0.1", port)
        for _ in range(2):
            server_port = _free_port()
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "tvm.exec.rpc_server", "--tracker", f"127.0.0.1:{port}", "--key",
                 "tvm-dcn-test", "--host", "127.0.0.1", "--port", str(server_port), "--port-end",
                 str(server_port + 1)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                start_new_session=True))
        while "tvm-dcn-test" not in tracker.text_summary() or tracker.text_summary().count("127.0.0.1") < 2:
            if time.time() > deadline:
                pytest.fail(f"RPC servers did not register: {tracker.text_summary()}")
            time.sleep(0.5)
        assert "free" in tracker.text_summary() or "tvm-dcn-test" in tracker.text_summary()
        result = tune.tune([TINY], work_dir=tmp_path / "work", output_dir=tmp_path / "out",
                           rpc_tracker=f"127.0.0.1:{port}", rpc_key="tvm-dcn-test", **SEARCH)
        (task,) = result.tasks
        assert task.trials >= 2 and task.best_seconds > 0 and task.hand_seconds > 0
        _assert_logging_left_alone(application_log_handlers)
    finally:
        for p in procs:
            os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            p.wait(timeout=30)
        deadline = time.time() + 30
        while _processes_in_groups(p.pid for p in procs) and time.time() < deadline:
            time.sleep(0.5)
    assert not _processes_in_groups(p.pid for p in procs)


def _processes_in_groups(groups) -> list:
    """Live processes of the given process groups (their members outlive a killed leader)."""
    import psutil  # noqa: PLC0415

    groups = set(groups)
    alive = []
    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) in groups and proc.status() != psutil.STATUS_ZOMBIE:
                alive.append(proc.pid)
        except (psutil.Error, ProcessLookupError):
            continue
    return alive


def test_rpc_arguments_are_checked():
    with pytest.raises(ValueError, match="HOST:PORT"):
        tune.make_runner("localhost", "key")
    with pytest.raises(ValueError, match="rpc_key"):
        tune.make_runner("127.0.0.1:9190", None)


def test_candidates_computing_an_extern_input_late_are_rejected():
    """The input-gradient scatter is an extern block with no declared accesses, so TVM lets a
    schedule compute its ``corner_index`` input after it (MetaSchedule's compute_at into the later
    corner_sum loops does, and such candidates crash). The check finds that order; the tuner's
    postprocessor rejects such candidates; hand schedules pass."""
    wl = backward_data_workload(TINY, need_input=True, need_sampling=True)
    target = tvm_dcn.target.as_target(None)
    sch = tvm.s_tir.Schedule(tvm_dcn.ops.ir_module(wl))
    assert schedule_checks.has_extern_stage(sch.mod)
    assert schedule_checks.extern_input_computed_late(sch.mod) is None
    corner_sum_loops = sch.get_loops(sch.get_sblock("corner_sum"))
    sch.compute_at(sch.get_sblock("corner_index"), corner_sum_loops[4])
    assert schedule_checks.extern_input_computed_late(sch.mod) == ("grad_input", "corner_index", "corner_index")
    assert not tune._extern_order_check().apply(sch)
    _, hand = tvm_dcn.kernel.scheduled_module(wl, target, schedule="hand")
    assert schedule_checks.extern_input_computed_late(hand) is None
    assert not schedule_checks.has_extern_stage(tvm_dcn.ops.ir_module(TINY))


_INTRINSICS_CHECK = """
import sys, tvm
from tvm.s_tir import TensorIntrin
from tvm_dcn.tune import import_tensor_intrinsics
import_tensor_intrinsics("llvm", "x86_64")
import tvm.s_tir.tensor_intrin  # what MetaSchedule runs: finds the lean package
lean = (TensorIntrin.get("dot_16x4_avx512", allow_missing=True) is not None,
        TensorIntrin.get("wmma_sync_16x16x16_f16f16f32", allow_missing=True) is not None)
import_tensor_intrinsics("cuda")
whole = (TensorIntrin.get("dot_16x4_avx512", allow_missing=True) is not None,
         TensorIntrin.get("wmma_sync_16x16x16_f16f16f32", allow_missing=True) is not None)
print(lean, whole, sys.modules["tvm.s_tir.tensor_intrin"]._tvm_dcn_lean)
"""


def test_cpu_tuning_imports_only_its_architectures_intrinsics():
    """A CPU target registers the x86 intrinsics alone (the whole package takes ~26 s to import);
    a CUDA target later in the same process completes the package."""
    out = subprocess.run([sys.executable, "-c", _INTRINSICS_CHECK], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[0] == "(True, False) (True, True) False"


# ------------------------------------------------------------------------------------------
# Committed records and corrupt ones


def _committed():
    for manifest_path in sorted(records_root().glob(f"*/{MANIFEST_FILE}")):
        manifest = json.loads(manifest_path.read_text())
        for item in manifest["records"]:
            yield manifest_path.parent.name, manifest["target"], tvm_dcn.Workload.from_dict(item["workload"])


COMMITTED = list(_committed())


def _smallest_per_operator(records):
    """One record per (tag, operator): the one with the fewest output elements, the cheapest to
    build and run."""
    chosen = {}
    for tag, target, workload in records:
        cost = _output_elements(workload)
        if (tag, workload.op) not in chosen or cost < chosen[tag, workload.op][0]:
            chosen[tag, workload.op] = (cost, (tag, target, workload))
    return [entry for _, entry in sorted(chosen.values(), key=lambda item: (item[1][0], item[1][2].op))]


def _output_elements(workload) -> int:
    definition = tvm_dcn.ops.build(workload)
    total = 0
    for tensor in definition.args[len(definition.args) - definition.num_outputs:]:
        count = 1
        for dim in tensor.shape:
            count *= int(dim)
        total += count
    return total


REPRESENTATIVE = _smallest_per_operator(COMMITTED)


@pytest.mark.skipif(not COMMITTED, reason="no committed tuning records")
@pytest.mark.parametrize("tag, target, workload", REPRESENTATIVE,
                         ids=[f"{t}-{w.op}" for t, _, w in REPRESENTATIVE])
def test_committed_records_build_reproducibly(tag, target, workload, fresh_memory_cache):
    """A committed record of each operator and tag applies (schedule source "tuned") and builds
    to identical code; on a machine of the record's tag, the tuned, hand and default kernels
    compute the same numbers. (Every record: ``test_every_committed_record_applies``.)"""
    first = tvm_dcn.compile(workload, target, schedule="tuned", use_disk_cache=False)
    assert first.schedule_source == "tuned" and first.target_tag == tag
    _, scheduled = tvm_dcn.kernel.scheduled_module(workload, target, schedule="tuned")
    assert schedule_checks.extern_input_computed_late(scheduled) is None
    tvm_dcn.clear_memory_cache()
    second = tvm_dcn.compile(workload, target, schedule="tuned", use_disk_cache=False)
    assert first.source("asm") == second.source("asm")
    assert _numbered_addresses(first.source("ll")) == _numbered_addresses(second.source("ll"))
    if tag == tvm_dcn.target_tag(None) and workload.op.startswith("deform_conv2d"):
        outputs = {}
        for source in ("tuned", "hand", "default"):
            args = _random_kernel_args(workload)
            tvm_dcn.compile(workload, target, schedule=source)(*args)
            outputs[source] = args[-tvm_dcn.ops.build(workload).num_outputs:]
        for source in ("hand", "default"):
            for got, expected in zip(outputs[source], outputs["tuned"]):
                torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


@pytest.mark.slow
@pytest.mark.skipif(not COMMITTED, reason="no committed tuning records")
@pytest.mark.parametrize("tag", sorted({t for t, _, _ in COMMITTED}))
def test_every_committed_record_applies(tag):
    """Every record of the tag is found for its workload, replays onto its PrimFunc (no stale
    trace) and passes the extern-stage check; the representative records above are also built
    twice and run."""
    for record_tag, target, workload in COMMITTED:
        if record_tag != tag:
            continue
        source, scheduled = tvm_dcn.kernel.scheduled_module(workload, target, schedule="tuned")
        assert source == "tuned", workload.short_name()
        assert schedule_checks.extern_input_computed_late(scheduled) is None, workload.short_name()


def _numbered_addresses(llvm_ir: str) -> str:
    """LLVM IR with the host addresses TVM puts in alias-scope metadata names ("0x5572...")
    renumbered in order of appearance: they differ between builds, the code does not."""
    numbers: dict[str, str] = {}
    return re.sub(r"0x[0-9a-f]{8,}", lambda m: numbers.setdefault(m.group(0), f"<address {len(numbers)}>"), llvm_ir)


def _random_kernel_args(workload):
    """Seeded random inputs and empty outputs for a deform_conv2d kernel (offsets of a few pixels)."""
    g = torch.Generator().manual_seed(7)
    definition = tvm_dcn.ops.build(workload)
    n_inputs = len(definition.args) - definition.num_outputs
    args = []
    for i, tensor in enumerate(definition.args):
        shape = [int(d) for d in tensor.shape]
        dtype = getattr(torch, str(tensor.dtype))
        name = tensor.op.name
        if i >= n_inputs:
            args.append(torch.empty(shape, dtype=dtype))
        elif name == "mask":
            args.append(torch.rand(shape, generator=g, dtype=dtype))
        else:
            args.append(torch.randn(shape, generator=g, dtype=dtype) * (2 if name == "offset" else 1))
    return args


@pytest.mark.parametrize("corruption", ["garbage", "truncated", "foreign"])
def test_corrupt_records_warn_and_fall_back_to_hand(tmp_path, monkeypatch, fresh_memory_cache, corruption):
    folder = tmp_path / tvm_dcn.target_tag(None)
    folder.mkdir()
    if corruption == "garbage":
        (folder / WORKLOAD_FILE).write_text("this is not json\n")
        (folder / RECORD_FILE).write_text("[0, {]\n")
    elif corruption == "truncated":
        (folder / WORKLOAD_FILE).write_text('["0x1234", "AAAA')
        (folder / RECORD_FILE).write_text("")
    else:  # well-formed JSON, but not a MetaSchedule database
        (folder / WORKLOAD_FILE).write_text('{"workload": 1}\n')
        (folder / RECORD_FILE).write_text('{"record": 2}\n')
    monkeypatch.setenv("TVM_DCN_TUNING_LOGS", str(tmp_path))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        kernel = tvm_dcn.compile(TINY)
    assert kernel.schedule_source == "hand"
    assert any("tuning records" in str(w.message) for w in caught), [str(w.message) for w in caught]


def test_stale_record_warns_and_falls_back(tmp_path, monkeypatch, fresh_memory_cache):
    """A record whose trace no longer applies (operator definition changed) is not used."""
    from tvm_dcn import tuning_records  # noqa: PLC0415

    def broken_lookup(workload, target):
        def apply():
            raise RuntimeError("ScheduleError: cannot find block 'old_stage_name'")
        return tuning_records.Record(fingerprint=b"stale", apply=apply)

    monkeypatch.setattr(tuning_records, "lookup", broken_lookup)
    with pytest.warns(RuntimeWarning, match="cannot be applied"):
        kernel = tvm_dcn.compile(TINY)
    assert kernel.schedule_source == "hand"
