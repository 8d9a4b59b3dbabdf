"""Auto-scheduling with MetaSchedule: tune a workload set for a target, export committed records.

    tvm_dcn.tune.tune(tvm_dcn.workloads.load("resnet50-dcn-224"), trials_per_task=256)
    tvm-dcn tune --workloads resnet50-dcn-224 --trials-per-task 256

How a run goes:

1. Every distinct workload of the set is a task, weighted by how often the set runs it.
2. The design space of a task is MetaSchedule's generic one united with the hand schedule's own,
   whose tile sizes become sampled decisions (``design_space``).
3. The work dir (default ``tvm-dcn-tuning/<target-tag>/``) holds a MetaSchedule JSON database of
   every measured candidate. A task that has no record yet is first *seeded* with its hand
   schedule (``schedules/``), measured like any candidate, so the best record is never worse
   than the hand schedule and the evolutionary search starts from it.
4. MetaSchedule searches (evolutionary search, XGBoost cost
   model, gradient task scheduler) until each task has ``trials_per_task`` measured records.
   Runs are resumable: records already in the work dir count, so re-running with the same budget
   does nothing and a larger budget continues the search.
5. The best records of each task are measured again next to the hand schedule (in
   ``VERIFY_PASSES`` passes of alternating order, each scored by its fastest pass), and the
   fastest of each workload is exported
   to ``<output>/`` (default: the package's ``tuning_logs/<target-tag>/``):
   ``database_workload.json`` and ``database_tuning_record.json`` (one record per workload,
   sorted by workload, so diffs are readable) and ``manifest.json``
   (target, versions, date, trials and measured latencies). Records of other workloads already
   in that folder are kept.

Measurements run on this machine, or through a TVM RPC tracker (``rpc_tracker="host:port"``,
``rpc_key``) on whatever servers registered with it under that key.
"""
from __future__ import annotations

import datetime
import functools
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import tvm

from . import ops, schedule_checks
from ._meta_schedule import (import_tensor_intrinsics, import_tensor_intrinsics_for, intrinsics_key, mean_seconds,
                             meta_schedule, records_of)
from .ops import ir_module
from .ops.workload import Workload, unique_with_counts
from .target import TargetLike, as_target, target_config, target_tag
from .tuning_records import MANIFEST_FILE, RECORD_FILE, WORKLOAD_FILE, records_dir
from .version import __version__

logger = logging.getLogger(__name__)

HAND_SEEDS_FILE = "hand_seeds.json"
# A record replaces the hand schedule only if it measured this much faster at verification: less
# is within this machine's noise. Identical kernels differed by up to 5.7% in one `tvm-dcn bench`
# run; records that led hand schedules by 6% and 4% at verification were 5% and 23% slower than
# them in `tvm-dcn bench` (a different context: cold caches after other work).
HAND_MARGIN = 1.10
# Verification runs the candidates of all tasks this many times, in alternating order, and scores
# each by its fastest pass (the mean of that pass's repeats): load on this shared host comes in
# bursts that slow whole measurements by 30-50% (the repeats within one pass agree to a few
# percent), and load only ever slows a kernel down. Scored by the mean of two passes, the same
# candidates put records 23-40% "ahead" of hand schedules that equalled or beat them in
# `tvm-dcn bench`; four passes of the same candidates put those records and hands within 5%, each
# ahead in some pass. Check a displaced hand schedule in `tvm-dcn bench` before committing.
VERIFY_PASSES = 4


def fastest_pass_seconds(run_secs: Sequence[float], passes: int) -> float:
    """The mean of the fastest of ``passes`` equal runs of repeats in ``run_secs`` (all of them
    as one pass if they do not split evenly)."""
    size = len(run_secs) // passes if passes > 0 and len(run_secs) % passes == 0 else len(run_secs)
    return min(sum(run_secs[i:i + size]) / size for i in range(0, len(run_secs), size))


@dataclass
class TaskResult:
    """Outcome of one workload: best measured latency (seconds) and where it came from."""

    workload: Workload
    count: int
    trials: int
    best_seconds: Optional[float]
    hand_seconds: Optional[float]
    best_is_hand: bool
    record: object = field(default=None, repr=False)  # the chosen MetaSchedule TuningRecord


@dataclass
class TuneResult:
    target_tag: str
    work_dir: Path
    output_dir: Optional[Path]
    tasks: list[TaskResult] = field(default_factory=list)


