"""Recording the workloads a model requests (``tvm_dcn.workloads.record``), e.g. to tune exactly
those. The kernel pipeline reports every kernel request (:func:`note`); the bridge asks
:func:`is_recording` so that calls it would otherwise serve from its own plan cache still reach it.
"""
from __future__ import annotations

import contextlib
import threading
from pathlib import Path
from typing import Iterator, Union

from .ops.workload import Workload, save

_active_recorders: list["Recorder"] = []
_recorders_lock = threading.Lock()


class Recorder:
    """Collects every kernel workload compiled or looked up while it is active (see :func:`record`)."""

    def __init__(self) -> None:
        self.workloads: list[Workload] = []

    def save(self, path: Union[str, Path]) -> None:
        """Write the recorded workloads as JSON (``tvm_dcn.workloads.save``)."""
        save(path, self.workloads)


@contextlib.contextmanager
def record() -> Iterator[Recorder]:
    """Record the workloads a model hits, e.g. to tune exactly those::

        with tvm_dcn.workloads.record() as rec:
            loss = model(images).sum(); loss.backward()
        rec.save("my_model.json")          # then: tvm-dcn tune --workloads my_model.json
    """
    recorder = Recorder()
    with _recorders_lock:
        _active_recorders.append(recorder)
    try:
        yield recorder
    finally:
        with _recorders_lock:
            _active_recorders.remove(recorder)


def is_recording() -> bool:
    """Whether a :func:`record` context is active (in any thread)."""
    return bool(_active_recorders)


def note(workload: Workload) -> None:
    """Called by the kernel pipeline for every kernel request."""
    if _active_recorders:
        with _recorders_lock:
            for recorder in _active_recorders:
                recorder.workloads.append(workload)
