"""Workloads: the concrete, hashable description of one kernel to build.

A workload names an operator and fixes every shape, attribute and dtype of one call, so that a
kernel compiled (or tuned) for it can be reused for any call that maps to the same workload.
Lists of workloads are saved as JSON (:func:`save`); ``tvm_dcn.workloads`` reads them back.
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Union


def _freeze(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        return int(value)
    raise TypeError(f"workload parameter values must be ints, bools, strings or tuples, got {value!r}")


@dataclass(frozen=True)
class Workload:
    """One kernel to build: operator name, dtype and its shape/attribute parameters.

    ``params`` is a sorted tuple of ``(name, value)`` pairs (values are ints, bools, strings or
    tuples of those), so two workloads are equal exactly when they describe the same kernel.
    Use :meth:`make` to build one from keyword arguments.
    """

    op: str
    dtype: str
    params: tuple[tuple[str, Any], ...]

    @classmethod
    def make(cls, op: str, dtype: str, **params: Any) -> "Workload":
        return cls(op, str(dtype), tuple(sorted((k, _freeze(v)) for k, v in params.items())))

    def __getitem__(self, name: str) -> Any:
        for key, value in self.params:
            if key == name:
                return value
        raise KeyError(f"workload {self.op} has no parameter {name!r}")

    def get(self, name: str, default: Any = None) -> Any:
        return dict(self.params).get(name, default)

    def as_dict(self) -> dict[str, Any]:
        return {"op": self.op, "dtype": self.dtype, "params": dict(self.params)}

    def key(self) -> str:
        """Canonical string form (stable across processes and Python versions)."""
        return json.dumps(self.as_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Workload":
        try:
            return cls.make(data["op"], data["dtype"], **data["params"])
        except (KeyError, TypeError) as err:
            raise ValueError(f"not a workload description: {data!r} ({err})") from None

    def short_name(self) -> str:
        """A readable one-line name, e.g. for benchmark tables and file names."""
        parts = []
        for key, value in self.params:
            if isinstance(value, tuple):
                value = "x".join(str(v) for v in value)
            parts.append(f"{key}={value}")
        return f"{self.op}[{self.dtype}]({', '.join(parts)})"



def unique_with_counts(workloads: Iterable[Workload]) -> list[tuple[Workload, int]]:
    """Distinct workloads in first-seen order, each with its number of occurrences."""
    counts: Counter = Counter()
    order: dict[Workload, None] = {}
    for wl in workloads:
        counts[wl] += 1
        order.setdefault(wl, None)
    return [(wl, counts[wl]) for wl in order]


def save(path: Union[str, Path], workloads: Iterable[Workload]) -> None:
    """Write ``workloads`` (repeats folded into counts) as JSON, readable by ``tvm_dcn.workloads.load``."""
    entries = [{**wl.as_dict(), "count": count} for wl, count in unique_with_counts(workloads)]
    Path(path).write_text(json.dumps({"workloads": entries}, indent=1, sort_keys=True) + "\n")