def parse_tracker(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"rpc_tracker must be HOST:PORT, got {address!r}")
    return host, int(port)


def make_runner(rpc_tracker: Optional[str] = None, rpc_key: Optional[str] = None, *, repeats: int = 3,
                timeout_sec: float = 60.0, max_workers: Optional[int] = None):
    """MetaSchedule runner: local, or through an RPC tracker (``rpc_key`` required then)."""
    ms = meta_schedule()
    evaluator = ms.runner.EvaluatorConfig(number=3, repeat=repeats, min_repeat_ms=50, enable_cpu_cache_flush=False)
    if rpc_tracker is None:
        if rpc_key is not None:
            raise ValueError("rpc_key given without rpc_tracker")
        return ms.runner.LocalRunner(timeout_sec=timeout_sec, evaluator_config=evaluator)
    if not rpc_key:
        raise ValueError("rpc_tracker needs rpc_key (the key the RPC servers registered with)")
    host, port = parse_tracker(rpc_tracker)
    config = ms.runner.RPCConfig(tracker_host=host, tracker_port=port, tracker_key=rpc_key,
                                 session_timeout_sec=int(timeout_sec))
    return ms.runner.RPCRunner(rpc_config=config, evaluator_config=evaluator, max_workers=max_workers or 1)


def _measure_many(mods: Sequence[tvm.IRModule], target, builder, runner, *,
                  passes: int = 1) -> list[Optional[list[float]]]:
    """Build and run scheduled modules as MetaSchedule does: run seconds of each, None where it
    failed. One builder call for all of them: each call starts fresh worker processes. With
    ``passes`` > 1 the modules run that many times, every other pass in reverse order, and each
    module's run seconds are those of all passes (a burst of load on this shared host otherwise
    lands on whichever modules ran during it)."""
    ms = meta_schedule()
    built = builder.build([ms.builder.BuilderInput(mod, target) for mod in mods])
    results: list[Optional[list[float]]] = [None] * len(mods)
    runnable = []
    for i, item in enumerate(built):
        if item.error_msg:
            logger.warning("tvm_dcn.tune: build failed: %s", item.error_msg.splitlines()[-1])
        else:
            runnable.append(i)
    if not runnable:
        return results
    device = "cpu" if target.kind.name == "llvm" else target.kind.name
    failed = set()
    try:
        for pass_index in range(passes):
            order = runnable if pass_index % 2 == 0 else runnable[::-1]
            futures = runner.run([ms.runner.RunnerInput(built[i].artifact_path, device,
                                                        ms.arg_info.ArgInfo.from_prim_func(mods[i]["main"]))
                                  for i in order])
            for i, future in zip(order, futures):
                result = future.result()
                if result.error_msg:
                    logger.warning("tvm_dcn.tune: run failed: %s", result.error_msg.splitlines()[-1])
                    failed.add(i)
                else:
                    results[i] = (results[i] or []) + [float(sec) for sec in result.run_secs]
        for i in failed:
            results[i] = None
    finally:
        for i in runnable:
            shutil.rmtree(os.path.dirname(built[i].artifact_path), ignore_errors=True)
    return results


def _shut_down(runner) -> None:
    """Stop the runner's worker processes now: MetaSchedule leaves them to the pool's ``__del__``,
    which may never run, and they outlive the process."""
    pool = getattr(runner, "pool", None)
    if pool is not None:
        pool.shutdown(wait=True)


def design_space(workload: Workload, target):
    """MetaSchedule's generic space (post-order-apply of its schedule rules), united with the hand
    schedule's own space (its tile sizes as sampled decisions) where the hand schedule has one:
    the search mixes both, and the hand choices are a point of the second."""
    ms = meta_schedule()
    from .schedules import find_template  # noqa: PLC0415

    template = find_template(workload.op, target.kind.name)
    postprocs = "from-target"
    if schedule_checks.has_extern_stage(ir_module(workload)):
        kind = "llvm" if target.kind.name == "llvm" else "cuda"
        postprocs = list(ms.postproc.Postproc.create(kind)) + [_extern_order_check()]
    if template is None:
        return ms.space_generator.PostOrderApply(postprocs=postprocs)

    def hand_space(sch) -> None:
        template(sch, workload, target)

    return ms.space_generator.SpaceGeneratorUnion(
        [ms.space_generator.PostOrderApply(), ms.space_generator.ScheduleFn(hand_space)], postprocs=postprocs)


