"""The hand-schedule registry: each schedule module registers its functions for the operators and
target kind they schedule (:func:`register`, beside the code); :func:`find` looks them up."""
from __future__ import annotations

import functools
import inspect
from typing import Callable, Optional

# (operator, target kind) -> schedule(sch, workload, target)
_SCHEDULES: dict[tuple[str, str], Callable] = {}


def register(target_kind: str, *ops: str):
    """Register the decorated ``schedule(sch, workload, target)`` as the hand schedule of ``ops``
    on ``target_kind`` ('llvm', 'cuda')."""
    def wrap(fn: Callable) -> Callable:
        for op in ops:
            previous = _SCHEDULES.setdefault((op, target_kind), fn)
            if previous is not fn:
                raise ValueError(f"two hand schedules of {op} on {target_kind}: "
                                 f"{previous.__module__}.{previous.__qualname__} and {fn.__module__}.{fn.__qualname__}")
        return fn

    return wrap


def find(op: str, target_kind: str) -> Optional[Callable]:
    """The hand schedule of ``op`` for ``target_kind`` ('llvm', 'cuda'), or None."""
    return _SCHEDULES.get((op, target_kind))


def find_template(op: str, target_kind: str) -> Optional[Callable]:
    """The hand schedule of ``op`` as a tuning design space: ``template(sch, workload, target)``
    with its tile sizes sampled (schedules that take ``sampled=True``), or None."""
    hand = find(op, target_kind)
    if hand is None or "sampled" not in inspect.signature(hand).parameters:
        return None
    return functools.partial(hand, sampled=True)
