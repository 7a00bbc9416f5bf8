"""Pieces every Triton kernel module shares: the interpreter switch and exact bf16 rounding."""

import os

import triton
import triton.language as tl


def interpreting() -> bool:
    """True under `TRITON_INTERPRET=1` (CPU CI): kernels then upcast bf16 after `tl.load` and avoid
    what the interpreter gets wrong (see NOTES.md). Read at import of each kernel module."""
    return os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def f32_to_bf16_bits(y):
    """fp32 -> bf16 bit pattern (int16), round to nearest even, NaN kept NaN (the interpreter's
    `.to(tl.bfloat16)` truncates, so exact kernels round in integer code on every path)."""
    bits = y.to(tl.int32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    rounded = tl.where(y != y, 0x7FC0, rounded)
    return rounded.to(tl.int16)
