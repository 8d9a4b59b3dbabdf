"""An in-register transposition of an 8 x 8 float32 tile (AVX: 24 two-input shuffles), as a
tensor intrinsic for the store of a tile computed along one axis and stored along the other.

LLVM does not find this transposition itself: given the tile as a local buffer written along one
axis and read along the other, it goes through the stack, element by element."""
from __future__ import annotations

from tvm.s_tir import TensorIntrin
from tvm.script import tirx as T

TRANSPOSE_8X8_F32 = "tvm_dcn_transpose_8x8_f32"
# Rows and columns of the tile.
TILE = 8


@T.prim_func(s_tir=True)
def _transpose_desc(a: T.handle, b: T.handle) -> None:
    row_stride_a = T.int32()
    row_stride_b = T.int32()
    middle_stride_b = T.int32()
    A = T.match_buffer(a, (8, 8), "float32", strides=[row_stride_a, 1], offset_factor=1, scope="local")
    B = T.match_buffer(b, (8, 1, 8), "float32", strides=[row_stride_b, middle_stride_b, 1], offset_factor=1)
    with T.sblock("root"):
        T.reads(A[0:8, 0:8])
        T.writes(B[0:8, 0, 0:8])
        for i, j in T.grid(8, 8):
            with T.sblock("transpose"):
                vi, vj = T.axis.remap("SS", [i, j])
                B[vi, 0, vj] = A[vj, vi]


@T.prim_func(s_tir=True)
def _transpose_impl(a: T.handle, b: T.handle) -> None:
    row_stride_a = T.int32()
    row_stride_b = T.int32()
    middle_stride_b = T.int32()
    A = T.match_buffer(a, (8, 8), "float32", strides=[row_stride_a, 1], offset_factor=1, scope="local")
    B = T.match_buffer(b, (8, 1, 8), "float32", strides=[row_stride_b, middle_stride_b, 1], offset_factor=1)
    with T.sblock("root"):
        T.reads(A[0:8, 0:8])
        T.writes(B[0:8, 0, 0:8])
        r0 = A.vload([0, 0], "float32x8")
        r1 = A.vload([1, 0], "float32x8")
        r2 = A.vload([2, 0], "float32x8")
        r3 = A.vload([3, 0], "float32x8")
        r4 = A.vload([4, 0], "float32x8")
        r5 = A.vload([5, 0], "float32x8")
        r6 = A.vload([6, 0], "float32x8")
        r7 = A.vload([7, 0], "float32x8")
        # Interleave pairs of rows within 128-bit halves (unpcklps / unpckhps).
        t0 = T.Shuffle([r0, r1], [0, 8, 1, 9, 4, 12, 5, 13])
        t1 = T.Shuffle([r0, r1], [2, 10, 3, 11, 6, 14, 7, 15])
        t2 = T.Shuffle([r2, r3], [0, 8, 1, 9, 4, 12, 5, 13])
        t3 = T.Shuffle([r2, r3], [2, 10, 3, 11, 6, 14, 7, 15])
        t4 = T.Shuffle([r4, r5], [0, 8, 1, 9, 4, 12, 5, 13])
        t5 = T.Shuffle([r4, r5], [2, 10, 3, 11, 6, 14, 7, 15])
        t6 = T.Shuffle([r6, r7], [0, 8, 1, 9, 4, 12, 5, 13])
        t7 = T.Shuffle([r6, r7], [2, 10, 3, 11, 6, 14, 7, 15])
        # Pairs of pairs (shufps): columns j and j + 4 of four rows.
        u0 = T.Shuffle([t0, t2], [0, 1, 8, 9, 4, 5, 12, 13])
        u1 = T.Shuffle([t0, t2], [2, 3, 10, 11, 6, 7, 14, 15])
        u2 = T.Shuffle([t1, t3], [0, 1, 8, 9, 4, 5, 12, 13])
        u3 = T.Shuffle([t1, t3], [2, 3, 10, 11, 6, 7, 14, 15])
        u4 = T.Shuffle([t4, t6], [0, 1, 8, 9, 4, 5, 12, 13])
        u5 = T.Shuffle([t4, t6], [2, 3, 10, 11, 6, 7, 14, 15])
        u6 = T.Shuffle([t5, t7], [0, 1, 8, 9, 4, 5, 12, 13])
        u7 = T.Shuffle([t5, t7], [2, 3, 10, 11, 6, 7, 14, 15])
        # 128-bit halves of rows 0-3 and 4-7 (vperm2f128).
        B[0, 0, 0:8] = T.Shuffle([u0, u4], [0, 1, 2, 3, 8, 9, 10, 11])
        B[1, 0, 0:8] = T.Shuffle([u1, u5], [0, 1, 2, 3, 8, 9, 10, 11])
        B[2, 0, 0:8] = T.Shuffle([u2, u6], [0, 1, 2, 3, 8, 9, 10, 11])
        B[3, 0, 0:8] = T.Shuffle([u3, u7], [0, 1, 2, 3, 8, 9, 10, 11])
        B[4, 0, 0:8] = T.Shuffle([u0, u4], [4, 5, 6, 7, 12, 13, 14, 15])
        B[5, 0, 0:8] = T.Shuffle([u1, u5], [4, 5, 6, 7, 12, 13, 14, 15])
        B[6, 0, 0:8] = T.Shuffle([u2, u6], [4, 5, 6, 7, 12, 13, 14, 15])
        B[7, 0, 0:8] = T.Shuffle([u3, u7], [4, 5, 6, 7, 12, 13, 14, 15])


def register() -> str:
    """Register the intrinsic (once per process; trace replay needs it too): returns its name."""
    if TensorIntrin.get(TRANSPOSE_8X8_F32, allow_missing=True) is None:
        TensorIntrin.register(TRANSPOSE_8X8_F32, _transpose_desc, _transpose_impl)
    return TRANSPOSE_8X8_F32
