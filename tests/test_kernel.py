"""The kernel build pipeline: workloads, targets and tags, schedule sources, the caches."""
import json
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

import tvm_dcn
from tvm_dcn import kernel as kernel_mod
from tvm_dcn.ops.deform_conv import forward_workload
from tvm_dcn.target import as_target, target_tag

SMALL = dict(batch=1, in_channels=4, height=6, width=5, out_channels=4, kernel_size=(3, 3), padding=(1, 1),
             with_mask=True, with_bias=True)


def small_args(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 30, generator=g, dtype=dtype)
    off = torch.randn(1, 18, 30, generator=g, dtype=dtype)
    mask = torch.rand(1, 9, 30, generator=g, dtype=dtype)
    w = torch.randn(4, 36, generator=g, dtype=dtype)
    b = torch.randn(4, generator=g, dtype=dtype)
    return [x, off, mask, w, b, torch.empty(1, 4, 30, dtype=dtype)]


@pytest.fixture
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TVM_DCN_CACHE_DIR", str(tmp_path / "cache"))
    tvm_dcn.clear_memory_cache()
    yield tmp_path / "cache"
    tvm_dcn.clear_memory_cache()


def test_workload_is_canonical_and_round_trips():
    a = forward_workload(**SMALL)
    b = forward_workload(**{**SMALL, "kernel_size": [3, 3]})
    assert a == b and hash(a) == hash(b) and a.key() == b.key()
    assert tvm_dcn.Workload.from_dict(json.loads(a.key())) == a
    assert a["kernel_size"] == (3, 3)
    with pytest.raises(KeyError, match="nope"):
        a["nope"]
    with pytest.raises(ValueError, match="workload"):
        tvm_dcn.Workload.from_dict({"op": "x"})


def test_target_tags():
    assert target_tag(None).startswith("llvm-") and target_tag(None).endswith(f"-{os.cpu_count() and len(os.sched_getaffinity(0))}c")
    assert target_tag({"kind": "cuda", "arch": "sm_90"}) == "cuda-sm_90"
    assert target_tag({"kind": "llvm", "mcpu": "skylake-avx512", "num-cores": 4}).endswith("-avx512-4c")
    assert target_tag({"kind": "llvm", "mcpu": "haswell", "num-cores": 8}).endswith("-avx2-8c")
    assert as_target(None) is as_target("llvm")
    with pytest.raises(ValueError, match="target"):
        as_target({"kind": "no-such-kind"})
    with pytest.raises(TypeError, match="target"):
        as_target(3)


def test_schedule_sources_agree(private_cache):
    wl = forward_workload(**SMALL)
    best = tvm_dcn.compile(wl)
    assert best.schedule_source == "hand"  # no tuning records are committed for these shapes
    outputs = {}
    for source in ("hand", "default"):
        kern = tvm_dcn.compile(wl, schedule=source)
        assert kern.schedule_source == source
        args = small_args()
        kern(*args)
        outputs[source] = args[-1]
    torch.testing.assert_close(outputs["hand"], outputs["default"], rtol=1e-5, atol=1e-5)
    with pytest.raises(LookupError, match="tuning record"):
        tvm_dcn.compile(wl, schedule="tuned")
    with pytest.raises(ValueError, match="schedule"):
        tvm_dcn.compile(wl, schedule="fast")
    with pytest.raises(TypeError, match="workload"):
        tvm_dcn.compile("deform_conv2d")


def test_memory_cache_hit(private_cache):
    wl = forward_workload(**SMALL)
    first = tvm_dcn.compile(wl)
    assert tvm_dcn.compile(forward_workload(**SMALL)) is first
    assert first.library_path and os.path.exists(first.library_path)
    assert os.path.dirname(first.library_path).startswith(str(private_cache))


