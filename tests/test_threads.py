"""The thread-pool settings ``import tvm_dcn`` makes (README, "Threads"), each in a fresh process:
the defaults, a user's own choice kept, and TVM's workers left unpinned (TVM pins them to cores
but not the calling thread, which could then share a worker's core)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

VARIABLES = ("TVM_THREAD_POOL_SPIN_COUNT", "TVM_BIND_THREADS", "TVM_NUM_THREADS", "OMP_WAIT_POLICY")

# Runs a parallel TVM kernel, then reports the settings and the CPU sets of the process's threads.
CHILD = """
import json, os
import tvm_dcn, torch
from tvm_dcn.ops.deform_conv import forward_workload
wl = forward_workload(batch=1, in_channels=8, height=6, width=6, out_channels=8, kernel_size=(3, 3), padding=(1, 1))
kernel = tvm_dcn.compile(wl, use_disk_cache=False)
kernel(torch.randn(1, 8, 36), torch.zeros(1, 18, 36), torch.randn(8, 72), torch.empty(1, 8, 36))
threads = [sorted(os.sched_getaffinity(int(tid))) for tid in os.listdir("/proc/self/task")]
print(json.dumps({"env": {name: os.environ.get(name) for name in %r}, "threads": threads}))
""" % (VARIABLES,)


def _child(**env_overrides) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in VARIABLES}
    env.update(env_overrides)
    out = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="needs Linux CPU affinity")
def test_defaults_and_unpinned_workers():
    report = _child()
    cpus = len(os.sched_getaffinity(0))
    assert report["env"] == {"TVM_THREAD_POOL_SPIN_COUNT": "100", "TVM_BIND_THREADS": "0",
                             "TVM_NUM_THREADS": str(cpus), "OMP_WAIT_POLICY": "PASSIVE"}
    if cpus > 1:
        assert all(len(cpu_set) == cpus for cpu_set in report["threads"]), report["threads"]


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2
                    or sorted(os.sched_getaffinity(0)) != list(range(len(os.sched_getaffinity(0)))),
                    reason="needs Linux CPU affinity and CPUs 0..n-1 (TVM pins workers to those numbers)")
def test_a_users_choice_is_kept():
    report = _child(TVM_BIND_THREADS="1", TVM_THREAD_POOL_SPIN_COUNT="7", OMP_WAIT_POLICY="ACTIVE")
    assert report["env"]["TVM_BIND_THREADS"] == "1"
    assert report["env"]["TVM_THREAD_POOL_SPIN_COUNT"] == "7"
    assert report["env"]["OMP_WAIT_POLICY"] == "ACTIVE"
    # TVM then pins its workers: some thread runs on one CPU only (the control for the test above).
    assert any(len(cpu_set) == 1 for cpu_set in report["threads"]), report["threads"]
