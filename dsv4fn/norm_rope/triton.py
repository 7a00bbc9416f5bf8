# pyright: reportPossiblyUnboundVariable=false
# (constexpr-guarded branches in @triton.jit kernels: names bound under one constexpr value only)
"""Triton kernels for RMS-normalize, RoPE (interleaved pairs) and the fused norm + RoPE.

One kernel serves the three steps (constexpr flags pick normalize / rotate / both). Every row of
`x` (any leading shape, flattened) is one block row; `cos`/`sin` broadcast over trailing leading
dims (e.g. `[n, 1, half]` against `x [n, heads, d]`) are addressed as `row // group` without copying.

Numerics follow `reference.py` element by element, in fp32, with one rounding to the output dtype:
  * `r = 1 / sqrt_rn(sum(x^2) / d + eps)` with IEEE division and square root (what torch's CPU
    `rsqrt` computes); only the order of the sum of squares differs from torch.
  * `y = (x * r) * w`; RoPE `re*c - im*s`, `re*s + im*c` with every product rounded on its own
    (on the GPU through `mul.rn`, which the compiler never contracts into an FMA), as torch does.
  * bf16 output: round-to-nearest-even from the fp32 bits in integer math (the Triton CPU
    interpreter truncates on its own fp32 -> bf16 cast).

Ops (namespace `dsv4fn::`): `rms_normalize`, `rms_normalize_` (in place, mutates `x`), `norm_rope`,
`apply_rope`; all launch without host synchronisation (CUDA-graph capturable).
"""

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import _backend
from .._contracts import check_same_device
from .._triton_common import call_op, cdiv, f32_to_bf16_bits, interpreting, next_pow2, triton_op

_FLOATS = (torch.float32, torch.bfloat16, torch.float16)
# elements of one program's [rows, cols] block
_BLOCK_ELEMS = 4096


if interpreting():

    @triton.jit
    def _mul_rn(a, b):
        return a * b

else:

    @triton.jit
    def _mul_rn(a, b):
        # a separately rounded IEEE product (no FTZ): PTX never contracts `mul.rn` into an FMA
        return tl.inline_asm_elementwise(
            "mul.rn.f32 $0, $1, $2;", "=r,r,r", [a, b], dtype=tl.float32, is_pure=True, pack=1
        )