def _extern_order_check():
    """A MetaSchedule postprocessor rejecting candidates that compute an extern stage's input after
    the extern (``schedule_checks``): they read unwritten memory, and crash or scatter garbage."""
    ms = meta_schedule()
    from tvm.ir.utils import derived_object  # noqa: PLC0415

    @derived_object
    class ExternOrderCheck(ms.postproc.PyPostproc):
        def _initialize_with_tune_context(self, context) -> None:
            pass

        def apply(self, sch) -> bool:
            return schedule_checks.extern_input_computed_late(sch.mod) is None

        def clone(self):
            return _extern_order_check()

    return ExternOrderCheck()


def _warm_builder_worker(kind: str, arch: str) -> None:
    """Runs once in each builder process, before any build: MetaSchedule's build function imports
    the tensor intrinsics on its first call; importing only the target's here keeps that out of the
    build timeout and cheap."""
    import_tensor_intrinsics(kind, arch)


def make_builder(target, max_workers: int = 1):
    """MetaSchedule's LocalBuilder whose worker processes import only ``target``'s intrinsics."""
    ms = meta_schedule()
    return ms.builder.LocalBuilder(max_workers=max_workers, timeout_sec=120,
                                   initializer=functools.partial(_warm_builder_worker, *intrinsics_key(target)))


def hand_trace(workload: Workload, target, *, point: bool = False):
    """The trace of the hand schedule of ``workload`` (None if it has none). ``point``: its
    point in the design space instead (``schedules.HAND_DECISIONS``: the template's sampling
    instructions, the hand choices as decisions), None where the schedule has no template."""
    from .schedules import find, find_hand_point  # noqa: PLC0415

    hand = (find_hand_point if point else find)(workload.op, target.kind.name)
    if hand is None:
        return None
    sch = tvm.s_tir.Schedule(ir_module(workload))
    hand(sch, workload, target)
    return sch.trace


def traced_schedule(workload: Workload, trace) -> tvm.s_tir.Schedule:
    """A schedule of ``workload``'s PrimFunc with ``trace`` applied (postprocessors kept)."""
    sch = tvm.s_tir.Schedule(ir_module(workload))
    trace.apply_to_schedule(sch, remove_postproc=False)
    return sch


def seed_with_hand(db, workload: Workload, target, builder, runner) -> tuple[Optional[float], object]:
    """Measure the hand schedule of ``workload`` and its point in the design space (where it has
    one) and commit them to ``db``: the search's first population then holds the hand point with
    decisions its mutations change (the fixed schedule's trace has none). Returns the fixed hand
    schedule's (mean seconds, None if it failed; trace, None if the operator has no hand
    schedule)."""
    ms = meta_schedule()
    trace = hand_trace(workload, target)
    if trace is None:
        return None, None
    traces = [t for t in (trace, hand_trace(workload, target, point=True)) if t is not None]
    mods = [traced_schedule(workload, t).mod for t in traces]
    mod = ir_module(workload)
    measured = _measure_many(mods, target, builder, runner)
    for t, run_secs in zip(traces, measured):
        if run_secs is not None:
            db.commit_tuning_record(ms.database.TuningRecord(
                t, db.commit_workload(mod), run_secs, target, ms.arg_info.ArgInfo.from_prim_func(mod["main"])))
    return (sum(measured[0]) / len(measured[0]) if measured[0] is not None else None), trace


class _Progress:
    """A one-line progress bar on stderr, updated by a MetaSchedule measure callback."""

    def __init__(self, total: int, done: int, enabled: bool) -> None:
        self.total, self.done, self.enabled = total, done, enabled
        self.start = time.time()
        self.failed = 0

    def update(self, measured: int, failed: int) -> None:
        self.done += measured
        self.failed += failed
        if not self.enabled:
            return
        width = 30
        frac = min(1.0, self.done / self.total) if self.total else 1.0
        elapsed = time.time() - self.start
        bar = "#" * int(frac * width) + "-" * (width - int(frac * width))
        sys.stderr.write(f"\rtuning [{bar}] {self.done}/{self.total} trials, {self.failed} failed, "
                         f"{elapsed / 60:.1f} min")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")


def _progress_callback(progress: _Progress):
    ms = meta_schedule()
    from tvm.ir.utils import derived_object  # noqa: PLC0415

    @derived_object
    class ProgressCallback(ms.measure_callback.PyMeasureCallback):
        def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results):
            failed = sum(1 for b, r in zip(builder_results, runner_results) if b.error_msg or r.error_msg)
            progress.update(len(measure_candidates), failed)

    return ProgressCallback()