_CHILD = textwrap.dedent(f"""
    import json, torch, tvm_dcn
    from tvm_dcn.ops.deform_conv import forward_workload
    k = tvm_dcn.compile(forward_workload(**{SMALL!r}))
    x = torch.ones(1, 4, 30); off = torch.zeros(1, 18, 30); m = torch.ones(1, 9, 30)
    w = torch.ones(4, 36); b = torch.zeros(4); out = torch.empty(1, 4, 30)
    k(x, off, m, w, b, out)
    # out[0, 0, 7] is an interior pixel: 9 taps x 4 channels of ones.
    print(json.dumps([k.from_disk_cache, k.library_path, k.schedule_source, float(out[0, 0, 7])]))
""")


def _child_env(cache):
    return dict(os.environ, TVM_DCN_CACHE_DIR=str(cache))


def _run_child(cache):
    out = subprocess.run([sys.executable, "-c", _CHILD], env=_child_env(cache), capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_disk_cache_reused_across_processes(private_cache):
    first, second = _run_child(private_cache), _run_child(private_cache)
    assert first[0] is False and second[0] is True
    assert first[1] == second[1] and first[2] == second[2] == "hand"
    assert first[3] == second[3] == 36.0
    # This process finds the same library too.
    kern = tvm_dcn.compile(forward_workload(**SMALL))
    assert kern.from_disk_cache and kern.library_path == first[1]


def test_concurrent_processes_share_the_cache_safely(private_cache):
    """Processes compiling the same kernel at once all end with a working kernel and one file."""
    procs = [subprocess.Popen([sys.executable, "-c", _CHILD], env=_child_env(private_cache),
                              stdout=subprocess.PIPE, text=True) for _ in range(3)]
    outs = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert all(o[3] == 36.0 for o in outs)
    libraries = [f for f in private_cache.rglob("*") if f.is_file()]
    assert len(libraries) == 1 and libraries[0].suffix == ".so"


def test_corrupt_disk_cache_entry_is_rebuilt(private_cache):
    path = _run_child(private_cache)[1]
    with open(path, "wb") as f:  # e.g. a truncated file (a disk that filled up mid-write)
        f.write(b"not a shared library")
    rebuilt = _run_child(private_cache)
    assert rebuilt[0] is False and rebuilt[1] == path and rebuilt[3] == 36.0
    kern = tvm_dcn.compile(forward_workload(**SMALL))  # the replaced file now loads (in this process)
    assert kern.from_disk_cache and kern.library_path == path


def test_corrupt_tuning_log_falls_back_to_hand(private_cache, tmp_path, monkeypatch):
    logs = tmp_path / "logs" / target_tag(None)
    logs.mkdir(parents=True)
    (logs / "database_workload.json").write_text("{ this is not json\n")
    (logs / "database_tuning_record.json").write_text("garbage\n")
    monkeypatch.setenv("TVM_DCN_TUNING_LOGS", str(tmp_path / "logs"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        kern = tvm_dcn.compile(forward_workload(**{**SMALL, "out_channels": 8}))
    assert kern.schedule_source == "hand"
    assert any("tuning records" in str(w.message) for w in caught)


def test_unwritable_cache_dir_still_works(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("TVM_DCN_CACHE_DIR", str(blocker / "sub"))  # a path under a regular file
    tvm_dcn.clear_memory_cache()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kern = tvm_dcn.compile(forward_workload(**SMALL))
    assert kern.library_path is None
    args = small_args()
    kern(*args)
    tvm_dcn.clear_memory_cache()


def test_kernel_takes_torch_tensors_zero_copy(private_cache):
    """The kernel writes straight into the torch output buffer (no copies on the way)."""
    kern = tvm_dcn.compile(forward_workload(**SMALL))
    args = small_args()
    before = args[-1].data_ptr()
    args[-1].fill_(float("nan"))
    kern(*args)
    assert args[-1].data_ptr() == before and torch.isfinite(args[-1]).all()


def test_cache_dir_default(monkeypatch):
    monkeypatch.delenv("TVM_DCN_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", "/somewhere")
    assert str(kernel_mod.cache_dir()) == "/somewhere/tvm-dcn"
