"""AVX512-BF16's dot product as a tensor intrinsic: ``vdpbf16ps`` multiplies a pair of bfloat16
values, one 32-bit broadcast (the forward's weights; in the gradients transposed weights or
output-gradient pixels), by 16 pairs of bfloat16 values (columns; in the column gradient
output-gradient values) and adds both products of each pair to one of 16 float32 accumulators:
32 multiply-adds per instruction, where a float32 FMA does 16. The 16 pairs come as two rows of 16
uint16 bit patterns (e.g. ``ops.deform_conv.pair_columns``: TVM widens intermediate bfloat16
buffers to float32), interleaved in registers by one shuffle.

TVM's own lowering widens every bfloat16 value to float32 and stores bfloat16 as 16-bit integers,
and LLVM's ``llvm.x86.avx512bf16.dpbf16ps.512`` takes ``<32 x bfloat>`` vectors, which TIR cannot
name. So the intrinsic passes the operands as 32-bit integer vectors (bit patterns, reinterpreted)
to a small LLVM function that bitcasts them and calls the instruction; the kernel imports that
function (``import_llvm``) and LLVM inlines it.
"""
from __future__ import annotations

from tvm.s_tir import TensorIntrin
from tvm.script import tirx as T

from ..cpu_isa import vector_unit

DOT_16X2_BF16 = "tvm_dcn_dot_16x2_bf16"
# The same with the pair operand as uint16 bit patterns, an intermediate buffer: the column
# gradient's transposed weight pairs, the weight gradient's zero-padded output-gradient pixels.
DOT_16X2_BF16_BITS = "tvm_dcn_dot_16x2_bf16_bits"
# Float32 accumulators (pixels) of one dot product, and the bfloat16 pair each one sums.
LANES = 16
_FUNCTION = "tvm_dcn_dpbf16ps_512"
# The column operand comes as two rows of 16 (pixels of row 2r, then of row 2r + 1); the
# instruction wants the pair of each pixel side by side: (row 2r, pixel l) at element 2l.
_INTERLEAVE = ", ".join(f"i32 {(i // 2) + 16 * (i % 2)}" for i in range(32))
# The kernel imports this module (``import_llvm``); linkonce_odr: several imports into one kernel
# merge, and once inlined the function is dropped. The intrinsic's ``<32 x bfloat>`` operands are
# those of LLVM 17 and later (the pinned TVM is built with LLVM 22).
LLVM_IR = f"""
define linkonce_odr hidden <16 x float> @{_FUNCTION}(<16 x float> %acc, <16 x i32> %a, <16 x i32> %b) #0 {{
  %ab = bitcast <16 x i32> %a to <32 x bfloat>
  %rows = bitcast <16 x i32> %b to <32 x bfloat>
  %bb = shufflevector <32 x bfloat> %rows, <32 x bfloat> poison, <32 x i32> <{_INTERLEAVE}>
  %r = call <16 x float> @llvm.x86.avx512bf16.dpbf16ps.512(<16 x float> %acc, <32 x bfloat> %ab, <32 x bfloat> %bb)
  ret <16 x float> %r
}}
declare <16 x float> @llvm.x86.avx512bf16.dpbf16ps.512(<16 x float>, <32 x bfloat>, <32 x bfloat>)
attributes #0 = {{ alwaysinline nounwind }}
"""


def _bfloat16_bits_value(bits):
    """The float32 value of a bfloat16 uint16 bit pattern (as ``ops.deform_conv.bfloat16_value``)."""
    return T.reinterpret("float32", T.shift_left(T.cast(bits, "uint32"), T.uint32(16)))


def _dot_intrinsic(pair_dtype: str, widen):
    """(description, implementation) of the 16 x 2 dot product whose broadcast pair operand A is a
    ``pair_dtype`` buffer, read as float32 by ``widen`` in the description."""
    pair_vector = f"{pair_dtype}x2"

    @T.prim_func(s_tir=True)
    def desc(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (2,), pair_dtype, offset_factor=1)
        B = T.match_buffer(b, (2, 16), "uint16", offset_factor=1)
        C = T.match_buffer(c, (16,), "float32", offset_factor=1, scope="local")
        with T.sblock("root"):
            T.reads(C[0:16], A[0:2], B[0:2, 0:16])
            T.writes(C[0:16])
            for i, k in T.grid(16, 2):
                with T.sblock("update"):
                    vi, vk = T.axis.remap("SR", [i, k])
                    C[vi] = C[vi] + widen(A[vk]) * _bfloat16_bits_value(B[vk, vi])

    @T.prim_func(s_tir=True)
    def impl(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (2,), pair_dtype, offset_factor=1)
        B = T.match_buffer(b, (2, 16), "uint16", offset_factor=1)
        C = T.match_buffer(c, (16,), "float32", offset_factor=1, scope="local")
        with T.sblock("root"):
            T.reads(C[0:16], A[0:2], B[0:2, 0:16])
            T.writes(C[0:16])
            C[T.ramp(T.int32(0), 1, 16)] = T.call_extern(
                "float32x16", _FUNCTION, C.vload([0], "float32x16"),
                T.broadcast(T.reinterpret(A.vload([0], pair_vector), dtype="int32"), 16),
                T.reinterpret(B.vload([0, 0], "uint16x32"), dtype="int32x16"))

    return desc, impl


_INTRINSICS = {DOT_16X2_BF16: ("bfloat16", lambda value: T.cast(value, "float32")),
               DOT_16X2_BF16_BITS: ("uint16", _bfloat16_bits_value)}


def register(name: str = DOT_16X2_BF16) -> str:
    """Register the intrinsic ``name`` (once per process; a replayed trace names it) and return
    its name: ``DOT_16X2_BF16`` (the pair operand a bfloat16 buffer) or ``DOT_16X2_BF16_BITS``
    (uint16 bit patterns)."""
    if TensorIntrin.get(name, allow_missing=True) is None:
        TensorIntrin.register(name, *_dot_intrinsic(*_INTRINSICS[name]))
    return name


def target_has_dot(target) -> bool:
    """Whether ``target`` has the instruction (AVX512-BF16)."""
    return vector_unit(target).bf16_dot


def require_dot(workload, target) -> None:
    """ValueError naming ``workload``'s ``gemm`` where ``target`` lacks the instruction."""
    if not target_has_dot(target):
        raise ValueError(f"workload {workload.op}: gemm={workload['gemm']!r} needs a target with avx512bf16; "
                         f"{target} has none (build the workload without the parameter)")


def import_into(sch, loop) -> None:
    """Make the kernel containing ``loop`` define the intrinsic's LLVM function."""
    sch.annotate(loop, "pragma_import_llvm", LLVM_IR)
