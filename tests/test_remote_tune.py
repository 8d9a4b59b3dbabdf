"""Two-step tuning (tvm_dcn/remote_tune.py), with this CPU standing in for the remote GPU host:
candidates built here, measured by a subprocess that may not compile anything, results fed back
to MetaSchedule, a second round, export and use of the records; bad input."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

import tvm_dcn  # noqa: F401  (before torch)
import torch  # noqa: E402

from tvm_dcn import cli, remote_tune  # noqa: E402
from tvm_dcn.ops.deform_conv import forward_workload  # noqa: E402
from tvm_dcn.target import host_target, target_tag  # noqa: E402

WORKLOAD = forward_workload(batch=1, in_channels=4, height=6, width=5, out_channels=4, kernel_size=(3, 3),
                            padding=(1, 1), with_mask=True)

# The measuring host's process: TVM's runtime and this package, but compiling is made impossible
# (tvm.compile raises, no nvcc on PATH, TVM's CUDA compile callback raises): a candidate that
# needed a compiler would come back as an error.
MEASURE_SCRIPT = textwrap.dedent("""
    import json, sys
    import tvm, tvm_ffi

    def refuse(*args, **kwargs):
        raise RuntimeError("the measuring host must not compile")

    tvm.compile = refuse
    tvm_ffi.register_global_func("tvm_callback_cuda_compile", refuse, override=True)
    from tvm_dcn import remote_tune
    out = remote_tune.measure(sys.argv[1], sys.argv[2], repeat=2, min_repeat_ms=1)
    print(json.dumps(out["results"]))
