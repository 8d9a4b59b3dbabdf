"""Committed MetaSchedule tuning records, one folder per target tag (see ``tvm_dcn.target``).

Each ``<target-tag>/`` folder holds a pruned MetaSchedule JSON database (``database_workload.json``
and ``database_tuning_record.json``: one best record per workload) and ``manifest.json``.
Installed as ``tvm_dcn.tuning_logs`` so a wheel carries them.
"""
