"""Helpers shared across tvm_dcn's layers (operators, schedules, the PyTorch bridge). Pure Python:
importing this module imports nothing else (not even torch)."""
from __future__ import annotations

import sys
from typing import Sequence, Union

IntPair = Union[int, Sequence[int]]

_DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}


def int_pair(value: IntPair, name: str) -> tuple[int, int]:
    """``value`` (an int, or a pair of ints, a 2-element tensor included) as a tuple of two ints;
    TypeError naming ``name`` otherwise (bools are not ints here)."""
    torch = sys.modules.get("torch")  # a tensor can only come from a process that imported torch
    if torch is not None and isinstance(value, torch.Tensor):
        value = value.tolist()
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if isinstance(value, int):
        return (value, value)
    try:
        items = tuple(value)
    except TypeError:
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}") from None
    if len(items) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in items):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    return items  # type: ignore[return-value]


def largest_divisor(n: int, limit: int, multiple_of: int = 1) -> int:
    """The largest d <= limit dividing n with d % multiple_of == 0 (1 if there is none)."""
    for d in range(max(1, min(n, limit)), 0, -1):
        if n % d == 0 and d % multiple_of == 0:
            return d
    return 1


def dtype_bytes(dtype: str) -> int:
    """Bytes of one element of ``dtype`` (a TVM dtype string; 4 for unknown ones)."""
    return _DTYPE_BYTES.get(dtype, 4)
