"""Pieces every Triton kernel module shares: the interpreter switch and exact bf16 rounding."""

import os
from collections.abc import Callable, Iterable
from typing import Any

import torch
import triton
import triton.language as tl

from . import _backend


def interpreting() -> bool:
    """True under `TRITON_INTERPRET=1` (CPU CI): kernels then upcast bf16 after `tl.load` and avoid
    what the interpreter gets wrong (see NOTES.md). Read at import of each kernel module."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def cdiv(a: int, b: int) -> int:
    """Ceiling division on the host. `triton.cdiv` is a `ConstexprFunction` since Triton 3.5 and costs ~5 us
    of host time per call outside a kernel: a decode step made ~18 such calls."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """Smallest power of two >= n (1 for n <= 1); the host-side `triton.next_power_of_2` without its cost."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


try:  # torch >= 2.6 (the switch the registered op itself uses in eager mode)
    from torch._library.triton import set_wrap_triton_enabled as _plain_launch
except ImportError:  # pragma: no cover
    _plain_launch = None


sm_count = _backend.sm_count  # multiprocessors of a CUDA device (cached); 0 elsewhere (callers pick their default)


def triton_op(name: str, *, mutates_args: Iterable[str] | str) -> Callable[[Callable[..., Any]], Any]:
    """`torch.library.triton_op` that remembers the op's Python body, for `call_op`."""

    def register(fn: Callable[..., Any]) -> Any:
        op = torch.library.triton_op(name, fn, mutates_args=mutates_args)
        op.eager_body = fn  # type: ignore[attr-defined]
        return op

    return register


def call_op(op: Any, *args: Any) -> Any:
    """Run a `dsv4fn::` Triton op: through the dispatcher while Dynamo traces (torch.compile, export: the
    graph keeps the op), its Python body otherwise. The body launches the same kernels with the same
    arguments; the dispatcher costs ~65 us of host time per call in eager mode (H200,
    bench/results/h200/launch_dev.txt), which dominated small decode steps run without CUDA graphs."""
    if torch.compiler.is_compiling() or _plain_launch is None:
        return op(*args)
    with _plain_launch(False):  # as the op's own eager backend does: `wrap_triton` launches the kernel directly
        return op.eager_body(*args)


@triton.jit
def f32_to_bf16_bits(y):
    """fp32 -> bf16 bit pattern (int16), round to nearest even, NaN kept NaN (the interpreter's
    `.to(tl.bfloat16)` truncates, so exact kernels round in integer code on every path)."""
    bits = y.to(tl.int32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    rounded = tl.where(y != y, 0x7FC0, rounded)
    return rounded.to(tl.int16)
