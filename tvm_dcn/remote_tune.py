"""Two-step MetaSchedule tuning for a machine that measures but does not compile (an air-gapped
GPU host without nvcc or NVRTC), driven round by round through files.

On the build machine (TVM, the compilers, this package)::

    tvm-dcn tune-candidates --work-dir W --out C --workloads resnet50-dcn-224 \\
        --target '{"kind": "cuda", "arch": "sm_90", "model": "h100"}'

generates a round of candidates for every workload with trials left (MetaSchedule's
evolutionary search, seeded by its database and cost model in ``W``), builds each into
``C/<id>.so`` and, for CUDA targets, compiles its device code into ``C/binaries/`` (fatbin with
SASS and PTX). ``C/manifest.json`` lists the candidates with their argument shapes.

On the measuring host (TVM's runtime, the GPU; no compiler needed)::

    tvm-dcn measure C --out results.json

loads every library, answering TVM's compile requests from ``C/binaries/`` (compiling is
refused), fills the arguments with valid random data and times the kernel on the device.

Back on the build machine::

    tvm-dcn tune-feed --work-dir W results.json

commits the measured records to ``W``'s MetaSchedule database, updates and saves the cost model,
and prints the best time per workload; the next ``tune-candidates`` starts the next round.
``tvm-dcn tune-export --work-dir W`` writes the best records to ``tuning_logs/<target-tag>/``
(``tvm_dcn.tune.export_records``), where ``tvm_dcn.compile`` picks them up.

State in ``W``: ``remote_state.json`` (target, workloads, budget, rounds), the JSON database,
``cost_model.tar`` (XGBoost model and its training data), ``measured.json`` (structural hashes
of every scheduled module handed out, so a later round never repeats one) and
``round-NNN.json`` (the candidates of a round, to map results back). A results file is accepted
once, and only for the round it measured.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import tvm

from . import ops
from ._meta_schedule import import_tensor_intrinsics_for, mean_seconds, meta_schedule, records_of
from .kernel import runtime_can_run
from .ops import ir_module
from .ops.workload import Workload, unique_with_counts
from .target import TargetLike, as_target, target_config, target_tag

logger = logging.getLogger(__name__)

STATE_FILE = "remote_state.json"
MEASURED_FILE = "measured.json"
COST_MODEL_FILE = "cost_model.tar"
MANIFEST_FILE = "manifest.json"
BINARIES_DIR = "binaries"
FORMAT_VERSION = 1


@dataclass
class RoundSummary:
    """What ``tune-candidates`` produced: the round number, candidates per workload, where."""

    round: int
    candidates: dict[str, int]
    out_dir: Path
    finished: bool

    def __str__(self) -> str:
        if self.finished:
            return "every workload has used its trials: nothing to measure (tvm-dcn tune-export writes the records)"
        lines = [f"round {self.round}: {sum(self.candidates.values())} candidates in {self.out_dir}"]
        lines += [f"  {n:4d}  {name}" for name, n in self.candidates.items()]
        return "\n".join(lines)


@contextlib.contextmanager
def _quiet_xgboost():
    """MetaSchedule saves and loads its XGBoost model as ``model.bin``; XGBoost warns about the
    file extension each time (the format it picks is the right one)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*(UBJSON|Unknown file format).*", category=UserWarning)
        yield


def _read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{what}: {path} does not exist") from None
    except ValueError as err:
        raise ValueError(f"{what}: {path} is not valid JSON ({err})") from None


def _write_json(path: Path, data) -> None:
    tmp = Path(path).with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------
# Build machine: state, rounds of candidates