def tune(workloads: Sequence[Workload], target: TargetLike = None, *, trials_per_task: int = 256,
         work_dir: Optional[os.PathLike] = None, output_dir: Optional[os.PathLike] = None, export: bool = True,
         rpc_tracker: Optional[str] = None, rpc_key: Optional[str] = None, num_trials_per_iter: int = 32,
         population: int = 128, genetic_iters: int = 3, verify_top: int = 4, seed: int = 0,
         progress: bool = True, set_names: Sequence[str] = (), search: bool = True) -> TuneResult:
    """Tune ``workloads`` (repeats weight a workload) for ``target`` (None: this CPU); see the
    module docstring. Returns per-task results; writes records to ``output_dir`` if ``export``.

    ``population`` and ``genetic_iters`` size the evolutionary search of each round (MetaSchedule's
    defaults are 512 and 4; on a 2-core machine sampling and evolving dominate the tuning time,
    so the defaults here are smaller). ``num_trials_per_iter`` candidates are measured per round.

    ``verify_top``: the best records of each task and its hand schedule are measured again, one
    after another, and the fastest of that second measurement is exported, so that a candidate
    that got lucky once (a measurement during a noisy moment) does not displace a better one.

    ``search=False``: no seeding and no search; verify and export the records the work dir holds
    (e.g. after stopping a long run). ``trials_per_task`` is then ignored (the manifest's budget is
    null; each record's ``trials`` says how many candidates its workload had).
    """
    ms = meta_schedule()
    if trials_per_task < 1:
        raise ValueError(f"trials_per_task must be positive, got {trials_per_task}")
    target = as_target(target)
    pairs = unique_with_counts(ops.for_target(wl, target) for wl in workloads)  # the target's formulation
    if not pairs:
        raise ValueError("workloads: nothing to tune")
    tag = target_tag(target)
    work_dir = Path(work_dir) if work_dir is not None else Path("tvm-dcn-tuning") / tag
    work_dir.mkdir(parents=True, exist_ok=True)
    cores = int(target.attrs.get("num-cores", 0) or os.cpu_count() or 1) if target.kind.name == "llvm" else 1
    # Before the database: loading it parses the traces of earlier runs, which name the intrinsics.
    import_tensor_intrinsics_for(target)
    db = ms.database.JSONDatabase(work_dir=str(work_dir))
    builder = make_builder(target, max_workers=max(1, min(cores, os.cpu_count() or 1)))
    runner = make_runner(rpc_tracker, rpc_key)
    try:
        seeds_path = work_dir / HAND_SEEDS_FILE
        hand_seeds = json.loads(seeds_path.read_text()) if seeds_path.exists() else {}
        for wl, _ in pairs if search else ():
            # No record of its PrimFunc: new, or its operator definition changed since the work
            # dir was seeded (the workload key is the same then; the old seed is stale).
            if not records_of(db, wl):
                seconds, trace = seed_with_hand(db, wl, target, builder, runner)
                hand_seeds[wl.key()] = {"seconds": seconds, "trace": str(trace) if trace is not None else None}
                seeds_path.write_text(json.dumps(hand_seeds, indent=1, sort_keys=True) + "\n")

        done = {wl: len(records_of(db, wl)) for wl, _ in pairs}
        remaining = [(wl, count, trials_per_task - done[wl]) for wl, count in pairs
                     if search and done[wl] < trials_per_task]
        if remaining:
            _search(remaining, target, work_dir, db, builder, runner, cores=cores, population=population,
                    genetic_iters=genetic_iters, num_trials_per_iter=num_trials_per_iter, seed=seed,
                    progress=progress)

        result = TuneResult(tag, work_dir, None)
        to_verify = []
        for wl, count in pairs:
            records = records_of(db, wl)
            seed_info = hand_seeds.get(wl.key(), {})
            task = TaskResult(wl, count, len(records), None, seed_info.get("seconds"), False)
            if records:
                task.record, task.best_seconds = records[0], mean_seconds(records[0])
                task.best_is_hand = str(records[0].trace) == seed_info.get("trace")
                to_verify.append((task, records[:verify_top]))
            result.tasks.append(task)
        if verify_top > 0 and to_verify:
            _verify(to_verify, target, builder, runner)
        if export:
            result.output_dir = export_records(result.tasks, target, output_dir, set_names=set_names,
                                               trials_per_task=trials_per_task if search else None)
        return result
    finally:
        _shut_down(runner)


