"""Committed MetaSchedule tuning records: ``tuning_logs/<target-tag>/`` (``tvm_dcn.tuning_logs``).

MetaSchedule looks records up by the structural hash of the PrimFunc and ignores the target, so
records are kept in one database per target tag and only the host's (or the requested target's)
folder is consulted. ``$TVM_DCN_TUNING_LOGS`` replaces the committed folder (e.g. for a fresh
tuning run). A record that cannot be read or applied gives a warning and the caller falls back
to the hand schedule.
"""
from __future__ import annotations

import functools
import importlib.resources
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import tvm

from .ops import Workload, ir_module
from .target import target_tag

logger = logging.getLogger(__name__)

WORKLOAD_FILE = "database_workload.json"
RECORD_FILE = "database_tuning_record.json"
MANIFEST_FILE = "manifest.json"


def records_root() -> Path:
    env = os.environ.get("TVM_DCN_TUNING_LOGS")
    if env:
        return Path(env).expanduser()
    return Path(str(importlib.resources.files("tvm_dcn.tuning_logs")))


def records_dir(tag: str) -> Path:
    return records_root() / tag


@dataclass
class Record:
    """A tuning record found for a workload: ``apply()`` returns the scheduled IRModule."""

    fingerprint: bytes
    apply: Callable[[], tvm.IRModule]


@functools.lru_cache(maxsize=None)
def _database(folder: str, mtimes: tuple):
    """The JSON database in ``folder`` (re-read when its files change), or None if unusable."""
    from tvm.s_tir import meta_schedule as ms  # noqa: PLC0415  (slow import: only when records exist)

    from .schedules import register_intrinsics  # noqa: PLC0415

    register_intrinsics()  # records of hand-schedule traces name the intrinsics they tensorize with
    logging.getLogger("tvm.s_tir.meta_schedule").setLevel(logging.WARNING)
    try:
        return ms.database.JSONDatabase(os.path.join(folder, WORKLOAD_FILE), os.path.join(folder, RECORD_FILE),
                                        allow_missing=False)
    except Exception as err:  # corrupt JSON, records from another TVM version
        warnings.warn(f"tvm_dcn: tuning records in {folder} cannot be read ({err}); "
                      "using hand schedules instead", RuntimeWarning, stacklevel=4)
        return None


def lookup(workload: Workload, target) -> Optional[Record]:
    """The committed record of ``workload`` for ``target``'s tag, or None."""
    folder = records_dir(target_tag(target))
    files = [folder / WORKLOAD_FILE, folder / RECORD_FILE]
    if not all(f.exists() for f in files):
        return None
    db = _database(str(folder), tuple(f.stat().st_mtime_ns for f in files))
    if db is None:
        return None
    mod = ir_module(workload)
    try:
        if not db.has_workload(mod):
            return None
        records = db.get_top_k(db.commit_workload(mod), 1)
    except Exception as err:
        warnings.warn(f"tvm_dcn: tuning record lookup failed for {workload.short_name()} ({err}); "
                      "using the hand schedule", RuntimeWarning, stacklevel=3)
        return None
    if not records:
        return None
    record = records[0]

    def apply() -> tvm.IRModule:
        sch = tvm.s_tir.Schedule(mod)
        record.trace.apply_to_schedule(sch, remove_postproc=False)
        return sch.mod

    return Record(fingerprint=str(record.trace).encode(), apply=apply)
