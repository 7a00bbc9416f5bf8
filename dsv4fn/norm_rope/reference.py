"""Reference RMS-normalize, RoPE (interleaved pairs, YaRN tables), fused norm + RoPE, Hadamard.

All math in fp32 (Hadamard accumulates in fp64), one rounding to the output dtype at the end.
"""

import functools
import math

import torch
from torch import Tensor

from ..config import DSV4Config, yarn_correction_range


def rms_normalize(x: Tensor, weight: Tensor | None = None, eps: float = 1e-6) -> Tensor:
    """`x * rsqrt(mean(x^2) + eps) [* weight]` over the last dim, fp32 math, result in x.dtype."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.square().mean(dim=-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.float()
    return y.to(x.dtype)


def rope_frequencies(config: DSV4Config, ratio: int) -> Tensor:
    """fp32 `[rope_dim/2]` angular frequencies of a layer with compression ratio `ratio` (spec §1.3)."""
    theta, yarn = config.layer_rope_theta(ratio)
    dim = config.rope_dim
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    if yarn:
        low, high = yarn_correction_range(config, theta)
        ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
        smooth = 1 - ramp
        freqs = freqs / config.rope_factor * (1 - smooth) + freqs * smooth
    return freqs


def rope_cos_sin(freqs: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
    """(cos, sin) fp32 `[*positions.shape, rope_dim/2]`: angle = fp32(p) * fp32(f), as DeepSeek's
    `precompute_freqs_cis` builds its complex64 table."""
    ang = positions.to(torch.float32).unsqueeze(-1) * freqs.to(positions.device)
    return torch.cos(ang), torch.sin(ang)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor, *, inverse: bool = False) -> Tensor:
    """Rotate the last `2 * cos.shape[-1]` dims of `x` in interleaved pairs (2i, 2i+1) = (re, im).

    `cos`/`sin` broadcast against `x[..., :half]` minus the last dim (add head dims with unsqueeze).
    Inverse rotation uses the conjugate. Math in fp32, result in x.dtype.
    """
    rd = 2 * cos.shape[-1]
    nope, rot = x[..., : x.shape[-1] - rd], x[..., x.shape[-1] - rd :].float()
    re, im = rot[..., 0::2], rot[..., 1::2]
    s = -sin if inverse else sin
    out = torch.stack([re * cos - im * s, re * s + im * cos], dim=-1).flatten(-2)
    return torch.cat([nope.float(), out], dim=-1).to(x.dtype)


def norm_rope(
    x: Tensor, weight: Tensor | None, eps: float, cos: Tensor, sin: Tensor, *, out_dtype: torch.dtype | None = None
) -> Tensor:
    """Fused RMS-normalize (optional weight) then RoPE of the last dims, from the unrounded fp32
    normalized values; one rounding to `out_dtype` (default x.dtype)."""
    normed = rms_normalize(x.float(), weight, eps)
    return apply_rope(normed, cos, sin).to(out_dtype or x.dtype)


def hadamard_matrix(n: int, device: torch.device | str = "cpu") -> Tensor:
    """Sylvester (natural order) Walsh–Hadamard matrix of size n (entries ±1), fp64."""
    if n & (n - 1):
        raise ValueError(f"Hadamard size must be a power of two, got {n}")
    h = torch.ones(1, 1, dtype=torch.float64, device=device)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


@functools.lru_cache(maxsize=16)
def _hadamard_cached(n: int, device: torch.device) -> Tensor:
    return hadamard_matrix(n, device)


def hadamard(x: Tensor) -> Tensor:
    """`x @ H * n^-0.5` over the last dim (fp64 accumulation), result in fp32. The matrix is built once per
    (size, device): a decode step would otherwise spend ~2 log2(n) small launches rebuilding it."""
    n = x.shape[-1]
    h = hadamard_matrix(n, x.device) if torch.compiler.is_compiling() else _hadamard_cached(n, x.device)
    return (x.double() @ h * (1.0 / math.sqrt(n))).float()
