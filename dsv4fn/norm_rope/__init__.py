"""Fused helpers: RMS-normalize, RoPE (and its inverse), norm + RoPE, Hadamard.

The public functions check their arguments (tier 1: dtype, shapes, devices; O(1), no sync) and compute with
the torch reference; the Triton kernels of these helpers are registered as backends of the steps that use them.
"""

import torch
from torch import Tensor

from .. import _backend
from .._contracts import check_same_device, require
from . import reference as _ref
from .reference import hadamard_matrix, rope_cos_sin, rope_frequencies

_backend.register("rms_normalize", "torch")(_ref.rms_normalize)
_backend.register("norm_rope", "torch")(_ref.norm_rope)
_backend.register("apply_rope", "torch")(_ref.apply_rope)


def _check_x(x: object) -> Tensor:
    require(isinstance(x, Tensor), f"x: expected a tensor, got {type(x).__name__}", TypeError)
    assert isinstance(x, Tensor)
    require(x.is_floating_point(), f"x: expected a floating-point tensor, got {x.dtype}", TypeError)
    require(x.dim() >= 1 and x.shape[-1] > 0, f"x: expected a non-empty last dim, got shape {list(x.shape)}")
    return x


def _check_weight(weight: Tensor | None, x: Tensor) -> None:
    if weight is None:
        return
    require(isinstance(weight, Tensor) and weight.is_floating_point(), "weight: expected a floating tensor", TypeError)
    require(tuple(weight.shape) == (x.shape[-1],), f"weight: expected shape [{x.shape[-1]}], got {list(weight.shape)}")
    check_same_device(x=x, weight=weight)


def _check_cos_sin(x: Tensor, cos: Tensor, sin: Tensor) -> None:
    for name, t in (("cos", cos), ("sin", sin)):
        require(isinstance(t, Tensor) and t.is_floating_point(), f"{name}: expected a floating tensor", TypeError)
    require(cos.shape == sin.shape, f"sin: expected the shape of cos {list(cos.shape)}, got {list(sin.shape)}")
    require(
        cos.dim() >= 1 and 0 < 2 * cos.shape[-1] <= x.shape[-1],
        f"cos: expected a last dim of 1..{x.shape[-1] // 2} (half the rotated dims of x), got shape {list(cos.shape)}",
    )
    try:
        torch.broadcast_shapes(tuple(cos.shape[:-1]), tuple(x.shape[:-1]))
    except RuntimeError:
        raise ValueError(
            f"cos: leading dims {list(cos.shape[:-1])} do not broadcast against x's {list(x.shape[:-1])} "
            "(add head dims with unsqueeze)"
        ) from None
    check_same_device(x=x, cos=cos, sin=sin)


def rms_normalize(x: Tensor, weight: Tensor | None = None, eps: float = 1e-6) -> Tensor:
    """`x * rsqrt(mean(x^2) + eps) [* weight]` over the last dim, fp32 math, result in x.dtype."""
    _check_weight(weight, _check_x(x))
    require(eps >= 0, f"eps: expected >= 0, got {eps}")
    return _ref.rms_normalize(x, weight, eps)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor, *, inverse: bool = False) -> Tensor:
    """Rotate the last `2 * cos.shape[-1]` dims of `x` in interleaved (re, im) pairs; `inverse`: the conjugate."""
    _check_cos_sin(_check_x(x), cos, sin)
    return _ref.apply_rope(x, cos, sin, inverse=inverse)


def norm_rope(
    x: Tensor, weight: Tensor | None, eps: float, cos: Tensor, sin: Tensor, *, out_dtype: torch.dtype | None = None
) -> Tensor:
    """RMS-normalize (optional weight) then RoPE from the unrounded fp32 values; one rounding to `out_dtype`."""
    _check_weight(weight, _check_x(x))
    _check_cos_sin(x, cos, sin)
    require(eps >= 0, f"eps: expected >= 0, got {eps}")
    return _ref.norm_rope(x, weight, eps, cos, sin, out_dtype=out_dtype)


def hadamard(x: Tensor) -> Tensor:
    """`x @ H * n^-0.5` over the last dim (n a power of two), fp64 accumulation, result in fp32."""
    n = _check_x(x).shape[-1]
    require(n & (n - 1) == 0, f"x: the last dim must be a power of two for the Hadamard transform, got {n}")
    return _ref.hadamard(x)


__all__ = [
    "apply_rope",
    "hadamard",
    "hadamard_matrix",
    "norm_rope",
    "rms_normalize",
    "rope_cos_sin",
    "rope_frequencies",
]
