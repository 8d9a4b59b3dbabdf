"""The hand-schedule registry: each schedule module registers its functions for the operators and
target kind they schedule (:func:`register`, beside the code); :func:`find` looks them up."""
from __future__ import annotations

import functools
import inspect
from typing import Callable, Optional

# (operator, target kind) -> schedule(sch, workload, target)
_SCHEDULES: dict[tuple[str, str], Callable] = {}

# ``sampled`` of a schedule that takes it: False (its fixed choices), True (MetaSchedule decisions:
# a design space for the tuner), or HAND_DECISIONS: the design space's sampling instructions with
# the fixed choices as their decisions. That is the hand point of the design space as a trace the
# tuner's evolutionary search can mutate into its neighbours; the fixed schedule's trace has no
# decisions to mutate.
HAND_DECISIONS = "hand"


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
    return _with_sampled(op, target_kind, True)


def _with_sampled(op: str, target_kind: str, sampled) -> Optional[Callable]:
    hand = find(op, target_kind)
    if hand is None or "sampled" not in inspect.signature(hand).parameters:
        return None
    return functools.partial(hand, sampled=sampled)


def find_hand_point(op: str, target_kind: str) -> Optional[Callable]:
    """The hand schedule of ``op`` as its point in the tuning design space: ``point(sch, workload,
    target)`` with the template's sampling instructions and the hand choices as their decisions
    (``HAND_DECISIONS``), or None where the schedule has no template."""
    return _with_sampled(op, target_kind, HAND_DECISIONS)