""")


def _measure_remotely(candidates, results):
    env = dict(os.environ, PATH="/usr/bin:/bin")  # no nvcc
    proc = subprocess.run([sys.executable, "-c", MEASURE_SCRIPT, str(candidates), str(results)], capture_output=True,
                          text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _args(wl, generator):
    from tvm_dcn.ops import build

    definition = build(wl)
    inputs = [torch.randn([int(d) for d in t.shape], generator=generator) for t in definition.args[:-1]]
    return inputs + [torch.empty([int(d) for d in definition.args[-1].shape])]


@pytest.mark.xdist_group("remote-tune")  # apart from test_tuning's MetaSchedule chain: the two run in parallel
def test_two_rounds_measured_elsewhere_then_exported_and_used(tmp_path, monkeypatch, capsys):
    work, cands = tmp_path / "work", tmp_path / "candidates"
    workloads_file = tmp_path / "workloads.json"
    workloads_file.write_text(json.dumps([WORKLOAD.as_dict()]))
    common = ["--work-dir", str(work), "--out", str(cands)]
    assert cli.main(["tune-candidates", *common, "--workloads", str(workloads_file), "--trials-per-task", "4",
                     "--trials-per-round", "2", "--population", "16", "--genetic-iters", "1"]) == 0
    assert "round 1: 2 candidates" in capsys.readouterr().out
    manifest = json.loads((cands / "manifest.json").read_text())
    assert manifest["target_tag"] == target_tag(host_target()) and manifest["device"] == "cpu"
    assert len(manifest["candidates"]) == 2 and all((cands / c["library"]).exists() for c in manifest["candidates"])
    assert [a["name"] for a in manifest["candidates"][0]["args"]] == ["input", "offset", "mask", "weight", "output"]

    with pytest.raises(RuntimeError, match="not been fed back"):
        remote_tune.generate_candidates(work, cands)

    results = _measure_remotely(cands, tmp_path / "results-1.json")
    assert sorted(results) == ["c0000", "c0001"]
    assert all(len(r["run_secs"]) == 2 and min(r["run_secs"]) > 0 for r in results.values()), results

    assert cli.main(["tune-feed", "--work-dir", str(work), str(tmp_path / "results-1.json")]) == 0
    assert "     2 " in capsys.readouterr().out  # two trials of the workload
    with pytest.raises(RuntimeError, match="no round waiting"):
        remote_tune.feed(work, tmp_path / "results-1.json")
    assert (work / remote_tune.COST_MODEL_FILE).exists()

    # Round 2: new schedules only; one candidate's library is broken on the way to the host.
    first_round = set(json.loads((work / remote_tune.MEASURED_FILE).read_text()))
    assert cli.main(["tune-candidates", *common]) == 0
    assert "round 2" in capsys.readouterr().out
    handed_out = json.loads((work / remote_tune.MEASURED_FILE).read_text())
    assert len(handed_out) == len(set(handed_out)) == len(first_round) + 2 and first_round < set(handed_out)
    (cands / "c0001.so").write_bytes(b"not a library")
    results = _measure_remotely(cands, tmp_path / "results-2.json")
    assert "run_secs" in results["c0000"] and "error" in results["c0001"]
    with pytest.raises(ValueError, match="round"):
        remote_tune.feed(work, tmp_path / "results-1.json")  # the previous round's results
    summary = remote_tune.feed(work, tmp_path / "results-2.json")
    session = remote_tune._Session(work)
    assert session.trials(0) == 4 and len(session.records(WORKLOAD)) == 3  # the failure has no time
    assert WORKLOAD.short_name()[:40] in summary

    # Budget spent: no round 3. Export, and the records serve tvm_dcn.compile.
    assert remote_tune.generate_candidates(work, cands).finished
    logs = tmp_path / "logs"
    out = remote_tune.export(work, logs / target_tag(host_target()))
    assert (out / "database_tuning_record.json").exists()
    monkeypatch.setenv("TVM_DCN_TUNING_LOGS", str(logs))
    monkeypatch.setenv("TVM_DCN_CACHE_DIR", str(tmp_path / "cache"))
    tvm_dcn.clear_memory_cache()
    try:
        tuned = tvm_dcn.compile(WORKLOAD, schedule="tuned")
        hand = tvm_dcn.compile(WORKLOAD, schedule="hand")
        args = _args(WORKLOAD, torch.Generator().manual_seed(0))
        other = [a.clone() for a in args]
        tuned(*args)
        hand(*other)
        torch.testing.assert_close(args[-1], other[-1], rtol=1e-5, atol=1e-5)
    finally:
        tvm_dcn.clear_memory_cache()


def test_bad_input_is_refused_by_name(tmp_path):
    with pytest.raises(ValueError, match="trials_per_task"):
        remote_tune.init_work_dir(tmp_path / "w", [WORKLOAD], trials_per_task=0)
    with pytest.raises(ValueError, match="workloads"):
        remote_tune.init_work_dir(tmp_path / "w", [])
    with pytest.raises(FileNotFoundError, match="work dir"):
        remote_tune.generate_candidates(tmp_path / "missing", tmp_path / "c")
    with pytest.raises(FileNotFoundError, match="candidates"):
        remote_tune.measure(tmp_path / "missing", tmp_path / "r.json")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        remote_tune.measure(tmp_path / "c", tmp_path / "r.json")
    remote_tune.init_work_dir(tmp_path / "w", [WORKLOAD])
    with pytest.raises(FileExistsError, match="already holds"):
        remote_tune.init_work_dir(tmp_path / "w", [WORKLOAD])
    with pytest.raises(RuntimeError, match="no round waiting"):
        remote_tune.feed(tmp_path / "w", tmp_path / "r.json")
    with pytest.raises(SystemExit, match="already holds"):
        cli.main(["tune-candidates", "--work-dir", str(tmp_path / "w"), "--out", str(tmp_path / "c"),
                  "--target", "{}"])
    with pytest.raises(SystemExit, match="--target"):
        cli.main(["tune-candidates", "--work-dir", str(tmp_path / "w2"), "--out", str(tmp_path / "c"),
                  "--target", "{not json"])


def test_cuda_targets_get_the_limits_metaschedule_needs():
    target = remote_tune._tunable_target(tvm_dcn.target.as_target({"kind": "cuda", "arch": "sm_90"}))
    config = remote_tune.target_config(target)
    assert config["max_threads_per_block"] == 1024 and config["max_shared_memory_per_block"] == 49152
    assert config["arch"] == "sm_90" and json.loads(json.dumps(config)) == config
