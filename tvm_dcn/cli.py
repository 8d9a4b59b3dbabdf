"""The ``tvm-dcn`` command line.

    tvm-dcn info                      target, target tag, cache and tuning-record locations
    tvm-dcn bench [--output PATH]     forward deformable conv on the local CPU vs torchvision and
                                      dense conv2d (default / hand / tuned tvm-dcn kernels)
"""
from __future__ import annotations

import argparse
import os
import sys


def _info(args) -> int:
    from . import cache_dir, host_target, target_tag  # noqa: PLC0415
    from .tuning_records import records_dir  # noqa: PLC0415

    tag = target_tag(None)
    print(f"target:         {host_target()}")
    print(f"target tag:     {tag}")
    print(f"kernel cache:   {cache_dir()}")
    folder = records_dir(tag)
    print(f"tuning records: {folder} ({'present' if folder.exists() else 'none for this machine'})")
    for name in ("TVM_NUM_THREADS", "OMP_WAIT_POLICY", "TVM_THREAD_POOL_SPIN_COUNT"):
        print(f"{name}={os.environ.get(name, '')}")
    return 0


def _bench(args) -> int:
    from . import bench  # noqa: PLC0415

    schedules = tuple(s for s in ("default", "hand", "tuned") if not (s == "default" and args.no_default))
    env = bench.environment()
    print(env)
    results = [bench.run_case(case, schedules=schedules, repeats=args.repeats) for case in bench.DEFAULT_CASES]
    bench.write_results(results, args.output)
    if args.output:
        print(f"wrote {args.output}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="tvm-dcn", description="tvm-dcn: deformable convolution in Apache TVM")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="show the target, its tag and the cache locations").set_defaults(func=_info)
    bench_parser = sub.add_parser("bench", help="time tvm-dcn against torchvision and dense conv2d on the CPU")
    bench_parser.add_argument("--output", default="bench_results/forward_cpu.json", help="JSON results file ('' for none)")
    bench_parser.add_argument("--repeats", type=int, default=20, help="timed repeats per candidate (median reported)")
    bench_parser.add_argument("--no-default", action="store_true", help="skip the slow unscheduled kernels")
    bench_parser.set_defaults(func=_bench)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