@triton.jit
def _norm_rope_kernel(
    x_ptr,
    w_ptr,
    cos_ptr,
    sin_ptr,
    out_ptr,
    n_rows,
    x_row_stride,
    out_row_stride,
    cs_row_stride,
    group,
    eps,
    D: tl.constexpr,
    NOPE: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
    NORM: tl.constexpr,
    HAS_W: tl.constexpr,
    ROPE: tl.constexpr,
    INVERSE: tl.constexpr,
    OUT_BF16: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    rmask = rows < n_rows
    cmask = cols < D
    mask = rmask[:, None] & cmask[None, :]
    rows64 = rows.to(tl.int64)
    x_row = x_ptr + rows64[:, None] * x_row_stride
    x = tl.load(x_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    y = x
    if NORM:
        ss = tl.sum(x * x, axis=1)
        ms = tl.div_rn(ss, tl.full(ss.shape, D, tl.float32))
        r = tl.div_rn(tl.full(ss.shape, 1.0, tl.float32), tl.sqrt_rn(ms + eps))
        y = _mul_rn(x, r[:, None])
        if HAS_W:
            w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
            y = _mul_rn(y, w[None, :])
    if ROPE:
        rel = cols - NOPE
        rot = (rel >= 0) & cmask
        odd = (rel & 1) == 1
        pcols = tl.where(odd, cols - 1, cols + 1)
        rmask2 = mask & rot[None, :]
        xp = tl.load(x_row + pcols[None, :], mask=rmask2, other=0.0).to(tl.float32)
        yp = xp
        if NORM:
            yp = _mul_rn(xp, r[:, None])
            if HAS_W:
                wp = tl.load(w_ptr + pcols, mask=rot, other=0.0).to(tl.float32)
                yp = _mul_rn(yp, wp[None, :])
        cs_off = (rows // group).to(tl.int64)[:, None] * cs_row_stride + (rel >> 1)[None, :]
        c = tl.load(cos_ptr + cs_off, mask=rmask2, other=0.0).to(tl.float32)
        s = tl.load(sin_ptr + cs_off, mask=rmask2, other=0.0).to(tl.float32)
        if INVERSE:
            s = -s
        a = _mul_rn(y, c)  # even: re*c, odd: im*c
        b = _mul_rn(yp, s)  # even: im*s, odd: re*s
        y = tl.where(rot[None, :], tl.where(odd[None, :], b + a, a - b), y)
    o_ptrs = out_ptr + rows64[:, None] * out_row_stride + cols[None, :]
    if OUT_BF16:
        tl.store(o_ptrs, f32_to_bf16_bits(y), mask=mask)
    else:
        tl.store(o_ptrs, y.to(out_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# host side
# ---------------------------------------------------------------------------------------------


def _check_x(name: str, x: Tensor) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOATS:
        raise TypeError(f"{name}: expected dtype float32, bfloat16 or float16, got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"{name}: expected a non-empty last dim, got shape {list(x.shape)}")
    if x.shape[-1] > 1 and x.stride(-1) != 1:
        raise ValueError(f"{name}: expected unit stride in the last dim, got strides {x.stride()}")


def _check_weight(weight: Tensor | None, d: int) -> None:
    if weight is None:
        return
    if not isinstance(weight, Tensor):
        raise TypeError(f"weight: expected a torch.Tensor or None, got {type(weight).__name__}")
    if weight.dtype not in _FLOATS:
        raise TypeError(f"weight: expected a floating dtype, got {weight.dtype}")
    if tuple(weight.shape) != (d,):
        raise ValueError(f"weight: expected shape [{d}], got {list(weight.shape)}")


def _check_cos_sin(x: Tensor, cos: Tensor, sin: Tensor) -> None:
    for name, t in (("cos", cos), ("sin", sin)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _FLOATS:
            raise TypeError(f"{name}: expected a floating dtype, got {t.dtype}")
        if t.dim() < 1:
            raise ValueError(f"{name}: expected at least one dim, got a scalar")
    if cos.shape != sin.shape:
        raise ValueError(f"sin: expected the shape of cos {list(cos.shape)}, got {list(sin.shape)}")
    half = cos.shape[-1]
    if 2 * half > x.shape[-1]:
        raise ValueError(f"cos: last dim {half} rotates {2 * half} dims, more than x's last dim {x.shape[-1]}")
    try:
        torch.broadcast_shapes(cos.shape[:-1], x.shape[:-1])
    except RuntimeError as e:
        raise ValueError(
            f"cos: shape {list(cos.shape)} does not broadcast against x {list(x.shape)} minus its last dim"
        ) from e
    if torch.broadcast_shapes(cos.shape[:-1], x.shape[:-1]) != x.shape[:-1]:
        raise ValueError(f"cos: shape {list(cos.shape)} would broadcast x {list(x.shape)} to a larger shape")


def _rows_view(x: Tensor) -> Tensor:
    """x as [rows, d] (a view when the leading dims collapse, else a copy)."""
    return x.reshape(-1, x.shape[-1])


def _cos_sin_rows(x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, int]:
    """(cos [rows_c, half], sin [rows_c, half], group): x row `i` uses cos row `i // group`.

    Cheap views when the broadcast dims of cos are trailing leading dims of x (the `[n, 1, half]`
    against `[n, heads, d]` case); any other broadcast is materialized."""
    lead = tuple(x.shape[:-1])
    half = cos.shape[-1]
    cs = (1,) * (len(lead) - (cos.dim() - 1)) + tuple(cos.shape[:-1])
    p = len(lead)
    while p > 0 and cs[p - 1] == 1:
        p -= 1
    if all(cs[k] == lead[k] for k in range(p)):
        group = math.prod(lead[p:])
        rows_c = math.prod(lead[:p])
        c2 = cos.reshape(rows_c, half)
        s2 = sin.reshape(rows_c, half)
        if c2.stride(-1) != 1 or s2.stride(-1) != 1 or c2.stride(0) != s2.stride(0):
            c2, s2 = c2.contiguous(), s2.contiguous()
        return c2, s2, max(group, 1)
    c2 = cos.expand(*lead, half).reshape(-1, half).contiguous()
    s2 = sin.expand(*lead, half).reshape(-1, half).contiguous()
    return c2, s2, 1


def _launch(
    x2: Tensor,
    weight: Tensor | None,
    cos2: Tensor | None,
    sin2: Tensor | None,
    group: int,
    out2: Tensor,
    eps: float,
    *,
    norm: bool,
    rope: bool,
    inverse: bool,
) -> None:
    n_rows = x2.shape[0]
    if n_rows == 0:
        return
    d = int(x2.shape[1])  # compile-time sizes: specialized (symbolic under dynamic tracing)
    half = int(cos2.shape[-1]) if (rope and cos2 is not None) else 0
    block_d = next_pow2(d)
    block_r = max(1, _BLOCK_ELEMS // block_d)
    out_bf16 = out2.dtype == torch.bfloat16
    out_k = out2.view(torch.int16) if out_bf16 else out2
    grid = (cdiv(n_rows, block_r),)
    num_warps = 4 if block_r * block_d <= 4096 else 8
    torch.library.wrap_triton(_norm_rope_kernel)[grid](
        x2,
        weight if weight is not None else x2,
        cos2 if cos2 is not None else x2,
        sin2 if sin2 is not None else x2,
        out_k,
        n_rows,
        x2.stride(0),
        out2.stride(0),
        cos2.stride(0) if cos2 is not None else 0,
        group,
        float(eps),
        D=d,
        NOPE=d - 2 * half,
        BLOCK_R=block_r,
        BLOCK_D=block_d,
        NORM=norm,
        HAS_W=weight is not None,
        ROPE=rope,
        INVERSE=inverse,
        OUT_BF16=out_bf16,
        num_warps=num_warps,
    )


# ---------------------------------------------------------------------------------------------
# ops
# ---------------------------------------------------------------------------------------------


@triton_op("dsv4fn::rms_normalize", mutates_args=())
def rms_normalize_op(x: Tensor, weight: Tensor | None, eps: float) -> Tensor:
    """`x * rsqrt(mean(x^2) + eps) [* weight]` over the last dim; result in x.dtype."""
    x2 = _rows_view(x)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _launch(x2, weight, None, None, 1, out.view(-1, x.shape[-1]), eps, norm=True, rope=False, inverse=False)
    return out


@triton_op("dsv4fn::rms_normalize_", mutates_args=("x",))
def rms_normalize_inplace_op(x: Tensor, weight: Tensor | None, eps: float) -> None:
    """In-place `rms_normalize`: x is overwritten with its normalized rows."""
    x2 = x.view(-1, x.shape[-1])
    _launch(x2, weight, None, None, 1, x2, eps, norm=True, rope=False, inverse=False)


@triton_op("dsv4fn::norm_rope", mutates_args=())
def norm_rope_op(
    x: Tensor, weight: Tensor | None, eps: float, cos: Tensor, sin: Tensor, out_dtype: torch.dtype | None
) -> Tensor:
    """Fused RMS-normalize (optional weight) + RoPE of the last `2 * cos.shape[-1]` dims."""
    x2 = _rows_view(x)
    c2, s2, group = _cos_sin_rows(x, cos, sin)
    out = torch.empty(x.shape, dtype=out_dtype or x.dtype, device=x.device)
    _launch(x2, weight, c2, s2, group, out.view(-1, x.shape[-1]), eps, norm=True, rope=True, inverse=False)
    return out


@triton_op("dsv4fn::apply_rope", mutates_args=())
def apply_rope_op(x: Tensor, cos: Tensor, sin: Tensor, inverse: bool) -> Tensor:
    """RoPE of the last `2 * cos.shape[-1]` dims (inverse: conjugate); other dims copied."""
    x2 = _rows_view(x)
    c2, s2, group = _cos_sin_rows(x, cos, sin)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _launch(x2, None, c2, s2, group, out.view(-1, x.shape[-1]), 0.0, norm=False, rope=True, inverse=inverse)
    return out


# ---------------------------------------------------------------------------------------------
# backend adapters: the reference's signatures
# ---------------------------------------------------------------------------------------------


@_backend.register("rms_normalize", "triton")
def rms_normalize(x: Tensor, weight: Tensor | None = None, eps: float = 1e-6) -> Tensor:
    """Triton `rms_normalize`; same signature and result as `reference.rms_normalize`."""
    _check_x("x", x)
    _check_weight(weight, x.shape[-1])
    check_same_device(x=x, weight=weight)
    return call_op(rms_normalize_op, x, weight, float(eps))


def rms_normalize_(x: Tensor, weight: Tensor | None = None, eps: float = 1e-6) -> Tensor:
    """In-place `rms_normalize`: overwrites and returns `x` (its leading dims must collapse to rows)."""
    _check_x("x", x)
    _check_weight(weight, x.shape[-1])
    check_same_device(x=x, weight=weight)
    try:
        x.view(-1, x.shape[-1])
    except RuntimeError as e:
        raise ValueError(f"x: leading dims must be viewable as rows for the in-place op, strides {x.stride()}") from e
    call_op(rms_normalize_inplace_op, x, weight, float(eps))
    return x


@_backend.register("norm_rope", "triton")
def norm_rope(
    x: Tensor, weight: Tensor | None, eps: float, cos: Tensor, sin: Tensor, *, out_dtype: torch.dtype | None = None
) -> Tensor:
    """Triton `norm_rope`; same signature and result as `reference.norm_rope`."""
    _check_x("x", x)
    _check_weight(weight, x.shape[-1])
    _check_cos_sin(x, cos, sin)
    if out_dtype is not None and out_dtype not in _FLOATS:
        raise TypeError(f"out_dtype: expected float32, bfloat16, float16 or None, got {out_dtype}")
    check_same_device(x=x, weight=weight, cos=cos, sin=sin)
    return call_op(norm_rope_op, x, weight, float(eps), cos, sin, out_dtype)


@_backend.register("apply_rope", "triton")
def apply_rope(x: Tensor, cos: Tensor, sin: Tensor, *, inverse: bool = False) -> Tensor:
    """Triton `apply_rope`; same signature and result as `reference.apply_rope`."""
    _check_x("x", x)
    _check_cos_sin(x, cos, sin)
    check_same_device(x=x, cos=cos, sin=sin)
    return call_op(apply_rope_op, x, cos, sin, bool(inverse))


__all__ = ["apply_rope", "norm_rope", "rms_normalize", "rms_normalize_"]