class _Session:
    """The tuning state of a work dir (see the module docstring)."""

    def __init__(self, work_dir: os.PathLike):
        self.work_dir = Path(work_dir)
        self.state = _read_json(self.work_dir / STATE_FILE, "work dir")
        if self.state.get("format") != FORMAT_VERSION:
            raise ValueError(f"work dir {self.work_dir}: unknown state format {self.state.get('format')!r}")
        self.target = as_target(self.state["target"])
        self.tasks = [(Workload.from_dict(t["workload"]), int(t["count"])) for t in self.state["tasks"]]
        self.ms = meta_schedule()
        import_tensor_intrinsics_for(self.target)
        self.db = self.ms.database.JSONDatabase(work_dir=str(self.work_dir))

    def save(self) -> None:
        _write_json(self.work_dir / STATE_FILE, self.state)

    def context(self, index: int, rand_state: int):
        wl = self.tasks[index][0]
        cores = int(self.target.attrs.get("num-cores", 0) or 1) if self.target.kind.name == "llvm" else 1
        strategy = self.ms.search_strategy.EvolutionarySearch(
            population_size=self.state["population"], init_min_unmeasured=min(50, self.state["population"]),
            genetic_num_iters=self.state["genetic_iters"])
        from .tune import design_space  # noqa: PLC0415

        return self.ms.TuneContext(mod=ir_module(wl), target=self.target, space_generator=design_space(wl, self.target),
                                   search_strategy=strategy, task_name=f"{index:02d}_{wl.op}", rand_state=rand_state,
                                   num_threads=cores).clone()

    def cost_model(self):
        model = self.ms.cost_model.CostModel.create("xgb", num_tuning_cores=1)
        path = self.work_dir / COST_MODEL_FILE
        if path.exists():
            try:
                with _quiet_xgboost():
                    model.load(str(path))
            except Exception as err:  # noqa: BLE001  (MetaSchedule cannot load a model saved before training)
                logger.warning("tvm_dcn.remote_tune: cost model %s not loaded (%s); starting a fresh one", path, err)
                model = self.ms.cost_model.CostModel.create("xgb", num_tuning_cores=1)
        return model

    def trials(self, index: int) -> int:
        """Candidates of task ``index`` measured so far (failures included, as MetaSchedule counts)."""
        return int(self.state["tasks"][index].get("trials", 0))

    def records(self, wl: Workload) -> list:
        """Measured records of ``wl``, fastest first."""
        return records_of(self.db, wl)


