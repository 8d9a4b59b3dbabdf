"""Checks of scheduled TIR that TVM's own dependence analysis cannot make.

An extern stage (``te.extern``: the CPU scatters of the backward kernels, the RoI scatters) becomes
a block that declares no reads and no writes. TVM's schedule primitives trust declared accesses,
so they may move the computation of the extern's *input* after the extern (MetaSchedule's
``compute_at`` of ``corner_index`` into the later ``corner_sum`` loop nest does): the extern then
reads a buffer that has not been written yet, and scatters to garbage indices.
"""
from __future__ import annotations

from typing import Optional

import tvm
from tvm.s_tir.analysis import get_sblock_read_write_region


def _blocks_in_order(sch) -> tuple[list, dict]:
    """Every block below the root in program order, with the names of its enclosing blocks, and
    every buffer the blocks declare or allocate (for the access analysis)."""
    buffers, order = {}, []

    def walk(parent, ancestors: tuple[str, ...]) -> None:
        for child in sch.get_child_blocks(parent):
            block = sch.get(child)
            order.append((block, ancestors))
            for buf in list(block.alloc_buffers) + [r.source for r in list(block.reads) + list(block.writes)]:
                buffers[buf] = buf
            walk(child, ancestors + (block.name_hint,))

    root = sch.get_sblock("root")
    for buf in sch.get(root).alloc_buffers:
        buffers[buf] = buf
    walk(root, ())
    return order, buffers


def _is_extern(block) -> bool:
    """An extern stage's block: it declares no reads and no writes."""
    return not len(block.reads) and not len(block.writes)


def has_extern_stage(mod: tvm.IRModule) -> bool:
    """Whether ``mod`` has a block that declares no accesses (an extern stage)."""
    order, _ = _blocks_in_order(tvm.s_tir.Schedule(mod))
    return any(_is_extern(block) for block, _ in order)


def extern_input_computed_late(mod: tvm.IRModule) -> Optional[tuple[str, str, str]]:
    """(extern block, buffer, block writing it) if a block without declared accesses reads a
    buffer that a block after it in program order writes; None if the order is sound."""
    order, buffers = _blocks_in_order(tvm.s_tir.Schedule(mod))
    for i, (extern, _) in enumerate(order):
        if not _is_extern(extern):
            continue
        reads, writes = get_sblock_read_write_region(extern, buffers)
        inputs = {r.source.name for r in reads} - {w.source.name for w in writes}
        for block, ancestors in order[i + 1:]:
            if extern.name_hint in ancestors:
                continue  # the extern's own inner blocks
            for region in block.writes:
                if region.source.name in inputs:
                    return extern.name_hint, region.source.name, block.name_hint
    return None
