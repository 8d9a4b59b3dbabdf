"""The hand schedules' tensor intrinsics, tested on their own against numpy, and how they reach
kernels (tensorized where they apply, registered before committed records are replayed)."""
import json
import subprocess
import sys

import numpy as np
import pytest
import tvm
from tvm import te

import tvm_dcn
from tvm_dcn.ops.deform_conv import forward_workload
from tvm_dcn.schedules import cpu_transpose


def _tiled_transpose(rows: int, cols: int, tensorized: bool):
    """out (cols, rows) = in^T, through an 8 x 8 local tile per (row tile, column tile): the
    shape of the forward columns' store (a tile computed along one axis, stored along the other)."""
    src = te.placeholder((rows, cols), "float32", name="src")
    out = te.compute((cols, rows), lambda c, r: src[r, c] * 2.0, name="out")
    sch = tvm.s_tir.Schedule(te.create_prim_func([src, out]))
    block = sch.get_sblock("out")
    c, r = sch.get_loops(block)
    c_outer, c_inner = sch.split(c, [None, 8])
    r_outer, r_inner = sch.split(r, [None, 8])
    sch.reorder(r_outer, c_outer, r_inner, c_inner)
    tile = sch.cache_write(block, 0, "local")
    sch.reverse_compute_at(tile, c_outer)
    # The tile computed along the source's rows (r_inner outer, c_inner vectorised) ...
    sch.transform_layout(block, ("write", 0), lambda c, r: (r, c))
    sch.vectorize(c_inner)
    # ... and stored along the output's rows: B (8, 1, 8) needs a unit axis in the middle.
    sch.transform_layout(tile, ("write", 0), lambda c, r: (c, tvm.tirx.const(0, "int32"), r))
    tile_rows = sch.get_loops(tile)[-2]
    if tensorized:
        sch.tensorize(tile_rows, cpu_transpose.register())
    return tvm.compile(sch.mod, target=tvm.target.Target({"kind": "llvm"})), sch.mod


@pytest.mark.parametrize("rows, cols", [(8, 8), (16, 24), (40, 8)])
def test_transpose_8x8_matches_numpy(rows, cols):
    rng = np.random.default_rng(rows * 100 + cols)
    data = rng.standard_normal((rows, cols)).astype("float32")
    expected = (2 * data).T
    for tensorized in (True, False):
        lib, mod = _tiled_transpose(rows, cols, tensorized)
        assert ("T.Shuffle" in mod.script()) is tensorized
        out = tvm.runtime.tensor(np.zeros((cols, 1, rows), "float32"))
        lib["main"](tvm.runtime.tensor(data), out)
        np.testing.assert_array_equal(out.numpy()[:, 0, :], expected)


def test_register_is_idempotent():
    assert cpu_transpose.register() == cpu_transpose.register() == cpu_transpose.TRANSPOSE_8X8_F32
    assert tvm.s_tir.TensorIntrin.get(cpu_transpose.TRANSPOSE_8X8_F32) is not None


def _layer(dtype="float32", channels=16):
    return forward_workload(batch=1, in_channels=channels, height=7, width=7, out_channels=channels,
                            kernel_size=(3, 3), padding=(1, 1), with_mask=True, dtype=dtype)


@pytest.mark.parametrize("dtype, channels, tensorized", [
    ("float32", 16, True),     # channels-last, 8-lane tiles: transposed by shuffles
    ("float64", 16, False),    # 4-lane tiles: LLVM's own code
    ("float32", 12, False),    # gather columns: no tile to transpose
])
def test_forward_hand_schedule_tensorizes_float32_tiles(dtype, channels, tensorized):
    _, mod = tvm_dcn.kernel.scheduled_module(_layer(dtype, channels), schedule="hand")
    assert ("T.Shuffle" in mod.script()) is tensorized


_REPLAY_CHILD = """
import json, sys
import tvm_dcn
from tvm.s_tir import TensorIntrin
from tvm_dcn import tuning_records
from tvm_dcn.schedules import cpu_transpose
assert TensorIntrin.get(cpu_transpose.TRANSPOSE_8X8_F32, allow_missing=True) is None
results = []
for item in json.loads(sys.argv[1]):
    record = tuning_records.lookup(tvm_dcn.Workload.from_dict(item["workload"]), item["target"])
    results.append(record is not None and "T.Shuffle" in record.apply().script())
print(json.dumps(results))
"""


def test_committed_records_with_intrinsics_replay_in_a_fresh_process():
    """The committed forward records on channels-last float32 workloads tensorize with the
    transposition; a process that has imported no hand schedule still replays them."""
    items = []
    for manifest_path in sorted(tvm_dcn.tuning_records.records_root().glob("*/manifest.json")):
        manifest = json.loads(manifest_path.read_text())
        if "avx2" in manifest_path.parent.name:
            items += [{"workload": r["workload"], "target": manifest["target"]} for r in manifest["records"]
                      if r["workload"]["op"] == "deform_conv2d"]
    if not items:
        pytest.skip("no committed AVX2 forward records")
    out = subprocess.run([sys.executable, "-c", _REPLAY_CHILD, json.dumps(items)], capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [True] * len(items)
