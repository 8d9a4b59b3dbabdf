"""The ``tvm-dcn`` command line.

    tvm-dcn info                      target, target tag, cache and tuning-record locations
    tvm-dcn bench [--workloads SET]   deformable conv layers of a set on the local CPU, forward and
                                      forward+backward: default / hand / tuned tvm-dcn kernels vs
                                      onnxruntime and openvino (forward, if installed), torchvision
                                      and dense conv2d; table, JSON, Markdown, PNG; --dtype bfloat16
                                      (or float16): tvm-dcn and dense conv2d in it, the others float32
    tvm-dcn tune [--workloads SET]    MetaSchedule tuning; records to tuning_logs/<target-tag>/

Two-step tuning for a GPU host without a compiler (tvm_dcn/remote_tune.py):

    tvm-dcn tune-candidates --work-dir W --out C [--workloads SET --target JSON]
                                      a round of candidates built into C (first call: starts W)
    tvm-dcn measure C --out RESULTS   on the measuring host: time C's candidates (runtime only)
    tvm-dcn tune-feed --work-dir W RESULTS
                                      commit the times to W's database and cost model
    tvm-dcn tune-export --work-dir W [--output DIR]
                                      best records to tuning_logs/<target-tag>/
"""
from __future__ import annotations

import argparse
import json
import os
import sys


def _info(args) -> int:
    from .kernel import cache_dir  # noqa: PLC0415
    from .target import host_target, target_tag  # noqa: PLC0415
    from .tuning_records import records_dir  # noqa: PLC0415

    from .target import cpu_vector_unit  # noqa: PLC0415

    tag = target_tag(None)
    unit = cpu_vector_unit(host_target())
    print(f"target:         {host_target()}")
    print(f"target tag:     {tag}")
    print(f"vector unit:    {unit.isa}, {unit.vector_bits}-bit x {unit.registers} registers; bfloat16 GEMM: "
          + ("vdpbf16ps (AVX512-BF16)" if unit.bf16_dot else "float32 FMA"))
    print(f"kernel cache:   {cache_dir()}")
    folder = records_dir(tag)
    print(f"tuning records: {folder} ({'present' if folder.exists() else 'none for this machine'})")
    for name in ("TVM_NUM_THREADS", "OMP_WAIT_POLICY", "TVM_THREAD_POOL_SPIN_COUNT", "TVM_BIND_THREADS"):
        print(f"{name}={os.environ.get(name, '')}")
    return 0


def _bench(args) -> int:
    from . import bench  # noqa: PLC0415

    schedules = tuple(s for s in bench.SCHEDULES if not (s == "default" and args.no_default))
    modes = ("forward",) if args.forward_only else bench.MODES
    if args.batch is not None and any(b < 1 for b in args.batch):
        raise SystemExit(f"tvm-dcn bench: --batch takes positive batch sizes, got {args.batch}")
    bench.run(args.workloads, modes=modes, schedules=schedules, batches=args.batch, repeats=args.repeats,
              dtype=args.dtype, output_dir=args.output_dir or None)
    return 0


def _load_workloads(names, only, command: str) -> list:
    """The workloads of sets/files ``names``, restricted to the operators ``only`` (if given)."""
    from . import workloads  # noqa: PLC0415

    wls = []
    for name in names:
        wls += workloads.load(name)
    if only:
        wls = [wl for wl in wls if wl.op in only]
        if not wls:
            raise SystemExit(f"tvm-dcn {command}: no workload of the set has an operator in {only}")
    return wls


def _tune(args) -> int:
    from . import tune, workloads  # noqa: PLC0415

    wls = _load_workloads(args.workloads, args.only, "tune")
    target = json.loads(args.target) if args.target else None
    result = tune.tune(wls, target, trials_per_task=args.trials_per_task, work_dir=args.work_dir,
                       output_dir=args.output, export=not args.no_export, rpc_tracker=args.rpc_tracker,
                       rpc_key=args.rpc_key, num_trials_per_iter=args.trials_per_round,
                       population=args.population, genetic_iters=args.genetic_iters,
                       verify_top=args.verify_top, seed=args.seed, search=not args.no_search,
                       set_names=[n for n in args.workloads if n in workloads.SETS])
    print(tune.format_results(result))
    if result.output_dir:
        print(f"records written to {result.output_dir}")
    return 0


def _json_option(text: str, option: str):
    try:
        return json.loads(text)
    except ValueError as err:
        raise SystemExit(f"tvm-dcn: {option} must be JSON ({err}): {text!r}") from None


def _tune_candidates(args) -> int:
    from pathlib import Path  # noqa: PLC0415

    from . import remote_tune  # noqa: PLC0415

    work_dir = Path(args.work_dir)
    if not (work_dir / remote_tune.STATE_FILE).exists():
        wls = _load_workloads(args.workloads or ["resnet50-dcn-224"], args.only, "tune-candidates")
        remote_tune.init_work_dir(work_dir, wls, _json_option(args.target, "--target") if args.target else None,
                                  trials_per_task=args.trials_per_task, trials_per_round=args.trials_per_round,
                                  population=args.population, genetic_iters=args.genetic_iters, seed=args.seed)
    elif args.workloads or args.target or args.only:
        raise SystemExit(f"tvm-dcn tune-candidates: {work_dir} already holds a tuning; its workloads and target "
                         "are fixed (drop --workloads/--target/--only, or use a new work dir)")
    print(remote_tune.generate_candidates(work_dir, args.out))
    return 0


def _measure(args) -> int:
    from . import remote_tune  # noqa: PLC0415

    out = remote_tune.measure(args.candidates, args.out, repeat=args.repeat, min_repeat_ms=args.min_repeat_ms,
                              device_index=args.device_index)
    failed = sum(1 for r in out["results"].values() if "error" in r)
    print(f"measured {len(out['results'])} candidates on {out['device']} ({failed} failed): {args.out}")
    return 0