def init_work_dir(work_dir: os.PathLike, workloads: Sequence[Workload], target: TargetLike = None, *,
                  trials_per_task: int = 64, trials_per_round: int = 16, population: int = 128,
                  genetic_iters: int = 3, seed: int = 0) -> Path:
    """Start a two-step tuning in ``work_dir`` (must not hold one already): ``workloads`` (repeats
    count), for ``target`` (None: this CPU), ``trials_per_task`` measured candidates per workload
    in rounds of at most ``trials_per_round``."""
    for name, value in (("trials_per_task", trials_per_task), ("trials_per_round", trials_per_round),
                        ("population", population), ("genetic_iters", genetic_iters)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    target = _tunable_target(as_target(target))
    pairs = unique_with_counts(ops.for_target(wl, target) for wl in workloads)
    if not pairs:
        raise ValueError("workloads: nothing to tune")
    work_dir = Path(work_dir)
    if (work_dir / STATE_FILE).exists():
        raise FileExistsError(f"{work_dir} already holds a tuning ({STATE_FILE}); use it or choose another work dir")
    work_dir.mkdir(parents=True, exist_ok=True)
    state = {"format": FORMAT_VERSION, "target": target_config(target), "target_tag": target_tag(target),
             "tasks": [{"workload": wl.as_dict(), "count": count} for wl, count in pairs],
             "trials_per_task": trials_per_task, "trials_per_round": trials_per_round, "population": population,
             "genetic_iters": genetic_iters, "seed": seed, "round": 0, "pending": None, "fed": []}
    _write_json(work_dir / STATE_FILE, state)
    _write_json(work_dir / MEASURED_FILE, [])
    return work_dir


# Limits every CUDA GPU since sm_30 has; MetaSchedule's GPU rules need them in the target.
_CUDA_LIMITS = {"max_threads_per_block": 1024, "max_shared_memory_per_block": 48 * 1024, "thread_warp_size": 32}


def _tunable_target(target):
    """``target`` with the CUDA limits MetaSchedule needs, where the user's target leaves them out."""
    if target.kind.name != "cuda":
        return target
    config = target_config(target)
    missing = {k: v for k, v in _CUDA_LIMITS.items() if k not in config}
    return tvm.target.Target({**config, **missing}) if missing else target


def generate_candidates(work_dir: os.PathLike, out_dir: os.PathLike) -> RoundSummary:
    """Next round: candidates for every workload with trials left, built into ``out_dir``
    (emptied first), with a manifest; the round is recorded as pending in ``work_dir``."""
    session = _Session(work_dir)
    if session.state["pending"] is not None:
        raise RuntimeError(f"round {session.state['pending']} of {work_dir} has not been fed back yet "
                           "(tvm-dcn tune-feed); generating another would lose its results")
    round_no = session.state["round"] + 1
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in list(out_dir.glob("*.so")) + [out_dir / MANIFEST_FILE]:
        old.unlink(missing_ok=True)
    measured = set(_read_json(session.work_dir / MEASURED_FILE, "measured hashes"))
    cost_model = session.cost_model()
    token = secrets.token_hex(8)
    entries, counts = [], {}
    for index, (wl, _) in enumerate(session.tasks):
        left = session.state["trials_per_task"] - session.trials(index)
        if left <= 0:
            continue
        want = min(left, session.state["trials_per_round"])
        schedules = _new_schedules(session, index, want, measured, cost_model, first=session.trials(index) == 0)
        counts[wl.short_name()] = len(schedules)
        for sch in schedules:
            entry = _build_candidate(session, index, sch, out_dir, len(entries))
            if entry is not None:
                entries.append(entry)
    finished = not counts
    if finished:
        return RoundSummary(round_no, counts, out_dir, True)
    manifest = {"format": FORMAT_VERSION, "round": round_no, "token": token, "target": session.state["target"],
                "target_tag": session.state["target_tag"], "device": _device_type(session.target),
                "candidates": [{k: e[k] for k in ("id", "library", "args", "workload")} for e in entries]}
    _write_json(out_dir / MANIFEST_FILE, manifest)
    _write_json(session.work_dir / f"round-{round_no:03d}.json",
                {"round": round_no, "token": token,
                 "candidates": [{k: e[k] for k in ("id", "task", "trace")} for e in entries]})
    _write_json(session.work_dir / MEASURED_FILE, sorted(measured))
    session.state["round"] = round_no
    session.state["pending"] = round_no
    session.save()
    return RoundSummary(round_no, counts, out_dir, False)


def _new_schedules(session: _Session, index: int, want: int, measured: set, cost_model, first: bool) -> list:
    """Up to ``want`` schedules of task ``index`` not handed out before (their module hashes go
    into ``measured``): the hand schedule and its point in the design space (``tune.seed_with_hand``)
    first in a task's first round, then MetaSchedule's evolutionary search."""
    import tvm_ffi  # noqa: PLC0415

    from .tune import hand_trace, traced_schedule  # noqa: PLC0415

    wl = session.tasks[index][0]
    picked = []

    def take(sch) -> bool:
        key = str(tvm_ffi.structural_hash(sch.mod))
        if key in measured:
            return False
        measured.add(key)
        picked.append(sch)
        return True

    if first:
        for point in (False, True):
            trace = hand_trace(wl, session.target, point=point)
            if trace is not None and len(picked) < want:
                take(traced_schedule(wl, trace))
    ctx = session.context(index, session.state["seed"] + 1000 * session.state["round"] + index)
    ctx.pre_tuning(max_trials=want * 4, num_trials_per_iter=want, design_spaces=ctx.generate_design_space(),
                   database=session.db, cost_model=cost_model)
    try:
        for _ in range(4):  # a batch may repeat earlier rounds' schedules: ask again
            if len(picked) >= want:
                break
            candidates = ctx.generate_measure_candidates()
            if not candidates:
                break
            for cand in candidates:
                if len(picked) < want:
                    take(cand.sch)
    finally:
        ctx.post_tuning()
    return picked


def _device_type(target) -> str:
    return "cpu" if target.kind.name == "llvm" else target.kind.name


def _build_candidate(session: _Session, index: int, sch, out_dir: Path, number: int) -> Optional[dict]:
    """Compile one candidate into ``out_dir`` (and its CUDA binary into ``binaries/``)."""
    from . import cuda  # noqa: PLC0415

    ms = session.ms
    wl = session.tasks[index][0]
    cid = f"c{number:04d}"
    try:
        with tvm.transform.PassContext(opt_level=3):
            module = tvm.compile(sch.mod, target=session.target)
        if session.target.kind.name == "cuda" and not runtime_can_run(session.target):
            device = getattr(module, "mod", module).imports[0]
            source = device.inspect_source("cuda")
            binary, fmt = cuda.compile_source(source, str(session.target.attrs["arch"]))
            cuda.save_binary(out_dir / BINARIES_DIR, source, binary, fmt)
        module.export_library(str(out_dir / f"{cid}.so"))
    except Exception as err:  # noqa: BLE001  (a candidate that does not build is skipped, as MetaSchedule does)
        logger.warning("tvm_dcn.remote_tune: candidate of %s does not build: %s", wl.short_name(),
                       str(err).strip().splitlines()[-1] if str(err).strip() else err)
        return None
    args = [{"shape": [int(d) for d in info.shape], "dtype": str(info.dtype)}
            for info in ms.arg_info.ArgInfo.from_prim_func(sch.mod["main"])]
    names = [str(param.name) for param in sch.mod["main"].params]  # say what to fill them with
    for arg, name in zip(args, names):
        arg["name"] = name
    return {"id": cid, "library": f"{cid}.so", "args": args, "workload": wl.as_dict(), "task": index,
            "trace": str(tvm.ir.save_json(sch.trace.as_json()))}


# --------------------------------------------------------------------------------------------
# Measuring host: runtime only


def measure(candidates_dir: os.PathLike, results_path: os.PathLike, *, repeat: int = 5, min_repeat_ms: int = 20,
            device_index: int = 0) -> dict:
    """Time every candidate of ``candidates_dir`` on this host's device and write ``results_path``:
    per candidate the seconds of each of ``repeat`` timed runs (each repeating the kernel for at
    least ``min_repeat_ms``), or the error. Needs TVM's runtime only: CUDA device code comes from
    the folder's precompiled binaries, and compiling is refused."""
    import numpy as np  # noqa: PLC0415

    candidates_dir = Path(candidates_dir)
    manifest = _read_json(candidates_dir / MANIFEST_FILE, "candidates")
    if manifest.get("format") != FORMAT_VERSION:
        raise ValueError(f"{candidates_dir}: unknown manifest format {manifest.get('format')!r}")
    if isinstance(repeat, bool) or not isinstance(repeat, int) or repeat < 1:
        raise ValueError(f"repeat must be a positive int, got {repeat!r}")
    device_type = manifest["device"]
    if device_type != "cpu":
        from . import cuda  # noqa: PLC0415

        binaries = candidates_dir / BINARIES_DIR
        if binaries.is_dir():
            cuda.use_precompiled(binaries, allow_compile=False)
    dev = tvm.device(device_type, device_index)
    rng = np.random.default_rng(0)
    results = {}
    for cand in manifest["candidates"]:
        try:
            module = tvm.runtime.load_module(str(candidates_dir / cand["library"]))
            args = [tvm.runtime.tensor(_argument(a, cand["workload"], rng), device=dev) for a in cand["args"]]
            timer = module.time_evaluator("main", dev, number=1, repeat=repeat, min_repeat_ms=min_repeat_ms)
            results[cand["id"]] = {"run_secs": [float(s) for s in timer(*args).results]}
        except Exception as err:  # noqa: BLE001  (a failing candidate is a result too)
            message = str(err).strip()
            results[cand["id"]] = {"error": message.splitlines()[-1][:500] if message else type(err).__name__}
    out = {"format": FORMAT_VERSION, "round": manifest["round"], "token": manifest["token"],
           "target_tag": manifest["target_tag"], "device": f"{device_type}:{device_index}",
           "measured_at": time.strftime("%Y-%m-%d %H:%M:%S"), "results": results}
    _write_json(Path(results_path), out)
    return out


def _argument(arg: dict, workload: dict, rng):
    """Valid random data for a kernel argument, by its name: RoI rows inside the feature map
    (batch index in range), scalars (spatial scale 1, gamma / trans_std 0.1), RoI Pool's argmax
    on pixel 0, anything else normal (masks uniform in [0, 1))."""
    import numpy as np  # noqa: PLC0415

    shape, dtype, name = tuple(arg["shape"]), arg["dtype"], arg.get("name", "")
    params = workload.get("params", {})
    if name == "rois":
        rows = shape[0]
        height, width, batch = params.get("height", 1), params.get("width", 1), params.get("batch", 1)
        lo = rng.uniform(0, 0.5, size=(rows, 2)) * [width, height]
        size = rng.uniform(0.2, 0.5, size=(rows, 2)) * [width, height]
        rois = np.concatenate([(np.arange(rows) % batch)[:, None], lo, lo + size], axis=1)
        return rois.astype(dtype)
    if name == "scalars":
        return np.array([1.0, 0.1][:shape[0]] + [0.1] * max(0, shape[0] - 2), dtype=dtype)
    if "int" in dtype:
        return np.zeros(shape, dtype=dtype)
    if name == "mask":
        return rng.uniform(0, 1, size=shape).astype(dtype)
    return rng.standard_normal(size=shape).astype(dtype)


# --------------------------------------------------------------------------------------------
# Build machine: feed results back, export


def feed(work_dir: os.PathLike, results_path: os.PathLike) -> str:
    """Commit the measured candidates of ``results_path`` to ``work_dir``'s database (failed ones
    as records without a time, as MetaSchedule does), update and save the cost model, close the
    round. Returns a summary: best time per workload so far."""
    session = _Session(work_dir)
    pending = session.state["pending"]
    if pending is None:
        raise RuntimeError(f"{work_dir} has no round waiting for results (tvm-dcn tune-candidates first)")
    results = _read_json(Path(results_path), "results")
    round_file = _read_json(session.work_dir / f"round-{pending:03d}.json", "round")
    if results.get("round") != pending or results.get("token") != round_file["token"]:
        raise ValueError(f"{results_path} measured round {results.get('round')!r} (token {results.get('token')!r}), "
                         f"but {work_dir} waits for round {pending} (token {round_file['token']})")
    ms = session.ms
    cost_model = session.cost_model()
    by_task: dict[int, tuple[list, list]] = {}
    for cand in round_file["candidates"]:
        wl = session.tasks[cand["task"]][0]
        result = results["results"].get(cand["id"], {"error": "not measured"})
        mod = ir_module(wl)
        sch = tvm.s_tir.Schedule(mod)
        tvm.s_tir.Trace.apply_json_to_schedule(tvm.ir.load_json(cand["trace"]), sch)
        run_secs = result.get("run_secs") or None
        args_info = ms.arg_info.ArgInfo.from_prim_func(mod["main"])
        session.db.commit_tuning_record(ms.database.TuningRecord(
            sch.trace, session.db.commit_workload(mod), run_secs, session.target, args_info))
        candidates, runner_results = by_task.setdefault(cand["task"], ([], []))
        candidates.append(ms.search_strategy.MeasureCandidate(sch, args_info))
        runner_results.append(ms.runner.RunnerResult(run_secs, result.get("error")))
    for index, (candidates, runner_results) in by_task.items():
        cost_model.update(session.context(index, session.state["seed"]), candidates, runner_results)
        session.state["tasks"][index]["trials"] = session.trials(index) + len(candidates)
    with _quiet_xgboost():
        cost_model.save(str(session.work_dir / COST_MODEL_FILE))
    session.state["fed"].append({"round": pending, "token": round_file["token"], "device": results.get("device")})
    session.state["pending"] = None
    session.save()
    return summary(work_dir)


def summary(work_dir: os.PathLike) -> str:
    """Measured trials and best time per workload of ``work_dir``."""

    session = _Session(work_dir)
    lines = [f"{'workload':<70} {'trials':>6} {'best us':>10}"]
    for index, (wl, _) in enumerate(session.tasks):
        records = session.records(wl)
        best = f"{mean_seconds(records[0]) * 1e6:10.1f}" if records else f"{'-':>10}"
        lines.append(f"{wl.short_name()[:70]:<70} {session.trials(index):>6} {best}")
    return "\n".join(lines)


def export(work_dir: os.PathLike, output_dir: Optional[os.PathLike] = None) -> Path:
    """Write the best record of each workload to ``output_dir`` (default ``tuning_logs/<tag>/``)
    with ``tvm_dcn.tune.export_records``."""
    from .tune import TaskResult, export_records  # noqa: PLC0415

    session = _Session(work_dir)
    tasks = []
    for index, (wl, count) in enumerate(session.tasks):
        records = session.records(wl)
        if records:
            tasks.append(TaskResult(wl, count, session.trials(index), mean_seconds(records[0]), None, False,
                                    record=records[0]))
    if not tasks:
        raise RuntimeError(f"{work_dir}: nothing measured yet")
    return export_records(tasks, session.target, output_dir, trials_per_task=session.state["trials_per_task"])