def _search(remaining: Sequence[tuple[Workload, int, int]], target, work_dir: Path, db, builder, runner, *,
            cores: int, population: int, genetic_iters: int, num_trials_per_iter: int, seed: int,
            progress: bool) -> None:
    """MetaSchedule's search over the (workload, count, trials still to measure) tasks."""
    ms = meta_schedule()
    total = sum(r for _, _, r in remaining)
    most = max(r for _, _, r in remaining)
    bar = _Progress(total=total, done=0, enabled=progress)
    names = [f"{i:02d}_{wl.op}" for i, (wl, _, _) in enumerate(remaining)]
    loggers = [task_log(work_dir, name) for name in names]

    def strategy():
        return ms.search_strategy.EvolutionarySearch(
            population_size=population, init_min_unmeasured=min(50, population), genetic_num_iters=genetic_iters)

    tasks = [ms.TuneContext(mod=ir_module(wl), target=target, space_generator=design_space(wl, target),
                            search_strategy=strategy(), task_name=name, logger=log,
                            rand_state=seed + i, num_threads=cores).clone()
             for i, ((wl, _, _), name, log) in enumerate(zip(remaining, names, loggers))]
    callbacks = list(ms.measure_callback.MeasureCallback.create("default")) + [_progress_callback(bar)]
    try:
        ms.tune_tasks(tasks=tasks, task_weights=[float(c) for _, c, _ in remaining], work_dir=str(work_dir),
                      max_trials_global=total, max_trials_per_task=most,
                      num_trials_per_iter=min(num_trials_per_iter, most), builder=builder, runner=runner,
                      database=db, cost_model="xgb", measure_callbacks=callbacks, task_scheduler="gradient")
    finally:
        bar.close()
        for log in loggers:
            close_task_log(log)


def task_log(work_dir: Path, name: str) -> logging.Logger:
    """The logger of one tuning task, writing to ``<work_dir>/logs/<name>.log`` only.

    MetaSchedule's own ``get_loggers_from_work_dir`` reconfigures the whole process's logging with
    ``logging.config.dictConfig``: that closes every handler the application (or pytest) has
    installed, and it fails with ``AttributeError`` on ``None.format`` whenever a handler without
    a name sits on the ``tvm.s_tir.meta_schedule`` logger (one added with ``addHandler``, or left
    by an earlier ``dictConfig``). A library must leave the process's logging as it found it.
    """
    log_dir = Path(work_dir) / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    log = logging.getLogger(f"{__name__}.task.{name}")
    log.setLevel(logging.DEBUG)
    log.propagate = False  # per-task search details go to the file, not to the console
    close_task_log(log)  # a task of the same name tuned before in this process
    handler = logging.FileHandler(log_dir / f"{name}.log", mode="a")
    handler.setFormatter(logging.Formatter("%(asctime)s [%(levelname)s] %(message)s", "%Y-%m-%d %H:%M:%S"))
    log.addHandler(handler)
    return log


def close_task_log(log: logging.Logger) -> None:
    for handler in list(log.handlers):
        log.removeHandler(handler)
        handler.close()


def _verify(tasks: Sequence[tuple[TaskResult, list]], target, builder, runner) -> None:
    """Re-measure the given records of each task and its hand schedule, all in one measurement;
    keep each task's fastest (in place), the hand schedule unless a record beat it by
    ``HAND_MARGIN``."""
    ms = meta_schedule()
    plans, mods = [], []
    for task, records in tasks:
        hand = hand_trace(task.workload, target)
        traces = [r.trace for r in records]
        if hand is not None and all(str(t) != str(hand) for t in traces):
            traces.append(hand)
        mods.extend(traced_schedule(task.workload, trace).mod for trace in traces)
        plans.append((task, traces, hand))
    all_secs = iter(_measure_many(mods, target, builder, runner, passes=VERIFY_PASSES))
    for task, traces, hand in plans:
        measured = []
        for trace in traces:
            run_secs = next(all_secs)
            if run_secs is not None:
                measured.append((fastest_pass_seconds(run_secs, VERIFY_PASSES), trace, run_secs))
        if not measured:
            continue
        seconds, trace, run_secs = min(measured, key=lambda m: m[0])
        hand_measured = next((m for m in measured if hand is not None and str(m[1]) == str(hand)), None)
        if hand_measured is not None and seconds * HAND_MARGIN > hand_measured[0]:
            seconds, trace, run_secs = hand_measured  # not clearly faster than hand: keep hand
        mod = ir_module(task.workload)
        task.record = ms.database.TuningRecord(trace, ms.database.Workload(mod), run_secs, target,
                                               ms.arg_info.ArgInfo.from_prim_func(mod["main"]))
        task.best_seconds = seconds
        if hand is not None:
            if hand_measured is not None:
                task.hand_seconds = hand_measured[0]
            task.best_is_hand = str(trace) == str(hand)


