"""Building blocks of the GPU (``scatter="atomic"``) formulation of the scatter stages.

A scatter stage is an extern stage (``te.extern``) whose body is written with TVM's IR builder:
a zero-fill kernel for the output, then a kernel with one thread per gradient element that adds
its contributions with CUDA atomics. The kernels bind their own threads (``blockIdx.x`` x
``threadIdx.x``), so schedules (hand and dlight alike) leave these stages as they are.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Sequence

from tvm import te, tirx
from tvm.script.ir_builder import IRBuilder
from tvm.script.ir_builder import tirx as T

# Threads per block of the scatter kernels.
THREADS = 256


@contextlib.contextmanager
def when(condition):
    """The statements emitted inside run only where ``condition`` holds."""
    with T.If(condition):
        with T.Then():
            yield


def elementwise_kernel(total: int, fn: Callable) -> tirx.Stmt:
    """A kernel with one thread per element ``t < total`` running ``fn(t)``, as a TIR statement."""
    with IRBuilder() as ib:
        with T.thread_binding(0, -(-total // THREADS), "blockIdx.x") as bx:
            with T.thread_binding(0, THREADS, "threadIdx.x") as tx:
                t = bx * THREADS + tx
                with when(t < total):
                    fn(t)
    return ib.get()


def unravel(t, shape: Sequence[int]) -> list:
    """Row-major indices of flat index ``t`` in ``shape`` (the last axis fastest)."""
    indices = []
    for extent in reversed(shape[1:]):
        indices.append(t % extent)
        t = t // extent
    return [t] + indices[::-1]


def atomic_add(buffer, indices, value) -> None:
    """Emit ``buffer[indices] += value`` as a CUDA atomic add."""
    T.evaluate(T.cuda.atomic_add(T.address_of(buffer[tuple(indices)]), value))


def atomic_scatter(name: str, shape: Sequence[int], dtype: str, inputs: Sequence[te.Tensor], threads: int,
                   add: Callable) -> te.Tensor:
    """Extern stage ``name`` of ``shape``: zero-filled, then ``add(t, ins, out)`` emitted for each
    thread ``t < threads`` (``ins``/``out``: buffer proxies of ``inputs`` and the output)."""
    total = 1
    for extent in shape:
        total *= int(extent)
    zero = tirx.const(0, dtype)

    def body(ins, outs):
        in_proxies = [T.buffer_proxy(b) for b in ins]
        out = T.buffer_proxy(outs[0])

        def clear(t):
            out[tuple(unravel(t, shape))] = zero

        return tirx.SeqStmt([elementwise_kernel(total, clear),
                             elementwise_kernel(threads, lambda t: add(t, in_proxies, out))])

    return te.extern([tuple(shape)], list(inputs), body, dtype=dtype, name=name)