def _tune_feed(args) -> int:
    from . import remote_tune  # noqa: PLC0415

    print(remote_tune.feed(args.work_dir, args.results))
    return 0


def _tune_export(args) -> int:
    from . import remote_tune  # noqa: PLC0415

    print(f"records written to {remote_tune.export(args.work_dir, args.output)}")
    return 0


def _add_remote_commands(sub) -> None:
    cand = sub.add_parser("tune-candidates", help="two-step tuning: build a round of candidates into a folder")
    cand.add_argument("--work-dir", required=True, help="tuning state (database, cost model, rounds)")
    cand.add_argument("--out", required=True, help="folder for the candidates (emptied first)")
    cand.add_argument("--workloads", nargs="+", help="first call only: sets or files (default resnet50-dcn-224)")
    cand.add_argument("--only", nargs="+", help="first call only: tune only these operators")
    cand.add_argument("--target", help="first call only: TVM target as JSON (default: this CPU)")
    cand.add_argument("--trials-per-task", type=int, default=64)
    cand.add_argument("--trials-per-round", type=int, default=16)
    cand.add_argument("--population", type=int, default=128)
    cand.add_argument("--genetic-iters", type=int, default=3)
    cand.add_argument("--seed", type=int, default=0)
    cand.set_defaults(func=_tune_candidates)
    meas = sub.add_parser("measure", help="two-step tuning: time a folder of candidates here (TVM runtime only)")
    meas.add_argument("candidates", help="folder written by tvm-dcn tune-candidates")
    meas.add_argument("--out", required=True, help="results JSON to write")
    meas.add_argument("--repeat", type=int, default=5, help="timed runs per candidate")
    meas.add_argument("--min-repeat-ms", type=int, default=20, help="each run repeats the kernel this long")
    meas.add_argument("--device-index", type=int, default=0)
    meas.set_defaults(func=_measure)
    feed = sub.add_parser("tune-feed", help="two-step tuning: commit measured results to the work dir")
    feed.add_argument("--work-dir", required=True)
    feed.add_argument("results", help="results JSON written by tvm-dcn measure")
    feed.set_defaults(func=_tune_feed)
    export = sub.add_parser("tune-export", help="two-step tuning: export the best records")
    export.add_argument("--work-dir", required=True)
    export.add_argument("--output", help="default tuning_logs/<target-tag>")
    export.set_defaults(func=_tune_export)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="tvm-dcn", description="tvm-dcn: deformable convolution in Apache TVM")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="show the target, its tag and the cache locations").set_defaults(func=_info)
    bench_parser = sub.add_parser("bench", help="time tvm-dcn against onnxruntime, openvino, torchvision and dense "
                                                 "conv2d on the CPU")
    bench_parser.add_argument("--workloads", default="resnet50-dcn-224", help="workload set or file")
    bench_parser.add_argument("--output-dir", default="bench_results",
                              help="results go to OUTPUT_DIR/<target-tag>/bench.{json,md,png} ('' for none)")
    bench_parser.add_argument("--repeats", type=int, default=20, help="timed repeats per candidate (median reported)")
    bench_parser.add_argument("--no-default", action="store_true", help="skip the slow unscheduled kernels")
    bench_parser.add_argument("--forward-only", action="store_true", help="time the forward pass only")
    bench_parser.add_argument("--batch", type=int, nargs="+", metavar="N",
                              help="time every deformable-conv layer at these batch sizes, a row each "
                                   "(e.g. --batch 1 8; default: the set's, 1 for the built-in sets)")
    bench_parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                              help="dtype of the tvm-dcn and dense conv2d rows (torchvision and the peers run "
                                   "float32); half-precision results go to bench-<dtype>.*")
    bench_parser.set_defaults(func=_bench)
    tune_parser = sub.add_parser("tune", help="auto-schedule a workload set with MetaSchedule and export the records")
    tune_parser.add_argument("--workloads", nargs="+", default=["resnet50-dcn-224"],
                             help="built-in set names or JSON/TOML workload files (default: resnet50-dcn-224)")
    tune_parser.add_argument("--only", nargs="+", help="tune only these operators (e.g. deform_conv2d)")
    tune_parser.add_argument("--target", help="TVM target as JSON (default: this CPU)")
    tune_parser.add_argument("--trials-per-task", type=int, default=256, help="measured candidates per workload")
    tune_parser.add_argument("--trials-per-round", type=int, default=32, help="candidates measured per search round")
    tune_parser.add_argument("--population", type=int, default=128, help="evolutionary search population")
    tune_parser.add_argument("--verify-top", type=int, default=4,
                             help="re-measure this many best records per workload (and the hand schedule) "
                                  "before exporting the fastest")
    tune_parser.add_argument("--genetic-iters", type=int, default=3, help="evolution iterations per round")
    tune_parser.add_argument("--work-dir", help="MetaSchedule database of all trials (default tvm-dcn-tuning/<tag>); "
                                                "re-running resumes from it")
    tune_parser.add_argument("--output", help="where to export the best records (default tuning_logs/<tag>)")
    tune_parser.add_argument("--no-export", action="store_true", help="only tune; do not touch tuning_logs")
    tune_parser.add_argument("--no-search", action="store_true",
                             help="do not search: verify and export the records the work dir already holds")
    tune_parser.add_argument("--rpc-tracker", help="measure on RPC servers registered at this tracker, HOST:PORT")
    tune_parser.add_argument("--rpc-key", help="device key of the RPC servers")
    tune_parser.add_argument("--seed", type=int, default=0)
    tune_parser.set_defaults(func=_tune)
    _add_remote_commands(sub)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