def export_records(tasks: Sequence[TaskResult], target, output_dir: Optional[os.PathLike] = None, *,
                   set_names: Sequence[str] = (), trials_per_task: Optional[int] = None) -> Path:
    """Write the best record of each task (plus other workloads already committed there) to
    ``output_dir`` (default: ``tuning_logs/<tag>/``) as a pruned, sorted JSON database and manifest."""
    ms = meta_schedule()
    tag = target_tag(target)
    output_dir = Path(output_dir) if output_dir is not None else records_dir(tag)
    output_dir.mkdir(parents=True, exist_ok=True)
    entries: dict[str, tuple[Workload, object, dict]] = {}
    # Carry over committed records of workloads this run did not tune.
    old_manifest = _read_manifest(output_dir)
    if old_manifest and all((output_dir / f).exists() for f in (WORKLOAD_FILE, RECORD_FILE)):
        old_db = ms.database.JSONDatabase(str(output_dir / WORKLOAD_FILE), str(output_dir / RECORD_FILE),
                                          allow_missing=False)
        for item in old_manifest.get("records", []):
            wl = Workload.from_dict(item["workload"])
            records = records_of(old_db, wl)
            if records:
                entries[wl.key()] = (wl, records[0], item)
    for task in tasks:
        if task.record is None:
            continue
        entries[task.workload.key()] = (task.workload, task.record, {
            "workload": task.workload.as_dict(), "name": task.workload.short_name(), "count": task.count,
            "trials": task.trials, "tuned_us": round(task.best_seconds * 1e6, 2),
            "hand_us": round(task.hand_seconds * 1e6, 2) if task.hand_seconds else None,
            "best_is_hand_schedule": task.best_is_hand})

    with tempfile.TemporaryDirectory(dir=output_dir) as tmp:
        new_db = ms.database.JSONDatabase(str(Path(tmp) / WORKLOAD_FILE), str(Path(tmp) / RECORD_FILE))
        for key in sorted(entries):
            wl, record, _ = entries[key]
            new_db.commit_tuning_record(ms.database.TuningRecord(
                record.trace, new_db.commit_workload(ir_module(wl)), record.run_secs, record.target,
                record.args_info))
        for name in (WORKLOAD_FILE, RECORD_FILE):
            os.replace(Path(tmp) / name, output_dir / name)
    manifest = {
        "target": target_config(target), "target_tag": tag, "tvm": tvm.__version__, "tvm_dcn": __version__,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "workload_sets": sorted(set(old_manifest.get("workload_sets", [])) | set(set_names)) if old_manifest
        else sorted(set_names),
        "trials_per_task": trials_per_task,
        "records": [entries[key][2] for key in sorted(entries)],
    }
    (output_dir / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1, sort_keys=True, default=str) + "\n")
    return output_dir


def _read_manifest(folder: Path) -> dict:
    path = folder / MANIFEST_FILE
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except ValueError:
        logger.warning("tvm_dcn.tune: ignoring unreadable %s", path)
        return {}


def format_results(result: TuneResult) -> str:
    lines = [f"{'workload':<70} {'count':>5} {'trials':>6} {'hand us':>10} {'tuned us':>10} {'speedup':>8}"]
    for t in result.tasks:
        hand = f"{t.hand_seconds * 1e6:10.1f}" if t.hand_seconds else f"{'-':>10}"
        best = f"{t.best_seconds * 1e6:10.1f}" if t.best_seconds else f"{'-':>10}"
        speed = f"{t.hand_seconds / t.best_seconds:7.2f}x" if t.hand_seconds and t.best_seconds else f"{'-':>8}"
        name = t.workload.short_name()
        lines.append(f"{name[:70]:<70} {t.count:>5} {t.trials:>6} {hand} {best} {speed}"
                     + (" (hand)" if t.best_is_hand else ""))
    return "\n".join(lines)
